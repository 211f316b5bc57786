"""The decay report: one row per decayed layer, as markdown, plain text and a picture (framework-free).

Built from the series a monitor logged (``LayerSeries``: per logging step the angle, the predicted
equilibrium angle, lr, wd, decay rate, scale-invariance score, weight norm), with the functions of
``lightning_decay.equilibrium``. matplotlib is imported only by ``report_figure`` (the
``examples`` and ``test`` extras have it); the package imports without it.

Wiring (left to the monitor): keep a ``LayerSeries`` per monitored decayed name, append on each logging
step the host values it logs anyway (``angular_update/{name}``, ``weight_norm/{name}``, and the
equilibrium probe's predicted angle, decay rate and score), and at the end of fit on rank zero call
``build_rows`` with the run's total optimizer steps and steps per epoch, print ``render_text``,
and ``write_report`` into the logger's ``log_dir`` (else the Trainer's ``default_root_dir``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_decay.equilibrium import (
    SCALE_INVARIANT_MAX_SCORE,
    tail_mean,
    timescale_epochs,
    timescale_steps,
    timescales_covered,
    verdict,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "COLUMNS",
    "LayerSeries",
    "ReportRow",
    "build_row",
    "build_rows",
    "render_markdown",
    "render_text",
    "report_figure",
    "write_report",
]

#: The report's columns, in order (markdown header and plain-text header).
COLUMNS = (
    "layer",
    "lr",
    "wd",
    "tau (steps)",
    "tau (epochs)",
    "timescales",
    "measured angle",
    "predicted angle",
    "ratio",
    "scale invariant",
    "verdict",
)


@dataclass
class LayerSeries:
    """What a monitor logged for one layer, one entry per logging step (host floats).

    Attributes:
        steps: The optimizer step (0-based) of each logging step.
        angle: The measured angular update (radians).
        predicted: The predicted equilibrium angle, ``None`` where there is none.
        lr: The param group's learning rate.
        weight_decay: The decay coefficient that applies to the layer.
        decay_rate: ``D``, the fraction the decay shrinks the weights per step.
        score: The scale-invariance score ``|cos(grad, w)| * sqrt(numel)``.
        norm: The weight norm.
        reason: Why there is no prediction (empty when there is one).
    """

    steps: list[int] = field(default_factory=list)
    angle: list[float] = field(default_factory=list)
    predicted: list[float | None] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    weight_decay: list[float] = field(default_factory=list)
    decay_rate: list[float] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    norm: list[float] = field(default_factory=list)
    reason: str = ""


@dataclass(frozen=True)
class ReportRow:
    """One layer of the report (values at the end of the run; angles over the last tenth of the logged steps)."""

    layer: str
    lr: float
    weight_decay: float
    tau_steps: float
    tau_epochs: float | None
    timescales: float
    measured: float
    predicted: float | None
    ratio: float | None
    scale_invariant: bool | None
    verdict: str


def build_row(
    layer: str, series: LayerSeries, total_steps: int | None = None, steps_per_epoch: int | None = None
) -> ReportRow:
    """The report row of one layer.

    ``tau`` is that of the last logging step's decay rate; the timescales covered integrate the decay rate
    over the run (each logged value held until the next logging step, the last up to ``total_steps``).
    Measured and predicted angles are means over the last tenth of the logged steps (where predicted).

    Raises:
        ValueError: If ``series`` is empty or its lists have different lengths.
    """
    n = len(series.steps)
    lists = (series.angle, series.predicted, series.lr, series.weight_decay, series.decay_rate)
    if n == 0 or any(len(values) != n for values in lists):
        raise ValueError(f"the series of {layer!r} is empty or its lists differ in length")
    tau = timescale_steps(series.decay_rate[-1])
    covered = timescales_covered(series.decay_rate, series.steps, total_steps)
    count = max(1, math.ceil(n * 0.1))
    measured = tail_mean(series.angle[-count:], 1.0)
    known = [p for p in series.predicted[-count:] if p is not None]
    predicted = tail_mean(known, 1.0) if known else None
    score = tail_mean(series.score, 1.0) if series.score else None
    ratio = measured / predicted if predicted and math.isfinite(measured) else None
    return ReportRow(
        layer=layer,
        lr=series.lr[-1],
        weight_decay=series.weight_decay[-1],
        tau_steps=tau,
        tau_epochs=None if steps_per_epoch is None else timescale_epochs(tau, steps_per_epoch),
        timescales=covered,
        measured=measured,
        predicted=predicted,
        ratio=ratio,
        scale_invariant=None if score is None else score <= SCALE_INVARIANT_MAX_SCORE,
        verdict=verdict(covered, measured, predicted, score, series.reason),
    )


def build_rows(
    series: Mapping[str, LayerSeries], total_steps: int | None = None, steps_per_epoch: int | None = None
) -> list[ReportRow]:
    """One ``build_row`` per layer, in the mapping's order."""
    return [build_row(name, s, total_steps, steps_per_epoch) for name, s in series.items()]


def _cells(row: ReportRow) -> list[str]:
    def number(value: float | None) -> str:
        return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"

    invariant = "-" if row.scale_invariant is None else ("yes" if row.scale_invariant else "no")
    values = (row.lr, row.weight_decay, row.tau_steps, row.tau_epochs, row.timescales)
    angles = (row.measured, row.predicted, row.ratio)
    return [row.layer, *map(number, values), *map(number, angles), invariant, row.verdict]


def render_markdown(rows: Sequence[ReportRow]) -> str:
    """The report as a markdown table (``|`` in a layer name is escaped)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in _cells(row)) + " |")
    return "\n".join(lines) + "\n"


def render_text(rows: Sequence[ReportRow]) -> str:
    """The report as a plain-text table with aligned columns, for printing."""
    table = [list(COLUMNS), *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines) + "\n"


def report_figure(series: Mapping[str, LayerSeries], columns: int = 3) -> Figure:
    """Small multiples: measured against predicted angle per layer over the steps, then the weight norms.

    One panel per layer plus one panel of all the weight norms. Built on ``matplotlib.figure.Figure``
    (no pyplot, so no global state or backend is touched).
    """
    from matplotlib.figure import Figure

    panels = len(series) + 1
    ncols = max(1, min(columns, panels))
    nrows = math.ceil(panels / ncols)
    figure = Figure(figsize=(4.0 * ncols, 3.0 * nrows), layout="constrained")
    axes = [figure.add_subplot(nrows, ncols, i + 1) for i in range(panels)]
    for ax, (name, s) in zip(axes, series.items(), strict=False):
        ax.plot(s.steps, s.angle, lw=0.8, label="measured")
        predicted = [math.nan if p is None else p for p in s.predicted]
        ax.plot(s.steps, predicted, lw=1.2, ls="--", label="predicted")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("angle per step (rad)")
        ax.legend(fontsize=7)
    norms = axes[-1]
    for name, s in series.items():
        norms.plot(s.steps, s.norm, lw=0.8, label=name)
    norms.set_title("weight norms", fontsize=9)
    norms.set_xlabel("step")
    if series:
        norms.legend(fontsize=7)
    return figure


def write_report(
    rows: Sequence[ReportRow], series: Mapping[str, LayerSeries], directory: str | Path, dpi: int = 100
) -> tuple[Path, Path]:
    """Write ``decay_report.md`` and ``decay_report.png`` into ``directory`` (created); returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    markdown, picture = directory / "decay_report.md", directory / "decay_report.png"
    markdown.write_text("# Decay report\n\n" + render_markdown(rows) + "\n![decay report](decay_report.png)\n")
    figure: Any = report_figure(series)
    figure.savefig(picture, dpi=dpi)
    return markdown, picture
