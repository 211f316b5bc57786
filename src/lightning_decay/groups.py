"""The one-call shortcut from a model to optimizer parameter groups."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_decay.layers import LayerOf
from lightning_decay.rules import DecayRules, as_rules

__all__ = ["decay_param_groups"]


def decay_param_groups(
    module: nn.Module,
    weight_decay: float | None = None,
    rules: DecayRules | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    layer_decay: float | None = None,
    layer_of: LayerOf | None = None,
    **group_kwargs: Any,
) -> list[dict[str, Any]]:
    """Classify ``module`` and return ``"decay"`` / ``"no_decay"`` optimizer parameter groups.

    Equivalent to ``(rules or DecayRules()).classify(module).param_groups(weight_decay, overrides, ...)``.

    Args:
        module: The model.
        weight_decay: Decay of the decay group; ``None`` keeps the optimizer's default.
        rules: The classification policy; default [`DecayRules`][lightning_decay.DecayRules].
        overrides: Glob pattern -> extra group options, see
            [`DecayPlan.param_groups`][lightning_decay.DecayPlan.param_groups].
        layer_decay: Layer-wise lr decay in ``(0, 1]``: groups ``"layer_{i}/decay"`` / ``"layer_{i}/no_decay"``
            with timm's ``"lr_scale"``; fold the scale into ``lr`` with
            [`apply_lr_scale`][lightning_decay.layers.apply_lr_scale] for torch's schedulers.
        layer_of: Layer overrides, see [`lightning_decay.layers`][lightning_decay.layers].
        **group_kwargs: Optimizer options for every group (``lr``, ``betas``, ...). Grouping arguments
            (``DecayRules`` options, timm's ``no_weight_decay_list``...) are refused, not passed on.

    Raises:
        TypeError: If ``rules`` is not a ``DecayRules`` or ``None``, or ``module`` not an ``nn.Module``.
        ValueError: If ``weight_decay`` is negative or not finite, or see
            [`DecayPlan.param_groups`][lightning_decay.DecayPlan.param_groups].

    Examples:
        ```python
        import torch
        from lightning_decay import decay_param_groups

        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
        opt = torch.optim.AdamW(decay_param_groups(model, weight_decay=0.05), lr=1e-3)
        [g["name"] for g in opt.param_groups]  # ['decay', 'no_decay']
        ```
    """
    plan = as_rules(rules).classify(module)
    return plan.param_groups(weight_decay, overrides, layer_decay=layer_decay, layer_of=layer_of, **group_kwargs)
