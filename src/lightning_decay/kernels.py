"""Penalty and decay kernels on lists of tensors of one device and dtype, as torch's optimizers do.

Every function takes plain (local) tensors, runs ``torch._foreach_*`` kernels, and never moves a
value to the host. They run under ``torch.no_grad()``: optimizer step hooks run outside the
optimizer's own no-grad region. Coefficients are Python floats or 0-dim tensors on the tensors' device (the AMP
scale, a ``found_inf`` mask), so nothing here waits for the device.

Kernels that need a temporary (``w - ref``, ``sign(w)``, ``|w| - t``) run over ``chunks``, index
ranges of the list from [`chunk_ranges`][lightning_decay.kernels.chunk_ranges], so that the temporary is
a few percent of the list, never a copy of it. A tensor larger than the budget is cut too, into views
of flat slices of it (one embedding or LM head can be most of a model). The element-wise kernels give
every entry the same operations whatever the chunking, so their values do not depend on it; only
`squared_distances`, a reduction, sums a cut tensor's slices in another order (float rounding). Callers
that run every step compute the ranges once and pass them; without them they are computed on each call
(a Python loop over the tensors).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "add_l1_subgradient_",
    "add_l2_gradient_",
    "chunk_ranges",
    "decay_",
    "soft_threshold_",
    "squared_distances",
    "sum_abs",
]

Coeff = float | Tensor
#: ``(start, stop)``: the tensors ``start:stop`` whole; ``(i, i + 1, lo, hi)``: entries ``lo:hi`` of tensor
#: ``i`` flattened, a slice of a tensor larger than the budget.
Chunk = tuple[int, ...]
Chunks = Sequence[Chunk]

# The default chunk budget: 1/32 of the list's bytes bounds the temporaries to ~3 % of it whatever its
# size, and next-fit packing gives at most 2 * 32 + 1 chunks (two consecutive chunks hold more than the
# budget together), so the number of kernel launches does not grow with the number of tensors. The
# 64 KiB floor keeps small lists in few chunks, where the launch overhead would dominate.
CHUNK_FRACTION = 32
MIN_CHUNK_BYTES = 64 * 2**10


def _scaled(tensors: list[Tensor], coeff: Tensor) -> list[Tensor]:
    # Out of place on purpose: a 0-dim low-precision tensor times a float32 0-dim coefficient promotes
    # to float32 and is rounded once, when added to its gradient; an in-place product would round twice.
    return torch._foreach_mul(tensors, coeff)


def chunk_ranges(tensors: Sequence[Tensor], budget: int | None = None) -> list[Chunk]:
    """Consecutive chunks covering ``tensors``, each of at most ``budget`` bytes.

    Tensors are packed in order into ``(start, stop)`` ranges (next fit). A contiguous tensor larger than
    the budget is cut into ``(i, i + 1, lo, hi)`` slices of its flattened entries, each within the budget,
    so the largest temporary of a chunked kernel is the budget whatever the sizes (a non-contiguous one
    has no flat view: it stays whole, alone in its range; a 0-dim one is never cut, since a 1-element
    view of it would change its type promotion against a 0-dim coefficient). Default budget:
    ``max(64 KiB, total bytes / 32)``, which bounds the number of chunks, hence of kernel launches, by
    about ``3 * 32`` for any list.
    """
    sizes = [t.numel() * t.element_size() for t in tensors]
    if budget is None:
        budget = max(MIN_CHUNK_BYTES, sum(sizes) // CHUNK_FRACTION)
    chunks: list[Chunk] = []
    start = held = 0
    for i, n in enumerate(sizes):
        if n > budget and tensors[i].dim() and tensors[i].is_contiguous():
            if i > start:
                chunks.append((start, i))
            step = max(1, budget // tensors[i].element_size())
            numel = tensors[i].numel()
            chunks += [(i, i + 1, lo, min(lo + step, numel)) for lo in range(0, numel, step)]
            start, held = i + 1, 0
            continue
        if i > start and held + n > budget:
            chunks.append((start, i))
            start, held = i, 0
        held += n
    if start < len(sizes):
        chunks.append((start, len(sizes)))
    return chunks


def _pieces(chunks: Chunks, *lists: list[Tensor]) -> Iterator[tuple[list[Tensor], ...]]:
    """The sublists of ``lists`` (same length, same shapes) for each chunk: ranges, or flat slices."""
    for _, parts in _pieces_marked(chunks, *lists):
        yield parts


def _pieces_marked(chunks: Chunks, *lists: list[Tensor]) -> Iterator[tuple[bool, tuple[list[Tensor], ...]]]:
    """`_pieces`, each with whether it continues the tensor of the previous piece (a further slice)."""
    for chunk in chunks:
        if len(chunk) == 2:
            a, b = chunk
            yield False, tuple(lst[a:b] for lst in lists)
            continue
        i, _, lo, hi = chunk
        ts = [lst[i] for lst in lists]
        if all(t.is_contiguous() for t in ts):
            yield lo > 0, tuple([t.view(-1)[lo:hi]] for t in ts)
        elif lo == 0:  # a gradient or reference without a flat view: the whole tensor, once
            yield False, tuple([t] for t in ts)


@torch.no_grad()
def add_l2_gradient_(
    grads: list[Tensor],
    params: list[Tensor],
    coeff: Coeff,
    refs: list[Tensor] | None = None,
    chunks: Chunks | None = None,
) -> None:
    """``g += coeff * (w - ref)``, the gradient of ``coeff / 2 * ||w - ref||^2`` (``ref = 0`` if ``None``)."""
    if not grads:
        return
    if refs is None and not isinstance(coeff, Tensor):
        # No temporary, and the same single kernel as torch's SGD(weight_decay): bitwise its gradient.
        torch._foreach_add_(grads, params, alpha=coeff)
        return
    # `w - ref` is formed before scaling, not as `g + c * w - c * ref`: that would round `g + c * w` and
    # lose the bits of `g` below `ulp(c * w)` (most of a small bf16 gradient), right where L2-SP's term
    # `c * (w - ref)` is small. The temporary is bounded by chunking instead.
    chunks = chunks if chunks is not None else chunk_ranges(params)
    if refs is None:  # a tensor coefficient (the AMP scale): foreach add takes no tensor `alpha`
        for g, w in _pieces(chunks, grads, params):
            torch._foreach_add_(g, _scaled(w, coeff))
        return
    scratch = _slice_scratch(chunks, params)  # the slices of a large tensor: one buffer for all (see there)
    for g, w, r in _pieces(chunks, grads, params, refs):
        out = _fits(w, scratch)
        if out is not None and len(r) == 1 and r[0].dim() == 1:
            torch.sub(w[0], r[0], out=out)
            if isinstance(coeff, Tensor):
                g[0].add_(out.mul_(coeff))  # a 1-d slice: in place rounds as `_scaled` does
            else:
                g[0].add_(out, alpha=coeff)
            continue
        diff = torch._foreach_sub(w, r)
        if isinstance(coeff, Tensor):
            torch._foreach_add_(g, _scaled(diff, coeff))
        else:
            torch._foreach_add_(g, diff, alpha=coeff)
        del diff  # before the next chunk's is allocated: one chunk's temporary at a time, not two


# glibc's malloc gives a block of at least 32 MiB (its largest mmap threshold) a mapping of its own, unmapped
# when freed. A smaller chunk-sized block comes from the heap once the first is freed (the threshold rises to
# its size); there small allocations carve up the freed block, so the next step's takes new pages, and a fit's
# peak RSS grew by a chunk per step until malloc trimmed (+0.10x of a huge weight, where one chunk is 0.03x).
# Asked for at least this size, the buffer is a mapping on CPU, and only the pages written (one slice) are
# resident, then returned when it is freed.
MAPPED_BYTES = 32 * 2**20


def _slice_scratch(chunks: Chunks, tensors: list[Tensor]) -> Tensor | None:
    """One flat buffer for the temporaries of the flat slices in ``chunks`` (the largest's entries), or None.

    Allocated once per call and shared by every slice, not once per slice; on CPU at least `MAPPED_BYTES`
    of address space (see there), of which the slices touch one slice's pages.
    """
    numel = max((c[3] - c[2] for c in chunks if len(c) == 4), default=0)
    if not numel:
        return None
    if tensors[0].device.type == "cpu":
        numel = max(numel, MAPPED_BYTES // tensors[0].element_size())
    return tensors[0].new_empty(numel)


def _fits(part: list[Tensor], scratch: Tensor | None) -> Tensor | None:
    """The first ``numel`` entries of ``scratch`` when ``part`` is one flat slice that fits in it."""
    if scratch is None or len(part) != 1 or part[0].dim() != 1 or part[0].numel() > scratch.numel():
        return None
    return scratch[: part[0].numel()]


@torch.no_grad()
def add_l1_subgradient_(grads: list[Tensor], params: list[Tensor], coeff: Coeff, chunks: Chunks | None = None) -> None:
    """``g += coeff * sign(w)``, a subgradient of ``coeff * ||w||_1`` (0 at ``w == 0``).

    The temporary ``sign(w)`` is one chunk's; the flat slices of a large tensor share one buffer
    (`_slice_scratch`). Each entry gets the same operations in either form, so the chunking does not
    change the values.
    """
    if not grads:
        return
    chunks = chunks if chunks is not None else chunk_ranges(params)
    scratch = None if params[0].is_complex() else _slice_scratch(chunks, params)
    for g, w in _pieces(chunks, grads, params):
        out = _fits(w, scratch)
        if out is not None:  # a slice: the same kernels as below, into the shared buffer
            torch.sign(w[0], out=out)
            if isinstance(coeff, Tensor):
                g[0].add_(out.mul_(coeff))  # a 1-d slice: in place rounds as `_scaled` does
            else:
                g[0].add_(out, alpha=coeff)
            continue
        signs = _complex_signs(w) if w[0].is_complex() else torch._foreach_sign(w)
        if isinstance(coeff, Tensor):
            torch._foreach_add_(g, _scaled(signs, coeff))
        else:
            torch._foreach_add_(g, signs, alpha=coeff)
        del signs  # before the next chunk's is allocated: one chunk's temporary at a time, not two


@torch.no_grad()
def soft_threshold_(params: list[Tensor], threshold: Coeff, chunks: Chunks | None = None) -> None:
    """Proximal step of ``threshold * ||w||_1``: ``w <- sign(w) * max(|w| - threshold, 0)``, in place.

    It produces exact zeros, unlike the subgradient, which makes weights oscillate around zero.

    Computed as written, ``m = |w|; m -= t; m = max(m, 0); w = sign(w); w *= m``, so that it is bitwise
    the formula (``-0.0`` for shrunk negative weights, NaN kept) with one temporary ``m`` of one chunk
    (``chunks``, see the module); the flat slices of a large tensor share one buffer (`_slice_scratch`).
    A 0-dim tensor ``threshold`` is broadcast on the device, never read on the host.
    """
    if not params:
        return
    if params[0].is_complex():  # buckets hold one dtype: the whole list is complex
        _soft_threshold_complex_(params, threshold, chunks)
        return
    chunks = chunks if chunks is not None else chunk_ranges(params)
    scratch = _slice_scratch(chunks, params)
    for (part,) in _pieces(chunks, params):
        out = _fits(part, scratch)
        if out is not None:  # a slice: the same kernels as below, into the shared buffer
            torch.abs(part[0], out=out).sub_(threshold).clamp_min_(0)
            part[0].sign_().mul_(out)
            continue
        magnitude = torch._foreach_abs(part)
        if isinstance(threshold, Tensor):
            torch._foreach_sub_(magnitude, [threshold] * len(part))
        else:
            torch._foreach_sub_(magnitude, threshold)
        torch._foreach_clamp_min_(magnitude, 0)
        torch._foreach_sign_(part)
        torch._foreach_mul_(part, magnitude)
        del magnitude  # before the next chunk's is allocated: one chunk's temporary at a time, not two


def _complex_signs(tensors: list[Tensor]) -> list[Tensor]:
    # ``sgn(w) = w / |w|`` (0 at 0), the gradient torch's autograd gives ``|w|`` of a complex ``w``; torch has
    # no foreach ``sgn`` (``_foreach_sign`` refuses complex): one kernel per complex tensor, a rare case.
    return [torch.sgn(t) for t in tensors]


def _soft_threshold_complex_(params: list[Tensor], threshold: Coeff, chunks: Chunks | None) -> None:
    """``w <- sgn(w) * max(|w| - threshold, 0)`` for complex ``w``: the modulus shrunk, the phase kept.

    The proximal step of ``threshold * sum |w|`` on complex entries (``clamp`` refuses complex tensors).
    """
    for (part,) in _pieces(chunks if chunks is not None else chunk_ranges(params), params):
        for w in part:
            modulus = w.abs().sub_(threshold).clamp_min_(0)
            w.copy_(torch.sgn(w).mul_(modulus))


@torch.no_grad()
def decay_(params: list[Tensor], factor: Coeff) -> None:
    """Decoupled weight decay, ``w <- factor * w`` (``factor = 1 - lr * weight_decay`` for AdamW)."""
    if not params:
        return
    if not isinstance(factor, Tensor) and params[0].device.type == "cpu":
        # On CPU a Python factor goes in as a 0-dim tensor of the multiply's compute type (float32 for bfloat16,
        # float16 and float32, float64 for float64), which each multiply reads as a scalar: what `Tensor.mul_`
        # and AdamW's single-tensor path (its default on CPU) compute, for every dtype. A Python scalar would
        # give torch's CPU foreach multiply the tensors' dtype instead (bf16: 0.99 -> 0.98828125, a shrink
        # of 0.0117, not 0.01), and costs it a wrapped scalar per tensor: 3x the time on small tensors
        # (26 Linear(16, 16) weights: about 60 us against 20 us). On CUDA the foreach kernel keeps the scalar
        # in float32, as AdamW's foreach path there does: the scalar is passed on.
        double = params[0].dtype in (torch.float64, torch.complex128)
        factor = torch.scalar_tensor(factor, dtype=torch.float64 if double else torch.float32)
    torch._foreach_mul_(params, factor)


@torch.no_grad()
def squared_distances(
    params: list[Tensor], refs: list[Tensor] | None = None, chunks: Chunks | None = None
) -> list[Tensor]:
    """Per-tensor ``||w - ref||_2^2`` (0-dim, on the tensors' device), float32; float64 for float64 tensors.

    With ``refs``, ``w - ref`` is formed one chunk at a time (``chunks``, see the module); each tensor's
    norm is its own reduction, so the values are those of the whole list at once, except for a tensor
    cut into slices: the squares of its slices' norms are summed, which rounds differently (by a few
    ulps of float32) from one norm of the whole tensor.
    """
    if not params:
        return []
    acc = _accumulation(params)
    if refs is None:
        norms = list(torch._foreach_norm(params, 2, dtype=acc))
        return list(torch._foreach_mul(norms, norms))
    chunks = chunks if chunks is not None else chunk_ranges(params)
    out: list[Tensor] = []
    for further, (w, r) in _pieces_marked(chunks, params, refs):
        diff = torch._foreach_sub(w, r)
        norms = torch._foreach_norm(diff, 2, dtype=acc)
        del diff  # one chunk's temporary alive at a time
        squares = torch._foreach_mul(norms, norms)
        if further:
            out[-1] = out[-1] + squares[0]  # a further slice of the tensor begun by the previous chunk
        else:
            out += squares
    return out


@torch.no_grad()
def sum_abs(params: list[Tensor]) -> list[Tensor]:
    """Per-tensor ``||w||_1`` in float32, float64 for float64 tensors."""
    if not params:
        return []
    return list(torch._foreach_norm(params, 1, dtype=_accumulation(params)))


def _accumulation(tensors: list[Tensor]) -> torch.dtype | None:
    """float32 for the penalty values, float64 for float64 tensors (``_foreach_norm`` cannot narrow).

    Complex tensors: ``None``, their own precision (``_foreach_norm`` takes only a complex ``dtype`` for
    them, and reduces complex64 to float32 and complex128 to float64 norms of the modulus).
    """
    if tensors[0].is_complex():
        return None
    return torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
