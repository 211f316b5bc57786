"""Argument checks shared by every public entry point: one wording for each kind of refusal.

Coefficients have their own check (`lightning_decay.schedules.check_coefficient`), since schedules
validate the values they return with it at every step.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection
from typing import Any, TypeVar

__all__ = ["check_choice", "check_flag", "is_count"]

T = TypeVar("T")


def check_flag(value: Any, argument: str) -> bool:
    """``value`` if it is ``True`` or ``False``; a ``TypeError`` naming ``argument`` for anything else
    (``"no"``, ``0``, ``None``: a truthy string would otherwise switch a feature on)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{argument}` must be True or False, got {value!r}")
    return value


def check_choice(value: T, choices: Collection[Any], argument: str) -> T:
    """``value`` if it is one of the string ``choices``; a ``ValueError`` naming ``argument`` and them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{argument}` must be one of {choices}, got {value!r}")
    return value


def is_count(value: Any) -> bool:
    """Whether ``value`` is an integer >= 0 (a step count, an index), ``bool`` excluded."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
