"""Update directions against torch's own optimizer steps, and the cautious decay kernels against the formula.

Directions: a real torch optimizer (its ``weight_decay=0``) trains a small two-layer model on random data;
before each step the direction is computed from its state and gradients, after it the step
``x_old - x_new`` is compared. Where the step is nonzero its sign must be the direction's (the update is
``-lr * positive * u``); where the step is zero nothing is asserted (an update below half a unit in the
last place of the weight rounds to no move, whatever ``u``), except that a zero direction must give a
zero step. Where the direction is a new state value (Adam's first moment, a momentum buffer), it must
also equal the optimizer's own new state bitwise. The second layer gets gradients only from step 2, so
steps 1 and 2 have parameters without state (torch's first-step cases).

Kernels: ``torch.optim.Adam(weight_decay=0)`` plus ``cautious_decay_`` before its step against a
``CautiousAdamW`` written here by hand from the paper's formula, per tensor.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_decay import directions
from lightning_decay.cautious import cautious_chunks, cautious_decay_, measured_cautious_decay_
from lightning_decay.directions import Direction, direction, direction_fn, register_direction

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STEPS = 8
Factory = Callable[..., torch.optim.Optimizer]

# (id, optimizer class, options, the state key whose new value the direction is, if any)
CASES: list[tuple[str, type[torch.optim.Optimizer], dict[str, Any], str | None]] = [
    ("adam", torch.optim.Adam, {"lr": 1e-2}, "exp_avg"),
    ("adam-amsgrad", torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}, "exp_avg"),
    ("adam-maximize", torch.optim.Adam, {"lr": 1e-2, "maximize": True, "betas": (0.8, 0.99)}, "exp_avg"),
    ("adamw", torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.0}, "exp_avg"),
    ("adamw-amsgrad", torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.0, "amsgrad": True}, "exp_avg"),
    # RAdam: steps 1-5 have rho_t <= 5 (the unrectified update lr * m_hat), steps 6-8 the rectified one
    ("radam", torch.optim.RAdam, {"lr": 0.2}, "exp_avg"),
    ("radam-maximize", torch.optim.RAdam, {"lr": 0.2, "maximize": True}, "exp_avg"),
    ("adamax", torch.optim.Adamax, {"lr": 1e-2}, "exp_avg"),
    ("adamax-maximize", torch.optim.Adamax, {"lr": 1e-2, "maximize": True}, "exp_avg"),
    ("sgd", torch.optim.SGD, {"lr": 0.1}, None),
    ("sgd-maximize", torch.optim.SGD, {"lr": 0.1, "maximize": True}, None),
    ("sgd-momentum", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "momentum_buffer"),
    ("sgd-dampening", torch.optim.SGD, {"lr": 0.1, "momentum": 0.7, "dampening": 0.4}, "momentum_buffer"),
    ("sgd-nesterov", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, None),
    ("sgd-nesterov-max", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True}, None),
    ("rmsprop", torch.optim.RMSprop, {"lr": 1e-2}, None),
    ("rmsprop-centered", torch.optim.RMSprop, {"lr": 1e-2, "centered": True}, None),
    ("rmsprop-momentum", torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.9}, "momentum_buffer"),
    (
        "rmsprop-centered-momentum-max",
        torch.optim.RMSprop,
        {"lr": 1e-2, "momentum": 0.8, "centered": True, "maximize": True},
        "momentum_buffer",
    ),
    ("adagrad", torch.optim.Adagrad, {"lr": 0.1}, None),
    ("adagrad-lr-decay-maximize", torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.1, "maximize": True}, None),
]


def two_layers(dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def backward(model: nn.Sequential, step: int, dtype: torch.dtype) -> None:
    """Real data gradients; the last layer only from step 2, so that it starts its state later."""
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 7, generator=g).to(dtype), torch.randn(16, 3, generator=g).to(dtype)
    model.zero_grad(set_to_none=True)
    if step == 0:
        model[:2](x).float().pow(2).mean().backward()
    else:
        (model(x) - y).float().pow(2).mean().backward()


def with_grads(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.grad is not None]


def materialize(d: Direction, params: list[Tensor]) -> list[Tensor]:
    """The whole direction at once (one chunk per tensor), as fresh tensors."""
    out: list[Tensor] = []
    for i in range(len(params)):
        out += d.compute(*[[lst[i]] for lst in d.inputs])
    return out


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("cls", "options", "key"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_direction_is_the_sign_of_the_optimizers_own_step(
    cls: type[torch.optim.Optimizer], options: dict[str, Any], key: str | None, dtype: torch.dtype, foreach: bool
) -> None:
    model = two_layers(dtype)
    if dtype == torch.float16 and "eps" in cls.__init__.__code__.co_varnames:
        options = {**options, "eps": 1e-4}  # the default 1e-8 is 0 in float16: 0 / 0 on a zero gradient
    opt = cls(model.parameters(), foreach=foreach, **options)
    moved = 0
    for step in range(STEPS):
        backward(model, step, dtype)
        params = with_grads(model)
        d = direction(opt, opt.param_groups[0], params)
        assert isinstance(d, Direction), d
        u = materialize(d, params)
        before = [p.detach().clone() for p in params]
        opt.step()
        for p, old, ui in zip(params, before, u, strict=True):
            delta = old - p.detach()
            nonzero = delta != 0
            assert torch.equal(torch.sign(delta)[nonzero], torch.sign(ui)[nonzero]), (step, p.shape)
            assert not delta[ui == 0].any()  # no direction, no move
            moved += int(nonzero.sum())
            if key is not None:
                assert torch.equal(ui, opt.state[p][key])  # the optimizer's own new state, bitwise
    total = sum(p.numel() for p in model.parameters())
    assert moved > STEPS * total // 2  # most entries moved, so the sign test had something to test


@pytest.mark.parametrize(("cls", "options"), [(torch.optim.SGD, {"lr": 0.1}), (torch.optim.Adagrad, {"lr": 0.1})])
def test_gradient_directions_hold_for_fused_kernels(cls: type[torch.optim.Optimizer], options: dict[str, Any]) -> None:
    model = two_layers(torch.float32)
    opt = cls(model.parameters(), fused=True, **options)
    for step in range(3):
        backward(model, step, torch.float32)
        params = with_grads(model)
        d = direction(opt, opt.param_groups[0], params)
        assert isinstance(d, Direction), d
        u, before = materialize(d, params), [p.detach().clone() for p in params]
        opt.step()
        for p, old, ui in zip(params, before, u, strict=True):
            delta = old - p.detach()
            assert delta.ne(0).any() and torch.equal(torch.sign(delta)[delta != 0], torch.sign(ui)[delta != 0])


class Rewritten(torch.optim.Adam):
    """A subclass that rewrites the update: Adam's direction must not be inherited."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: D102
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad)  # the opposite of Adam's direction


class Configured(torch.optim.Adam):
    """A subclass that only changes defaults keeps Adam's step, hence its direction."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, lr=3e-3)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda ps: torch.optim.NAdam(ps), "NAdam"),
        (lambda ps: torch.optim.Adam(ps, fused=True), "fused"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True), "fused"),
        (lambda ps: torch.optim.AdamW(ps), "weight_decay=0.01"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=1e-4), "weight_decay"),
        (lambda ps: torch.optim.Adam(ps, betas=(torch.tensor(0.9), torch.tensor(0.999))), "tensor beta1"),
        (lambda ps: Rewritten(ps), "no direction is registered for Rewritten"),
        (lambda ps: torch.optim.Rprop(ps), "no direction is registered for Rprop"),
    ],
)
def test_refusals_say_why(make: Factory, needle: str) -> None:
    model = two_layers(torch.float32)
    opt = make(model.parameters())
    backward(model, 1, torch.float32)
    got = direction(opt, opt.param_groups[0], with_grads(model))
    assert isinstance(got, str) and needle in got


def test_complex_parameters_are_refused() -> None:
    p = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    p.grad = torch.randn(3, dtype=torch.complex64)
    opt = torch.optim.Adam([p])
    got = direction(opt, opt.param_groups[0], [p])
    assert isinstance(got, str) and "complex64" in got


def test_registry_exact_class_then_unchanged_step_in_the_mro() -> None:
    assert direction_fn(torch.optim.Adam) is directions.first_moment_direction
    assert direction_fn(Configured) is directions.first_moment_direction  # step inherited unchanged
    assert direction_fn(Rewritten) is None

    def rewritten(opt: torch.optim.Optimizer, group: dict[str, Any], params: list[Tensor]) -> Direction:
        return Direction(([local.grad for local in params],), lambda g: torch._foreach_neg(g))

    register_direction(Rewritten, rewritten)
    try:
        model = two_layers(torch.float32)
        opt = Rewritten(model.parameters())
        backward(model, 1, torch.float32)
        params = with_grads(model)
        d = direction(opt, opt.param_groups[0], params)
        assert isinstance(d, Direction)
        u, before = materialize(d, params), [p.detach().clone() for p in params]
        opt.step()
        for p, old, ui in zip(params, before, u, strict=True):
            delta = old - p.detach()
            assert torch.equal(torch.sign(delta)[delta != 0], torch.sign(ui)[delta != 0])
    finally:
        del directions._REGISTRY[Rewritten]


def test_register_direction_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="optimizer_class must be a subclass of torch.optim.Optimizer"):
        register_direction(dict, directions.gradient_direction)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fn must be callable"):
        register_direction(torch.optim.SGD, None)  # type: ignore[arg-type]
