"""``WeightDecay``: decoupled weight decay (AdamW-style) for any optimizer, on the decayed weights only."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_decay import kernels
from lightning_decay._checks import check_choice, is_count
from lightning_decay._compat import MisconfigurationException, pl, rank_zero_info, rank_zero_warn
from lightning_decay._regularizer import (
    OptimizerBuckets,
    RegularizerCallback,
    after_closure,
    coefficient,
    should_log,
)
from lightning_decay.rules import DecayRules
from lightning_decay.schedules import Constant, ScheduleLike, as_schedule, check_coefficient

__all__ = ["WeightDecay", "steps_per_epoch", "timescale_weight_decay"]

_MODES = ("lr", "lr_ratio", "constant")


def uses_decoupled_decay(optimizer: Optimizer, group: dict[str, Any]) -> bool:
    """Whether an optimizer's own ``weight_decay`` is decoupled (AdamW) rather than an L2 gradient term.

    torch's Adam/AdamW say so in ``decoupled_weight_decay``; other optimizers are judged by name
    (``AdamW``, composer's ``DecoupledAdamW``/``DecoupledSGDW``, ``Lion``). torch's SGD, Adam, RMSprop,
    Adagrad... add ``weight_decay * w`` to the gradient.
    """
    flag = group.get("decoupled_weight_decay")
    if flag is not None:
        return bool(flag)
    return decoupled_by_name(type(optimizer).__name__)


def decoupled_by_name(name: str) -> bool:
    """Whether an optimizer class of this name decays decoupled (``AdamW``, ``Decoupled*``, ``Lion``)."""
    return "AdamW" in name or name.startswith("Decoupled") or name == "Lion"


def timescale_weight_decay(lr0: float, timescale_epochs: float, steps_per_epoch: int) -> float:
    """``lambda = 1 / (lr0 * tau * S)``: the decay whose EMA timescale ``1 / (lr * lambda)`` is ``tau`` epochs.

    With ``mode="lr"`` the weights then shrink by ``1 - lr / (lr0 * tau * S)`` per step: ``1 - 1 / (tau * S)``
    at the base learning rate (Wang & Aitchison 2024; see ``docs/choosing-lambda.md``).

    Args:
        lr0: The group's base learning rate (a scheduler's ``initial_lr``, else ``lr``); > 0.
        timescale_epochs: ``tau``, in epochs; > 0.
        steps_per_epoch: ``S``, optimizer steps per epoch (after gradient accumulation); >= 1.

    Examples:
        ```python
        from lightning_decay.decay import timescale_weight_decay

        timescale_weight_decay(lr0=1e-3, timescale_epochs=10, steps_per_epoch=500)  # 0.2
        ```
    """
    return 1.0 / (lr0 * timescale_epochs * steps_per_epoch)


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


class WeightDecay(RegularizerCallback):
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

    Raises:
        ValueError: If ``weight_decay`` is negative or not finite (a schedule: at the step it returns one),
            ``mode`` or ``missing_state`` is unknown, the decay factor ``1 - shrink`` is not positive (at once
            for a constant ``weight_decay >= 1`` with ``mode="constant"`` or ``"lr_ratio"``, else at the step),
            ``timescale_epochs`` is not a positive number or is given with ``weight_decay`` or another
            ``mode``, a taken-over ``weight_decay`` is negative or not finite (at train start), or a loaded
            state is malformed (naming the field).
        TypeError: If ``weight_decay`` is not a number, schedule, callable or ``None``, ``rules`` not a
            ``DecayRules``, ``timescale_epochs`` not a number, or ``name`` not a string.
        MisconfigurationException: At train start (after a resumed optimizer is restored) or when param
            groups change, on double decay (the optimizer's own ``weight_decay`` on the same weights, or
            another regularizer callback); when resuming without the saved state of a schedule; under
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
    ) -> None:
        super().__init__(rules, name=name, missing_state=missing_state)
        check_choice(mode, _MODES, "mode")
        if timescale_epochs is not None:
            if isinstance(timescale_epochs, bool) or not isinstance(timescale_epochs, numbers.Real):
                raise TypeError(f"`timescale_epochs` must be a number > 0, got {timescale_epochs!r}")
            timescale_epochs = float(timescale_epochs)  # NumPy scalars too
            if not (math.isfinite(timescale_epochs) and timescale_epochs > 0):
                raise ValueError(f"`timescale_epochs` must be a finite number > 0, got {timescale_epochs!r}")
            if weight_decay is not None:
                raise ValueError("give `weight_decay` or `timescale_epochs`, not both: the timescale sets the decay")
            if mode != "lr":
                raise ValueError(f"`timescale_epochs` decays as mode='lr'; got mode={mode!r}")
        self.timescale_epochs = timescale_epochs
        self.mode = mode
        self._weight_decay = None if weight_decay is None else as_schedule(weight_decay, "weight_decay")
        check_constant_factor(self._weight_decay, mode)
        # timescale_epochs: (optimizer index, group index) -> derived lambda, for `_steps_per_epoch` steps.
        self._derived: dict[tuple[int, int], float] = {}
        self._steps_per_epoch: int | None = None
        # (optimizer index, group index) -> (weight_decay, decoupled) taken over from the optimizer.
        self._taken_over: dict[tuple[int, int], tuple[float, bool]] = {}
        # optimizer index -> the scheduled coefficient of its last step (for `weight_decay/{group}`).
        self._last_coefficient: dict[int, float] = {}
        # (optimizer index, group index) -> (lr tensor, its version, initial lr, its version, coefficient) of
        # the last passed factor check of a tensor lr; and the groups already warned of lr_ratio above 1.
        self._lr_checked: dict[tuple[int, int], tuple[Any, ...]] = {}
        self._ratio_warned: set[tuple[int, int]] = set()

    @property
    def takes_over(self) -> bool:
        return self._weight_decay is None and self.timescale_epochs is None

    # ------------------------------------------------------------- timescale
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.timescale_epochs is None:
            return
        steps = steps_per_epoch(trainer)
        if steps != self._steps_per_epoch:  # first epoch, or dataloaders reloaded with another length
            self._steps_per_epoch = steps
            self._derived = {}
            for index in range(len(self._per_optimizer)):  # one info line per group, now
                for group_index in sorted({b.group_index for b in self._buckets(index)}):
                    self.derived_weight_decay(index, group_index)

    def derived_weight_decay(self, optimizer_index: int, group_index: int) -> float:
        """The ``lambda`` derived from ``timescale_epochs`` for one param group (computed once per epoch length).

        Raises:
            MisconfigurationException: If the group's base lr is not positive.
        """
        key = (optimizer_index, group_index)
        derived = self._derived.get(key)
        if derived is not None:
            return derived
        assert self.timescale_epochs is not None and self._steps_per_epoch is not None
        optimizer = self._per_optimizer[optimizer_index].optimizer
        group = optimizer.param_groups[group_index]
        lr0 = group.get("initial_lr", group["lr"])
        name = group.get("name", f"param group {group_index}")
        if not lr0 > 0:
            raise MisconfigurationException(
                f"WeightDecay(timescale_epochs={self.timescale_epochs}) needs a positive base lr, but "
                f"{type(optimizer).__name__}'s {name!r} has lr0={lr0}"
            )
        steps = max(self._steps_per_epoch, 1)
        if self.timescale_epochs * steps <= 1:
            raise MisconfigurationException(
                f"WeightDecay(timescale_epochs={self.timescale_epochs}) with {steps} optimizer steps per epoch would "
                "shrink the weights by 1 - 1/(tau * S) <= 0 per step: tau must exceed 1/S epochs (one step)"
            )
        derived = self._derived[key] = timescale_weight_decay(lr0, self.timescale_epochs, steps)
        rank_zero_info(
            f"WeightDecay: {type(optimizer).__name__} {name!r}: lr0={lr0:g}, S={steps} steps/epoch, "
            f"tau={self.timescale_epochs:g} epochs -> weight_decay={derived:.6g}"
        )
        return derived

    # ------------------------------------------------------------ base hooks
    def _decays_like_weight_decay(self) -> bool:
        return True

    def _takes_over_optimizer_decay(self) -> bool:
        return self.takes_over

    def _check_double_decay(self, index: int, entry: OptimizerBuckets) -> None:
        if not self.takes_over:
            super()._check_double_decay(index, entry)
            return
        optimizer = entry.optimizer
        for gi, group in enumerate(optimizer.param_groups):
            wd = group.get("weight_decay", 0.0)
            # The group as the next step will use it: a non-zero weight_decay is the optimizer's own decay
            # (a fresh optimizer, one restored from a checkpoint written without this callback, a group
            # just added), taken over now; zero with an entry was taken over before (a resumed run's).
            if not wd:
                continue
            # Checked as an explicit `weight_decay` is (nan, inf, negative): applied, it would ruin the weights.
            value = check_coefficient(
                float(wd) if isinstance(wd, Tensor) else wd,
                f"weight_decay of {type(optimizer).__name__} param group {group.get('name', gi)!r} (taken over)",
            )
            self._taken_over[(index, gi)] = (value, uses_decoupled_decay(optimizer, group))
            group["weight_decay"] = 0.0
            rank_zero_info(
                f"WeightDecay took over weight_decay={wd} of {type(optimizer).__name__} param group "
                f"{group.get('name', gi)!r}: applied to the decayed parameters only"
            )
        if not any(i == index for i, _ in self._taken_over):
            rank_zero_warn(
                f"WeightDecay(weight_decay=None) found no weight_decay to take over in {type(optimizer).__name__}"
            )

    def _register_optimizer_hooks(self, index: int, optimizer: Optimizer) -> list[RemovableHandle]:
        def before_step(opt: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self._unscaled_in_step(opt):
                # A fused optimizer under a GradScaler decides inside `step` (it sets `found_inf`); its
                # closure has run already (Lightning's AMP plugin runs it before `step`).
                self._apply_decoupled(index, opt)
                self._apply_coupled(index, opt)
                return None
            if not self._has_coupled(index):
                return None
            # The L2 term once the gradients are unscaled and clipped, before the update: where torch's own
            # SGD/Adam add it.
            return after_closure(args, kwargs, lambda: self._apply_coupled(index, opt))

        def after_step(opt: Optimizer, args: Any, kwargs: Any) -> None:
            if self._step_ran(opt):
                self._steps[index] += 1

        return [optimizer.register_step_pre_hook(before_step), optimizer.register_step_post_hook(after_step)]

    def _prepare(self, plan: Any) -> None:
        if not self.takes_over:
            self._taken_over = {}  # resumed from a take-over with an explicit coefficient now: it is the one

    def _forget_optimizer(self, index: int) -> None:
        self._taken_over = {k: v for k, v in self._taken_over.items() if k[0] != index}
        self._lr_checked = {k: v for k, v in self._lr_checked.items() if k[0] != index}
        self._derived = {k: v for k, v in self._derived.items() if k[0] != index}  # its lr0 may differ

    def _reset_state(self) -> None:
        self._taken_over = {}
        self._lr_checked = {}
        self._ratio_warned = set()
        self._last_coefficient = {}
        self._derived = {}
        self._steps_per_epoch = None

    def _saved_state_needed(self) -> list[str]:
        # A take-over needs nothing: the coefficient is still in the restored optimizer, or in the entry.
        if self._weight_decay is not None and self._step_dependent(self._weight_decay):
            return ["the step count of the `weight_decay` schedule"]
        return []

    # --------------------------------------------------------------- steps
    def _before_step(self, index: int, optimizer: Optimizer) -> None:
        if not self._unscaled_in_step(optimizer):  # fused under a GradScaler: in the step pre-hook
            self._apply_decoupled(index, optimizer)

    def _attached_late(self, index: int, optimizer: Optimizer) -> None:
        # Replaced inside training_step: without a GradScaler the closure runs inside `step`, after the
        # pre-hook that adds the coupled term would have run; add it now (before clipping, this once).
        if self._scaler is None and self._has_coupled(index):
            self._apply_coupled(index, optimizer)

    def _coefficients(self, index: int) -> Callable[[int], tuple[float, bool]]:
        """``group index -> (coefficient, decoupled)`` for optimizer ``index`` this step.

        The schedule is evaluated (and checked) once per step, not once per bucket.
        """
        if self.timescale_epochs is not None:
            return lambda group_index: (self.derived_weight_decay(index, group_index), True)
        if self._weight_decay is None:
            taken = self._taken_over
            return lambda group_index: taken.get((index, group_index), (0.0, True))
        wd = coefficient(self._weight_decay, self._steps[index], "weight_decay")
        self._last_coefficient[index] = wd
        return lambda group_index: (wd, True)

    def _has_coupled(self, index: int) -> bool:
        return any(i == index and not decoupled for (i, _), (_, decoupled) in self._taken_over.items())

    def _apply_decoupled(self, index: int, optimizer: Optimizer) -> None:
        skip = self._found_inf(optimizer)  # decay nothing on a step the GradScaler will skip
        coefficients = self._coefficients(index)
        for b in self._buckets(index):
            coeff, decoupled = coefficients(b.group_index)
            if not coeff or not decoupled:
                continue
            group = optimizer.param_groups[b.group_index]
            lr = group["lr"]
            mode = "lr" if self._weight_decay is None else self.mode  # taking over, and timescale_epochs
            if mode == "lr_ratio":
                # A tensor lr is copied, as torch's schedulers do: a scheduler's `fill_` must not move it too.
                group.setdefault("initial_lr", lr.clone() if isinstance(lr, Tensor) else lr)
            name = group.get("name", b.group_index)
            initial_lr = group.get("initial_lr")
            if mode != "constant" and isinstance(lr, Tensor):
                self._check_tensor_lr(index, b.group_index, mode, lr, initial_lr, coeff, name)
            shrink = decay_shrink(mode, lr, initial_lr, coeff, self._steps[index], name)
            if mode == "lr_ratio" and not isinstance(shrink, Tensor) and shrink > coeff:
                self._warn_ratio(index, b.group_index, name, lr, initial_lr, coeff)
            factor: float | Tensor = 1.0 - shrink if skip is None else 1.0 - shrink * (1.0 - skip)
            # Like torch's AdamW: a parameter without a gradient this step (frozen, unused) is not decayed.
            kernels.decay_(b.with_grads()[0], factor)

    def _check_tensor_lr(
        self, index: int, group_index: int, mode: str, lr: Tensor, initial_lr: Any, coeff: float, name: Any
    ) -> None:
        """The factor check of a tensor lr, read on the host only when the lr tensor or ``coeff`` changed.

        A new tensor, an in-place update (a scheduler's ``fill_`` bumps ``_version``) or another
        coefficient: one host sync then, none on the steps in between (a constant tensor lr never syncs
        again). The values are those the next steps multiply by, so a factor ``<= 0`` is refused before
        it is applied, as for a float lr.
        """
        key = (index, group_index)
        base_version = initial_lr._version if isinstance(initial_lr, Tensor) else None
        last = self._lr_checked.get(key)
        same = last is not None and last[0] is lr and last[2] is initial_lr
        if same and (last[1], last[3], last[4]) == (lr._version, base_version, coeff):
            return
        lr0 = float(initial_lr) if isinstance(initial_lr, Tensor) else initial_lr
        shrink = decay_shrink(mode, float(lr), lr0, coeff, self._steps[index], name)
        # Recorded once passed, so a refused lr is checked again at the next step.
        self._lr_checked[key] = (lr, lr._version, initial_lr, base_version, coeff)
        if mode == "lr_ratio" and shrink > coeff:
            self._warn_ratio(index, group_index, name, float(lr), lr0, coeff)

    def _warn_ratio(self, index: int, group_index: int, name: Any, lr: Any, initial_lr: Any, coeff: float) -> None:
        """Once per param group: ``mode="lr_ratio"`` with the lr above its initial value shrinks more than ``wd``."""
        if (index, group_index) in self._ratio_warned:
            return
        self._ratio_warned.add((index, group_index))
        ratio = lr / initial_lr
        rank_zero_warn(
            f"WeightDecay(mode='lr_ratio'): param group {name!r} has lr {lr:g} = {ratio:.4g} x its initial lr "
            f"{initial_lr:g} at step {self._steps[index]}, so the weights shrink by {ratio:.4g} * weight_decay = "
            f"{ratio * coeff:.4g} per step, more than weight_decay={coeff:g} (the shrink at the initial lr). "
            "A scheduler raising the lr above its initial value (OneCycleLR, CyclicLR, a warm-up factor > 1) "
            "does this; use mode='lr', or a weight_decay meant for the initial lr. (Said once per group.)"
        )

    def _apply_coupled(self, index: int, optimizer: Optimizer) -> None:
        """The optimizer's own (coupled) semantics, taken over: an L2 term ``wd * w`` in the gradient."""
        scale = self._grad_scale(optimizer) if self._unscaled_in_step(optimizer) else None
        coefficients = self._coefficients(index)
        for b in self._buckets(index):
            coeff, decoupled = coefficients(b.group_index)
            if not coeff or decoupled:
                continue
            weights, grads, idx = b.with_grads()
            chunks = b.chunks if len(idx) == len(b.params) else None  # the bucket's ranges index all of it
            kernels.add_l2_gradient_(grads, weights, coeff if scale is None else scale * coeff, chunks=chunks)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Decay multiplies NaN/Inf weights along silently; say so once, on logging steps only.
        if self._per_optimizer and should_log(trainer):
            self._check_finite()
            # What is applied, where the optimizer's own `weight_decay` (which `LearningRateMonitor(
            # log_weight_decay=True)` reads) is 0 once taken over. Python floats, handed to the loggers as
            # LearningRateMonitor does (no float32 round trip, no host copy), with the step label
            # `self.log` gives this batch's metrics.
            values = self.applied_weight_decay()
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
        several = len(self._per_optimizer) > 1
        for index, entry in enumerate(self._per_optimizer):
            if self.timescale_epochs is not None:  # the lambdas derived from the timescale, as applied
                applied = {gi: wd for (i, gi), wd in self._derived.items() if i == index}
            elif self.takes_over:
                applied = {gi: wd for (i, gi), (wd, _) in self._taken_over.items() if i == index}
            elif index in self._last_coefficient:
                applied = dict.fromkeys({b.group_index for b in entry.buckets}, self._last_coefficient[index])
            else:
                continue  # no step yet
            groups = entry.optimizer.param_groups
            prefix = f"{type(entry.optimizer).__name__}-{index}/" if several else ""
            for gi in sorted({b.group_index for b in entry.buckets}):
                values[f"weight_decay/{prefix}{groups[gi].get('name', f'pg{gi + 1}')}"] = applied.get(gi, 0.0)
        return values

    def state_dict(self) -> dict[str, Any]:
        taken = [[i, g, wd, dec] for (i, g), (wd, dec) in self._taken_over.items()]
        return {**super().state_dict(), "taken_over": taken}

    def _validated(self, state_dict: Any) -> dict[str, Any]:
        state = super()._validated(state_dict)
        taken = state.get("taken_over", [])

        def entry_ok(e: Any) -> bool:
            if not isinstance(e, (list, tuple)) or len(e) != 4:
                return False
            i, g, wd, dec = e
            try:
                check_coefficient(wd, "taken_over")
            except (TypeError, ValueError):
                return False
            return is_count(i) and is_count(g) and isinstance(dec, bool)

        if not isinstance(taken, (list, tuple)) or not all(entry_ok(e) for e in taken):
            raise ValueError(
                "WeightDecay: the state field 'taken_over' must be a list of [optimizer index, group index, "
                f"weight_decay >= 0, decoupled (bool)] entries, got {taken!r}"
            )
        n = len(state["steps"])
        if any(e[0] >= n for e in taken):
            raise ValueError(
                f"WeightDecay: the state field 'taken_over' ({taken!r}) names optimizers beyond the {n} of 'steps'"
            )
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        taken = state.get("taken_over", [])
        self._taken_over = {(int(i), int(g)): (float(wd), bool(dec)) for i, g, wd, dec in taken}


def check_constant_factor(weight_decay: Any, mode: str) -> None:
    """Refuse a constant coefficient whose factor is not positive whatever the learning rate.

    ``"constant"`` shrinks by ``wd`` at every step, ``"lr_ratio"`` by ``wd`` whenever the learning rate is
    back at its initial value (the first step, without warm-up).
    """
    if isinstance(weight_decay, Constant) and mode in ("constant", "lr_ratio") and weight_decay.value >= 1.0:
        raise ValueError(
            f"`weight_decay`={weight_decay.value} with mode={mode!r} multiplies the weights by "
            f"1 - {weight_decay.value} <= 0 ({'at every step' if mode == 'constant' else 'at the initial lr'}): "
            "it must be < 1"
        )


def decay_shrink(mode: str, lr: Any, initial_lr: Any, coeff: float, step: int, group: Any) -> Any:
    """``shrink`` of the factor ``1 - shrink`` of one param group at one step, refused unless ``< 1``.

    On the hot path: Python float arithmetic and comparisons only. A tensor learning rate (some
    optimizers accept one) is passed through unchecked here, since comparing it would synchronize the
    host; `WeightDecay` checks its value on the host when the tensor changes.

    Raises:
        ValueError: If the factor is not positive, or ``mode="lr_ratio"`` meets an initial lr of 0.
    """
    if mode == "constant":
        shrink = coeff
    elif mode == "lr_ratio":
        if isinstance(initial_lr, (int, float)) and initial_lr == 0:
            raise ValueError(
                f"WeightDecay(mode='lr_ratio') at step {step}: param group {group!r} has initial lr 0, so lr / "
                "initial_lr is undefined. Use mode='lr' for a group that starts at lr 0."
            )
        shrink = lr / initial_lr * coeff
    else:
        shrink = lr * coeff
    if not isinstance(shrink, Tensor) and shrink >= 1.0:
        ratio = f", initial lr {initial_lr}" if mode == "lr_ratio" else ""
        raise ValueError(
            f"WeightDecay(mode={mode!r}) at step {step}: param group {group!r} with lr {lr}{ratio} and "
            f"weight_decay {coeff} gives the factor 1 - {shrink} <= 0, which would flip or zero the weights. "
            "Lower weight_decay (AdamW-style values are about 1e-4 to 0.1 with lr about 1e-3)."
        )
    return shrink
