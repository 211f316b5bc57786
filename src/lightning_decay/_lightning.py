"""The Lightning adapter shared by ``WeightDecay`` and ``WeightPenalty``: Trainer hooks onto the engine.

A `Regularizer` is a `lightning_decay._binding.Binding` (which parameters, the step hooks, the step counts)
with its effects, and a `lightning_decay._resume.Resume` (the checkpoint key and every flag of a resume).
The Trainer hooks below only say *when*: ``setup`` starts a fit clean, ``on_load_checkpoint`` and
``load_state_dict`` restore, ``on_train_start`` binds to the optimizers as the first step will find them
(after Lightning restored them, so that a take-over and the double-decay checks see the restored param
groups), ``on_before_optimizer_step`` runs the step's work (after the closure and AMP unscaling, before
clipping). ``attach`` binds the same engine with step hooks instead, for Fabric and plain PyTorch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_decay._attach import Attachment, not_attached_error, unwrap
from lightning_decay._binding import Binding, Effect
from lightning_decay._compat import (
    BASE_FINETUNING,
    Callback,
    MisconfigurationException,
    deepspeed_problem,
    pl,
)
from lightning_decay._host import NonFiniteWarnings
from lightning_decay._repr import ArgumentsRepr
from lightning_decay._resume import Resume
from lightning_decay._start_checks import refuse_later_double_decay, warn_group_names
from lightning_decay.rules import DecayRules, as_rules, module_rules

__all__ = ["Regularizer", "attach", "should_log"]


class Regularizer(ArgumentsRepr, Callback):
    """Base of ``WeightDecay`` and ``WeightPenalty``: a binding, its effects and a resume, under Lightning.

    Subclasses give their effects and their saved fields: ``_state`` (fields besides ``steps``),
    ``_validated`` (check them), ``_load`` (take them), ``_needed`` / ``_missing`` (what a resume without
    them, or with an entry lacking them, would lose) and ``_check_module`` (refuse an entry that cannot fit
    the module, at load).
    """

    def __init__(
        self,
        rules: DecayRules | None,
        name: str | None,
        missing_state: str,
        effects: Sequence[Effect],
        tag: Any = None,
        decays: Any = None,
        pull: Any = None,
    ) -> None:
        self._resume = Resume(self, name, rules, missing_state)
        self.rules = as_rules(rules)
        self.name, self.missing_state = name, missing_state
        # `None`: the LightningModule's `decay_rules` at setup (one set of rules for the run), else defaults.
        self._given_rules = rules
        options = {"tag": tag} if tag is not None else {}
        if decays is not None:
            options["decays"] = decays
        if pull is not None:
            options["pull"] = pull
        self._binding = Binding(type(self).__name__, effects, **options)
        self._nonfinite = NonFiniteWarnings(type(self).__name__)
        self._attachment: Any = None  # the live `Attachment` (Fabric, plain PyTorch), whose `remove()` unbinds

    # --------------------------------------------------------------- what subclasses save
    def _state(self) -> dict[str, Any]:
        return {}

    def _validated(self, state: dict[str, Any]) -> None:
        """Check the fields of a saved state besides ``steps``; raise naming the field."""

    def _load(self, state: dict[str, Any]) -> None:
        """Take the fields of a checked saved state."""

    def _needed(self) -> list[str]:
        return []

    def _missing(self) -> list[str]:
        return []

    def _check_module(self, state: dict[str, Any], module: nn.Module) -> None:
        """At load, when the module is known (ordinary strategies): refuse state that cannot fit it."""

    def _takes_over_optimizer_decay(self) -> bool:
        """Whether an optimizer's own ``weight_decay`` is taken over (``WeightDecay(None)``), not refused."""
        return False

    # ------------------------------------------------------------------- state key, state
    @property
    def state_key(self) -> str:
        """The key of this callback's entry in a checkpoint.

        Made of what identifies the callback, never of coefficients a resumed run may tune: the class,
        then ``name`` if given, else ``rules`` when they are not the default ones (so that two instances
        of one class with different rules coexist). Two instances of one class with the same key are
        refused by the Trainer: give each its own ``name``.
        """
        return self._resume.key

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self._binding.steps), **self._state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a saved state, validated field by field (a bad one fails here, not in a kernel)."""
        state = self._resume.validated(state_dict)
        self._validated(state)
        self._resume.check_loaded(state["steps"])
        if self._resume.load_target is not None:
            self._check_module(state, self._resume.load_target)
        self._binding.steps = [int(s) for s in state["steps"]]
        self._load(state)
        binding = self._binding
        if binding.bound and binding.module is not None:  # loaded after `bind`: bind again with it
            optimizers = [e.optimizer for e in binding.bound]
            self.bind(binding.module, optimizers, binding.scaler, step_hooks=binding.step_hooks)

    # ------------------------------------------------------------------- the engine, no Trainer
    def bind(
        self, module: nn.Module, optimizers: Sequence[Optimizer], scaler: Any = None, *, step_hooks: bool = False
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
                this callback also decays, or another regularizer bound to the same ones).
            ValueError: If the state holds step counts for another number of optimizers, or references
                of other shapes than the parameters.
        """
        self.rules = module_rules(module, self._given_rules)  # the module's `decay_rules` when given none
        self._binding.hint = self._resume.hint
        self._binding.bind(module, optimizers, scaler, self.rules, step_hooks)

    def unbind(self) -> None:
        """Remove the step hooks and forget the optimizers (the state is kept)."""
        self._binding.unbind()

    def reset(self) -> None:
        """Forget the state of a previous run (step counts, references, taken-over decay): a new run."""
        self._binding.reset()
        self._nonfinite.clear()
        self._resume.new_run()

    def follow(self, optimizers: Sequence[Optimizer]) -> bool:
        """Re-bind to ``optimizers`` where they are not the bound ones; ``True`` if anything changed.

        A replaced optimizer (Lightning's ``trainer.strategy.setup_optimizers(trainer)``) gets fresh
        buckets and hooks, and its own ``weight_decay`` is checked (or taken over) again; step counts stay
        with the position.
        """
        return self._binding.follow(optimizers)

    def before_step(self, optimizer: Optimizer) -> None:
        """The per-step work for ``optimizer``, once its gradients are final and before it updates the weights.

        Under a Trainer, called from ``on_before_optimizer_step``; with ``bind(..., step_hooks=True)``,
        from the optimizer's step pre-hook. An optimizer that is not bound is ignored.
        """
        index = self._binding.index_of(optimizer)
        if index is not None:
            self._binding.before_step(index)

    def attach(self, model: nn.Module, optimizers: Any, scaler: Any = None) -> Attachment:
        """Regularize ``model`` through ``optimizers`` without a Trainer (Fabric, plain PyTorch); a new run.

        The same per-step code as under a Trainer, run from the optimizers' step hooks: see
        [`attach`][lightning_decay.attach], which is the same.

        Args:
            model: The model (a Fabric-wrapped one is unwrapped).
            optimizers: One optimizer or a sequence of them (Fabric-wrapped ones are unwrapped).
            scaler: The ``torch.amp.GradScaler`` stepping them, if any (found by itself under Fabric).

        Returns:
            An [`Attachment`][lightning_decay.Attachment]: ``remove()``, ``state_dict()``,
            ``load_state_dict()``.
        """
        module, opts, scaler = unwrap(model, optimizers, scaler)
        self.reset()  # a new run; `bind` replaces any previous binding
        self.bind(module, opts, scaler, step_hooks=True)
        return Attachment(self, steps=lambda: list(self._binding.steps))

    def on_after_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Called by Fabric on the objects of ``Fabric(callbacks=...)`` after each optimizer step (no Trainer
        hook has this name). A regularizer that is not attached would silently do nothing there: refused."""
        if not (self._binding.step_hooks and self._binding.bound):
            name = type(self).__name__
            raise not_attached_error(name, f"{name.lower()} = {name}(...); {name.lower()}.attach(model, optimizer)")

    # ------------------------------------------------------------------------- Trainer hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.rules = module_rules(pl_module, self._given_rules)
        problem = deepspeed_problem(trainer.strategy)
        if problem is not None:
            raise MisconfigurationException(
                f"{type(self).__name__} does not support {problem}. Use the optimizer's own weight_decay with the "
                "decay / no-decay groups of `DecayGroupsMixin` or `decay_param_groups`, which DeepSpeed honors."
            )
        if stage == "fit":
            if self._attachment is not None:  # attached before (Fabric, plain PyTorch): the Trainer takes it over
                self._attachment.remove()
            # A new fit starts clean (a callback reused across Trainers carries nothing over); a resumed
            # one gets its saved state from `load_state_dict`, which Lightning calls after `setup`.
            self.unbind()
            self.reset()
            restores_later = bool(getattr(trainer.strategy, "restore_checkpoint_after_setup", False))
            self._resume.new_run(load_target=None if restores_later else pl_module)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Find this callback's entry when its key changed (written under another ``rules`` or by a version
        whose keys held the coefficients): adopted if it is the only unclaimed entry of this class."""
        entry = self._resume.read_checkpoint(checkpoint, trainer.callbacks)  # type: ignore[attr-defined]
        if entry is not None:
            self.load_state_dict(copy.deepcopy(entry))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in `on_fit_start`: Lightning restores the optimizers' state (param groups and their
        # `weight_decay`) after `on_fit_start`, and the checks must see what the first step will use.
        self._resume.train_start(trainer.ckpt_path, self._needed(), self._missing())
        self.bind(pl_module, trainer.optimizers, getattr(trainer.precision_plugin, "scaler", None))
        if self._resume.loaded:  # again here for strategies that restore callbacks after their setup
            self._resume.check_steps(self._binding.steps, trainer.global_step, None)
        finetuning = next((cb for cb in trainer.callbacks if isinstance(cb, BASE_FINETUNING)), None)  # type: ignore[attr-defined]
        if finetuning is not None and not self._takes_over_optimizer_decay():
            refuse_later_double_decay(self._binding, type(finetuning).__name__, hasattr(self, "takes_over"))
        warn_group_names(self._binding, "rules=" if self._given_rules is not None else None)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._binding.bound:
            self._binding.follow(trainer.optimizers)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # After the closure (backward, unscale) and before clipping and the update. Not a step pre-hook:
        # without AMP, Lightning runs the closure inside `optimizer.step`, after the pre-hooks.
        binding = self._binding
        index = binding.index_of(optimizer)
        if index is None and binding.bound and binding.follow(trainer.optimizers):
            index = binding.index_of(optimizer)
            if index is not None:
                binding.bound_in_step(index)
        if index is not None:
            binding.before_step(index)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.unbind()
            self._resume.end_fit()


def attach(
    regularizer: Regularizer, model: nn.Module, optimizers: Optimizer | Sequence[Optimizer], scaler: Any = None
) -> Attachment:
    """Attach ``regularizer`` to ``model`` and its optimizers through their step hooks; a new run.

    ``regularizer.attach(model, optimizers)`` is the same. Call it after ``fabric.setup`` under Fabric;
    in a plain loop, after building the optimizer. Every ``optimizer.step()`` then regularizes first.

    Args:
        regularizer: A ``WeightDecay`` or ``WeightPenalty``.
        model: The model the optimizers step; a Fabric-wrapped module (``fabric.setup``) is unwrapped.
        optimizers: One optimizer or a sequence (Fabric-wrapped ones are unwrapped).
        scaler: The ``torch.amp.GradScaler`` that steps them, if any; under Fabric the precision plugin's
            is found by itself.

    Returns:
        The [`Attachment`][lightning_decay.Attachment].

    Raises:
        TypeError: If ``regularizer``, ``model`` or ``optimizers`` has the wrong type.
        MisconfigurationException: On double decay (an optimizer's own ``weight_decay`` on the weights the
            regularizer also decays).

    Examples:
        ```python
        import torch
        from lightning_decay import WeightDecay, attach, decay_param_groups

        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
        optimizer = torch.optim.Adam(decay_param_groups(model, weight_decay=0.0), lr=1e-3)
        handle = attach(WeightDecay(0.05), model, optimizer)  # Adam + decoupled decay = AdamW
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        handle.steps  # [1]
        ```
    """
    if not isinstance(regularizer, Regularizer):
        raise TypeError(f"`regularizer` must be a WeightDecay or WeightPenalty, got {type(regularizer).__name__}")
    return regularizer.attach(model, optimizers, scaler)


def should_log(trainer: pl.Trainer) -> bool:
    return bool(trainer.loggers) and trainer._logger_connector.should_update_logs
