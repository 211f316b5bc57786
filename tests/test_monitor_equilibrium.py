"""``WeightNormMonitor(log_equilibrium=True)`` in real fits (issue 21): the predicted equilibrium angle it logs,
the angle measured against it, the scale-invariance score, and the decay report read back from its files.

A ``Linear`` followed by ``LayerNorm(elementwise_affine=False)`` (scale invariant) trained on noise for 4
timescales ``tau = 1/(lr * wd)``, as in tests/test_equilibrium.py, but through ``Trainer.fit`` (and Fabric)
with the monitor logging to a real CSV or TensorBoard logger. Predictions are checked against the paper's
formulas applied by hand to the lr read from the optimizer and the decay coefficient of the step; measured
angles against the predictions within 10 %.
"""

from __future__ import annotations

import csv
import math
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_decay import WeightDecay, WeightNormMonitor, WeightPenalty, schedules
from lightning_decay import equilibrium as eq
from tests.test_equilibrium import CASES, LR_ADAM, STEPS, TAU

KEY = "angular_update_equilibrium/lin.weight"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: on a loaded machine, spinning intra-op threads cost 25x
    yield
    torch.set_num_threads(threads)


class Noise(pl.LightningModule):
    """``lin`` then ``LayerNorm`` (``norm=False``: nothing), MSE to noise; ``make`` builds the optimizer."""

    def __init__(self, make: Callable[[Any], Optimizer], norm: bool = True, scheduler: Any = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 64, bias=False)
        self.norm = nn.LayerNorm(64, elementwise_affine=False) if norm else nn.Identity()
        self.make, self.scheduler = make, scheduler

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.lin(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = self.make(self.parameters())
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "step"}}


def noise(steps: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)) for _ in range(steps)]


class LrRecorder(Callback):
    """The lr of each step as the optimizer holds it when it steps, by step label."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Optimizer) -> None:
        self.lrs[trainer.fit_loop.epoch_loop._batches_that_stepped] = float(optimizer.param_groups[0]["lr"])


def fit(
    tmp_path: Path,
    model: pl.LightningModule,
    steps: int,
    callbacks: list[Callback],
    logger: Any = None,
    **monitor: Any,
) -> tuple[dict[int, dict[str, float]], WeightNormMonitor, LrRecorder, pl.Trainer]:
    logger = logger or CSVLogger(tmp_path, name="csv")
    mon = WeightNormMonitor(log_equilibrium=True, logging_interval=1, **monitor)
    recorder = LrRecorder()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[recorder, *callbacks, mon],
    )
    trainer.fit(model, torch.utils.data.DataLoader(noise(steps), batch_size=None))  # type: ignore[arg-type]
    rows: dict[int, dict[str, float]] = {}
    if isinstance(logger, CSVLogger):
        logger.save()
        with open(Path(logger.log_dir) / "metrics.csv") as f:
            for row in csv.DictReader(f):
                rows.setdefault(int(row.pop("step")), {}).update({k: float(v) for k, v in row.items() if v != ""})
    return rows, mon, recorder, trainer


def tail(rows: dict[int, dict[str, float]], key: str, end: int | None = None) -> float:
    """Mean of ``key`` over the last tenth of the logged steps before ``end``."""
    values = [row[key] for step, row in sorted(rows.items()) if key in row and (end is None or step < end)]
    return eq.tail_mean(values)


def read_report(directory: Path) -> list[dict[str, str]]:
    """``decay_report.md`` parsed: one dict per table row, by column header."""
    lines = [ln for ln in (directory / "decay_report.md").read_text().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert re.fullmatch(r"\|(---\|)+", lines[1])
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in lines[2:]]


# ----------------------------------------------------------------------------------------- equilibrium
@pytest.mark.parametrize("case", ["sgd", "sgd_momentum", "adamw", "adam_weight_decay"])
def test_measured_angle_is_within_10_percent_of_the_logged_prediction(tmp_path: Path, case: str) -> None:
    make, decay, by_hand = CASES[case]
    callbacks: list[Callback] = [] if decay is None else [WeightDecay(decay)]
    rows, _, _, trainer = fit(tmp_path, Noise(make), STEPS, callbacks)
    predicted = [row[KEY] for row in rows.values() if KEY in row]
    assert len(predicted) == STEPS  # every (logging) step
    assert all(p == pytest.approx(by_hand, rel=1e-12) for p in predicted)  # the paper's formula by hand
    measured = tail(rows, "angular_update/lin.weight")
    assert measured == pytest.approx(by_hand, rel=0.10)
    assert tail(rows, "scale_invariance/lin.weight") < eq.SCALE_INVARIANT_MAX_SCORE / 10  # grad ⟂ w
    # The report of the fit, beside the CSV logs: 4 timescales, at equilibrium.
    (row,) = read_report(Path(trainer.logger.log_dir))  # type: ignore[union-attr]
    assert row["layer"] == "lin.weight" and row["scale invariant"] == "yes"
    assert float(row["timescales"]) == pytest.approx(STEPS / TAU, rel=1e-3)
    assert float(row["tau (steps)"]) == pytest.approx(TAU, rel=1e-3)
    assert float(row["measured angle"]) == pytest.approx(measured, rel=1e-3)
    assert float(row["predicted angle"]) == pytest.approx(by_hand, rel=1e-3)
    assert row["verdict"].startswith("at equilibrium")


def adamw_angle(lr: float, wd: float) -> float:
    """Kosson et al.'s AdamW equilibrium, by hand (betas 0.9, 0.999)."""
    return math.sqrt(2 * lr * wd * 0.1 / 1.9)


def test_prediction_tracks_a_scheduled_lr(tmp_path: Path) -> None:
    """AdamW, lr x4 after 4 tau (then tau/4): each logged prediction is the formula of the lr the optimizer
    stepped with, and the measured angle follows it to twice the angle."""
    first, total = STEPS, STEPS + TAU
    wd = 1 / (TAU * LR_ADAM)
    scheduler = lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[first], gamma=4.0)  # noqa: E731
    rows, _, recorder, _ = fit(tmp_path, Noise(CASES["adamw"][0], scheduler=scheduler), total, [])
    assert sorted(recorder.lrs.values())[-1] == pytest.approx(4 * LR_ADAM)
    for step, lr in recorder.lrs.items():
        assert rows[step][KEY] == pytest.approx(adamw_angle(lr, wd), rel=1e-12), step
    before, after = rows[first - 1][KEY], rows[total - 1][KEY]
    assert after == pytest.approx(2 * before, rel=1e-9)
    assert tail(rows, "angular_update/lin.weight", first) == pytest.approx(before, rel=0.10)
    assert tail(rows, "angular_update/lin.weight") == pytest.approx(after, rel=0.10)


def test_prediction_tracks_a_weight_decay_schedule(tmp_path: Path) -> None:
    """Adam + WeightDecay(Linear wd -> 4 wd over 2 tau): the prediction of each step is the formula of the
    coefficient of that step (the schedule of the step count, by hand)."""
    wd = 1 / (TAU * LR_ADAM)
    ramp = schedules.Linear(wd, 4 * wd, steps=2 * TAU)
    rows, _, _, trainer = fit(tmp_path, Noise(CASES["adam_weight_decay"][0]), 3 * TAU, [WeightDecay(ramp)])
    for step, row in rows.items():
        if KEY in row:
            assert row[KEY] == pytest.approx(adamw_angle(LR_ADAM, ramp(step)), rel=1e-12), step
    assert rows[3 * TAU - 1][KEY] == pytest.approx(2 * rows[0][KEY], rel=1e-9)
    assert tail(rows, "angular_update/lin.weight") == pytest.approx(rows[3 * TAU - 1][KEY], rel=0.10)
    (row,) = read_report(Path(trainer.logger.log_dir))  # type: ignore[union-attr]
    by_hand = sum(LR_ADAM * ramp(t) for t in range(3 * TAU))  # sum of lr_t * wd_t
    assert float(row["timescales"]) == pytest.approx(by_hand, rel=1e-3)


LR = 0.05
DECAY_SOURCES: dict[str, tuple[Callable[[Any], Optimizer], Callable[[], list[Callback]], Callable[[float], float]]] = {
    # name: (optimizer, callbacks, the prediction at lr by hand)
    "lr": (lambda p: torch.optim.Adam(p, lr=LR), lambda: [WeightDecay(0.1)], lambda lr: adamw_angle(lr, 0.1)),
    "lr_ratio": (  # shrink lr / lr0 * wd: decoupled wd / lr0 in mode "lr"
        lambda p: torch.optim.Adam(p, lr=LR),
        lambda: [WeightDecay(0.1, mode="lr_ratio")],
        lambda lr: adamw_angle(lr, 0.1 / LR),
    ),
    "constant": (  # shrink wd: wd / lr
        lambda p: torch.optim.Adam(p, lr=LR),
        lambda: [WeightDecay(1e-3, mode="constant")],
        lambda lr: adamw_angle(lr, 1e-3 / lr),
    ),
    "timescale": (  # lambda = 1 / (lr0 * tau * S), S = 40 steps per epoch
        lambda p: torch.optim.Adam(p, lr=LR),
        lambda: [WeightDecay(timescale_epochs=2.0)],
        lambda lr: adamw_angle(lr, 1 / (LR * 2.0 * 40)),
    ),
    "take_over_adamw": (  # decoupled, as AdamW's own
        lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.1),
        lambda: [WeightDecay()],
        lambda lr: adamw_angle(lr, 0.1),
    ),
    "take_over_sgd": (  # coupled, as SGD's own: sqrt(2 lr wd / (1 + m))
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, weight_decay=0.01),
        lambda: [WeightDecay()],
        lambda lr: math.sqrt(2 * lr * 0.01 / 1.9),
    ),
    "penalty_sgd": (  # WeightPenalty(l2) on SGD is SGD's weight_decay
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9),
        lambda: [WeightPenalty(l2=0.01)],
        lambda lr: math.sqrt(2 * lr * 0.01 / 1.9),
    ),
    "optimizer_sgd": (
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, weight_decay=0.01),
        list,
        lambda lr: math.sqrt(2 * lr * 0.01 / 1.9),
    ),
}


@pytest.mark.parametrize("source", list(DECAY_SOURCES))
def test_prediction_uses_the_decay_that_really_applies(tmp_path: Path, source: str) -> None:
    """Every way a decay reaches the weights, under a cosine lr: the prediction is the formula of the step's lr
    and the coefficient as ``mode="lr"`` (a take-over keeps the optimizer's coupling)."""
    make, callbacks, by_hand = DECAY_SOURCES[source]
    scheduler = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=80)  # noqa: E731
    rows, _, recorder, _ = fit(tmp_path, Noise(make, scheduler=scheduler), 40, callbacks())
    assert len({round(lr, 12) for lr in recorder.lrs.values()}) > 30  # the lr moved
    for step, lr in recorder.lrs.items():
        assert rows[step][KEY] == pytest.approx(by_hand(lr), rel=1e-12), (source, step)


def test_weight_that_is_not_scale_invariant_is_reported_as_such(tmp_path: Path) -> None:
    rows, _, _, trainer = fit(tmp_path, Noise(CASES["sgd"][0], norm=False), 200, [])
    assert tail(rows, "scale_invariance/lin.weight") > eq.SCALE_INVARIANT_MAX_SCORE
    (row,) = read_report(Path(trainer.logger.log_dir))  # type: ignore[union-attr]
    assert row["scale invariant"] == "no"
    assert row["verdict"].startswith("not scale invariant")


def test_coupled_l2_under_adam_logs_no_prediction_and_warns_once(tmp_path: Path) -> None:
    make = lambda p: torch.optim.Adam(p, lr=LR_ADAM, weight_decay=0.01)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, mon, _, trainer = fit(tmp_path, Noise(make), 30, [])
    said = [w for w in caught if "angular_update_equilibrium" in str(w.message)]
    assert len(said) == 1 and "coupled L2" in str(said[0].message) and "no closed form" in str(said[0].message)
    assert all(KEY not in row for row in rows.values())
    assert any("angular_update/lin.weight" in row for row in rows.values())  # the angle itself is logged
    assert not (Path(trainer.logger.log_dir) / "decay_report.md").exists()  # type: ignore[union-attr]
    assert not mon._probes.history.series


# ---------------------------------------------------------------------------------- report files, TB
def test_report_files_and_the_tensorboard_picture_read_back(tmp_path: Path) -> None:
    from matplotlib.image import imread
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    _, _, _, trainer = fit(tmp_path, Noise(CASES["adamw"][0]), 120, [], logger=logger)
    directory = Path(logger.log_dir)
    (row,) = read_report(directory)
    assert row["layer"] == "lin.weight" and float(row["lr"]) == pytest.approx(LR_ADAM)
    assert float(row["tau (epochs)"]) == pytest.approx(TAU / 120, rel=1e-3)  # one epoch of 120 steps
    assert float(row["timescales"]) == pytest.approx(120 / TAU, rel=1e-3)
    assert row["verdict"] == eq.verdict(120 / TAU, float(row["measured angle"]), float(row["predicted angle"]), 0.0)
    picture = imread(directory / "decay_report.png")
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 100
    acc = EventAccumulator(str(directory), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    (image,) = acc.Images("decay_report")
    assert image.width == picture.shape[1] and image.height == picture.shape[0]
    assert image.step == trainer.global_step
    assert len(acc.Scalars(KEY)) == 120


def test_no_report_when_turned_off(tmp_path: Path) -> None:
    _, _, _, trainer = fit(tmp_path, Noise(CASES["adamw"][0]), 20, [], decay_report=False)
    assert not (Path(trainer.logger.log_dir) / "decay_report.md").exists()  # type: ignore[union-attr]


def test_kept_and_fresh_snapshots_log_the_same_values(tmp_path: Path) -> None:
    """``keep_snapshot=False`` (a fresh copy per logging step) and the kept buffer, which also holds the
    products ``grad * w`` of the scale-invariance score meanwhile: the same ops, the same numbers."""
    kept, *_ = fit(tmp_path / "kept", Noise(CASES["adamw"][0]), 30, [])
    fresh, *_ = fit(tmp_path / "fresh", Noise(CASES["adamw"][0]), 30, [], keep_snapshot=False)
    assert kept == fresh and any("scale_invariance/lin.weight" in row for row in kept.values())


# ------------------------------------------------------------------------------------------ Fabric
def test_attached_under_fabric_logs_the_same_metrics_and_writes_the_report(tmp_path: Path) -> None:
    from lightning.fabric import Fabric

    class Recorder:
        def __init__(self) -> None:
            self.rows: dict[int, dict[str, float]] = {}

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            self.rows.setdefault(step, {}).update(metrics)

    steps = 60
    make, wd, _ = CASES["adam_weight_decay"]
    trainer_rows, *_ = fit(tmp_path, Noise(make), steps, [WeightDecay(wd)])
    fabric = Fabric(accelerator="cpu", devices=1)
    module = Noise(make)
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    recorder = Recorder()
    decay = WeightDecay(wd)
    monitor = WeightNormMonitor(log_equilibrium=True, logging_interval=1)
    with decay.attach(model, optimizer), monitor.attach(model, optimizer, recorder):
        for x, y in noise(steps):
            optimizer.zero_grad()
            fabric.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
        rows = monitor.write_decay_report(tmp_path / "report", steps_per_epoch=steps)
    assert sorted(recorder.rows) == list(range(steps))
    for step, row in recorder.rows.items():
        for key in (KEY, "scale_invariance/lin.weight", "angular_update/lin.weight"):
            assert row[key] == pytest.approx(trainer_rows[step][key], rel=1e-5, abs=1e-7), (step, key)
    (read,) = read_report(tmp_path / "report")
    assert read["layer"] == rows[0].layer == "lin.weight"
    assert float(read["timescales"]) == pytest.approx(steps / TAU, rel=1e-3)
    assert (tmp_path / "report" / "decay_report.png").stat().st_size > 0


class WithZero(Noise):
    """``Noise`` plus a weight at zero whose gradient is zero (it enters the loss times 0), decayed by AdamW."""

    def __init__(self) -> None:
        super().__init__(lambda p: torch.optim.AdamW(p, lr=LR_ADAM, weight_decay=0.1))
        self.dead = nn.Parameter(torch.zeros(8))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return super().training_step(batch, batch_idx) + 0.0 * self.dead.sum()


def test_zero_tensors_get_defined_values_not_inf_or_nan(tmp_path: Path) -> None:
    rows, *_ = fit(tmp_path, WithZero(), 5, [])
    for row in rows.values():
        assert row["scale_invariance/dead"] == 0.0 and row["angular_update/dead"] == 0.0
        assert row["angular_update_equilibrium/dead"] == pytest.approx(adamw_angle(LR_ADAM, 0.1), rel=1e-12)
        assert all(math.isfinite(v) for v in row.values())


def test_module_granularity_predicts_per_module(tmp_path: Path) -> None:
    """``granularity="module"``: the module's tensors share a param group, so the module gets its prediction."""
    make, _, by_hand = CASES["adamw"]
    rows, *_ = fit(tmp_path, Noise(make), 20, [], granularity="module")
    for row in rows.values():
        assert row["angular_update_equilibrium/lin"] == pytest.approx(by_hand, rel=1e-12)
        assert row["scale_invariance/lin"] < eq.SCALE_INVARIANT_MAX_SCORE
        assert "angular_update_equilibrium/lin.weight" not in row
