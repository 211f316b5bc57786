"""Decay / no-decay classification rules: pure functions of a module, no framework involved.

The defaults follow timm, Hugging Face and minGPT where they agree: biases and every parameter of a
normalization layer are not decayed, nor are the position-bias tables added to attention logits (Swin,
BEiT, T5); matrix weights (Linear, convolutions, attention projections, embeddings) are. Every other
parameter with at most one dimension (gains, scalars, BEiT's layer scale, CLIP's class embedding) is not
decayed either, as in timm and minGPT; Hugging Face's Trainer decays those whose names lack "bias" and
"norm".

Precedence, first match wins (documented in ``docs/`` and tested):

1. ``predicate(name, param, module)`` returning ``True`` or ``False``;
2. ``include`` glob patterns (force decay);
3. ``exclude`` glob patterns (no decay);
4. ``exclude_modules`` types (no decay);
5. model hooks: ``no_weight_decay()`` names and ``no_weight_decay_keywords()`` substrings (no decay);
6. built-in rules: position bias table, bias, normalization layer, embedding (only when
   ``decay_embeddings=False``), matrix weight of a known layer (decay), ``ndim <= 1`` (no decay);
7. otherwise decay.

A tied parameter is judged under each of its names. When the names disagree, an explicit user
decision (levels 1-4) wins; if none or conflicting ones were made, *no decay* wins, as in minGPT for
a GPT embedding tied to ``lm_head``. The explanation shows both names.
"""

from __future__ import annotations

import fnmatch
import itertools
import operator
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from operator import attrgetter, itemgetter
from typing import Any

import torch
from torch import nn

from lightning_decay._checks import check_flag
from lightning_decay._options import RULE_OPTIONS, patterns
from lightning_decay.names import named_modules_clean
from lightning_decay.plan import DecayPlan, PlanColumns

__all__ = ["DecayRules", "Predicate", "as_rules", "is_norm_module", "logical_shape", "module_rules"]

#: ``(name, param, module) -> True (decay) | False (no decay) | None (no opinion)``
Predicate = Callable[[str, nn.Parameter, nn.Module], "bool | None"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, LazyBatchNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
# Custom norm layers by the last word of their class name, a dimension suffix aside: LlamaRMSNorm, T5LayerNorm,
# FusedLayerNorm, LayerNorm2d, GroupNorm1, LayerNormalization, Layernorm. A class that merely contains "norm"
# (Enormous, NormalizingFlow, NormalizedLinear, WeightNormedConv, Denormalizer, NormHead) is no norm layer:
# timm and Hugging Face decay its matrices.
_NORM_NAME = re.compile(
    r"(?:Norm|(?:^|_|\d)norm|(?i:layer|rms|batch|group|instance)norm)(?:alization)?(?:_?\d+[dD]?)?$"
)

# Layers whose ``weight`` is a matrix (or a conv kernel) however its storage is sharded or flattened.
_MATRIX_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.RNNCellBase,
)
# `bias`, `in_proj_bias`, RNN `bias_ih_l0`, RNN cell `bias_ih`; not Swin's 2-D `relative_position_bias_table`.
_BIAS = re.compile(r"(^|_)bias($|_[ih]h(_|$))")
# Tables of learned biases added to attention logits, by the parameter's name or its module's: Swin's and BEiT's
# `relative_position_bias_table`, T5's `relative_attention_bias` (an Embedding of buckets x heads), LayoutLM's
# `rel_pos_bias`. Hugging Face's Trainer excludes them (its "bias" pattern), timm through `no_weight_decay()`.
_POSITION_BIAS = re.compile(
    r"relative_position_bias_table|relative_attention_bias|relative_position_bias|rel_pos_bias|rel_pos_[xy]_bias"
)
_EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
# Read over every parameter by `map` (no Python frame per tensor).
_REQUIRES_GRAD, _SHAPE, _NAME = attrgetter("requires_grad"), attrgetter("shape"), attrgetter("__name__")


def is_norm_module(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer: a torch norm layer (or a subclass), or a class whose
    name ends in ``Norm`` / ``Normalization`` (``LlamaRMSNorm``, ``LayerNorm2d``, ``LayerNormalization``)."""
    return _is_norm_class(type(module))


def _is_norm_class(cls: type) -> bool:
    return issubclass(cls, _NORM_TYPES) or bool(_NORM_NAME.search(cls.__name__))


def _is_position_bias(name: str) -> bool:
    """Whether the parameter (the last component of ``name``) or its module (the one before) is named like a
    position-bias table."""
    return any(_POSITION_BIAS.fullmatch(part) for part in name.rsplit(".", 2)[-2:])


# FSDP2's `fully_shard` and composable `replicate` swap a module's class for a dynamic subclass
# `FSDP<Name>(FSDPModule, <Name>)` (`Replicate<Name>`): reasons name `<Name>`, the same sharded or not.
_WRAPPER_PREFIXES = ("FSDP", "Replicate")


def _class_name(module: nn.Module | type) -> str:
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__bases__:
        if any(cls.__name__ == prefix + base.__name__ for prefix in _WRAPPER_PREFIXES):
            return base.__name__
    return cls.__name__


def logical_shape(param: torch.Tensor, flat_shapes: dict[int, torch.Size] | None = None) -> tuple[int, ...]:
    """The shape the user created, not the shard or flat view a strategy holds.

    DTensor (FSDP2) ``.shape`` is already global; DeepSpeed keeps it as ``ds_shape``; FSDP1 flat
    parameters record the original shapes, passed here as ``flat_shapes``.
    """
    return tuple(_stored_shape(param, flat_shapes))


def _stored_shape(param: torch.Tensor, flat_shapes: dict[int, torch.Size] | None) -> Sequence[int]:
    """`logical_shape` as the strategy stores it (a ``torch.Size`` or list): a plan makes it a tuple when read."""
    if flat_shapes and id(param) in flat_shapes:
        return flat_shapes[id(param)]
    ds_shape = getattr(param, "ds_shape", None)
    return param.shape if ds_shape is None else ds_shape


def _split_frozen(owners: list[_Owner]) -> tuple[list[_Owner], list[str]]:
    """The owners of trainable parameters, and the names of the frozen ones (``requires_grad=False``)."""
    trainable = list(map(_REQUIRES_GRAD, map(itemgetter(0), owners)))  # C-level steps, no frame per tensor
    frozen = list(itertools.compress(map(itemgetter(1), owners), map(operator.not_, trainable)))
    return (list(itertools.compress(owners, trainable)) if frozen else owners), frozen


def _stored_shapes(params: Sequence[nn.Parameter], flat_shapes: dict[int, torch.Size]) -> list[Sequence[int]]:
    """`_stored_shape` of each parameter, in one pass."""
    if flat_shapes or any(map(hasattr, params, itertools.repeat("ds_shape"))):
        return [_stored_shape(param, flat_shapes) for param in params]
    return list(map(_SHAPE, params))  # C-level steps: at 100k tensors, half the time of a comprehension


class DecayRules:
    """The policy deciding which parameters get weight decay and L1/L2 penalties.

    Precedence, first match wins:

    1. ``predicate(name, param, module)`` returning ``True`` or ``False``;
    2. ``include`` glob patterns (decay);
    3. ``exclude`` glob patterns (no decay);
    4. ``exclude_modules`` types (no decay);
    5. model hooks: ``no_weight_decay()`` names and ``no_weight_decay_keywords()`` substrings (no decay);
    6. built-in rules: position bias table (``relative_position_bias_table``, T5's ``relative_attention_bias``),
       bias, normalization layer (a torch norm layer, or a class name ending in ``Norm`` /
       ``Normalization`` such as ``LlamaRMSNorm``), embedding (only when ``decay_embeddings=False``), matrix
       weight of a known layer (decay), ``ndim <= 1`` (no decay);
    7. otherwise decay.

    A tied parameter is judged under each of its names. When the names disagree, an explicit decision
    of levels 1-4 wins; if none or conflicting ones were made, *no decay* wins. The plan's explanation
    shows both names.

    Args:
        exclude: Glob patterns on (cleaned) parameter names that are never decayed.
        include: Glob patterns on parameter names that are always decayed; beats ``exclude``.
        exclude_modules: Module types whose own parameters are never decayed.
        predicate: ``(name, param, module) -> bool | None``, asked first; ``None`` defers to the rules.
        decay_bias: Decay biases (names ending in ``bias``, RNN ``bias_ih``/``bias_hh``...). Default ``False``.
        decay_norm: Decay parameters of normalization layers. Default ``False``.
        decay_embeddings: Decay embedding tables. Default ``True`` (timm, Hugging Face, nanoGPT).
        decay_vectors: Decay other parameters with ``ndim <= 1`` (gains, scalars). Default ``False``.
        decay_position_bias: Decay position-bias tables added to attention logits (a parameter or module named
            ``relative_position_bias_table``, ``relative_attention_bias``, ``relative_position_bias``,
            ``rel_pos_bias``). Default ``False`` (timm's hooks, Hugging Face's Trainer).
        use_model_hooks: Honor ``no_weight_decay()`` and ``no_weight_decay_keywords()`` of every
            submodule. Default ``True``.

    Raises:
        ValueError: On an unknown option, naming it and the allowed ones.
        TypeError: If an option has the wrong type.

    Examples:
        ```python
        from torch import nn
        from lightning_decay import DecayRules

        rules = DecayRules(exclude=["head.*"], decay_embeddings=False)
        model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "head": nn.Linear(4, 2)})
        rules.classify(model).explain("emb.weight")  # 'emb.weight: no_decay (embedding (decay_embeddings=False))'
        ```
    """

    _OPTIONS = RULE_OPTIONS

    def __init__(
        self,
        exclude: Sequence[str] | str = (),
        include: Sequence[str] | str = (),
        exclude_modules: Sequence[type[nn.Module]] = (),
        predicate: Predicate | None = None,
        decay_bias: bool = False,
        decay_norm: bool = False,
        decay_embeddings: bool = True,
        decay_vectors: bool = False,
        use_model_hooks: bool = True,
        decay_position_bias: bool = False,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ValueError(
                f"DecayRules got unknown option(s) {sorted(unknown)}; allowed options are {list(self._OPTIONS)}"
            )
        self.exclude = patterns(exclude, "exclude")
        self.include = patterns(include, "include")
        self.exclude_modules = _module_types(exclude_modules, "exclude_modules")
        if predicate is not None and not callable(predicate):
            raise TypeError(f"`predicate` must be callable (name, param, module) -> bool | None, got {predicate!r}")
        self.predicate = predicate
        flags = ("decay_bias", "decay_norm", "decay_embeddings", "decay_vectors", "use_model_hooks")
        for flag in (*flags, "decay_position_bias"):
            check_flag(locals()[flag], flag)
        self.decay_bias = decay_bias
        self.decay_norm = decay_norm
        self.decay_embeddings = decay_embeddings
        self.decay_vectors = decay_vectors
        self.use_model_hooks = use_model_hooks
        self.decay_position_bias = decay_position_bias

    def __repr__(self) -> str:
        defaults = DecayRules.__init__.__defaults__ or ()
        items = [
            f"{k}={getattr(self, k)!r}"
            for k, default in zip(self._OPTIONS, defaults, strict=False)
            if getattr(self, k) != (tuple(default) if isinstance(default, (list, tuple)) else default)
        ]
        return f"DecayRules({', '.join(items)})"

    # ------------------------------------------------------------------ public
    def classify(self, module: nn.Module, include_frozen: bool = False) -> DecayPlan:
        """Decide decay or no decay for every trainable parameter of ``module``.

        Args:
            module: The model (any ``nn.Module``, wrapped, compiled or sharded).
            include_frozen: Also classify parameters with ``requires_grad=False`` (the callbacks use it
                so that parameters unfrozen later are already known). Default ``False``.

        Returns:
            A [`DecayPlan`][lightning_decay.DecayPlan].

        Raises:
            ValueError: If ``module`` has no trainable parameter, or the predicate raises.
            TypeError: If ``module`` is not a ``torch.nn.Module``, ``include_frozen`` not a bool, or the
                predicate returns something other than ``True``, ``False`` or ``None``.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
        check_flag(include_frozen, "include_frozen")
        owners, tied, paths, mods = _owners(module)
        if not owners:
            raise ValueError(f"{type(module).__name__} has no parameters to classify")
        hooks = _model_hooks(paths, mods, owners, tied) if self.use_model_hooks else ({}, {})
        kept, frozen = (owners, []) if include_frozen else _split_frozen(owners)
        if not kept:
            raise ValueError(
                f"{type(module).__name__} has no trainable parameters: all {len(frozen)} are frozen "
                "(requires_grad=False)"
            )
        columns = self._columns(kept, tied, hooks, _fsdp1_original_shapes(mods))
        if self.include or self.exclude:
            all_names = [n for _, n, _ in owners] + [n for more in tied.values() for n, _ in more]
            for pattern in (*self.include, *self.exclude):
                if not any(fnmatch.fnmatchcase(n, pattern) for n in all_names):
                    warnings.warn(f"DecayRules: pattern {pattern!r} matches no parameter", stacklevel=2)
        return DecayPlan._from_columns(columns, frozen, module=module)

    # ----------------------------------------------------------------- private
    def _explicit_rules(self) -> _Explicit | None:
        """Levels 1-4, with the glob patterns compiled once (``fnmatchcase``'s own translation), or ``None``."""
        if self.predicate is None and not self.include and not self.exclude and not self.exclude_modules:
            return None
        include = [(p, re.compile(fnmatch.translate(p)).match) for p in self.include]
        exclude = [(p, re.compile(fnmatch.translate(p)).match) for p in self.exclude]
        return self.predicate, include, exclude, self.exclude_modules

    def _columns(
        self,
        kept: list[_Owner],
        tied: dict[int, list[tuple[str, nn.Module]]],
        hooks: tuple[dict[str, str], dict[str, list[str]]],
        flat_shapes: dict[int, torch.Size],
    ) -> PlanColumns:
        """The plan's columns for the parameters ``kept``: each judged under its first name, and a tied one under
        its further names too (`_resolve_tied`)."""
        explicit = self._explicit_rules()
        builtin: dict[tuple[type, str, bool, bool], tuple[bool, str, bool]] = {}  # one verdict per kind of tensor
        params, names, owners = zip(*kept, strict=True)
        shapes = _stored_shapes(params, flat_shapes)  # tuples when a decision is read (`DecayPlan.decisions`)
        decay, reasons, _ = zip(*self._verdicts(kept, map(len, shapes), explicit, hooks, builtin), strict=True)
        aliases: list[tuple[str, ...]] = [()] * len(kept)
        if tied:
            decay, reasons = list(decay), list(reasons)
            for i, (param, name, owner) in enumerate(kept):
                more = tied.get(id(param))
                if more is None:
                    continue
                pairs = [(name, owner), *more]
                ndims = [len(shapes[i])] * len(pairs)
                verdicts = self._verdicts([(param, n, o) for n, o in pairs], ndims, explicit, hooks, builtin)
                decay[i], reasons[i] = _resolve_tied([n for n, _ in pairs], verdicts)
                aliases[i] = tuple(n for n, _ in more)
        module_types = tuple(map(_NAME, map(type, owners)))
        return PlanColumns(names, params, tuple(decay), tuple(reasons), tuple(shapes), module_types, tuple(aliases))

    def _verdicts(
        self,
        owners: Iterable[_Owner],
        ndims: Iterable[int],
        explicit: _Explicit | None,
        hooks: tuple[dict[str, str], dict[str, list[str]]],
        builtin: dict[tuple[type, str, bool, bool], tuple[bool, str, bool]],
    ) -> list[tuple[bool, str, bool]]:
        """``(decay, reason, explicit)`` for each ``(param, name, owner)`` of ``owners`` (one name of a parameter
        each), whose tensors have ``ndims`` dimensions.

        Levels 1-5 are asked per name; the built-in rules (6-7) depend only on the owner's class, the last
        component of the name, ``ndim <= 1`` and whether the name is a position-bias table's, so their
        verdict is computed once per such key (``builtin``, one dict per ``classify`` call). One loop for all
        the names, with no call per name where no rule needs one: at 100k tensors a call per name was a sixth of
        ``decay_param_groups``' time.
        """
        hook_names, hook_keywords = hooks
        out: list[tuple[bool, str, bool]] = []
        for (param, name, owner), ndim in zip(owners, ndims, strict=True):
            if explicit is not None:
                verdict = _explicit_verdict(name, param, owner, *explicit)
                if verdict is not None:
                    out.append(verdict)
                    continue
            reason = hook_names.get(name) if hook_names else None
            if reason is not None:
                out.append((False, reason, False))
                continue
            kw = _keyword_match(name, hook_keywords) if hook_keywords else None
            if kw is not None:
                out.append((False, f"no_weight_decay_keywords() {kw!r}", False))
                continue
            key = (type(owner), name[name.rfind(".") + 1 :], ndim <= 1, "_bias" in name and _is_position_bias(name))
            verdict = builtin.get(key)
            if verdict is None:
                verdict = builtin[key] = self._builtin(*key)
            out.append(verdict)
        return out

    def _builtin(self, owner: type, leaf: str, vector: bool, table: bool) -> tuple[bool, str, bool]:
        """Levels 6-7: the verdict for a tensor called ``leaf`` of a module of class ``owner``."""
        if table:
            if not self.decay_position_bias:
                return False, "position bias table", False
            return True, "position bias table (decay_position_bias=True)", False
        norm = _is_norm_class(owner)
        if _BIAS.search(leaf):
            if not self.decay_bias:
                return False, "bias", False
            if not norm:
                return True, "bias (decay_bias=True)", False
            # A normalization layer's bias with decay_bias=True: decay_norm decides below.
        if norm:
            if not self.decay_norm:
                return False, f"normalization layer ({_class_name(owner)})", False
            return True, f"normalization layer ({_class_name(owner)}, decay_norm=True)", False
        if issubclass(owner, _EMBEDDING_TYPES):
            if not self.decay_embeddings:
                return False, "embedding (decay_embeddings=False)", False
            return True, f"embedding ({_class_name(owner)})", False
        if issubclass(owner, _MATRIX_TYPES) and "weight" in leaf:
            # Decided by type and name, so flattened or sharded storage cannot change the answer.
            return True, f"weight of {_class_name(owner)}", False
        if vector:
            return self.decay_vectors, "ndim <= 1 (decay_vectors=True)" if self.decay_vectors else "ndim <= 1", False
        return True, "default (ndim >= 2)", False


#: ``(predicate, [(include pattern, match)], [(exclude pattern, match)], exclude_modules)``
_Explicit = tuple[
    "Predicate | None",
    list[tuple[str, Callable[[str], Any]]],
    list[tuple[str, Callable[[str], Any]]],
    tuple[type[nn.Module], ...],
]


def _explicit_verdict(
    name: str,
    param: nn.Parameter,
    owner: nn.Module,
    predicate: Predicate | None,
    include: list[tuple[str, Callable[[str], Any]]],
    exclude: list[tuple[str, Callable[[str], Any]]],
    exclude_modules: tuple[type[nn.Module], ...],
) -> tuple[bool, str, bool] | None:
    """Levels 1-4 (the user's own decisions) for one name, ``None`` when none decides."""
    if predicate is not None:
        try:
            verdict = predicate(name, param, owner)
        except Exception as err:
            raise ValueError(f"DecayRules predicate raised for parameter {name!r}: {err!r}") from err
        if verdict is not None:
            if not isinstance(verdict, bool):
                raise TypeError(
                    f"DecayRules predicate must return True, False or None; returned {verdict!r} for {name!r}"
                )
            return verdict, "predicate", True
    for pattern, match in include:
        if match(name) is not None:
            return True, f"include pattern {pattern!r}", True
    for pattern, match in exclude:
        if match(name) is not None:
            return False, f"exclude pattern {pattern!r}", True
    if exclude_modules and isinstance(owner, exclude_modules):
        return False, f"exclude_modules ({_class_name(owner)})", True
    return None


def _module_types(value: Any, argument: str) -> tuple[type[nn.Module], ...]:
    """A tuple of ``nn.Module`` subclasses; one class is accepted as a tuple of one."""
    if isinstance(value, type):
        value = (value,)
    if isinstance(value, str) or not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise TypeError(
            f"`{argument}` must be a list of nn.Module subclasses (the classes, such as torch.nn.LayerNorm, "
            f"not their names), got {type(value).__name__}: {value!r}"
        )
    out = tuple(value)
    for t in out:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"`{argument}` must hold nn.Module subclasses (the classes, not their names), got {t!r}")
    return out


def as_rules(value: Any, argument: str = "rules") -> DecayRules:
    """``value`` if it is a [`DecayRules`][lightning_decay.DecayRules], ``DecayRules()`` for ``None``.

    Raises:
        TypeError: For anything else (a string, a dict, a list of patterns), naming ``argument``.
    """
    if value is None:
        return DecayRules()
    if not isinstance(value, DecayRules):
        raise TypeError(
            f"`{argument}` must be a lightning_decay.DecayRules or None, got {type(value).__name__}: {value!r}. "
            "Build one with DecayRules(exclude=[...], ...) (in YAML: class_path: lightning_decay.DecayRules)."
        )
    return value


#: ``(parameter, its name, the module holding it under that name)``
_Owner = tuple[nn.Parameter, str, nn.Module]
_Owners = tuple[list[_Owner], dict[int, list[tuple[str, nn.Module]]], list[str], list[nn.Module]]


def _owners(module: nn.Module) -> _Owners:
    """Every parameter once, with its first (cleaned name, owning module), in registration order.

    Also returns, by ``id``, the further (name, owner) pairs of a parameter reached through more than one path
    (tied or shared; most have one, so no list is built for them), and the cleaned name and the module of every
    module path (two lists), named as the parameters are. Names are cleaned from the module tree (only real
    wrappers lose their component); if two parameters would get the same cleaned name, every name is kept raw
    (see `clean_names`).
    """
    modules = list(named_modules_clean(module))
    # Raw names are unique (one per module path and attribute); cleaned ones need checking only where a
    # wrapper's component was removed.
    raw, mods = list(map(itemgetter(0), modules)), list(map(itemgetter(2), modules))
    clean = list(map(itemgetter(1), modules))
    if clean != raw:
        owners, tied, unique = _owned(clean, mods, check_unique=True)
        if unique:
            return owners, tied, clean, mods
    owners, tied, _ = _owned(raw, mods, check_unique=False)
    return owners, tied, raw, mods


def _owned(
    paths: list[str], mods: list[nn.Module], check_unique: bool
) -> tuple[list[_Owner], dict[int, list[tuple[str, nn.Module]]], bool]:
    """`_owners`' owners and tied pairs of the modules ``mods`` under the module ``paths``, and (with
    ``check_unique``) whether no two different parameters share a name."""
    found = [
        (param, dotted + leaf, mod)
        for path, mod in zip(paths, mods, strict=True)
        if mod._parameters
        for dotted in (f"{path}." if path else "",)
        for leaf, param in mod._parameters.items()
        if param is not None
    ]
    if len(set(map(id, map(itemgetter(0), found)))) == len(found):  # the usual case: no parameter reached twice
        return found, {}, not check_unique or len(set(map(itemgetter(1), found))) == len(found)
    owners: dict[int, _Owner] = {}
    tied: dict[int, list[tuple[str, nn.Module]]] = {}
    holder: dict[str, int] = {}
    unique = True
    for param, name, mod in found:
        key = id(param)
        if check_unique and holder.setdefault(name, key) != key:
            unique = False
        first = owners.setdefault(key, (param, name, mod))
        if first[1] != name and all(name != n for n, _ in tied.get(key, ())):  # a shared module
            tied.setdefault(key, []).append((name, mod))
    return list(owners.values()), tied, unique


_HOOKS = ("no_weight_decay", "no_weight_decay_keywords")


def _model_hooks(
    paths: list[str], mods: list[nn.Module], owners: list[_Owner], tied: dict[int, list[tuple[str, nn.Module]]]
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Collect ``no_weight_decay()`` names and keywords from every submodule ``mods``, prefixed by its path.

    An entry of ``no_weight_decay()`` names a parameter (``owners`` and ``tied``: every name of every parameter)
    or a module whose parameters are all excluded (`_covered`). Linear in the number of parameters.
    """
    entries: list[tuple[str, str]] = []  # (full name, reason) of every no_weight_decay() entry, in hook order
    keywords: dict[str, list[str]] = {}
    for mod_name, mod, hook, kw_hook in _hook_methods(paths, mods):
        prefix = f"{mod_name}." if mod_name else ""
        if callable(hook):
            where = f" of {mod_name}" if mod_name else ""
            for entry in _call_hook(hook, _HOOKS[0], mod):
                entries.append((prefix + entry, f"no_weight_decay(){where} {entry!r}"))
        if callable(kw_hook):
            kws = _call_hook(kw_hook, _HOOKS[1], mod)
            if kws:
                keywords.setdefault(prefix, []).extend(kws)
    if not entries:
        return {}, keywords
    names = set(map(itemgetter(1), owners))
    names.update(n for more in tied.values() for n, _ in more)
    return _covered(entries, paths, mods, names), keywords


def _hook_methods(paths: list[str], mods: list[nn.Module]) -> Iterator[tuple[str, nn.Module, Any, Any]]:
    """``(module name, module, its no_weight_decay or None, its no_weight_decay_keywords or None)`` for each module
    that may have one of them.

    A hook is a method of the class (looked up once per class: nn.Module's own miss formats an AttributeError,
    slow on every module of a large model) or an attribute or submodule of the instance; a class with its own
    ``__getattr__`` (a wrapper that forwards) is asked as usual.
    """
    kinds: dict[type, tuple[bool, bool]] = {}
    for mod_name, mod in zip(paths, mods, strict=True):
        cls = type(mod)
        kind = kinds.get(cls)
        if kind is None:
            forwards = cls.__getattr__ is not nn.Module.__getattr__
            kind = kinds[cls] = (forwards or hasattr(cls, _HOOKS[0]), forwards or hasattr(cls, _HOOKS[1]))
        own, children = mod.__dict__, mod._modules  # a parameter or buffer is a tensor: never a hook
        has_hook = kind[0] or _HOOKS[0] in own or _HOOKS[0] in children
        has_kw_hook = kind[1] or _HOOKS[1] in own or _HOOKS[1] in children
        if has_hook or has_kw_hook:
            hook = getattr(mod, _HOOKS[0], None) if has_hook else None
            yield mod_name, mod, hook, getattr(mod, _HOOKS[1], None) if has_kw_hook else None


def _covered(
    entries: list[tuple[str, str]], paths: list[str], mods: list[nn.Module], names: set[str]
) -> dict[str, str]:
    """Parameter name -> the reason of the first ``no_weight_decay()`` entry that covers it: the entry's full name
    if a parameter has it (``names``: all of them), and every parameter name under it where it is a module path.

    The modules come parents first, so the modules under a path follow its first module, and their paths begin
    with it: the names are read from there (each module's own parameters under its path, as `_owners` named
    them), not found by sorting or searching every name.
    """
    # path -> its first position (a wrapper and the module it wraps share a path): written from the last to the
    # first, so the first position is the one that stays.
    first = dict(zip(reversed(paths), range(len(paths) - 1, -1, -1), strict=True))
    covered: dict[str, str] = {}
    count = len(paths)
    for full, reason in entries:
        if full in names:
            covered.setdefault(full, reason)
        end = first.get(full) if full else None  # the root's path: no name is "under" the empty string
        if end is None:
            continue
        under = full + "."
        while end < count and (paths[end] == full or paths[end].startswith(under)):
            dotted = paths[end] + "."  # not the root's: under a non-empty path
            for leaf, param in mods[end]._parameters.items():
                if param is not None:
                    covered.setdefault(dotted + leaf, reason)
            end += 1
    return covered


def _keyword_match(name: str, hook_keywords: dict[str, list[str]]) -> str | None:
    """The first ``no_weight_decay_keywords()`` keyword of a module above ``name`` found in the rest of it.

    Only the module paths above the parameter are looked up (its dotted prefixes, outermost first, the
    order in which the hooks were collected), so the cost is the depth of the name, not the number of
    modules with a hook.
    """
    end = 0
    while True:
        prefix = name[:end]
        kws = hook_keywords.get(prefix)
        if kws:
            rest = name[end:]  # relative to the module that declared it
            for kw in kws:
                if kw in rest:
                    return kw
        dot = name.find(".", end)
        if dot < 0:
            return None
        end = dot + 1


def _call_hook(hook: Callable[[], Iterable[str]], what: str, owner: nn.Module) -> list[str]:
    result = hook()
    # The usual containers first: the ABC check is slow when every block of a large model has a hook.
    if not isinstance(result, (set, frozenset, list, tuple)) and (
        isinstance(result, str) or not isinstance(result, Iterable)
    ):
        raise TypeError(f"{type(owner).__name__}.{what}() must return a set or list of names, got {result!r}")
    return list(map(str, result))


def _fsdp1_original_shapes(mods: list[nn.Module]) -> dict[int, torch.Size]:
    """Original shapes of FSDP1 ``use_orig_params=True`` parameters, whose local views are flat shards.

    Only ``FullyShardedDataParallel`` modules hold a flat-parameter handle; none exists before FSDP1 is imported.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    fsdp_type = getattr(fsdp, "FullyShardedDataParallel", None)
    shapes: dict[int, torch.Size] = {}
    if not isinstance(fsdp_type, type):
        return shapes
    # By class, once (isinstance through an ABC's __instancecheck__ is slow), and no walk when none is FSDP1's.
    fsdp_classes = {cls for cls in set(map(type, mods)) if issubclass(cls, fsdp_type)}
    for mod in mods if fsdp_classes else ():
        if type(mod) not in fsdp_classes:
            continue
        handle = getattr(mod, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        infos = getattr(flat, "_param_infos", None)
        orig = getattr(flat, "_shapes", None)
        params = getattr(flat, "_params", None)
        if infos is None or orig is None or params is None:
            continue
        for p, shape in zip(params, orig, strict=False):
            shapes[id(p)] = shape
    return shapes


def _resolve_tied(names: list[str], verdicts: list[tuple[bool, str, bool]]) -> tuple[bool, str]:
    if len(verdicts) == 1 or len({v[0] for v in verdicts}) == 1:
        decay, reason, _ = verdicts[0]
        return decay, reason
    shown = "; ".join(
        f"{n}: {'decay' if d else 'no_decay'} ({r})" for n, (d, r, _) in zip(names, verdicts, strict=True)
    )
    explicit = {d for d, _, e in verdicts if e}
    if len(explicit) == 1:
        decay = explicit.pop()
        return decay, f"tied, explicit rule wins [{shown}]"
    return False, f"tied, no_decay wins [{shown}]"


def module_rules(module: nn.Module, given: DecayRules | None = None) -> DecayRules:
    """The rules a callback uses: ``given``, else ``module.decay_rules`` (``DecayGroupsMixin``), else defaults.

    So that one set of rules serves the optimizer's groups and every callback given no ``rules``.

    Raises:
        TypeError: If ``module.decay_rules`` is set to something other than a ``DecayRules``.
    """
    if given is not None:
        return as_rules(given)
    return as_rules(getattr(module, "decay_rules", None), f"{type(module).__name__}.decay_rules")
