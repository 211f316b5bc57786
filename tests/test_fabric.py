"""``WeightDecay`` / ``WeightPenalty`` without a Trainer: attached to Fabric's and plain PyTorch optimizers.

References: torch's own ``AdamW`` and ``SGD(weight_decay=...)`` on the decay groups, and the soft-threshold
formula of proximal L1 applied by hand after a plain SGD step.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric
from torch import Tensor, nn

from lightning_decay import DecayRules, WeightDecay, WeightPenalty, decay_param_groups
from lightning_decay._compat import MisconfigurationException
from lightning_decay.schedules import Linear
from tests.extras import require

STEPS = 4


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 1))


def batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)) for _ in range(STEPS)]


def loop(model: nn.Module, optimizer: Any, backward: Any = None) -> list[dict[str, Tensor]]:
    out = []
    for x, y in batches():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward() if backward is None else backward(loss)
        optimizer.step()
        unwrapped = model.module if type(model).__name__ == "_FabricModule" else model  # the user's names
        out.append({n: p.detach().clone() for n, p in unwrapped.named_parameters()})
    return out


def assert_equal_runs(a: list[dict[str, Tensor]], b: list[dict[str, Tensor]]) -> None:
    assert len(a) == len(b) == STEPS
    for step, (wa, wb) in enumerate(zip(a, b, strict=True)):
        for name in wb:
            assert torch.equal(wa[name], wb[name]), f"step {step}: {name}"


# ------------------------------------------------------------------------------------- Fabric
def test_fabric_example_is_bitwise_adamw() -> None:
    require(("sklearn",), "the Fabric example")
    path = Path(__file__).resolve().parents[1] / "examples" / "fabric_weight_decay.py"
    spec = importlib.util.spec_from_file_location("_example_fabric_weight_decay", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example
    spec.loader.exec_module(example)
    out = example.main(["--fast"])
    attached, adamw = out["histories"]["attached"], out["histories"]["adamw"]
    assert out["steps"] == len(attached) == len(adamw) == 3 and out["bitwise"]
    for a, b in zip(attached, adamw, strict=True):
        assert all(torch.equal(a[n], b[n]) for n in b)
    # and the decay did act: weight_decay=0 gives other weights
    undecayed = example.main(["--fast", "--weight-decay", "0"])["histories"]["attached"]
    assert not torch.equal(attached[-1]["0.weight"], undecayed[-1]["0.weight"])


def fabric_run(optimizer_fn: Any, attach: Any = None, callbacks: Any = None) -> list[dict[str, Tensor]]:
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=callbacks)
    model = make_model()
    model, optimizer = fabric.setup(model, optimizer_fn(model))
    if attach is not None:
        attach(model, optimizer)
    return loop(model, optimizer, fabric.backward)


def test_adam_with_attached_weight_decay_under_fabric_is_adamw() -> None:
    lam = 0.1
    got = fabric_run(
        lambda m: torch.optim.Adam(decay_param_groups(m, weight_decay=0.0), lr=0.01, foreach=False),
        attach=lambda model, opt: WeightDecay(lam).attach(model, opt),
    )
    model = make_model()
    want = loop(model, torch.optim.AdamW(decay_param_groups(model, weight_decay=lam), lr=0.01, foreach=False))
    assert_equal_runs(got, want)


@pytest.mark.parametrize("callback", [WeightDecay(0.1), WeightPenalty(l2=0.1)], ids=["decay", "penalty"])
def test_trainer_callback_given_to_fabric_is_refused_not_silent(callback: Any) -> None:
    adam = lambda m: torch.optim.Adam(m.parameters(), lr=0.01)  # noqa: E731
    with pytest.raises(MisconfigurationException, match=r"attach\(model, optimizer\)"):
        fabric_run(adam, callbacks=[callback])
    # Attached, it may also be listed: Fabric's hook then finds it at work.
    fresh = type(callback)(0.1) if isinstance(callback, WeightDecay) else WeightPenalty(l2=0.1)
    runs = fabric_run(
        lambda m: torch.optim.Adam(decay_param_groups(m, weight_decay=0.0), lr=0.01),
        attach=lambda model, opt: fresh.attach(model, opt),
        callbacks=[fresh],
    )
    assert len(runs) == STEPS


# ------------------------------------------------------------------------------- plain PyTorch
def test_attached_l2_penalty_is_sgd_weight_decay_on_decay_groups() -> None:
    lam = 0.05
    model = make_model()
    opt = torch.optim.SGD(decay_param_groups(model, weight_decay=0.0), lr=0.1, momentum=0.9, foreach=False)
    handle = WeightPenalty(l2=lam).attach(model, opt)
    got = loop(model, opt)
    ref = make_model()
    want = loop(ref, torch.optim.SGD(decay_param_groups(ref, weight_decay=lam), lr=0.1, momentum=0.9, foreach=False))
    assert_equal_runs(got, want)
    assert handle.steps == [STEPS]


@pytest.mark.parametrize(
    "second", [lambda: WeightPenalty(l2=0.05), lambda: WeightDecay(0.05)], ids=["penalty", "decay"]
)
def test_a_second_attachment_decaying_the_same_parameters_is_refused(second: Any) -> None:
    """The optimizer carries a record of what is attached to it: as under a Trainer, two regularizers pulling
    the same weights toward zero are refused. The refused one leaves no hook: the run is still exactly
    ``SGD(weight_decay=lam)`` on the decay group. Disjoint rules, an L1 penalty, or the first attachment
    removed: accepted."""
    lam = 0.05
    model = make_model()
    opt = torch.optim.SGD(decay_param_groups(model, weight_decay=0.0), lr=0.1, momentum=0.9, foreach=False)
    first = WeightPenalty(l2=lam).attach(model, opt)
    with pytest.raises(MisconfigurationException, match=r"Double weight decay: \w+ and WeightPenalty .*remove\(\)"):
        second().attach(model, opt)
    got = loop(model, opt)
    ref = make_model()
    want = loop(ref, torch.optim.SGD(decay_param_groups(ref, weight_decay=lam), lr=0.1, momentum=0.9, foreach=False))
    assert_equal_runs(got, want)

    WeightPenalty(l1=1e-3).attach(model, opt).remove()  # L1 is no weight decay
    disjoint = WeightDecay(lam, rules=DecayRules(exclude=["0.*"]))
    first.remove()
    WeightPenalty(l2=lam, rules=DecayRules(exclude=["3.*"])).attach(model, opt)
    disjoint.attach(model, opt)
    with pytest.raises(MisconfigurationException, match="Double weight decay"):
        second().attach(model, opt)


def test_attached_proximal_l1_soft_thresholds_after_the_sgd_step() -> None:
    lr, l1 = 0.1, 0.05
    ref = make_model()
    decayed = set(DecayRules().classify(ref).decay_names)
    # One step, by hand: plain SGD, then w <- sign(w) * max(|w| - lr * l1, 0) on the decayed weights.
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    WeightPenalty(l1=l1, l1_mode="proximal").attach(model, optimizer)
    x, y = batches()[0]
    nn.functional.mse_loss(model(x), y).backward()
    nn.functional.mse_loss(ref(x), y).backward()
    optimizer.step()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p -= lr * p.grad
            if name in decayed:
                p.copy_(p.sign() * (p.abs() - lr * l1).clamp_min(0))
    for (name, got), want in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7, msg=name)
    assert (model[0].weight == 0).any()  # exact zeros


def test_a_step_the_grad_scaler_skips_is_neither_decayed_nor_counted() -> None:
    lam = 0.5
    model = make_model()
    opt = torch.optim.SGD(decay_param_groups(model, weight_decay=0.0), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    handle = WeightDecay(lam).attach(model, opt, scaler=scaler)
    x, y = batches()[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    model[0].weight.grad[0, 0] = float("inf")  # overflow: the scaler skips this step
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert handle.steps == [0]
    # The next, finite step is decayed with that step's lr and counted.
    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    grads = {n: p.grad.detach() / scaler.get_scale() for n, p in model.named_parameters()}
    scaler.step(opt)
    scaler.update()
    w = before["0.weight"]
    torch.testing.assert_close(model[0].weight.detach(), w * (1 - 0.1 * lam) - 0.1 * grads["0.weight"])
    assert handle.steps == [1]


def test_remove_and_resume_from_the_attachment_state() -> None:
    schedule = Linear(0.2, 0.0, 10)  # the coefficient depends on the step count: it must survive a resume
    model = make_model()
    opt = torch.optim.SGD(decay_param_groups(model, weight_decay=0.0), lr=0.1, foreach=False)
    handle = WeightDecay(schedule).attach(model, opt)
    loop(model, opt)
    state, opt_state = handle.state_dict(), opt.state_dict()
    assert handle.steps == [STEPS] and state["steps"] == [STEPS]
    handle.remove()
    # Removed: the optimizer steps alone (plain SGD on these weights).
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batches()[0]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    grad = model[0].weight.grad.detach().clone()
    opt.step()
    # SGD's own update, `w.add_(g, alpha=-lr)`, and nothing else
    assert torch.equal(model[0].weight.detach(), snapshot["0.weight"].add(grad, alpha=-0.1))

    # Resumed into a fresh callback: the schedule continues at step STEPS.
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(snapshot[n])
    opt.load_state_dict(opt_state)
    resumed = WeightDecay(schedule).attach(model, opt)
    resumed.load_state_dict(state)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    factor = 1 - 0.1 * schedule(STEPS)
    want = (snapshot["0.weight"] * factor).add(grad, alpha=-0.1)  # decayed with the schedule's value at STEPS
    torch.testing.assert_close(model[0].weight.detach(), want, rtol=1e-6, atol=0)
    assert resumed.steps == [STEPS + 1]


# ------------------------------------------------------------------------------------- monitor
def test_attached_monitor_logs_norms_and_layout_to_fabric_tensorboard_logger(tmp_path: Path) -> None:
    from lightning.fabric.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_decay import WeightNormMonitor

    fabric = Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger(tmp_path, name="tb"))
    model = make_model()
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    monitor = WeightNormMonitor(logging_interval=2, log_update_ratio=True)
    handle = monitor.attach(model, optimizer, fabric.loggers)
    before: list[dict[str, Tensor]] = []
    original = model.module
    for x, y in batches():
        before.append({n: p.detach().clone() for n, p in original.named_parameters()})
        optimizer.zero_grad()
        fabric.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
    after = [*before[1:], {n: p.detach().clone() for n, p in original.named_parameters()}]
    fabric.loggers[0].finalize("success")
    assert handle.steps == [STEPS]

    acc = EventAccumulator(fabric.loggers[0].log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for name, _ in original.named_parameters():
        norms = {e.step: e.value for e in acc.Scalars(f"weight_norm/{name}")}
        ratios = {e.step: e.value for e in acc.Scalars(f"update_ratio/{name}")}
        assert sorted(norms) == sorted(ratios) == [1, 3]  # labels: the steps before the one measured
        for step in (1, 3):
            w0, w1 = before[step][name].double(), after[step][name].double()
            assert norms[step] == pytest.approx(torch.linalg.vector_norm(w1).item(), rel=1e-6)
            want = (torch.linalg.vector_norm(w1 - w0) / torch.linalg.vector_norm(w0)).item()
            assert ratios[step] == pytest.approx(want, rel=1e-5)
    assert len(acc.Tensors("custom_scalars__config__")) == 1

    # Removed: no more logging; and unattached, Fabric's hook refuses it.
    handle.remove()
    with pytest.raises(MisconfigurationException, match="attach"):
        fabric_run(lambda m: torch.optim.SGD(m.parameters(), lr=0.1), callbacks=[WeightNormMonitor()])


def test_attached_monitor_without_interval_logs_every_50_steps_and_stays_as_built() -> None:
    """``logging_interval=None`` attached: Lightning's default ``log_every_n_steps`` (50), labels 49, 99;
    the monitor object keeps ``None``, so a Trainer given it later still decides the interval."""
    from lightning_decay import WeightNormMonitor

    class Recorder:
        def __init__(self) -> None:
            self.steps: list[int] = []

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            self.steps.append(step)

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    recorder = Recorder()
    monitor = WeightNormMonitor()
    with monitor.attach(model, optimizer, recorder):
        x, y = batches()[0]
        for _ in range(100):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    assert recorder.steps == [49, 99]
    assert monitor.logging_interval is None
