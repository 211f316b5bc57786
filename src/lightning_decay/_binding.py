"""The engine: a module, its optimizers, a GradScaler and which parameters, bound once, with no Trainer.

A `Binding` finds the parameters its effects work on, once per optimizer, and buckets them by (param group,
device, dtype, sharded or not), as torch's optimizers group their foreach work; the buckets are rebuilt only
when an optimizer's param groups change (``BaseFinetuning`` adding a group: one signature check). It keeps
the step count of each optimizer (one post-hook per optimizer, counting the steps that really ran), wires
step pre-hooks after a step's closure (`after_closure`) for loops without Lightning's hooks, follows
optimizers replaced mid-run (`Binding.follow`), and records itself on each optimizer (`bound_to`), so that
two bindings that both pull the same weights toward zero are refused (double decay).

What is done to the weights is not here but in `Effect` objects (``lightning_decay._decay_effect``,
``_penalty_effect``, ``_references``): the binding calls them at fixed points of each step. The Lightning
callbacks and ``attach`` are thin adapters around a binding.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_decay import _amp, kernels
from lightning_decay._compat import MisconfigurationException, rank_zero_info
from lightning_decay._messages import few_names
from lightning_decay._plan_cache import plan_for
from lightning_decay.norms import contributes_to_sum, is_dtensor, local_tensor
from lightning_decay.plan import DecayPlan, ParamDecision
from lightning_decay.rules import DecayRules

__all__ = ["Binding", "Bound", "Bucket", "Effect", "after_closure", "bound_to"]

#: A deferred piece of step work: ``(immediate, work)``; ``immediate`` runs it before the step's closure.
StepWork = tuple[bool, Callable[[], None]]


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
        if all(map(operator.is_not, grads, repeat(None))):  # no generator per step
            idx = self.every  # the common case: no further per-parameter work
        else:
            idx = [i for i, g in enumerate(grads) if g is not None]
            weights = [weights[i] for i in idx]
            grads = [grads[i] for i in idx]
        if self.sharded:
            grads = [local_tensor(g) for g in grads]  # type: ignore[arg-type]
        return weights, grads, idx  # type: ignore[return-value]

    def chunks_for(self, idx: list[int]) -> list[tuple[int, int]] | None:
        """The precomputed chunks when ``idx`` is every parameter; ``None`` (kernels chunk a subset themselves)."""
        return self.chunks if len(idx) == len(self.params) else None


class Bound:
    """One optimizer of a binding: its buckets, the param-group signature they were built for, its hooks."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.signature: tuple[int, ...] = ()
        self.buckets: list[Bucket] = []
        self.handles: list[RemovableHandle] = []

    def current_signature(self) -> tuple[int, ...]:
        return tuple(len(g["params"]) for g in self.optimizer.param_groups)


class Effect:
    """One thing done around each optimizer step, with no Trainer: the hooks a `Binding` calls, all optional.

    ``index`` is the optimizer's position in the binding (``binding.bound[index]``, ``binding.steps[index]``).
    An effect that saves state also gives ``state_dict`` / ``validated`` / ``load_state`` and says what a
    resumed run would lose without it (``saved_state_needed``, ``missing_from_loaded``).
    """

    def prepare(self, binding: Binding, plan: DecayPlan) -> None:
        """At ``bind``, before the buckets are built: per-run state that depends on the model."""

    def take_over(self, binding: Binding, index: int) -> None:
        """When the buckets of optimizer ``index`` are (re)built, before the double-decay check."""

    def buckets_built(self, binding: Binding, index: int) -> None:
        """After the buckets of optimizer ``index`` are (re)built and checked."""

    def before_step(self, binding: Binding, index: int) -> None:
        """Once the gradients are final (after the closure and AMP unscaling), before clipping and the update."""

    def in_step(self, binding: Binding, index: int) -> StepWork | None:
        """Work of the step pre-hook, run by every binding (with or without a Trainer); ``None``: none."""
        return None

    def bound_in_step(self, binding: Binding, index: int) -> None:
        """Optimizer ``index`` was bound inside its own step (replaced within ``training_step``)."""

    def after_step(self, binding: Binding, index: int) -> None:
        """After a step that really ran, before it is counted (``binding.steps[index]`` is the step's count)."""

    def forget(self, index: int) -> None:
        """Optimizer ``index`` was replaced: drop what was learnt from the old one."""

    def reset(self) -> None:
        """A new run: forget the per-run state."""


# Module-level defaults, not lambdas: a callback holding a binding is pickled by `ddp_spawn`.
def decayed(decision: ParamDecision) -> bool:
    return decision.decay


def every_param(decision: ParamDecision) -> bool:
    return True


def no_tag(decision: ParamDecision) -> Any:
    return None


def always() -> bool:
    return True


def never(*args: Any) -> bool:
    return False


def toward_zero() -> str:
    return "toward zero"


def double_decay(pull: str) -> str:
    """How a refusal names the double regularization: decay (toward zero) or L2 (toward a reference)."""
    return "Double weight decay" if pull == "toward zero" else "Double L2 regularization"


class Binding:
    """A module, its optimizers and a GradScaler, bound for ``effects``; the state is the step counts.

    Args:
        owner: The name errors and messages give (the callback's class).
        effects: The effects, called in this order at each point of a step.
        selects: Which parameters the effects work on.
        tag: An extra bucket key, for effects whose parameters need different treatment.
        decays: Whether the effects pull the weights toward zero like ``weight_decay`` (double decay).
        count_skipped: Count every step whose post-hook runs, not only those that really ran.
        pull: Where the effects' L2 term pulls the weights, for messages (L2-SP: toward its reference).
        hooks: Register the step hooks on the optimizers. ``False`` for an observer driven by Lightning's own
            hooks that counts nothing (the monitor under a Trainer): no per-step call, and optimizers
            without step hooks (DeepSpeed's) can be bound.
    """

    def __init__(
        self,
        owner: str,
        effects: Sequence[Effect],
        selects: Callable[[ParamDecision], bool] = decayed,
        tag: Callable[[ParamDecision], Any] = no_tag,
        decays: Callable[[], bool] = always,
        count_skipped: bool = False,
        pull: Callable[[], str] = toward_zero,
        hooks: bool = True,
    ) -> None:
        self.owner, self.effects, self.pull, self.hooks = owner, list(effects), pull, hooks
        self.selects, self.tag, self.decays, self.count_skipped = selects, tag, decays, count_skipped
        self.module: nn.Module | None = None
        self.rules: DecayRules | None = None
        self.plan: DecayPlan | None = None
        self.scaler: Any = None
        self.step_hooks = False
        self.hint = ""  # appended to double-decay errors (a resumed run: where the optimizer's decay came from)
        self.bound: list[Bound] = []
        self.steps: list[int] = []
        #: Bumped whenever buckets are (re)built: what a view built on them (the monitor's layout) compares.
        self.version = 0

    # ------------------------------------------------------------------------------ bind
    def bind(
        self, module: nn.Module, optimizers: Sequence[Optimizer], scaler: Any, rules: DecayRules, step_hooks: bool
    ) -> None:
        """Bind to ``module`` and ``optimizers``: classify, bucket, check, register the step hooks.

        Binding again replaces the previous binding and keeps the step counts.

        Raises:
            MisconfigurationException: On double decay.
            ValueError: If the step counts are for another number of optimizers.
        """
        self.unbind()
        self.module, self.scaler, self.step_hooks, self.rules = module, scaler, step_hooks, rules
        self.plan = plan_for(rules, module, include_frozen=True)
        for effect in self.effects:
            effect.prepare(self, self.plan)
        if not self.steps:
            self.steps = [0] * len(optimizers)
        elif len(self.steps) != len(optimizers):
            raise ValueError(
                f"{self.owner}: the state field 'steps' has {len(self.steps)} step count(s) ({self.steps}), the "
                f"run has {len(optimizers)} optimizer(s). A checkpoint of another configuration? Resume with the "
                "optimizers it was written with."
            )
        self.bound = [Bound(opt) for opt in optimizers]
        try:
            for i in range(len(self.bound)):
                self._attach(i)
        except Exception:
            self.unbind()  # refused: no hook of this binding stays on any optimizer
            raise

    def _attach(self, index: int) -> None:
        entry = self.bound[index]
        self._rebuild(index)
        registry = bound_to(entry.optimizer)
        for other in list(registry):
            if other is not self:
                self._refuse_double_decay_with(other, {id(p) for b in entry.buckets for p in b.params})
        registry.add(self)
        if not self.hooks:
            return
        opt = entry.optimizer
        entry.handles = [
            opt.register_step_pre_hook(lambda o, a, k: self._pre_hook(index, a, k)),
            opt.register_step_post_hook(lambda o, a, k: self._post_hook(index, o)),
        ]

    def unbind(self) -> None:
        """Remove the step hooks and forget the optimizers (the step counts are kept)."""
        for entry in self.bound:
            self._release(entry)
        self.bound = []

    def _release(self, entry: Bound) -> None:
        for handle in entry.handles:
            handle.remove()
        entry.handles = []
        bound_to(entry.optimizer).discard(self)

    def reset(self) -> None:
        """A new run: no step counts, and each effect's per-run state forgotten."""
        self.steps = []
        for effect in self.effects:
            effect.reset()

    def index_of(self, optimizer: Optimizer) -> int | None:
        for i, entry in enumerate(self.bound):
            if entry.optimizer is optimizer:
                return i
        return None

    def follow(self, optimizers: Sequence[Optimizer]) -> bool:
        """Re-bind to ``optimizers`` where they are not the bound ones; ``True`` if anything changed.

        An identity check per optimizer, cheap enough for every step. A replaced optimizer gets fresh
        buckets and hooks, and its own ``weight_decay`` is checked (or taken over) again; step counts
        stay with the position.
        """
        old = self.bound
        if len(old) == len(optimizers) and all(e.optimizer is o for e, o in zip(old, optimizers, strict=True)):
            return False
        entries: list[Bound] = []
        for i, opt in enumerate(optimizers):
            if i < len(old) and old[i].optimizer is opt:
                entries.append(old[i])
            else:  # new, or moved (its hooks know its old position): bound afresh
                self._forget(i)
                entries.append(Bound(opt))
        for i in range(len(optimizers), len(old)):  # fewer optimizers than before
            self._forget(i)
        for e in old:
            if all(e is not kept for kept in entries):
                self._release(e)
        self.steps = (self.steps + [0] * len(optimizers))[: len(optimizers)]
        self.bound = entries
        for i, entry in enumerate(entries):
            if all(entry is not e for e in old):
                self._attach(i)
        rank_zero_info(f"{self.owner}: the optimizers changed; now working through the new ones")
        return True

    def _forget(self, index: int) -> None:
        for effect in self.effects:
            effect.forget(index)

    # --------------------------------------------------------------------------- buckets
    def buckets(self, index: int) -> list[Bucket]:
        """The buckets of optimizer ``index``, rebuilt first if its param groups changed."""
        entry = self.bound[index]
        if entry.current_signature() != entry.signature:
            self._rebuild(index)
        return entry.buckets

    def refresh(self) -> int:
        """The one signature check of every optimizer (buckets rebuilt where a param group changed); the version."""
        for i in range(len(self.bound)):
            self.buckets(i)
        return self.version

    def all_buckets(self) -> Iterator[tuple[int, Bucket]]:
        for i in range(len(self.bound)):
            for b in self.buckets(i):
                yield i, b

    def _rebuild(self, index: int) -> None:
        assert self.plan is not None and self.rules is not None
        entry = self.bound[index]
        groups = entry.optimizer.param_groups
        if self.module is not None and any(self.plan.decision_for(p) is None for g in groups for p in g["params"]):
            # Parameters created after fit start (rare): the cached plan no longer matches; classify again.
            self.plan = plan_for(self.rules, self.module, include_frozen=True)
        buckets: list[Bucket] = []
        for gi, group in enumerate(groups):
            keyed: dict[tuple[Any, ...], list[ParamDecision]] = {}
            for p in group["params"]:
                d = self.plan.decision_for(p)
                if d is not None and self.selects(d):
                    keyed.setdefault((str(p.device), p.dtype, is_dtensor(p), self.tag(d)), []).append(d)
            for (_, _, sharded, tag), ds in keyed.items():
                buckets.append(Bucket(gi, [d.param for d in ds], [d.name for d in ds], sharded=sharded, tag=tag))
        entry.buckets, entry.signature = buckets, entry.current_signature()
        self.version += 1
        for effect in self.effects:
            effect.take_over(self, index)
        self._refuse_optimizer_decay(entry)
        for effect in self.effects:
            effect.buckets_built(self, index)

    def regularized_ids(self) -> set[int]:
        return {id(p) for entry in self.bound for b in entry.buckets for p in b.params}

    # ---------------------------------------------------------------------- double decay
    def _refuse_optimizer_decay(self, entry: Bound) -> None:
        if not self.decays():
            return
        for bucket in entry.buckets:
            group = entry.optimizer.param_groups[bucket.group_index]
            wd = group.get("weight_decay", 0.0)
            if wd:
                name, pull = group.get("name", f"param group {bucket.group_index}"), self.pull()
                raise MisconfigurationException(
                    f"{double_decay(pull)}: {type(entry.optimizer).__name__}'s {name!r} has weight_decay={wd} "
                    f"(toward zero) on parameters that {self.owner} also pulls {pull} ({few_names(bucket.names, 3)}). "
                    "Set "
                    "weight_decay=0 in the optimizer for those parameters (the 'no_decay'/'decay' groups of "
                    "decay_param_groups help), or let WeightDecay(weight_decay=None) take the optimizer's "
                    "weight_decay over." + self.hint
                )

    def _refuse_double_decay_with(self, other: Binding, mine: set[int]) -> None:
        """Refuse ``other`` (bound to the same optimizer) also pulling some of ``mine`` toward zero."""
        if not (self.decays() and other.decays()) or not mine & other.regularized_ids():
            return
        attached = (
            f" The {other.owner} attached to the optimizer before is still attached: its Attachment's "
            "`remove()` takes it off."
            if other.step_hooks
            else ""
        )
        mine_pull, other_pull = self.pull(), other.pull()
        what = (
            f"Double weight decay: {self.owner} and {other.owner} both pull the same parameters toward zero."
            if mine_pull == other_pull == "toward zero"
            else f"Double L2 regularization: {self.owner} pulls the same parameters {mine_pull} as {other.owner} "
            f"pulls {other_pull}."
        )
        raise MisconfigurationException(f"{what} Give them disjoint `rules`, or keep one of them.{attached}")

    # ----------------------------------------------------------------------------- steps
    def before_step(self, index: int) -> None:
        """The effects' work once the gradients of optimizer ``index`` are final, before its update."""
        for effect in self.effects:
            effect.before_step(self, index)

    def bound_in_step(self, index: int) -> None:
        for effect in self.effects:
            effect.bound_in_step(self, index)

    def _pre_hook(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        works: list[StepWork] = []
        if self.step_hooks:  # no Lightning hook runs `before_step`: run it after the closure
            works.append((False, lambda: self.before_step(index)))
        for effect in self.effects:
            work = effect.in_step(self, index)
            if work is not None:
                works.append(work)
        if not works:
            return None
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            for _, work in works:
                work()
            return None
        for immediate, work in works:
            if immediate:
                work()
        deferred = [work for immediate, work in works if not immediate]
        return after_closure(args, kwargs, lambda: [work() for work in deferred]) if deferred else None

    def _post_hook(self, index: int, optimizer: Optimizer) -> None:
        if self.count_skipped or _amp.step_ran(optimizer):
            for effect in self.effects:
                effect.after_step(self, index)
            self.steps[index] += 1

    # ------------------------------------------------------------------------------- AMP
    def grad_scale(self, optimizer: Optimizer) -> Tensor | None:
        return _amp.grad_scale(self.scaler, optimizer)

    def found_inf(self, optimizer: Optimizer) -> Tensor | None:
        return _amp.found_inf(self.scaler, optimizer)

    def unscaled_in_step(self, optimizer: Optimizer) -> bool:
        return _amp.unscaled_in_step(self.scaler, optimizer)


def after_closure(args: tuple[Any, ...], kwargs: dict[str, Any], work: Callable[[], Any]) -> Any:
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


def bound_to(optimizer: Optimizer) -> weakref.WeakSet[Binding]:
    """The bindings on ``optimizer`` (a record the optimizer carries, not saved with its state).

    So that a second regularizer bound to the same optimizer (Fabric, plain PyTorch: no list of callbacks
    to look through) is checked against the first for double decay, and so that a monitor can find the
    decay applied to a param group.
    """
    record = optimizer.__dict__.get("_lightning_decay_bound")
    if record is None:
        record = optimizer.__dict__["_lightning_decay_bound"] = weakref.WeakSet()
    return record
