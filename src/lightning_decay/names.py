"""Parameter names as the user wrote them, without the components that wrapper modules insert.

``torch.compile`` stores the model as ``_orig_mod``, FSDP1 and activation checkpointing wrap each
module in ``_fsdp_wrapped_module`` / ``_checkpoint_wrapped_module``, DDP and DataParallel put the model
under ``module`` and Fabric under ``_forward_module``. Rules, plans and logged metric keys all use the
cleaned name, so a pattern written against the plain model keeps matching once it is compiled, sharded
or checkpointed.

Which components are wrappers is decided from the module tree (`clean_names`): a component is removed
only where the module holding it is an instance of one of those wrapper types, so a user's own
attribute called ``module`` stays in the name. `clean_param_name` works on a bare string and can only
guess from the spelling; the library uses it only for names that come without a module (the keys of a
reference mapping).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from torch import nn

__all__ = ["clean_names", "clean_param_name", "module_paths", "named_modules_clean", "wrapper_attributes"]

# Wrapper components that can appear anywhere in a dotted name (spelling-based guess only).
_INNER_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
# ``module`` is also a legitimate attribute name, so the spelling-based guess strips it only in front.
_LEADING_WRAPPER_PARTS = frozenset({"module"}) | _INNER_WRAPPER_PARTS

# (module path, class name, attributes that hold the wrapped module). Looked up only in modules that
# are already imported: a wrapper instance cannot exist before its class's module is imported, so no
# (slow or optional) import is triggered here.
_WRAPPER_TYPES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("torch.nn.parallel.distributed", "DistributedDataParallel", ("module",)),
    ("torch.nn.parallel.data_parallel", "DataParallel", ("module",)),
    ("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel", ("_fsdp_wrapped_module",)),
    # CheckpointWrapper and OffloadWrapper (activation checkpointing / offloading).
    (
        "torch.distributed.algorithms._checkpoint.checkpoint_wrapper",
        "ActivationWrapper",
        ("_checkpoint_wrapped_module",),
    ),
    ("torch._dynamo.eval_frame", "OptimizedModule", ("_orig_mod",)),
    # Fabric's `setup` wrapper: `_original_module` is the same model (or the one `_forward_module` wraps).
    ("lightning.fabric.wrappers", "_FabricModule", ("_forward_module", "_original_module")),
    ("lightning_fabric.wrappers", "_FabricModule", ("_forward_module", "_original_module")),
    ("deepspeed.runtime.engine", "DeepSpeedEngine", ("module",)),
)


def _loaded_wrapper_types() -> list[tuple[type, tuple[str, ...]]]:
    out = []
    for path, cls_name, names in _WRAPPER_TYPES:
        mod = sys.modules.get(path)
        cls = getattr(mod, cls_name, None) if mod is not None else None
        if isinstance(cls, type):
            out.append((cls, names))
    return out


def wrapper_attributes(module: nn.Module) -> tuple[str, ...]:
    """The attributes through which ``module`` holds a wrapped module, empty if it is no known wrapper.

    Known wrappers: ``DistributedDataParallel`` and ``DataParallel`` (``module``), FSDP1's
    ``FullyShardedDataParallel`` (``_fsdp_wrapped_module``), activation checkpointing's
    ``CheckpointWrapper`` / ``OffloadWrapper`` (``_checkpoint_wrapped_module``), ``torch.compile``'s
    ``OptimizedModule`` (``_orig_mod``), Fabric's ``_FabricModule`` (``_forward_module``) and DeepSpeed's
    engine (``module``). FSDP2's ``fully_shard`` and composable ``replicate`` insert no name component.
    """
    return _attributes(module, _loaded_wrapper_types())


def _attributes(module: nn.Module, types: list[tuple[type, tuple[str, ...]]]) -> tuple[str, ...]:
    attrs: tuple[str, ...] = ()
    for cls, names in types:
        if isinstance(module, cls):
            attrs += names
    return attrs


def _class_attributes(module_type: type, types: list[tuple[type, tuple[str, ...]]]) -> tuple[str, ...]:
    attrs: tuple[str, ...] = ()
    for cls, names in types:
        if issubclass(module_type, cls):
            attrs += names
    return attrs


def named_modules_clean(root: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """``(raw name, cleaned name, module)`` for every module path of ``root``, parents first.

    Like ``root.named_modules(remove_duplicate=False)``, with each name also given without the
    components of wrapper modules (see `wrapper_attributes`), decided by the type of the module that
    holds each component. The cleaned names are not checked for uniqueness here (see `clean_names`).
    """
    return iter(module_paths(root))


def module_paths(root: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """`named_modules_clean` as a list, built in one loop (no generator step per module): where no wrapper
    component is removed, the cleaned name is the raw string itself."""
    types = _loaded_wrapper_types()  # once per walk
    skips: dict[type, tuple[str, ...]] = {}  # by class: ActivationWrapper is an ABC, slow to isinstance per module
    out: list[tuple[str, str, nn.Module]] = []
    stack: list[tuple[str, str, nn.Module]] = [("", "", root)]
    while stack:
        item = stack.pop()
        out.append(item)
        raw, clean, mod = item
        if not mod._modules:
            continue
        cls = type(mod)
        skip = skips.get(cls)
        if skip is None:
            skip = skips[cls] = _class_attributes(cls, types)
        dotted = f"{raw}." if raw else ""
        if clean is raw and not skip:  # the usual case: nothing removed above or here
            children = [
                (name, name, child)
                for attr, child in mod._modules.items()
                if child is not None
                for name in (dotted + attr,)
            ]
        else:
            children = _children(mod, dotted, clean is raw, clean, skip)
        stack.extend(reversed(children))  # popped in registration order, as `named_modules` yields them
    return out


def _children(
    mod: nn.Module, dotted: str, same: bool, clean: str, skip: tuple[str, ...]
) -> list[tuple[str, str, nn.Module]]:
    """``(raw name, cleaned name, child)`` of each child of ``mod``, whose raw name is ``dotted`` without its final
    dot; ``same``: no component removed above, so a child not skipped has its raw string as its cleaned name."""
    children = []
    for attr, child in mod._modules.items():
        if child is None:
            continue
        child_raw = dotted + attr
        if attr in skip:
            child_clean = clean
        elif same:  # the same string, not a second copy
            child_clean = child_raw
        else:
            child_clean = f"{clean}.{attr}" if clean else attr
        children.append((child_raw, child_clean, child))
    return children


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def clean_names(root: nn.Module) -> dict[str, str]:
    """Raw name -> cleaned name for every module path and every parameter name of ``root``.

    Covers the names of ``named_modules(remove_duplicate=False)`` and
    ``named_parameters(remove_duplicate=False)``; a component is removed only where a wrapper module
    really sits (see `wrapper_attributes`). If two different parameters would get the same cleaned
    name (a wrapper with parameters of its own named like the model's), the raw names are kept for
    every name, so names stay unique.

    Examples:
        ```python
        from torch import nn
        from lightning_decay import clean_names

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.module = nn.ModuleDict({"head": nn.Linear(2, 2)})  # a user attribute, not a wrapper
                self.head = nn.Linear(2, 2)

        names = clean_names(nn.DataParallel(Net()))  # DataParallel holds the model as `module` too
        names["module.module.head.weight"], names["module.head.weight"]  # ('module.head.weight', 'head.weight')
        ```
    """
    modules = module_paths(root)
    out: dict[str, str] = {}
    owner: dict[str, int] = {}  # cleaned parameter name -> id of the parameter
    unique = True
    for _, clean, mod in modules:
        for leaf, param in mod._parameters.items():
            if param is not None and owner.setdefault(_join(clean, leaf), id(param)) != id(param):
                unique = False
    first: dict[int, str] = {}  # parameter -> its (cleaned) name, for names the tree walk does not produce
    for raw, clean, mod in modules:
        name = clean if unique else raw
        out[raw] = name
        for leaf, param in mod._parameters.items():
            if param is not None:
                out[_join(raw, leaf)] = _join(name, leaf)
                first.setdefault(id(param), _join(name, leaf))
    if type(root).named_parameters is not nn.Module.named_parameters:
        # A root that names its parameters itself (CheckpointWrapper hides its component): its names too.
        for name, param in root.named_parameters(remove_duplicate=False):
            out.setdefault(name, first.get(id(param), name))
    return out


def clean_param_name(name: str) -> str:
    """Remove what look like wrapper components from a dotted parameter or module name, by spelling.

    A bare string does not say which modules are wrappers, so this is a guess: ``_orig_mod``,
    ``_fsdp_wrapped_module`` and ``_checkpoint_wrapped_module`` are removed anywhere, and ``module``
    only in front (where DDP puts it). It cannot tell a DDP prefix from a user's attribute called
    ``module``: two names may then clean to the same string. With the model at hand, use
    [`clean_names`][lightning_decay.clean_names], which decides from the module tree (this is what
    the rules, plans and callbacks use).

    Args:
        name: A name as produced by ``named_parameters()`` or ``named_modules()``, or a key of a saved
            ``state_dict``.

    Returns:
        The name the unwrapped model would most likely use.

    Examples:
        ```python
        from lightning_decay import clean_param_name

        clean_param_name("module._orig_mod.blocks.0._fsdp_wrapped_module.attn.weight")  # 'blocks.0.attn.weight'
        ```
    """
    parts = name.split(".") if name else []
    start = 0
    while start < len(parts) - 1 and parts[start] in _LEADING_WRAPPER_PARTS:
        start += 1
    return ".".join(p for p in parts[start:] if p not in _INNER_WRAPPER_PARTS)
