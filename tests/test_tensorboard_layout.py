"""``WeightNormMonitor``'s TensorBoard Custom Scalars layout, read back from the event files of a real fit."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decay import DecayRules, WeightNormMonitor
from lightning_decay._tb_layout import depth_key, natural_key
from tests.models import make_gpt

CONFIG_TAG = "custom_scalars__config__"  # where TensorBoard's custom-scalars plugin keeps the layout
N_LAYER = 11  # h.0 ... h.10: string order would put h.10 before h.2


class GPTModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.gpt = make_gpt(n_layer=N_LAYER, tie=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (idx,) = batch
        logits = self.gpt(idx[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path: Path, monitor: WeightNormMonitor, loggers: list[Any], steps: int = 3) -> GPTModule:
    model = GPTModule()
    tokens = torch.randint(0, 32, (8 * steps, 8), generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(
        max_steps=steps,
        logger=loggers,
        callbacks=[monitor],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(TensorDataset(tokens), batch_size=8))
    return model


def read(logger: TensorBoardLogger) -> tuple[EventAccumulator, list[layout_pb2.Layout]]:
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    layouts = [layout_pb2.Layout.FromString(e.tensor_proto.string_val[0]) for e in acc.Tensors(CONFIG_TAG)]
    return acc, layouts


def charts(layout: layout_pb2.Layout) -> dict[str, dict[str, list[str]]]:
    return {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}


def matching(regexes: list[str], tags: list[str]) -> list[str]:
    """The tags some regex of a chart matches."""
    return [t for t in tags if any(re.search(r, t) for r in regexes)]


def lines(regexes: list[str], tags: list[str]) -> list[str]:
    """The lines of a chart in its order: for each regex, the tags it matches."""
    return [t for r in regexes for t in tags if re.search(r, t)]


def titles_in_model_order(model: nn.Module, chart_of: Callable[[str], str]) -> list[str]:
    """The chart titles the plan implies, by hand: per block in model order, its decayed tensors, then the rest."""
    plan = DecayRules().classify(model)
    blocks: dict[str, set[str]] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        d = plan[name]  # a tied alias resolves to its tensor's decision
        blocks.setdefault(chart_of(name), set()).add("decayed" if d.decay else "not decayed")
    return [f"{b} · {k}" for b, kinds in blocks.items() for k in ("decayed", "not decayed") if k in kinds]


def test_layout_is_written_once_in_model_order_with_tied_aliases(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb")
    model = fit(tmp_path, WeightNormMonitor(log_grad_norm=True), [logger, CSVLogger(tmp_path, name="csv")])
    acc, layouts = read(logger)
    assert len(layouts) == 1  # three logging steps, one layout
    layout = charts(layouts[0])
    assert list(layout) == ["weight_norm", "grad_norm"]

    totals = ["totals · all", "totals · decayed", "totals · not decayed"]
    expected = titles_in_model_order(model, depth_key)
    assert expected[:3] == ["gpt.wte · decayed", "gpt.wpe · decayed", "gpt.h.0 · decayed"]  # the GPT's order
    assert list(layout["weight_norm"]) == [*totals, *expected]
    assert list(layout["grad_norm"]) == ["totals · all", *expected]

    plan = DecayRules().classify(model)
    scalars = acc.Tags()["scalars"]
    for family in ("weight_norm", "grad_norm"):
        logged = [t for t in scalars if t.startswith(f"{family}/") and not t.endswith("total")]
        # Every logged per-tensor tag is in exactly one block chart, except the tied tensor, also in lm_head's,
        # and the chart is the one of its decay decision.
        for tag in logged:
            name = tag.split("/", 1)[1]
            kind = "decayed" if plan[name].decay else "not decayed"
            homes = [title for title, regexes in layout[family].items() if matching(regexes, [tag])]
            tied = name == "gpt.wte.weight"
            want = ["gpt.wte", "gpt.lm_head"] if tied else [depth_key(name)]
            assert homes == [f"{h} · {kind}" for h in want], tag
        # Decayed and not-decayed tensors never share a chart; each chart draws what its block logged, in order.
        for title, regexes in layout[family].items():
            if not title.startswith("totals"):
                kinds = {plan[t.split("/", 1)[1]].decay for t in matching(regexes, logged)}
                assert kinds == {title.endswith(" · decayed")}, title
        for i in (2, 10):
            for decayed, kind in ((True, "decayed"), (False, "not decayed")):
                names = [n for n, _ in model.named_parameters() if n.startswith(f"gpt.h.{i}.")]
                names = [n for n in names if plan[n].decay == decayed]
                assert names and lines(layout[family][f"gpt.h.{i} · {kind}"], logged) == [
                    f"{family}/{n}" for n in names
                ]
    # One total per chart: their scales differ (here and in the digits job, 33 against 1.7).
    for title, total in zip(totals, ("total", "decay_total", "no_decay_total"), strict=True):
        assert lines(layout["weight_norm"][title], scalars) == [f"weight_norm/{total}"]
    assert lines(layout["grad_norm"]["totals · all"], scalars) == ["grad_norm/total"]


def test_module_granularity_and_blocks_charts(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="modules")
    model = fit(tmp_path, WeightNormMonitor(granularity="module"), [logger], steps=1)
    acc, [layout_proto] = read(logger)
    layout = charts(layout_proto)["weight_norm"]
    plan = DecayRules().classify(model)
    block = model.gpt.h[10]
    kinds: dict[str, set[bool]] = {}  # module -> the decisions of its own parameters
    for n, m in block.named_modules():
        for pn, _ in m.named_parameters(recurse=False):
            kinds.setdefault(n, set()).add(plan[f"gpt.h.10.{n}.{pn}"].decay)
    label = {frozenset({True}): "decayed", frozenset({False}): "not decayed"}
    by_chart: dict[str, list[str]] = {}
    for n, k in kinds.items():  # a Linear (weight and bias) holds both kinds: a chart of its own
        by_chart.setdefault(f"gpt.h.10 · {label.get(frozenset(k), 'decayed + not decayed')}", []).append(n)
    assert {"gpt.h.10 · not decayed", "gpt.h.10 · decayed + not decayed"} <= set(by_chart)  # LayerNorm, Linear
    for title, owners in by_chart.items():
        assert lines(layout[title], acc.Tags()["scalars"]) == [f"weight_norm/gpt.h.10.{n}" for n in owners]
    assert list(layout)[:4] == ["totals · all", "totals · decayed", "totals · not decayed", "gpt.wte · decayed"]

    logger = TensorBoardLogger(tmp_path, name="blocks")
    blocks = {"late": r"\.h\.(9|10)\.", "early": r"\.h\.[0-2]\.", "norms": r"ln_\d"}
    fit(tmp_path, WeightNormMonitor(blocks=blocks), [logger], steps=1)
    acc, [layout_proto] = read(logger)
    layout = charts(layout_proto)["weight_norm"]
    assert list(layout) == [
        "totals · all",
        "totals · decayed",
        "totals · not decayed",
        "blocks · not decayed",  # "norms": gpt.h.3.ln_1 ... (blocks 3-8), LayerNorms only
        "blocks · decayed + not decayed",
    ]
    # Model order: the early blocks come first in the model, whatever the order of the mapping.
    scalars = acc.Tags()["scalars"]
    assert lines(layout["blocks · decayed + not decayed"], scalars) == ["weight_norm/early", "weight_norm/late"]
    assert lines(layout["blocks · not decayed"], scalars) == ["weight_norm/norms"]


@pytest.mark.parametrize(
    ("names", "ordered"),
    [
        (["blocks.10", "blocks.2", "blocks.1"], ["blocks.1", "blocks.2", "blocks.10"]),
        (["a10b", "a9c"], ["a9c", "a10b"]),
    ],
)
def test_natural_key(names: list[str], ordered: list[str]) -> None:
    assert sorted(names, key=natural_key) == ordered
