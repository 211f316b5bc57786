"""Decay / no-decay classification rules: pure functions of a module, no framework involved.

The defaults are the consensus of timm, Hugging Face and minGPT: biases, every parameter of a
normalization layer and every other parameter with at most one dimension are not decayed; matrix
weights (Linear, convolutions, attention projections, embeddings) are.

Precedence, first match wins (documented in ``docs/`` and tested):

1. ``predicate(name, param, module)`` returning ``True`` or ``False``;
2. ``include`` glob patterns (force decay);
3. ``exclude`` glob patterns (no decay);
4. ``exclude_modules`` types (no decay);
5. model hooks: ``no_weight_decay()`` names and ``no_weight_decay_keywords()`` substrings (no decay);
6. built-in rules: bias, normalization layer, embedding (only when ``decay_embeddings=False``),
   matrix weight of a known layer (decay), ``ndim <= 1`` (no decay);
7. otherwise decay.

A tied parameter is judged under each of its names. When the names disagree, an explicit user
decision (levels 1-4) wins; if none or conflicting ones were made, *no decay* wins, as in minGPT for
a GPT embedding tied to ``lm_head``. The explanation shows both names.
"""

from __future__ import annotations

import bisect
import fnmatch
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_decay._checks import check_flag
from lightning_decay._options import RULE_OPTIONS, patterns
from lightning_decay.names import named_modules_clean
from lightning_decay.plan import DecayPlan, ParamDecision

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
# Class names of custom norm layers: LlamaRMSNorm, T5LayerNorm, FusedLayerNorm, BatchNormAct2d,
# LayerNormalization... "Normal" (a distribution, NormalLinear) is not a normalization layer.
_NORM_NAME = re.compile(r"norm(?!al(?!iz))", re.IGNORECASE)

# Layers whose ``weight`` is a matrix (or a conv kernel) however its storage is sharded or flattened.
_MATRIX_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.RNNCellBase,
)
# `bias`, `in_proj_bias`, RNN `bias_ih_l0`; not Swin's 2-D `relative_position_bias_table`.
_BIAS = re.compile(r"(^|_)bias($|_[ih]h_)")
_EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


def is_norm_module(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer, by type or by class name."""
    return isinstance(module, _NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


# FSDP2's `fully_shard` and composable `replicate` swap a module's class for a dynamic subclass
# `FSDP<Name>(FSDPModule, <Name>)` (`Replicate<Name>`): reasons name `<Name>`, the same sharded or not.
_WRAPPER_PREFIXES = ("FSDP", "Replicate")


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    for base in cls.__bases__:
        if any(cls.__name__ == prefix + base.__name__ for prefix in _WRAPPER_PREFIXES):
            return base.__name__
    return cls.__name__


def logical_shape(param: torch.Tensor, flat_shapes: dict[int, torch.Size] | None = None) -> tuple[int, ...]:
    """The shape the user created, not the shard or flat view a strategy holds.

    DTensor (FSDP2) ``.shape`` is already global; DeepSpeed keeps it as ``ds_shape``; FSDP1 flat
    parameters record the original shapes, passed here as ``flat_shapes``.
    """
    if flat_shapes and id(param) in flat_shapes:
        return tuple(flat_shapes[id(param)])
    ds_shape = getattr(param, "ds_shape", None)
    if ds_shape is not None:
        return tuple(ds_shape)
    return tuple(param.shape)


class DecayRules:
    """The policy deciding which parameters get weight decay and L1/L2 penalties.

    Precedence, first match wins:

    1. ``predicate(name, param, module)`` returning ``True`` or ``False``;
    2. ``include`` glob patterns (decay);
    3. ``exclude`` glob patterns (no decay);
    4. ``exclude_modules`` types (no decay);
    5. model hooks: ``no_weight_decay()`` names and ``no_weight_decay_keywords()`` substrings (no decay);
    6. built-in rules: bias, normalization layer (by type, or a class name such as ``LlamaRMSNorm``),
       embedding (only when ``decay_embeddings=False``), matrix weight of a known layer (decay),
       ``ndim <= 1`` (no decay);
    7. otherwise decay.

    A tied parameter is judged under each of its names. When the names disagree, an explicit decision
    of levels 1-4 wins; if none or conflicting ones were made, *no decay* wins. The plan's explanation
    shows both names.

    Args:
        exclude: Glob patterns on (cleaned) parameter names that are never decayed.
        include: Glob patterns on parameter names that are always decayed; beats ``exclude``.
        exclude_modules: Module types whose own parameters are never decayed.
        predicate: ``(name, param, module) -> bool | None``, asked first; ``None`` defers to the rules.
        decay_bias: Decay biases (names ending in ``bias``). Default ``False``.
        decay_norm: Decay parameters of normalization layers. Default ``False``.
        decay_embeddings: Decay embedding tables. Default ``True`` (timm, Hugging Face, nanoGPT).
        decay_vectors: Decay other parameters with ``ndim <= 1`` (gains, scalars). Default ``False``.
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
        for flag in ("decay_bias", "decay_norm", "decay_embeddings", "decay_vectors", "use_model_hooks"):
            check_flag(locals()[flag], flag)
        self.decay_bias = decay_bias
        self.decay_norm = decay_norm
        self.decay_embeddings = decay_embeddings
        self.decay_vectors = decay_vectors
        self.use_model_hooks = use_model_hooks

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
        owners, modules = _owners(module)
        if not owners:
            raise ValueError(f"{type(module).__name__} has no parameters to classify")
        all_names = [name for aliases in owners.values() for name, _ in aliases]
        hook_names, hook_keywords = _model_hooks(modules, all_names) if self.use_model_hooks else ({}, {})
        flat_shapes = _fsdp1_original_shapes(module)

        decisions: list[ParamDecision] = []
        frozen: list[str] = []
        for param, aliases in owners.items():
            names = [name for name, _ in aliases]
            if not param.requires_grad and not include_frozen:
                frozen.append(names[0])
                continue
            verdicts = [
                self._decide(name, param, owner, hook_names, hook_keywords, flat_shapes) for name, owner in aliases
            ]
            decay, reason = _resolve_tied(names, verdicts)
            decisions.append(
                ParamDecision(
                    name=names[0],
                    param=param,
                    decay=decay,
                    reason=reason,
                    shape=logical_shape(param, flat_shapes),
                    module_type=type(aliases[0][1]).__name__,
                    aliases=tuple(names[1:]),
                )
            )
        if not decisions:
            raise ValueError(
                f"{type(module).__name__} has no trainable parameters: all {len(frozen)} are frozen "
                "(requires_grad=False)"
            )
        for pattern in (*self.include, *self.exclude):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in all_names):
                warnings.warn(f"DecayRules: pattern {pattern!r} matches no parameter", stacklevel=2)
        return DecayPlan(decisions, frozen, module=module)

    # ----------------------------------------------------------------- private
    def _decide(
        self,
        name: str,
        param: nn.Parameter,
        owner: nn.Module,
        hook_names: dict[str, str],
        hook_keywords: dict[str, list[str]],
        flat_shapes: dict[int, torch.Size],
    ) -> tuple[bool, str, bool]:
        """Return ``(decay, reason, explicit)`` for one name of a parameter."""
        if self.predicate is not None:
            try:
                verdict = self.predicate(name, param, owner)
            except Exception as err:
                raise ValueError(f"DecayRules predicate raised for parameter {name!r}: {err!r}") from err
            if verdict is not None:
                if not isinstance(verdict, bool):
                    raise TypeError(
                        f"DecayRules predicate must return True, False or None; returned {verdict!r} for {name!r}"
                    )
                return verdict, "predicate", True
        for pattern in self.include:
            if fnmatch.fnmatchcase(name, pattern):
                return True, f"include pattern {pattern!r}", True
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(name, pattern):
                return False, f"exclude pattern {pattern!r}", True
        if self.exclude_modules and isinstance(owner, self.exclude_modules):
            return False, f"exclude_modules ({_class_name(owner)})", True
        if name in hook_names:
            return False, hook_names[name], False
        if hook_keywords:
            kw = _keyword_match(name, hook_keywords)
            if kw is not None:
                return False, f"no_weight_decay_keywords() {kw!r}", False
        leaf = name.rsplit(".", 1)[-1]
        if _BIAS.search(leaf):
            if not self.decay_bias:
                return False, "bias", False
            if not is_norm_module(owner):
                return True, "bias (decay_bias=True)", False
            # A normalization layer's bias with decay_bias=True: decay_norm decides below.
        if is_norm_module(owner):
            if not self.decay_norm:
                return False, f"normalization layer ({_class_name(owner)})", False
            return True, f"normalization layer ({_class_name(owner)}, decay_norm=True)", False
        if isinstance(owner, _EMBEDDING_TYPES):
            if not self.decay_embeddings:
                return False, "embedding (decay_embeddings=False)", False
            return True, f"embedding ({_class_name(owner)})", False
        if isinstance(owner, _MATRIX_TYPES) and "weight" in leaf:
            # Decided by type and name, so flattened or sharded storage cannot change the answer.
            return True, f"weight of {_class_name(owner)}", False
        if len(logical_shape(param, flat_shapes)) <= 1:
            return self.decay_vectors, "ndim <= 1 (decay_vectors=True)" if self.decay_vectors else "ndim <= 1", False
        return True, "default (ndim >= 2)", False


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


def _owners(
    module: nn.Module,
) -> tuple[dict[nn.Parameter, list[tuple[str, nn.Module]]], list[tuple[str, nn.Module]]]:
    """Every parameter once, with all its (cleaned name, owning module) pairs in registration order.

    Also returns ``(cleaned module name, module)`` of every module path, named as the parameters are.
    Names are cleaned from the module tree (only real wrappers lose their component); if two
    parameters would get the same cleaned name, every name is kept raw (see `clean_names`).
    """
    modules = list(named_modules_clean(module))
    for clean in (True, False):
        owners: dict[nn.Parameter, list[tuple[str, nn.Module]]] = {}
        holder: dict[str, nn.Parameter] = {}
        unique = True
        for raw_prefix, clean_prefix, mod in modules:
            prefix = clean_prefix if clean else raw_prefix
            for leaf, param in mod._parameters.items():
                if param is None:
                    continue
                name = f"{prefix}.{leaf}" if prefix else leaf
                if holder.setdefault(name, param) is not param:
                    unique = False
                entry = owners.setdefault(param, [])
                if all(name != n for n, _ in entry):
                    entry.append((name, mod))
        if unique:
            return owners, [(c if clean else r, m) for r, c, m in modules]
    return owners, [(r, m) for r, _, m in modules]


def _model_hooks(
    modules: Iterable[tuple[str, nn.Module]], param_names: Iterable[str]
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Collect ``no_weight_decay()`` names and keywords from every submodule, prefixed by its path.

    Linear in the number of parameters: an entry of a hook is looked up in the sorted parameter names
    (the name itself, then the range of names under it), not compared with every name.
    """
    names: dict[str, str] = {}
    keywords: dict[str, list[str]] = {}
    ordered = sorted(set(param_names))
    for mod_name, mod in modules:
        prefix = f"{mod_name}." if mod_name else ""
        where = f" of {mod_name}" if mod_name else ""
        hook = getattr(mod, "no_weight_decay", None)
        if callable(hook):
            for entry in _call_hook(hook, "no_weight_decay", type(mod).__name__):
                full = prefix + entry
                # An entry names a parameter, or a module whose parameters are all excluded.
                reason = f"no_weight_decay(){where} {entry!r}"
                i = bisect.bisect_left(ordered, full)
                if i < len(ordered) and ordered[i] == full:
                    names.setdefault(full, reason)
                under = full + "."
                i = bisect.bisect_left(ordered, under, i)
                while i < len(ordered) and ordered[i].startswith(under):
                    names.setdefault(ordered[i], reason)
                    i += 1
        hook = getattr(mod, "no_weight_decay_keywords", None)
        if callable(hook):
            kws = _call_hook(hook, "no_weight_decay_keywords", type(mod).__name__)
            if kws:
                keywords.setdefault(prefix, []).extend(kws)
    return names, keywords


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


def _call_hook(hook: Callable[[], Iterable[str]], what: str, owner: str) -> list[str]:
    result = hook()
    if isinstance(result, str) or not isinstance(result, Iterable):
        raise TypeError(f"{owner}.{what}() must return a set or list of names, got {result!r}")
    return [str(r) for r in result]


def _fsdp1_original_shapes(module: nn.Module) -> dict[int, torch.Size]:
    """Original shapes of FSDP1 ``use_orig_params=True`` parameters, whose local views are flat shards."""
    shapes: dict[int, torch.Size] = {}
    for mod in module.modules():
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
