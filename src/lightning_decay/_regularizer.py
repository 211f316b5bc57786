"""Lightning glue shared by ``WeightPenalty`` and ``WeightDecay``: which tensors, when, and how resumed.

The parameters to regularize are found once per optimizer and bucketed by (param group, device,
dtype, sharded or not), like torch's optimizers group their foreach work; the buckets are rebuilt
only when an optimizer's param groups change (``BaseFinetuning`` adding a group). Per step, the
only Python work is gathering ``.grad`` of each bucket, as torch's optimizers do too.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_decay import kernels
from lightning_decay._checks import check_choice, is_count
from lightning_decay._compat import (
    BASE_FINETUNING,
    Callback,
    MisconfigurationException,
    is_deepspeed,
    pl,
    rank_zero_info,
    rank_zero_warn,
)
from lightning_decay._plan_cache import plan_for
from lightning_decay._repr import ArgumentsRepr
from lightning_decay.norms import all_reduce_partials, contributes_to_sum, is_dtensor, local_tensor
from lightning_decay.plan import DecayPlan, ParamDecision, few_names
from lightning_decay.rules import DecayRules, as_rules, module_rules
from lightning_decay.schedules import Constant, check_coefficient

if TYPE_CHECKING:
    from lightning_decay._attach import Attachment

#: What a resumed run does when the checkpoint has no state for a callback that needs one.
_MISSING_STATE = ("raise", "restart")


@dataclass
class Bucket:
    """Parameters of one optimizer param group sharing device, dtype and sharding."""

    group_index: int
    params: list[nn.Parameter]
    names: list[str]
    sharded: bool
    tag: Any = None
    locals: list[Tensor] = field(default_factory=list)
    refs: list[Tensor] | None = None
    # Sharded buckets: per parameter, whether this rank's partial sums enter a cross-rank sum. False on
    # all replicas but one of a parameter replicated over a mesh dimension (HSDP), so it counts once.
    counted: Tensor | None = None
    # Index ranges of the parameters for the chunked kernels (`kernels.chunk_ranges`), which bound their
    # temporaries to a few percent of the bucket. Computed once, from the local sizes, so a step loops
    # over a few chunks, never over parameters; ranges, not lists of tensors, because sharded buckets
    # get fresh local views each step (of the same shapes).
    chunks: list[tuple[int, int]] = field(init=False, default_factory=list)
    # `list(range(len(params)))`, the positions `with_grads` returns when every parameter has a gradient.
    every: list[int] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.locals = [local_tensor(p) for p in self.params]
        self.chunks = kernels.chunk_ranges(self.locals)
        self.every = list(range(len(self.params)))
        if self.sharded and self.params:
            flags = [contributes_to_sum(p) for p in self.params]
            self.counted = torch.tensor(flags, dtype=torch.bool, device=self.locals[0].device)

    def weights(self) -> list[Tensor]:
        # FSDP2 may hand out fresh local views between steps; plain parameters never change.
        return [local_tensor(p) for p in self.params] if self.sharded else self.locals

    def with_grads(self) -> tuple[list[Tensor], list[Tensor], list[int]]:
        """(weights, grads, positions) of the parameters that have a gradient this step.

        When every parameter has one (``len(positions) == len(params)``), the weights are ``weights()``
        and the positions ``every``, both shared with the bucket: callers must not modify them.
        """
        grads = [p.grad for p in self.params]
        weights = self.weights()
        if all(g is not None for g in grads):
            idx = self.every  # the common case: no further per-parameter work
        else:
            idx = [i for i, g in enumerate(grads) if g is not None]
            weights = [weights[i] for i in idx]
            grads = [grads[i] for i in idx]
        if self.sharded:
            grads = [local_tensor(g) for g in grads]  # type: ignore[arg-type]
        return weights, grads, idx  # type: ignore[return-value]


class OptimizerBuckets:
    """The buckets of one optimizer, rebuilt when its param groups change."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.signature: tuple[int, ...] = ()
        self.buckets: list[Bucket] = []
        self.handles: list[RemovableHandle] = []

    def current_signature(self) -> tuple[int, ...]:
        return tuple(len(g["params"]) for g in self.optimizer.param_groups)


class RegularizerCallback(ArgumentsRepr, Callback):
    """Base of the regularization callbacks: buckets, hooks, refusals, double-decay checks, resume.

    The work lives in methods that need no ``Trainer`` -- ``bind`` (to a module, its optimizers and a
    GradScaler), ``follow`` (optimizers replaced), ``before_step`` (the per-step work before the update),
    ``unbind`` and ``reset`` -- so that the same code runs under a Trainer and attached to a plain
    optimizer; the Trainer hooks are thin glue around them.

    Lifecycle under a Trainer: ``setup`` starts every fit from a clean state; a resumed fit loads the
    saved state (``load_state_dict``); ``on_train_start``, after Lightning restored the optimizers
    (param groups and their ``weight_decay`` included), binds to the optimizers as the first step will
    find them, so the take-over and the double-decay checks see the restored ones.
    """

    def __init__(self, rules: DecayRules | None, name: str | None = None, missing_state: str = "raise") -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"`name` must be a string (the callback's key in checkpoints) or None, got {name!r}")
        if name == "":
            raise ValueError("`name` must be a non-empty string or None, got ''")
        check_choice(missing_state, _MISSING_STATE, "missing_state")
        self.rules = as_rules(rules)
        self.name = name
        self.missing_state = missing_state
        # `None`: the LightningModule's `decay_rules` at setup (one set of rules for the run), else defaults.
        self._given_rules = rules
        self._plan: DecayPlan | None = None
        self._per_optimizer: list[OptimizerBuckets] = []
        self._steps: list[int] = []
        self._scaler: Any = None
        self._module: nn.Module | None = None
        self._step_hooks = False
        self._attachment: Any = None  # the live `Attachment` (Fabric, plain PyTorch), whose `remove()` unbinds
        self._warned_nonfinite: set[str] = set()
        self._state_key: str | None = None
        self._loaded = False  # a saved state was loaded for the current run
        self._orphans: list[str] = []  # a resumed checkpoint's entries of this class that no callback claims
        self._resumed = False  # the current fit resumed from a checkpoint (messages only)
        # The module a checkpoint entry is loaded for, when Lightning restores callbacks before the strategy's
        # setup (ordinary strategies): the entry is checked against it at load. `None` where the strategy
        # restores later (FSDP, ModelParallel, DeepSpeed) or outside a Trainer restore.
        self._load_target: nn.Module | None = None
        # (global_step, number of optimizer states) of the checkpoint being restored, from `on_load_checkpoint`.
        self._checkpoint_counts: tuple[int | None, int | None] | None = None

    # ------------------------------------------------------------- subclass API
    def _regularizes(self, decision: ParamDecision) -> bool:
        return decision.decay

    def _decays_like_weight_decay(self) -> bool:
        """Whether an optimizer's own ``weight_decay`` on the same parameters would be a double decay."""
        return True

    def _pull(self) -> str:
        """Where this callback's L2 term pulls the weights, for messages (L2-SP: toward its reference)."""
        return "toward zero"

    def _takes_over_optimizer_decay(self) -> bool:
        """Whether an optimizer's own ``weight_decay`` is taken over (``WeightDecay(None)``), not refused."""
        return False

    def _bucket_tag(self, decision: ParamDecision) -> Any:
        """Extra bucket key, for subclasses whose parameters need different treatment."""
        return None

    def _on_buckets_built(self, index: int, entry: OptimizerBuckets) -> None:
        """Called after the buckets of optimizer ``index`` are (re)built."""

    def _register_optimizer_hooks(self, index: int, optimizer: Optimizer) -> list[RemovableHandle]:
        return []

    def _before_step(self, index: int, optimizer: Optimizer) -> None:
        """The per-step work on optimizer ``index`` after its gradients are final, before its update."""

    def _prepare(self, plan: DecayPlan) -> None:
        """At ``bind``, before the buckets are built: per-run state that depends on the model (references)."""

    def _reset_state(self) -> None:
        """Forget the subclass's per-run state (a new run starts clean)."""

    def _forget_optimizer(self, index: int) -> None:
        """Optimizer ``index`` was replaced: drop what was learnt from the old one (taken-over decay)."""

    def _saved_state_needed(self) -> list[str]:
        """What this callback would lose if a resumed run found no saved state for it (empty: nothing)."""
        return []

    def _missing_from_loaded_state(self) -> list[str]:
        """What a loaded state lacks that this callback needs (an entry written under another configuration)."""
        return []

    @staticmethod
    def _step_dependent(schedule: Any) -> bool:
        return not isinstance(schedule, Constant)

    # ---------------------------------------------------------------- state key
    @property
    def state_key(self) -> str:
        """The key of this callback's entry in a checkpoint.

        Made of what identifies the callback, never of coefficients a resumed run may tune: the class,
        then ``name`` if given, else ``rules`` when they are not the default ones (so that two instances
        of one class with different rules coexist). Two instances of one class with the same key are
        refused by the Trainer: give each its own ``name``.
        """
        if self._state_key is None:
            qualname = type(self).__qualname__
            if self.name is not None:
                self._state_key = self._generate_state_key(name=self.name)
            elif self._given_rules is not None and repr(self._given_rules) != repr(DecayRules()):
                # the given rules, not the module's: the key must not move at setup
                self._state_key = self._generate_state_key(rules=repr(self._given_rules))
            else:
                self._state_key = qualname
        return self._state_key

    # ---------------------------------------------------- binding (no Trainer)
    def bind(
        self,
        module: nn.Module,
        optimizers: Sequence[Optimizer],
        scaler: Any = None,
        *,
        step_hooks: bool = False,
    ) -> None:
        """Attach to ``module`` and its ``optimizers``: classify, bucket, check, register step hooks.

        Binding again replaces the previous binding; the state (step counts, references, taken-over
        decay) is kept: ``reset`` forgets it, ``load_state_dict`` restores it.

        Args:
            module: The model whose parameters the optimizers step (names as the rules see them).
            optimizers: The optimizers, in a stable order (step counts are kept per position).
            scaler: The ``torch.amp.GradScaler`` stepping them, or ``None``.
            step_hooks: Also run the per-step work (``before_step``) from a step pre-hook of each
                optimizer, after its closure if it is given one: for loops without Lightning's
                ``on_before_optimizer_step`` (Fabric, plain PyTorch). Under a Trainer, ``False``.

        Raises:
            MisconfigurationException: On double decay (an optimizer's own ``weight_decay`` on parameters
                this callback also decays).
            ValueError: If the state holds step counts for another number of optimizers, or references
                of other shapes than the parameters.
        """
        self.unbind()
        self._module = module
        self._scaler = scaler
        self._step_hooks = step_hooks
        self.rules = module_rules(module, self._given_rules)  # the module's `decay_rules` when given none
        self._plan = plan_for(self.rules, module, include_frozen=True)
        self._prepare(self._plan)
        if not self._steps:
            self._steps = [0] * len(optimizers)
        elif len(self._steps) != len(optimizers):
            raise ValueError(
                f"{type(self).__name__}: the state field 'steps' has {len(self._steps)} step count(s) "
                f"({self._steps}), the run has {len(optimizers)} optimizer(s). A checkpoint of another "
                "configuration? Resume with the optimizers it was written with."
            )
        self._per_optimizer = [OptimizerBuckets(opt) for opt in optimizers]
        try:
            for i, entry in enumerate(self._per_optimizer):
                self._attach(i, entry)
        except Exception:
            self.unbind()  # refused: no hook of this binding stays on any optimizer
            raise

    def _attach(self, index: int, entry: OptimizerBuckets) -> None:
        self._rebuild(index, entry)  # refuses the optimizer's own weight_decay on these parameters
        bound = _bound_to(entry.optimizer)
        for other in list(bound):
            if other is not self:
                self._refuse_double_decay_with(other, {id(p) for b in entry.buckets for p in b.params})
        bound.add(self)
        entry.handles = [entry.optimizer.register_step_pre_hook(self._step_pre_hook)] if self._step_hooks else []
        entry.handles += self._register_optimizer_hooks(index, entry.optimizer)

    @staticmethod
    def _release(entry: OptimizerBuckets, regularizer: RegularizerCallback) -> None:
        for handle in entry.handles:
            handle.remove()
        entry.handles = []
        _bound_to(entry.optimizer).discard(regularizer)

    def unbind(self) -> None:
        """Remove the step hooks and forget the optimizers (the state is kept)."""
        for entry in self._per_optimizer:
            self._release(entry, self)
        self._per_optimizer = []

    def reset(self) -> None:
        """Forget the state of a previous run (step counts, references, taken-over decay): a new run."""
        self._steps = []
        self._warned_nonfinite = set()
        self._loaded = False
        self._orphans = []
        self._reset_state()

    def follow(self, optimizers: Sequence[Optimizer]) -> bool:
        """Re-bind to ``optimizers`` where they are not the bound ones; ``True`` if anything changed.

        An identity check per optimizer, cheap enough for every step. A replaced optimizer (Lightning's
        ``trainer.strategy.setup_optimizers(trainer)``) gets fresh buckets and hooks, and its own
        ``weight_decay`` is checked (or taken over) again; step counts stay with the position.
        """
        bound = self._per_optimizer
        if len(bound) == len(optimizers) and all(e.optimizer is o for e, o in zip(bound, optimizers, strict=True)):
            return False
        entries: list[OptimizerBuckets] = []
        for i, opt in enumerate(optimizers):
            if i < len(bound) and bound[i].optimizer is opt:
                entries.append(bound[i])
            else:  # new, or moved (its hooks know its old position): bound afresh
                self._forget_optimizer(i)
                entries.append(OptimizerBuckets(opt))
        for i in range(len(optimizers), len(bound)):  # fewer optimizers than before
            self._forget_optimizer(i)
        for e in bound:
            if all(e is not kept for kept in entries):
                self._release(e, self)
        self._steps = (self._steps + [0] * len(optimizers))[: len(optimizers)]
        self._per_optimizer = entries
        for i, entry in enumerate(entries):
            if all(entry is not e for e in bound):
                self._attach(i, entry)
        rank_zero_info(f"{type(self).__name__}: the optimizers changed; now regularizing through the new ones")
        return True

    def before_step(self, optimizer: Optimizer) -> None:
        """The per-step work for ``optimizer``, once its gradients are final and before it updates the weights.

        Under a Trainer, called from ``on_before_optimizer_step``; with ``bind(..., step_hooks=True)``,
        from the optimizer's step pre-hook. An optimizer that is not bound is ignored.
        """
        index = self._index_of(optimizer)
        if index is not None:
            self._before_step(index, optimizer)

    def _step_pre_hook(self, opt: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return after_closure(args, kwargs, lambda: self.before_step(opt))

    # ------------------------------------------------ Fabric and plain PyTorch
    def attach(self, model: nn.Module, optimizers: Any, scaler: Any = None) -> Attachment:
        """Regularize ``model`` through ``optimizers`` without a Trainer (Fabric, plain PyTorch); a new run.

        The same per-step code as under a Trainer, run from the optimizers' step hooks: see
        [`attach`][lightning_decay.attach], which this calls.

        Args:
            model: The model (a Fabric-wrapped one is unwrapped).
            optimizers: One optimizer or a sequence of them (Fabric-wrapped ones are unwrapped).
            scaler: The ``torch.amp.GradScaler`` stepping them, if any (found by itself under Fabric).

        Returns:
            An [`Attachment`][lightning_decay.Attachment]: ``remove()``, ``state_dict()``,
            ``load_state_dict()``.
        """
        from lightning_decay._attach import attach

        return attach(self, model, optimizers, scaler)

    def on_after_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Called by Fabric on the objects of ``Fabric(callbacks=...)`` after each optimizer step (no Trainer
        hook has this name). A regularizer that is not attached would silently do nothing there: refused."""
        if not (self._step_hooks and self._per_optimizer):
            name = type(self).__name__
            raise MisconfigurationException(
                f"{name} was given to Fabric(callbacks=...), which calls only the hooks your loop names: as a "
                f"Fabric callback it regularizes nothing. Attach it to the model and optimizer instead, after "
                f"`fabric.setup`: `{name.lower()} = {name}(...); {name.lower()}.attach(model, optimizer)` (see the "
                "'Fabric and plain PyTorch' docs page)."
            )

    # ----------------------------------------------------------- Trainer glue
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.rules = module_rules(pl_module, self._given_rules)
        strategy = type(trainer.strategy).__name__
        if is_deepspeed(trainer.strategy):
            raise MisconfigurationException(
                f"{type(self).__name__} does not support {strategy}: under ZeRO `p.grad` is not the real gradient "
                "and `on_before_optimizer_step` fires on every micro-batch. Use the optimizer's own weight_decay "
                "with the decay / no-decay groups of `DecayGroupsMixin` or `decay_param_groups`, which DeepSpeed "
                "honors."
            )
        if stage == "fit":
            if self._attachment is not None:  # attached before (Fabric, plain PyTorch): the Trainer takes it over
                self._attachment.remove()
            # A new fit starts clean (a callback reused across Trainers carries nothing over); a resumed
            # one gets its saved state from `load_state_dict`, which Lightning calls after `setup`.
            self.unbind()
            self.reset()
            restores_later = bool(getattr(trainer.strategy, "restore_checkpoint_after_setup", False))
            self._load_target = None if restores_later else pl_module

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Find this callback's entry when its key changed (written under another ``rules`` or by a version
        whose keys held the coefficients): adopted if it is the only unclaimed entry of this class."""
        # Lightning calls this before `load_state_dict`: what the entry's step counts must agree with.
        states = checkpoint.get("optimizer_states")
        global_step = checkpoint.get("global_step")
        self._checkpoint_counts = (
            global_step if isinstance(global_step, int) else None,
            len(states) if isinstance(states, (list, tuple)) else None,
        )
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        live = [cb for cb in trainer.callbacks if type(cb) is type(self)]  # type: ignore[attr-defined]
        claimed = {cb.state_key for cb in trainer.callbacks}  # type: ignore[attr-defined]
        qualname = type(self).__qualname__
        orphans = [
            k
            for k in states
            if isinstance(k, str) and (k == qualname or k.startswith(qualname + "{")) and k not in claimed
        ]
        missing = [cb for cb in live if cb.state_key not in states]
        if len(orphans) == 1 and len(missing) == 1:
            rank_zero_info(
                f"{type(self).__name__}: the checkpoint's entry {orphans[0]!r} is taken as this callback's "
                f"(key {self.state_key!r}): the only one of its class"
            )
            self.load_state_dict(copy.deepcopy(states[orphans[0]]))
        else:
            self._orphans = orphans

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in `on_fit_start`: Lightning restores the optimizers' state (param groups and their
        # `weight_decay`) after `on_fit_start`, and the checks must see what the first step will use.
        self._resumed = bool(trainer.ckpt_path)
        self._load_target, self._checkpoint_counts = None, None  # restored by now: checked below, at bind
        if self._resumed:
            self._refuse_missing_state(trainer)
        self.bind(pl_module, trainer.optimizers, getattr(trainer.precision_plugin, "scaler", None))
        if self._loaded:  # again here for strategies that restore callbacks after their setup
            self._check_steps_against_checkpoint(self._steps, trainer.global_step, None)
        self._check_other_callbacks(trainer)
        self._check_default_weight_decay(trainer)
        self._check_group_names()

    def _refuse_missing_state(self, trainer: pl.Trainer) -> None:
        needed = self._missing_from_loaded_state() if self._loaded else self._saved_state_needed()
        if not needed:
            return
        what = " and ".join(needed)
        where = (
            f"its saved state (key {self.state_key!r}) lacks {what}"
            if self._loaded
            else (f"the checkpoint has no saved state for it (key {self.state_key!r}), which would hold {what}")
        )
        if self.missing_state == "restart":
            rank_zero_warn(f"{type(self).__name__}: {where}; starting afresh as asked (missing_state='restart')")
            return
        orphans = self._orphans
        found = f" It has entries {orphans} of this class, none of them unambiguously this one's." if orphans else ""
        raise MisconfigurationException(
            f"{type(self).__name__} resumes from {trainer.ckpt_path}, but {where}.{found} Resume from a checkpoint "
            "written with this callback (give each instance of a class a fixed `name=` so its key stays the same), "
            f"or pass `missing_state='restart'` to start {what} afresh from here."
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._per_optimizer:
            self.follow(trainer.optimizers)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # After the closure (backward, unscale) and before clipping and the update. Not a step pre-hook:
        # without AMP, Lightning runs the closure inside `optimizer.step`, after the pre-hooks.
        index = self._index_of(optimizer)
        if index is None and self._per_optimizer and self.follow(trainer.optimizers):
            index = self._index_of(optimizer)
            if index is not None:
                self._attached_late(index, optimizer)
        if index is not None:
            self._before_step(index, optimizer)

    def _attached_late(self, index: int, optimizer: Optimizer) -> None:
        """Optimizer ``index`` was bound inside its own step (replaced within ``training_step``)."""

    def _regularized_ids(self) -> set[int]:
        return {id(p) for entry in self._per_optimizer for b in entry.buckets for p in b.params}

    def _check_other_callbacks(self, trainer: pl.Trainer) -> None:
        mine = self._regularized_ids()
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is not self and isinstance(other, RegularizerCallback) and other._per_optimizer:
                self._refuse_double_decay_with(other, mine)

    def _refuse_double_decay_with(self, other: RegularizerCallback, mine: set[int]) -> None:
        """Refuse ``other`` (bound too) also pulling some of ``mine`` (ids of parameters) toward zero."""
        if not (self._decays_like_weight_decay() and other._decays_like_weight_decay()):
            return
        if mine & other._regularized_ids():
            attached = (
                f" The {type(other).__name__} attached to the optimizer before is still attached: its "
                "Attachment's `remove()` takes it off."
                if other._step_hooks
                else ""
            )
            mine_pull, other_pull = self._pull(), other._pull()
            what = (
                f"Double weight decay: {type(self).__name__} and {type(other).__name__} both pull the same "
                "parameters toward zero."
                if mine_pull == other_pull == "toward zero"
                else f"Double L2 regularization: {type(self).__name__} pulls the same parameters {mine_pull} as "
                f"{type(other).__name__} pulls {other_pull}."
            )
            raise MisconfigurationException(f"{what} Give them disjoint `rules`, or keep one of them.{attached}")

    def _check_default_weight_decay(self, trainer: pl.Trainer) -> None:
        """Refuse, before the first step, a double decay that ``BaseFinetuning`` would start at its unfreeze epoch.

        ``unfreeze_and_add_param_group`` adds a group without ``weight_decay``, so the group gets the optimizer's
        default (AdamW's is 0.01) although the groups given were built with 0: the parameters this callback
        regularizes and the optimizer does not hold yet would be decayed twice from then on.
        """
        if not self._decays_like_weight_decay() or self._takes_over_optimizer_decay():
            return
        callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
        finetuning = next((cb for cb in callbacks if isinstance(cb, BASE_FINETUNING)), None)
        if finetuning is None:
            return
        assert self._plan is not None
        for entry in self._per_optimizer:
            optimizer = entry.optimizer
            wd = optimizer.defaults.get("weight_decay", 0.0)
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            later = [d.name for d in self._plan if self._regularizes(d) and id(d.param) not in held]
            if wd and later:
                opt, pull = type(optimizer).__name__, self._pull()
                what = "Double weight decay" if pull == "toward zero" else "Double L2 regularization"
                take_over = (
                    ", or let WeightDecay(weight_decay=None) take it over" if hasattr(self, "takes_over") else ""
                )
                raise MisconfigurationException(
                    f"{what} ahead: {type(finetuning).__name__} adds param groups when it unfreezes, and a group "
                    f"added without weight_decay gets {opt}'s default weight_decay={wd} (`optimizer.defaults`), "
                    f"on parameters {type(self).__name__} also pulls {pull} and the optimizer does not hold yet "
                    f"({few_names(later, 3)}). Build the optimizer with weight_decay=0 as its default too "
                    f"(`{opt}(groups, lr=..., weight_decay=0.0)`){take_over}."
                )

    def _check_group_names(self) -> None:
        """Warn when the optimizer's groups say otherwise: decayed weights in a ``no_decay`` group, or vice versa.

        Named groups (``decay_param_groups``, the mixin, timm's ``layer_3_no_decay``) tell which rules built
        them; rules of this callback that disagree usually mean two different sets of rules for one run.
        """
        assert self._plan is not None
        in_no_decay: list[str] = []
        in_decay: list[str] = []
        for entry in self._per_optimizer:
            for group in entry.optimizer.param_groups:
                kind = group_kind(group.get("name"))
                if kind is None:
                    continue
                for p in group["params"]:
                    d = self._plan.decision_for(p)
                    if d is None or not p.requires_grad:
                        continue
                    if kind == "no_decay" and self._regularizes(d):
                        in_no_decay.append(d.name)
                    elif kind == "decay" and not self._regularizes(d):
                        in_decay.append(d.name)
        where = "rules=" if self._given_rules is not None else "rules (the LightningModule's decay_rules or defaults)"
        for names, verb, kind in ((in_no_decay, "regularizes", "no_decay"), (in_decay, "leaves alone", "decay")):
            if names:
                rank_zero_warn(
                    f"{type(self).__name__} {verb} {few_names(names, 3)}, which the optimizer holds in a {kind!r} "
                    f"group: its {where} and the rules that built the groups differ. Use one DecayRules for both "
                    "(set the LightningModule's `decay_rules` and give the callback no `rules`)."
                )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.unbind()
            self._load_target, self._checkpoint_counts = None, None

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self._steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a saved state, validated field by field (a bad one fails here, not in a kernel)."""
        state = self._validated(state_dict)
        counts, self._checkpoint_counts = self._checkpoint_counts, None
        if counts is not None:
            self._check_steps_against_checkpoint(state["steps"], *counts)
        if self._load_target is not None:
            self._check_against_module(state, self._load_target)
        self._load_state(state)
        self._loaded = True
        if self._per_optimizer and self._module is not None:  # loaded after `bind`: bind again with it
            optimizers = [e.optimizer for e in self._per_optimizer]
            self.bind(self._module, optimizers, self._scaler, step_hooks=self._step_hooks)

    def _validated(self, state_dict: Any) -> dict[str, Any]:
        """Check the fields of a saved state; subclasses extend. Returns the state to load."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{type(self).__name__}: a saved state must be a mapping, got {type(state_dict).__name__}")
        steps = state_dict.get("steps")
        if not isinstance(steps, (list, tuple)) or not all(is_count(s) for s in steps):
            raise ValueError(
                f"{type(self).__name__}: the state field 'steps' must be a list of integers >= 0 (one step count "
                f"per optimizer), got {steps!r}"
            )
        return dict(state_dict)

    def _check_steps_against_checkpoint(
        self, steps: Sequence[int], global_step: int | None, optimizers: int | None
    ) -> None:
        """At load, under a Trainer restore: the entry's step counts against its checkpoint's own counts."""
        if optimizers is not None and steps and len(steps) != optimizers:
            raise ValueError(
                f"{type(self).__name__}: the state field 'steps' has {len(steps)} step count(s) ({list(steps)}), the "
                f"checkpoint holds {optimizers} optimizer state(s): the entry belongs to another configuration. "
                "Resume from that run's checkpoint, or start a new fit."
            )
        if global_step is not None and any(s > global_step for s in steps):
            raise ValueError(
                f"{type(self).__name__}: the checkpoint's state field 'steps' ({list(steps)}) counts more optimizer "
                f"steps than the checkpoint's global_step ({global_step}): the entry belongs to another run. Resume "
                "from that run's checkpoint, or start a new fit."
            )

    def _check_against_module(self, state: dict[str, Any], module: nn.Module) -> None:
        """At load, when the module is known (ordinary strategies): refuse state that cannot fit it."""

    def _load_state(self, state: dict[str, Any]) -> None:
        self._steps = [int(s) for s in state["steps"]]

    # --------------------------------------------------------------- buckets
    def _index_of(self, optimizer: Optimizer) -> int | None:
        for i, entry in enumerate(self._per_optimizer):
            if entry.optimizer is optimizer:
                return i
        return None

    def _buckets(self, index: int) -> list[Bucket]:
        entry = self._per_optimizer[index]
        if entry.current_signature() != entry.signature:
            self._rebuild(index, entry)
        return entry.buckets

    def _rebuild(self, index: int, entry: OptimizerBuckets) -> None:
        assert self._plan is not None
        plan = self._plan
        optimizer = entry.optimizer
        unknown = any(plan.decision_for(p) is None for g in optimizer.param_groups for p in g["params"])
        if unknown and self._module is not None:
            # Parameters created after fit start (rare): the cached plan no longer matches; classify again.
            plan = self._plan = plan_for(self.rules, self._module, include_frozen=True)
        buckets: list[Bucket] = []
        for gi, group in enumerate(optimizer.param_groups):
            keyed: dict[tuple[Any, ...], list[ParamDecision]] = {}
            for p in group["params"]:
                d = plan.decision_for(p)
                if d is None or not self._regularizes(d):
                    continue
                key = (str(p.device), p.dtype, is_dtensor(p), self._bucket_tag(d))
                keyed.setdefault(key, []).append(d)
            for (_, _, sharded, tag), decisions in keyed.items():
                names = [d.name for d in decisions]
                buckets.append(Bucket(gi, [d.param for d in decisions], names, sharded=sharded, tag=tag))
        entry.buckets = buckets
        entry.signature = entry.current_signature()
        self._check_double_decay(index, entry)
        self._on_buckets_built(index, entry)

    def _check_double_decay(self, index: int, entry: OptimizerBuckets) -> None:
        if not self._decays_like_weight_decay():
            return
        for bucket in entry.buckets:
            group = entry.optimizer.param_groups[bucket.group_index]
            wd = group.get("weight_decay", 0.0)
            if wd:
                name = group.get("name", f"param group {bucket.group_index}")
                pull = self._pull()
                what = "Double weight decay" if pull == "toward zero" else "Double L2 regularization"
                raise MisconfigurationException(
                    f"{what}: {type(entry.optimizer).__name__}'s {name!r} has weight_decay={wd} (toward zero) on "
                    f"parameters that {type(self).__name__} also pulls {pull} ({few_names(bucket.names, 3)}). Set "
                    "weight_decay=0 in the optimizer for those parameters (the 'no_decay'/'decay' groups of "
                    "decay_param_groups help), or let WeightDecay(weight_decay=None) take the optimizer's "
                    "weight_decay over." + (_RESTORED_HINT if self._resumed else "")
                )

    def _all_buckets(self) -> Iterator[tuple[int, Bucket]]:
        for i in range(len(self._per_optimizer)):
            for b in self._buckets(i):
                yield i, b

    # ----------------------------------------------------------------- steps
    def _grad_scale(self, optimizer: Optimizer) -> Tensor | None:
        """The AMP scale still on the gradients in ``on_before_optimizer_step``, or ``None`` if unscaled."""
        if self._scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scale = getattr(self._scaler, "_scale", None)
            return scale if isinstance(scale, Tensor) else None
        return None

    @staticmethod
    def _step_ran(optimizer: Optimizer) -> bool:
        """In an optimizer step post-hook: whether the step really updated the weights.

        Step hooks do not run at all when the GradScaler skips a step, except for fused optimizers,
        which it steps anyway with a ``found_inf`` flag; reading that flag is the one host sync here.
        """
        found_inf = getattr(optimizer, "found_inf", None)
        return not (isinstance(found_inf, Tensor) and found_inf.item() != 0)

    def _unscaled_in_step(self, optimizer: Optimizer) -> bool:
        """Whether a GradScaler hands ``optimizer`` scaled gradients to unscale inside ``step`` (fused ones)."""
        return self._scaler is not None and bool(getattr(optimizer, "_step_supports_amp_scaling", False))

    def _found_inf(self, optimizer: Optimizer) -> Tensor | None:
        """After ``GradScaler.unscale_``: 1.0 if this step will be skipped for inf/NaN gradients, else 0.0.

        A device tensor, so masking with it needs no host sync. ``None`` without a scaler.
        """
        if self._unscaled_in_step(optimizer):
            found = getattr(optimizer, "found_inf", None)  # set by GradScaler.step around a fused step
            return found if isinstance(found, Tensor) else None
        states = getattr(self._scaler, "_per_optimizer_states", None)
        per_device = (states or {}).get(id(optimizer), {}).get("found_inf_per_device") if states else None
        if not per_device:
            return None
        values = list(per_device.values())
        return values[0] if len(values) == 1 else torch.stack([v.to(values[0].device) for v in values]).sum()

    def _check_finite(self) -> None:
        """Warn once per parameter whose weights turned non-finite (one host copy; call on logging steps)."""
        local_parts: list[Tensor] = []
        sharded_parts: list[Tensor] = []
        names: list[str] = []
        sharded_names: list[str] = []
        for _, b in self._all_buckets():
            if b.sharded:
                sharded_parts += kernels.sum_abs(b.weights())
                sharded_names += b.names
            else:
                local_parts += kernels.sum_abs(b.weights())
                names += b.names
        self._warn_nonfinite(names + sharded_names, to_host(local_parts, sharded_parts))

    def _warn_nonfinite(self, names: list[str], values: list[float]) -> None:
        for name, v in zip(names, values, strict=True):
            if not math.isfinite(v) and name not in self._warned_nonfinite:
                self._warned_nonfinite.add(name)
                rank_zero_warn(f"{type(self).__name__}: parameter {name!r} has non-finite values ({v})")


_RESTORED_HINT = (
    " This run resumes from a checkpoint, and Lightning restored the optimizer's param groups (their "
    "weight_decay included) from it: the run that wrote it decayed in the optimizer. To go on with the same "
    "decay, resume with WeightDecay(weight_decay=None), which takes it over (on the decayed parameters only)."
)


def _bound_to(optimizer: Optimizer) -> weakref.WeakSet[RegularizerCallback]:
    """The regularizers bound to ``optimizer`` (a record the optimizer carries, not saved with its state).

    So that a second regularizer attached to the same optimizer (Fabric, plain PyTorch: no list of
    callbacks to look through) is checked against the first for double decay.
    """
    record = optimizer.__dict__.get("_lightning_decay_bound")
    if record is None:
        record = optimizer.__dict__["_lightning_decay_bound"] = weakref.WeakSet()
    return record


def group_kind(name: Any) -> str | None:
    """``"decay"`` / ``"no_decay"`` for a param group named so (``"no_decay"``, ``"layer_3/decay"``,
    timm's ``"layer_3_no_decay"``), else ``None``."""
    if not isinstance(name, str):
        return None
    for kind in ("no_decay", "decay"):  # "no_decay" first: it ends in "decay" too
        if name == kind or name.endswith((f"/{kind}", f"_{kind}")):
            return kind
    return None


def after_closure(args: tuple[Any, ...], kwargs: dict[str, Any], work: Callable[[], None]) -> Any:
    """What a step pre-hook returns to run ``work`` once the gradients exist: now when ``step`` got no closure
    (the caller, or Lightning's AMP plugin, ran it before ``step``), else right after the closure returns,
    inside ``step`` (Lightning runs backward, unscaling and clipping there), before the update."""
    # `args` starts with the optimizer itself: `step(self, closure=None)`.
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is None:
        work()
        return None

    def closure_then_work() -> Any:
        loss = closure()
        work()
        return loss

    if "closure" in kwargs:
        return args, {**kwargs, "closure": closure_then_work}
    return (args[0], closure_then_work, *args[2:]), kwargs


def should_log(trainer: pl.Trainer) -> bool:
    return bool(trainer.loggers) and trainer._logger_connector.should_update_logs


def coefficient(schedule: Callable[[int], float], step: int, argument: str) -> float:
    """The schedule's value at ``step``, validated (a schedule may not return a negative value)."""
    return check_coefficient(schedule(step), argument, step)


def to_host(
    local_parts: list[Tensor], sharded_parts: list[Tensor], sharded_counted: list[Tensor] | None = None
) -> list[float]:
    """0-dim values to Python floats: one copy per device; sharded parts summed across ranks first.

    Sharded parts are per-shard sums (of squares or absolute values), so one all-reduce of their stack
    gives the global values; every rank must call this with the same layout. ``sharded_counted``
    (``Bucket.counted`` vectors, concatenated in the order of ``sharded_parts``) zeroes the parts of
    replicas that must not count again; without it every rank's part is added.
    """
    pieces: list[Tensor] = []
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in local_parts:
        by_device.setdefault(t.device, []).append(t)
    order = [t for ts in by_device.values() for t in ts]
    pieces += [torch.stack(ts).cpu() for ts in by_device.values()]
    if sharded_parts:
        sharded = torch.stack(sharded_parts)
        if sharded_counted:
            # `where`, not a product: NaN * 0 is NaN, and skipped replicas must add exactly nothing.
            sharded = torch.where(torch.cat(sharded_counted), sharded, 0.0)
        all_reduce_partials(sharded, None)
        pieces.append(sharded.cpu())
    values = torch.cat(pieces).tolist() if pieces else []
    if len(by_device) > 1:  # restore the caller's order
        position = {id(t): i for i, t in enumerate(order)}
        values[: len(order)] = [values[position[id(t)]] for t in local_parts]
    return values
