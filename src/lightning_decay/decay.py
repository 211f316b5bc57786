"""``WeightDecay``: decoupled weight decay (AdamW-style) for any optimizer, on the decayed weights only.

The Lightning adapter of `lightning_decay._decay_effect.DecoupledDecay`: which coefficient source the
arguments choose, the epoch length for a timescale, the ``weight_decay/{group}`` values on logging steps,
and the ``taken_over`` field of the saved state.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

from torch.optim import Optimizer

from lightning_decay._checks import check_choice, check_flag
from lightning_decay._compat import MisconfigurationException, pl
from lightning_decay._decay_effect import (
    DecoupledDecay,
    Scheduled,
    TakeOver,
    Timescale,
    check_constant_factor,
    decay_shrink,
    decoupled_by_name,
    timescale_weight_decay,
    uses_decoupled_decay,
)
from lightning_decay._host import to_host
from lightning_decay._lightning import Regularizer, should_log
from lightning_decay.rules import DecayRules
from lightning_decay.schedules import ScheduleLike, as_schedule

__all__ = [
    "WeightDecay",
    "check_constant_factor",
    "decay_shrink",
    "decoupled_by_name",
    "steps_per_epoch",
    "timescale_weight_decay",
    "uses_decoupled_decay",
]

_MODES = ("lr", "lr_ratio", "constant")


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps per epoch and process: ``ceil(num_training_batches / accumulate_grad_batches)``.

    ``num_training_batches`` already counts this process's share under DDP and ``limit_train_batches``;
    Lightning steps the optimizer every ``accumulate_grad_batches`` batches and on the last batch of an
    epoch, hence the ceiling. ``max_steps`` ends the run, it does not shorten an epoch.

    Raises:
        MisconfigurationException: If the epoch length is unknown (an iterable dataset without ``__len__``
            and no integer ``limit_train_batches``).
    """
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise MisconfigurationException(
            "WeightDecay(timescale_epochs=...) needs the number of batches per epoch, but the train dataloader has "
            "no length. Set `limit_train_batches` to an int, give the dataset a `__len__`, or use `weight_decay=`."
        )
    return math.ceil(int(batches) / trainer.accumulate_grad_batches)


class WeightDecay(Regularizer):
    r"""Decoupled weight decay (Loshchilov & Hutter) for any optimizer: ``w <- w - lr * wd * w``.

    Applied to the ``"decay"`` weights of the [`DecayRules`][lightning_decay.DecayRules] plan just before
    each optimizer step that really runs (in ``on_before_optimizer_step``, after the gradients are
    computed; masked on a step the AMP ``GradScaler`` skips), with each param group's current learning
    rate. Parameters without a gradient that step are left alone, as AdamW leaves them. ``Adam`` with
    ``WeightDecay(wd)`` is torch's ``AdamW(weight_decay=wd)`` with the same decay / no-decay split.

    Modes:
        - ``"lr"``: ``w *= 1 - lr * wd`` (AdamW).
        - ``"lr_ratio"``: ``w *= 1 - (lr / lr0) * wd`` with ``lr0`` the group's initial learning rate
          (composer's ``DecoupledAdamW``): ``wd`` is then the decay per step at the initial learning rate.
          A scheduler that raises the lr above it (``OneCycleLR`` starts at ``max_lr / 25``, ``CyclicLR``,
          a warm-up factor above 1) shrinks by more, ``(lr / lr0) * wd``: a warning names the group and
          the ratio, once per group.
        - ``"constant"``: ``w *= 1 - wd``, independent of the learning rate.

    A factor ``1 - shrink <= 0`` would flip the weights' signs (or zero them): it is refused with an error
    naming the step, the learning rate and the coefficient, never applied. A tensor learning rate is
    checked too, on the host only when it changes (another tensor, an in-place update, another coefficient).
    ``mode="constant"`` (and ``"lr_ratio"``, whose shrink at the initial learning rate is ``wd``) refuse a
    constant ``wd >= 1`` at once; ``"lr_ratio"`` also refuses a param group whose initial learning rate is 0.

    Taking over the optimizer's decay (``weight_decay=None``): the callback reads each param group's
    ``weight_decay``, sets it to 0 in the optimizer, and applies it itself to the decayed weights only,
    with the optimizer's own semantics -- decoupled for AdamW-style optimizers, an L2 gradient term
    ``g += wd * w`` for torch's Adam and SGD (added after clipping, as those optimizers do); a taken-over
    value is checked as an explicit one (``nan``, ``inf`` and negatives are refused). So
    ``--optimizer AdamW --optimizer.weight_decay 0.05`` in a LightningCLI config plus this callback decays
    weights at 0.05 and leaves biases and normalization parameters alone. With an explicit
    ``weight_decay``, an optimizer group that also decays the same weights is an error: never both.

    On the Trainer's logging steps it logs ``weight_decay/{group}``, the coefficient it applied to each
    param group's decayed weights ([`applied_weight_decay`][lightning_decay.WeightDecay.applied_weight_decay]):
    taking over, ``LearningRateMonitor(log_weight_decay=True)`` reads the optimizer's ``weight_decay``, 0.

    Set by its timescale (``timescale_epochs=tau``): per param group ``lambda = 1 / (lr0 * tau * S)``, with
    ``lr0`` the group's base lr (``initial_lr`` when a scheduler set it, else ``lr``) and ``S`` the optimizer
    steps per epoch of this process after gradient accumulation; the weights then decay as in
    ``mode="lr"``, so at the base lr they shrink by ``1 - 1 / (tau * S)`` per step. The best ``tau`` in
    epochs stays about constant across model and dataset sizes (Wang & Aitchison 2024). The derived
    values are logged when training starts, one line per group (lr0, S, tau, lambda), and recomputed when the
    epoch length changes.

    Cautious weight decay (``cautious=True``; Chen et al., arXiv 2510.12402): the same factor, applied only to
    the entries whose update ``u`` agrees in sign with the weight, ``x <- x - lr * (u + wd * 1[u * x >= 0] * x)``,
    with every mode, schedule, ``timescale_epochs`` and a taken-over decoupled decay; it runs in the optimizer's
    step pre-hook, after gradient clipping. ``u`` is read from the optimizer's state and this step's (clipped)
    gradient before the update where its sign is known exactly
    (``lightning_decay.directions``: torch's Adam/AdamW/RAdam/Adamax, SGD, RMSprop, Adagrad, Adadelta, or a
    class given to [`register_direction`][lightning_decay.directions.register_direction]); for any other
    optimizer it is measured from the weights before and after its step, at the cost of one copy of the
    decayed weights. Which path each param group takes is logged once (``rank_zero_info``). On logging
    steps it also logs ``weight_decay/cautious_fraction/{group}``, the share of decayed entries the mask let
    through. See ``docs/cautious.md``.

    Args:
        weight_decay: The decay coefficient (number, schedule or ``step -> float``), or ``None`` to take
            over each optimizer group's ``weight_decay``.
        mode: ``"lr"``, ``"lr_ratio"`` or ``"constant"`` (ignored when taking over).
        rules: Which parameters are decayed; default: the LightningModule's ``decay_rules``, else
            [`DecayRules`][lightning_decay.DecayRules]``()``.
        timescale_epochs: The EMA timescale ``tau`` in epochs from which each group's ``weight_decay`` is
            derived; exclusive with ``weight_decay``, needs ``mode="lr"``.
        name: The callback's key in checkpoints (``WeightDecay{'name': ...}``); needed only to keep two
            instances with the same ``rules`` apart, or a key fixed across changes of ``rules``.
        missing_state: What a resumed fit does when the checkpoint has no state for this callback and the
            state matters (a ``weight_decay`` schedule's step count): ``"raise"`` (default) or
            ``"restart"`` (the schedule starts again from step 0).
        cautious: Cautious weight decay: decay only where the update and the weight agree in sign.

    Raises:
        ValueError: If ``weight_decay`` is negative or not finite (a schedule: at the step it returns one),
            ``mode`` or ``missing_state`` is unknown, the decay factor ``1 - shrink`` is not positive (at once
            for a constant ``weight_decay >= 1`` with ``mode="constant"`` or ``"lr_ratio"``, else at the step),
            ``timescale_epochs`` is not a positive number or is given with ``weight_decay`` or another
            ``mode``, a taken-over ``weight_decay`` is negative or not finite (at train start), or a loaded
            state is malformed (naming the field).
        TypeError: If ``weight_decay`` is not a number, schedule, callable or ``None``, ``rules`` not a
            ``DecayRules``, ``timescale_epochs`` not a number, ``name`` not a string, or ``cautious`` not a bool.
        MisconfigurationException: At train start (after a resumed optimizer is restored) or when param
            groups change, on double decay (the optimizer's own ``weight_decay`` on the same weights, or
            another regularizer callback); when resuming without the saved state of a schedule; with
            ``cautious=True``, when taking over a coupled (L2) ``weight_decay`` (torch's Adam, SGD); under
            DeepSpeed; with ``timescale_epochs``, if the epoch length is unknown or a group's base lr is 0.

    Examples:
        ```python
        from lightning.pytorch import Trainer
        from lightning_decay import WeightDecay

        trainer = Trainer(callbacks=[WeightDecay(0.05)])  # with torch.optim.Adam(..., weight_decay=0)
        trainer = Trainer(callbacks=[WeightDecay(timescale_epochs=10)])  # lambda = 1 / (lr0 * 10 * S)
        ```
    """

    def __init__(
        self,
        weight_decay: ScheduleLike | None = None,
        mode: Literal["lr", "lr_ratio", "constant"] = "lr",
        rules: DecayRules | None = None,
        timescale_epochs: float | None = None,
        name: str | None = None,
        missing_state: Literal["raise", "restart"] = "raise",
        cautious: bool = False,
    ) -> None:
        check_choice(mode, _MODES, "mode")
        self.cautious = check_flag(cautious, "cautious")
        timescale_epochs = _check_timescale(timescale_epochs, weight_decay, mode)
        self.timescale_epochs = timescale_epochs
        self.mode = mode
        self._weight_decay = None if weight_decay is None else as_schedule(weight_decay, "weight_decay")
        check_constant_factor(self._weight_decay, mode)
        source: Scheduled | TakeOver | Timescale
        if timescale_epochs is not None:
            source = Timescale(timescale_epochs)
        elif self._weight_decay is None:
            source = TakeOver()
        else:
            source = Scheduled(self._weight_decay)
        self._decay = DecoupledDecay(source, mode, cautious)
        super().__init__(rules, name, missing_state, [self._decay])

    @property
    def takes_over(self) -> bool:
        return self._weight_decay is None and self.timescale_epochs is None

    def _takes_over_optimizer_decay(self) -> bool:
        return self.takes_over

    # ------------------------------------------------------------------------ timescale
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self._decay.source, Timescale):
            self._decay.source.set_steps_per_epoch(self._binding, steps_per_epoch(trainer))

    def derived_weight_decay(self, optimizer_index: int, group_index: int) -> float:
        """The ``lambda`` derived from ``timescale_epochs`` for one param group (computed once per epoch length).

        Raises:
            MisconfigurationException: If the group's base lr is not positive.
        """
        assert isinstance(self._decay.source, Timescale)
        return self._decay.source.value(self._binding, optimizer_index, group_index)

    # -------------------------------------------------------------------------- logging
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._decay.cautious is not None:  # the mask's share is summed on the device on logging steps only
            self._decay.cautious.want_fraction = bool(self._binding.bound) and should_log(trainer)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Decay multiplies NaN/Inf weights along silently; say so once, on logging steps only.
        if self._binding.bound and should_log(trainer):
            self._nonfinite.check_buckets(b for _, b in self._binding.all_buckets())
            # What is applied, where the optimizer's own `weight_decay` (which `LearningRateMonitor(
            # log_weight_decay=True)` reads) is 0 once taken over. Python floats, handed to the loggers as
            # LearningRateMonitor does (no float32 round trip, no host copy), with the step label
            # `self.log` gives this batch's metrics.
            values = {**self.applied_weight_decay(), **self._cautious_fractions()}
            if values:
                step = trainer.fit_loop.epoch_loop._batches_that_stepped
                for logger in trainer.loggers:
                    logger.log_metrics(values, step=step)

    def applied_weight_decay(self) -> dict[str, float]:
        """``weight_decay/{group}`` -> the coefficient applied to the group's decayed weights at the last step.

        One entry per optimizer param group holding weights this callback decays, named by the group's
        ``"name"`` (``pg{i}`` counting from 1 for an unnamed one, as ``LearningRateMonitor`` does), prefixed
        with the optimizer's class when there are several optimizers. Taking over, the value is the group's
        taken-over ``weight_decay``; with ``timescale_epochs``, the group's derived ``lambda``; otherwise the
        (scheduled) ``weight_decay`` of the optimizer's last step.
        ``WeightDecay`` logs these on the Trainer's logging steps.
        """
        values: dict[str, float] = {}
        bound = self._binding.bound
        for index, entry in enumerate(bound):
            applied = self._decay.applied(self._binding, index)
            if applied is None:
                continue  # no step yet
            prefix = f"{type(entry.optimizer).__name__}-{index}/" if len(bound) > 1 else ""
            for gi in sorted({b.group_index for b in entry.buckets}):
                values[f"weight_decay/{prefix}{_group_name(entry.optimizer, gi)}"] = applied.get(gi, 0.0)
        return values

    def _cautious_fractions(self) -> dict[str, float]:
        """``weight_decay/cautious_fraction/{group}`` of the last logging step, with one host copy."""
        kernel = self._decay.cautious
        if kernel is None:
            return {}
        bound = self._binding.bound
        keys, shares = [], []
        for index, entry in enumerate(bound):
            prefix = f"{type(entry.optimizer).__name__}-{index}/" if len(bound) > 1 else ""
            for gi, share in sorted(kernel.shares(index).items()):
                keys.append(f"weight_decay/cautious_fraction/{prefix}{_group_name(entry.optimizer, gi)}")
                shares.append(share)
        return dict(zip(keys, to_host(shares, []), strict=True)) if shares else {}

    # ---------------------------------------------------------------------------- state
    def _state(self) -> dict[str, Any]:
        return {"taken_over": self._decay.takeover.state()}

    def _validated(self, state: dict[str, Any]) -> None:
        TakeOver.validated(state.get("taken_over", []), len(state["steps"]))

    def _load(self, state: dict[str, Any]) -> None:
        self._decay.takeover.load(state.get("taken_over", []))

    def _needed(self) -> list[str]:
        # A take-over needs nothing: the coefficient is still in the restored optimizer, or in the entry.
        source = self._decay.source
        if isinstance(source, Scheduled) and source.step_dependent():
            return ["the step count of the `weight_decay` schedule"]
        return []


def _group_name(optimizer: Optimizer, group_index: int) -> str:
    """A param group's ``"name"``, else ``pg{i}`` counting from 1 (as ``LearningRateMonitor`` names it)."""
    return str(optimizer.param_groups[group_index].get("name", f"pg{group_index + 1}"))


def _check_timescale(timescale_epochs: Any, weight_decay: Any, mode: str) -> float | None:
    if timescale_epochs is None:
        return None
    if isinstance(timescale_epochs, bool) or not isinstance(timescale_epochs, numbers.Real):
        raise TypeError(f"`timescale_epochs` must be a number > 0, got {timescale_epochs!r}")
    timescale_epochs = float(timescale_epochs)  # NumPy scalars too
    if not (math.isfinite(timescale_epochs) and timescale_epochs > 0):
        raise ValueError(f"`timescale_epochs` must be a finite number > 0, got {timescale_epochs!r}")
    if weight_decay is not None:
        raise ValueError("give `weight_decay` or `timescale_epochs`, not both: the timescale sets the decay")
    if mode != "lr":
        raise ValueError(f"`timescale_epochs` decays as mode='lr'; got mode={mode!r}")
    return timescale_epochs
