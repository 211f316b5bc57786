"""Penalty and decay kernels on lists of tensors of one device and dtype, as torch's optimizers do.

Every function takes plain (local) tensors, runs ``torch._foreach_*`` kernels, and never moves a
value to the host. They run under ``torch.no_grad()``: optimizer step hooks run outside the
optimizer's own no-grad region. Coefficients are Python floats or 0-dim tensors on the tensors' device (the AMP
scale, a ``found_inf`` mask), so nothing here waits for the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "add_l1_subgradient_",
    "add_l2_gradient_",
    "decay_",
    "soft_threshold_",
    "squared_distances",
    "sum_abs",
]

Coeff = float | Tensor


def _scaled(tensors: list[Tensor], coeff: Coeff) -> list[Tensor]:
    return torch._foreach_mul(tensors, coeff)


@torch.no_grad()
def add_l2_gradient_(grads: list[Tensor], params: list[Tensor], coeff: Coeff, refs: list[Tensor] | None = None) -> None:
    """``g += coeff * (w - ref)``, the gradient of ``coeff / 2 * ||w - ref||^2`` (``ref = 0`` if ``None``)."""
    if not grads:
        return
    diff = params if refs is None else torch._foreach_sub(params, refs)
    if isinstance(coeff, Tensor):
        torch._foreach_add_(grads, _scaled(diff, coeff))
    else:
        torch._foreach_add_(grads, diff, alpha=coeff)


@torch.no_grad()
def add_l1_subgradient_(grads: list[Tensor], params: list[Tensor], coeff: Coeff) -> None:
    """``g += coeff * sign(w)``, a subgradient of ``coeff * ||w||_1`` (0 at ``w == 0``)."""
    if not grads:
        return
    signs = torch._foreach_sign(params)
    if isinstance(coeff, Tensor):
        torch._foreach_add_(grads, _scaled(signs, coeff))
    else:
        torch._foreach_add_(grads, signs, alpha=coeff)


@torch.no_grad()
def soft_threshold_(params: list[Tensor], threshold: Coeff) -> None:
    """Proximal step of ``threshold * ||w||_1``: ``w <- sign(w) * max(|w| - threshold, 0)``, in place.

    It produces exact zeros, unlike the subgradient, which makes weights oscillate around zero.

    Computed as ``w - clamp(w, -threshold, threshold)``: three passes and one temporary list (instead
    of six passes and two), with the same values as the formula above (shrunk weights are ``+0.0``
    where the formula gives ``-0.0`` for negative ones). A 0-dim tensor ``threshold`` is broadcast on
    the device, never read on the host.
    """
    if not params:
        return
    if isinstance(threshold, Tensor):
        upper, lower = [threshold] * len(params), [torch.neg(threshold)] * len(params)
        inside = torch._foreach_clamp_max(params, upper)
        torch._foreach_clamp_min_(inside, lower)
    else:
        inside = torch._foreach_clamp_max(params, threshold)
        torch._foreach_clamp_min_(inside, -threshold)
    torch._foreach_sub_(params, inside)


@torch.no_grad()
def decay_(params: list[Tensor], factor: Coeff) -> None:
    """Decoupled weight decay, ``w <- factor * w`` (``factor = 1 - lr * weight_decay`` for AdamW)."""
    if not params:
        return
    if not isinstance(factor, Tensor) and params[0].dtype == torch.float16 and params[0].device.type == "cpu":
        # torch's CPU foreach multiply rounds a Python scalar to float16 before multiplying (`Tensor.mul_`
        # and the optimizers' single-tensor paths do not): a float32 0-dim factor keeps AdamW's result.
        factor = torch.tensor(factor, dtype=torch.float32)
    torch._foreach_mul_(params, factor)


@torch.no_grad()
def squared_distances(params: list[Tensor], refs: list[Tensor] | None = None) -> list[Tensor]:
    """Per-tensor ``||w - ref||_2^2`` in float32 (0-dim tensors on the tensors' device)."""
    if not params:
        return []
    diff = params if refs is None else torch._foreach_sub(params, refs)
    norms = torch._foreach_norm(diff, 2, dtype=torch.float32)
    return torch._foreach_mul(norms, norms)


@torch.no_grad()
def sum_abs(params: list[Tensor]) -> list[Tensor]:
    """Per-tensor ``||w||_1`` in float32."""
    if not params:
        return []
    return list(torch._foreach_norm(params, 1, dtype=torch.float32))
