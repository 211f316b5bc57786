"""``WeightNormMonitor``'s TensorBoard Custom Scalars layout, read back from the event files of a real fit."""

from __future__ import annotations

import re
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

from lightning_decay import WeightNormMonitor
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


def test_layout_is_written_once_in_model_order_with_tied_aliases(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb")
    model = fit(tmp_path, WeightNormMonitor(log_grad_norm=True), [logger, CSVLogger(tmp_path, name="csv")])
    acc, layouts = read(logger)
    assert len(layouts) == 1  # three logging steps, one layout
    layout = charts(layouts[0])
    assert list(layout) == ["weight_norm", "grad_norm"]

    blocks = [f"gpt.h.{i}" for i in range(N_LAYER)]
    expected = ["totals", "gpt.wte", "gpt.wpe", *blocks, "gpt.ln_f", "gpt.lm_head"]
    assert list(layout["weight_norm"]) == expected == list(layout["grad_norm"])

    scalars = acc.Tags()["scalars"]
    for family in ("weight_norm", "grad_norm"):
        logged = [t for t in scalars if t.startswith(f"{family}/") and not t.endswith("total")]
        # Every logged per-tensor tag is in exactly one block chart, except the tied tensor, also in lm_head's.
        for tag in logged:
            homes = [title for title, regexes in layout[family].items() if matching(regexes, [tag])]
            tied = tag == f"{family}/gpt.wte.weight"
            assert homes == (["gpt.wte", "gpt.lm_head"] if tied else [depth_key(tag.split("/", 1)[1])]), tag
        # And each chart draws what its block logged, in model order.
        for i in (2, 10):
            names = [n for n, _ in model.named_parameters() if n.startswith(f"gpt.h.{i}.")]
            assert lines(layout[family][f"gpt.h.{i}"], logged) == [f"{family}/{n}" for n in names]
    totals = layout["weight_norm"]["totals"]
    assert lines(totals, scalars) == [f"weight_norm/{t}" for t in ("total", "decay_total", "no_decay_total")]
    assert lines(layout["grad_norm"]["totals"], scalars) == ["grad_norm/total"]


def test_module_granularity_and_blocks_charts(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="modules")
    fit(tmp_path, WeightNormMonitor(granularity="module"), [logger], steps=1)
    acc, [layout_proto] = read(logger)
    layout = charts(layout_proto)["weight_norm"]
    expected = ["totals", "gpt.wte", "gpt.wpe", *(f"gpt.h.{i}" for i in range(N_LAYER)), "gpt.ln_f", "gpt.lm_head"]
    assert list(layout) == expected
    block = GPTModule().gpt.h[10]
    owners = [n for n, m in block.named_modules() if any(True for _ in m.parameters(recurse=False))]
    want = [f"weight_norm/gpt.h.10.{n}" for n in owners]  # ln_1, attn.c_attn, ..., mlp.c_proj
    assert lines(layout["gpt.h.10"], acc.Tags()["scalars"]) == want

    logger = TensorBoardLogger(tmp_path, name="blocks")
    blocks = {"late": r"\.h\.(9|10)\.", "early": r"\.h\.[0-2]\."}
    fit(tmp_path, WeightNormMonitor(blocks=blocks), [logger], steps=1)
    acc, [layout_proto] = read(logger)
    layout = charts(layout_proto)["weight_norm"]
    assert list(layout) == ["totals", "blocks"]
    # Model order: the early blocks come first in the model, whatever the order of the mapping.
    assert lines(layout["blocks"], acc.Tags()["scalars"]) == ["weight_norm/early", "weight_norm/late"]


@pytest.mark.parametrize(
    ("names", "ordered"),
    [
        (["blocks.10", "blocks.2", "blocks.1"], ["blocks.1", "blocks.2", "blocks.10"]),
        (["a10b", "a9c"], ["a9c", "a10b"]),
    ],
)
def test_natural_key(names: list[str], ordered: list[str]) -> None:
    assert sorted(names, key=natural_key) == ordered
