"""Parameter names as the user wrote them, without the prefixes that wrappers insert.

``torch.compile`` stores the model as ``_orig_mod``, FSDP1 and activation checkpointing wrap each
module in ``_fsdp_wrapped_module`` / ``_checkpoint_wrapped_module``, and DDP-style wrappers put the
model under ``module``. Rules, plans and logged metric keys all use the cleaned name, so a pattern
written against the plain model keeps matching once it is compiled, sharded or checkpointed.
"""

from __future__ import annotations

# Wrapper components that can appear anywhere in a dotted name.
_INNER_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
# ``module`` is also a legitimate attribute name, so it is only stripped where wrappers put it: in front.
_LEADING_WRAPPER_PARTS = frozenset({"module"}) | _INNER_WRAPPER_PARTS

__all__ = ["clean_param_name"]


def clean_param_name(name: str) -> str:
    """Remove wrapper components from a dotted parameter or module name.

    Args:
        name: A name as produced by ``named_parameters()`` or ``named_modules()``.

    Returns:
        The name the unwrapped model would use.

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
