"""Which keys may go where: the rule options, glob-pattern arguments, and param-group options.

One module for every check of an option's *name*, so that ``rules`` and ``plan`` (which builds the groups)
share them without importing each other, and the two group checks -- options about to be put on groups
(`check_group_options`) and the groups of a built optimizer (`check_optimizer_groups`) -- explain a
misplaced key with the same words.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_decay._messages import closest_names

__all__ = [
    "BOOKKEEPING_KEYS",
    "RULE_OPTIONS",
    "check_group_options",
    "check_optimizer_groups",
    "known_options",
    "patterns",
    "torch_group_options",
]

#: The options of ``DecayRules``, in the order of its ``__init__``.
RULE_OPTIONS = (
    "exclude",
    "include",
    "exclude_modules",
    "predicate",
    "decay_bias",
    "decay_norm",
    "decay_embeddings",
    "decay_vectors",
    "use_model_hooks",
    "decay_position_bias",
)

#: Keys a param group may carry besides the optimizer's hyperparameters: ours, and torch schedulers' own.
BOOKKEEPING_KEYS = frozenset({"params", "name", "lr_scale", "initial_lr"})

# Arguments of grouping functions (ours, timm's `param_groups_*`, mmengine's `paramwise_cfg`) that end up in
# every group when passed where group options are expected: torch's optimizers keep them without a word.
_NOT_GROUP_OPTIONS: dict[str, str] = {
    "layer_of": "an argument of layer-wise lr decay: pass it with `layer_decay=`",
    "no_weight_decay_list": "timm's argument: use DecayRules(exclude=[...]) or the model's no_weight_decay()",
    "simple_params_list": "a timm argument this package does not support",
    "weight_decay_exclude_1d": "timm's argument: use DecayRules(decay_vectors=...)",
    "min_scale": "a timm layer-decay argument this package does not support",
    "no_opt_scale": "a timm layer-decay argument this package does not support",
    "layers_per_group": "a timm argument this package does not support: use `layer_of`",
    "num_groups": "a timm argument this package does not support: use `layer_of`",
    "custom_keys": "mmengine's argument: use `overrides={pattern: options}`",
    "bias_decay_mult": "mmengine's argument: use DecayRules(decay_bias=...) or `overrides`",
    "norm_decay_mult": "mmengine's argument: use DecayRules(decay_norm=...) or `overrides`",
    "bias_lr_mult": "mmengine's argument: use `overrides` with an `lr`",
    "layer_wise_decay_rate": "mmengine's name: use `layer_decay=`",
    "layer_decay_rate": "mmengine's name: use `layer_decay=`",
}


def patterns(value: Sequence[str] | str, argument: str) -> tuple[str, ...]:
    """Glob patterns as a tuple; one string is one pattern. Shared by every pattern argument."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise TypeError(
            f"`{argument}` must be a list of glob pattern strings (or one string), "
            f"got {type(value).__name__}: {value!r}"
        )
    out = tuple(value)
    for p in out:
        if not isinstance(p, str) or not p:
            raise TypeError(f"`{argument}` must hold non-empty glob pattern strings, got {p!r}")
    return out


def misplaced(key: str) -> str | None:
    """Why ``key`` is not an optimizer option when it is known to belong elsewhere, else ``None``."""
    if key == "rules" or key in RULE_OPTIONS:
        return "a DecayRules option: give it to DecayRules(...) and pass `rules=`"
    return _NOT_GROUP_OPTIONS.get(key)


def check_group_options(options: Mapping[str, Any], where: str, layer_decay: bool = False) -> None:
    """Refuse group options that are set per group or belong to a grouping function, not an optimizer.

    Keys no ``torch.optim`` optimizer takes are warned about (with the closest name), not refused: a custom
    optimizer may read them.
    """
    reserved = {"params", "name", *(("lr_scale",) if layer_decay else ())} & set(options)
    if reserved:
        raise ValueError(f"{where} may not set {sorted(reserved)} as group options: they are set per group")
    for key in options:
        why = misplaced(key)
        if why is not None:
            raise ValueError(f"{where}: {key!r} is not an optimizer option but {why}")
    # torch's optimizers keep any group key without a word, so a typo (`momentun`) or a grouping argument
    # we do not know would be silently ignored. Custom optimizers have options of their own: warn, not refuse.
    unknown = [key for key in options if key not in torch_group_options()]
    if unknown:
        hints = "; ".join(
            f"{key!r}" + (f" (did you mean {close[0]!r}?)" if (close := closest_names(key, known_options())) else "")
            for key in unknown
        )
        warnings.warn(
            f"{where}: {hints}: not a hyperparameter of any torch.optim optimizer. Put on the groups as "
            "given, and torch's optimizers ignore keys they do not use; keep it only if your optimizer reads it.",
            UserWarning,
            stacklevel=3,
        )


def check_optimizer_groups(optimizer: Optimizer) -> None:
    """Refuse param-group keys that ``optimizer`` does not take (torch's optimizers keep them silently).

    The hyperparameters an optimizer takes are the keys of its ``defaults``; ``name``, ``lr_scale`` and a
    scheduler's ``initial_lr`` are allowed too.

    Raises:
        ValueError: Naming the key, the group and the keys the optimizer takes (and where a key known to
            belong elsewhere goes).
    """
    allowed = set(optimizer.defaults) | BOOKKEEPING_KEYS
    for i, group in enumerate(optimizer.param_groups):
        unknown = sorted(set(group) - allowed)
        if unknown:
            hints = "".join(f" {key!r} is {why}." for key in unknown if (why := misplaced(key)) is not None)
            raise ValueError(
                f"param group {group.get('name', i)!r} sets {unknown}, which {type(optimizer).__name__} does not "
                f"take; its options are {sorted(optimizer.defaults)}.{hints}".rstrip(".")
                + ("." if hints else "")
            )


@functools.cache
def torch_group_options() -> frozenset[str]:
    """Every hyperparameter a ``torch.optim`` optimizer takes (its ``__init__`` arguments but ``params``),
    plus the keys LR schedulers and timm put on groups (``initial_lr``, ``lr_scale``)."""
    names = {"initial_lr", "lr_scale"}
    for obj in vars(torch.optim).values():
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            names.update(p for p in inspect.signature(obj.__init__).parameters if p not in ("self", "params"))
    return frozenset(n for n in names if not n.startswith("_"))


def known_options() -> list[str]:
    return sorted(torch_group_options())
