"""Coefficient schedules: values against their formulas, use in training, validation at the step."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from lightning_decay import WeightDecay, WeightPenalty
from lightning_decay.schedules import Constant, Cosine, Linear, Warmup, as_schedule, check_coefficient
from tests.test_penalty import BATCH, N_SAMPLES, Lit, assert_runs_equal, decayed, fit, run

STEPS = range(0, 25)


def test_constant() -> None:
    s = Constant(0.3)
    assert [s(t) for t in STEPS] == [0.3] * len(STEPS)


@pytest.mark.parametrize(("start", "end", "n"), [(1.0, 0.0, 10), (0.0, 0.5, 7), (0.2, 0.2, 3)])
def test_linear_matches_formula(start: float, end: float, n: int) -> None:
    s = Linear(start, end, n)
    for t in STEPS:
        frac = min(t, n) / n
        assert math.isclose(s(t), start + (end - start) * frac, rel_tol=1e-12, abs_tol=1e-15)
    assert s(0) == start and s(n) == end and s(10 * n) == end


@pytest.mark.parametrize(("start", "end", "n"), [(1.0, 0.0, 10), (0.1, 0.5, 4)])
def test_cosine_matches_formula(start: float, end: float, n: int) -> None:
    s = Cosine(start, end, n)
    for t in STEPS:
        frac = min(t, n) / n
        expected = end + (start - end) * (1 + math.cos(math.pi * frac)) / 2
        assert math.isclose(s(t), expected, rel_tol=1e-12, abs_tol=1e-15)
    assert math.isclose(s(n // 2 * 2 // 2), s(n // 2))
    assert math.isclose(s(0), start) and math.isclose(s(n), end)


def test_warmup_ramps_then_follows_the_inner_schedule_from_its_step_zero() -> None:
    w = 4
    inner = Linear(1.0, 0.0, 10)
    s = Warmup(inner, warmup_steps=w)
    for t in STEPS:
        expected = inner(0) * t / w if t < w else inner(t - w)
        assert math.isclose(s(t), expected, rel_tol=1e-12)
    assert s(0) == 0.0 and s(w) == 1.0
    assert [Warmup(0.5, 2)(t) for t in range(4)] == [0.0, 0.25, 0.5, 0.5]


def test_callables_and_numbers_become_schedules() -> None:
    s = as_schedule(lambda t: 2 * t, "l2")
    assert [s(t) for t in range(3)] == [0.0, 2.0, 4.0]
    assert isinstance(as_schedule(3, "l2"), Constant)
    with pytest.raises(TypeError, match="`l2`"):
        as_schedule("0.1", "l2")
    with pytest.raises(ValueError, match="`l1`"):
        as_schedule(-1.0, "l1")


@pytest.mark.parametrize(("bad", "error"), [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_step_counts_raise(bad: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="`steps`"):
        Linear(1.0, 0.0, bad)
    with pytest.raises(error, match="`steps`"):
        Cosine(1.0, 0.0, bad)
    with pytest.raises(error, match="`warmup_steps`"):
        Warmup(1.0, bad)


def test_check_coefficient_names_argument_and_step() -> None:
    assert check_coefficient(0.5, "l2", 3) == 0.5
    with pytest.raises(ValueError, match=r"`l2`.*step 3"):
        check_coefficient(-0.5, "l2", 3)
    with pytest.raises(ValueError, match="`l2`"):
        check_coefficient(float("nan"), "l2")


# ----------------------------------------------------------------------------- in training
def test_weight_decay_schedule_is_evaluated_at_each_real_step() -> None:
    sched = Linear(0.5, 0.0, 6)  # reaches 0 before the end of the run: the last steps do not decay
    lr = 0.1
    got = run(Lit(lambda m: torch.optim.SGD(m.parameters(), lr=lr, foreach=False)), [WeightDecay(sched)], max_epochs=2)

    # reference: a plain SGD loop with w *= 1 - lr * schedule(t) applied by hand before step t
    module = Lit(lambda m: None)
    opt = torch.optim.SGD(module.parameters(), lr=lr, foreach=False)
    from tests.test_penalty import loader, weights

    want, t = [], 0
    for _ in range(2):
        for x, y in loader():
            opt.zero_grad()
            nn.functional.mse_loss(module.net(x), y).backward()
            with torch.no_grad():
                for p in decayed(module):
                    p.mul_(1 - lr * sched(t))
            opt.step()
            t += 1
            want.append(weights(module))
    assert_runs_equal(got, want, exact=True)


def test_penalty_schedule_matches_explicit_scheduled_loss_term() -> None:
    sched = Cosine(0.4, 0.0, 2 * N_SAMPLES // BATCH)

    def penalty(m: Lit) -> torch.Tensor:
        return sched(m.trainer.global_step) / 2 * sum(p.pow(2).sum() for p in decayed(m))  # type: ignore[return-value]

    adam = lambda m: torch.optim.Adam(m.parameters(), lr=0.01, foreach=False)  # noqa: E731
    got = run(Lit(adam), [WeightPenalty(l2=sched)], max_epochs=2)
    want = run(Lit(adam, extra_loss=penalty), max_epochs=2)
    assert_runs_equal(got, want, exact=False, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda f: WeightDecay(f), "weight_decay"),
        (lambda f: WeightPenalty(l2=f), "l2"),
        (lambda f: WeightPenalty(l1=f), "l1"),
        (lambda f: WeightPenalty(l1=f, l1_mode="proximal"), "l1"),
    ],
)
def test_negative_schedule_value_raises_naming_argument_and_step(make: Any, argument: str) -> None:
    def goes_negative(step: int) -> float:
        return 0.01 * (2 - step)  # 0.02, 0.01, 0.0, -0.01 at step 3

    with pytest.raises(ValueError, match=rf"`{argument}`.*step 3"):
        fit(Lit(lambda m: torch.optim.SGD(m.parameters(), lr=0.1)), [make(goes_negative)])


def test_step_counter_is_saved_in_state_dict() -> None:
    cb = WeightDecay(Linear(0.1, 0.0, 100))
    fit(Lit(lambda m: torch.optim.SGD(m.parameters(), lr=0.1)), [cb], max_epochs=2)
    assert cb.state_dict()["steps"] == [2 * N_SAMPLES // BATCH]
    other = WeightDecay(Linear(0.1, 0.0, 100))
    other.load_state_dict(cb.state_dict())
    assert other.state_dict()["steps"] == [2 * N_SAMPLES // BATCH]
