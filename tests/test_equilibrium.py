"""Rotational equilibrium: predictions against simulated scale-invariant weights, measures, verdicts, report.

The simulation: ``nn.Linear(64, 64, bias=False)`` followed by ``LayerNorm(elementwise_affine=False)``,
regressed on fresh noise each step (the expected gradient is 0: a pure random walk), with the real torch
optimizers and ``WeightDecay(...).attach``. Timescale ``tau = 200`` steps, 4 timescales per run; the angle
between ``w`` before and after each step is measured with the monitor's ``angular_updates`` and averaged
over the last tenth of the steps, as the report does. Paper formulas are applied by hand in the tests.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_decay import WeightDecay, schedules
from lightning_decay import equilibrium as eq
from lightning_decay.decay_report import COLUMNS, LayerSeries, build_rows, render_markdown, render_text
from lightning_decay.norms import angular_updates

TAU = 200  # steps
STEPS = 4 * TAU


@dataclass
class Run:
    """Per step: measured angle (``nan`` where not measured), prediction, decay rate; scores every 10 steps."""

    angles: list[float] = field(default_factory=list)
    predictions: list[eq.Prediction] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def simulate(
    make_optimizer: Callable[[Any], torch.optim.Optimizer],
    steps: int = STEPS,
    *,
    seed: int = 0,
    norm: bool = True,
    decay: Any = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    measure: Callable[[int], bool] | None = None,
) -> Run:
    """Train the weight on noise; ``decay``: a ``WeightDecay`` coefficient attached to the optimizer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: on a loaded machine, spinning intra-op threads cost 25x
    try:
        return _simulate(make_optimizer, steps, seed, norm, decay, scheduler, measure)
    finally:
        torch.set_num_threads(threads)


def _simulate(
    make_optimizer: Callable[[Any], torch.optim.Optimizer],
    steps: int,
    seed: int,
    norm: bool,
    decay: Any,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None,
    measure: Callable[[int], bool] | None,
) -> Run:
    torch.manual_seed(seed)
    linear = nn.Linear(64, 64, bias=False)
    model = nn.Sequential(linear, nn.LayerNorm(64, elementwise_affine=False) if norm else nn.Identity())
    optimizer = make_optimizer(linear.parameters())
    callback = None if decay is None else WeightDecay(decay)
    if callback is not None:
        callback.attach(model, optimizer)
    lr_scheduler = None if scheduler is None else scheduler(optimizer)
    measure = measure or (lambda step: step >= steps - steps // 10)
    data = torch.Generator().manual_seed(seed + 1)
    run, angles, scores = Run(), [], []
    w = linear.weight
    for step in range(steps):
        x, y = torch.randn(16, 64, generator=data), torch.randn(16, 64, generator=data)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if step % 10 == 0:
            scores.append(eq.grad_weight_cosines([w.grad], [w.detach()])[0] * math.sqrt(w.numel()))
        before = w.detach().clone()
        group = optimizer.param_groups[0]  # read before the scheduler moves it: the lr of this step
        decoupled = 0.0
        optimizer.step()
        if callback is not None:
            decoupled = next(iter(callback.applied_weight_decay().values()))
        run.predictions.append(eq.predict_from_param_group(group, optimizer, decoupled_weight_decay=decoupled))
        if measure(step):
            after = w.detach()
            angles.append(angular_updates(before.square().sum(), after.square().sum(), (after - before).square().sum()))
        else:
            angles.append(torch.tensor(math.nan))
        if lr_scheduler is not None:
            lr_scheduler.step()
    run.angles, run.scores = torch.stack(angles).tolist(), torch.stack(scores).tolist()
    return run


def window_mean(values: list[float], end: int) -> float:
    """Mean over the tenth of the steps before ``end`` (the report's "last tenth")."""
    return eq.tail_mean(values[:end])


LR_SGD, LR_SGDM, LR_ADAM = 0.25, 0.025, 0.01
CASES = {
    # name: (optimizer, WeightDecay coefficient, the paper's formula by hand)
    "sgd": (lambda p: torch.optim.SGD(p, lr=LR_SGD, weight_decay=1 / (TAU * LR_SGD)), None, math.sqrt(2 / TAU)),
    "sgd_momentum": (
        lambda p: torch.optim.SGD(p, lr=LR_SGDM, momentum=0.9, weight_decay=0.1 / (TAU * LR_SGDM)),
        None,
        math.sqrt(2 * LR_SGDM * 0.1 / (TAU * LR_SGDM) / 1.9),
    ),
    "sgd_dampening": (  # derived: the effective lr is lr * (1 - dampening)
        lambda p: torch.optim.SGD(p, lr=2 * LR_SGDM, momentum=0.9, dampening=0.5, weight_decay=0.1 / (TAU * LR_SGDM)),
        None,
        math.sqrt(2 * LR_SGDM * 0.1 / (TAU * LR_SGDM) / 1.9),
    ),
    "sgd_nesterov": (  # derived: sqrt(2 lr wd (1 + 2m - 2m^3) / (1 + m))
        lambda p: torch.optim.SGD(p, lr=LR_SGDM, momentum=0.9, nesterov=True, weight_decay=0.1 / (TAU * LR_SGDM)),
        None,
        math.sqrt(2 * 0.1 / TAU * (1 + 1.8 - 2 * 0.729) / 1.9),
    ),
    "adamw": (
        lambda p: torch.optim.AdamW(p, lr=LR_ADAM, weight_decay=1 / (TAU * LR_ADAM)),
        None,
        math.sqrt(2 / TAU * 0.1 / 1.9),
    ),
    "adam_weight_decay": (
        lambda p: torch.optim.Adam(p, lr=LR_ADAM),
        1 / (TAU * LR_ADAM),
        math.sqrt(2 / TAU * 0.1 / 1.9),
    ),
    "rmsprop_weight_decay": (  # derived: sqrt(2 lr wd) without momentum (the gradient scale cancels)
        lambda p: torch.optim.RMSprop(p, lr=LR_ADAM),
        1 / (TAU * LR_ADAM),
        math.sqrt(2 / TAU),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_measured_angle_is_within_10_percent_of_the_prediction(case: str) -> None:
    make, decay, by_hand = CASES[case]
    run = simulate(make, decay=decay)
    predicted = run.predictions[-1].angle
    assert predicted == pytest.approx(by_hand, rel=1e-12)
    covered = eq.timescales_covered([p.decay_rate for p in run.predictions])
    assert covered == pytest.approx(STEPS / TAU, rel=1e-9) and covered >= 3
    assert eq.tail_mean(run.angles) == pytest.approx(predicted, rel=0.10)
    assert max(run.scores) < eq.SCALE_INVARIANT_MAX_SCORE / 10  # grad ⟂ w behind LayerNorm


def test_prediction_tracks_a_step_lr_schedule() -> None:
    """AdamW, lr x4 after 4 tau: the angle re-equilibrates at twice the angle (tau/4 steps then)."""
    first, total = STEPS, STEPS + TAU  # then 4 timescales of TAU / 4 steps
    run = simulate(
        CASES["adamw"][0],
        total,
        scheduler=lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[first], gamma=4.0),
        measure=lambda step: first - first // 10 <= step < first or step >= total - total // 10,
    )
    before, after = run.predictions[first - 1].angle, run.predictions[-1].angle
    assert after == pytest.approx(2 * before, rel=1e-9)
    assert window_mean(run.angles, first) == pytest.approx(before, rel=0.10)
    assert window_mean(run.angles, total) == pytest.approx(after, rel=0.10)
    assert window_mean(run.angles, total) > 1.5 * before  # the angle moved: the check above can fail
    rates = [p.decay_rate for p in run.predictions]
    assert eq.timescales_covered(rates) == pytest.approx(8.0, rel=1e-9)  # sum of lr_t * wd_t by hand: 4 + 4


def test_prediction_tracks_a_weight_decay_schedule() -> None:
    """Adam + WeightDecay(Linear ramp wd -> 4 wd): the prediction follows the applied coefficient."""
    wd = 1 / (TAU * LR_ADAM)
    steps = 3 * TAU
    run = simulate(CASES["adam_weight_decay"][0], steps, decay=schedules.Linear(wd, 4 * wd, steps=2 * TAU))
    first, last = run.predictions[0].angle, run.predictions[-1].angle
    assert first == pytest.approx(CASES["adamw"][2], rel=1e-12)
    assert last == pytest.approx(2 * first, rel=1e-9)  # the prediction tracked the schedule
    covered = eq.timescales_covered([p.decay_rate for p in run.predictions])
    by_hand = sum(LR_ADAM * schedules.Linear(wd, 4 * wd, steps=2 * TAU)(t) for t in range(steps))
    assert covered == pytest.approx(by_hand, rel=1e-9)
    assert eq.tail_mean(run.angles) == pytest.approx(last, rel=0.10)


def test_weight_without_a_norm_layer_is_not_scale_invariant() -> None:
    run = simulate(CASES["sgd"][0], 200, norm=False)
    score = sum(run.scores) / len(run.scores)
    assert score > eq.SCALE_INVARIANT_MAX_SCORE
    assert eq.verdict(3.0, 0.1, 0.1, score).startswith("not scale invariant")


def test_cosines_match_float64_and_are_finite_for_zero_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, 5, generator=g), torch.zeros(3), torch.randn(4, generator=g), torch.zeros(2)]
    weights = [torch.randn(8, 5, generator=g), torch.randn(3, generator=g), torch.zeros(4), torch.zeros(2)]
    grads += [torch.randn(6, generator=g).bfloat16(), torch.empty(0)]
    weights += [torch.randn(6, generator=g).bfloat16(), torch.empty(0)]
    got = torch.stack(eq.grad_weight_cosines(grads, weights))
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got[[1, 2, 3, 5]], torch.zeros(4))
    for i, rel in ((0, 1e-5), (4, 1e-2)):  # bf16: the products are rounded to bf16 (8 bits) before the sum
        ref = nn.functional.cosine_similarity(grads[i].double().flatten(), weights[i].double().flatten(), dim=0)
        assert float(got[i]) == pytest.approx(abs(float(ref)), rel=rel)
    # An orthogonal pair gives a cosine of float rounding, far below the threshold
    w = torch.randn(4096, generator=g, dtype=torch.float64)
    r = torch.randn(4096, generator=g, dtype=torch.float64)
    orthogonal = (r - (r @ w) / (w @ w) * w).float()
    score = eq.scale_invariance_scores(
        torch.stack(eq.grad_weight_cosines([orthogonal], [w.float()])), torch.tensor([4096])
    )
    assert float(score[0]) < eq.SCALE_INVARIANT_MAX_SCORE / 100


def test_predictions_without_a_closed_form_say_why() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    for opt in (torch.optim.Adam([p], weight_decay=0.1), torch.optim.RMSprop([p], weight_decay=0.1)):
        prediction = eq.predict_from_param_group(opt.param_groups[0], opt)
        assert prediction.angle is None and "no closed form" in prediction.reason
    adam = torch.optim.Adam([p], lr=1e-3)
    assert eq.predict_from_param_group(adam.param_groups[0], adam, coupled_l2=0.1).angle is None
    decoupled = torch.optim.Adam([p], lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)
    adamw = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.1)
    assert eq.predict_from_param_group(decoupled.param_groups[0], decoupled) == eq.predict_from_param_group(
        adamw.param_groups[0], adamw
    )

    class MyAdamW(torch.optim.AdamW):
        pass

    mine = MyAdamW([p], lr=1e-3, weight_decay=0.1)
    assert eq.predict_from_param_group(mine.param_groups[0], mine) == eq.predict_from_param_group(
        adamw.param_groups[0], "AdamW"
    )
    other = torch.optim.Adagrad([p], lr=1e-2)
    assert "Adagrad" in eq.predict_from_param_group(other.param_groups[0], other).reason
    # WeightPenalty(l2) on SGD is SGD's own weight_decay
    sgd, plain = (
        torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01),
        torch.optim.SGD([p], lr=0.1, momentum=0.9),
    )
    assert eq.predict_from_param_group(plain.param_groups[0], plain, coupled_l2=0.01) == eq.predict_from_param_group(
        sgd.param_groups[0], sgd
    )
    with pytest.raises(ValueError, match="Nesterov"):
        eq.filter_factors(0.9, 0.5, nesterov=True)


@pytest.mark.parametrize("mode", ["lr", "lr_ratio", "constant"])
def test_lr_mode_coefficient_matches_weight_decay_shrink(mode: str) -> None:
    from lightning_decay.decay import decay_shrink

    lr, lr0, wd = 0.02, 0.1, 0.05
    assert lr * eq.lr_mode_coefficient(mode, wd, lr, lr0) == pytest.approx(decay_shrink(mode, lr, lr0, wd, 0, "g"))


def test_timescales() -> None:
    assert eq.timescale_steps(1e-3 * 0.1) == pytest.approx(1e4) and eq.timescale_steps(0.0) == math.inf
    assert eq.timescale_epochs(1e4, 500) == pytest.approx(20.0)
    # Logged every 10 steps of a piecewise-constant schedule: the integral equals the per-step sum
    per_step = [1e-3 * (1 if t < 50 else 0.25) for t in range(95)]
    logged = list(range(0, 95, 10))
    assert eq.timescales_covered([per_step[s] for s in logged], logged, total_steps=95) == pytest.approx(sum(per_step))


def test_verdicts_at_the_thresholds() -> None:
    tol, weak, settled = eq.AT_EQUILIBRIUM_TOLERANCE, eq.TOO_WEAK_TIMESCALES, eq.SETTLED_TIMESCALES
    assert eq.verdict(5.0, 1.0, 1.0, 1e-4).startswith("at equilibrium")
    assert eq.verdict(5.0, 1.0 + tol * 0.99, 1.0, None).startswith("at equilibrium")
    assert eq.verdict(settled * 0.9, 1.0 + tol * 1.5, 1.0, 0.0) == "still approaching (covered 2.7 tau)"
    assert eq.verdict(weak * 0.9, 3.0, 1.0, 0.0).startswith("decay too weak to matter in this run")
    assert eq.verdict(settled * 1.1, 0.5, 1.0, 0.0).startswith("not at equilibrium after 3.3 tau")
    assert eq.verdict(5.0, 1.0, 1.0, eq.SCALE_INVARIANT_MAX_SCORE * 1.1).startswith("not scale invariant")
    assert eq.verdict(5.0, 1.0, None, 0.0, "coupled L2").endswith("coupled L2")


def _series(seed: int, predicted: float | None) -> LayerSeries:
    g = torch.Generator().manual_seed(seed)
    steps = list(range(0, 1000, 10))
    angle = (0.05 + 0.001 * torch.randn(len(steps), generator=g)).tolist()
    return LayerSeries(
        steps=steps, angle=angle, predicted=[predicted] * len(steps), lr=[1e-2] * len(steps),
        weight_decay=[0.5] * len(steps), decay_rate=[5e-3] * len(steps), score=[1e-3] * len(steps),
        norm=torch.linspace(8, 3, len(steps)).tolist(), reason="" if predicted else "coupled L2",
    )  # fmt: skip


def test_report_markdown_and_text_read_back() -> None:
    series = {"blocks.0.fc|a": _series(0, 0.05), "head": _series(1, None)}
    rows = build_rows(series, total_steps=1000, steps_per_epoch=100)
    lines = render_markdown(rows).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(COLUMNS) and len(lines) == 4
    cells = [c.strip() for c in lines[2].strip().removeprefix("|").removesuffix("|").split(" | ")]
    first = dict(zip(header, cells, strict=True))
    assert first["layer"] == "blocks.0.fc\\|a"
    assert float(first["tau (steps)"]) == pytest.approx(200) and float(first["tau (epochs)"]) == pytest.approx(2)
    assert float(first["timescales"]) == pytest.approx(5.0)
    by_hand = sum(series["blocks.0.fc|a"].angle[-10:]) / 10
    assert float(first["measured angle"]) == pytest.approx(by_hand, rel=1e-3)
    assert float(first["ratio"]) == pytest.approx(by_hand / 0.05, rel=1e-3)
    assert first["scale invariant"] == "yes" and first["verdict"].startswith("at equilibrium")
    second = [c.strip() for c in lines[3].strip().strip("|").split("|")]
    assert second[7] == "-" and second[-1] == "no equilibrium prediction: coupled L2"
    text = render_text(rows).splitlines()
    assert text[0].split()[0] == "layer" and len(text) == 4 and text[2].startswith("blocks.0.fc|a")


def test_report_picture_has_a_panel_per_layer_and_the_norms(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lightning_decay.decay_report import report_figure, write_report

    series = {f"layer{i}": _series(i, 0.05) for i in range(4)}
    assert len(report_figure(series).axes) == 5
    markdown, picture = write_report(build_rows(series), series, tmp_path / "logs")
    head = picture.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert width > height > 0  # 2 rows of 3 panels at 4 x 3 inches
    assert "decay_report.png" in markdown.read_text()


def test_report_module_imports_matplotlib_only_when_drawing() -> None:
    """The package imports without matplotlib: decay_report imports it inside ``report_figure`` only."""
    import ast

    import lightning_decay.decay_report as report

    tree = ast.parse(Path(report.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert names and not any(name.split(".")[0] == "matplotlib" for name in names)
    inside = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "matplotlib.figure"]
    assert len(inside) == 2  # the TYPE_CHECKING import and the one in report_figure
