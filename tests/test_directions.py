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

import copy
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
    ("adadelta", torch.optim.Adadelta, {"lr": 50.0}, None),
    ("adadelta-maximize", torch.optim.Adadelta, {"lr": 50.0, "maximize": True}, None),
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
    def step(self, closure: Any = None) -> None:
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
        (lambda ps: torch.optim.Adadelta(ps, eps=0.0), "eps=0.0"),
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


def test_params_without_a_gradient_are_an_error() -> None:
    model = two_layers(torch.float32)
    opt = torch.optim.Adam(model.parameters())
    backward(model, 0, torch.float32)  # the last layer has no gradient
    with pytest.raises(ValueError, match="params must all have a gradient"):
        direction(opt, opt.param_groups[0], list(model.parameters()))


def test_register_direction_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match=r"optimizer_class must be a subclass of torch\.optim\.Optimizer"):
        register_direction(dict, directions.gradient_direction)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fn must be callable"):
        register_direction(torch.optim.SGD, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (torch.optim.Adam, {"lr": 1e-2}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "foreach": True}),
        (torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.9, "centered": True}),
    ],
    ids=["adam", "sgd-momentum", "sgd-nesterov-foreach", "rmsprop-centered-momentum"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_state_cache_gives_the_uncached_direction_and_looks_up_only_when_the_state_changes(
    cls: type[torch.optim.Optimizer], options: dict[str, Any], dtype: torch.dtype
) -> None:
    """Through first steps (state created), a ``load_state_dict`` (every tensor replaced) and steps between:
    the cached direction is the uncached one bitwise, and the state is looked up again only at the changes."""
    model = two_layers(dtype)
    opt = cls(model.parameters(), **options)
    params = list(model.parameters())
    cache, lookups = directions.StateCache(params), []
    for step in range(1, STEPS):  # every parameter has a gradient at every step
        if step == 5:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # the same values in new tensors
        backward(model, step, dtype)
        cache.grads = [p.grad for p in params]  # type: ignore[misc]
        cached = direction(opt, opt.param_groups[0], params, cache=cache)
        fresh = direction(opt, opt.param_groups[0], params)
        assert isinstance(cached, Direction) and isinstance(fresh, Direction)
        for a, b in zip(cached.inputs[1:], fresh.inputs[1:], strict=True):  # the very state tensors
            assert all(x is y for x, y in zip(a, b, strict=True))
        u_cached, u_fresh = materialize(cached, params), materialize(fresh, params)
        assert all(torch.equal(a, b) for a, b in zip(u_cached, u_fresh, strict=True))
        lookups.append(cache.lookups)
        opt.step()
    # step 1: no state yet (looked up, not kept); step 2: created, kept; 3, 4 kept; 5: replaced; 6, 7 kept
    assert lookups == [1, 2, 2, 2, 3, 3, 3]


# ---- the kernels ----------------------------------------------------------------------------------------


def copy_direction(us: list[Tensor]) -> Direction:
    """A given direction ``us``, copied chunk by chunk as a direction function's fresh output is."""
    return Direction((us,), lambda u: torch._foreach_mul(u, 1.0))


def edge_lists(dtype: torch.dtype, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """Weights and directions with zeros, -0.0, and float16-underflowing products of opposite signs."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(13, 7), (29,), (3, 4, 5), ()]
    xs = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    us = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    xs[0][0, :3] = torch.tensor([0.0, -0.0, 1e-4])
    us[0][0, :3] = torch.tensor([1.0, 1.0, -1e-4])  # 1e-4 * -1e-4 underflows to -0.0 in float16
    us[1][:4] = torch.tensor([0.0, -0.0, 0.0, -0.0])
    return xs, us


def formula(x: Tensor, u: Tensor, factor: float | Tensor) -> Tensor:
    """The paper's decay term by hand: ``x * factor`` where ``u * x >= 0`` (exact in float64), else ``x``."""
    return torch.where(u.double() * x.double() >= 0, x * factor, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("factor", [0.9, 1 - 3e-4, 0.5, 0.3])  # 0.3: below 1/2, the general form in float32
def test_cautious_decay_is_the_formula_entry_by_entry(dtype: torch.dtype, factor: float) -> None:
    xs, us = edge_lists(dtype)
    got = [x.clone() for x in xs]
    share = cautious_decay_(got, copy_direction(us), factor, fraction=True)
    kept = 0
    for x, u, y in zip(xs, us, got, strict=True):
        want = formula(x, u, factor)
        # equal values; only a zero weight's sign may differ: lerp's fused multiply-add gives +0.0 for -0.0
        assert y.dtype == dtype and torch.equal(y, want)
        assert torch.equal(torch.signbit(y)[y != 0], torch.signbit(want)[want != 0])
        kept += int((u.double() * x.double() < 0).sum())
    assert 0 < kept < sum(x.numel() for x in xs)  # the mask let some entries through and held others
    assert got[0][0, 2] == xs[0][0, 2]  # the underflowing product of opposite signs is not decayed
    total = sum(x.numel() for x in xs)
    assert share is not None and share.dtype == torch.float32 and share.dim() == 0
    assert share.item() == pytest.approx((total - kept) / total, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_equals_whole_bitwise(dtype: torch.dtype) -> None:
    xs, us = edge_lists(dtype, 1)
    whole, chunked = [x.clone() for x in xs], [x.clone() for x in xs]
    f_whole = cautious_decay_(whole, copy_direction(us), 0.95, chunks=[(0, len(xs))], fraction=True)
    chunks = cautious_chunks(xs, 1, budget=96)  # cuts the first tensors into flat slices
    assert any(len(c) == 4 for c in chunks)
    f_chunked = cautious_decay_(chunked, copy_direction(us), 0.95, chunks=chunks, fraction=True)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))
    assert f_whole is not None and f_chunked is not None and torch.equal(f_whole, f_chunked)
    news = [x + 0.01 for x in xs]
    m_whole, m_chunked = [x.clone() for x in news], [x.clone() for x in news]
    measured_cautious_decay_(m_whole, xs, 0.95, chunks=[(0, len(xs))])
    measured_cautious_decay_(m_chunked, xs, 0.95, chunks=chunks)
    assert all(torch.equal(a, b) for a, b in zip(m_whole, m_chunked, strict=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_skipped_step_leaves_the_weights_bitwise(dtype: torch.dtype) -> None:
    """A GradScaler-skipped step: infinite or NaN directions, factor 1 as a tensor; no NaN may leak in."""
    xs, us = edge_lists(dtype, 4)
    us[0][1, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    got = [x.clone() for x in xs]
    cautious_decay_(got, copy_direction(us), torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(got, xs, strict=True))
    decayed = [x.clone() for x in xs]
    cautious_decay_(decayed, copy_direction(us), 0.5)
    assert decayed[0][1, 0] == xs[0][1, 0] * 0.5  # a NaN direction reads as u = 0: decayed
    assert torch.equal(decayed[0][1, 1:3], formula(xs[0][1, 1:3], us[0][1, 1:3], 0.5))  # +-inf: a sign


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_factor_is_the_float_factor(dtype: torch.dtype) -> None:
    xs, us = edge_lists(dtype)
    a, b, c = ([x.clone() for x in xs] for _ in range(3))
    cautious_decay_(a, copy_direction(us), 0.9)
    cautious_decay_(b, copy_direction(us), torch.tensor(0.9))
    cautious_decay_(c, copy_direction(us), torch.tensor(1.0))  # a step the GradScaler skips
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(c, xs, strict=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_measured_path_is_the_formula_from_the_weights_before(dtype: torch.dtype) -> None:
    olds, steps = edge_lists(dtype, 2)
    news = [o - 0.05 * s for o, s in zip(olds, steps, strict=True)]
    news[1][:6] = olds[1][:6]  # entries the step did not move: u = 0, decayed as by AdamW alone
    got = [n.clone() for n in news]
    share = measured_cautious_decay_(got, olds, 0.9, fraction=True)
    for old, new, y in zip(olds, news, got, strict=True):
        decay = torch.where((old.double() - new.double()) * old.double() >= 0, old * 0.9 - old, 0)
        assert torch.equal(y, new + decay.to(dtype))
    assert torch.equal(got[1][:6], olds[1][:6] * 0.9)
    assert share is not None and 0 < share.item() < 1


# ---- CautiousAdamW by hand, per tensor, step by step --------------------------------------------------


def cautious_adamw_by_hand(
    params: list[Tensor], grads: list[Tensor], state: dict[int, dict[str, Any]], lr: float, wd: float, eps: float
) -> None:
    """One step of ``x <- x - lr * (u + wd * 1[u * x >= 0] * x)``, ``u = m_hat / (sqrt(v_hat) + eps)``.

    The moments and the update use torch Adam's single-tensor ops (so the result can be bitwise), the
    mask the paper's ``u``, computed in float64 from the updated moments.
    """
    beta1, beta2 = 0.9, 0.999
    for i, (x, g) in enumerate(zip(params, grads, strict=True)):
        s = state.setdefault(i, {"m": torch.zeros_like(x), "v": torch.zeros_like(x), "t": 0})
        s["t"] += 1
        s["m"].lerp_(g, 1 - beta1)
        s["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1, bc2 = 1 - beta1 ** s["t"], 1 - beta2 ** s["t"]
        u = (s["m"].double() / bc1) / (s["v"].double().sqrt() / bc2**0.5 + eps)
        x.copy_(torch.where(u * x.double() >= 0, x * (1 - lr * wd), x))  # decay first, as AdamW does
        denom = (s["v"].sqrt() / bc2**0.5).add_(eps)
        x.addcdiv_(s["m"], denom, value=-lr / bc1)


def train(dtype: torch.dtype, steps: int, run: Callable[[nn.Module, list[Tensor]], None]) -> list[Tensor]:
    model = two_layers(dtype, seed=3)
    for step in range(steps):
        backward(model, step + 1, dtype)
        run(model, list(model.parameters()))
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adam_plus_cautious_decay_is_cautious_adamw_by_hand(dtype: torch.dtype) -> None:
    lr, wd, eps = 1e-2, 0.5, 1e-8 if dtype != torch.float16 else 1e-4
    optimizers: dict[str, torch.optim.Optimizer] = {}

    def ours(model: nn.Module, params: list[Tensor]) -> None:
        opt = optimizers.setdefault("adam", torch.optim.Adam(params, lr=lr, eps=eps, foreach=False))
        d = direction(opt, opt.param_groups[0], params)
        assert isinstance(d, Direction)
        cautious_decay_([p.detach() for p in params], d, 1 - lr * wd)
        opt.step()

    def plain(model: nn.Module, params: list[Tensor]) -> None:
        optimizers.setdefault("adamw", torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=wd)).step()

    hand_state: dict[int, dict[str, Any]] = {}

    def hand(model: nn.Module, params: list[Tensor]) -> None:
        with torch.no_grad():
            cautious_adamw_by_hand([p.detach() for p in params], [p.grad for p in params], hand_state, lr, wd, eps)

    got, want, adamw = train(dtype, 5, ours), train(dtype, 5, hand), train(dtype, 5, plain)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))  # same ops, same order: bitwise
    assert not all(torch.equal(a, b) for a, b in zip(got, adamw, strict=True))  # the mask really acts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_mask_of_ones_is_torch_adamw_bitwise(dtype: torch.dtype) -> None:
    """Where the mask lets everything through, the decay is AdamW's own ``param.mul_(1 - lr * wd)``."""
    lr, wd, eps = 1e-2, 0.5, 1e-8 if dtype != torch.float16 else 1e-4
    optimizers: dict[str, torch.optim.Optimizer] = {}

    def ours(model: nn.Module, params: list[Tensor]) -> None:
        opt = optimizers.setdefault("adam", torch.optim.Adam(params, lr=lr, eps=eps))
        weights = [p.detach() for p in params]
        cautious_decay_(weights, Direction((weights,), lambda w: torch._foreach_sign(w)), 1 - lr * wd)
        opt.step()

    def plain(model: nn.Module, params: list[Tensor]) -> None:
        optimizers.setdefault("adamw", torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=wd)).step()

    got, want = train(dtype, 4, ours), train(dtype, 4, plain)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_measured_path_equals_the_known_direction_within_rounding() -> None:
    lr, wd = 1e-2, 0.5
    optimizers: dict[str, torch.optim.Optimizer] = {}

    def known(model: nn.Module, params: list[Tensor]) -> None:
        opt = optimizers.setdefault("known", torch.optim.Adam(params, lr=lr))
        d = direction(opt, opt.param_groups[0], params)
        assert isinstance(d, Direction)
        cautious_decay_([p.detach() for p in params], d, 1 - lr * wd)
        opt.step()

    def measured(model: nn.Module, params: list[Tensor]) -> None:
        opt = optimizers.setdefault("measured", torch.optim.Adam(params, lr=lr))
        before = [p.detach().clone() for p in params]
        opt.step()
        measured_cautious_decay_([p.detach() for p in params], before, 1 - lr * wd)

    def plain(model: nn.Module, params: list[Tensor]) -> None:
        optimizers.setdefault("adamw", torch.optim.AdamW(params, lr=lr, weight_decay=wd)).step()

    a, b, c = train(torch.float32, 5, known), train(torch.float32, 5, measured), train(torch.float32, 5, plain)
    for x, y in zip(a, b, strict=True):
        # one rounding per step apart (AdamW rounds x * factor before its update, the measured path after)
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert max(float((x - z).abs().max()) for x, z in zip(a, c, strict=True)) > 1e-3  # far from plain decay


# ---- bounded temporaries --------------------------------------------------------------------------------


SCALARS = 256  # bytes of 0-dim tensors: the fraction's per-tensor counts and their sum


class PeakBytes(TorchDispatchMode):
    """The most bytes of new tensors alive at once, counted by the ops that create them."""

    def __init__(self, inputs: list[Tensor]) -> None:
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in inputs}
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in self.known:
                self.known.add(t.untyped_storage().data_ptr())
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (torch.optim.Adam, {}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (torch.optim.RMSprop, {"momentum": 0.9, "maximize": True}),
        (torch.optim.Adam, {"maximize": True}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        (torch.optim.RMSprop, {"momentum": 0.9, "centered": True}),
    ],
)
def test_peak_extra_memory_stays_within_the_chunk_budget(
    cls: type[torch.optim.Optimizer], options: dict[str, Any]
) -> None:
    big = nn.Linear(300, 200)  # 240 KB of weights: cut into slices
    opt = cls(big.parameters(), **options)
    for _ in range(2):  # the second step has state
        big.zero_grad()
        big(torch.randn(4, 300)).pow(2).sum().backward()
        params = list(big.parameters())
        d = direction(opt, opt.param_groups[0], params)
        assert isinstance(d, Direction)
        budget = 24 * 2**10
        chunks = cautious_chunks([p.detach() for p in params], d.temporaries, budget)
        inputs = [p.detach() for p in params] + [t for lst in d.inputs for t in lst if t is not None]
        with PeakBytes(inputs) as peak:
            cautious_decay_([p.detach() for p in params], d, 0.99, chunks=chunks, fraction=True)
        assert 0 < peak.peak <= budget + SCALARS
        with PeakBytes(inputs) as unchunked:  # the tracker sees the temporaries: whole, they exceed it
            cautious_decay_([p.detach().clone() for p in params], d, 0.99, chunks=[(0, len(params))])
        assert unchunked.peak > 2 * budget
        opt.step()
    before = [p.detach().clone() for p in params]
    with PeakBytes([p.detach() for p in params] + before) as peak:
        measured_cautious_decay_([p.detach() for p in params], before, 0.99, cautious_chunks(before, 1, budget))
    assert 0 < peak.peak <= budget
