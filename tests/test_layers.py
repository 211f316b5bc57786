"""Layer-wise lr decay: the same groups as timm on ViT / ConvNeXt / Swin, a BERT stack from the module tree,
overrides, explanation, refused options, and the lr ratios through real schedulers, the mixin and the CLI."""

from __future__ import annotations

import csv
import fnmatch
import math
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_decay import DecayGroupsMixin, DecayLightningCLI, DecayRules, WeightDecay, decay_param_groups
from lightning_decay.layers import apply_lr_scale, assign_layers, group_with_matcher
from tests.cli_app import RegressionData
from tests.test_cli import TRAINER
from tests.timm_like import ConvNeXt, SwinTransformer, VisionTransformer


# ------------------------------------------------------------------------------- independent reference
def timm_reference(
    model: nn.Module, weight_decay: float, no_weight_decay_list: Collection[str], layer_decay: float
) -> dict[str, tuple[str, float, float]]:
    """``name -> (group name, lr_scale, weight_decay)`` as timm's ``param_groups_layer_decay`` makes them.

    Written from huggingface/pytorch-image-models ``timm/optim/_param_groups.py::param_groups_layer_decay``
    (layer map from ``group_parameters(model, model.group_matcher(coarse=False), reverse=True)``,
    ``timm/models/_manipulate.py::group_with_matcher``): each name gets the ordinal tuple of the first
    matching regex (``inf`` if none), distinct sorted tuples are numbered, a tuple ending in 99999 takes
    the number of the one before; ``lr_scale = layer_decay ** (max id - id)``; no decay for ``ndim <= 1``
    and for names matching ``no_weight_decay_list`` (fnmatch).
    """
    specs = []
    for position, spec in enumerate(model.group_matcher(coarse=False).values()):
        if spec is None:
            continue
        for regex, suffix in spec if isinstance(spec, (list, tuple)) else [(spec, None)]:
            specs.append((regex, position, suffix or ()))
    ordinal = {}
    for name, _ in model.named_parameters():
        key: tuple[float, ...] = (math.inf,)
        for regex, position, suffix in specs:
            m = re.match(regex, name)
            if m:
                key = tuple(float(x) for x in (position, *(g for g in m.groups() if g is not None), *suffix))
                break
        ordinal[name] = key
    number: dict[tuple[float, ...], int] = {}
    for key in sorted(set(ordinal.values())):
        merge = number and key[-1] == 99999
        number[key] = max(number.values()) if merge else len(set(number.values()))
    layer = {name: number[key] for name, key in ordinal.items()}
    top = max(layer.values())
    out = {}
    for name, param in model.named_parameters():
        no_decay = param.ndim <= 1 or any(fnmatch.fnmatch(name, p) for p in no_weight_decay_list)
        lid = layer.get(name, top)
        out[name] = (
            f"layer_{lid}_{'no_decay' if no_decay else 'decay'}",
            layer_decay ** (top - lid),
            0.0 if no_decay else weight_decay,
        )
    return out


def ours(groups: list[dict[str, Any]], model: nn.Module) -> dict[str, tuple[str, float, float]]:
    by_id = {
        id(p): (g["name"].replace("/", "_"), g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]
    }
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


TIMM_MODELS = {
    "vit": lambda: VisionTransformer(depth=4),
    "vit_registers_layerscale": lambda: VisionTransformer(depth=3, reg_tokens=2, init_values=1e-5),
    "convnext": lambda: ConvNeXt(),
    "swin": lambda: SwinTransformer(),
}


@pytest.mark.parametrize("build", TIMM_MODELS.values(), ids=TIMM_MODELS.keys())
@pytest.mark.parametrize("layer_decay", [0.75, 0.6])
def test_groups_equal_timm_param_groups_layer_decay(build: Any, layer_decay: float) -> None:
    model = build()
    nwd = getattr(model, "no_weight_decay", lambda: set())()
    expected = timm_reference(model, 0.05, nwd, layer_decay)
    got = ours(decay_param_groups(model, 0.05, layer_decay=layer_decay), model)
    assert got == expected  # group, lr_scale (the same float) and weight decay of every parameter
    assert len({v[0] for v in got.values()}) > 4  # really split by layer


def test_timm_quirks_are_reproduced() -> None:
    # Facts of timm's matchers the comparison above relies on, read off the regexes by hand.
    vit = VisionTransformer(depth=3, reg_tokens=1)
    a = assign_layers(vit)
    assert a.num_layers == 5  # stem, 3 blocks, head
    assert a.layers["norm.weight"] == a.layers["blocks.2.norm1.weight"] == 3  # (99999,): joins the last block
    assert a.layers["reg_token"] == a.layers["head.weight"] == 4  # unmatched by the stem regex: last
    swin = assign_layers(SwinTransformer(depths=(2, 2, 4, 2)))
    # `layers.0.downsample` has the ordinal of `layers.0.blocks.0`: the same layer
    assert swin.layers["layers.0.downsample.reduction.weight"] == swin.layers["layers.0.blocks.0.norm1.weight"] == 1


def test_timm_model_inside_a_lightning_module_keeps_timms_layers() -> None:
    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = ConvNeXt()
            self.extra_head = nn.Linear(10, 2)

    lit = Lit()
    expected = timm_reference(lit.backbone, 0.05, (), 0.7)
    got = ours(decay_param_groups(lit, 0.05, layer_decay=0.7), lit)
    for name, value in expected.items():
        assert got[f"backbone.{name}"] == value
    # timm gives a name its map lacks the last layer: scale 1
    assert got["extra_head.weight"][1] == 1.0 and got["extra_head.weight"][0].startswith("layer_")


# ------------------------------------------------------------------------------------- module tree
class BertLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attention = nn.ModuleDict({"query": nn.Linear(d, d), "key": nn.Linear(d, d), "value": nn.Linear(d, d)})
        self.attention_norm = nn.LayerNorm(d)
        self.intermediate = nn.Linear(d, 2 * d)
        self.output = nn.Linear(2 * d, d)
        self.output_norm = nn.LayerNorm(d)


class Bert(nn.Module):
    """Hugging Face BERT's module tree: embeddings, ``encoder.layer`` stack, pooler, classifier."""

    def __init__(self, n: int = 4, d: int = 8) -> None:
        super().__init__()
        self.embeddings = nn.ModuleDict(
            {
                "word_embeddings": nn.Embedding(50, d),
                "position_embeddings": nn.Embedding(16, d),
                "LayerNorm": nn.LayerNorm(d),
            }
        )
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(d) for _ in range(n))
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, 2)


def _bert_layer(name: str, n: int) -> int:
    if name.startswith("embeddings."):
        return 0
    m = re.match(r"encoder\.layer\.(\d+)\.", name)
    return int(m[1]) + 1 if m else n + 1


def test_bert_stack_found_from_the_module_tree() -> None:
    n, decay = 4, 0.8
    model = Bert(n)
    groups = decay_param_groups(model, 0.01, layer_decay=decay)
    got = ours(groups, model)
    for name, param in model.named_parameters():
        layer = _bert_layer(name, n)
        is_decayed = param.ndim >= 2  # Linear and Embedding weights; biases and LayerNorms not
        assert got[name] == (
            f"layer_{layer}_{'decay' if is_decayed else 'no_decay'}",
            decay ** (n + 1 - layer),
            0.01 if is_decayed else 0.0,
        ), name
    assert "layer_0/decay" in [g["name"] for g in groups]


def test_layer_of_patterns_and_callable_override() -> None:
    model = Bert(3)
    # The classifier on its own top layer, the pooler below it with the last block.
    layer_of = {"classifier.*": 5, "pooler.*": -2}
    got = ours(decay_param_groups(model, 0.0, layer_decay=0.5, layer_of=layer_of), model)
    assert got["classifier.weight"][1] == 1.0
    assert got["pooler.weight"][1] == 0.5 and got["encoder.layer.2.output.weight"][1] == 0.5**2
    assert got["embeddings.word_embeddings.weight"][1] == 0.5**5

    def layer_of_fn(name: str) -> int | None:
        return 0 if name.startswith("encoder.layer.0.") else None  # the first block frozen-ish, with the embeddings

    got = ours(decay_param_groups(model, 0.0, layer_decay=0.5, layer_of=layer_of_fn), model)
    assert got["encoder.layer.0.output.weight"][1] == got["embeddings.LayerNorm.weight"][1] == 0.5**4
    assert got["encoder.layer.1.output.weight"][1] == 0.5**2


def test_model_without_stack_needs_layer_of() -> None:
    model = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match=r"no layer for .*layer_of"):
        decay_param_groups(model, layer_decay=0.5)
    groups = decay_param_groups(model, layer_decay=0.5, layer_of={"a.*": 0, "b.*": 1})
    assert {g["name"]: g["lr_scale"] for g in groups}["layer_0/decay"] == 0.5


def test_plan_explains_layer_and_scale() -> None:
    plan = DecayRules().classify(Bert(2))
    line = plan.explain("encoder.layer.1.intermediate.weight", layer_decay=0.5)
    assert line.startswith("encoder.layer.1.intermediate.weight: decay (weight of Linear); layer 2 of 4")
    assert "stack 'encoder.layer' block 1" in line and "0.5**1 = 0.5" in line
    plan.param_groups(0.05, layer_decay=0.5)  # remembered for explain() and table()
    assert "before stack 'encoder.layer'" in plan.explain("embeddings.word_embeddings.weight")
    table = plan.table()
    assert "lr_scale" in table.splitlines()[0] and "Layers: 4 from stack 'encoder.layer' (2 blocks)" in table


def test_group_with_matcher_handles_callable_matchers() -> None:
    ids = group_with_matcher(["a", "b", "c"], lambda n: {"a": 2, "b": 0, "c": (2,)}[n])
    assert ids == {"a": 1, "b": 0, "c": 1}


# ------------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"no_weight_decay_list": ["pos_embed"]}, "no_weight_decay_list.*not an optimizer option"),
        ({"exclude": ["head.*"]}, "DecayRules option"),
        ({"layer_of": {"a": 1}}, "layer_of.*layer_decay"),
        ({"layer_decay": 0.0}, r"layer_decay.*\(0, 1\]"),
        ({"layer_decay": 0.5, "lr_scale": 2.0}, "lr_scale"),
        ({"layer_decay": 0.5, "overrides": {"0.*": {"lr_scale": 2.0}}}, "lr_scale"),
    ],
)
def test_group_options_that_are_not_optimizer_options_are_refused(kwargs: dict[str, Any], match: str) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=match):
        decay_param_groups(model, 0.05, **kwargs)


def test_apply_lr_scale_needs_an_lr() -> None:
    groups = decay_param_groups(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), layer_decay=0.5)
    with pytest.raises(ValueError, match="no lr"):
        apply_lr_scale(groups)
    apply_lr_scale(groups, base_lr=0.1)
    assert [g["lr"] for g in groups] == [0.1 * 0.5, 0.1 * 0.5, 0.1, 0.1] and "lr_scale" not in groups[0]


# ------------------------------------------------------------------------- through real schedulers
def _data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 2, (16,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


class BertClassifier(DecayGroupsMixin, pl.LightningModule):
    def __init__(self, layer_decay: float | None = None, **attrs: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bert = Bert(3)
        self.optimizer = torch.optim.SGD
        self.optimizer_kwargs = {"lr": 0.1}
        self.lr_scheduler = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        self.layer_decay = layer_decay
        for k, v in attrs.items():
            setattr(self, k, v)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.bert.pooler(x)
        for block in self.bert.encoder.layer:
            h = block.output(torch.relu(block.intermediate(h)))
        return nn.functional.cross_entropy(self.bert.classifier(h), y)


def test_mixin_scales_lr_per_layer_and_schedulers_keep_the_ratios(tmp_path: Path) -> None:
    model = BertClassifier(layer_decay=0.5)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=CSVLogger(tmp_path, name="", version=""),
        callbacks=[LearningRateMonitor(logging_interval="epoch")],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, _data())
    opt = trainer.optimizers[0]
    for group in opt.param_groups:
        layer = int(re.match(r"layer_(\d+)/", group["name"])[1])
        scale = 0.5 ** (4 - layer)
        assert group["initial_lr"] == 0.1 * scale  # what StepLR recorded: the scaled lr
        assert group["lr"] == pytest.approx(0.1 * scale * 0.5**2)  # two StepLR steps later, same ratio
        assert "lr_scale" not in group  # folded in, so a timm scheduler cannot apply it twice
    # LearningRateMonitor shows one curve per named group, in the same ratios.
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    logged = {k: float(r[k]) for r in rows for k in r if k.startswith("lr-SGD/") and r[k]}
    assert logged["lr-SGD/layer_0/decay"] / logged["lr-SGD/layer_4/decay"] == pytest.approx(0.5**4)
    assert {k.removeprefix("lr-SGD/") for k in logged} == {g["name"] for g in opt.param_groups}


def test_mixin_refuses_a_group_key_the_optimizer_does_not_take() -> None:
    model = BertClassifier(decay_overrides={"bert.classifier.*": {"momentun": 0.9}})
    with pytest.raises(ValueError, match=r"classifier\.\*/decay.*momentun.*SGD does not take"):
        model.configure_optimizers()


YAML = (
    TRAINER
    + """  callbacks:
    - class_path: lightning_decay.WeightDecay
      init_args: {{weight_decay: 0.01}}
optimizer:
  class_path: torch.optim.SGD
  init_args: {{lr: 0.2}}
lr_scheduler:
  class_path: torch.optim.lr_scheduler.StepLR
  init_args: {{step_size: 1, gamma: 0.5}}
decay:
  rules:
    exclude: ["net.3.*"]
  layer_decay: 0.5
"""
)


def test_cli_decay_section_sets_rules_and_layer_decay_from_yaml(tmp_path: Path) -> None:
    from tests.cli_app import PlainModel

    config = tmp_path / "config.yaml"
    config.write_text(YAML.format(root=tmp_path))
    cli = DecayLightningCLI(
        PlainModel, RegressionData, args=["fit", "--config", str(config)], save_config_kwargs={"overwrite": True}
    )
    assert cli.model.decay_rules.exclude == ("net.3.*",)  # the run's rules...
    (decay,) = [c for c in cli.trainer.callbacks if isinstance(c, WeightDecay)]
    assert decay.rules is cli.model.decay_rules  # ...which the callback given no rules uses
    groups = {g["name"]: g for g in cli.trainer.optimizers[0].param_groups}
    # net = Linear, LayerNorm, ReLU, Linear: three blocks of the model's own Sequential, L = 4
    assert set(groups) == {"layer_1/decay", "layer_1/no_decay", "layer_2/no_decay", "layer_3/no_decay"}
    for name, group in groups.items():
        scale = 0.5 ** (3 - int(name[6]))
        assert group["initial_lr"] == pytest.approx(0.2 * scale)
        assert group["lr"] == pytest.approx(0.2 * scale * 0.5**2)


def test_cli_layer_decay_reaches_a_mixin_model(tmp_path: Path) -> None:
    from tests.cli_app import InjectedModel

    yaml = """
trainer: {{max_epochs: 1, logger: false, enable_checkpointing: false, enable_progress_bar: false,
  enable_model_summary: false, default_root_dir: {root}}}
model:
  optimizer: {{class_path: torch.optim.SGD, init_args: {{lr: 0.2}}}}
decay: {{layer_decay: 0.5}}
"""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.format(root=tmp_path))
    cli = DecayLightningCLI(
        InjectedModel, RegressionData, args=["fit", "--config", str(config)], save_config_kwargs={"overwrite": True}
    )
    assert cli.model.layer_decay == 0.5
    lrs = {g["name"]: g["lr"] for g in cli.trainer.optimizers[0].param_groups}
    assert lrs == {
        "layer_1/decay": 0.05,
        "layer_1/no_decay": 0.05,
        "layer_2/no_decay": 0.1,
        "layer_3/decay": 0.2,
        "layer_3/no_decay": 0.2,
    }
