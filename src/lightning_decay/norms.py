"""Norm kernels for lists of tensors: grouped ``torch._foreach_norm``, on-device combination, shard reduction.

Everything here is framework-free and never moves a value to the host: results stay on the device as
one tensor per call, so a caller can gather all the scalars of a logging step and copy them once.

Norms are handled as *partials*, values that can be combined across tensors and across shards with
one reduction and finalized afterwards:

============  ======================  =================  ==============
``norm_type``  partial of a tensor     combine / reduce   finalize
============  ======================  =================  ==============
1              ``sum |x|``             sum                identity
2              ``sum x**2``            sum                ``sqrt``
inf            ``max |x|``             max                identity
============  ======================  =================  ==============

So the norm of a module (or of a sharded parameter) is the finalized combination of the partials of
its tensors (or of its local shards).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = [
    "TensorGroups",
    "all_reduce_partials",
    "angular_updates",
    "clone_tensors",
    "combine_all_partials",
    "combine_partials",
    "contributes_to_sum",
    "copy_tensors_",
    "finalize_partials",
    "grouped_norms",
    "is_sharded",
    "local_tensor",
    "masked_norms",
    "parse_norm_type",
    "partials",
    "reduce_op",
    "sub_tensors",
    "sub_tensors_",
    "update_ratios",
    "wide_dtype",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def parse_norm_type(value: Any, argument: str = "norm_type") -> float:
    """Return ``1.0``, ``2.0`` or ``math.inf`` for the accepted spellings, else raise naming ``argument``.

    Raises:
        ValueError: If ``value`` is not one of ``1``, ``2``, ``inf`` (float) or ``"inf"``.
    """
    if isinstance(value, str) and value.lower() == "inf":
        return math.inf
    if not isinstance(value, bool) and isinstance(value, (int, float)) and float(value) in (1.0, 2.0, math.inf):
        return float(value)
    raise ValueError(f"`{argument}` must be one of 1, 2, float('inf') or 'inf', got {value!r}")


def reduce_op(norm_type: float) -> str:
    """``"sum"`` for the partials of p=1 and p=2, ``"max"`` for p=inf."""
    return "max" if math.isinf(norm_type) else "sum"


def wide_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype scalars are accumulated and stacked in: float64, except where a backend lacks it (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class TensorGroups:
    """A list of tensors split into (device, dtype) groups once, for norms of the same tensors every step.

    Splitting a list costs per-tensor Python work (``numel``, grouping); for a list that does not change
    (the parameters) it is done here once, and `norms` is then one ``torch._foreach_norm``, one
    ``torch.stack`` and one ``.to`` per group, plus one ``index_copy_`` when the groups are not already
    in input order (several dtypes, or empty tensors).

    Args:
        tensors: Plain (local) tensors; no DTensor (``_foreach_norm`` rejects a list mixing them).
        device: Device of the results; default the device of the first tensor.
    """

    def __init__(self, tensors: Sequence[Tensor], device: torch.device | str | None = None) -> None:
        if device is None:
            device = tensors[0].device if len(tensors) else torch.device("cpu")
        self.device = torch.device(device)
        self.size = len(tensors)
        # Empty tensors (a rank's empty shard) are left out: their norm is 0 (``max`` of nothing fails).
        nonempty = [i for i, t in enumerate(tensors) if t.numel() > 0]
        grouped = (
            _group_tensors_by_device_and_dtype([[tensors[i] for i in nonempty]], with_indices=True) if nonempty else {}
        )
        self.groups: list[tuple[torch.dtype, list[Tensor]]] = []
        # Per group: the positions of its tensors too large to be copied whole (see `_sliced_norms`).
        self._large: list[list[int]] = []
        self._positions: list[list[int]] = []  # per group: the input position of each of its tensors
        order: list[int] = []
        for (_, group_dtype), ([group], indices) in grouped.items():
            self.groups.append((group_dtype, group))
            self._large.append(_large_positions(group))
            self._positions.append([nonempty[j] for j in indices])
            order.extend(self._positions[-1])
        self.order: Tensor | None = None  # input position of each stacked norm, when not the identity
        if order != list(range(self.size)):
            self.order = torch.tensor(order, dtype=torch.long, device=self.device)

    def like(self, tensors: Sequence[Tensor]) -> TensorGroups:
        """The same split for ``tensors``, which mirror this instance's (same devices, dtypes and sizes, in
        the same order: the gradients or a snapshot of the parameters), without grouping them again.

        With one group in input order (one device and dtype, no empty tensor) this is no per-tensor work.
        """
        if len(tensors) != self.size:
            raise ValueError(f"like(): {len(tensors)} tensors for a split of {self.size}")
        other = TensorGroups.__new__(TensorGroups)
        other.device, other.size, other.order, other._positions = self.device, self.size, self.order, self._positions
        if self.simple:
            other.groups = [(self.groups[0][0], list(tensors))]
        else:
            pairs = zip(self.groups, self._positions, strict=True)
            other.groups = [(dt, [tensors[i] for i in pos]) for (dt, _), pos in pairs]
        # Large tensors of a mirror may lack a flat view (a gradient's layout): those stay whole.
        other._large = [
            [j for j in large if group[j].is_contiguous()]
            for large, (_, group) in zip(self._large, other.groups, strict=True)
        ]
        return other

    @property
    def simple(self) -> bool:
        """One group, in input order: the tensors are the group's list as given (no empty one)."""
        return self.order is None and len(self.groups) == 1

    def clone(self) -> list[Tensor]:
        """Copies of the tensors of a `simple` split, in input order, with one foreach kernel (a snapshot)."""
        if not self.simple:
            raise ValueError("clone() needs a simple split; use clone_tensors")
        return list(torch._foreach_mul(self.groups[0][1], 1.0))  # ``* 1`` is exact and keeps -0.0

    def sub_(self, other: TensorGroups) -> None:
        """``a -= b`` for each tensor ``a`` of this split and ``b`` of ``other``, a split `like` it."""
        for (_, a), (_, b) in zip(self.groups, other.groups, strict=True):
            torch._foreach_sub_(a, b)

    def norms(self, ord: float, dtype: torch.dtype = torch.float32, accumulate: torch.dtype | None = None) -> Tensor:
        """Per-tensor vector norms in input order, a 1-D ``dtype`` tensor on the device (see `grouped_norms`)."""
        accumulate = dtype if accumulate is None else accumulate
        # A copy to the CPU must not be asynchronous: the host could read it before it lands.
        non_blocking = self.device.type != "cpu"
        stacked: list[Tensor] = []
        for (group_dtype, group), large in zip(self.groups, self._large, strict=True):
            # ``_foreach_norm`` refuses a narrowing ``dtype`` (float64 params with a float32 request).
            kernel_dtype = accumulate if group_dtype != accumulate and _widens(group_dtype, accumulate) else None
            if kernel_dtype is not None and group_dtype.is_complex:
                # Complex inputs take only a complex `dtype`; their norms (of the modulus) are then real ones.
                kernel_dtype = _COMPLEX_OF.get(kernel_dtype, kernel_dtype)
            if kernel_dtype is not None and group_dtype not in _LOW_PRECISION and large:
                # A widening kernel on float32 (float64 sums) copies each tensor to the wide dtype first.
                norms = _sliced_norms(group, large, ord, kernel_dtype)
            elif ord == 0 and kernel_dtype is None and any(t.numel() > COUNT_EXACT for t in group):
                norms = _exact_counts(group)
            else:
                norms = torch.stack(torch._foreach_norm(group, ord, dtype=kernel_dtype))
            stacked.append(norms.to(device=self.device, dtype=dtype, non_blocking=non_blocking))
        if self.order is None:
            return stacked[0] if stacked else torch.zeros(0, dtype=dtype, device=self.device)
        out = torch.zeros(self.size, dtype=dtype, device=self.device)
        if stacked:
            out.index_copy_(0, self.order, stacked[0] if len(stacked) == 1 else torch.cat(stacked))
        return out


# A tensor above this many bytes, and above 1/32 of its group, is reduced in slices where the kernel would
# copy it to a wider dtype (float32 -> float64): the copy is then one slice, not twice the tensor.
SLICE_BYTES = 64 * 2**10
SLICE_FRACTION = 32


def _large_positions(group: Sequence[Tensor]) -> list[int]:
    sizes = [t.numel() * t.element_size() for t in group]
    limit = max(SLICE_BYTES, sum(sizes) // SLICE_FRACTION)
    return [j for j, n in enumerate(sizes) if n > limit and group[j].is_contiguous()]


#: Counts of non-zero entries are exact in a float32 kernel up to this many entries (2**24).
COUNT_EXACT = 2**24


def _exact_counts(group: Sequence[Tensor]) -> Tensor:
    """Non-zero counts (``ord=0``) of ``group`` in its own dtype's kernels, exact: a tensor of more than
    `COUNT_EXACT` entries is counted in flat slices of at most that many (views, no copy; a non-contiguous
    one whole), and the slices' counts are added in float64."""
    pieces: list[Tensor] = []
    owner: list[int] = []
    for j, t in enumerate(group):
        parts = t.view(-1).split(COUNT_EXACT) if t.numel() > COUNT_EXACT and t.is_contiguous() else (t,)
        pieces += parts
        owner += [j] * len(parts)
    values = torch.stack(torch._foreach_norm(pieces, 0)).to(torch.float64)
    index = torch.tensor(owner, dtype=torch.long, device=values.device)
    return torch.zeros(len(group), dtype=torch.float64, device=values.device).index_add_(0, index, values)


def _sliced_norms(group: Sequence[Tensor], large: list[int], ord: float, dtype: torch.dtype) -> Tensor:
    """Per-tensor norms of ``group`` in ``dtype``, its ``large`` tensors reduced as flat slices and combined.

    The slices are views (no copy); the kernel's widening copy is then one slice at a time. The norms of a
    tensor's slices combine exactly like partials across tensors (sum of squares for p=2, sum for p=0 and
    p=1, max for p=inf), in ``dtype``: the result differs from one kernel over the whole tensor only by the
    order of the float64 sums.
    """
    limit = max(SLICE_BYTES, sum(t.numel() * t.element_size() for t in group) // SLICE_FRACTION)
    is_large = set(large)
    pieces = [t for j, t in enumerate(group) if j not in is_large]
    owner = [j for j in range(len(group)) if j not in is_large]
    for j in large:
        t = group[j]
        parts = t.view(-1).split(max(1, limit // t.element_size()))
        pieces += parts
        owner += [j] * len(parts)
    values = torch.stack(torch._foreach_norm(pieces, ord, dtype=dtype))
    index = torch.tensor(owner, dtype=torch.long, device=values.device)
    out = torch.zeros(len(group), dtype=values.dtype, device=values.device)
    if math.isinf(ord):
        return out.scatter_reduce_(0, index, values, reduce="amax", include_self=True)
    if ord == 2:
        return out.index_add_(0, index, values.square()).sqrt()
    return out.index_add_(0, index, values)


def grouped_norms(
    tensors: Sequence[Tensor],
    ord: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    accumulate: torch.dtype | None = None,
) -> Tensor:
    """Per-tensor vector norms, one ``torch._foreach_norm`` per (device, dtype) group.

    The kernel accumulates in ``accumulate`` (default ``dtype``) where that widens the input: low-precision
    inputs (fp16 / bf16) are accumulated by the kernel itself (``dtype=`` of ``_foreach_norm``), so no
    upcast copy of the tensors is made; inputs at least as wide are reduced in their own dtype. The
    norms of a group are stacked and converted to ``dtype`` at once. ``accumulate=torch.float32`` with a
    float64 ``dtype`` keeps float32 kernels for float32 inputs (twice as fast on CPU as float64 ones) and
    float64 only to combine the results. ``ord=0`` counts non-zero entries. Empty tensors (a rank's empty
    shard) have norm 0. For the same list every step, build a `TensorGroups` once instead.

    Args:
        tensors: Plain (local) tensors; no DTensor (``_foreach_norm`` rejects a list mixing them).
        ord: 0, 1, 2 or ``inf``.
        dtype: Result dtype, and accumulation dtype unless ``accumulate`` is given.
        device: Device of the result; default the device of the first tensor.
        accumulate: The kernels' accumulation dtype; inputs wider than it are reduced in their own dtype.

    Returns:
        A 1-D tensor of ``len(tensors)`` norms, in input order, on ``device``.
    """
    return TensorGroups(tensors, device).norms(ord, dtype=dtype, accumulate=accumulate)


def _widens(src: torch.dtype, dst: torch.dtype) -> bool:
    return src == dst or torch.finfo(dst).bits > torch.finfo(src).bits or src in _LOW_PRECISION


def partials(
    tensors: Sequence[Tensor] | TensorGroups,
    norm_type: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    accumulate: torch.dtype | None = None,
) -> Tensor:
    """Per-tensor partials (see the module docstring): ``sum |x|``, ``sum x**2`` or ``max |x|``.

    ``tensors`` may also be a `TensorGroups` built once (``device`` is then its own).
    """
    groups = tensors if isinstance(tensors, TensorGroups) else TensorGroups(tensors, device)
    norms = groups.norms(norm_type, dtype=dtype, accumulate=accumulate)
    return norms.square() if norm_type == 2 else norms


def finalize_partials(values: Tensor, norm_type: float) -> Tensor:
    """Turn (combined, reduced) partials into norms: ``sqrt`` for p=2, identity otherwise."""
    return values.sqrt() if norm_type == 2 else values


def combine_partials(values: Tensor, index: Tensor, size: int, norm_type: float) -> Tensor:
    """Combine per-tensor partials into ``size`` buckets on the device, without a Python loop.

    ``values[i]`` goes to bucket ``index[i]``: summed for p=1/2 (``index_add_``), maxed for p=inf
    (``scatter_reduce_`` with ``amax``; partials are >= 0, so a zero start is neutral). NaN propagates.

    Args:
        values: 1-D partials.
        index: 1-D ``long`` bucket indices, same length and device as ``values``.
        size: Number of buckets.
        norm_type: 1, 2 or inf.
    """
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    if reduce_op(norm_type) == "sum":
        return out.index_add_(0, index, values)
    return out.scatter_reduce_(0, index, values, reduce="amax", include_self=True)


def combine_all_partials(values: Tensor, norm_type: float) -> Tensor:
    """Combine all 1-D partials into one, on the device: the partial of the whole set of tensors.

    Summed for p=1/2, maxed for p=inf; an empty ``values`` gives 0 (partials are >= 0, so 0 is the
    neutral start of both). NaN propagates.

    Args:
        values: 1-D partials.
        norm_type: 1, 2 or inf.

    Returns:
        A 1-element tensor (not 0-dim, so it can be concatenated with other 1-D results).
    """
    if reduce_op(norm_type) == "sum" or values.numel() == 0:
        return values.sum().reshape(1)  # (``amax`` of nothing raises; the empty sum is 0)
    return values.amax().reshape(1)


def masked_norms(norms: Tensor, mask: Tensor, norm_type: float, zero: Tensor | None = None) -> Tensor:
    """The norm of each subset of tensors picked by a row of ``mask``, from the tensors' own norms.

    The ``norm_type`` norm of a set of tensors is the norm of their norms, for p = 1, 2 and inf, so row
    ``r`` of the result is ``vector_norm(norms[mask[r]], norm_type)``. One ``where`` and one
    ``vector_norm`` for every row at once, on the device, instead of one masked copy per row; NaN and
    Inf propagate only into the rows holding them (masked-out entries are replaced, not multiplied by 0).

    Args:
        norms: 1-D finalized per-tensor norms (not partials).
        mask: ``(rows, len(norms))`` bool tensor on the device of ``norms``.
        norm_type: 1, 2 or inf.
        zero: A 0-dim zero of the dtype and device of ``norms``, for a caller that keeps one (``where``
            takes a tensor faster than a Python scalar); made here when not given.

    Returns:
        A 1-D tensor of ``mask.shape[0]`` norms; zeros when ``norms`` is empty.
    """
    if norms.numel() == 0:
        return torch.zeros(mask.shape[0], dtype=norms.dtype, device=norms.device)
    if zero is None:
        zero = norms.new_zeros(())
    return torch.linalg.vector_norm(torch.where(mask, norms, zero), norm_type, dim=1)


def update_ratios(before_sq: Tensor, delta_sq: Tensor) -> Tensor:
    """``||Δw|| / ||w_before||`` from squared norms, defined where ``w_before`` is zero.

    A zero tensor that stays zero moved by nothing: 0. A zero tensor that moves is all update,
    ``||Δw|| / ||w_after|| = 1`` (then ``Δw = w_after``). Elementwise on the device, no host sync.
    """
    ratio = delta_sq.sqrt() / before_sq.sqrt()
    return torch.where(before_sq > 0, ratio, (delta_sq > 0).to(ratio.dtype))


def angular_updates(before_sq: Tensor, after_sq: Tensor, delta_sq: Tensor) -> Tensor:
    """The angle in radians between ``w_before`` and ``w_after`` from squared norms, well conditioned.

    With ``a = ||w_before||``, ``b = ||w_after||``, ``d = ||Δw||``: the unit vectors differ by
    ``||â - b̂||² = (d² - (a - b)²) / (ab)`` (the law of cosines rearranged), and the angle is
    ``2 asin(||â - b̂|| / 2)``. Unlike ``arccos((a² + b² - d²) / (2ab))``, which subtracts nearly equal squares
    (a cosine of ``1 - 5e-7`` for an angle of ``1e-3``, so it needs float64 sums), errors in ``a`` and ``b``
    enter only through ``(a - b)²``, second order: float32 norm kernels give the angle to float32 precision
    (no float64 copy of the weights). A zero vector has no direction: the angle is 0 when either is zero.
    """
    denominator = (before_sq * after_sq).sqrt()
    radial = before_sq.sqrt() - after_sq.sqrt()
    chord = ((delta_sq - radial.square()).clamp(min=0.0) / denominator).sqrt()
    angle = 2.0 * torch.asin((chord / 2.0).clamp(max=1.0))
    return torch.where(denominator > 0, angle, torch.zeros_like(angle))


def clone_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` with one foreach kernel per (device, dtype) group (a snapshot)."""
    out: list[Tensor | None] = [None] * len(tensors)
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    for [group], indices in grouped.values():
        # ``_foreach_mul`` allocates its outputs; multiplying by 1 is exact (and keeps -0.0).
        for j, c in zip(indices, torch._foreach_mul(group, 1.0), strict=True):
            out[j] = c
    return out  # type: ignore[return-value]


def copy_tensors_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``dst[i].copy_(src[i])`` (same devices, dtypes and shapes), one ``_foreach_copy_`` per (device, dtype) group.

    Into kept buffers: no allocation, and no page faults on freshly mapped memory (a fresh copy's dearest part).
    """
    grouped = _group_tensors_by_device_and_dtype([list(dst), list(src)], with_indices=False)
    for [gd, gs], _ in grouped.values():
        torch._foreach_copy_(gd, gs)


def sub_tensors(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    """``a[i] - b[i]`` for every ``i``, one foreach kernel per (device, dtype) group."""
    out: list[Tensor | None] = [None] * len(a)
    grouped = _group_tensors_by_device_and_dtype([list(a), list(b)], with_indices=True)
    for [ga, gb], indices in grouped.values():
        for j, d in zip(indices, torch._foreach_sub(ga, gb), strict=True):
            out[j] = d
    return out  # type: ignore[return-value]


def sub_tensors_(a: Sequence[Tensor], b: Sequence[Tensor]) -> None:
    """``a[i] -= b[i]`` in place (no new copy), one foreach kernel per (device, dtype) group."""
    grouped = _group_tensors_by_device_and_dtype([list(a), list(b)], with_indices=False)
    for [ga, gb], _ in grouped.values():
        torch._foreach_sub_(ga, gb)


# ----------------------------------------------------------------------------- DTensor / shards
@functools.cache
def _dtensor_types() -> tuple[type, type] | None:
    # Cached: called per tensor, and an ``import`` statement is not free even when already imported.
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor, Shard


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor, sharded or replicated."""
    types = _dtensor_types()
    return types is not None and isinstance(tensor, types[0])


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor with at least one ``Shard`` placement (FSDP2, tensor parallel)."""
    types = _dtensor_types()
    if types is None or not isinstance(tensor, types[0]):
        return False
    return any(isinstance(p, types[1]) for p in tensor.placements)


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (``to_local()``, a view sharing storage), the tensor itself otherwise."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def contributes_to_sum(tensor: Tensor) -> bool:
    """Whether this rank's partials of ``tensor`` enter a world-wide SUM reduction.

    A sharded DTensor contributes from every rank along its ``Shard`` mesh dimensions but only from
    coordinate 0 along the others (``Replicate``), so replicas are counted once. A plain tensor is
    taken as replicated on every rank (DDP) and contributes from global rank 0 only.
    """
    types = _dtensor_types()
    if types is not None and isinstance(tensor, types[0]):
        coordinate = tensor.device_mesh.get_coordinate()
        if coordinate is None:  # this rank is not in the mesh
            return False
        return all(isinstance(p, types[1]) or c == 0 for p, c in zip(tensor.placements, coordinate, strict=True))
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_partials(sums: Tensor | None, maxes: Tensor | None, group: Any = None) -> None:
    """Reduce stacked partials in place across ranks: one ``all_reduce`` per non-empty vector.

    Every rank of ``group`` must call it with vectors of the same length. Sum partials of replicated
    tensors must already be zeroed on all but one replica (see `contributes_to_sum`).
    """
    dist = torch.distributed
    if sums is not None and sums.numel():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    if maxes is not None and maxes.numel():
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
