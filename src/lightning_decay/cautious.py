"""Cautious weight decay kernels: decay only the entries whose update direction agrees with the weight.

Cautious weight decay (Chen et al., arXiv 2510.12402) is ``x <- x - lr * (u + wd * 1[u * x >= 0] * x)``,
with ``u`` the optimizer's update direction and ``x`` the weight before the step. torch's ``AdamW``
decays before its update (``param.mul_(1 - lr * wd)``, then ``param.addcdiv_(...)``), so does
[`cautious_decay_`][lightning_decay.cautious.cautious_decay_]: called right before the optimizer's step,
with the direction from [`lightning_decay.directions`][lightning_decay.directions] (computed from the
state and gradients before the step, with the weights before the step), it turns the step into the
formula above. The masked entries become ``x * factor`` exactly as ``Tensor.mul`` rounds it (bitwise
AdamW's own decay, bf16 and fp16 included), the others stay bitwise as they are; only a zero weight
``-0.0`` comes out ``+0.0`` (lerp's fused multiply-add), an equal value.

For an optimizer without a known direction,
[`measured_cautious_decay_`][lightning_decay.cautious.measured_cautious_decay_] runs after the step,
from a copy of the weights taken before it: ``u`` is proportional to
``x_old - x_new``, and the formula's decay term uses ``x_old``, so it adds AdamW's decay increment
``x_old * factor - x_old`` to the masked entries of ``x_new``. It equals the formula within one rounding
(AdamW's order rounds ``x_old * factor`` before adding the update; here the update was already added);
on entries the step left unchanged it is AdamW's decay bitwise. A step that moved an entry by less
than a rounding reads as ``u = 0`` there, which the formula decays (``0 * x >= 0``).

Zeros: ``u = 0`` (a zero gradient and moment) or ``x = 0`` satisfy ``u * x >= 0`` and are decayed, as in
the paper (decaying a zero weight leaves it zero). The test is on signs, ``sign(u) * x >= 0``, never
on the product ``u * x``, which underflows to zero in float16 for small entries.

Two exact forms of the known-direction decay, both 6 foreach passes over a chunk after the direction's:

- float32 and float64 weights with a float factor in ``[1/2, 1]`` (every AdamW-like step): the mask
  becomes, in the direction's place, a multiplier that is exactly ``factor`` (as the op rounds it) or 1,
  ``min(sign(sign(u) * x), 0) * (factor - 1) + factor`` (``1 - factor`` is exact there, Sterbenz), and
  ``x *= multiplier`` in place: ``x * factor`` bitwise, or ``x`` unchanged. No decayed copy, so chunks
  twice as large (a quarter less time on CPU than the general form at the same memory);
- otherwise (bf16, fp16, a 0-dim tensor factor, a factor below 1/2): the mask in ``{0, 1}`` and
  ``lerp_(x, x * factor, mask)``, whose weights of exactly 0 and 1 return its ends bitwise.

Temporaries are bounded by chunking, as in [`lightning_decay.kernels`][lightning_decay.kernels]: per
chunk the direction and its intermediates (``Direction.temporaries`` tensors), then the mask in the
direction's place and, in the general form, the decayed chunk.
[`cautious_chunks`][lightning_decay.cautious.cautious_chunks] divides the chunk budget by that count
([`held_tensors`][lightning_decay.cautious.held_tensors]), so that the peak extra memory stays within
the budget. The fraction of entries the mask lets through is summed on the device, only when asked
(logging steps).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import torch
from torch import Tensor

from lightning_decay.directions import Direction
from lightning_decay.kernels import CHUNK_FRACTION, MIN_CHUNK_BYTES, Chunks, Coeff, chunk_ranges

__all__ = ["cautious_chunks", "cautious_decay_", "held_tensors", "measured_cautious_decay_"]


def cautious_chunks(params: list[Tensor], temporaries: int, budget: int | None = None) -> list[tuple[int, ...]]:
    """Chunks of ``params`` such that ``temporaries + 1`` chunk-sized tensors fit in ``budget`` bytes.

    Args:
        params: The weights (one device and dtype).
        temporaries: ``Direction.temporaries``, or 1 for the measured path (its difference of weights).
        budget: The peak extra bytes allowed; default that of [`chunk_ranges`][lightning_decay.kernels.chunk_ranges],
            ``max(64 KiB, total bytes / 32)``.
    """
    if budget is None:
        budget = max(MIN_CHUNK_BYTES, sum(t.numel() * t.element_size() for t in params) // CHUNK_FRACTION)
    return chunk_ranges(params, max(1, budget // (temporaries + 1)))


def _in_place_factor(dtype: torch.dtype, factor: Coeff) -> float | None:
    """``factor`` as the in-place form multiplies by it (rounded to float32 for float32 weights), where that
    form is exact: float32/float64 weights and a float factor in ``[1/2, 1]``; else ``None``."""
    if isinstance(factor, Tensor) or dtype not in (torch.float32, torch.float64) or not 0.5 <= factor <= 1.0:
        return None
    return struct.unpack("f", struct.pack("f", factor))[0] if dtype == torch.float32 else float(factor)


def held_tensors(direction: Direction, params: list[Tensor], factor: Coeff) -> int:
    """How many chunk-sized tensors `cautious_decay_` holds at once with this ``factor``: the direction's
    temporaries, plus the decayed chunk of the general form (pass it minus 1 to `cautious_chunks`)."""
    in_place = bool(params) and _in_place_factor(params[0].dtype, factor) is not None
    return direction.temporaries + (0 if in_place else 1)


def _slices(chunks: Chunks, *lists: list[Tensor | None]) -> Iterator[tuple[list[Tensor | None], ...]]:
    """The sublists of ``lists`` for each chunk, ``None`` entries kept (states a first step creates)."""
    for chunk in chunks:
        if len(chunk) == 2:
            a, b = chunk
            yield tuple(lst[a:b] for lst in lists)
            continue
        i, _, lo, hi = chunk
        ts = [lst[i] for lst in lists]
        if all(t is None or t.is_contiguous() for t in ts):
            yield tuple([None if t is None else t.view(-1)[lo:hi]] for t in ts)
        elif lo == 0:  # a tensor without a flat view: the whole of it, once
            yield tuple([t] for t in ts)


def _mask_(directions: list[Tensor], weights: list[Tensor]) -> None:
    """``directions`` becomes ``1[sign(u) * x >= 0]`` in the weights' dtype, in place.

    ``sign(u) * x`` is exact (``+-x`` or 0), so the test neither underflows nor rounds; then
    ``min(sign(.) + 1, 1)`` maps ``-1, 0, 1`` to ``0, 1, 1``. ``torch.sign`` maps NaN to 0, so the mask
    is 0 or 1 even where the direction is NaN or infinite (a step the GradScaler skips, decayed by a
    factor of 1): such an entry reads as ``u = 0``.
    """
    _check_dtype(directions, weights)
    torch._foreach_sign_(directions)
    torch._foreach_mul_(directions, weights)
    torch._foreach_sign_(directions)
    torch._foreach_add_(directions, 1.0)
    torch._foreach_clamp_max_(directions, 1.0)


def _decayed(weights: list[Tensor], factor: Coeff) -> list[Tensor]:
    """New ``weights * factor`` in the weights' dtype, rounded once as ``Tensor.mul`` (AdamW's decay) does.

    A float: the out-of-place foreach multiply (the in-place one rounds a float to a low-precision dtype
    first). A 0-dim tensor: in place on a copy (out of place, a float32 tensor would promote the result).
    """
    if not isinstance(factor, Tensor):
        return torch._foreach_mul(weights, factor)
    out = torch._foreach_clone(weights)
    torch._foreach_mul_(out, factor)
    return out


def _count(masks: list[Tensor]) -> Tensor:
    """The number of ones in ``masks``, a 0-dim float32 tensor on their device (float64 for float64)."""
    dtype = torch.float64 if masks[0].dtype == torch.float64 else torch.float32
    return torch.stack(torch._foreach_norm(masks, 1, dtype=dtype)).sum()


def _fraction(count: Tensor | None, params: list[Tensor]) -> Tensor:
    total = sum(t.numel() for t in params)
    if count is None:  # nothing to decay
        return torch.ones((), dtype=torch.float32, device=params[0].device if params else None)
    return (count / max(total, 1)).to(torch.float32)


@torch.no_grad()
def cautious_decay_(
    params: list[Tensor],
    direction: Direction,
    factor: Coeff,
    chunks: Chunks | None = None,
    fraction: bool = False,
) -> Tensor | None:
    """Before the optimizer's step: ``x <- x * factor`` where ``sign(u) * x >= 0``, else ``x`` unchanged.

    Args:
        params: The decayed weights (local tensors of one device and dtype, each with a gradient),
            aligned with ``direction.inputs``.
        direction: This step's direction of ``params`` (see [`direction`][lightning_decay.directions.direction]).
        factor: ``1 - lr * weight_decay`` (a float, or a 0-dim tensor on the device such as the factor of a
            step the GradScaler skips), applied as ``Tensor.mul`` applies it: AdamW's decay, bitwise.
        chunks: Ranges of ``params`` from [`cautious_chunks`][lightning_decay.cautious.cautious_chunks]
            (computed on each call if ``None``).
        fraction: Also return the share of entries the mask let through (a logging step).

    Returns:
        That share as a 0-dim float32 tensor on the device if ``fraction``, else ``None``; nothing is
        read on the host.
    """
    if not params:
        return _fraction(None, params) if fraction else None
    chunks = chunks if chunks is not None else cautious_chunks(params, held_tensors(direction, params, factor) - 1)
    multiplier = _in_place_factor(params[0].dtype, factor)
    count: Tensor | None = None
    for x, *inputs in _slices(chunks, params, *direction.inputs):
        mask = direction.compute(*inputs)
        if multiplier is not None:
            part = _multiply_(x, mask, multiplier, fraction)  # type: ignore[arg-type]
        else:
            _mask_(mask, x)  # type: ignore[arg-type]
            part = _count(mask) if fraction else None
            decayed = _decayed(x, factor)  # type: ignore[arg-type]
            # lerp with a weight of exactly 1 or 0 returns its end or its start bitwise (lerp's two branches)
            torch._foreach_lerp_(x, decayed, mask)  # type: ignore[arg-type]
            del decayed  # before the next chunk's are allocated
        if part is not None:
            count = part if count is None else count + part
        del mask
    return _fraction(count, params) if fraction else None


def _multiply_(weights: list[Tensor], directions: list[Tensor], factor: float, fraction: bool) -> Tensor | None:
    """The in-place form: ``directions`` becomes ``factor`` where ``sign(u) * x >= 0``, else 1; ``x *= it``.

    ``t = min(sign(sign(u) * x), 0)`` is -1 where the signs disagree, else 0 (NaN directions read as 0, as
    in `_mask_`); ``t * (factor - 1) + factor`` is then exactly 1 (``1 - factor`` is exact for a factor in
    ``[1/2, 1]``) or exactly ``factor``. Returns the number of decayed entries if ``fraction``.
    """
    _check_dtype(directions, weights)
    torch._foreach_sign_(directions)
    torch._foreach_mul_(directions, weights)
    torch._foreach_sign_(directions)
    torch._foreach_clamp_max_(directions, 0.0)
    held = _count(directions) if fraction else None  # the entries kept as they are
    torch._foreach_mul_(directions, factor - 1.0)
    torch._foreach_add_(directions, factor)
    torch._foreach_mul_(weights, directions)
    if held is None:
        return None
    return sum(t.numel() for t in weights) - held


def _check_dtype(directions: list[Tensor], weights: list[Tensor]) -> None:
    if directions[0].dtype != weights[0].dtype:
        raise TypeError(
            f"a direction must have its weights' dtype {weights[0].dtype}, got {directions[0].dtype} "
            "(a registered direction function returned another dtype)"
        )


@torch.no_grad()
def measured_cautious_decay_(
    params: list[Tensor],
    before: list[Tensor],
    factor: Coeff,
    chunks: Chunks | None = None,
    fraction: bool = False,
) -> Tensor | None:
    """After the optimizer's step, from the weights before it: ``x += m * (x_old * factor - x_old)``.

    ``m = 1[sign(x_old - x_new) * x_old >= 0]``, the mask of the step's own direction ``u ~ x_old - x_new``.

    Args:
        params: The decayed weights after the step (local tensors of one device and dtype).
        before: Copies of ``params`` taken right before the step (not modified).
        factor: ``1 - lr * weight_decay``, a float or a 0-dim tensor on the device (use 1 on a step the
            GradScaler skipped: the weights did not move, which reads as ``u = 0``, decayed).
        chunks: Ranges of ``params`` from ``cautious_chunks(params, 1)`` (computed if ``None``).
        fraction: Also return the share of entries the mask let through.

    Returns:
        That share as a 0-dim float32 tensor on the device if ``fraction``, else ``None``.
    """
    if not params:
        return _fraction(None, params) if fraction else None
    chunks = chunks if chunks is not None else cautious_chunks(params, 1)
    count: Tensor | None = None
    for x, old in _slices(chunks, params, before):
        mask = torch._foreach_sub(old, x)  # type: ignore[arg-type]
        _mask_(mask, old)  # type: ignore[arg-type]
        if fraction:
            count = _count(mask) if count is None else count + _count(mask)
        step = _decayed(old, factor)  # type: ignore[arg-type]
        torch._foreach_sub_(step, old)  # type: ignore[arg-type]  # exact: x * factor and x are within a factor 2
        torch._foreach_addcmul_(x, mask, step)  # type: ignore[arg-type]
        del mask, step
    return _fraction(count, params) if fraction else None
