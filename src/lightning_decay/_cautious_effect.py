"""The masked kernel of ``WeightDecay(cautious=True)``: decay only where the update and the weight agree in sign.

`DecoupledDecay` computes each bucket's factor from its coefficient source and mode as always, and hands the
bucket to `CautiousKernel` instead of ``kernels.decay_``. Per bucket the kernel takes one of two paths:

- a known direction (`lightning_decay.directions.direction`, read from the optimizer's state and this
  step's gradient before the step): `cautious.cautious_decay_` right away, no copy of the weights;
- otherwise the measured update: a copy of the decayed weights before the step, and
  `cautious.measured_cautious_decay_` in the step post-hook, which runs only on a step that really ran.

Which path each optimizer's param group takes, and why, is logged once. The share of decayed entries the
mask let through is kept on the device, only on the steps the adapter asks for it (its logging steps).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_decay._binding import Binding, Bucket
from lightning_decay._compat import rank_zero_info
from lightning_decay.cautious import cautious_chunks, cautious_decay_, held_tensors, measured_cautious_decay_
from lightning_decay.directions import Direction, StateCache, direction

__all__ = ["CautiousKernel"]

#: One bucket's measured path in flight: (group index, weights after the step, their copy before it, factor).
Pending = tuple[int, list[Tensor], list[Tensor], Any]


class CautiousKernel:
    """Cautious decay of one bucket at a time, with the path each optimizer's param group takes said once."""

    def __init__(self) -> None:
        self.want_fraction = False  # set by the adapter before a logging step's optimizer step
        self.announced: set[tuple[int, int, bool]] = set()  # (optimizer, group, known direction)
        self.pending: dict[int, list[Pending]] = {}  # optimizer -> its buckets on the measured path this step
        # (optimizer, group) -> (share, entries) of each bucket at the last step that computed them.
        self.fractions: dict[tuple[int, int], list[tuple[Tensor, int]]] = {}
        self.chunks: dict[int, tuple[Bucket, int, list[tuple[int, ...]]]] = {}  # id(bucket) -> its chunks
        self.states: dict[int, tuple[Bucket, StateCache]] = {}  # id(bucket) -> its optimizer-state look-ups

    def start(self, index: int) -> None:
        """A new step of optimizer ``index``: the last step's snapshots (a skipped step's) and shares go."""
        self.pending.pop(index, None)
        if self.want_fraction:
            self.fractions = {k: v for k, v in self.fractions.items() if k[0] != index}

    def decay(self, binding: Binding, index: int, optimizer: Optimizer, bucket: Bucket, factor: Any) -> None:
        """Before the step: the masked decay of ``bucket``'s weights with a gradient, or their snapshot."""
        weights, grads, idx = bucket.with_grads()
        if not weights:
            return
        group = optimizer.param_groups[bucket.group_index]
        if len(idx) == len(bucket.params):
            cache = self._states(bucket, grads)
            found = direction(optimizer, group, bucket.params, cache=cache)
            cache.grads = None  # the Direction holds them for this step; kept longer, zero_grad could not free them
        else:  # a subset (parameters without a gradient this step): looked up afresh
            found = direction(optimizer, group, [bucket.params[i] for i in idx])
        self._announce(index, bucket.group_index, optimizer, group, found, weights)
        if isinstance(found, Direction):
            chunks = self._chunks(bucket, weights, idx, held_tensors(found, weights, factor) - 1)
            share = cautious_decay_(weights, found, factor, chunks=chunks, fraction=self.want_fraction)
            self._keep(index, bucket.group_index, share, weights)
        else:
            before = torch._foreach_clone(weights)  # the one copy of the measured path
            self.pending.setdefault(index, []).append((bucket.group_index, weights, before, factor))

    def after_step(self, index: int) -> None:
        """The step ran: the measured path's decay, from the weights before it, then the copy is freed."""
        for group_index, weights, before, factor in self.pending.pop(index, []):
            share = measured_cautious_decay_(weights, before, factor, fraction=self.want_fraction)
            self._keep(index, group_index, share, weights)

    def shares(self, index: int) -> dict[int, Tensor]:
        """``group index -> share`` (a 0-dim device tensor) of optimizer ``index`` at its last logging step."""
        out: dict[int, Tensor] = {}
        for (i, gi), parts in self.fractions.items():
            if i == index and parts:
                total = sum(n for _, n in parts)
                out[gi] = torch.stack([s * (n / total) for s, n in parts]).sum()
        return out

    def forget(self, index: int) -> None:
        self.pending.pop(index, None)
        self.announced = {k for k in self.announced if k[0] != index}
        self.fractions = {k: v for k, v in self.fractions.items() if k[0] != index}
        self.chunks, self.states = {}, {}  # a rebuilt optimizer: its state is another

    def reset(self) -> None:
        self.pending, self.fractions, self.chunks, self.announced, self.states = {}, {}, {}, set(), {}
        self.want_fraction = False

    def _states(self, bucket: Bucket, grads: list[Tensor]) -> StateCache:
        """The bucket's `StateCache` (one per bucket: rebuilt buckets are new objects), with this step's gradients."""
        cached = self.states.get(id(bucket))
        if cached is None or cached[0] is not bucket:
            cached = self.states[id(bucket)] = (bucket, StateCache(bucket.params))
        cached[1].grads = grads
        return cached[1]

    def _keep(self, index: int, group_index: int, share: Tensor | None, weights: list[Tensor]) -> None:
        if share is not None:
            self.fractions.setdefault((index, group_index), []).append((share, sum(w.numel() for w in weights)))

    def _chunks(self, bucket: Bucket, weights: list[Tensor], idx: list[int], temporaries: int) -> Any:
        """The bucket's chunks for ``temporaries`` (computed once per bucket when every weight has a gradient)."""
        if len(idx) != len(bucket.params):
            return None  # a subset: chunked by the kernel itself
        cached = self.chunks.get(id(bucket))
        if cached is None or cached[0] is not bucket or cached[1] != temporaries:
            cached = self.chunks[id(bucket)] = (bucket, temporaries, cautious_chunks(weights, temporaries))
        return cached[2]

    def _announce(
        self, index: int, group_index: int, optimizer: Optimizer, group: dict[str, Any], found: Any, weights: list
    ) -> None:
        known = isinstance(found, Direction)
        if (index, group_index, known) in self.announced:
            return
        self.announced.add((index, group_index, known))
        where = f"WeightDecay(cautious=True): {type(optimizer).__name__} param group {group.get('name', group_index)!r}"
        if known:
            rank_zero_info(f"{where}: the update's sign read from the optimizer's state before its step (exact)")
            return
        size = sum(w.numel() * w.element_size() for w in weights)
        rank_zero_info(
            f"{where}: the update measured from the weights before and after its step (exact; one copy of the "
            f"decayed weights, {size / 2**20:.3g} MiB), because {found}"
        )
