"""``WeightPenalty`` / ``WeightDecay`` inside real ``Trainer.fit`` runs: accumulation, clipping, AMP,
half precision, manual optimization, finetuning, resume, and the DeepSpeed refusal.

Every case compares against an independent reference: a run without the callback plus the explicit
loss term, torch's own optimizer weight decay on the decay groups, or an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_decay import DecayRules, WeightDecay, WeightPenalty, decay_param_groups
from lightning_decay.schedules import Cosine, Linear
from tests.test_penalty import (
    BATCH,
    N_SAMPLES,
    Lit,
    assert_runs_equal,
    explicit_penalty,
    fit,
    loader,
    make_trainer,
    run,
    weights,
)

STEPS_PER_EPOCH = N_SAMPLES // BATCH


def adam(lr: float = 0.01) -> Callable[[Lit], torch.optim.Optimizer]:
    return lambda m: torch.optim.Adam(m.parameters(), lr=lr, foreach=False)


def adamw_groups(lam: float, lr: float = 0.01) -> Callable[[Lit], torch.optim.Optimizer]:
    return lambda m: torch.optim.AdamW(decay_param_groups(m, weight_decay=lam), lr=lr, foreach=False)


def sgd(lr: float = 0.1, **kw: Any) -> Callable[[Lit], torch.optim.Optimizer]:
    return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, foreach=False, **kw)


def sgd_groups(lam: float, lr: float = 0.1) -> Callable[[Lit], torch.optim.Optimizer]:
    return lambda m: torch.optim.SGD(decay_param_groups(m, weight_decay=lam), lr=lr, momentum=0.9, foreach=False)


# --------------------------------------------------------------------------- gradient accumulation
def test_penalty_with_gradient_accumulation_is_added_once_per_real_step() -> None:
    l1, l2 = 0.01, 0.2
    cb = WeightPenalty(l1=l1, l2=l2)
    got = run(Lit(adam()), [cb], max_epochs=2, accumulate_grad_batches=2)
    # reference: the explicit term in the loss of every micro-batch; Lightning divides each loss by 2
    want = run(Lit(adam(), extra_loss=explicit_penalty(l1, l2)), max_epochs=2, accumulate_grad_batches=2)
    assert_runs_equal(got, want, exact=False, rtol=1e-5, atol=1e-7)
    assert cb.state_dict()["steps"] == [2 * STEPS_PER_EPOCH // 2]
    # and it is not the same as adding the penalty at every micro-batch
    doubled = run(Lit(adam(), extra_loss=explicit_penalty(2 * l1, 2 * l2)), max_epochs=2, accumulate_grad_batches=2)
    assert not torch.allclose(got[-1]["net.0.weight"], doubled[-1]["net.0.weight"], atol=1e-6)


def test_weight_decay_with_gradient_accumulation_is_bitwise_adamw() -> None:
    lam = 0.1
    cb = WeightDecay(lam)
    got = run(Lit(adam()), [cb], max_epochs=2, accumulate_grad_batches=2)
    want = run(Lit(adamw_groups(lam)), max_epochs=2, accumulate_grad_batches=2)
    assert_runs_equal(got, want, exact=True)
    assert cb.state_dict()["steps"] == [STEPS_PER_EPOCH]


# ------------------------------------------------------------------------------ gradient clipping
def test_penalty_counts_before_gradient_clipping() -> None:
    l2, clip = 0.5, 0.05
    got = run(Lit(sgd()), [WeightPenalty(l2=l2)], gradient_clip_val=clip)
    want = run(Lit(sgd(), extra_loss=explicit_penalty(l2=l2)), gradient_clip_val=clip)
    unclipped = run(Lit(sgd(), extra_loss=explicit_penalty(l2=l2)))
    assert not torch.allclose(want[-1]["net.0.weight"], unclipped[-1]["net.0.weight"], atol=1e-4), "clipping acts"
    assert_runs_equal(got, want, exact=False, rtol=1e-5, atol=1e-7)


def adam_groups(lr: float = 0.01) -> Callable[[Lit], torch.optim.Optimizer]:
    """Adam over the decay / no-decay groups, both with ``weight_decay=0``: AdamW's parameter order."""
    return lambda m: torch.optim.Adam(decay_param_groups(m, weight_decay=0.0), lr=lr, foreach=False)


def test_weight_decay_with_clipping_is_bitwise_adamw_with_clipping() -> None:
    """Bitwise because both runs clip over the same parameter order.

    Lightning clips the norm of the optimizer's parameters in their group order; summed in another order
    (one group against decay / no-decay groups) the total norm may differ in its last bit on some CPUs.
    So the callback's run uses Adam over the same two groups (without decay) as the AdamW reference.
    """
    lam, clip = 0.1, 0.05
    got = run(Lit(adam_groups()), [WeightDecay(lam)], gradient_clip_val=clip)
    want = run(Lit(adamw_groups(lam)), gradient_clip_val=clip)
    unclipped = run(Lit(adamw_groups(lam)))
    assert not torch.allclose(want[-1]["net.0.weight"], unclipped[-1]["net.0.weight"], atol=1e-4), "clipping acts"
    assert_runs_equal(got, want, exact=True)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "16-mixed"])
def test_take_over_of_coupled_sgd_decay_with_clipping_matches_sgd(amp: bool) -> None:
    """torch's SGD adds ``wd * w`` inside ``step``, after Lightning clipped: the take-over must too.

    Without AMP Lightning runs the closure (and the clipping) inside ``step``; with a GradScaler it runs
    it before ``step``. Both paths are checked against SGD's own weight_decay on the same groups.
    """
    lam, clip = 0.5, 0.05

    def precision() -> dict[str, Any]:  # a fresh GradScaler per run
        return {"max_epochs": 2, "plugins": [fp16_plugin(2.0**19)]} if amp else {}

    got = run(Lit(sgd(weight_decay=lam)), [WeightDecay()], gradient_clip_val=clip, **precision())
    want = run(Lit(sgd_groups(lam)), gradient_clip_val=clip, **precision())
    # Not bitwise: the one-group run clips over another parameter order than the decay / no-decay groups,
    # so the total norm (and the clip factor) may differ in its last bits; 1e-6 is a few float32 ulps.
    assert_runs_equal(got, want, exact=False, rtol=1e-6, atol=1e-8)


# -------------------------------------------------------------------------------------------- AMP
def fp16_plugin(init_scale: float) -> MixedPrecision:
    """``16-mixed`` on CPU: Lightning refuses the string there, the plugin itself works."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


class StepRecorder(Callback):
    """Per batch: whether the GradScaler skipped the step, weights before/after, the callback's step counter."""

    def __init__(self, regularizer: Any) -> None:
        self.regularizer = regularizer
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._scale = trainer.precision_plugin.scaler.get_scale()
        self._before = weights(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        scale = trainer.precision_plugin.scaler.get_scale()
        self.rows.append(
            {
                "skipped": scale < self._scale,  # the scaler backs off only after a step with inf/NaN gradients
                "before": self._before,
                "after": weights(pl_module),
                "steps": self.regularizer.state_dict()["steps"][0],
            }
        )


@pytest.mark.parametrize(
    ("make_cb", "optimizer"),
    [
        (lambda: WeightDecay(Linear(0.5, 0.1, 20)), adam()),
        (lambda: WeightPenalty(l1=0.05, l1_mode="proximal"), sgd()),
        (lambda: WeightPenalty(l2=Cosine(0.5, 0.0, 20)), adam()),
        (lambda: WeightDecay(), sgd(weight_decay=0.3)),
    ],
    ids=["decay-schedule", "proximal", "penalty-schedule", "take-over-coupled"],
)
def test_fp16_amp_skipped_steps_get_no_decay_no_prox_no_schedule_advance(make_cb: Any, optimizer: Any) -> None:
    cb = make_cb()
    rec = StepRecorder(cb)
    trainer = fit(Lit(optimizer), [cb, rec], max_epochs=2, plugins=[fp16_plugin(2.0**19)])
    assert isinstance(trainer.precision_plugin, MixedPrecision) and trainer.precision_plugin.scaler is not None
    skipped = [r for r in rec.rows if r["skipped"]]
    ran = [r for r in rec.rows if not r["skipped"]]
    assert skipped and ran, "the huge initial scale makes the first steps overflow, later ones run"
    for r in skipped:
        for name, w in r["before"].items():
            assert torch.equal(w, r["after"][name]), f"{name} changed on a skipped step"
    for r in ran:
        assert not torch.equal(r["before"]["net.0.weight"], r["after"]["net.0.weight"])
    # the step counter (and so the schedules) advanced on real steps only
    counts = [r["steps"] for r in rec.rows]
    expected, n = [], 0
    for r in rec.rows:
        n += 0 if r["skipped"] else 1
        expected.append(n)
    assert counts == expected


def test_fp16_amp_weight_decay_matches_adamw_under_the_same_scaler() -> None:
    lam = 0.2
    got = run(Lit(adam()), [WeightDecay(lam)], max_epochs=2, plugins=[fp16_plugin(2.0**19)])
    want = run(Lit(adamw_groups(lam)), max_epochs=2, plugins=[fp16_plugin(2.0**19)])
    assert_runs_equal(got, want, exact=False, rtol=1e-6, atol=1e-8)


def test_fp16_amp_penalty_matches_sgd_weight_decay_under_the_same_scaler() -> None:
    lam = 0.2
    got = run(Lit(sgd()), [WeightPenalty(l2=lam)], max_epochs=2, plugins=[fp16_plugin(2.0**19)])
    want = run(Lit(sgd_groups(lam)), max_epochs=2, plugins=[fp16_plugin(2.0**19)])
    assert_runs_equal(got, want, exact=True)


def fused_adam(cls: Any = torch.optim.Adam, lam: float | None = None, groups: bool = False) -> Any:
    def make(m: Lit) -> torch.optim.Optimizer:
        params = decay_param_groups(m, weight_decay=lam) if groups else m.parameters()
        kw = {} if groups or lam is None else {"weight_decay": lam}
        return cls(params, lr=0.01, fused=True, **kw)

    return make


@pytest.mark.parametrize(
    ("callback", "plain", "reference"),
    [
        (lambda: WeightDecay(0.2), fused_adam(), fused_adam(torch.optim.AdamW, 0.2, groups=True)),
        (lambda: WeightPenalty(l2=0.2), fused_adam(), fused_adam(torch.optim.Adam, 0.2, groups=True)),
        (lambda: WeightDecay(), fused_adam(torch.optim.Adam, 0.2), fused_adam(torch.optim.Adam, 0.2, groups=True)),
        (lambda: WeightDecay(), fused_adam(torch.optim.AdamW, 0.2), fused_adam(torch.optim.AdamW, 0.2, groups=True)),
    ],
    ids=["decay", "penalty", "take-over-adam", "take-over-adamw"],
)
def test_fp16_amp_fused_adam_gets_scaled_gradients_right(callback: Any, plain: Any, reference: Any) -> None:
    """Fused optimizers unscale inside ``step``: in the hook the gradients are still scaled."""
    cb = callback()
    rec = StepRecorder(cb)
    got = run(Lit(plain), [cb, rec], max_epochs=2, plugins=[fp16_plugin(2.0**19)])
    want = run(Lit(reference), max_epochs=2, plugins=[fp16_plugin(2.0**19)])
    assert any(r["skipped"] for r in rec.rows) and not all(r["skipped"] for r in rec.rows)
    for r in rec.rows:
        if r["skipped"]:
            assert all(torch.equal(w, r["after"][n]) for n, w in r["before"].items())
    assert_runs_equal(got, want, exact=False, rtol=1e-6, atol=1e-7)


def test_fp16_amp_fused_adam_l1_subgradient_matches_unfused() -> None:
    l1 = 0.05
    unfused = run(Lit(adam()), [WeightPenalty(l1=l1)], max_epochs=2, plugins=[fp16_plugin(2.0**19)])
    fused = run(Lit(fused_adam()), [WeightPenalty(l1=l1)], max_epochs=2, plugins=[fp16_plugin(2.0**19)])
    plain = run(Lit(fused_adam()), max_epochs=2, plugins=[fp16_plugin(2.0**19)])
    assert not torch.allclose(fused[-1]["net.0.weight"], plain[-1]["net.0.weight"], atol=1e-4)
    assert_runs_equal(fused, unfused, exact=False, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-true"])
def test_half_precision_weight_decay_is_bitwise_adamw(precision: str) -> None:
    """No precision lost beyond the optimizer's own: the decay runs in the parameters' dtype, as AdamW's."""
    lam = 0.1
    got = run(Lit(adam()), [WeightDecay(lam)], max_epochs=2, precision=precision)
    want = run(Lit(adamw_groups(lam)), max_epochs=2, precision=precision)
    expected_dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)
    assert got[-1]["net.0.weight"].dtype == expected_dtype
    assert_runs_equal(got, want, exact=True)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-true"])
def test_half_precision_l2_penalty_is_bitwise_sgd_weight_decay(precision: str) -> None:
    lam = 0.1
    got = run(Lit(sgd()), [WeightPenalty(l2=lam)], max_epochs=2, precision=precision)
    want = run(Lit(sgd_groups(lam)), max_epochs=2, precision=precision)
    assert_runs_equal(got, want, exact=True)


# --------------------------------------------------------------------------- manual optimization
class GAN(pl.LightningModule):
    """Generator and discriminator, each with its own optimizer, stepped by hand."""

    def __init__(self, make_opt: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        super().__init__()
        self.automatic_optimization = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            self.gen = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 4))
            self.disc = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))
        self.make_opt = make_opt

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, _ = batch
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        fake = self.gen(real[:, :2])
        g_loss = nn.functional.softplus(-self.disc(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)  # also leaves gradients on the discriminator
        opt_g.step()
        d_loss = (
            nn.functional.softplus(-self.disc(real)).mean() + nn.functional.softplus(self.disc(fake.detach())).mean()
        )
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()

    def configure_optimizers(self) -> Any:
        return [self.make_opt(self.gen), self.make_opt(self.disc)]


# (callback, optimizer alone, the optimizer's own decay on the decay / no-decay groups): bitwise equal runs.
# Take-over: the closure Lightning hands `step` in manual optimization gets the L2 term, as SGD would.
EQUIVALENCES = [
    (
        lambda: WeightDecay(0.2),
        lambda mod: torch.optim.Adam(mod.parameters(), lr=0.01, foreach=False),
        lambda mod: torch.optim.AdamW(decay_param_groups(mod, weight_decay=0.2), lr=0.01, foreach=False),
    ),
    (
        lambda: WeightPenalty(l2=0.2),
        lambda mod: torch.optim.SGD(mod.parameters(), lr=0.1, momentum=0.9, foreach=False),
        lambda mod: torch.optim.SGD(decay_param_groups(mod, weight_decay=0.2), lr=0.1, momentum=0.9, foreach=False),
    ),
    (
        lambda: WeightDecay(),
        lambda mod: torch.optim.SGD(mod.parameters(), lr=0.1, momentum=0.9, weight_decay=0.2, foreach=False),
        lambda mod: torch.optim.SGD(decay_param_groups(mod, weight_decay=0.2), lr=0.1, momentum=0.9, foreach=False),
    ),
]
EQUIVALENCE_IDS = ["decay", "penalty", "take-over-coupled"]


@pytest.mark.parametrize(("callback", "plain", "reference"), EQUIVALENCES, ids=EQUIVALENCE_IDS)
def test_manual_optimization_two_optimizers_each_param_regularized_once(
    callback: Any, plain: Any, reference: Any
) -> None:
    cb = callback()
    got = run(GAN(plain), [cb], max_epochs=2)
    want = run(GAN(reference), max_epochs=2)
    assert_runs_equal(got, want, exact=True)
    assert cb.state_dict()["steps"] == [2 * STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


# ------------------------------------------------------------------------------------- finetuning
class UnfreezeAtEpochOne(BaseFinetuning):
    """Freezes ``net.0`` before training; unfreezes it at epoch 1 with ``unfreeze_and_add_param_group``."""

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=0.05)


class UnfreezeWithDecayGroups(UnfreezeAtEpochOne):
    """The reference: the new parameters join as decay / no-decay groups with the optimizer's own decay."""

    def __init__(self, lam: float) -> None:
        super().__init__()
        self.lam = lam

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            self.make_trainable(pl_module.net[0])
            for group in decay_param_groups(pl_module.net[0], weight_decay=self.lam, lr=0.05):
                optimizer.add_param_group(group)


def trainable(opt_cls: Any, **kw: Any) -> Callable[[Lit], torch.optim.Optimizer]:
    return lambda m: opt_cls([p for p in m.parameters() if p.requires_grad], foreach=False, **kw)


def trainable_groups(opt_cls: Any, lam: float, **kw: Any) -> Callable[[Lit], torch.optim.Optimizer]:
    return lambda m: opt_cls(decay_param_groups(m, weight_decay=lam), foreach=False, **kw)


@pytest.mark.parametrize(
    ("callback", "plain", "reference"),
    [
        (
            lambda: WeightPenalty(l2=0.3),
            trainable(torch.optim.SGD, lr=0.1, momentum=0.9),
            trainable_groups(torch.optim.SGD, 0.3, lr=0.1, momentum=0.9),
        ),
        (
            lambda: WeightDecay(0.3),
            trainable(torch.optim.Adam, lr=0.01),
            trainable_groups(torch.optim.AdamW, 0.3, lr=0.01),
        ),
    ],
    ids=["penalty", "decay"],
)
def test_params_unfrozen_by_base_finetuning_are_regularized_from_then_on(
    callback: Any, plain: Any, reference: Any
) -> None:
    got = run(Lit(plain), [UnfreezeAtEpochOne(), callback()], max_epochs=3)
    want = run(Lit(reference), [UnfreezeWithDecayGroups(0.3)], max_epochs=3)
    frozen_at_start = Lit(plain).net[0].weight.detach()
    assert torch.equal(got[STEPS_PER_EPOCH - 1]["net.0.weight"], frozen_at_start)  # frozen in epoch 0
    assert not torch.equal(got[-1]["net.0.weight"], frozen_at_start)
    assert_runs_equal(got, want, exact=True)


# ------------------------------------------------------------------------------------------ resume
def fit_with_ckpt(module: pl.LightningModule, callbacks: list[Callback], max_epochs: int, ckpt_path: Any = None):
    trainer = make_trainer(callbacks, max_epochs=max_epochs)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(
    ("make_callbacks", "optimizer"),
    [
        (lambda: [WeightDecay(Linear(0.5, 0.0, 3 * STEPS_PER_EPOCH))], adam()),
        (lambda: [WeightPenalty(l2=Cosine(0.5, 0.05, 3 * STEPS_PER_EPOCH), l1=0.01)], adam()),
        (lambda: [WeightPenalty(l2=0.5, reference="initial")], adam()),
        (
            lambda: [WeightDecay()],
            lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.3, foreach=False),
        ),
        (lambda: [WeightPenalty(l1=0.05, l1_mode="proximal")], sgd()),
    ],
    ids=["decay-linear", "penalty-cosine", "l2sp-initial", "take-over", "proximal"],
)
def test_resume_at_epoch_boundary_is_bitwise_uninterrupted(make_callbacks: Any, optimizer: Any, tmp_path: Path) -> None:
    full = Lit(optimizer)
    fit_with_ckpt(full, make_callbacks(), max_epochs=4)

    first = Lit(optimizer)
    trainer = fit_with_ckpt(first, make_callbacks(), max_epochs=2)
    ckpt = tmp_path / "epoch2.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = Lit(optimizer, seed=11)  # different weights at construction: the checkpoint must win
    callbacks = make_callbacks()
    fit_with_ckpt(resumed, callbacks, max_epochs=4, ckpt_path=ckpt)

    assert callbacks[0].state_dict()["steps"] == [4 * STEPS_PER_EPOCH]
    for name, w in weights(full).items():
        assert torch.equal(w, dict(resumed.named_parameters())[name].detach()), name


def test_resumed_l2sp_reference_is_the_original_fit_start_weights(tmp_path: Path) -> None:
    start = {d.name: d.param.detach().clone() for d in DecayRules().classify(Lit(adam())).decay}
    trainer = fit_with_ckpt(Lit(adam()), [WeightPenalty(l2=0.5, reference="initial")], max_epochs=1)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    cb = WeightPenalty(l2=0.5, reference="initial")
    fit_with_ckpt(Lit(adam(), seed=11), [cb], max_epochs=2, ckpt_path=tmp_path / "c.ckpt")
    refs = cb.state_dict()["refs"]
    assert set(refs) == set(start)
    for name, ref in refs.items():
        assert torch.equal(ref, start[name]), name


# -------------------------------------------------------------------------------------- DeepSpeed
class DeepSpeedStrategy(SingleDeviceStrategy):
    """A stand-in: deepspeed is not installed; the callbacks recognise DeepSpeed by the class name."""


@pytest.mark.parametrize("callback", [lambda: WeightDecay(0.1), lambda: WeightPenalty(l2=0.1)])
def test_deepspeed_refusal_with_stand_in_strategy_class(callback: Any) -> None:
    trainer = make_trainer([callback()], strategy=DeepSpeedStrategy(device=torch.device("cpu")))
    with pytest.raises(MisconfigurationException, match="DeepSpeedStrategy") as info:
        trainer.fit(Lit(adam()), loader())
    message = str(info.value)
    assert "DecayGroupsMixin" in message and "decay_param_groups" in message and "weight_decay" in message
