"""``WeightDecay``: decoupled decay for any optimizer, checked against torch's own optimizers.

References: ``torch.optim.AdamW`` / ``SGD`` / ``Adam`` with the decay groups of ``decay_param_groups``,
and plain torch training loops that apply the decay formula by hand around a plain optimizer.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_decay import DecayRules, WeightDecay, WeightPenalty, decay_param_groups
from tests.test_penalty import Lit, assert_runs_equal, decayed, fit, loader, run, weights


def adamw_groups(lam: float, lr: float = 0.01) -> Callable[[Lit], torch.optim.Optimizer]:
    return lambda m: torch.optim.AdamW(decay_param_groups(m, weight_decay=lam), lr=lr, foreach=False)


def adam_plain(lr: float = 0.01, **kw: Any) -> Callable[[Lit], torch.optim.Optimizer]:
    return lambda m: torch.optim.Adam(m.parameters(), lr=lr, foreach=False, **kw)


def torch_loop(
    optimizer: Callable[[Lit], torch.optim.Optimizer],
    epochs: int,
    before_step: Callable[[Lit, torch.optim.Optimizer], None],
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> list[dict[str, Tensor]]:
    """A plain torch training loop (no Lightning, no callback) with a hand-written step before ``opt.step()``."""
    module = Lit(optimizer)
    opt = optimizer(module)
    sched = scheduler(opt) if scheduler is not None else None
    out = []
    for _ in range(epochs):
        for x, y in loader():
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(module.net(x), y).backward()
            with torch.no_grad():
                before_step(module, opt)
            opt.step()
            if sched is not None:
                sched.step()
            out.append(weights(module))
    return out


# ------------------------------------------------------------------------------------- AdamW
def test_adam_plus_weight_decay_is_bitwise_adamw_on_decay_groups() -> None:
    lam = 0.1
    got = run(Lit(adam_plain()), [WeightDecay(lam)], max_epochs=2)
    want = run(Lit(adamw_groups(lam)), max_epochs=2)
    assert_runs_equal(got, want, exact=True)
    # and not AdamW on every parameter (biases and the LayerNorm are not decayed)
    everything = run(Lit(lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=lam, foreach=False)))
    assert not torch.equal(got[3]["net.1.weight"], everything[-1]["net.1.weight"])


def test_each_param_group_decays_with_its_own_lr() -> None:
    lam, overrides = 0.2, {"net.3.*": {"lr": 0.05}}

    def groups(m: Lit, wd: float) -> list[dict[str, Any]]:
        return decay_param_groups(m, weight_decay=wd, overrides=overrides)

    got = run(Lit(lambda m: torch.optim.Adam(groups(m, 0.0), lr=0.01, foreach=False)), [WeightDecay(lam)])
    want = run(Lit(lambda m: torch.optim.AdamW(groups(m, lam), lr=0.01, foreach=False)))
    assert_runs_equal(got, want, exact=True)


# ------------------------------------------------------------------------------------- modes
def _lambda_lr(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # lr changes at every step


def test_lr_ratio_mode_scales_decay_by_lr_over_initial_lr() -> None:
    lam, lr0 = 0.05, 0.01

    def opt_with_scheduler(m: Lit) -> Any:
        opt = adam_plain(lr0)(m)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": _lambda_lr(opt), "interval": "step"}}

    def by_hand(m: Lit, opt: torch.optim.Optimizer) -> None:
        lr = opt.param_groups[0]["lr"]
        for p in decayed(m):
            p.mul_(1 - lr / lr0 * lam)

    got = run(Lit(opt_with_scheduler), [WeightDecay(lam, mode="lr_ratio")], max_epochs=2)
    want = torch_loop(adam_plain(lr0), 2, by_hand, _lambda_lr)
    assert_runs_equal(got, want, exact=True)
    # mode="lr" is a different thing: w *= 1 - lr * wd
    lr_mode = run(Lit(opt_with_scheduler), [WeightDecay(lam, mode="lr")], max_epochs=2)
    assert not torch.allclose(lr_mode[-1]["net.0.weight"], got[-1]["net.0.weight"], atol=1e-6)


def test_constant_mode_shrinks_by_one_minus_wd() -> None:
    lam = 0.02

    def by_hand(m: Lit, opt: torch.optim.Optimizer) -> None:
        for p in decayed(m):
            p.mul_(1 - lam)

    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, foreach=False)  # noqa: E731
    got = run(Lit(sgd), [WeightDecay(lam, mode="constant")], max_epochs=2)
    want = torch_loop(sgd, 2, by_hand)
    assert_runs_equal(got, want, exact=True)


def test_lr_mode_with_sgd_is_decoupled_sgdw() -> None:
    lam, lr = 0.3, 0.05

    def by_hand(m: Lit, opt: torch.optim.Optimizer) -> None:
        for p in decayed(m):
            p.mul_(1 - lr * lam)

    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, foreach=False)  # noqa: E731
    assert_runs_equal(run(Lit(sgd), [WeightDecay(lam)]), torch_loop(sgd, 1, by_hand), exact=True)


# ----------------------------------------------------------------------------------- take-over
@pytest.mark.parametrize(
    "make",
    [
        lambda params, **kw: torch.optim.AdamW(params, lr=0.01, foreach=False, **kw),
        lambda params, **kw: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False, **kw),
        lambda params, **kw: torch.optim.Adam(params, lr=0.01, foreach=False, **kw),
    ],
    ids=["AdamW-decoupled", "SGD-coupled", "Adam-coupled"],
)
def test_take_over_uses_the_optimizers_own_semantics_on_decayed_params(make: Callable[..., Any]) -> None:
    lam = 0.2
    cb = WeightDecay()
    module = Lit(lambda m: make(m.parameters(), weight_decay=lam))
    got = run(module, [cb], max_epochs=2)
    want = run(Lit(lambda m: make(decay_param_groups(m, weight_decay=lam))), max_epochs=2)
    assert_runs_equal(got, want, exact=True)
    assert cb.takes_over
    assert [g["weight_decay"] for g in module.trainer.optimizers[0].param_groups] == [0.0]
    # the plain optimizer on every parameter differs: the biases and the norm are now left alone
    everything = run(Lit(lambda m: make(m.parameters(), weight_decay=lam)), max_epochs=2)
    assert not torch.equal(everything[-1]["net.1.weight"], got[-1]["net.1.weight"])


def test_take_over_warns_when_there_is_nothing_to_take_over() -> None:
    with pytest.warns(UserWarning, match="found no weight_decay to take over"):
        fit(Lit(adam_plain()), [WeightDecay()])


# -------------------------------------------------------------------------------- double decay
def test_explicit_decay_with_adamw_default_weight_decay_raises() -> None:
    module = Lit(lambda m: torch.optim.AdamW(m.parameters(), lr=0.01))  # weight_decay=0.01 by default!
    with pytest.raises(MisconfigurationException, match="Double weight decay"):
        fit(module, [WeightDecay(0.05)])


def test_decay_groups_with_zero_weight_decay_are_accepted() -> None:
    got = run(Lit(adamw_groups(0.0)), [WeightDecay(0.1)])
    assert_runs_equal(got, run(Lit(adamw_groups(0.1))), exact=True)


@pytest.mark.parametrize("penalty_first", [True, False])
def test_l2_penalty_and_weight_decay_on_same_params_raise(penalty_first: bool) -> None:
    cbs = [WeightPenalty(l2=0.1), WeightDecay(0.05)]
    with pytest.raises(MisconfigurationException, match="Double weight decay"):
        fit(Lit(adam_plain()), cbs if penalty_first else cbs[::-1])


def test_l1_penalty_and_weight_decay_together_are_allowed() -> None:
    lam, l1 = 0.1, 0.01
    got = run(Lit(adam_plain()), [WeightPenalty(l1=l1), WeightDecay(lam)])

    def l1_loss(m: nn.Module) -> Tensor:
        return l1 * sum(p.abs().sum() for p in decayed(m))  # type: ignore[return-value]

    want = run(Lit(adamw_groups(lam), extra_loss=l1_loss))
    assert_runs_equal(got, want, exact=False, rtol=1e-5, atol=1e-7)


def test_l2_penalty_and_weight_decay_on_disjoint_params_are_allowed() -> None:
    lam, l2 = 0.1, 0.2
    first_only, last_only = DecayRules(exclude=["net.3.*"]), DecayRules(exclude=["net.0.*"])
    got = run(Lit(adam_plain()), [WeightPenalty(l2=l2, rules=last_only), WeightDecay(lam, rules=first_only)])

    def reference(m: Lit) -> torch.optim.Optimizer:
        return torch.optim.AdamW(decay_param_groups(m, weight_decay=lam, rules=first_only), lr=0.01, foreach=False)

    def l2_last(m: Lit) -> Tensor:
        return l2 / 2 * m.net[3].weight.pow(2).sum()

    want = run(Lit(reference, extra_loss=l2_last))
    assert_runs_equal(got, want, exact=False, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------- semantics
def test_frozen_param_held_by_optimizer_is_not_decayed_like_adamw() -> None:
    lam = 0.1

    def frozen_first(opt_fn: Callable[[Lit], Any]) -> Lit:
        m = Lit(opt_fn)
        m.net[0].weight.requires_grad_(False)
        return m

    got = run(frozen_first(adam_plain()), [WeightDecay(lam)])
    ref_module = frozen_first(lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, foreach=False))
    want = run(ref_module)  # reference: AdamW on every parameter; the frozen one has no grad and is skipped
    start = Lit(adam_plain()).net[0].weight.detach()
    assert torch.equal(want[-1]["net.0.weight"], start)
    assert torch.equal(got[-1]["net.0.weight"], start)


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"weight_decay": float("nan")}, ValueError, "weight_decay"),
        ({"weight_decay": float("inf")}, ValueError, "weight_decay"),
        ({"weight_decay": "0.1"}, TypeError, "weight_decay"),
        ({"weight_decay": 0.1, "mode": "cosine"}, ValueError, "mode"),
        ({"rules": ["net.0.*"]}, TypeError, "rules"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict[str, Any], error: type[Exception], argument: str) -> None:
    with pytest.raises(error, match=f"`{argument}`"):
        WeightDecay(**kwargs)


def test_rules_choose_the_decayed_params() -> None:
    rules = DecayRules(decay_bias=True)
    got = run(Lit(adam_plain()), [WeightDecay(0.1, rules=rules)])

    def reference(m: Lit) -> torch.optim.Optimizer:
        return torch.optim.AdamW(decay_param_groups(m, weight_decay=0.1, rules=rules), lr=0.01, foreach=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = run(Lit(reference))
    assert_runs_equal(got, want, exact=True)


# ------------------------------------------------------------------- logged coefficients
def _csv_rows(logger: CSVLogger) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            rows.setdefault(int(row.pop("step")), {}).update({k: float(v) for k, v in row.items() if v != ""})
    return rows


def test_taken_over_decay_is_logged_where_learning_rate_monitor_reads_zero(tmp_path: Path) -> None:
    lam = 0.05
    logger = CSVLogger(tmp_path, name="run")
    monitor = LearningRateMonitor(log_weight_decay=True)
    got = run(Lit(adamw_groups(lam)), [WeightDecay(), monitor], max_epochs=1, logger=logger, log_every_n_steps=1)
    # What is applied: torch's AdamW with the same groups, bitwise.
    assert_runs_equal(got, run(Lit(adamw_groups(lam)), max_epochs=1), exact=True)
    rows = _csv_rows(logger)
    steps = [s for s, row in rows.items() if "weight_decay/decay" in row]
    assert steps == list(range(len(got)))  # every logging step
    for step in steps:
        assert rows[step]["lr-AdamW/decay-weight_decay"] == 0.0  # the optimizer's own, taken over
        assert rows[step]["weight_decay/decay"] == lam  # the callback's, applied to the decay group
        assert "weight_decay/no_decay" not in rows[step]  # no decayed weight in that group


def test_scheduled_decay_logs_the_coefficient_of_each_step(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="run")

    def schedule(step: int) -> float:
        return 0.1 * (step + 1)

    got = run(Lit(adam_plain(lr=0.01)), [WeightDecay(schedule)], max_epochs=1, logger=logger, log_every_n_steps=2)
    rows = _csv_rows(logger)
    logged = {s: row["weight_decay/pg1"] for s, row in rows.items() if "weight_decay/pg1" in row}
    # log_every_n_steps=2: labels 1, 3; the step with label s ran with the schedule's value at s.
    assert logged == {s: schedule(s) for s in range(1, len(got), 2)}
