"""What the AMP ``GradScaler`` tells a step: the scale still on the gradients, and whether the step is skipped.

Read the same way by the regularizers and the monitor. Non-fused optimizers get their gradients unscaled
before ``on_before_optimizer_step`` (``GradScaler.unscale_``) and are not stepped at all when they hold
inf/NaN; fused ones (``_step_supports_amp_scaling``) are handed the scaled gradients and unscale inside
``step``, which the scaler calls anyway with a ``found_inf`` flag on the optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["found_inf", "grad_scale", "step_ran", "unscaled_in_step"]


def unscaled_in_step(scaler: Any, optimizer: Optimizer) -> bool:
    """Whether ``scaler`` hands ``optimizer`` scaled gradients to unscale inside ``step`` (fused optimizers)."""
    return scaler is not None and bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def grad_scale(scaler: Any, optimizer: Optimizer) -> Tensor | None:
    """The scale still on ``optimizer``'s gradients before its step (a device tensor), ``None`` if unscaled."""
    if unscaled_in_step(scaler, optimizer):
        scale = getattr(scaler, "_scale", None)
        return scale if isinstance(scale, Tensor) else None
    return None


def found_inf(scaler: Any, optimizer: Optimizer) -> Tensor | None:
    """After ``GradScaler.unscale_``: 1.0 if this step will be skipped for inf/NaN gradients, else 0.0.

    A device tensor, so masking with it needs no host sync. ``None`` without a scaler.
    """
    if scaler is None:
        return None
    if unscaled_in_step(scaler, optimizer):
        found = getattr(optimizer, "found_inf", None)  # set by GradScaler.step around a fused step
        return found if isinstance(found, Tensor) else None
    states = getattr(scaler, "_per_optimizer_states", None)
    per_device = (states or {}).get(id(optimizer), {}).get("found_inf_per_device") if states else None
    if not per_device:
        return None
    values = list(per_device.values())
    return values[0] if len(values) == 1 else torch.stack([v.to(values[0].device) for v in values]).sum()


def step_ran(optimizer: Optimizer) -> bool:
    """In an optimizer step post-hook: whether the step really updated the weights.

    Step hooks do not run at all when the GradScaler skips a step, except for fused optimizers, which it
    steps anyway with a ``found_inf`` flag; reading that flag is the one host sync here.
    """
    found = getattr(optimizer, "found_inf", None)
    return not (isinstance(found, Tensor) and found.item() != 0)
