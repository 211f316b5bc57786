"""``WeightDecay(cautious=True)`` through a real ``Trainer.fit`` (and ``attach``), against the paper by hand.

Cautious weight decay (Chen et al., arXiv 2510.12402): ``x <- x - lr * (u + wd * 1[u * x >= 0] * x)``.
The reference is a plain torch loop that, before each step, computes ``u`` itself from the optimizer's
state and this step's gradient with the optimizer's own update formula (Adam's ``m_hat / (sqrt(v_hat) +
eps)``, SGD's momentum buffer...), decays ``x[u * x >= 0] *= 1 - lr * wd`` on the decayed weights, then
steps torch's optimizer with ``weight_decay=0``. Each run is also shown to differ from plain decay.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_decay import WeightDecay, attach, register_direction
from lightning_decay.directions import Direction
from tests.test_penalty import Lit, assert_runs_equal, decayed, loader, run, weights

LR, WD = 0.01, 0.5  # a large wd, so that the decay shows against the tiny model's updates


# ------------------------------------------------------------------------- the paper's u, by hand
def adam_u(opt: torch.optim.Optimizer, p: Tensor) -> Tensor:
    """Adam's update ``m_hat / (sqrt(v_hat) + eps)`` (amsgrad: the max of ``v``), as this step computes it."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    (b1, b2), eps, g = group["betas"], group["eps"], p.grad
    state = opt.state.get(p, {})
    step = float(state["step"]) + 1 if state else 1.0
    m = state["exp_avg"] * b1 + (1 - b1) * g if state else (1 - b1) * g
    v = state["exp_avg_sq"] * b2 + (1 - b2) * g * g if state else (1 - b2) * g * g
    if group["amsgrad"] and state:
        v = torch.maximum(state["max_exp_avg_sq"], v)
    return (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)


def sgd_u(opt: torch.optim.Optimizer, p: Tensor) -> Tensor:
    group, g = opt.param_groups[0], p.grad
    if not group["momentum"]:
        return g
    buf = opt.state.get(p, {}).get("momentum_buffer")
    buf = g.clone() if buf is None else group["momentum"] * buf + (1 - group["dampening"]) * g
    return g + group["momentum"] * buf if group["nesterov"] else buf


def rmsprop_u(opt: torch.optim.Optimizer, p: Tensor) -> Tensor:
    group, g = opt.param_groups[0], p.grad
    state = opt.state.get(p, {})
    v = state["square_avg"] * group["alpha"] + (1 - group["alpha"]) * g * g if state else (1 - group["alpha"]) * g * g
    return g / (v.sqrt() + group["eps"])


def _group_state(opt: torch.optim.Optimizer, p: Tensor) -> tuple[dict[str, Any], dict[str, Any], Tensor]:
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    return group, opt.state.get(p, {}), p.grad.double()  # type: ignore[union-attr]


def _new_moment(state: dict[str, Any], key: str, g: Tensor, beta: float, square: bool = False) -> Tensor:
    """``beta * state[key] + (1 - beta) * g`` (``g * g`` if ``square``), from zeros before a first step (float64)."""
    old = state[key].double() if key in state else torch.zeros_like(g)
    return old * beta + (1 - beta) * (g * g if square else g)


def radam_u(opt: torch.optim.Optimizer, p: Tensor) -> Tensor:
    """RAdam: ``m_hat`` while ``rho_t <= 5``, then ``m_hat * rect / (sqrt(v_hat) + eps)`` (the paper's update)."""
    group, state, g = _group_state(opt, p)
    (b1, b2), eps = group["betas"], group["eps"]
    step = float(state["step"]) + 1 if state else 1.0
    m, v = _new_moment(state, "exp_avg", g, b1), _new_moment(state, "exp_avg_sq", g, b2, square=True)
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * step * b2**step / bc2
    if rho_t <= 5:
        return m / bc1
    rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
    return m / bc1 * rect * bc2**0.5 / (v.sqrt() + eps)


def adamax_u(opt: torch.optim.Optimizer, p: Tensor) -> Tensor:
    group, state, g = _group_state(opt, p)
    (b1, b2), eps = group["betas"], group["eps"]
    step = float(state["step"]) + 1 if state else 1.0
    old_inf = state["exp_inf"].double() if state else torch.zeros_like(g)
    return _new_moment(state, "exp_avg", g, b1) / (1 - b1**step) / torch.maximum(old_inf * b2, g.abs() + eps)


def adagrad_u(opt: torch.optim.Optimizer, p: Tensor) -> Tensor:
    group, state, g = _group_state(opt, p)  # Adagrad creates its state (the sum) when it is built
    return g / ((state["sum"].double() + g * g).sqrt() + group["eps"])


def adadelta_u(opt: torch.optim.Optimizer, p: Tensor) -> Tensor:
    group, state, g = _group_state(opt, p)
    rho, eps = group["rho"], group["eps"]
    square = _new_moment(state, "square_avg", g, rho, square=True)
    acc = state["acc_delta"].double() if state else torch.zeros_like(g)
    return (acc + eps).sqrt() / (square + eps).sqrt() * g


def centered_rmsprop_u(opt: torch.optim.Optimizer, p: Tensor) -> Tensor:
    group, state, g = _group_state(opt, p)
    alpha = group["alpha"]
    v = _new_moment(state, "square_avg", g, alpha, square=True)
    mean = _new_moment(state, "grad_avg", g, alpha)
    return g / ((v - mean * mean).sqrt() + group["eps"])


class SignMomentum(torch.optim.Optimizer):
    """A custom optimizer (Lion-like sign of momentum): no known direction, so the update is measured."""

    def __init__(self, params: Any, lr: float = LR, beta: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": 0.0})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                m.mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                p.add_(m.sign(), alpha=-group["lr"])
        return loss


def sign_momentum_u(opt: torch.optim.Optimizer, p: Tensor) -> Tensor:
    beta = opt.param_groups[0]["beta"]
    m = opt.state.get(p, {}).get("m", torch.zeros_like(p))
    return (m * beta + (1 - beta) * p.grad).sign()


def cautious_by_hand(u_of: Callable[[torch.optim.Optimizer, Tensor], Tensor], factor_of: Callable[..., float]) -> Any:
    """``before_step`` of the reference loop: ``x[u * x >= 0] *= factor`` on the decayed weights."""

    def before_step(module: nn.Module, opt: torch.optim.Optimizer) -> None:
        for p in decayed(module):
            if p.grad is not None:
                mask = u_of(opt, p) * p >= 0
                p.copy_(torch.where(mask, p * factor_of(opt), p))

    return before_step


def lr_factor(opt: torch.optim.Optimizer) -> float:
    return 1 - opt.param_groups[0]["lr"] * WD


def reference_loop(
    optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    before_step: Any,
    epochs: int = 2,
    accumulate: int = 1,
    clip_value: float | None = None,
    at_epoch: Callable[[int, nn.Module, torch.optim.Optimizer], torch.optim.Optimizer] | None = None,
) -> list[dict[str, Tensor]]:
    """A plain torch loop: ``before_step(module, opt)`` right before each ``opt.step()``, as the paper's step.

    ``at_epoch(epoch, module, opt)``, if given, runs before each epoch and returns the optimizer to go on with.
    """
    module = Lit(optimizer)
    opt = optimizer(module)
    out = []
    for epoch in range(epochs):
        if at_epoch is not None:
            opt = at_epoch(epoch, module, opt)
        batches = list(loader())
        for i, (x, y) in enumerate(batches):
            (nn.functional.mse_loss(module.net(x), y) / accumulate).backward()
            if (i + 1) % accumulate and i + 1 < len(batches):
                continue
            if clip_value is not None:
                nn.utils.clip_grad_value_(module.parameters(), clip_value)
            with torch.no_grad():
                before_step(module, opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(weights(module))
    return out


OPTIMIZERS = {
    "adam": (lambda m: torch.optim.Adam(m.parameters(), lr=LR, foreach=False), adam_u),
    "adam-foreach": (lambda m: torch.optim.Adam(m.parameters(), lr=LR, foreach=True), adam_u),
    "adamw-amsgrad": (
        lambda m: torch.optim.AdamW(m.parameters(), lr=LR, amsgrad=True, weight_decay=0.0, foreach=False),
        adam_u,
    ),
    "sgd-momentum": (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, foreach=False), sgd_u),
    "sgd-nesterov": (
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=False),
        sgd_u,
    ),
    "rmsprop": (lambda m: torch.optim.RMSprop(m.parameters(), lr=LR, foreach=False), rmsprop_u),
    "rmsprop-centered": (
        lambda m: torch.optim.RMSprop(m.parameters(), lr=LR, centered=True, foreach=False),
        centered_rmsprop_u,
    ),
    # RAdam: steps 1-5 unrectified (rho_t <= 5), steps 6-8 rectified
    "radam": (lambda m: torch.optim.RAdam(m.parameters(), lr=LR, foreach=False), radam_u),
    "adamax": (lambda m: torch.optim.Adamax(m.parameters(), lr=LR, foreach=False), adamax_u),
    "adagrad": (lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, foreach=False), adagrad_u),
    "adadelta": (lambda m: torch.optim.Adadelta(m.parameters(), lr=0.5, foreach=False), adadelta_u),
}


def assert_differs_from_plain(got: list[dict[str, Tensor]], plain: list[dict[str, Tensor]]) -> None:
    """The mask acts: the cautious run leaves some decayed weights where plain decay would have shrunk them."""
    assert any(not torch.equal(got[-1][k], plain[-1][k]) for k in got[-1])


# ----------------------------------------------------------------------------- known directions
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_known_direction_is_the_papers_formula_by_hand(name: str) -> None:
    optimizer, u_of = OPTIMIZERS[name]
    got = run(Lit(optimizer), [WeightDecay(WD, cautious=True)], max_epochs=2)
    want = reference_loop(optimizer, cautious_by_hand(u_of, lr_factor))
    # The same ops in the same order on both sides: the masked entries are `x * factor` (Tensor.mul), the
    # others untouched, then torch's own step.
    assert_runs_equal(got, want, exact=True)
    assert_differs_from_plain(got, run(Lit(optimizer), [WeightDecay(WD)], max_epochs=2))


def test_the_mask_lets_through_only_entries_whose_update_agrees_with_the_weight() -> None:
    """One step from a known state: the entries that moved by the decay are exactly those of the mask."""
    optimizer = OPTIMIZERS["adam"][0]
    plain = run(Lit(optimizer), [], max_epochs=1, limit_train_batches=1)
    cautious = run(Lit(optimizer), [WeightDecay(WD, cautious=True)], max_epochs=1, limit_train_batches=1)
    module = Lit(optimizer)
    x, y = next(iter(loader()))
    nn.functional.mse_loss(module.net(x), y).backward()
    opt = optimizer(module)
    names = {id(p) for p in decayed(module)}
    for n, p in module.named_parameters():
        changed = cautious[0][n] != plain[0][n]
        if id(p) in names:
            mask = adam_u(opt, p) * p >= 0
            assert torch.equal(changed, mask & (p != 0))
            assert 0 < int(mask.sum()) < p.numel()  # both kinds of entries occur
        else:
            assert not changed.any()  # a no-decay parameter is never touched


# ------------------------------------------------------------------------- modes and coefficient sources
@pytest.mark.parametrize(
    ("callback", "factor_of"),
    [
        (lambda: WeightDecay(0.05, mode="constant", cautious=True), lambda opt: 1 - 0.05),
        (lambda: WeightDecay(WD, mode="lr_ratio", cautious=True), lambda opt: 1 - WD),  # lr == lr0: no scheduler
        (lambda: WeightDecay(timescale_epochs=2.0, cautious=True), lambda opt: 1 - LR / (LR * 2.0 * 4)),
        (lambda: WeightDecay(lambda step: WD * (step + 1) / 4, cautious=True), None),
    ],
    ids=["constant", "lr_ratio", "timescale", "schedule"],
)
def test_every_mode_and_coefficient_source_masks_the_same_factor(callback: Any, factor_of: Any) -> None:
    optimizer, u_of = OPTIMIZERS["adam"]

    def scheduled(opt: torch.optim.Optimizer) -> float:  # the schedule at Adam's own step count
        step = max((int(state["step"]) for state in opt.state.values()), default=0)
        return 1 - LR * (WD * (step + 1) / 4)

    got = run(Lit(optimizer), [callback()], max_epochs=2)
    assert len(got) == 8  # 4 steps per epoch: the timescale's S
    want = reference_loop(optimizer, cautious_by_hand(u_of, factor_of or scheduled))
    assert_runs_equal(got, want, exact=True)
    assert_differs_from_plain(got, run(Lit(optimizer), [], max_epochs=2))


def test_taken_over_decoupled_decay_is_masked() -> None:
    optimizer = lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD, foreach=False)  # noqa: E731
    plain_adam = lambda m: torch.optim.Adam(m.parameters(), lr=LR, foreach=False)  # noqa: E731
    got = run(Lit(optimizer), [WeightDecay(cautious=True)], max_epochs=2)
    want = reference_loop(plain_adam, cautious_by_hand(adam_u, lr_factor))
    assert_runs_equal(got, want, exact=True)
    assert_differs_from_plain(got, run(Lit(optimizer), [WeightDecay()], max_epochs=2))


def test_taking_over_a_coupled_decay_with_cautious_is_refused() -> None:
    optimizer = lambda m: torch.optim.Adam(m.parameters(), lr=LR, weight_decay=WD)  # noqa: E731
    with pytest.raises(MisconfigurationException, match=r"cautious=True.*coupled"):
        run(Lit(optimizer), [WeightDecay(cautious=True)])


def test_the_direction_is_that_of_the_clipped_gradient() -> None:
    """Lightning clips after ``on_before_optimizer_step``: the mask must use the gradient the step will use."""
    optimizer, u_of = OPTIMIZERS["adam"]
    clip = {"gradient_clip_val": 0.01, "gradient_clip_algorithm": "value"}
    got = run(Lit(optimizer), [WeightDecay(WD, cautious=True)], max_epochs=2, **clip)
    want = reference_loop(optimizer, cautious_by_hand(u_of, lr_factor), clip_value=0.01)
    assert_runs_equal(got, want, exact=True)

    def mask_before_clipping(module: nn.Module, opt: torch.optim.Optimizer) -> None:
        cautious_by_hand(u_of, lr_factor)(module, opt)
        nn.utils.clip_grad_value_(module.parameters(), 0.01)

    # The mask of the unclipped gradient gives another run: the order is seen.
    wrong = reference_loop(optimizer, mask_before_clipping)
    assert any(not torch.equal(got[-1][k], wrong[-1][k]) for k in got[-1])
    assert_differs_from_plain(got, run(Lit(optimizer), [WeightDecay(WD)], max_epochs=2, **clip))


def test_gradient_accumulation_uses_the_accumulated_gradient() -> None:
    optimizer, u_of = OPTIMIZERS["sgd-momentum"]
    got = run(Lit(optimizer), [WeightDecay(WD, cautious=True)], max_epochs=2, accumulate_grad_batches=2)
    want = reference_loop(optimizer, cautious_by_hand(u_of, lambda opt: 1 - 0.05 * WD), accumulate=2)
    stepped = got[1::2]  # on_train_batch_end runs per batch; the weights move every 2nd one
    assert_runs_equal(stepped, want, exact=True)
    assert_differs_from_plain(stepped, run(Lit(optimizer), [WeightDecay(WD)], max_epochs=2, accumulate_grad_batches=2))


# ------------------------------------------------------------------- optimizer state replaced mid-run
def donor_state(optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> dict[str, Any]:
    """The optimizer state of another run (another seed, one epoch): moments unlike those it replaces."""
    module = Lit(optimizer, seed=7)
    opt = optimizer(module)
    for x, y in loader(seed=3):
        nn.functional.mse_loss(module.net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt.state_dict()


class AtEpoch(Callback):
    """Runs ``change(trainer, module)`` at the start of epoch ``epoch`` (before its first step)."""

    def __init__(self, epoch: int, change: Callable[[pl.Trainer, pl.LightningModule], None]) -> None:
        self.epoch, self.change = epoch, change

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.change(trainer, pl_module)


@pytest.mark.parametrize("name", ["adam", "sgd-momentum"])
def test_a_state_dict_loaded_mid_run_is_read_afresh(name: str) -> None:
    """``load_state_dict`` replaces every state tensor: the next step's mask must read the new moments."""
    optimizer, u_of = OPTIMIZERS[name]
    donor = donor_state(optimizer)

    def load(trainer: pl.Trainer, module: pl.LightningModule) -> None:
        trainer.optimizers[0].load_state_dict(copy.deepcopy(donor))

    def load_by_hand(epoch: int, module: nn.Module, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if epoch in (1, 2):
            opt.load_state_dict(copy.deepcopy(donor))
        return opt

    factor = (lambda opt: 1 - 0.05 * WD) if name.startswith("sgd") else lr_factor
    cautious = [WeightDecay(WD, cautious=True), AtEpoch(1, load), AtEpoch(2, load)]
    got = run(Lit(optimizer), cautious, max_epochs=3)
    want = reference_loop(optimizer, cautious_by_hand(u_of, factor), epochs=3, at_epoch=load_by_hand)
    assert_runs_equal(got, want, exact=True)
    assert_differs_from_plain(got, run(Lit(optimizer), [WeightDecay(WD), AtEpoch(1, load)], max_epochs=3))


def test_a_rebuilt_optimizer_is_read_afresh() -> None:
    """A new optimizer mid-fit (Lightning's ``setup_optimizers``): its own, empty state, a first step again."""
    first, u_of = OPTIMIZERS["adam"]
    second = lambda m: torch.optim.Adam(m.parameters(), lr=LR, betas=(0.5, 0.9), foreach=False)  # noqa: E731

    def rebuild(trainer: pl.Trainer, module: pl.LightningModule) -> None:
        module.optimizer_fn = second
        trainer.strategy.setup_optimizers(trainer)

    def rebuild_by_hand(epoch: int, module: nn.Module, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return second(module) if epoch == 1 else opt

    got = run(Lit(first), [WeightDecay(WD, cautious=True), AtEpoch(1, rebuild)], max_epochs=2)
    want = reference_loop(first, cautious_by_hand(u_of, lr_factor), at_epoch=rebuild_by_hand)
    assert_runs_equal(got, want, exact=True)
    assert_differs_from_plain(got, run(Lit(first), [WeightDecay(WD), AtEpoch(1, rebuild)], max_epochs=2))


def test_the_gradients_are_not_held_between_steps() -> None:
    """The bucket's cached state look-ups keep no gradient: ``zero_grad(set_to_none=True)`` frees them."""
    optimizer = OPTIMIZERS["adam"][0]
    module = Lit(optimizer)
    opt = optimizer(module)
    WeightDecay(WD, cautious=True).attach(module.net, opt)
    for x, y in loader():
        nn.functional.mse_loss(module.net(x), y).backward()
        grads = [weakref.ref(p.grad) for p in module.parameters()]  # type: ignore[arg-type]
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert all(g() is None for g in grads)


# ------------------------------------------------------------------------------- measured path
def test_custom_optimizer_takes_the_measured_path_within_a_rounding(caplog: Any) -> None:
    optimizer = lambda m: SignMomentum(m.parameters())  # noqa: E731
    with caplog.at_level(logging.INFO):
        got = run(Lit(optimizer), [WeightDecay(WD, cautious=True)], max_epochs=2)
    want = reference_loop(optimizer, cautious_by_hand(sign_momentum_u, lr_factor))
    # The measured path adds the decay increment after the update instead of before it: one rounding.
    assert_runs_equal(got, want, exact=False, rtol=1e-6, atol=1e-7)
    assert_differs_from_plain(got, run(Lit(optimizer), [WeightDecay(WD)], max_epochs=2))
    said = [r.getMessage() for r in caplog.records if "cautious=True" in r.getMessage()]
    assert len(said) == 1 and "measured" in said[0] and "SignMomentum" in said[0]  # once, with the reason


def test_known_path_is_said_once(caplog: Any) -> None:
    with caplog.at_level(logging.INFO):
        run(Lit(OPTIMIZERS["adam"][0]), [WeightDecay(WD, cautious=True)], max_epochs=2)
    said = [r.getMessage() for r in caplog.records if "cautious=True" in r.getMessage()]
    assert len(said) == 1 and "state" in said[0] and "Adam" in said[0]


# ------------------------------------------------------------------------------------- attach
@pytest.mark.parametrize("name", ["adam", "custom"])
def test_attach_in_a_plain_loop_is_the_formula(name: str) -> None:
    if name == "adam":
        optimizer, u_of = OPTIMIZERS["adam"]
    else:
        optimizer, u_of = (lambda m: SignMomentum(m.parameters())), sign_momentum_u
    want = reference_loop(optimizer, cautious_by_hand(u_of, lr_factor), epochs=1)

    def attached(callback: WeightDecay) -> list[dict[str, Tensor]]:
        module = Lit(optimizer)
        opt = optimizer(module)
        attach(callback, module.net, opt)
        return reference_loop_with(module, opt)

    got = attached(WeightDecay(WD, cautious=True))
    assert_runs_equal(got, want, exact=name == "adam", rtol=1e-6, atol=1e-7)
    assert_differs_from_plain(got, attached(WeightDecay(WD)))


def reference_loop_with(module: Lit, opt: torch.optim.Optimizer) -> list[dict[str, Tensor]]:
    out = []
    for x, y in loader():
        nn.functional.mse_loss(module.net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(weights(module))
    return out


# ------------------------------------------------------------------------------------- Fabric
def test_attach_under_fabric_is_the_formula() -> None:
    """``attach`` to Fabric's wrapped optimizer, Fabric's own backward: the paper's step by hand."""
    from lightning.fabric import Fabric

    optimizer, u_of = OPTIMIZERS["sgd-nesterov"]

    def fabric_loop(callback: WeightDecay | None) -> list[dict[str, Tensor]]:
        fabric = Fabric(accelerator="cpu", devices=1)
        module = Lit(optimizer)
        net, opt = fabric.setup(module.net, optimizer(module))
        if callback is not None:
            callback.attach(net, opt)
        out = []
        for x, y in loader():
            fabric.backward(nn.functional.mse_loss(net(x), y))
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(weights(module))
        return out

    want = reference_loop(optimizer, cautious_by_hand(u_of, lambda opt: 1 - 0.05 * WD), epochs=1)
    got = fabric_loop(WeightDecay(WD, cautious=True))
    assert_runs_equal(got, want, exact=True)
    assert_differs_from_plain(got, fabric_loop(WeightDecay(WD)))


# ------------------------------------------------------------------------------- bf16 and fp16 weights
def adam_u_as_torch_rounds(opt: torch.optim.Optimizer, p: Tensor) -> Tensor:
    """CautiousAdamW's ``u = m_hat / (sqrt(v_hat) + eps)`` in float64 from the moments torch's Adam computes
    in the weights' dtype (its single-tensor ops: ``exp_avg.lerp_``, ``exp_avg_sq.mul_().addcmul_()``)."""
    group, state, _ = _group_state(opt, p)
    (b1, b2), eps, grad = group["betas"], group["eps"], p.grad
    step = float(state["step"]) + 1 if state else 1.0
    m = (state["exp_avg"] if state else torch.zeros_like(p)).lerp(grad, 1 - b1)  # type: ignore[arg-type]
    v = (state["exp_avg_sq"] if state else torch.zeros_like(p)).mul(b2).addcmul_(grad, grad, value=1 - b2)  # type: ignore[arg-type]
    return (m.double() / (1 - b1**step)) / (v.double().sqrt() / (1 - b2**step) ** 0.5 + eps)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("16-true", torch.float16)])
def test_low_precision_weights_are_cautious_adamw_as_torch_rounds(precision: str, dtype: torch.dtype) -> None:
    """``bf16-true`` / ``16-true``: bitwise a CautiousAdamW by hand on the weights in that dtype."""
    eps = 1e-4 if dtype == torch.float16 else 1e-8  # 1e-8 is 0 in float16
    optimizer = lambda m: torch.optim.Adam(m.parameters(), lr=LR, eps=eps, foreach=False)  # noqa: E731

    def loop(before_step: Any) -> list[dict[str, Tensor]]:
        module = Lit(optimizer)
        module.net.to(dtype)  # what Lightning's precision plugin does to the module
        opt = optimizer(module)
        out = []
        for _ in range(2):
            for x, y in loader():
                x, y = x.to(dtype), y.to(dtype)  # the plugin converts the batch too
                nn.functional.mse_loss(module.net(x).float(), y.float()).backward()
                with torch.no_grad():
                    before_step(module, opt)
                opt.step()
                opt.zero_grad(set_to_none=True)
                out.append(weights(module))
        return out

    got = run(Lit(optimizer), [WeightDecay(WD, cautious=True)], max_epochs=2, precision=precision)
    assert all(w.dtype == dtype for w in got[-1].values())
    want = loop(cautious_by_hand(adam_u_as_torch_rounds, lr_factor))
    assert_runs_equal(got, want, exact=True)
    assert_differs_from_plain(got, run(Lit(optimizer), [WeightDecay(WD)], max_epochs=2, precision=precision))


# ------------------------------------------------------------------------------------- AMP skips
@pytest.mark.parametrize("fused", [False, True], ids=["known-direction", "fused-measured"])
def test_16_mixed_skipped_steps_apply_no_decay(fused: bool, caplog: Any) -> None:
    """Under a GradScaler, a step with inf gradients is skipped: no update, and no cautious decay either.

    Fused Adam unscales inside its step and has no known direction: the measured path, which the step's
    ``found_inf`` must stop too.
    """
    optimizer = lambda m: torch.optim.Adam(m.parameters(), lr=LR, fused=fused, foreach=None if fused else False)  # noqa: E731

    class Overflowing(Lit):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * (math.inf if batch_idx == 1 else 1.0)  # the 2nd step of each epoch overflows

    def fitted(callbacks: list[Any]) -> list[dict[str, Tensor]]:
        # On CPU, Trainer(precision="16-mixed") falls back to bf16 without a scaler: fp16 with a GradScaler here.
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        return run(Overflowing(optimizer), callbacks, max_epochs=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])

    with caplog.at_level(logging.INFO):
        got = fitted([WeightDecay(WD, cautious=True)])
    said = [r.getMessage() for r in caplog.records if "cautious=True" in r.getMessage()]
    assert len(said) == 1 and ("measured" in said[0]) == fused
    for step in range(1, len(got)):
        if step % 4 == 1:  # skipped: the weights are those of the step before, bitwise
            assert all(torch.equal(got[step][k], got[step - 1][k]) for k in got[step])
        else:
            assert any(not torch.equal(got[step][k], got[step - 1][k]) for k in got[step])
    assert_differs_from_plain(got, fitted([WeightDecay(WD)]))


# ------------------------------------------------------------------------------------- logging
def test_cautious_fraction_is_logged_and_is_the_share_of_the_mask(tmp_path: Path) -> None:
    optimizer, u_of = OPTIMIZERS["adam"]
    shares: list[float] = []

    def recording(module: nn.Module, opt: torch.optim.Optimizer) -> None:
        params = [p for p in decayed(module) if p.grad is not None]
        masks = [u_of(opt, p) * p >= 0 for p in params]
        shares.append(sum(int(m.sum()) for m in masks) / sum(p.numel() for p in params))
        cautious_by_hand(u_of, lr_factor)(module, opt)

    reference_loop(optimizer, recording, epochs=2)
    logger = CSVLogger(tmp_path, name="run")
    run(Lit(optimizer), [WeightDecay(WD, cautious=True)], max_epochs=2, logger=logger, log_every_n_steps=2)
    rows: dict[int, dict[str, float]] = {}
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            rows.setdefault(int(row.pop("step")), {}).update({k: float(v) for k, v in row.items() if v != ""})
    key = "weight_decay/cautious_fraction/pg1"
    logged = {s: r[key] for s, r in rows.items() if key in r}
    assert sorted(logged) == [1, 3, 5, 7]  # the logging steps only (log_every_n_steps=2)
    for step, value in logged.items():
        assert value == pytest.approx(shares[step], abs=1e-6)
    assert len(set(logged.values())) > 1 and all(0 < v < 1 for v in logged.values())


def test_cautious_must_be_a_bool() -> None:
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match="`cautious` must be True or False"):
            WeightDecay(WD, cautious=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- register_direction
class RegisteredSignMomentum(SignMomentum):
    """The custom optimizer, with its direction registered (its own class: ``SignMomentum`` stays measured)."""


def sign_momentum_direction(optimizer: torch.optim.Optimizer, group: dict[str, Any], params: list[Tensor]) -> Any:
    beta = group["beta"]
    moments = [optimizer.state.get(p, {}).get("m") for p in params]

    def compute(grads: list[Tensor], ms: list[Tensor | None]) -> list[Tensor]:
        return [g * (1 - beta) if m is None else m * beta + g * (1 - beta) for g, m in zip(grads, ms, strict=True)]

    return Direction(inputs=([p.grad for p in params], moments), compute=compute, temporaries=2)


def test_a_registered_direction_is_used_instead_of_measuring(caplog: Any) -> None:
    register_direction(RegisteredSignMomentum, sign_momentum_direction)
    optimizer = lambda m: RegisteredSignMomentum(m.parameters())  # noqa: E731
    with caplog.at_level(logging.INFO):
        got = run(Lit(optimizer), [WeightDecay(WD, cautious=True)], max_epochs=2)
    said = [r.getMessage() for r in caplog.records if "cautious=True" in r.getMessage()]
    assert len(said) == 1 and "state" in said[0] and "measured" not in said[0]
    # Decayed before the step, as the formula: bitwise the loop by hand (the measured path is one rounding off).
    want = reference_loop(optimizer, cautious_by_hand(sign_momentum_u, lr_factor))
    assert_runs_equal(got, want, exact=True)
    assert_differs_from_plain(got, run(Lit(optimizer), [WeightDecay(WD)], max_epochs=2))
