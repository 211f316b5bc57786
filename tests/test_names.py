"""Wrapper components removed from names, user names kept: ``clean_param_name`` on strings (a guess from
the spelling) and ``clean_names`` / the plans on real wrappers (decided from the module tree)."""

from __future__ import annotations

import contextlib
import csv
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.data import DataLoader, TensorDataset

from lightning_decay import DecayRules, WeightDecay, WeightNormMonitor, WeightPenalty, clean_names, clean_param_name
from tests.models import NameWrapper, make_gpt, make_vit, wrap
from tests.wrappers import ddp, fabric_module, fsdp1, process_group


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("blocks.0.attn.weight", "blocks.0.attn.weight"),
        ("weight", "weight"),
        ("", ""),
        # torch.compile
        ("_orig_mod.blocks.0.attn.weight", "blocks.0.attn.weight"),
        # FSDP1: the root and every wrapped submodule
        ("_fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.attn.weight", "blocks.0.attn.weight"),
        # activation checkpointing
        ("blocks.0._checkpoint_wrapped_module.mlp.fc1.bias", "blocks.0.mlp.fc1.bias"),
        # DDP / DataParallel
        ("module.head.weight", "head.weight"),
        ("module._orig_mod.head.weight", "head.weight"),
        ("_orig_mod.module.head.weight", "head.weight"),
        # all at once (the docstring example)
        ("module._orig_mod.blocks.0._fsdp_wrapped_module.attn.weight", "blocks.0.attn.weight"),
        (
            "_fsdp_wrapped_module.h.1._fsdp_wrapped_module._checkpoint_wrapped_module.ln_1.weight",
            "h.1.ln_1.weight",
        ),
        # a user submodule named `module` in the middle is a real name: kept
        ("encoder.module.weight", "encoder.module.weight"),
        ("module.encoder.module.weight", "encoder.module.weight"),
        ("_orig_mod.encoder.module.layers.0.bias", "encoder.module.layers.0.bias"),
        # a parameter whose own name is `module` is kept (never emptied)
        ("module", "module"),
        # names that merely contain a wrapper word are untouched
        ("my_module.weight", "my_module.weight"),
        ("modules.0.weight", "modules.0.weight"),
        ("orig_mod.weight", "orig_mod.weight"),
    ],
)
def test_clean_param_name(raw: str, clean: str) -> None:
    assert clean_param_name(raw) == clean


def test_clean_is_idempotent() -> None:
    for raw in ("module._orig_mod.a.b", "_fsdp_wrapped_module.x._checkpoint_wrapped_module.y.weight"):
        once = clean_param_name(raw)
        assert clean_param_name(once) == once


def test_torch_compile_names_cleaned() -> None:
    model = make_gpt()
    compiled = torch.compile(model)  # lazy: nothing is compiled until the first forward
    raw = [n for n, _ in compiled.named_parameters()]
    assert all(n.startswith("_orig_mod.") for n in raw)
    assert [clean_param_name(n) for n in raw] == [n for n, _ in model.named_parameters()]


def test_real_checkpoint_wrapper_names_cleaned() -> None:
    model = make_vit()
    plain = [n for n, _ in make_vit().named_parameters()]
    model.blocks[1] = checkpoint_wrapper(model.blocks[1])
    raw = [n for n, _ in model.named_parameters()]
    assert any("._checkpoint_wrapped_module." in n for n in raw)
    assert [clean_param_name(n) for n in raw] == plain


def test_fsdp1_style_and_ddp_style_names_cleaned() -> None:
    model = make_vit()
    plain = [n for n, _ in make_vit().named_parameters()]
    for i, block in enumerate(model.blocks):
        model.blocks[i] = NameWrapper(block, "_fsdp_wrapped_module")
    outer = wrap(model, "_fsdp_wrapped_module", "module")
    raw = [n for n, _ in outer.named_parameters()]
    assert raw[0].startswith("module._fsdp_wrapped_module.")
    assert [clean_param_name(n) for n in raw] == plain


def test_plan_uses_clean_names_of_real_wrappers() -> None:
    model = make_gpt()
    model.h[0] = checkpoint_wrapper(model.h[0])
    plan = DecayRules().classify(torch.compile(model))
    assert [d.name for d in plan] == [d.name for d in DecayRules().classify(make_gpt())]


# --------------------------------------------------------------------- names from the module tree
class UserModule(nn.Module):
    """A model with a user attribute called ``module`` next to ``head``: not a wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.ModuleDict({"head": nn.Linear(3, 3)})
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.module["head"](x))


USER_NAMES = ["module.head.weight", "module.head.bias", "head.weight", "head.bias"]


def test_user_attribute_module_is_not_a_wrapper() -> None:
    model = UserModule()
    names = clean_names(model)
    assert [names[n] for n, _ in model.named_parameters()] == USER_NAMES
    plan = DecayRules().classify(model)
    assert [d.name for d in plan] == USER_NAMES
    assert plan["module.head.weight"].param is model.module["head"].weight
    assert plan["head.weight"].param is model.head.weight
    # The spelling-based guess cannot tell: it is the documented limit of `clean_param_name`.
    assert clean_param_name("module.head.weight") == "head.weight"


def test_exclude_pattern_on_user_attribute_module() -> None:
    model = UserModule()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "pattern matches no parameter" would be an error here
        plan = DecayRules(exclude=["module.*"]).classify(model)
    assert plan.no_decay_names == ["module.head.weight", "module.head.bias", "head.bias"]
    assert plan["module.head.weight"].reason == "exclude pattern 'module.*'"
    assert plan.decay_names == ["head.weight"]


WRAPPERS = ["ddp", "data_parallel", "fsdp1", "checkpoint", "compile", "fabric"]


def _wrapped(kind: str, model: nn.Module) -> tuple[nn.Module, str]:
    """``model`` inside a real wrapper of ``kind``, and the name component the wrapper inserts."""
    if kind == "ddp":
        return ddp(model), "module"
    if kind == "data_parallel":
        return nn.DataParallel(model), "module"
    if kind == "fsdp1":
        return fsdp1(model), "_fsdp_wrapped_module"
    if kind == "checkpoint":
        return checkpoint_wrapper(model), "_checkpoint_wrapped_module"
    if kind == "compile":
        return torch.compile(model), "_orig_mod"
    return fabric_module(model), "_forward_module"


@pytest.mark.parametrize("kind", WRAPPERS)
def test_real_wrapper_removed_user_module_kept(kind: str) -> None:
    """Around a model whose own attribute is called ``module``, each real wrapper loses its component and
    the model keeps its own: names equal the unwrapped model's, decisions too."""
    plain = UserModule()
    reference = [(d.name, d.decay, d.reason) for d in DecayRules().classify(plain)]
    with process_group() if kind in ("ddp", "fsdp1") else contextlib.nullcontext():
        wrapped, component = _wrapped(kind, UserModule())
        # (CheckpointWrapper's own `named_parameters` hides its component: the tree's names are wanted here.)
        raw = [n for n, _ in nn.Module.named_parameters(wrapped)]
        assert all(n.startswith(f"{component}.") for n in raw), raw
        names = clean_names(wrapped)
        assert [names[n] for n in raw] == USER_NAMES
        assert [names[n] for n, _ in wrapped.named_parameters()] == USER_NAMES  # the wrapper's own spelling too
        assert [(d.name, d.decay, d.reason) for d in DecayRules().classify(wrapped)] == reference
        plan = DecayRules(exclude=["module.*"]).classify(wrapped)
        assert plan.decay_names == ["head.weight"]


def test_wrappers_nested_inside_a_model() -> None:
    """Checkpoint and FSDP1 wrappers on submodules, DDP outside: every wrapper component goes, nothing else."""
    model = make_vit()
    plain = [n for n, _ in make_vit().named_parameters()]
    model.blocks[0] = checkpoint_wrapper(model.blocks[0])
    with process_group():
        model.blocks[1] = fsdp1(model.blocks[1])
        outer = ddp(model)
        raw = [n for n, _ in outer.named_parameters()]
        assert any("blocks.0._checkpoint_wrapped_module." in n for n in raw)
        assert any("blocks.1._fsdp_wrapped_module." in n for n in raw)
        names = clean_names(outer)
        assert [names[n] for n in raw] == plain
        assert names["module.blocks.1._fsdp_wrapped_module.attn"] == "blocks.1.attn"  # module names too


def test_a_plain_module_named_like_a_wrapper_keeps_its_name() -> None:
    """A user container whose attribute is ``_orig_mod`` or ``_fsdp_wrapped_module`` is no wrapper either."""
    for attr in ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "module"):
        outer = NameWrapper(make_vit(), attr)
        names = clean_names(outer)
        assert all(clean == raw for raw, clean in names.items()), attr


def test_colliding_cleaned_names_keep_the_raw_names() -> None:
    """A wrapper with a parameter of its own named like the model's: cleaning would give two parameters one
    name, so every name stays raw (and unique)."""
    wrapper = nn.DataParallel(nn.Linear(2, 2))
    wrapper.register_parameter("weight", nn.Parameter(torch.zeros(2, 2)))  # the wrapper's own `weight`
    names = clean_names(wrapper)
    assert names == {n: n for n in names}
    plan = DecayRules().classify(wrapper)
    assert sorted(d.name for d in plan) == ["module.bias", "module.weight", "weight"]


def test_colliding_cleaned_names_keep_the_raw_names_with_a_shared_module() -> None:
    """The same where a module is reached under two names: the plan keeps torch's raw names, the first name of
    each parameter as its name and the other as its alias."""
    inner = nn.Linear(2, 2)
    inner.x = inner.y = nn.Linear(2, 2)  # one Linear under two names
    wrapper = nn.DataParallel(inner)
    wrapper.register_parameter("weight", nn.Parameter(torch.zeros(2, 2)))  # collides with the model's `weight`
    plan = DecayRules().classify(wrapper)
    assert [d.name for d in plan] == [n for n, _ in wrapper.named_parameters()]
    every = [n for n, _ in wrapper.named_parameters(remove_duplicate=False)]
    assert sorted(n for d in plan for n in (d.name, *d.aliases)) == sorted(every)
    assert {d.name: d.aliases for d in plan if d.aliases} == {
        "module.x.weight": ("module.y.weight",),
        "module.x.bias": ("module.y.bias",),
    }


# ------------------------------------------------------------- the callbacks on a user `module` attribute
class UserLit(pl.LightningModule):
    """A ``module`` attribute next to ``head`` in a LightningModule, trained by plain SGD on a loss whose
    gradient is exactly zero: only the callbacks move the weights."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.module = nn.ModuleDict({"head": nn.Linear(3, 3)})
            self.head = nn.Linear(3, 3)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.head(self.module["head"](batch[0])) * 0.0).sum()  # zero gradients, but present

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(DecayRules().classify(self).param_groups(weight_decay=0.0), lr=self.lr)


class Shift(pl.Callback):
    """Moves every weight by +1 after fit start, once the callbacks have taken their references."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            for p in pl_module.parameters():
                p.add_(1.0)


def _fit_user(model: UserLit, callbacks: list[pl.Callback], steps: int, tmp_path: Path, **kwargs: Any) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    trainer.fit(model, DataLoader(TensorDataset(x), batch_size=2))


@pytest.mark.parametrize("reference", ["initial", "mapping"])
def test_l2sp_pulls_each_parameter_toward_its_own_reference(reference: str, tmp_path: Path) -> None:
    """``module.head.weight`` and ``head.weight`` have the same shape: each must be pulled toward its own
    reference. Zero data gradient, plain SGD: ``w_T = ref + (1 - lr * l2) ** T * (w_0 - ref)``."""
    l2, lr, steps = 0.5, 0.1, 3
    model = UserLit(lr)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    if reference == "initial":
        refs, given = init, "initial"
    else:
        refs = {n: v + 3.0 for n, v in init.items()}
        given = dict(refs)
    _fit_user(model, [WeightPenalty(l2=l2, reference=given), Shift()], steps, tmp_path, logger=False)
    factor = (1 - lr * l2) ** steps
    for name in ("module.head.weight", "head.weight"):
        expected = refs[name] + factor * (init[name] + 1.0 - refs[name])
        torch.testing.assert_close(model.get_parameter(name).detach(), expected, rtol=1e-6, atol=1e-6)
    for name in ("module.head.bias", "head.bias"):  # not decayed: no reference, no pull
        torch.testing.assert_close(model.get_parameter(name).detach(), init[name] + 1.0, rtol=0, atol=0)


def test_monitor_logs_both_parameters_under_their_own_names(tmp_path: Path) -> None:
    model = UserLit()
    logger = CSVLogger(tmp_path, name="csv", version=0)
    monitor = WeightNormMonitor(log_grad_norm=True, log_update_ratio=True, log_angular_update=True)
    _fit_user(model, [WeightDecay(0.1), monitor], 4, tmp_path, logger=logger, log_every_n_steps=1)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("weight_norm/total")]
    last = max(rows, key=lambda r: int(r["step"]))
    for name in USER_NAMES:
        expected = model.get_parameter(name).detach().double().norm().item()
        assert float(last[f"weight_norm/{name}"]) == pytest.approx(expected, rel=1e-6), name


def test_layer_decay_reads_the_same_names_as_the_plan() -> None:
    """Layer ids come from the same module-tree names: a stack under a user attribute ``module`` (and the
    same model inside DDP-like ``DataParallel``) gets one layer per block, the head last."""

    class Stacked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.ModuleList(nn.Linear(3, 3) for _ in range(3))
            self.head = nn.Linear(3, 3)

    for model in (Stacked(), nn.DataParallel(Stacked())):
        groups = DecayRules().classify(model).param_groups(weight_decay=0.1, layer_decay=0.5)
        scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
        inner = model.module if isinstance(model, nn.DataParallel) else model
        got = [scale[id(inner.module[i].weight)] for i in range(3)] + [scale[id(inner.head.weight)]]
        assert got == sorted(got) and len(set(got)) == 4, got  # deeper blocks, larger scales; head last (1.0)
        assert got[-1] == 1.0
