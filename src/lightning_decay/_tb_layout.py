"""The TensorBoard *Custom Scalars* layout of ``WeightNormMonitor``: its metrics grouped as a person reads them.

TensorBoard's Scalars tab shows every tag of a prefix in one flat section, sorted as strings: a ViT-tiny
gives some 300 charts with ``blocks.10`` before ``blocks.2``. The layout built here gives one category per
metric family (``weight_norm``, ``grad_norm``, ...) and in it, first, one chart per total (``total``,
``decay_total``, ``no_decay_total``: their scales differ by an order of magnitude), then the charts of each
block or depth of the model -- the names up to their first numbered component (``blocks.3``,
``encoder.layers.0``; otherwise the module that owns the tensor), in model order -- split by the decay
decision: ``blocks.3 · decayed`` holds the decayed tensors of ``blocks.3`` and ``blocks.3 · not decayed`` the
others, so a bias (norm 0.1) never shares a y-axis with its weight matrix (norm 5) and each chart says
what weight decay acts on. A bucket that merges both kinds (``granularity="module"``, ``blocks=``) is
drawn in a chart of its own, ``· decayed + not decayed``. A tied tensor, logged once under its first name,
is drawn in the charts of each of its names (a GPT's ``lm_head`` chart shows ``wte.weight``).

Framework-free, a function of the names and the plan's decisions: the monitor passes them in;
``SummaryWriter.add_custom_scalars`` takes the result.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["custom_scalars_layout", "decay_label", "depth_key", "natural_key"]

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


DECAYED, NOT_DECAYED, MIXED = "decayed", "not decayed", "decayed + not decayed"
SEP = " · "  # between a chart's block and what it holds: "net.0 · decayed"
TOTAL_CHARTS = {"total": "all", "decay_total": DECAYED, "no_decay_total": NOT_DECAYED}
"""The chart title of each total (``totals · decayed``); a total not listed is drawn under its own name."""


def decay_label(decisions: Iterable[bool]) -> str:
    """What a bucket holds: ``"decayed"``, ``"not decayed"``, or both (a module with a weight and a bias)."""
    kinds = set(decisions)
    if kinds == {True}:
        return DECAYED
    return NOT_DECAYED if kinds == {False} else MIXED


def custom_scalars_layout(
    families: Sequence[str],
    rows: Iterable[tuple[str, str, int, bool]],
    totals: dict[str, Sequence[str]],
    separator: str = "/",
) -> Layout:
    """Build the layout.

    Args:
        families: Metric families in display order (``"weight_norm"``, ``"grad_norm"``, ...).
        rows: ``(bucket, chart, position, decayed)`` per parameter name: the metric ``{family}{separator}{bucket}``
            is drawn in the chart ``f"{chart} · {label}"``, where the label says whether the bucket's
            parameters are decayed (`decay_label`); ``position`` is where that name comes in the model (a
            tied tensor gives one row per name). Charts are ordered by their first position, the decayed
            before the others, lines in a chart by position.
        totals: Family -> total names (``"total"``, ``"decay_total"``...), one chart each, drawn first.
        separator: Between the family and the bucket name, as in the logged tags.

    Returns:
        The layout, one category per family.
    """
    rows = list(rows)
    decided: dict[str, list[bool]] = {}
    for bucket, _, _, decayed in rows:
        decided.setdefault(bucket, []).append(decayed)
    labels = {bucket: decay_label(flags) for bucket, flags in decided.items()}
    order = {DECAYED: 0, NOT_DECAYED: 1, MIXED: 2}
    charts: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for bucket, chart, position, _ in rows:
        lines = charts.setdefault((chart, labels[bucket]), [])
        if all(bucket != b for _, b in lines):
            lines.append((position, bucket))
    first: dict[str, int] = {}  # a block's charts stay together, at the block's first position
    for (chart, _), lines in charts.items():
        first[chart] = min(first.get(chart, lines[0][0]), *(p for p, _ in lines))
    ordered = sorted(charts.items(), key=lambda item: (first[item[0][0]], natural_key(item[0][0]), order[item[0][1]]))
    layout: Layout = {}
    for family in families:
        category: dict[str, list[object]] = {}
        for total in totals.get(family, ()):
            title = f"totals{SEP}{TOTAL_CHARTS[total]}" if total in TOTAL_CHARTS else total
            category[title] = ["Multiline", [_exact(f"{family}{separator}{total}")]]
        for (chart, label), lines in ordered:
            tags = [_exact(f"{family}{separator}{bucket}") for _, bucket in sorted(lines)]
            name = chart if chart != "totals" else "totals (module)"
            category[f"{name}{SEP}{label}"] = ["Multiline", tags]
        layout[family] = category
    return layout


def _exact(tag: str) -> str:
    """A regex matching ``tag`` only (TensorBoard reads a multi-line chart's tags as regular expressions)."""
    return f"^{re.escape(tag)}$"
