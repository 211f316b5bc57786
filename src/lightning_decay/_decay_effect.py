"""Decoupled weight decay as an effect: ``w *= 1 - shrink`` on the decayed weights, before each step that runs.

The coefficient has three sources, one small class each: an explicit schedule (`Scheduled`), the
optimizer's own ``weight_decay`` taken over (`TakeOver`, which also applies a coupled optimizer's decay
as the L2 gradient term it was), and a timescale in epochs (`Timescale`). `DecoupledDecay` applies
whichever it is given, with the modes of ``WeightDecay``. No Trainer here: the adapter feeds the epoch
length to `Timescale`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_decay import kernels
from lightning_decay._binding import Binding, Effect, StepWork
from lightning_decay._cautious_effect import CautiousKernel
from lightning_decay._checks import is_count
from lightning_decay._compat import MisconfigurationException, rank_zero_info, rank_zero_warn
from lightning_decay.schedules import Constant, Schedule, check_coefficient

__all__ = [
    "DecoupledDecay",
    "Scheduled",
    "TakeOver",
    "Timescale",
    "check_constant_factor",
    "decay_shrink",
    "decoupled_by_name",
    "timescale_weight_decay",
    "uses_decoupled_decay",
]

#: ``group index -> (coefficient, decoupled)`` of one optimizer at one step.
Coefficients = Callable[[int], tuple[float, bool]]


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


# ------------------------------------------------------------------------------- coefficient sources
class Scheduled:
    """An explicit coefficient: a schedule of the optimizer's step count, evaluated once per step."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.last: dict[int, float] = {}  # optimizer index -> the coefficient of its last step (for logging)
        # A constant was checked when it was built: no check per step (a bound method, not a lambda: the
        # callback must pickle for `ddp_spawn`).
        self.value = schedule.value if isinstance(schedule, Constant) else None

    def _constant(self, group_index: int) -> tuple[float, bool]:
        return self.value, True  # type: ignore[return-value]

    def for_step(self, binding: Binding, index: int) -> Coefficients:
        if self.value is not None:
            self.last[index] = self.value
            return self._constant
        wd = check_coefficient(self.schedule(binding.steps[index]), "weight_decay", binding.steps[index])
        self.last[index] = wd
        return lambda group_index: (wd, True)

    def applied(self, binding: Binding, index: int) -> dict[int, float] | None:
        if index not in self.last:
            return None  # no step yet
        return dict.fromkeys({b.group_index for b in binding.bound[index].buckets}, self.last[index])

    def step_dependent(self) -> bool:
        return not isinstance(self.schedule, Constant)

    def reset(self) -> None:
        self.last = {}


class TakeOver:
    """The optimizer's own ``weight_decay``, taken over: read per group, set to 0, applied to decayed weights.

    A non-zero ``weight_decay`` when the buckets are built is the optimizer's own decay (a fresh optimizer,
    one restored from a checkpoint written without the callback, a group just added), taken now; zero with
    an entry was taken before (a resumed run's). Saved as ``taken_over``.
    """

    def __init__(self) -> None:
        self.taken: dict[tuple[int, int], tuple[float, bool]] = {}  # (optimizer, group) -> (wd, decoupled)

    def take_over(self, binding: Binding, index: int) -> None:
        optimizer = binding.bound[index].optimizer
        for gi, group in enumerate(optimizer.param_groups):
            wd = group.get("weight_decay", 0.0)
            if not wd:
                continue
            # Checked as an explicit `weight_decay` is (nan, inf, negative): applied, it would ruin the weights.
            value = check_coefficient(
                float(wd) if isinstance(wd, Tensor) else wd,
                f"weight_decay of {type(optimizer).__name__} param group {group.get('name', gi)!r} (taken over)",
            )
            self.taken[(index, gi)] = (value, uses_decoupled_decay(optimizer, group))
            group["weight_decay"] = 0.0
            rank_zero_info(
                f"WeightDecay took over weight_decay={wd} of {type(optimizer).__name__} param group "
                f"{group.get('name', gi)!r}: applied to the decayed parameters only"
            )
        if not any(i == index for i, _ in self.taken):
            rank_zero_warn(
                f"WeightDecay(weight_decay=None) found no weight_decay to take over in {type(optimizer).__name__}"
            )

    def for_step(self, binding: Binding, index: int) -> Coefficients:
        taken = self.taken
        return lambda group_index: taken.get((index, group_index), (0.0, True))

    def applied(self, binding: Binding, index: int) -> dict[int, float]:
        return {gi: wd for (i, gi), (wd, _) in self.taken.items() if i == index}

    def has_coupled(self, index: int) -> bool:
        return any(i == index and not decoupled for (i, _), (_, decoupled) in self.taken.items())

    def forget(self, index: int) -> None:
        self.taken = {k: v for k, v in self.taken.items() if k[0] != index}

    def state(self) -> list[list[Any]]:
        return [[i, g, wd, dec] for (i, g), (wd, dec) in self.taken.items()]

    def load(self, entries: list[Any]) -> None:
        self.taken = {(int(i), int(g)): (float(wd), bool(dec)) for i, g, wd, dec in entries}

    @staticmethod
    def validated(taken: Any, optimizers: int) -> None:
        """Refuse a malformed ``taken_over`` field, naming it."""

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
        if any(e[0] >= optimizers for e in taken):
            raise ValueError(
                f"WeightDecay: the state field 'taken_over' ({taken!r}) names optimizers beyond the {optimizers} "
                "of 'steps'"
            )


class Timescale:
    """``lambda = 1 / (lr0 * tau * S)`` per param group, derived once per epoch length ``S``."""

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self.steps_per_epoch: int | None = None
        self.derived: dict[tuple[int, int], float] = {}  # (optimizer, group) -> lambda

    def set_steps_per_epoch(self, binding: Binding, steps: int) -> None:
        """A new epoch length (first epoch, dataloaders reloaded): derive again, one info line per group."""
        if steps == self.steps_per_epoch:
            return
        self.steps_per_epoch, self.derived = steps, {}
        for index in range(len(binding.bound)):
            for group_index in sorted({b.group_index for b in binding.buckets(index)}):
                self.value(binding, index, group_index)

    def value(self, binding: Binding, index: int, group_index: int) -> float:
        """The ``lambda`` of one param group (computed once per epoch length).

        Raises:
            MisconfigurationException: If the group's base lr is not positive, or ``tau * S <= 1``.
        """
        key = (index, group_index)
        derived = self.derived.get(key)
        if derived is not None:
            return derived
        assert self.steps_per_epoch is not None
        optimizer = binding.bound[index].optimizer
        group = optimizer.param_groups[group_index]
        lr0 = group.get("initial_lr", group["lr"])
        name = group.get("name", f"param group {group_index}")
        if not lr0 > 0:
            raise MisconfigurationException(
                f"WeightDecay(timescale_epochs={self.tau}) needs a positive base lr, but "
                f"{type(optimizer).__name__}'s {name!r} has lr0={lr0}"
            )
        steps = max(self.steps_per_epoch, 1)
        if self.tau * steps <= 1:
            raise MisconfigurationException(
                f"WeightDecay(timescale_epochs={self.tau}) with {steps} optimizer steps per epoch would "
                "shrink the weights by 1 - 1/(tau * S) <= 0 per step: tau must exceed 1/S epochs (one step)"
            )
        derived = self.derived[key] = timescale_weight_decay(lr0, self.tau, steps)
        rank_zero_info(
            f"WeightDecay: {type(optimizer).__name__} {name!r}: lr0={lr0:g}, S={steps} steps/epoch, "
            f"tau={self.tau:g} epochs -> weight_decay={derived:.6g}"
        )
        return derived

    def for_step(self, binding: Binding, index: int) -> Coefficients:
        return lambda group_index: (self.value(binding, index, group_index), True)

    def applied(self, binding: Binding, index: int) -> dict[int, float]:
        return {gi: wd for (i, gi), wd in self.derived.items() if i == index}

    def forget(self, index: int) -> None:
        self.derived = {k: v for k, v in self.derived.items() if k[0] != index}  # its lr0 may differ

    def reset(self) -> None:
        self.derived, self.steps_per_epoch = {}, None


Source = Scheduled | TakeOver | Timescale


# ------------------------------------------------------------------------------------------- effect
class DecoupledDecay(Effect):
    """``w *= 1 - shrink`` on the decayed weights with a gradient, masked on a step the GradScaler skips.

    ``shrink`` is ``lr * wd`` (``mode="lr"``), ``lr / lr0 * wd`` (``"lr_ratio"``) or ``wd`` (``"constant"``).
    A taken-over coupled decay (torch's SGD, Adam) is applied as the L2 gradient term ``g += wd * w`` the
    optimizer would have added, after the closure (and so after clipping), inside ``step``.

    ``cautious=True``: the same factor, applied only where the update and the weight agree in sign
    (`CautiousKernel`); a coupled decay taken over is refused then (it is a gradient term, not a decay).
    """

    def __init__(self, source: Source, mode: str, cautious: bool = False) -> None:
        self.source = source
        self.cautious = CautiousKernel() if cautious else None
        # Taking over, and a timescale, decay as mode="lr".
        self.mode = mode if isinstance(source, Scheduled) else "lr"
        self.takeover = source if isinstance(source, TakeOver) else TakeOver()  # the saved `taken_over`
        self.lr_checks = TensorLrChecks()

    def prepare(self, binding: Binding, plan: Any) -> None:
        if not isinstance(self.source, TakeOver):
            self.takeover.taken = {}  # resumed from a take-over with an explicit coefficient now: it is the one

    def take_over(self, binding: Binding, index: int) -> None:
        if isinstance(self.source, TakeOver):
            self.source.take_over(binding, index)
            if self.cautious is not None and self.source.has_coupled(index):
                name = type(binding.bound[index].optimizer).__name__
                raise MisconfigurationException(
                    f"WeightDecay(weight_decay=None, cautious=True): {name}'s weight_decay is an L2 term in the "
                    "gradient (coupled), which cautious decay cannot mask. Use a decoupled optimizer (AdamW), or "
                    "give the coefficient: WeightDecay(wd, cautious=True) with the optimizer's weight_decay=0."
                )

    def before_step(self, binding: Binding, index: int) -> None:
        optimizer = binding.bound[index].optimizer
        # Fused under a GradScaler: in the step pre-hook. Cautious: there too, after gradient clipping, since
        # the update's sign depends on the clipped gradient.
        if self.cautious is None and not binding.unscaled_in_step(optimizer):
            self._decoupled(binding, index, optimizer)

    def in_step(self, binding: Binding, index: int) -> StepWork | None:
        optimizer = binding.bound[index].optimizer
        if binding.unscaled_in_step(optimizer):
            # A fused optimizer under a GradScaler decides inside `step` (it sets `found_inf`); its closure
            # has run already (Lightning's AMP plugin runs it before `step`).
            return True, lambda: self._both(binding, index, optimizer)
        if self.cautious is not None:  # after the closure, so after clipping (no coupled take-over with it)
            return False, lambda: self._decoupled(binding, index, optimizer)
        if not self.takeover.has_coupled(index):
            return None
        # The L2 term once the gradients are unscaled and clipped, before the update: where torch's own
        # SGD/Adam add it.
        return False, lambda: self._coupled(binding, index, optimizer)

    def bound_in_step(self, binding: Binding, index: int) -> None:
        # Replaced inside training_step: without a GradScaler the closure runs inside `step`, after the
        # pre-hook that adds the coupled term would have run; add it now (before clipping, this once).
        if binding.scaler is None and self.takeover.has_coupled(index):
            self._coupled(binding, index, binding.bound[index].optimizer)

    def after_step(self, binding: Binding, index: int) -> None:
        if self.cautious is not None:
            self.cautious.after_step(index)

    def forget(self, index: int) -> None:
        if self.cautious is not None:
            self.cautious.forget(index)
        self.takeover.forget(index)
        self.lr_checks.forget(index)
        if isinstance(self.source, Timescale):
            self.source.forget(index)

    def reset(self) -> None:
        if self.cautious is not None:
            self.cautious.reset()
        self.takeover.taken = {}
        self.lr_checks = TensorLrChecks()
        if not isinstance(self.source, TakeOver):
            self.source.reset()

    def applied(self, binding: Binding, index: int) -> dict[int, float] | None:
        """``group index -> coefficient`` applied at the last step of optimizer ``index`` (``None``: no step)."""
        return self.source.applied(binding, index)

    def _both(self, binding: Binding, index: int, optimizer: Optimizer) -> None:
        self._decoupled(binding, index, optimizer)
        self._coupled(binding, index, optimizer)

    def _decoupled(self, binding: Binding, index: int, optimizer: Optimizer) -> None:
        skip = binding.found_inf(optimizer)  # decay nothing on a step the GradScaler will skip
        coefficients = self.source.for_step(binding, index)
        step = binding.steps[index]
        if self.cautious is not None:
            self.cautious.start(index)
        for b in binding.buckets(index):
            coeff, decoupled = coefficients(b.group_index)
            if not coeff or not decoupled:
                continue
            group = optimizer.param_groups[b.group_index]
            lr = group["lr"]
            if self.mode == "lr_ratio":
                # A tensor lr is copied, as torch's schedulers do: a scheduler's `fill_` must not move it too.
                group.setdefault("initial_lr", lr.clone() if isinstance(lr, Tensor) else lr)
            name, initial_lr = group.get("name", b.group_index), group.get("initial_lr")
            if self.mode != "constant" and isinstance(lr, Tensor):
                self.lr_checks.check(index, b.group_index, self.mode, lr, initial_lr, coeff, name, step)
            shrink = decay_shrink(self.mode, lr, initial_lr, coeff, step, name)
            if self.mode == "lr_ratio" and not isinstance(shrink, Tensor) and shrink > coeff:
                self.lr_checks.warn_ratio(index, b.group_index, name, lr, initial_lr, coeff, step)
            factor: float | Tensor = 1.0 - shrink if skip is None else 1.0 - shrink * (1.0 - skip)
            # Like torch's AdamW: a parameter without a gradient this step (frozen, unused) is not decayed.
            if self.cautious is None:
                kernels.decay_(b.with_grads()[0], factor)
            else:
                self.cautious.decay(binding, index, optimizer, b, factor)

    def _coupled(self, binding: Binding, index: int, optimizer: Optimizer) -> None:
        """The optimizer's own (coupled) semantics, taken over: an L2 term ``wd * w`` in the gradient."""
        scale = binding.grad_scale(optimizer)
        coefficients = self.source.for_step(binding, index)
        for b in binding.buckets(index):
            coeff, decoupled = coefficients(b.group_index)
            if not coeff or decoupled:
                continue
            weights, grads, idx = b.with_grads()
            kernels.add_l2_gradient_(
                grads, weights, coeff if scale is None else scale * coeff, chunks=b.chunks_for(idx)
            )


class TensorLrChecks:
    """The factor check of a tensor lr, and the warning of ``lr_ratio`` above the initial lr, per param group.

    A tensor lr is read on the host only when it changes (another tensor, an in-place update: a scheduler's
    ``fill_`` bumps ``_version``, or another coefficient): one host sync then, none on the steps between.
    """

    def __init__(self) -> None:
        # (optimizer, group) -> (lr tensor, its version, initial lr, its version, coefficient) of the last pass.
        self.checked: dict[tuple[int, int], tuple[Any, ...]] = {}
        self.ratio_warned: set[tuple[int, int]] = set()

    def forget(self, index: int) -> None:
        self.checked = {k: v for k, v in self.checked.items() if k[0] != index}

    def check(
        self, index: int, group_index: int, mode: str, lr: Tensor, initial_lr: Any, coeff: float, name: Any, step: int
    ) -> None:
        """Refuse a factor ``<= 0`` before it is applied, as for a float lr (the values the next steps use)."""
        key = (index, group_index)
        base_version = initial_lr._version if isinstance(initial_lr, Tensor) else None
        last = self.checked.get(key)
        same = last is not None and last[0] is lr and last[2] is initial_lr
        if same and (last[1], last[3], last[4]) == (lr._version, base_version, coeff):  # type: ignore[index]
            return
        lr0 = float(initial_lr) if isinstance(initial_lr, Tensor) else initial_lr
        shrink = decay_shrink(mode, float(lr), lr0, coeff, step, name)
        # Recorded once passed, so a refused lr is checked again at the next step.
        self.checked[key] = (lr, lr._version, initial_lr, base_version, coeff)
        if mode == "lr_ratio" and shrink > coeff:
            self.warn_ratio(index, group_index, name, float(lr), lr0, coeff, step)

    def warn_ratio(
        self, index: int, group_index: int, name: Any, lr: Any, initial_lr: Any, coeff: float, step: int
    ) -> None:
        """Once per param group: ``mode="lr_ratio"`` with the lr above its initial value shrinks more than ``wd``."""
        if (index, group_index) in self.ratio_warned:
            return
        self.ratio_warned.add((index, group_index))
        ratio = lr / initial_lr
        rank_zero_warn(
            f"WeightDecay(mode='lr_ratio'): param group {name!r} has lr {lr:g} = {ratio:.4g} x its initial lr "
            f"{initial_lr:g} at step {step}, so the weights shrink by {ratio:.4g} * weight_decay = "
            f"{ratio * coeff:.4g} per step, more than weight_decay={coeff:g} (the shrink at the initial lr). "
            "A scheduler raising the lr above its initial value (OneCycleLR, CyclicLR, a warm-up factor > 1) "
            "does this; use mode='lr', or a weight_decay meant for the initial lr. (Said once per group.)"
        )


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
    host; `TensorLrChecks` checks its value on the host when the tensor changes.

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
