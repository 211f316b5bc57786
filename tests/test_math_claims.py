"""Each claim of ``docs/math.md`` and ``docs/choosing-lambda.md``, shown numerically.

The docs link to these tests by name; keep the names stable. Everything runs in float64 on tiny tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lightning_decay import kernels

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    """float64 for exact comparisons, restored afterwards so other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _problem(seed: int = 0, n: int = 32, d: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    return x, y, w


def _c0(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The unregularized cost C0: mean squared error of a linear model."""
    return 0.5 * ((x @ w - y) ** 2).mean()


def _grad(fn, w: torch.Tensor) -> torch.Tensor:
    w = w.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(w), w)
    return g


# ----------------------------------------------------------------------------- L2 and weight decay
def test_l2_penalty_gradient_is_lambda_over_n_times_w() -> None:
    """d/dw [λ/(2n) Σ w²] = (λ/n) w: the 1/2 cancels the 2 of the derivative."""
    _, _, w = _problem()
    lam, n = 0.3, 50
    g = _grad(lambda w: lam / (2 * n) * (w**2).sum(), w)
    torch.testing.assert_close(g, lam / n * w)


def test_sgd_with_l2_loss_term_is_weight_shrink() -> None:
    """SGD on C0 + λ/(2n)Σw² is w <- (1 - ηλ/n) w - η ∂C0/∂w, and torch SGD(weight_decay=λ/n) on C0."""
    x, y, w0 = _problem()
    eta, lam, n = 0.1, 0.5, len(x)

    w_loss = w0.clone().requires_grad_(True)
    opt = torch.optim.SGD([w_loss], lr=eta)
    w_shrink = w0.clone()
    w_torch = w0.clone().requires_grad_(True)
    opt_torch = torch.optim.SGD([w_torch], lr=eta, weight_decay=lam / n)
    for _ in range(5):
        opt.zero_grad()
        (_c0(w_loss, x, y) + lam / (2 * n) * (w_loss**2).sum()).backward()
        opt.step()

        w_shrink = (1 - eta * lam / n) * w_shrink - eta * _grad(lambda w: _c0(w, x, y), w_shrink)

        opt_torch.zero_grad()
        _c0(w_torch, x, y).backward()
        opt_torch.step()
    torch.testing.assert_close(w_loss.detach(), w_shrink)
    torch.testing.assert_close(w_torch.detach(), w_shrink)


def test_sgd_l2_equals_decoupled_decay_up_to_lr_scaling() -> None:
    """For plain SGD, coupled L2 with coefficient λ and decoupled decay w *= (1 - ηλ) are the same update."""
    x, y, w0 = _problem(1)
    eta, lam = 0.05, 0.2
    w_l2 = w0.clone().requires_grad_(True)
    opt_l2 = torch.optim.SGD([w_l2], lr=eta, weight_decay=lam)
    w_dec = w0.clone().requires_grad_(True)
    opt_dec = torch.optim.SGD([w_dec], lr=eta)
    for _ in range(10):
        opt_l2.zero_grad()
        _c0(w_l2, x, y).backward()
        opt_l2.step()

        opt_dec.zero_grad()
        _c0(w_dec, x, y).backward()
        with torch.no_grad():
            kernels.decay_([w_dec], 1 - eta * lam)  # what WeightDecay(lam) does before the step
        opt_dec.step()
    torch.testing.assert_close(w_l2.detach(), w_dec.detach())


def test_adam_l2_differs_from_adamw() -> None:
    """Adam(weight_decay=λ) is the L2 loss term inside Adam; AdamW(weight_decay=λ) is not the same update."""
    x, y, w0 = _problem(2)
    lr, lam = 0.01, 0.1

    def run(make_opt, add_l2_to_loss: bool = False) -> torch.Tensor:
        w = w0.clone().requires_grad_(True)
        opt = make_opt([w])
        for _ in range(20):
            opt.zero_grad()
            loss = _c0(w, x, y) + (lam / 2 * (w**2).sum() if add_l2_to_loss else 0.0)
            loss.backward()
            opt.step()
        return w.detach()

    adam_coupled = run(lambda p: torch.optim.Adam(p, lr=lr, weight_decay=lam))
    adam_loss_term = run(lambda p: torch.optim.Adam(p, lr=lr), add_l2_to_loss=True)
    adamw = run(lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=lam))
    torch.testing.assert_close(adam_coupled, adam_loss_term)  # coupled = a loss term
    assert (adam_coupled - adamw).abs().max() > 1e-4  # ... which AdamW is not


def test_adamw_is_adam_plus_decoupled_shrink() -> None:
    """AdamW = w *= (1 - lr·λ), then the plain Adam step (what WeightDecay(λ) does for Adam)."""
    x, y, w0 = _problem(3)
    lr, lam = 0.01, 0.1
    w_adamw = w0.clone().requires_grad_(True)
    opt_adamw = torch.optim.AdamW([w_adamw], lr=lr, weight_decay=lam)
    w_adam = w0.clone().requires_grad_(True)
    opt_adam = torch.optim.Adam([w_adam], lr=lr)
    for _ in range(20):
        for w, opt in ((w_adamw, opt_adamw), (w_adam, opt_adam)):
            opt.zero_grad()
            _c0(w, x, y).backward()
        kernels.decay_([w_adam], 1 - lr * lam)
        opt_adamw.step()
        opt_adam.step()
    torch.testing.assert_close(w_adamw.detach(), w_adam.detach())


def test_adam_l2_decay_is_rescaled_by_gradient_history() -> None:
    """Under Adam, L2's pull on a weight depends on its gradient scale; AdamW shrinks every weight alike.

    Two weights of equal value; C0 has gradient 0 for the first and 100 for the second. The extra
    movement caused by λ is compared with and without the regularizer.
    """
    lr, lam, steps = 1e-3, 1e-2, 10
    g0 = torch.tensor([0.0, 100.0])

    def final(opt_cls, wd: float) -> torch.Tensor:
        w = torch.ones(2, requires_grad=True)
        opt = opt_cls([w], lr=lr, weight_decay=wd)
        for _ in range(steps):
            opt.zero_grad()
            (g0 * w).sum().backward()
            opt.step()
        return w.detach()

    pull_adam = final(torch.optim.Adam, 0.0) - final(torch.optim.Adam, lam)
    pull_adamw = final(torch.optim.AdamW, 0.0) - final(torch.optim.AdamW, lam)
    # Adam+L2: the weight without data gradient is pulled about lr per step (100x more than lr·λ·w),
    # the one with a large gradient hardly at all: the decay is divided by sqrt(v).
    assert pull_adam[0] > 50 * pull_adam[1]
    assert pull_adam[0] > 10 * steps * lr * lam
    # AdamW: the same shrink of about steps·lr·λ·w for both weights (w of the second drifts by lr per step).
    torch.testing.assert_close(pull_adamw[0], pull_adamw[1], rtol=1e-2, atol=0)
    torch.testing.assert_close(pull_adamw[0], torch.tensor(1 - (1 - lr * lam) ** steps), rtol=1e-2, atol=0)


def test_adamw_timescale_tau_is_one_over_lr_lambda() -> None:
    """With no data gradient, AdamW shrinks w by (1 - ηλ) per step: after τ = 1/(ηλ) steps, w ≈ w0/e."""
    lr, lam = 1e-3, 0.1
    tau = round(1 / (lr * lam))
    w = torch.ones(3, requires_grad=True)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=lam)
    for _ in range(tau):
        opt.zero_grad()
        w.grad = torch.zeros_like(w)
        opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), math.exp(-1)), rtol=1e-3, atol=0)


def test_timescale_rule_across_dataset_sizes() -> None:
    """τ_epoch = τ_iter·B/N = B/(ηλN): 4x the data at the same B and η needs λ/4 to keep τ_epoch."""

    def tau_epoch(lr: float, lam: float, batch: int, n: int) -> float:
        return (1 / (lr * lam)) * batch / n

    base = tau_epoch(1e-3, 0.1, 256, 50_000)
    assert base == pytest.approx(51.2)
    assert tau_epoch(1e-3, 0.1 / 4, 256, 200_000) == pytest.approx(base)
    assert tau_epoch(1e-3, 0.1, 256, 200_000) == pytest.approx(base / 4)  # same λ: 4x shorter memory in epochs


# ------------------------------------------------------------------------------ conventions
def test_keras_l2_has_no_half_factor() -> None:
    """Keras L2(k) adds k·Σw² (gradient 2k·w): torch weight_decay = 2k. The tutorial's λ/(2n)Σw² is λ/n."""
    x, y, w0 = _problem(4)
    k, lr = 0.01, 0.1
    w_keras = w0.clone().requires_grad_(True)
    opt_keras = torch.optim.SGD([w_keras], lr=lr)
    w_torch = w0.clone().requires_grad_(True)
    opt_torch = torch.optim.SGD([w_torch], lr=lr, weight_decay=2 * k)
    for _ in range(5):
        opt_keras.zero_grad()
        (_c0(w_keras, x, y) + k * (w_keras**2).sum()).backward()
        opt_keras.step()
        opt_torch.zero_grad()
        _c0(w_torch, x, y).backward()
        opt_torch.step()
    torch.testing.assert_close(w_keras.detach(), w_torch.detach())


def test_weight_penalty_l2_is_torch_weight_decay_and_tutorial_lambda_over_n() -> None:
    """WeightPenalty(l2=λ/n) with SGD == torch SGD(weight_decay=λ/n) on the decay group == the tutorial's update.

    Biases are not regularized (the tutorial's rule): they move exactly as without any penalty.
    """
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_decay import WeightPenalty, decay_param_groups

    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    lam, n, eta = 2.0, 16, 0.1

    class Model(LightningModule):
        def __init__(self, opt_factory) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.net = nn.Linear(4, 1)
            self.opt_factory = opt_factory

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return 0.5 * ((self.net(xb) - yb) ** 2).mean()

        def configure_optimizers(self):
            return self.opt_factory(self)

    def fit(model: LightningModule, callbacks: list) -> nn.Linear:
        Trainer(
            max_steps=3,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            accelerator="cpu",
        ).fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
        return model.net

    plain = fit(Model(lambda m: torch.optim.SGD(m.parameters(), lr=eta)), [])
    penalized = fit(Model(lambda m: torch.optim.SGD(m.parameters(), lr=eta)), [WeightPenalty(l2=lam / n)])
    torch_wd = fit(Model(lambda m: torch.optim.SGD(decay_param_groups(m, weight_decay=lam / n), lr=eta)), [])

    # the tutorial, by hand: w <- (1 - ηλ/n) w - η ∂C0/∂w, b <- b - η ∂C0/∂b
    torch.manual_seed(1)
    ref = nn.Linear(4, 1)
    for _ in range(3):
        ref.zero_grad()
        (0.5 * ((ref(x) - y) ** 2).mean()).backward()
        with torch.no_grad():
            ref.weight.mul_(1 - eta * lam / n).sub_(eta * ref.weight.grad)
            ref.bias.sub_(eta * ref.bias.grad)

    torch.testing.assert_close(penalized.weight, ref.weight)
    torch.testing.assert_close(torch_wd.weight, ref.weight)
    torch.testing.assert_close(penalized.bias, ref.bias)
    assert not torch.allclose(plain.weight, ref.weight)


# ----------------------------------------------------------------------- what not to decay
def test_affine_input_jacobian_does_not_depend_on_bias() -> None:
    """d(Wx + b)/dx = W for every b: the bias adds no curvature (input sensitivity) to the model."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(4)
    jac = torch.autograd.functional.jacobian(layer, x)
    with torch.no_grad():
        layer.bias.mul_(100.0).add_(7.0)
    jac_big_bias = torch.autograd.functional.jacobian(layer, x)
    torch.testing.assert_close(jac, layer.weight.detach())
    torch.testing.assert_close(jac_big_bias, jac)


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
def test_weight_before_normalization_is_scale_invariant(norm: str) -> None:
    """Linear -> LayerNorm/BatchNorm: scaling W by c leaves the output unchanged and scales ∂L/∂W by 1/c.

    So decay cannot shrink what the layer computes; it only raises the effective learning rate
    (the angular step of W grows as 1/|W|²).
    """
    torch.manual_seed(0)
    c = 5.0
    x = torch.randn(8, 6)
    linear = nn.Linear(6, 4, bias=norm == "batchnorm")  # BatchNorm also removes a constant shift
    normalization = nn.LayerNorm(4, eps=1e-12) if norm == "layernorm" else nn.BatchNorm1d(4, eps=1e-12)
    head = nn.Linear(4, 1)

    def loss_and_grad(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        w = (linear.weight.detach() * scale).requires_grad_(True)
        b = None if linear.bias is None else linear.bias.detach() * scale
        out = head(normalization(nn.functional.linear(x, w, b)))
        loss = (out**2).mean()
        (g,) = torch.autograd.grad(loss, w)
        return loss.detach(), g

    loss_1, grad_1 = loss_and_grad(1.0)
    loss_c, grad_c = loss_and_grad(c)
    torch.testing.assert_close(loss_c, loss_1)
    torch.testing.assert_close(grad_c, grad_1 / c)
    # the gradient is orthogonal to W (no radial component), so only decay changes |W|
    assert abs(float((grad_1 * linear.weight).sum())) < 1e-10


def test_angular_update_equilibrium_is_sqrt_2_lr_wd() -> None:
    """SGD + decay on a scale-invariant weight: the angle per step settles at sqrt(2ηλ) (Kosson et al.)."""
    g = torch.Generator().manual_seed(0)
    eta, lam, d = 0.1, 0.01, 2000
    w = torch.randn(d, generator=g) * 3.0  # start far from the equilibrium norm
    angles = []
    for step in range(6000):
        r = torch.randn(d, generator=g)
        grad = r - (r @ w) / (w @ w) * w  # scale invariance: gradient orthogonal to w ...
        grad = grad / grad.norm() / w.norm()  # ... and of size 1/|w|
        new = (1 - eta * lam) * w - eta * grad
        if step >= 5000:
            angles.append(math.acos(float((new @ w) / (new.norm() * w.norm()))))
        w = new
    assert sum(angles) / len(angles) == pytest.approx(math.sqrt(2 * eta * lam), rel=0.03)


# ------------------------------------------------------------------------------- L1 and norms
def test_proximal_l1_gives_exact_zeros_subgradient_does_not() -> None:
    """Minimize ½|w - a|² + μ|w|₁ with |a_i| < μ for half the entries: proximal steps reach exact zeros."""
    a = torch.tensor([2.0, -1.5, 0.3, -0.2, 0.05, -0.4])
    mu, lr = 0.5, 0.1
    w_prox = torch.zeros(6) + 1.0
    w_sub = w_prox.clone()
    for _ in range(500):
        # proximal gradient: a gradient step on the smooth part, then soft-thresholding
        w_prox = w_prox - lr * (w_prox - a)
        kernels.soft_threshold_([w_prox], lr * mu)
        # subgradient: add μ·sign(w) to the gradient
        grad = w_sub - a
        kernels.add_l1_subgradient_([grad], [w_sub], mu)
        w_sub = w_sub - lr * grad
    expected = torch.sign(a) * (a.abs() - mu).clamp_min(0)  # the exact minimizer (soft-threshold of a)
    torch.testing.assert_close(w_prox, expected)
    assert int((w_prox == 0).sum()) == 4
    assert int((w_sub == 0).sum()) == 0  # oscillates around 0 instead
    assert w_sub[2:].abs().max() <= lr * (mu + a[2:].abs().max())  # ... within about one step of it


def test_unsquared_norm_penalty_gradient_is_normalized() -> None:
    """λ·torch.norm(w, 2) has gradient λ·w/|w| (constant size λ), not λ·w: it is not L2 / weight decay."""
    _, _, w = _problem(5)
    lam = 0.1
    g_unsquared = _grad(lambda w: lam * torch.norm(w, 2), w)
    g_squared = _grad(lambda w: lam / 2 * w.pow(2).sum(), w)
    torch.testing.assert_close(g_unsquared, lam * w / w.norm())
    torch.testing.assert_close(g_squared, lam * w)
    torch.testing.assert_close(g_unsquared.norm(), torch.tensor(lam))


def test_l2_sp_pulls_toward_the_reference() -> None:
    """L2-SP: alpha/2·|w - w0|² has gradient alpha·(w - w0); with no data gradient SGD converges to w0, not to 0."""
    torch.manual_seed(0)
    w0 = torch.randn(5)
    w = torch.randn(5)
    start = w.clone()
    alpha, lr, steps = 0.5, 0.1, 50
    g = _grad(lambda v: alpha / 2 * (v - w0).pow(2).sum(), w)
    torch.testing.assert_close(g, alpha * (w - w0))
    for _ in range(steps):
        grad = torch.zeros(5)
        kernels.add_l2_gradient_([grad], [w], alpha, [w0])
        w = w - lr * grad
    torch.testing.assert_close(w - w0, (1 - lr * alpha) ** steps * (start - w0))
