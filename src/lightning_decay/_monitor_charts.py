"""Where ``WeightNormMonitor``'s metrics go besides scalars: TensorBoard's Custom Scalars charts, and which
loggers take its histograms.

`chart_rows` turns the plan and the monitor's options (granularity, blocks, metric flags) into the rows
``lightning_decay._tb_layout.custom_scalars_layout`` lays out; `ChartWriter` writes that layout once per
``SummaryWriter`` and warns once when ``log_histograms=True`` has no logger to take them. The monitor's
measurements are in ``lightning_decay._probes``; this module only says how they are shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_decay._compat import HISTOGRAM_LOGGERS, TENSORBOARD_LOGGERS, rank_zero_warn
from lightning_decay._plan_cache import plan_for
from lightning_decay._probes import bucket_name
from lightning_decay._tb_layout import Layout, custom_scalars_layout, depth_key
from lightning_decay.names import clean_names

__all__ = ["TOTALS", "ChartWriter", "custom_scalars"]

#: The totals of ``weight_norm``: every monitored tensor, the decayed ones, the others.
TOTALS = ("total", "decay_total", "no_decay_total")


def families(options: Any) -> list[str]:
    """The metric families the monitor logs, in the order its charts show them."""
    flags = (options.log_grad_norm, options.log_update_ratio, options.log_angular_update, options.log_sparsity)
    flags += (options.log_equilibrium, options.log_equilibrium)
    optional = ("grad_norm", "update_ratio", "angular_update", "sparsity")
    optional += ("angular_update_equilibrium", "scale_invariance")
    return ["weight_norm", *(f for f, on in zip(optional, flags, strict=True) if on)]


def chart_rows(options: Any, module: nn.Module) -> list[tuple[str, str, int, bool]]:
    """``(bucket, chart, position in the model, decayed)`` of every name of every monitored tensor."""
    plan = plan_for(options.rules, module, include_frozen=True)
    positions: dict[str, int] = {}
    names = clean_names(module)  # the plan's names: wrappers found in the module tree
    for i, (name, _) in enumerate(module.named_parameters(remove_duplicate=False)):
        positions.setdefault(names.get(name, name), i)
    rows = []
    for d in plan:
        bucket = bucket_name(options, d.name, d.aliases)
        if bucket is None:
            continue
        for name in (d.name, *d.aliases):  # a tied tensor is drawn in the chart of each of its names
            if options.blocks is not None:
                chart = "blocks"
            elif options.granularity == "module":
                chart = depth_key(name.rpartition(".")[0] or name, is_param=False)
            else:
                chart = depth_key(name)
            rows.append((bucket, chart, positions.get(name, len(positions)), d.decay))
    return rows


def custom_scalars(options: Any, module: nn.Module) -> Layout:
    """The Custom Scalars layout of the monitor ``options`` for ``module`` (``WeightNormMonitor.custom_scalars``)."""
    totals = {"weight_norm": list(TOTALS), "grad_norm": ["total"]}
    return custom_scalars_layout(families(options), chart_rows(options, module), totals, options.group_separator)


class ChartWriter:
    """What one monitor has written besides scalars: the SummaryWriters with its layout, the histogram warning."""

    def __init__(self) -> None:
        self.written: set[int] = set()  # id() of the SummaryWriters that have the layout
        self.warned_histograms = False

    def write_custom_scalars(self, options: Any, loggers: Sequence[Any], module: nn.Module) -> None:
        # Once per SummaryWriter (TensorBoard reads one layout per run). Only the rank-0 logger has a real
        # writer; the others' `experiment` ignores the call.
        writers = [lg.experiment for lg in loggers if isinstance(lg, TENSORBOARD_LOGGERS)]
        writers = [w for w in writers if id(w) not in self.written]
        if not writers:
            return
        layout = custom_scalars(options, module)
        for writer in writers:
            writer.add_custom_scalars(layout)
            self.written.add(id(writer))

    def check_histogram_loggers(self, options: Any, loggers: Sequence[Any]) -> None:
        """With ``log_histograms=True``, warn (once per monitor) when none of ``loggers`` takes histograms.

        Histograms go to TensorBoard (``add_histogram``) and Weights & Biases (``wandb.Histogram``) loggers;
        others (CSV, MLflow...) get the scalars only.
        """
        if not options.log_histograms or any(isinstance(lg, HISTOGRAM_LOGGERS) for lg in loggers):
            return
        if not self.warned_histograms:
            self.warned_histograms = True
            names = ", ".join(type(lg).__name__ for lg in loggers) or "none"
            rank_zero_warn(
                f"WeightNormMonitor(log_histograms=True) has no logger that takes histograms (loggers: {names}): "
                "no histogram will be logged. Add a TensorBoardLogger or a WandbLogger, or set log_histograms=False."
            )
