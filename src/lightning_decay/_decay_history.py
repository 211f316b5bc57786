"""What ``WeightNormMonitor(log_equilibrium=True)`` keeps for the decay report, and the report at the end.

Per decayed monitored name, the host values a logging step has anyway (the step, the measured and predicted
angles, lr, decay, decay rate, scale-invariance score, weight norm), appended to a
``lightning_decay.decay_report.LayerSeries``: a few floats per name and logging step, no tensor. `write` turns
them into the report (``decay_report.build_rows``), prints it, writes ``decay_report.md`` and
``decay_report.png`` and hands the picture to TensorBoard writers. No Trainer here: the adapter says where and
with which step counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_decay.decay_report import LayerSeries, ReportRow, build_rows, render_text, report_figure, write_report

__all__ = ["DecayHistory"]


class DecayHistory:
    """The series of one run, by metric name (the monitor's bucket names), in order of first logging."""

    def __init__(self) -> None:
        self.series: dict[str, LayerSeries] = {}

    def clear(self) -> None:
        self.series = {}

    def record(self, name: str, step: int, values: dict[str, float], reason: str = "") -> None:
        """Append one logging step: ``values`` has ``angle``, ``predicted``, ``lr``, ``weight_decay``,
        ``decay_rate``, ``score`` and ``norm``."""
        s = self.series.get(name)
        if s is None:
            s = self.series[name] = LayerSeries(reason=reason)
        s.steps.append(step)
        s.angle.append(values["angle"])
        s.predicted.append(values["predicted"])
        s.lr.append(values["lr"])
        s.weight_decay.append(values["weight_decay"])
        s.decay_rate.append(values["decay_rate"])
        s.score.append(values["score"])
        s.norm.append(values["norm"])

    def rows(self, total_steps: int | None, steps_per_epoch: int | None) -> list[ReportRow]:
        return build_rows(self.series, total_steps, steps_per_epoch)

    def write(
        self,
        directory: str | Path,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        writers: Sequence[Any] = (),
        step: int = 0,
    ) -> list[ReportRow]:
        """Print the report, write ``decay_report.md`` / ``.png`` into ``directory``, add the picture to each
        TensorBoard ``SummaryWriter`` of ``writers`` (``add_figure``, tag ``decay_report``); the rows."""
        rows = self.rows(total_steps, steps_per_epoch)
        print("Decay report (WeightNormMonitor(log_equilibrium=True)):\n" + render_text(rows), flush=True)
        markdown, picture = write_report(rows, self.series, directory)
        print(f"Decay report written to {markdown} and {picture}", flush=True)
        for writer in writers:
            writer.add_figure("decay_report", report_figure(self.series), global_step=step, close=True)
            writer.flush()
        return rows
