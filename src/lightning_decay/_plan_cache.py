"""One classification per model and rules, shared by the parts of a fit that need it.

``WeightDecay``, ``WeightPenalty`` (and its L2-SP references), ``WeightNormMonitor`` and
``DecayGroupsMixin`` each need the plan of the same model under rules that are usually equal
(``DecayRules()`` built in each of them). Classifying is linear in the number of parameters but still
walks them all in Python, so a fit with several of these parts classifies once and shares the result.

The cache is keyed by the module (weakly: it does not keep a model alive) and by the value of the
rules' options, and it checks the module's parameters (names and objects) on every lookup, so a
parameter replaced or added (sharding, ``configure_model``, a new head) gives a fresh plan. What it
cannot see is a ``no_weight_decay()`` hook that answers differently from one call to the next.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from lightning_decay.plan import DecayPlan, ParamDecision
from lightning_decay.rules import DecayRules

__all__ = ["plan_for"]

_MAX_RULES_PER_MODULE = 8

# module -> {rules key: (parameter signature, decisions with frozen parameters included)}. The decisions, not
# the plan: a plan refers to its module, which a value of this weak dictionary must not (it would never die).
_Entry = tuple[tuple[Any, ...], tuple[ParamDecision, ...]]
_cache: weakref.WeakKeyDictionary[nn.Module, dict[Any, _Entry]] = weakref.WeakKeyDictionary()


def _rules_key(rules: DecayRules) -> Any:
    """The rules' options as a hashable value, or ``None`` when they cannot be compared safely."""
    items = []
    for name, value in sorted(vars(rules).items()):
        if name.startswith("_"):
            continue
        if name == "predicate" and value is not None:
            # By identity: a bound method of the model would otherwise keep the model alive in the cache.
            value = ("id", id(value))
        items.append((name, value))
    key = tuple(items)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _signature(module: nn.Module) -> tuple[Any, ...]:
    # Names and objects: a parameter replaced, added, removed or renamed (a wrapper inserted) changes it.
    return tuple([(name, id(p)) for name, p in module.named_parameters(remove_duplicate=False)])


def plan_for(rules: DecayRules, module: nn.Module, include_frozen: bool = False) -> DecayPlan:
    """``rules.classify(module, include_frozen)``, computed once per model, rules and set of parameters.

    The plan is computed with the frozen parameters included and filtered for ``include_frozen=False``
    (``requires_grad`` is read at each call, so unfreezing needs no new classification).
    """
    key = _rules_key(rules)
    if key is None or not isinstance(module, nn.Module):
        return rules.classify(module, include_frozen=include_frozen)
    signature = _signature(module)
    per_module = _cache.setdefault(module, {})
    cached = per_module.get(key)
    if cached is not None and cached[0] == signature:
        full = cached[1]
    else:
        full = rules.classify(module, include_frozen=True).decisions
        if len(per_module) >= _MAX_RULES_PER_MODULE:
            per_module.pop(next(iter(per_module)))
        per_module[key] = (signature, full)
    if include_frozen:
        return DecayPlan(full, module=module)
    decisions = [d for d in full if d.param.requires_grad]
    if not decisions:
        return rules.classify(module)  # raises the "all frozen" error of `classify`
    return DecayPlan(decisions, [d.name for d in full if not d.param.requires_grad], module=module)
