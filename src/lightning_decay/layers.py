"""Layer-wise learning-rate decay: the layer of every parameter and its lr scale. No framework involved.

Fine-tuning recipes for ViT, ConvNeXt, Swin and BERT (BEiT, MAE, timm's ``param_groups_layer_decay``,
mmengine's layer-decay constructor) give the parameters of layer ``i`` of ``L`` the learning rate
``lr * layer_decay ** (L - 1 - i)``: the head trains at the full rate, the embeddings at the smallest.

The layer of a parameter comes from, in this order:

1. ``layer_of``: a ``name -> int | None`` callable or a mapping of glob patterns to layer ids (first
   match wins; ``-1`` is the last layer, ``-2`` the one below...); ``None`` / no match defers to 2-3;
2. a timm model's ``group_matcher(coarse=False)``, grouped exactly as timm's ``group_parameters(...,
   reverse=True)`` does (the model itself or the first submodule that has one; parameters outside it
   go to the last layer, like timm's default for names its map lacks);
3. the module tree (BEiT/MAE convention): the main stack of blocks -- the ``ModuleList``/``Sequential``
   whose children holding parameters are of one class, with the most parameters -- gives block ``k``
   layer ``k + 1``; parameters registered before the stack (embeddings, class token, position
   embeddings) are layer 0, those after it (final norm, head) the last layer.

With ``L = max id + 1`` the scale of layer ``i`` is ``layer_decay ** (L - 1 - i)``, as in timm.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_decay.names import clean_names

__all__ = [
    "LayerAssignment",
    "LayerOf",
    "apply_lr_scale",
    "assign_layers",
    "find_stack",
    "group_with_matcher",
    "validate_layer_decay",
]

#: ``name -> layer id | None`` or ``{glob pattern: layer id}``; negative ids count from the last layer.
LayerOf = Callable[[str], "int | None"] | Mapping[str, int]

# timm's `MATCH_PREV_GROUP`: a matcher suffix that puts a name in the group of the ordinal before it.
_MATCH_PREV_GROUP = 99999


def validate_layer_decay(value: float | None, argument: str = "layer_decay") -> float | None:
    """``value`` as a Python float (NumPy scalars too), or ``None``; raise unless it is in ``(0, 1]``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{argument}` must be a float in (0, 1] or None, got {type(value).__name__}: {value!r}")
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"`{argument}` must be in (0, 1] (1 = no layer-wise decay), got {value!r}")
    return float(value)


def _validate_layer_of(layer_of: LayerOf | None) -> None:
    if layer_of is None or callable(layer_of):
        return
    if not isinstance(layer_of, Mapping):
        raise TypeError(
            "`layer_of` must be a callable name -> int | None or a mapping of glob patterns to layer ids, "
            f"got {type(layer_of).__name__}"
        )
    for pattern, layer in layer_of.items():
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"`layer_of` keys must be non-empty glob patterns, got {pattern!r}")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"`layer_of[{pattern!r}]` must be an int layer id (negative: from the last), got {layer!r}")


# ---------------------------------------------------------------------------------------- timm's grouping
def group_with_matcher(names: Iterable[str], matcher: Mapping[str, Any] | Callable[[str], Any]) -> dict[str, int]:
    """Layer id of each name from a timm ``group_matcher``: timm's ``group_with_matcher(..., reverse=True)``.

    A dict matcher maps group names to a regex or to a list of ``(regex, suffix)``; a name gets the ordinal
    tuple ``(group position, *captured numbers, *suffix)`` of the first regex that matches it (``re.match``)
    and ``(inf,)`` when none does. The sorted distinct tuples become ids 0, 1, 2...; a tuple ending in
    ``99999`` joins the id of the tuple before it (timm's ``MATCH_PREV_GROUP``, used for a final norm).

    Args:
        names: Parameter names, in the model's order.
        matcher: The dict returned by a timm model's ``group_matcher(coarse=False)``, or a callable
            ``name -> ordinal | tuple of ordinals``.

    Returns:
        ``name -> layer id``.
    """
    if isinstance(matcher, Mapping):
        compiled: list[tuple[re.Pattern[str], tuple[int, ...], Any]] = []
        for ordinal, spec in enumerate(matcher.values()):
            if spec is None:
                continue
            if isinstance(spec, (tuple, list)):
                compiled += [(re.compile(sub[0]), (ordinal,), sub[1]) for sub in spec]
            else:
                compiled.append((re.compile(spec), (ordinal,), None))

        def grouping(name: str) -> tuple[float, ...]:
            for regex, prefix, suffix in compiled:
                match = regex.match(name)
                if match:
                    parts = (prefix, match.groups(), suffix)
                    return tuple(map(float, chain.from_iterable(p for p in parts if p)))
            return (float("inf"),)  # unmatched (neck, head): the largest ordinal

    elif callable(matcher):
        function = matcher

        def grouping(name: str) -> tuple[float, ...]:
            ordinal = function(name)
            return tuple(ordinal) if isinstance(ordinal, Iterable) else (ordinal,)

    else:
        raise TypeError(f"a group_matcher must return a dict or a callable, got {type(matcher).__name__}")

    by_key: dict[tuple[float, ...], list[str]] = defaultdict(list)
    for name in names:
        by_key[grouping(name)].append(name)
    ids: dict[str, int] = {}
    layer = -1
    for key in sorted(by_key):
        if layer < 0 or key[-1] != _MATCH_PREV_GROUP:
            layer += 1
        for name in by_key[key]:
            ids[name] = layer
    return ids


# --------------------------------------------------------------------------------------- module tree
def find_stack(module: nn.Module) -> tuple[str, list[str]] | None:
    """The main stack of blocks of ``module``: ``(its name, names of its children holding parameters)``.

    Candidates are ``nn.ModuleList`` / ``nn.Sequential`` containers with at least two children that hold
    parameters. Stacks of one block class (transformer layers, ResNet stages) beat mixed ones; among
    those the one holding the most parameters wins. ``None`` when there is no candidate.
    """
    best: tuple[tuple[bool, int], str, list[str]] | None = None
    for name, mod in module.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        children = [(n, c) for n, c in mod.named_children() if next(c.parameters(), None) is not None]
        if len(children) < 2:
            continue
        key = (len({type(c) for _, c in children}) == 1, sum(p.numel() for p in mod.parameters()))
        if best is None or key > best[0]:
            best = (key, name, [n for n, _ in children])
    return None if best is None else (best[1], best[2])


def _prefix(names: dict[str, str], module_name: str) -> str:
    """The cleaned dotted prefix of a submodule's parameter names (``""`` for the root); ``names`` is
    `clean_names` of the root (wrappers decided from the module tree)."""
    clean = names.get(module_name, module_name) if module_name else ""
    return f"{clean}." if clean else ""


@dataclass(frozen=True)
class LayerAssignment:
    """The layer of every parameter name of a model, and why.

    Attributes:
        layers: Cleaned parameter name (every name of a tied parameter) -> layer id in ``0 .. num_layers-1``.
        reasons: Name -> how its layer was found, in words.
        num_layers: ``L = max id + 1``.
        source: How the layers were found, for the whole model (``"timm group_matcher of ..."``,
            ``"stack 'encoder.layer' (4 blocks)"``, ``"layer_of"``).
    """

    layers: dict[str, int]
    reasons: dict[str, str]
    num_layers: int
    source: str

    def lr_scale(self, name: str, layer_decay: float) -> float:
        """``layer_decay ** (L - 1 - layer)``: the same float timm's ``param_groups_layer_decay`` computes."""
        return layer_decay ** (self.num_layers - 1 - self.layers[name])

    def explain(self, name: str, layer_decay: float | None = None) -> str:
        """``"layer 3 of 6 (stack 'blocks' block 2), lr_scale 0.75**2 = 0.5625"``."""
        layer = self.layers[name]
        text = f"layer {layer} of {self.num_layers} ({self.reasons[name]})"
        if layer_decay is not None:
            power = self.num_layers - 1 - layer
            text += f", lr_scale {layer_decay:g}**{power} = {self.lr_scale(name, layer_decay):.4g}"
        return text


def assign_layers(
    module: nn.Module | None, names: Sequence[str] = (), layer_of: LayerOf | None = None
) -> LayerAssignment:
    """Find the layer of every parameter of ``module`` (see the module docstring for the order of sources).

    Args:
        module: The model; ``None`` when only ``layer_of`` decides (then it must cover every name).
        names: Names to cover besides ``module``'s own (cleaned) parameter names.
        layer_of: Overrides: ``name -> int | None`` or ``{glob pattern: int}``; negative ids count from the
            last layer.

    Returns:
        A [`LayerAssignment`][lightning_decay.layers.LayerAssignment].

    Raises:
        ValueError: If some parameter has no layer (no ``group_matcher``, no stack of blocks and no
            ``layer_of`` entry), or a negative id reaches below layer 0.
        TypeError: If ``layer_of`` is neither a callable nor a mapping of patterns to ints, or returns a
            non-int.

    Examples:
        ```python
        from torch import nn
        from lightning_decay.layers import assign_layers

        class Bert(nn.Module):
            def __init__(self):
                super().__init__()
                self.embeddings = nn.Embedding(100, 8)
                self.layer = nn.ModuleList(nn.TransformerEncoderLayer(8, 2, 16) for _ in range(3))
                self.pooler = nn.Linear(8, 8)

        a = assign_layers(Bert())
        a.layers["embeddings.weight"], a.layers["layer.2.linear1.weight"], a.layers["pooler.weight"]  # (0, 3, 4)
        a.explain("layer.2.linear1.weight", 0.5)  # "layer 3 of 5 (stack 'layer' block 2), lr_scale 0.5**1 = 0.5"
        ```
    """
    _validate_layer_of(layer_of)
    all_names = list(dict.fromkeys([*_param_names(module), *names]))
    layers: dict[str, int] = {}
    reasons: dict[str, str] = {}
    source = "layer_of"
    auto_error = ""
    if module is not None:
        found = _timm_layers(module) or _stack_layers(module)
        if found is None:
            auto_error = (
                f"{type(module).__name__} has no timm `group_matcher` and no stack of blocks (a ModuleList or "
                "Sequential with two or more children holding parameters)"
            )
        else:
            layers, reasons, source = found

    overridden: dict[str, int] = {}
    if layer_of is not None:
        for name in all_names:
            if callable(layer_of):
                value = layer_of(name)
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError(f"`layer_of({name!r})` must return an int or None, got {value!r}")
                overridden[name], why = value, "layer_of"
            else:
                pattern = next((p for p in layer_of if fnmatch.fnmatchcase(name, p)), None)
                if pattern is None:
                    continue
                overridden[name], why = layer_of[pattern], f"layer_of pattern {pattern!r}"
            reasons[name] = why
    missing = [n for n in all_names if n not in layers and n not in overridden]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(
            f"layer-wise lr decay: no layer for {shown}. {auto_error or 'They are outside the model'}; give "
            "`layer_of` a callable name -> int or a mapping of glob patterns to layer ids "
            "(for instance {'embed.*': 0, 'blocks.*': ..., 'head.*': -1})"
        )
    kept = {n: v for n, v in layers.items() if n not in overridden}
    non_negative = [*kept.values(), *(v for v in overridden.values() if v >= 0)]
    num_layers = max(non_negative, default=0) + 1
    for name, value in overridden.items():
        resolved = value if value >= 0 else num_layers + value
        if resolved < 0:
            raise ValueError(f"`layer_of` gives {name!r} layer {value}, below layer 0 of the {num_layers} layers found")
        kept[name] = resolved
    return LayerAssignment({n: kept[n] for n in all_names}, reasons, num_layers, source)


def _param_names(module: nn.Module | None) -> list[str]:
    if module is None:
        return []
    names = clean_names(module)
    return [names.get(n, n) for n, _ in module.named_parameters(remove_duplicate=False)]


def _timm_layers(module: nn.Module) -> tuple[dict[str, int], dict[str, str], str] | None:
    owner_name, owner = next(
        ((n, m) for n, m in module.named_modules() if callable(getattr(m, "group_matcher", None))), (None, None)
    )
    if owner is None:
        return None
    names = clean_names(module)
    prefix = _prefix(names, owner_name or "")
    # timm groups `model.named_parameters()` (tied ones once) under their own names.
    own = clean_names(owner)
    relative = [own.get(n, n) for n, _ in owner.named_parameters()]
    ids = group_with_matcher(relative, owner.group_matcher(coarse=False))
    last = max(ids.values(), default=0)
    where = f"timm group_matcher of {type(owner).__name__}" + (f" {owner_name!r}" if owner_name else "")
    layers = {prefix + n: i for n, i in ids.items()}
    reasons = {prefix + n: where for n in ids}
    first_name = {id(p): prefix + own.get(n, n) for n, p in owner.named_parameters()}
    for full, param in module.named_parameters(remove_duplicate=False):
        name = names.get(full, full)
        if name in layers:
            continue
        first = first_name.get(id(param))
        if first is not None:  # a tied alias: the layer of the name timm saw
            layers[name], reasons[name] = layers[first], reasons[first]
        else:  # timm's `layer_map.get(name, layer_max)`
            layers[name], reasons[name] = last, f"outside {type(owner).__name__}: last layer"
    return layers, reasons, where


def _stack_layers(module: nn.Module) -> tuple[dict[str, int], dict[str, str], str] | None:
    found = find_stack(module)
    if found is None:
        return None
    stack_name, children = found
    names = clean_names(module)
    stack = repr(names.get(stack_name, stack_name)) if stack_name else "(the model's children)"
    prefix = _prefix(names, stack_name)
    block_of = {f"{prefix}{child}.": k for k, child in enumerate(children)}
    last = len(children) + 1
    layers: dict[str, int] = {}
    reasons: dict[str, str] = {}
    seen_stack = False
    for name in _param_names(module):
        block = next((k for p, k in block_of.items() if name.startswith(p)), None)
        if block is not None:
            seen_stack = True
            layers[name], reasons[name] = block + 1, f"stack {stack} block {block}"
        elif not seen_stack:
            layers[name], reasons[name] = 0, f"before stack {stack}"
        else:
            layers[name], reasons[name] = last, f"after stack {stack}"
    return layers, reasons, f"stack {stack} ({len(children)} blocks)"


# -------------------------------------------------------------------------------------- applying it
def apply_lr_scale(groups: Optimizer | Sequence[dict[str, Any]], base_lr: float | None = None) -> None:
    """Fold each group's ``"lr_scale"`` into its ``"lr"`` (in place) and drop the key.

    torch's and Lightning's schedulers scale each group's ``lr`` from the ``initial_lr`` they record, so
    the ratios between layers hold through warm-up and decay once the scale is in ``lr``. The key is
    dropped so that a timm scheduler (which multiplies by ``lr_scale`` itself) does not apply it twice.
    Call it after building the optimizer and before building the scheduler.

    Args:
        groups: An optimizer, or parameter groups.
        base_lr: The lr of groups without an ``"lr"`` key (groups given as dicts); an optimizer fills
            every group's ``lr`` with its default.

    Raises:
        ValueError: If a group with ``lr_scale`` has no ``lr`` and no ``base_lr`` is given.

    Examples:
        ```python
        import torch
        from lightning_decay import decay_param_groups
        from lightning_decay.layers import apply_lr_scale

        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        opt = torch.optim.AdamW(decay_param_groups(model, 0.05, layer_decay=0.5), lr=1e-3)
        apply_lr_scale(opt)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        [g["lr"] for g in opt.param_groups[::2]]  # [0.00025, 0.0005, 0.001]
        ```
    """
    param_groups = groups.param_groups if isinstance(groups, Optimizer) else groups
    for i, group in enumerate(param_groups):
        if "lr_scale" not in group:
            continue
        lr = group.get("lr", base_lr)
        if lr is None:
            raise ValueError(
                f"param group {group.get('name', i)!r} has an lr_scale but no lr: pass `base_lr` or an optimizer"
            )
        group["lr"] = lr * group.pop("lr_scale")
