"""What ``WeightNormMonitor`` knows about the parameters it measures, built once per version of its binding.

The *layout* is everything about the monitored parameters that does not change between logging steps:
the parameters in a fixed order, the bucket (parameter, module or block) each one is logged under, the
positions each optimizer steps, the (device, dtype) split of the weights, the masks of the totals and
of the replicas that sit out a SUM reduction, and the index tensors that combine partials into buckets.
Building it walks every parameter in Python; a logging step then works on these lists and tensors with a
few foreach kernels and no per-parameter Python work, which is what keeps the monitor's cost near that of
a bare ``torch._foreach_norm``. Which parameters each optimizer steps comes from the monitor's
``lightning_decay._binding.Binding`` (the engine's bucket index, with its one signature check), and the
layout is rebuilt only when the binding's buckets are (`layout_signature`: ``BaseFinetuning`` adding a
param group, optimizers replaced or rebuilt mid-fit).

Also here: `Pending`, what one logging step gathers before the optimizer step, and `reduce_pieces`,
the one cross-rank reduction of a step, which needs the layout's replica mask. Nothing here depends on
Lightning: the callback passes in the plan, the binding, the device and how a name maps to a bucket.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_decay import norms as K
from lightning_decay._binding import Binding
from lightning_decay.plan import DecayPlan

__all__ = [
    "BucketName",
    "Layout",
    "Pending",
    "Pieces",
    "Subset",
    "build_layout",
    "reduce_pieces",
]

BucketName = Callable[[str, tuple[str, ...]], str | None]
"""``(name, aliases) -> bucket name``, or ``None`` for a parameter that counts only in the totals."""

Pieces = dict[str, tuple[Tensor, Tensor | None, str]]
"""Partials of a step by key: (1-D partials, their positions in the layout or ``None`` for all, reduce op)."""


@dataclass
class Subset:
    """Index tensors (built once, cached) mapping a list of parameter positions to buckets."""

    idx: Tensor  # positions into the layout's parameters
    members: Tensor  # positions into the subset that belong to a bucket
    buckets: Tensor  # compact bucket id of each member
    names: list[str]  # compact bucket id -> bucket name
    keys: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def metric_keys(self, metric: str, sep: str) -> list[str]:
        """``f"{metric}{sep}{name}"`` for every bucket, built once (not per tensor per logging step)."""
        cached = self.keys.get((metric, sep))
        if cached is None:
            cached = self.keys[(metric, sep)] = [f"{metric}{sep}{name}" for name in self.names]
        return cached


@dataclass
class Layout:
    """Everything about the monitored parameters that only changes when the optimizers change."""

    params: list[Tensor]
    names: list[str]
    bucket_names: list[str]
    bucket_of: list[int | None]
    opt_indices: dict[int, list[int]]
    device: torch.device
    dtype: torch.dtype
    sharded: bool
    contrib: Tensor | None
    local_numel: Tensor
    global_numel: Tensor
    signature: tuple[Any, ...]
    # Decided once: with no DTensor the parameters are their own local tensors, so their (device,
    # dtype) split is kept and a logging step does no per-tensor Python work for them.
    weight_groups: K.TensorGroups | None  # None when some parameter is a DTensor
    total_mask: Tensor  # (rows, params) bool: all, then the decay / no-decay groups that are not empty
    total_names: list[str]  # "total", "decay_total", "no_decay_total" for the rows of ``total_mask``
    zero: Tensor  # a 0-dim ``dtype`` zero on ``device`` (``where`` takes it faster than a Python 0.0)
    everything: tuple[int, ...]  # every position, the key of the subset of all parameters
    in_order: list[int]  # every position, as a list (what a step's positions are compared with)
    subsets: dict[tuple[int, ...], Subset] = field(default_factory=dict)
    keys: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    all_params: Subset | None = None
    # The kept snapshot (``keep_snapshot=True``): one buffer per position, allocated at its first snapshot and
    # reused at every logging step after, so a snapshot is a copy into memory already mapped (no allocation, no
    # page faults on fresh pages); the lists per set of positions are built once.
    snap_buffers: dict[int, Tensor] = field(default_factory=dict)
    snap_lists: dict[tuple[int, ...], list[Tensor]] = field(default_factory=dict)

    def mirror(self, tensors: list[Tensor], positions: list[int]) -> list[Tensor] | K.TensorGroups:
        """``tensors`` (one per position: gradients, a snapshot) split like the parameters when they are all of
        them in layout order and the parameters are one (device, dtype) group, so the kernels do not group them
        again (no per-tensor work); else as given (the kernels group them)."""
        groups = self.weight_groups
        if groups is not None and groups.simple and len(positions) == len(self.params) and positions == self.in_order:
            return groups.like(tensors)
        return tensors

    def snapshot(self, positions: list[int], keep: bool = True) -> list[Tensor]:
        """Copies of the (local) parameters at ``positions``: one foreach kernel per (device, dtype) group.

        ``keep``: copied into buffers kept by the layout (at most one copy of the monitored weights, held
        between logging steps); else freshly allocated copies, freed once the step is logged.
        """
        sources = self.local([self.params[i] for i in positions])
        mirrored = self.mirror(sources, positions)
        if keep:
            buffers = self.snapshot_buffers(positions, sources)
            if isinstance(mirrored, K.TensorGroups):  # one (device, dtype) group: no grouping again
                torch._foreach_copy_(buffers, sources)
            else:
                K.copy_tensors_(buffers, sources)
            return list(buffers)
        return mirrored.clone() if isinstance(mirrored, K.TensorGroups) else K.clone_tensors(sources)

    def snapshot_buffers(self, positions: list[int], sources: list[Tensor]) -> list[Tensor]:
        """The kept buffers of ``positions`` (``sources``: their local tensors, for shapes), made on first use."""
        key = self.everything if positions is self.in_order else tuple(positions)
        cached = self.snap_lists.get(key)
        resized = self.weight_groups is None and cached is not None  # only a shard's local tensor can change
        if resized:
            resized = any(b.shape != s.shape for b, s in zip(cached, sources, strict=True))  # type: ignore[arg-type]
        if cached is None or resized:
            for i, source in zip(positions, sources, strict=True):
                buffer = self.snap_buffers.get(i)
                if buffer is None or buffer.shape != source.shape:  # (a shard resized: a new buffer)
                    self.snap_buffers[i] = torch.empty_like(source, memory_format=torch.preserve_format)
            cached = self.snap_lists[key] = [self.snap_buffers[i] for i in positions]
        return cached

    @staticmethod
    def subtract_(a: list[Tensor] | K.TensorGroups, b: list[Tensor] | K.TensorGroups) -> None:
        """``a -= b`` tensor by tensor, ``a`` and ``b`` both from `mirror` of the same positions."""
        if isinstance(a, K.TensorGroups):
            a.sub_(b)  # type: ignore[arg-type]
        else:
            K.sub_tensors_(a, b)  # type: ignore[arg-type]

    def local(self, tensors: list[Tensor]) -> list[Tensor]:
        """The local tensors of ``tensors`` (parameters or gradients of the layout): themselves without DTensors."""
        return tensors if self.weight_groups is not None else [K.local_tensor(t) for t in tensors]

    def subset_of_all(self) -> Subset:
        """``subset(everything)``, without hashing a tuple of every position at each logging step."""
        if self.all_params is None:
            self.all_params = self.subset(self.everything)
        return self.all_params

    def total_keys(self, metric: str, sep: str) -> list[str]:
        """``f"{metric}{sep}{total}"`` for every row of ``total_mask``, built once."""
        cached = self.keys.get((metric, sep))
        if cached is None:
            cached = self.keys[(metric, sep)] = [f"{metric}{sep}{name}" for name in self.total_names]
        return cached

    def subset(self, positions: tuple[int, ...]) -> Subset:
        """The `Subset` of these parameter positions, built on first use and cached.

        The positions of a step's gradients or snapshots are the same from one logging step to the
        next, so their index tensors are made once.
        """
        cached = self.subsets.get(positions)
        if cached is None:
            compact: dict[int, int] = {}
            members, buckets = [], []
            for j, i in enumerate(positions):
                b = self.bucket_of[i]
                if b is not None:
                    members.append(j)
                    buckets.append(compact.setdefault(b, len(compact)))
            cached = Subset(
                idx=torch.tensor(positions, dtype=torch.long, device=self.device),
                members=torch.tensor(members, dtype=torch.long, device=self.device),
                buckets=torch.tensor(buckets, dtype=torch.long, device=self.device),
                names=[self.bucket_names[b] for b in compact],
            )
            self.subsets[positions] = cached
        return cached


@dataclass
class Pending:
    """What a logging step has gathered between ``on_before_optimizer_step`` and ``on_train_batch_end``."""

    batch: int
    step: int
    seen: set[int] = field(default_factory=set)
    grad_idx: list[int] = field(default_factory=list)
    grad_parts: list[Tensor] = field(default_factory=list)
    snap_idx: list[int] = field(default_factory=list)
    snapshots: list[Tensor] = field(default_factory=list)
    # ``log_equilibrium``: the lr of each param group as the step used it (``id(optimizer)`` -> one per group),
    # and the scale-invariance scores ``|cos(grad, w)| * sqrt(numel)`` of the positions ``score_idx``.
    lrs: dict[int, list[float]] = field(default_factory=dict)
    score_idx: list[int] = field(default_factory=list)
    scores: list[Tensor] = field(default_factory=list)


def build_layout(
    plan: DecayPlan,
    binding: Binding,
    device: torch.device,
    bucket_name: BucketName,
    include_frozen: bool,
) -> Layout:
    """Lay out the parameters of ``plan`` for the monitor: once, not per logging step.

    Args:
        plan: The decisions of every parameter, frozen ones included (they split the decay totals).
        binding: The monitor's binding to the run's optimizers: its buckets say which positions each one steps.
        device: Where the index tensors and all results live (the strategy's root device).
        bucket_name: The bucket a parameter is logged under, from its name and tied aliases.
        include_frozen: Also lay out parameters with ``requires_grad=False``.

    Returns:
        The `Layout`, with the `signature` of ``binding`` it was built for.
    """
    decisions = [d for d in plan if include_frozen or d.param.requires_grad]
    params = [d.param for d in decisions]
    names = [d.name for d in decisions]
    bucket_names, bucket_of = _buckets(decisions, bucket_name)
    binding.refresh()  # the binding's one signature check, before its buckets are read
    opt_indices = _positions(params, binding)

    dtype = K.wide_dtype(device)
    sharded = any(K.is_sharded(p) for p in params)
    contrib = None
    if sharded:
        contrib = torch.tensor([K.contributes_to_sum(p) for p in params], dtype=torch.bool, device=device)
    decay_flags = [plan.is_decayed(p) for p in params]
    # No DTensor at all (sharded or replicated): the parameters are their own local tensors.
    plain = all(K.local_tensor(p) is p for p in params)
    rows = [[True] * len(params)]
    total_names = ["total"]
    for g, name in enumerate(("decay_total", "no_decay_total")):
        flags = [f == (g == 0) for f in decay_flags]
        if any(flags):  # a total is left out if its group is empty
            rows.append(flags)
            total_names.append(name)
    weight_groups = K.TensorGroups(params, device) if plain else None
    return Layout(
        params=params,
        names=names,
        bucket_names=bucket_names,
        bucket_of=bucket_of,
        opt_indices=opt_indices,
        device=device,
        dtype=dtype,
        sharded=sharded,
        contrib=contrib,
        local_numel=torch.tensor([K.local_tensor(p).numel() for p in params], dtype=dtype, device=device),
        global_numel=torch.tensor([p.numel() for p in params], dtype=dtype, device=device),
        signature=layout_signature(binding),
        weight_groups=weight_groups,
        total_mask=torch.tensor(rows, dtype=torch.bool, device=device).reshape(len(rows), len(params)),
        total_names=total_names,
        zero=torch.zeros((), dtype=dtype, device=device),
        everything=tuple(range(len(params))),
        in_order=list(range(len(params))),
    )


def _buckets(decisions: Sequence[Any], bucket_name: BucketName) -> tuple[list[str], list[int | None]]:
    """The bucket names in order of first appearance, and the bucket of each parameter (``None``: totals only)."""
    bucket_names: list[str] = []
    bucket_ids: dict[str, int] = {}
    bucket_of: list[int | None] = []
    for d in decisions:
        bucket = bucket_name(d.name, d.aliases)
        if bucket is None:
            bucket_of.append(None)
        else:
            if bucket not in bucket_ids:
                bucket_ids[bucket] = len(bucket_names)
                bucket_names.append(bucket)
            bucket_of.append(bucket_ids[bucket])
    return bucket_names, bucket_of


def layout_signature(binding: Binding) -> tuple[Any, ...]:
    """What a layout was built for: the binding (by a weak reference: compares by identity while alive, never
    equal to a later binding allocated at its address) and its bucket version, which changes when an optimizer
    is replaced or its param groups change (``BaseFinetuning`` adding a group, optimizers rebuilt mid-fit)."""
    return (weakref.ref(binding), binding.version)


def _positions(params: list[Tensor], binding: Binding) -> dict[int, list[int]]:
    """``id(optimizer)`` -> the positions of the parameters it steps, in layout order (from the binding's buckets)."""
    position = {id(p): i for i, p in enumerate(params)}
    opt_indices: dict[int, list[int]] = {}
    for entry in binding.bound:
        # A set: a parameter listed twice is measured once; sorted, the positions keep the layout's order.
        seen = {position[id(p)] for b in entry.buckets for p in b.params if id(p) in position}
        opt_indices[id(entry.optimizer)] = sorted(seen)
    return opt_indices


def reduce_pieces(pieces: Pieces, layout: Layout) -> Pieces:
    """All-reduce every piece at once: one SUM vector (replicas masked out) and, for p=inf, one MAX vector.

    Stacking the pieces makes a logging step cost one collective per reduce op, whatever the number of
    metrics; every rank must call it with the same keys (it does: they follow the monitor's options).

    Args:
        pieces: The step's local partials; their positions pick the rows of ``layout.contrib``.
        layout: A layout with sharded parameters (so ``contrib`` is set).

    Returns:
        The same keys, with the reduced partials.
    """
    assert layout.contrib is not None
    by_op: dict[str, list[str]] = {"sum": [], "max": []}
    for key, (_, _, op) in pieces.items():
        by_op[op].append(key)
    out = dict(pieces)
    stacks: dict[str, Tensor | None] = {}
    for op, keys in by_op.items():
        if not keys:
            stacks[op] = None
            continue
        parts = []
        for key in keys:
            value, idx, _ = pieces[key]
            if op == "sum":
                mask = layout.contrib if idx is None else layout.contrib[idx]
                # ``where``, not a product: 0 * inf would turn an Inf norm into NaN.
                value = torch.where(mask, value, torch.zeros_like(value))
            parts.append(value)
        stacks[op] = torch.cat(parts)
    K.all_reduce_partials(stacks["sum"], stacks["max"])
    for op, keys in by_op.items():
        stack = stacks[op]
        if stack is None:
            continue
        sizes = [pieces[k][0].numel() for k in keys]
        for key, value in zip(keys, stack.split(sizes), strict=True):
            out[key] = (value, pieces[key][1], op)
    return out
