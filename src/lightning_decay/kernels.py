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
    """
    if not params:
        return
    magnitude = torch._foreach_abs(params)
    torch._foreach_sub_(magnitude, threshold)
    torch._foreach_clamp_min_(magnitude, 0.0)
    signs = torch._foreach_sign(params)
    torch._foreach_mul_(magnitude, signs)
    torch._foreach_copy_(params, magnitude)


@torch.no_grad()
def decay_(params: list[Tensor], factor: Coeff) -> None:
    """Decoupled weight decay, ``w <- factor * w`` (``factor = 1 - lr * weight_decay`` for AdamW)."""
    if params:
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
