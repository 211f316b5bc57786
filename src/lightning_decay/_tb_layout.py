"""The TensorBoard *Custom Scalars* layout of ``WeightNormMonitor``: its metrics grouped as a person reads them.

TensorBoard's Scalars tab shows every tag of a prefix in one flat section, sorted as strings: a ViT-tiny
gives some 300 charts with ``blocks.10`` before ``blocks.2``. The layout built here gives one category per
metric family (``weight_norm``, ``grad_norm``, ...) and in it one multi-line chart per block or depth of
the model -- the totals first, then each group of names up to their first numbered component
(``blocks.3``, ``encoder.layers.0``; otherwise the module that owns the tensor), in model order. A tied
tensor, logged once under its first name, is drawn in the charts of each of its names (a GPT's
``lm_head`` chart shows ``wte.weight``).

Framework-free: the monitor passes the names; ``SummaryWriter.add_custom_scalars`` takes the result.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["custom_scalars_layout", "depth_key", "natural_key"]

Layout = dict[str, dict[str, list[object]]]
"""``{category: {chart title: ["Multiline", [tag regex, ...]]}}``, as ``add_custom_scalars`` takes it."""


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders numbers by value: ``blocks.2`` before ``blocks.10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part)


def depth_key(name: str, is_param: bool = True) -> str:
    """The chart a name belongs to: the name up to its first numbered component, else its owner module.

    ``blocks.3.attn.qkv.weight`` -> ``blocks.3``; ``encoder.layers.0.norm1`` -> ``encoder.layers.0``;
    ``head.weight`` -> ``head``; a root parameter (``cls_token``) or module stands for itself.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    if is_param and len(parts) > 1:
        return ".".join(parts[:-1])
    return name


def custom_scalars_layout(
    families: Sequence[str],
    rows: Iterable[tuple[str, str, int]],
    totals: dict[str, Sequence[str]],
    separator: str = "/",
) -> Layout:
    """Build the layout.

    Args:
        families: Metric families in display order (``"weight_norm"``, ``"grad_norm"``, ...).
        rows: ``(bucket, chart, position)``: the metric ``{family}{separator}{bucket}`` is drawn in ``chart``;
            ``position`` is where that name comes in the model (a tied tensor gives one row per name).
            Charts are ordered by their first position, lines in a chart by position.
        totals: Family -> total names (``"total"``, ``"decay_total"``...) drawn first, in a ``totals`` chart.
        separator: Between the family and the bucket name, as in the logged tags.

    Returns:
        The layout, one category per family.
    """
    charts: dict[str, list[tuple[int, str]]] = {}
    for bucket, chart, position in rows:
        lines = charts.setdefault(chart, [])
        if all(bucket != b for _, b in lines):
            lines.append((position, bucket))
    ordered = sorted(charts.items(), key=lambda item: (min(p for p, _ in item[1]), natural_key(item[0])))
    layout: Layout = {}
    for family in families:
        category: dict[str, list[object]] = {}
        if totals.get(family):
            category["totals"] = ["Multiline", [_exact(f"{family}{separator}{t}") for t in totals[family]]]
        for chart, lines in ordered:
            tags = [_exact(f"{family}{separator}{bucket}") for _, bucket in sorted(lines)]
            category[chart if chart != "totals" else "totals (module)"] = ["Multiline", tags]
        layout[family] = category
    return layout


def _exact(tag: str) -> str:
    """A regex matching ``tag`` only (TensorBoard reads a multi-line chart's tags as regular expressions)."""
    return f"^{re.escape(tag)}$"
