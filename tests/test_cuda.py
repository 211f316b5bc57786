"""CUDA-only checks: FSDP1 names and flat parameters, AMP with a real GradScaler, fused optimizers, bf16.

Skipped where CUDA is missing (the CPU CI); ``scripts/gpu_check.sh`` runs them on a GPU machine. Every run
is a few optimizer steps of a tiny MLP on one GPU, compared with a reference run under the same precision:

- FSDP1 (``FSDPStrategy(use_orig_params=True)``): names carry ``_fsdp_wrapped_module.`` and parameters are
  flat views, yet ``DecayRules().classify`` inside ``configure_optimizers`` decides as on the unwrapped model;
- ``16-mixed``: ``Adam`` + ``WeightDecay(wd)`` == ``AdamW(weight_decay=wd)``; a step the GradScaler skips
  (forced overflow) is skipped by the decay too;
- fused ``AdamW(fused=True)`` (grads still scaled in ``on_before_optimizer_step``) == its non-fused twin, with
  ``WeightDecay`` and with ``WeightPenalty``;
- ``bf16-mixed``: ``Adam`` + ``WeightDecay`` == ``AdamW``;
- ``WeightNormMonitor`` on CUDA: logged norms == norms recomputed from the final weights.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decay import DecayRules, WeightDecay, WeightPenalty

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

WD, LR, STEPS = 0.1, 1e-2, 6
OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


def make_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 32), nn.Linear(32, 4))


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * STEPS, 16, generator=g)
    return DataLoader(TensorDataset(x, x[:, :4].sin()), batch_size=8)


class Model(pl.LightningModule):
    def __init__(self, optimizer: OptimizerFactory, weight_decay: float = 0.0, overflow_at: int | None = None) -> None:
        super().__init__()
        self.net = make_mlp()
        self.make_optimizer = optimizer
        self.weight_decay = weight_decay
        self.overflow_at = overflow_at
        self.plan: list[tuple[str, bool, tuple[int, ...]]] = []
        self.wrapped_names: list[str] = []
        self.flat_weights = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        if batch_idx == self.overflow_at:
            loss = loss * float("inf")  # every gradient inf/NaN: the GradScaler must skip this step
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        plan = DecayRules().classify(self)
        self.plan = [(d.name, d.decay, d.shape) for d in plan]
        self.wrapped_names = [n for n, _ in self.named_parameters()]
        # FSDP1 flat views: a Linear weight shows up 1-D (recorded for the report, not required on 1 GPU).
        self.flat_weights = any(
            p.ndim == 1 for n, p in self.named_parameters() if n.endswith("0._fsdp_wrapped_module.weight")
        )
        return self.make_optimizer(plan.param_groups(weight_decay=self.weight_decay))


def fit(model: Model, tmp_path: Path, precision: str, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("max_steps", STEPS)
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,  # several devices would need the subprocess launcher, which re-runs pytest
        precision=precision,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )
    trainer.fit(model, loader())
    return trainer


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def adam(**kw: Any) -> OptimizerFactory:
    return lambda groups: torch.optim.Adam(groups, lr=LR, **kw)


def adamw(**kw: Any) -> OptimizerFactory:
    return lambda groups: torch.optim.AdamW(groups, lr=LR, **kw)


# ------------------------------------------------------------------------------------------ FSDP1
def test_fsdp1_classifies_flat_wrapped_params_like_unwrapped(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    reference = [(d.name, d.decay, tuple(d.shape)) for d in DecayRules().classify(Model(adamw()))]
    model = Model(adamw(), weight_decay=WD)
    strategy = FSDPStrategy(auto_wrap_policy={nn.Linear}, use_orig_params=True)
    fit(model, tmp_path, "32-true", [], strategy=strategy, max_steps=2)
    assert any("_fsdp_wrapped_module." in n for n in model.wrapped_names), model.wrapped_names
    assert model.plan == reference  # cleaned names, same decisions, original (not flat) shapes


# -------------------------------------------------------------------------------------------- AMP
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_adam_plus_weight_decay_is_adamw(tmp_path: Path, precision: str) -> None:
    ours = Model(adam())
    fit(ours, tmp_path, precision, [WeightDecay(WD)])
    ref = Model(adamw(), weight_decay=WD)
    fit(ref, tmp_path, precision, [])
    assert_close(weights(ours), weights(ref))


def test_overflow_step_is_skipped_without_decay(tmp_path: Path) -> None:
    decay = WeightDecay(WD)
    ours = Model(adam(), overflow_at=2)
    trainer = fit(ours, tmp_path, "16-mixed", [decay])
    ref = Model(adamw(), weight_decay=WD, overflow_at=2)
    ref_trainer = fit(ref, tmp_path, "16-mixed", [])
    scaler = trainer.precision_plugin.scaler
    assert isinstance(scaler, torch.amp.GradScaler)
    assert scaler.get_scale() < 2.0**16  # the overflow lowered the scale: a step was really skipped
    assert decay._binding.steps == [trainer.global_step - 1]  # one step skipped, neither counted nor decayed
    assert_close(weights(ours), weights(ref))
    assert ref_trainer.global_step == trainer.global_step


@pytest.mark.parametrize(
    "callback",
    [lambda: WeightDecay(WD), lambda: WeightPenalty(l2=WD), lambda: WeightPenalty(l1=1e-3, l2=WD)],
    ids=["decay", "l2", "l1+l2"],
)
def test_fused_optimizer_gets_the_right_scale(tmp_path: Path, callback: Callable[[], Callback]) -> None:
    fused = Model(adamw(fused=True, weight_decay=0.0))
    fit(fused, tmp_path, "16-mixed", [callback()])
    plain = Model(adamw(weight_decay=0.0))
    fit(plain, tmp_path, "16-mixed", [callback()])
    assert_close(weights(fused), weights(plain))


def test_fused_overflow_step_is_skipped(tmp_path: Path) -> None:
    fused = Model(adamw(fused=True, weight_decay=0.0), overflow_at=2)
    fit(fused, tmp_path, "16-mixed", [WeightDecay(WD)])
    plain = Model(adamw(weight_decay=0.0), overflow_at=2)
    fit(plain, tmp_path, "16-mixed", [WeightDecay(WD)])
    assert_close(weights(fused), weights(plain))


# ---------------------------------------------------------------------------------------- monitor
def test_weight_norm_monitor_on_cuda(tmp_path: Path) -> None:
    monitor_module = pytest.importorskip("lightning_decay.monitor")
    model = Model(adam())
    monitor = monitor_module.WeightNormMonitor(log_grad_norm=True)
    fit(
        model,
        tmp_path,
        "16-mixed",
        [WeightDecay(WD), monitor],
        logger=CSVLogger(tmp_path, name="csv", version=0),
        log_every_n_steps=1,
    )
    with open(tmp_path / "csv" / "version_0" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("weight_norm/total")]
    last = max(rows, key=lambda r: int(r["step"]))
    assert int(last["step"]) == STEPS - 1
    final = {n: p.detach().double().cpu() for n, p in model.named_parameters()}
    for name, value in final.items():
        assert float(last[f"weight_norm/{name}"]) == pytest.approx(value.norm().item(), rel=1e-6), name
    total = sum(v.square().sum() for v in final.values()).sqrt().item()
    assert float(last["weight_norm/total"]) == pytest.approx(total, rel=1e-6)
    assert all(float(r["grad_norm/total"]) > 0 for r in rows if r.get("grad_norm/total"))
