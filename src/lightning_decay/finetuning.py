"""Unfreezing mid-training (``BaseFinetuning``) into decay / no-decay groups instead of one flat group."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_decay._compat import BaseFinetuning
from lightning_decay._plan_cache import plan_for
from lightning_decay.rules import DecayRules, as_rules, module_rules
from lightning_decay.schedules import check_coefficient

__all__ = ["unfreeze_and_add_decay_groups"]


def unfreeze_and_add_decay_groups(
    modules: nn.Module | Iterable[Any],
    optimizer: Optimizer,
    lr: float | None = None,
    initial_denom_lr: float = 10.0,
    train_bn: bool = True,
    weight_decay: float | None = None,
    rules: DecayRules | None = None,
    name: str | None = None,
    model: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """``BaseFinetuning.unfreeze_and_add_param_group`` that adds ``"decay"`` / ``"no_decay"`` groups.

    Lightning's helper adds the unfrozen parameters as one group, which inherits the optimizer's default
    ``weight_decay``: biases and normalization parameters get decayed. This one unfreezes the same way
    (same ``lr``, ``initial_denom_lr`` and ``train_bn`` meaning, parameters already in the optimizer
    skipped) and splits them with ``rules``: the decay group gets ``weight_decay``, the no-decay group an
    explicit ``0.0``. With [`WeightDecay`][lightning_decay.WeightDecay] or
    [`WeightPenalty`][lightning_decay.WeightPenalty] attached (optimizer ``weight_decay=0``), Lightning's own
    helper is enough: the callbacks pick new groups up at the next step.

    Args:
        modules: A module, or an iterable of modules, to unfreeze. Without ``model``, ``rules`` see parameter
            names relative to each module.
        optimizer: The optimizer the groups are added to (``finetune_function``'s argument).
        lr: Learning rate of the new groups; ``None``: the first group's, divided by ``initial_denom_lr``.
        initial_denom_lr: See ``lr``.
        train_bn: Whether batch-norm layers are unfrozen too.
        weight_decay: Decay of the new decay group; ``None``: that of the optimizer's group named
            ``"decay"`` (from [`decay_param_groups`][lightning_decay.decay_param_groups]) if there is one,
            else the optimizer's default.
        rules: The classification; default [`DecayRules`][lightning_decay.DecayRules].
        name: The new groups are named ``"{name}/decay"`` and ``"{name}/no_decay"`` (default ``"unfrozen"``,
            numbered ``"unfrozen-2"``... when taken, since ``LearningRateMonitor`` refuses repeated names).
        model: The whole model (the LightningModule ``finetune_function`` gets). Given, the parameters are
            classified as part of it, exactly as the callbacks and the mixin classify them: the plan of the
            fit, computed once and shared, with the model's names (wrappers removed where the module tree has
            them), its ``no_weight_decay()`` hooks and, without ``rules``, its ``decay_rules``.

    Returns:
        The groups added (none if every parameter was already in the optimizer).

    Raises:
        ValueError: If ``weight_decay`` is negative or not finite.
        TypeError: If ``rules`` is not a ``DecayRules``, or ``model`` not an ``nn.Module``.

    Examples:
        ```python
        import torch
        from lightning_decay import decay_param_groups, unfreeze_and_add_decay_groups

        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
        model[:2].requires_grad_(False)  # a frozen backbone
        opt = torch.optim.AdamW(decay_param_groups(model[2], weight_decay=0.05), lr=1e-3)
        added = unfreeze_and_add_decay_groups(model[:2], opt, lr=1e-4, model=model)  # in finetune_function
        [(g["name"], g["weight_decay"]) for g in added]  # [('unfrozen/decay', 0.05), ('unfrozen/no_decay', 0.0)]
        ```
    """
    as_rules(rules)  # a TypeError naming `rules` for anything but DecayRules or None
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module (the LightningModule) or None, got {type(model).__name__}")
    if weight_decay is not None:
        weight_decay = check_coefficient(weight_decay, "weight_decay")
    BaseFinetuning.make_trainable(modules)
    params_lr = optimizer.param_groups[0]["lr"] if lr is None else float(lr)
    denom_lr = initial_denom_lr if lr is None else 1.0
    params = BaseFinetuning.filter_params(modules, train_bn=train_bn, requires_grad=True)
    wanted = {id(p) for p in BaseFinetuning.filter_on_optimizer(optimizer, params)}
    if not wanted:
        return []
    # The cached plan (`plan_for`), shared with the callbacks when it is the same model and rules.
    rules = module_rules(model, rules) if model is not None else (rules or DecayRules())
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for root in [model] if model is not None else _roots(modules):
        for d in plan_for(rules, root, include_frozen=True).decisions:
            if id(d.param) in wanted:
                wanted.discard(id(d.param))  # once, even if two roots share it
                (decay if d.decay else no_decay).append(d.param)
    if weight_decay is None:
        weight_decay = next((g["weight_decay"] for g in optimizer.param_groups if g.get("name") == "decay"), None)
    prefix = _free_name(optimizer, name or "unfrozen")
    groups: list[dict[str, Any]] = []
    if decay:
        group: dict[str, Any] = {"params": decay, "lr": params_lr / denom_lr, "name": f"{prefix}/decay"}
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    if no_decay:
        groups.append(
            {"params": no_decay, "lr": params_lr / denom_lr, "weight_decay": 0.0, "name": f"{prefix}/no_decay"}
        )
    for group in groups:
        optimizer.add_param_group(group)
    return [
        optimizer.param_groups[i] for i in range(len(optimizer.param_groups) - len(groups), len(optimizer.param_groups))
    ]


def _roots(modules: nn.Module | Iterable[Any]) -> list[nn.Module]:
    if isinstance(modules, nn.Module):
        return [modules]
    return [m for item in modules for m in _roots(item)]


def _free_name(optimizer: Optimizer, base: str) -> str:
    taken = {str(g.get("name", "")).rsplit("/", 1)[0] for g in optimizer.param_groups}
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name
