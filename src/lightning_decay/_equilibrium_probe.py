"""The monitor's equilibrium probe: the decay that really applies to each monitored tensor, and its prediction.

For ``WeightNormMonitor(log_equilibrium=True)``. The predicted rotational equilibrium of a tensor
(``lightning_decay.equilibrium``) depends on its param group (lr as the step used it, momentum, betas, the
optimizer's own ``weight_decay``) and on the decay applied to it from outside: a ``WeightDecay`` bound to
the same optimizer (its `DecoupledDecay` effect's coefficient of the last step, in every mode, schedule and
take-over; a taken-over coupled decay is an L2 gradient term) and a ``WeightPenalty`` whose ``l2`` pulls
toward zero (a coupled L2 term). Both are found through the optimizer's registry of bindings
(``lightning_decay._binding.bound_to``), never through a list of callbacks, so the same works under a Trainer
and attached. Which parameters each binding works on is read once per layout and set of bindings; a logging
step then does host arithmetic per distinct (param group, sources) only, never per parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer

from lightning_decay._binding import Binding, Bucket, bound_to
from lightning_decay._compat import rank_zero_warn
from lightning_decay._decay_effect import DecoupledDecay, TakeOver
from lightning_decay._monitor_layout import Layout
from lightning_decay._penalty_effect import GradientPenalty, coefficient
from lightning_decay.equilibrium import Prediction, lr_mode_coefficient, predict_from_param_group

__all__ = ["BucketPrediction", "EquilibriumProbe"]

#: One outside source of decay on a parameter: the binding, the optimizer's index in it, and its bucket there.
Source = tuple[Binding, int, Bucket]
#: Where a parameter is stepped and decayed: (optimizer index in the run, param group index, outside sources).
Place = tuple[int, int, tuple[Source, ...]]


@dataclass(frozen=True)
class BucketPrediction:
    """The prediction logged for one bucket (host floats of the logging step)."""

    bucket: int
    prediction: Prediction
    lr: float
    weight_decay: float  # the decay coefficient: decoupled (as ``mode="lr"``) plus coupled


class EquilibriumProbe:
    """Per logging step, the predicted equilibrium angle of every monitored bucket whose weights decay."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.key: tuple[Any, ...] | None = None
        # The distinct (index of the optimizer in the run, param group index, outside sources) of the positions,
        # and per bucket the places of its members (a prediction is per place, few per run).
        self.places: dict[tuple[Any, ...], Place] = {}  # by (optimizer, group, ids of the source buckets)
        self.bucket_keys: dict[int, list[tuple[Any, ...]]] = {}
        self.warned: set[tuple[int, int]] = set()

    def reset(self) -> None:
        self.key = None
        self.places, self.bucket_keys = {}, {}

    def predictions(self, layout: Layout, binding: Binding, lrs: dict[int, list[float]]) -> list[BucketPrediction]:
        """The prediction of each bucket whose decayed members share one (param group, decay); none for the others.

        A member decays when its decay coefficient (the optimizer's own plus the outside sources') is not zero.
        A param group whose prediction has no closed form (coupled L2 inside Adam/RMSprop) is left out, with a
        warning once per group saying why.
        """
        optimizers = [entry.optimizer for entry in binding.bound]
        self._ensure_places(layout, binding)
        per_place = {key: self._predict(optimizers, place, lrs) for key, place in self.places.items()}
        out = []
        for bucket, keys in self.bucket_keys.items():
            decayed = [per_place[key] for key in keys if per_place[key] is not None]
            if len(decayed) == 1:  # members in several groups, or decayed differently: no one prediction
                prediction, lr, wd = decayed[0]  # type: ignore[misc]
                out.append(BucketPrediction(bucket, prediction, lr, wd))
        return out

    def _predict(
        self, optimizers: Sequence[Optimizer], place: Place, lrs: dict[int, list[float]]
    ) -> tuple[Prediction, float, float] | None:
        opt_index, group_index, sources = place
        optimizer = optimizers[opt_index]
        group = optimizer.param_groups[group_index]
        known = lrs.get(id(optimizer))
        lr = known[group_index] if known is not None and group_index < len(known) else float(group["lr"])
        decoupled, coupled, reason = outside_decay(sources, lr, group)
        own = float(group.get("weight_decay", 0.0) or 0.0)
        if not (decoupled or coupled or own):
            return None  # not decayed: no equilibrium to predict
        if reason:
            self._warn(opt_index, group_index, optimizer, reason)
            return None
        prediction = predict_from_param_group({**group, "lr": lr}, optimizer, decoupled, coupled)
        if prediction.angle is None:
            self._warn(opt_index, group_index, optimizer, prediction.reason)
            return None
        return prediction, lr, decoupled + coupled + own

    def _warn(self, opt_index: int, group_index: int, optimizer: Optimizer, reason: str) -> None:
        if (opt_index, group_index) in self.warned:
            return
        self.warned.add((opt_index, group_index))
        name = optimizer.param_groups[group_index].get("name", f"param group {group_index}")
        rank_zero_warn(
            f"{self.owner}(log_equilibrium=True): no angular_update_equilibrium for {type(optimizer).__name__}'s "
            f"{name!r}: {reason}. Nothing is logged for its tensors (said once per group)."
        )

    def _ensure_places(self, layout: Layout, binding: Binding) -> None:
        """Where each position is stepped and what decays it from outside: once per layout and set of bindings."""
        optimizers = [entry.optimizer for entry in binding.bound]
        registries = [tuple(sorted(id(b) for b in bound_to(opt))) for opt in optimizers]
        key = (layout.signature, tuple(registries))
        if key == self.key:
            return
        position = {id(p): i for i, p in enumerate(layout.params)}
        places: list[Place | None] = [None] * len(layout.params)
        for opt_index, entry in enumerate(binding.bound):  # the monitor's own buckets: every parameter stepped
            outside = _outside_sources(entry.optimizer)
            for bucket in entry.buckets:
                for p in bucket.params:
                    i = position.get(id(p))
                    if i is not None and places[i] is None:  # a parameter shared by two: its first optimizer
                        places[i] = (opt_index, bucket.group_index, outside.get(id(p), ()))
        self.places, bucket_keys = {}, {}
        for i, place in enumerate(places):
            bucket = layout.bucket_of[i]
            if place is not None and bucket is not None:
                place_key = (place[0], place[1], tuple(id(s[2]) for s in place[2]))
                self.places.setdefault(place_key, place)
                bucket_keys.setdefault(bucket, {})[place_key] = None
        self.key = key
        self.bucket_keys = {bucket: list(keys) for bucket, keys in bucket_keys.items()}


def _outside_sources(optimizer: Optimizer) -> dict[int, tuple[Source, ...]]:
    """``id(param)`` -> the bindings on ``optimizer`` whose buckets hold it (each with its bucket)."""
    found: dict[int, list[Source]] = {}
    for binding in list(bound_to(optimizer)):
        index = binding.index_of(optimizer)
        if index is None or not any(isinstance(e, (DecoupledDecay, GradientPenalty)) for e in binding.effects):
            continue  # not bound there, or decays nothing (the monitor's own binding)
        for bucket in binding.bound[index].buckets:
            for p in bucket.params:
                found.setdefault(id(p), []).append((binding, index, bucket))
    return {k: tuple(v) for k, v in found.items()}


def outside_decay(sources: Sequence[Source], lr: float, group: dict[str, Any]) -> tuple[float, float, str]:
    """``(decoupled, coupled, reason)`` applied to a parameter by its bindings at the last step.

    ``decoupled`` is the ``mode="lr"`` coefficient of a ``WeightDecay`` (``lr_mode_coefficient`` of its mode),
    ``coupled`` the L2 term of a taken-over SGD/Adam decay or of a ``WeightPenalty(l2)`` toward zero.
    ``reason`` is non-empty where no closed form applies (cautious decay masks part of it).
    """
    decoupled = coupled = 0.0
    for binding, index, bucket in sources:
        for effect in binding.effects:
            if isinstance(effect, DecoupledDecay):
                applied = effect.applied(binding, index) or {}
                value = float(applied.get(bucket.group_index, 0.0))
                if not value:
                    continue
                if effect.cautious is not None:
                    return 0.0, 0.0, "cautious weight decay decays only where update and weight agree in sign"
                is_decoupled = True
                if isinstance(effect.source, TakeOver):
                    is_decoupled = effect.source.taken.get((index, bucket.group_index), (0.0, True))[1]
                if is_decoupled:
                    initial = float(group.get("initial_lr", lr))
                    decoupled += lr_mode_coefficient(effect.mode, value, lr, initial)
                else:
                    coupled += value
            elif isinstance(effect, GradientPenalty) and bucket.refs is None:  # L2-SP pulls toward a reference
                schedule = effect.l2_head if bucket.tag == "head" else effect.l2
                step = max(binding.steps[index] - 1, 0)  # the step just taken (counted in its post-hook)
                coupled += coefficient(schedule, step, "l2")
    return decoupled, coupled, ""
