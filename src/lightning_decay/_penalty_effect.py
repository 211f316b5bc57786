"""Penalties as effects: the gradient of ``l1 * |w| + l2 / 2 * ||w - w0||^2`` before the step, proximal L1 after.

`GradientPenalty` adds ``l2 * (w - w0) + l1 * sign(w)`` to the gradients of the decayed weights once they
are final (``w0``: the bucket's L2-SP references, or zero), `ProximalL1` soft-thresholds the weights after
each step that ran. `penalty_values` measures the current penalty with one host copy. No Trainer here.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_decay import kernels
from lightning_decay._binding import Binding, Effect
from lightning_decay._host import NonFiniteWarnings, to_host
from lightning_decay.schedules import Constant, Schedule, check_coefficient

__all__ = ["GradientPenalty", "ProximalL1", "penalty_values", "uses"]


def uses(schedule: Any) -> bool:
    """Whether a coefficient can be non-zero."""
    return not (isinstance(schedule, Constant) and schedule.value == 0.0)


def coefficient(schedule: Schedule, step: int, argument: str) -> float:
    """The schedule's value at ``step``, validated (a schedule may not return a negative value)."""
    return check_coefficient(schedule(step), argument, step)


class GradientPenalty(Effect):
    """The penalty's gradient, added where the gradient of a loss term would be (before clipping).

    ``l1`` is ``None`` with proximal L1 (applied after the step instead). The ``"head"`` buckets get
    ``l2_head`` toward zero, the others ``l2`` toward their references (or zero).
    """

    def __init__(self, l2: Schedule, l2_head: Schedule, l1: Schedule | None) -> None:
        self.l2, self.l2_head, self.l1 = l2, l2_head, l1

    def before_step(self, binding: Binding, index: int) -> None:
        step = binding.steps[index]
        l2 = coefficient(self.l2, step, "l2")
        l2_head = coefficient(self.l2_head, step, "l2_head")
        l1 = coefficient(self.l1, step, "l1") if self.l1 is not None else 0.0
        scale = binding.grad_scale(binding.bound[index].optimizer)  # fused optimizers: still scaled here
        for b in binding.buckets(index):
            c2 = l2_head if b.tag == "head" else l2
            if not (c2 or l1):
                continue
            weights, grads, idx = b.with_grads()
            if not grads:
                continue
            # The bucket's chunks index all its parameters; for the few steps where some have no
            # gradient, the kernels chunk the subset themselves.
            full = len(idx) == len(b.params)
            chunks = b.chunks if full else None
            if c2:
                refs = b.refs if b.refs is None or full else [b.refs[i] for i in idx]
                kernels.add_l2_gradient_(grads, weights, c2 if scale is None else scale * c2, refs, chunks)
            if l1:
                kernels.add_l1_subgradient_(grads, weights, l1 if scale is None else scale * l1, chunks)


class ProximalL1(Effect):
    """``w <- sign(w) * max(|w| - lr * l1, 0)`` after each step that ran, on the parameters it stepped."""

    def __init__(self, l1: Schedule) -> None:
        self.l1 = l1

    def after_step(self, binding: Binding, index: int) -> None:
        l1 = coefficient(self.l1, binding.steps[index], "l1")
        if not l1:
            return
        optimizer = binding.bound[index].optimizer
        for b in binding.buckets(index):
            lr = optimizer.param_groups[b.group_index]["lr"]
            # Only the parameters the optimizer stepped (those with a gradient): a frozen or unused one is
            # left alone, as the optimizer leaves it. The gradients are still there (zero_grad comes after
            # the step). In the bucket's precomputed chunks when all have one: the temporary is one chunk.
            weights, _, idx = b.with_grads()
            if weights:
                kernels.soft_threshold_(weights, lr * l1, b.chunks_for(idx))


def penalty_values(
    binding: Binding, l1: Schedule | None, l2: Schedule | None, l2_head: Schedule, warnings: NonFiniteWarnings
) -> dict[str, float]:
    """``penalty/l1`` and ``penalty/l2`` of the bound weights now, with one device-to-host copy.

    ``l1`` / ``l2`` are ``None`` when unused. Under FSDP2 the per-shard sums are added across ranks with one
    all-reduce (every rank must call), a replicated parameter's (HSDP) from one replica only.
    """
    local_parts: list[Tensor] = []
    sharded_parts: list[Tensor] = []
    sharded_counted: list[Tensor] = []
    names: list[str] = []
    sharded_names: list[str] = []
    coeffs: list[tuple[str, float]] = []
    sharded_coeffs: list[tuple[str, float]] = []
    for index, b in binding.all_buckets():
        step = binding.steps[index]
        weights = b.weights()
        parts, nm, cf = (sharded_parts, sharded_names, sharded_coeffs) if b.sharded else (local_parts, names, coeffs)
        if l2 is not None:
            head = b.tag == "head"
            c2 = coefficient(l2_head if head else l2, step, "l2_head" if head else "l2")
            parts += kernels.squared_distances(weights, b.refs, b.chunks)
            nm += b.names
            cf += [("penalty/l2", c2 / 2)] * len(weights)
        if l1 is not None:
            c1 = coefficient(l1, step, "l1")
            parts += kernels.sum_abs(weights)
            nm += b.names
            cf += [("penalty/l1", c1)] * len(weights)
        if b.counted is not None:  # a sharded bucket, once per kind of part it added above
            sharded_counted += [b.counted] * ((l1 is not None) + (l2 is not None))
    host = to_host(local_parts, sharded_parts, sharded_counted)
    warnings.check(names + sharded_names, host)
    out = {k: 0.0 for k in (["penalty/l1"] if l1 is not None else []) + (["penalty/l2"] if l2 is not None else [])}
    for (key, c), v in zip(coeffs + sharded_coeffs, host, strict=True):
        out[key] += c * v
    return out
