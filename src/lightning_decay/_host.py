"""The one device-to-host copy of a logging step, and the warning about non-finite values it may show.

Shared by the regularizers (penalty values, the non-finite check of decayed weights) and the monitor (all
its metrics): values are gathered on the device, stacked, copied once, and split back on the host.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_decay import kernels
from lightning_decay._compat import rank_zero_warn
from lightning_decay.norms import all_reduce_partials

__all__ = ["NonFiniteWarnings", "split_to_host", "to_host"]


def split_to_host(tensors: Sequence[Tensor]) -> list[list[float]]:
    """1-D tensors on one device to Python lists, with one copy: concatenated, copied, split by their sizes."""
    host = torch.cat(list(tensors)).tolist() if tensors else []
    out: list[list[float]] = []
    start = 0
    for t in tensors:
        n = t.numel()
        out.append(host[start : start + n])
        start += n
    return out


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


class NonFiniteWarnings:
    """Warn once per (kind, parameter) whose value on the host is NaN or Inf; training goes on."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.seen: set[tuple[str, str]] = set()

    def check(
        self, names: Sequence[str], values: Sequence[float], kind: str = "weights", step: int | None = None
    ) -> None:
        """``names[i]`` has ``values[i]``; ``kind`` says of what (``"weights"``, ``"weight norm"``...)."""
        if math.isfinite(sum(values)):  # one C-level pass in the usual case (sums of finite values >= 0)
            return
        for name, value in zip(names, values, strict=True):
            if not math.isfinite(value) and (kind, name) not in self.seen:
                self.seen.add((kind, name))
                rank_zero_warn(self._message(kind, name, value, step))

    def _message(self, kind: str, name: str, value: float, step: int | None) -> str:
        if step is None:
            return f"{self.owner}: parameter {name!r} has non-finite values ({value})"
        return (
            f"{self.owner}: the {kind} of parameter {name!r} is {value} at step {step}. "
            "It is logged as is; this warning is shown once per parameter."
        )

    def check_buckets(self, buckets: Iterable[Any]) -> None:
        """Check the weights of ``buckets`` (``Bucket`` objects) with one host copy; every rank must call."""
        local_parts: list[Tensor] = []
        sharded_parts: list[Tensor] = []
        names: list[str] = []
        sharded_names: list[str] = []
        for b in buckets:
            if b.sharded:
                sharded_parts += kernels.sum_abs(b.weights())
                sharded_names += b.names
            else:
                local_parts += kernels.sum_abs(b.weights())
                names += b.names
        self.check(names + sharded_names, to_host(local_parts, sharded_parts))

    def clear(self) -> None:
        self.seen = set()
