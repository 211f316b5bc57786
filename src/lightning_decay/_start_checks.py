"""Checks a regularizer makes when training starts, on the optimizers it is bound to, before the first step.

Both read only a `lightning_decay._binding.Binding` (its plan, its optimizers, what it selects and where it
pulls): `refuse_later_double_decay` refuses a double decay that ``BaseFinetuning`` would start at its
unfreeze epoch, `warn_group_names` warns when the optimizer's named groups say another set of rules built
them. The Lightning adapter (``lightning_decay._lightning``) calls them from ``on_train_start``.
"""

from __future__ import annotations

from typing import Any

from lightning_decay._binding import Binding, double_decay
from lightning_decay._compat import MisconfigurationException, rank_zero_warn
from lightning_decay._messages import few_names
from lightning_decay.plan import ParamDecision

__all__ = ["group_kind", "refuse_later_double_decay", "warn_group_names"]


def refuse_later_double_decay(binding: Binding, finetuning: str, can_take_over: bool) -> None:
    """Refuse, before the first step, a double decay that ``BaseFinetuning`` would start at its unfreeze epoch.

    ``unfreeze_and_add_param_group`` adds a group without ``weight_decay``, so the group gets the optimizer's
    default (AdamW's is 0.01) although the groups given were built with 0: the parameters the binding
    regularizes and the optimizer does not hold yet would be decayed twice from then on.

    Args:
        binding: The regularizer's binding, bound to the run's optimizers.
        finetuning: The class name of the ``BaseFinetuning`` callback of the run.
        can_take_over: Whether the regularizer can take an optimizer's decay over (``WeightDecay``), for the hint.

    Raises:
        MisconfigurationException: If such a group would be decayed twice.
    """
    if not binding.decays():
        return
    assert binding.plan is not None
    for entry in binding.bound:
        optimizer = entry.optimizer
        wd = optimizer.defaults.get("weight_decay", 0.0)
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        later = [d.name for d in binding.plan if binding.selects(d) and id(d.param) not in held]
        if wd and later:
            opt, pull = type(optimizer).__name__, binding.pull()
            take_over = ", or let WeightDecay(weight_decay=None) take it over" if can_take_over else ""
            raise MisconfigurationException(
                f"{double_decay(pull)} ahead: {finetuning} adds param groups when it unfreezes, and "
                f"a group added without weight_decay gets {opt}'s default weight_decay={wd} "
                f"(`optimizer.defaults`), on parameters {binding.owner} also pulls {pull} and the optimizer "
                f"does not hold yet ({few_names(later, 3)}). Build the optimizer with weight_decay=0 as its "
                f"default too (`{opt}(groups, lr=..., weight_decay=0.0)`){take_over}."
            )


def warn_group_names(binding: Binding, given: str | None) -> None:
    """Warn when the optimizer's groups say otherwise: decayed weights in a ``no_decay`` group, or vice versa.

    Named groups (``decay_param_groups``, the mixin, timm's ``layer_3_no_decay``) tell which rules built
    them; rules of the regularizer that disagree usually mean two different sets of rules for one run.
    ``given``: how the message names the regularizer's rules (``"rules="``), ``None`` when it was given none.
    """
    plan = binding.plan
    assert plan is not None
    found: dict[str, list[str]] = {"no_decay": [], "decay": []}
    for entry in binding.bound:
        for group in entry.optimizer.param_groups:
            kind = group_kind(group.get("name"))
            if kind is None:
                continue
            for p in group["params"]:
                d: ParamDecision | None = plan.decision_for(p)
                if d is not None and p.requires_grad and binding.selects(d) == (kind == "no_decay"):
                    found[kind].append(d.name)
    where = given or "rules (the LightningModule's decay_rules or defaults)"
    for kind, verb in (("no_decay", "regularizes"), ("decay", "leaves alone")):
        if found[kind]:
            rank_zero_warn(
                f"{binding.owner} {verb} {few_names(found[kind], 3)}, which the optimizer holds in a "
                f"{kind!r} group: its {where} and the rules that built the groups differ. Use one DecayRules "
                "for both (set the LightningModule's `decay_rules` and give the callback no `rules`)."
            )


def group_kind(name: Any) -> str | None:
    """``"decay"`` / ``"no_decay"`` for a param group named so (``"no_decay"``, ``"layer_3/decay"``,
    timm's ``"layer_3_no_decay"``), else ``None``."""
    if not isinstance(name, str):
        return None
    for kind in ("no_decay", "decay"):  # "no_decay" first: it ends in "decay" too
        if name == kind or name.endswith((f"/{kind}", f"_{kind}")):
            return kind
    return None
