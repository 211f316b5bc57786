"""Coefficient schedules for penalties and weight decay: plain functions of the optimizer-step count.

A schedule maps the number of optimizer steps taken so far (0 at the first step) to a coefficient.
The callbacks count only steps that really ran (not those the AMP ``GradScaler`` skipped) and save
the count in checkpoints, so a resumed run continues the schedule where it stopped.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

__all__ = [
    "Constant",
    "Cosine",
    "Linear",
    "Schedule",
    "ScheduleLike",
    "Warmup",
    "as_schedule",
    "check_coefficient",
]


class Schedule:
    """Base class: ``schedule(step) -> coefficient``."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError


#: A constant, a :class:`Schedule`, or any callable ``step -> float``.
ScheduleLike = float | int | Schedule | Callable[[int], float]


class Constant(Schedule):
    """The same value at every step.

    Raises:
        TypeError: If ``value`` is not a number.
        ValueError: If ``value`` is negative or not finite.
    """

    def __init__(self, value: float) -> None:
        self.value = check_coefficient(value, "value")

    def __call__(self, step: int) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"Constant({self.value})"


class _Ramp(Schedule):
    """From ``start`` to ``end`` over ``steps`` steps, then ``end``: the shape is the subclass's."""

    def __init__(self, start: float, end: float, steps: int) -> None:
        # Both ends >= 0 keep every value in between >= 0: nothing can go negative at a later step.
        self.start, self.end = check_coefficient(start, "start"), check_coefficient(end, "end")
        self.steps = _positive_steps(steps, "steps")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(start={self.start}, end={self.end}, steps={self.steps})"


class Linear(_Ramp):
    """From ``start`` to ``end`` linearly over ``steps`` steps, then ``end``.

    Raises:
        TypeError: If ``start`` or ``end`` is not a number, or ``steps`` not an int.
        ValueError: If ``start`` or ``end`` is negative or not finite, or ``steps < 1``.
    """

    def __call__(self, step: int) -> float:
        t = min(step / self.steps, 1.0)
        return self.start + (self.end - self.start) * t


class Cosine(_Ramp):
    """From ``start`` to ``end`` along a half cosine over ``steps`` steps, then ``end``.

    Raises:
        TypeError: If ``start`` or ``end`` is not a number, or ``steps`` not an int.
        ValueError: If ``start`` or ``end`` is negative or not finite, or ``steps < 1``.
    """

    def __call__(self, step: int) -> float:
        t = min(step / self.steps, 1.0)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * t))


class Warmup(Schedule):
    """Linear ramp from 0 over ``warmup_steps``, then ``after`` (a value or another schedule).

    The schedule ``after`` sees the step count since the end of the warm-up.

    Raises:
        TypeError: If ``after`` is not a number, schedule or callable, or ``warmup_steps`` not an int.
        ValueError: If ``after`` is a negative or non-finite number, or ``warmup_steps < 1``.
    """

    def __init__(self, after: ScheduleLike, warmup_steps: int) -> None:
        self.warmup_steps = _positive_steps(warmup_steps, "warmup_steps")
        self.after = as_schedule(after, "after")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.after(0) * step / self.warmup_steps
        return self.after(step - self.warmup_steps)

    def __repr__(self) -> str:
        return f"Warmup({self.after!r}, warmup_steps={self.warmup_steps})"


class _Callable(Schedule):
    def __init__(self, fn: Callable[[int], float]) -> None:
        self.fn = fn

    def __call__(self, step: int) -> float:
        value = self.fn(step)
        # Numbers of any kind (NumPy, a 0-dim tensor) become Python floats; a string or a bool is handed
        # on as it is, for the callbacks' check to refuse naming the argument and the step.
        return value if isinstance(value, (str, bool)) or not hasattr(value, "__float__") else float(value)

    def __repr__(self) -> str:
        return f"{getattr(self.fn, '__name__', type(self.fn).__name__)}(step)"


def check_coefficient(value: float, argument: str, step: int | None = None) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming ``argument`` if negative or not finite."""
    where = "" if step is None else f" (the schedule returned it at step {step})"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # NumPy scalars are Real too
        raise TypeError(f"`{argument}` must be a number, got {type(value).__name__}: {value!r}{where}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{argument}` must be a finite number >= 0, got {value!r}{where}")
    return float(value)


def as_schedule(value: ScheduleLike, argument: str) -> Schedule:
    """Turn a constant or a callable into a [`Schedule`][lightning_decay.schedules.Schedule].

    Constants are validated at once, callables at each step by the callbacks.

    Raises:
        ValueError: If ``value`` is a negative or non-finite constant, naming ``argument``.
        TypeError: If ``value`` is neither a number nor callable.
    """
    if isinstance(value, Schedule):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return Constant(check_coefficient(value, argument))
    if callable(value):
        return _Callable(value)
    raise TypeError(f"`{argument}` must be a number >= 0, a Schedule or a callable step -> float, got {value!r}")


def _positive_steps(steps: int, argument: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"`{argument}` must be a positive int, got {type(steps).__name__}: {steps!r}")
    if steps <= 0:
        raise ValueError(f"`{argument}` must be a positive int, got {steps!r}")
    return int(steps)
