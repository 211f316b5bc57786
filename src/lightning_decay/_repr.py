"""``repr`` of the callbacks as they were built: ``WeightDecay(0.05)``, ``WeightNormMonitor(log_histograms=True)``.

The arguments are recorded as given, in ``__new__`` (so no ``__init__`` of a subclass has to remember to), and
shown as written: positional ones first, then the keywords. Reading them back from attributes would show
what the callback made of them (a ``Constant`` schedule, resolved rules) rather than what the user wrote.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ArgumentsRepr"]

#: Longer argument reprs (a reference module, a mapping of tensors) are shown by their type only.
_MAX_ARGUMENT_REPR = 80


class ArgumentsRepr:
    """Mixin: ``repr(obj)`` is ``ClassName(*args, **kwargs)`` with the arguments the object was built with."""

    _given_arguments: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__new__(cls)
        obj._given_arguments = (args, dict(kwargs))
        return obj

    def __repr__(self) -> str:
        args, kwargs = self._given_arguments
        shown = [_argument_repr(a) for a in args] + [f"{k}={_argument_repr(v)}" for k, v in kwargs.items()]
        return f"{type(self).__name__}({', '.join(shown)})"


def _argument_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_ARGUMENT_REPR and "\n" not in text else f"<{type(value).__name__}>"
