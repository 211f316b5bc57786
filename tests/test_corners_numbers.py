"""Numeric corners (issue 18, items 1-6): low-precision factors, lr_ratio above the initial lr, tensor lrs,
taken-over and CLI ``weight_decay`` values that are not finite, complex parameters.

Every test runs the public API (``WeightDecay``, ``WeightPenalty``, ``WeightNormMonitor``, ``attach``,
``Trainer.fit``, ``DecayLightningCLI``, ``decay_param_groups``) and asserts the weights against an
independent reference: torch's own optimizer on the same tensors, or the factor computed by hand.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_decay import (
    DecayLightningCLI,
    WeightDecay,
    WeightNormMonitor,
    WeightPenalty,
    decay_param_groups,
    kernels,
)
from tests.cli_app import PlainModel, RegressionData, build_net

N, BATCH = 32, 8


def make_net(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def dataset(seed: int = 1) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())


class Lit(pl.LightningModule):
    """A small regression model whose optimizer (and scheduler) ``make_opt`` builds; ``zero_data`` makes the
    data gradients exactly zero, so an SGD step leaves the weights alone and only the decay moves them."""

    def __init__(self, make_opt: Callable[[nn.Module], Any], zero_data: bool = False) -> None:
        super().__init__()
        self.net = make_net()
        self.make_opt = make_opt
        self.zero_data = zero_data

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.net(x.to(self.dtype))
        if self.zero_data:
            return (out * 0).sum()
        return nn.functional.mse_loss(out.float(), y.float())

    def configure_optimizers(self) -> Any:
        return self.make_opt(self.net)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset(), batch_size=BATCH)


def fit(module: pl.LightningModule, callbacks: list[Any], **kw: Any) -> pl.Trainer:
    trainer = pl.Trainer(
        **{
            "max_epochs": 2,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": callbacks,
            **kw,
        }
    )
    trainer.fit(module)
    return trainer


def weights(module: Lit) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.net.named_parameters()}


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), name


# ------------------------------------------------------------------------------- 1. low precision
LOW = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("factor", [1 - 0.1 * 0.1, 1 - 0.1 * 0.03, 1 - 1e-3 * 0.05])
def test_decay_kernel_is_adamws_single_tensor_multiply(dtype: torch.dtype, factor: float) -> None:
    """``kernels.decay_`` gives ``param.mul_(1 - lr * wd)``, the op of AdamW's single-tensor path (its CPU
    default), not the foreach scalar multiply that rounds the factor to the weights' dtype first; for every
    dtype, since on CPU the factor goes in as a 0-dim tensor of the multiply's compute type."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(1000, generator=g).to(dtype), torch.randn(7, 5, generator=g).to(dtype)]
    got = [w.clone() for w in ws]
    kernels.decay_(got, factor)
    for x, w in zip(got, ws, strict=True):
        assert torch.equal(x, w.clone().mul_(factor))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_penalty_kernels_with_a_float_coefficient_are_sgds_single_tensor_ops(dtype: torch.dtype) -> None:
    """The other kernels with a Python-float coefficient, against the op torch's SGD runs on each tensor
    (``grad.add(param, alpha=weight_decay)``): foreach ``add`` keeps ``alpha`` unrounded, for both dtypes."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(1000, generator=g).to(dtype), torch.randn(7, 5, generator=g).to(dtype)]
    grads = [(torch.randn(w.shape, generator=g) * 1e-2).to(dtype) for w in ws]
    for c in (0.1, 0.013, 3e-4):
        got = [x.clone() for x in grads]
        kernels.add_l2_gradient_(got, ws, c)
        assert all(torch.equal(x, gr.add(w, alpha=c)) for x, gr, w in zip(got, grads, ws, strict=True))
        got = [x.clone() for x in grads]
        kernels.add_l1_subgradient_(got, ws, c)
        assert all(torch.equal(x, gr.add(w.sign(), alpha=c)) for x, gr, w in zip(got, grads, ws, strict=True))


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
@pytest.mark.parametrize("lam", [0.1, 0.03])
def test_low_precision_weight_decay_is_bitwise_adamw_in_a_fit(precision: str, lam: float) -> None:
    """Adam + WeightDecay == AdamW on decay / no-decay groups, with lr * wd large enough to show in bf16."""
    lr = 0.1
    got = Lit(lambda net: torch.optim.Adam(net.parameters(), lr=lr))
    fit(got, [WeightDecay(lam)], precision=precision)
    want = Lit(lambda net: torch.optim.AdamW(decay_param_groups(net, lam), lr=lr))
    fit(want, [], precision=precision)
    plain = Lit(lambda net: torch.optim.Adam(net.parameters(), lr=lr))
    fit(plain, [], precision=precision)
    assert got.net[0].weight.dtype == LOW[precision]
    assert not torch.equal(got.net[0].weight, plain.net[0].weight)  # the decay shows in this dtype
    assert_bitwise(weights(got), weights(want))


def plain_loop(net: nn.Module, opt: torch.optim.Optimizer, steps: int, dtype: torch.dtype) -> None:
    for x, y in list(torch.utils.data.DataLoader(dataset(), batch_size=BATCH))[:steps]:
        opt.zero_grad()
        nn.functional.mse_loss(net(x.to(dtype)).float(), y).backward()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_attach_weight_decay_is_bitwise_adamw(dtype: torch.dtype) -> None:
    lr, lam = 0.1, 0.1
    got, want = make_net().to(dtype), make_net().to(dtype)
    opt = torch.optim.Adam(got.parameters(), lr=lr)
    WeightDecay(lam).attach(got, opt)
    plain_loop(got, opt, 4, dtype)
    plain_loop(want, torch.optim.AdamW(decay_param_groups(want, lam), lr=lr), 4, dtype)
    assert_bitwise(dict(got.named_parameters()), dict(want.named_parameters()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_l2_penalty_is_bitwise_sgd_weight_decay(dtype: torch.dtype) -> None:
    lr, lam = 0.1, 0.3
    got = Lit(lambda net: torch.optim.SGD(net.parameters(), lr=lr))
    fit(got, [WeightPenalty(l2=lam)], precision={torch.bfloat16: "bf16-true", torch.float16: "16-true"}[dtype])
    want = Lit(lambda net: torch.optim.SGD(decay_param_groups(net, lam), lr=lr))
    fit(want, [], precision={torch.bfloat16: "bf16-true", torch.float16: "16-true"}[dtype])
    assert_bitwise(weights(got), weights(want))
    a, b = make_net().to(dtype), make_net().to(dtype)
    opt = torch.optim.SGD(a.parameters(), lr=lr)
    WeightPenalty(l2=lam).attach(a, opt)
    plain_loop(a, opt, 4, dtype)
    plain_loop(b, torch.optim.SGD(decay_param_groups(b, lam), lr=lr), 4, dtype)
    assert_bitwise(dict(a.named_parameters()), dict(b.named_parameters()))


# ---------------------------------------------------------------------------- 2. lr_ratio above 1
def one_cycle(net: nn.Module, max_lr: float, total: int) -> Any:
    opt = torch.optim.SGD(decay_param_groups(net, 0.0), lr=max_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_lr_ratio_under_one_cycle_decays_by_the_lr_ratio_and_warns_once() -> None:
    """OneCycleLR starts at max_lr / 25: lr_ratio shrinks by (lr / initial_lr) * wd, up to 25 * wd at the
    peak. The factors are computed by hand from the scheduler's own lr sequence (zero data gradients)."""
    max_lr, lam, steps = 0.1, 0.03, 8
    module = Lit(lambda net: one_cycle(net, max_lr, steps), zero_data=True)
    before = weights(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, [WeightDecay(lam, mode="lr_ratio")], max_steps=steps)
    # The same schedule on its own: the lr of each step, and the initial lr it sets.
    ref = one_cycle(make_net(), max_lr, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(ref["optimizer"].param_groups[0]["lr"])
        ref["optimizer"].step()
        ref["lr_scheduler"]["scheduler"].step()
    lr0 = ref["optimizer"].param_groups[0]["initial_lr"]
    assert lr0 == pytest.approx(max_lr / 25)
    expected = before["0.weight"].clone()
    for lr in lrs:
        expected.mul_(1.0 - lr / lr0 * lam)
    after = weights(module)
    assert torch.equal(after["0.weight"], expected)
    assert torch.equal(after["0.bias"], before["0.bias"])  # no_decay
    shrink = 1 - (after["2.weight"] / before["2.weight"]).pow(1 / steps).mean()
    assert shrink > 2 * lam  # well above wd per step: what the warning is about
    said = [str(w.message) for w in caught if "lr_ratio" in str(w.message)]
    assert len(said) == 1  # once, though every step from the second is above the initial lr
    first = next(lr for lr in lrs if lr / lr0 * lam > lam)
    assert "'decay'" in said[0] and f"{first / lr0:.4g} x its initial lr" in said[0]


def test_lr_ratio_at_or_below_the_initial_lr_does_not_warn() -> None:
    module = Lit(
        lambda net: {
            "optimizer": (o := torch.optim.SGD(decay_param_groups(net, 0.0), lr=0.1)),
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(o, 1, 0.5), "interval": "step"},
        },
        zero_data=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, [WeightDecay(0.03, mode="lr_ratio")], max_steps=4)
    assert not [w for w in caught if "lr_ratio" in str(w.message)]


# --------------------------------------------------------------------------------- 3. tensor lr
def test_tensor_lr_with_a_factor_at_or_below_zero_is_refused_before_it_is_applied() -> None:
    net = make_net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.Adam(net.parameters(), lr=torch.tensor(0.5))
    WeightDecay(4.0).attach(net, opt)
    nn.functional.mse_loss(net(dataset()[:8][0]), dataset()[:8][1]).backward()
    with pytest.raises(ValueError, match=r"lr 0\.5 and weight_decay 4\.0 gives the factor 1 - 2\.0 <= 0"):
        opt.step()
    assert_bitwise({n: p.detach() for n, p in net.named_parameters()}, before)


def test_tensor_lr_changed_in_place_is_checked_again_and_valid_ones_match_adamw() -> None:
    """A valid tensor lr gives AdamW's weights; once set (in place, as a scheduler does) to a value whose
    factor is <= 0, the next step is refused and leaves the weights as they were."""
    lam = 0.1
    got, want = make_net(), make_net()
    opt = torch.optim.Adam(got.parameters(), lr=torch.tensor(0.05))
    WeightDecay(lam).attach(got, opt)
    plain_loop(got, opt, 3, torch.float32)
    plain_loop(want, torch.optim.AdamW(decay_param_groups(want, lam), lr=torch.tensor(0.05)), 3, torch.float32)
    assert_bitwise(dict(got.named_parameters()), dict(want.named_parameters()))
    opt.param_groups[0]["lr"].fill_(20.0)
    before = {n: p.detach().clone() for n, p in got.named_parameters()}
    with pytest.raises(ValueError, match=r"lr 20\.0 and weight_decay 0\.1"):
        plain_loop(got, opt, 1, torch.float32)
    assert_bitwise({n: p.detach() for n, p in got.named_parameters()}, before)


def test_constant_tensor_lr_with_a_growing_coefficient_is_refused_at_the_step_it_flips() -> None:
    """The same tensor lr (never changed) with a schedule: shrink 0.25, 0.75, then 1.25 at step 2, refused."""
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=torch.tensor(0.5))
    WeightDecay(lambda step: 0.5 + step).attach(net, opt)
    plain_loop(net, opt, 2, torch.float32)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with pytest.raises(ValueError, match=r"at step 2: .* weight_decay 2\.5 gives the factor 1 - 1\.25"):
        plain_loop(net, opt, 1, torch.float32)
    assert_bitwise({n: p.detach() for n, p in net.named_parameters()}, before)


# ----------------------------------------------------------------------------- 4. taken-over nan/inf
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_taken_over_weight_decay_that_is_not_finite_is_refused(bad: float) -> None:
    module = Lit(lambda net: torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=bad))
    before = weights(module)
    with pytest.raises(ValueError, match=r"weight_decay of SGD param group 0 \(taken over\)`? must be a finite"):
        fit(module, [WeightDecay()])
    assert_bitwise(weights(module), before)
    net = make_net()
    with pytest.raises(ValueError, match="must be a finite number"):
        WeightDecay().attach(net, torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=bad))


TRAINER = """
trainer:
  max_epochs: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
"""


def run_cli(cli_class: type[LightningCLI], tmp_path: Path, yaml: str) -> LightningCLI:
    config = tmp_path / "config.yaml"
    config.write_text(TRAINER.format(root=tmp_path) + yaml)
    return cli_class(
        PlainModel, RegressionData, args=["fit", "--config", str(config)], save_config_kwargs={"overwrite": True}
    )


@pytest.mark.parametrize("bad", [".inf", ".nan"])
def test_taken_over_weight_decay_from_yaml_is_refused(bad: str, tmp_path: Path) -> None:
    yaml = f"""
  callbacks:
    - class_path: lightning_decay.WeightDecay
optimizer:
  class_path: torch.optim.SGD
  init_args: {{lr: 0.1, weight_decay: {bad}}}
"""
    with pytest.raises(ValueError, match=r"weight_decay of SGD param group 0 \(taken over\)"):
        run_cli(LightningCLI, tmp_path, yaml)


# ------------------------------------------------------------------------- 5. the CLI's optimizer
@pytest.mark.parametrize(
    ("optimizer", "value", "match"),
    [
        ("AdamW", ".nan", "must be a finite number"),
        ("AdamW", ".inf", "must be a finite number"),
        ("SGD", ".inf", "must be a finite number"),
        ("AdamW", "-0.1", "must be a finite number >= 0"),
        ("AdamW", "20", r"1 - lr \* weight_decay = -1 <= 0"),
    ],
)
def test_cli_automatic_optimizer_weight_decay_is_checked(
    optimizer: str, value: str, match: str, tmp_path: Path
) -> None:
    yaml = f"""
optimizer:
  class_path: torch.optim.{optimizer}
  init_args: {{lr: 0.1, weight_decay: {value}}}
"""
    with pytest.raises(ValueError, match=rf"`optimizer\.init_args\.weight_decay`.*{match}"):
        run_cli(DecayLightningCLI, tmp_path, yaml)


def test_cli_coupled_weight_decay_of_20_trains_as_sgd_does(tmp_path: Path) -> None:
    """20 with lr 0.1 is refused only where the decay is decoupled: SGD's L2 term is a gradient."""
    yaml = """
optimizer:
  class_path: torch.optim.SGD
  init_args: {lr: 0.01, weight_decay: 2}
"""
    cli = run_cli(DecayLightningCLI, tmp_path, yaml)
    ref = cli_reference(2.0, 0.01)
    for (name, a), b in zip(cli.model.net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def cli_reference(lam: float, lr: float) -> nn.Module:
    net = build_net()
    opt = torch.optim.SGD(decay_param_groups(net, lam), lr=lr)
    for x, y in RegressionData().train_dataloader():
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return net


# ------------------------------------------------------------------------------------ 6. complex
class ComplexNet(nn.Module):
    """One complex weight (decayed), one complex bias (not decayed); a real loss."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.weight = nn.Parameter(torch.randn(4, 6, dtype=torch.cfloat) * 0.3)
            self.bias = nn.Parameter(torch.randn(6, dtype=torch.cfloat))
            self.weight.data[0, :3] = torch.tensor([1e-3, -1e-3j, 0.0])  # entries the prox sets to zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.cfloat) @ self.weight + self.bias).abs().pow(2).mean()


def complex_batches(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 4, generator=g) for _ in range(steps)]


def complex_loop(net: ComplexNet, opt: torch.optim.Optimizer, penalty: Callable[[ComplexNet], Any] | None) -> None:
    for x in complex_batches(4):
        opt.zero_grad()
        loss = net(x)
        (loss if penalty is None else loss + penalty(net)).backward()
        opt.step()


@pytest.mark.parametrize(
    ("callback", "explicit"),
    [
        (lambda: WeightPenalty(l1=0.05), lambda net: 0.05 * net.weight.abs().sum()),
        (lambda: WeightPenalty(l2=0.3), lambda net: 0.3 / 2 * net.weight.abs().pow(2).sum()),
    ],
)
def test_complex_penalty_gradient_is_autograd_of_the_explicit_penalty(callback: Any, explicit: Any) -> None:
    """L1: ``sgn(w)``, the gradient autograd gives ``|w|`` on complex entries; L2: ``w``."""
    got, want = ComplexNet(), ComplexNet()
    opt = torch.optim.SGD(got.parameters(), lr=0.1)
    callback().attach(got, opt)
    complex_loop(got, opt, None)
    complex_loop(want, torch.optim.SGD(want.parameters(), lr=0.1), explicit)
    # The same terms, summed in another order (g + c * sgn(w) against autograd's accumulation): float rounding.
    for a, b in zip(got.parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_complex_proximal_l1_shrinks_the_modulus_and_keeps_the_phase() -> None:
    lr, l1 = 0.1, 0.2
    got, want = ComplexNet(), ComplexNet()
    opt = torch.optim.SGD(got.parameters(), lr=lr)
    WeightPenalty(l1=l1, l1_mode="proximal").attach(got, opt)
    complex_loop(got, opt, None)
    ref_opt = torch.optim.SGD(want.parameters(), lr=lr)
    for x in complex_batches(4):
        ref_opt.zero_grad()
        want(x).backward()
        ref_opt.step()
        with torch.no_grad():  # the proximal step of lr * l1 * sum |w|, by hand: sgn(w) * max(|w| - t, 0)
            w = want.weight
            w.copy_(torch.sgn(w) * torch.clamp(w.abs() - lr * l1, min=0))
    assert torch.equal(got.weight, want.weight)
    assert torch.equal(got.bias, want.bias)
    assert (got.weight == 0).sum() >= 3


class ComplexLit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = ComplexNet()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(complex_batches(4))), BATCH)


def logged_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_complex_logging_l2_penalty_and_monitor_norms_from_the_weights(tmp_path: Path) -> None:
    """The values logged at the last step, recomputed from the final weights: ``sum |w|^2``, the fraction of
    exact zeros, and the angle of the last step (norms of ``view_as_real``, the real vector of entries)."""
    l2 = 0.3
    module = ComplexLit()

    class LastStep(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            self.before = pl_module.net.weight.detach().clone()

    last = LastStep()
    monitor = WeightNormMonitor(log_angular_update=True, log_sparsity=True)
    logger = CSVLogger(tmp_path, name="run")
    penalty = WeightPenalty(l1=0.2, l1_mode="proximal", l2=l2)  # the prox makes exact zeros to count
    fit(module, [penalty, monitor, last], max_epochs=1, logger=logger, log_every_n_steps=1)
    rows = logged_rows(logger)
    last_step = max(int(r["step"]) for r in rows)
    row = {k: v for r in rows if int(r["step"]) == last_step for k, v in r.items() if v}  # one row per logger call
    w = module.net.weight.detach()
    assert float(row["penalty/l2"]) == pytest.approx(l2 / 2 * float(w.abs().pow(2).sum()), rel=1e-5)
    key = "sparsity/net.weight"
    assert float(row[key]) == (w == 0).sum().item() / w.numel() > 0
    a, b = torch.view_as_real(last.before).double().flatten(), torch.view_as_real(w).double().flatten()
    angle = math.acos(min(1.0, float(a @ b / (a.norm() * b.norm()))))
    key = "angular_update/net.weight"
    assert float(row[key]) == pytest.approx(angle, rel=1e-3, abs=1e-6)
    key = "weight_norm/net.weight"
    assert float(row[key]) == pytest.approx(float(w.abs().pow(2).sum().sqrt()), rel=1e-6)
