"""The life of a run: binding without a Trainer, resume, reuse, optimizers replaced, frozen and unfrozen
parameters (issue #11).

Each case runs a real ``Trainer.fit`` with real checkpoints and checks the weights against an independent
reference. Many use a zero data gradient (``loss = 0 * output``) and plain SGD, so that only the
regularization moves the weights and a decayed weight is exactly ``w * (1 - lr * wd) ** steps`` (up to the
float32 rounding of ``steps`` multiplications) while the others do not move at all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning, Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_decay import (
    DecayRules,
    WeightDecay,
    WeightNormMonitor,
    WeightPenalty,
    decay_param_groups,
    unfreeze_and_add_decay_groups,
)
from lightning_decay.schedules import Linear
from tests.test_penalty import BATCH, N_SAMPLES, Lit, dataset, loader, make_net, make_trainer, weights
from tests.test_regularizer_training import EQUIVALENCE_IDS, EQUIVALENCES

STEPS_PER_EPOCH = N_SAMPLES // BATCH
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers
def decay_names(module: nn.Module) -> set[str]:
    """Names (as ``named_parameters`` gives them) of the parameters the default rules decay."""
    ids = {id(p) for p in DecayRules().classify(module).decay_params}
    return {n for n, p in module.named_parameters() if id(p) in ids}


class ZeroGrad(Lit):
    """``Lit`` whose loss is ``0 * output``: every parameter gets a gradient, all zeros."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _ = batch
        return 0.0 * self.net(x).sum()


def sgd(lr: float = 0.1, weight_decay: float = 0.0, momentum: float = 0.0) -> Callable[[nn.Module], Any]:
    return lambda m: torch.optim.SGD(m.parameters(), lr=lr, weight_decay=weight_decay, momentum=momentum, foreach=False)


def fit(
    module: pl.LightningModule, callbacks: list[Callback], max_epochs: int, ckpt_path: Any = None, **kw: Any
) -> pl.Trainer:
    trainer = make_trainer(callbacks, max_epochs=max_epochs, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


def checkpoint(module: pl.LightningModule, callbacks: list[Callback], epochs: int, path: Path) -> Path:
    trainer = fit(module, callbacks, max_epochs=epochs)
    trainer.save_checkpoint(path)
    return path


def assert_factor(before: dict[str, Tensor], after: dict[str, Tensor], factors: dict[str, float]) -> None:
    """``after[n] == before[n] * factors[n]`` (float32 rounding of the repeated products: rtol 1e-6);
    names without a factor did not move at all (bitwise)."""
    for name, w in before.items():
        if name in factors:
            torch.testing.assert_close(after[name], w * factors[name], rtol=1e-6, atol=0.0, msg=name)
            assert not torch.equal(after[name], w), f"{name} did not move"
        else:
            assert torch.equal(after[name], w), f"{name} moved"


# ------------------------------------------------------------- the binding API, without a Trainer
def plain_loop(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, closure: bool = False) -> None:
    data = dataset()
    for i in range(steps):
        x, y = data[(i * BATCH) % N_SAMPLES : (i * BATCH) % N_SAMPLES + BATCH]

        def loss_fn(x: Tensor = x, y: Tensor = y) -> Tensor:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        if closure:
            optimizer.step(loss_fn)
        else:
            loss_fn()
            optimizer.step()


@pytest.mark.parametrize("closure", [False, True], ids=["no-closure", "closure"])
@pytest.mark.parametrize(("callback", "plain", "reference"), EQUIVALENCES, ids=EQUIVALENCE_IDS)
def test_bind_with_step_hooks_runs_the_callback_code_without_a_trainer(
    callback: Any, plain: Any, reference: Any, closure: bool
) -> None:
    """``bind(module, optimizers, step_hooks=True)``: the per-step work runs from the optimizer's step hooks,
    bitwise the optimizer's own decay on the decay / no-decay groups, with or without a closure."""
    model, ref_model = make_net(), make_net()
    cb = callback()
    opt = plain(model)
    cb.bind(model, [opt], None, step_hooks=True)
    plain_loop(model, opt, 6, closure)
    plain_loop(ref_model, reference(ref_model), 6, closure)
    for (name, w), w_ref in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(w, w_ref), name
    assert cb.state_dict()["steps"] == [6]
    cb.unbind()  # the optimizer is left as it was: no hook of ours on it
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


# --------------------------------------------------------------------------- 1. take-over at resume
def test_checkpoint_without_callbacks_resumed_with_take_over_decays_once(tmp_path: Path) -> None:
    """Trained with SGD(weight_decay=0.05), resumed with WeightDecay() taking it over: Lightning restores
    weight_decay=0.05 into the optimizer after on_fit_start; the take-over must see it, so the decayed
    weights shrink by exactly (1 - lr * wd) per step and biases and norms do not move."""
    lr, wd = 0.1, 0.05
    ckpt = checkpoint(ZeroGrad(sgd(lr, wd)), [], 1, tmp_path / "plain.ckpt")
    resumed = ZeroGrad(sgd(lr, wd), seed=11)
    cb = WeightDecay()
    trainer = fit(resumed, [cb], max_epochs=3, ckpt_path=ckpt)
    before = torch.load(ckpt, weights_only=False)["state_dict"]
    factor = (1 - lr * wd) ** (2 * STEPS_PER_EPOCH)
    assert_factor(before, weights(resumed), {n: factor for n in decay_names(resumed)})
    assert trainer.optimizers[0].param_groups[0]["weight_decay"] == 0.0
    assert cb.state_dict()["taken_over"] == [[0, 0, wd, False]]  # SGD's own semantics: coupled


def test_checkpoint_with_optimizer_decay_resumed_with_a_penalty_is_refused(tmp_path: Path) -> None:
    """Trained with SGD(weight_decay=0.01), resumed with SGD(weight_decay=0) + WeightPenalty(l2=0.01): the
    restored weight_decay would apply L2 twice. Refused before the first step, saying how to go on."""
    ckpt = checkpoint(ZeroGrad(sgd(0.1, 0.01)), [], 1, tmp_path / "plain.ckpt")
    resumed = ZeroGrad(sgd(0.1, 0.0))
    with pytest.raises(MisconfigurationException, match=r"(?s)Double weight decay.*restored.*weight_decay=None"):
        fit(resumed, [WeightPenalty(l2=0.01)], max_epochs=2, ckpt_path=ckpt)
    on_disk = torch.load(ckpt, weights_only=False)["state_dict"]
    assert all(torch.equal(w, on_disk[n]) for n, w in weights(resumed).items()), "no step ran"


# ------------------------------------------------------------------------- 2. L2-SP keeps its reference
def l2sp_checkpoint(tmp_path: Path, **kw: Any) -> tuple[Path, dict[str, Tensor]]:
    """One epoch of real training with WeightPenalty(l2=0.5, reference='initial'): the weights move away
    from where the fit started, which is the reference. Returns the checkpoint and that reference."""
    module = Lit(sgd(0.1))  # no momentum: the resumed SGD gets the checkpoint's hyperparameters
    start = weights(module)
    return checkpoint(module, [WeightPenalty(l2=0.5, reference="initial", **kw)], 1, tmp_path / "l2sp.ckpt"), start


@pytest.mark.parametrize(
    "resume_with",
    [
        lambda: WeightPenalty(l2=0.3, reference="initial"),  # another coefficient
        lambda: WeightPenalty(l2=0.3, reference="initial", rules=DecayRules(exclude=["net.3.weight"])),
    ],
    ids=["other-l2", "other-rules"],
)
def test_resumed_l2sp_keeps_the_first_fits_reference_and_step_count(resume_with: Any, tmp_path: Path) -> None:
    """With zero data gradients and plain SGD, ``w - w0`` shrinks by exactly ``(1 - lr * l2)`` per step
    toward the first fit's start ``w0``; a lost reference (the checkpoint's weights) would not move at all."""
    lr, l2 = 0.1, 0.3
    ckpt, start = l2sp_checkpoint(tmp_path)
    resumed = ZeroGrad(sgd(lr), seed=11)
    cb = resume_with()
    fit(resumed, [cb], max_epochs=2, ckpt_path=ckpt)
    at_ckpt = torch.load(ckpt, weights_only=False)["state_dict"]
    regularized = {d.name for d in cb.rules.classify(resumed).decay}
    factor = (1 - lr * l2) ** STEPS_PER_EPOCH
    after = weights(resumed)
    for name, w in after.items():
        if name in regularized:
            torch.testing.assert_close(w - start[name], (at_ckpt[name] - start[name]) * factor, rtol=1e-5, atol=1e-7)
            assert not torch.equal(w, at_ckpt[name])
        else:
            assert torch.equal(w, at_ckpt[name]), name
    assert cb.state_dict()["steps"] == [2 * STEPS_PER_EPOCH]
    assert set(cb.state_dict()["refs"]) == {d.name for d in DecayRules().classify(resumed).decay}


def test_an_entry_under_a_key_of_the_previous_release_is_found(tmp_path: Path) -> None:
    """Keys used to hold the coefficients (``WeightPenalty{'l1': ..., 'l2': ...}``): the only entry of the
    class in the checkpoint is this callback's, so its reference is kept."""
    ckpt, start = l2sp_checkpoint(tmp_path)
    raw = torch.load(ckpt, weights_only=False)
    old_key = (
        "WeightPenalty{'l1': 'Constant(0.0)', 'l2': 'Constant(0.5)', 'mode': 'subgradient', 'reference': 'initial'}"
    )
    raw["callbacks"][old_key] = raw["callbacks"].pop("WeightPenalty")
    torch.save(raw, tmp_path / "old.ckpt")
    cb = WeightPenalty(l2=0.5, reference="initial")
    fit(ZeroGrad(sgd()), [cb], max_epochs=2, ckpt_path=tmp_path / "old.ckpt")
    assert cb.state_dict()["steps"] == [2 * STEPS_PER_EPOCH]
    assert all(torch.equal(ref, start[n]) for n, ref in cb.state_dict()["refs"].items())


@pytest.mark.parametrize(
    ("make", "needed"),
    [
        (lambda **kw: WeightPenalty(l2=0.5, reference="initial", **kw), "L2-SP reference"),
        (lambda **kw: WeightPenalty(l2=Linear(0.5, 0.0, 100), **kw), "step count of the `l2`"),
        (lambda **kw: WeightDecay(Linear(0.5, 0.0, 100), **kw), "`weight_decay` schedule"),
    ],
    ids=["l2sp", "penalty-schedule", "decay-schedule"],
)
def test_resume_without_the_needed_state_is_refused_unless_restart_is_asked(
    make: Any, needed: str, tmp_path: Path
) -> None:
    """A checkpoint written without the callback has no reference and no step count for it: refused, with
    the way out; ``missing_state='restart'`` starts afresh from the resumed weights (and step 0)."""
    ckpt = checkpoint(Lit(sgd()), [], 1, tmp_path / "without.ckpt")
    with pytest.raises(MisconfigurationException, match=rf"(?s)no saved state.*{needed}.*missing_state='restart'"):
        fit(ZeroGrad(sgd()), [make()], max_epochs=2, ckpt_path=ckpt)

    resumed = ZeroGrad(sgd(0.1))
    cb = make(missing_state="restart")
    with pytest.warns(UserWarning, match="afresh"):
        fit(resumed, [cb], max_epochs=2, ckpt_path=ckpt)
    assert cb.state_dict()["steps"] == [STEPS_PER_EPOCH]  # counted from 0 at the resume
    if isinstance(cb, WeightPenalty) and cb.state_dict()["refs"]:
        at_ckpt = torch.load(ckpt, weights_only=False)["state_dict"]
        for name, ref in cb.state_dict()["refs"].items():
            assert torch.equal(ref, at_ckpt[name]), name  # the reference: the resumed weights
        assert all(torch.equal(w, at_ckpt[n]) for n, w in weights(resumed).items()), "w == w0: nothing moves"


def test_resume_from_an_entry_without_references_is_refused_for_initial_reference(tmp_path: Path) -> None:
    """Same key, but the entry was written by a penalty without a reference: "initial" cannot get the first
    fit's weights from it (taking the resumed weights would silently change the run)."""
    ckpt = checkpoint(Lit(sgd()), [WeightPenalty(l2=0.5)], 1, tmp_path / "plain-l2.ckpt")
    with pytest.raises(MisconfigurationException, match=r"(?s)lacks the L2-SP reference.*missing_state='restart'"):
        fit(ZeroGrad(sgd()), [WeightPenalty(l2=0.5, reference="initial")], max_epochs=2, ckpt_path=ckpt)
    cb = WeightPenalty(l2=0.5, reference="initial", missing_state="restart")
    with pytest.warns(UserWarning, match="lacks the L2-SP reference; starting afresh"):
        fit(ZeroGrad(sgd()), [cb], max_epochs=2, ckpt_path=ckpt)
    assert cb.state_dict()["steps"] == [2 * STEPS_PER_EPOCH]  # the step count of the entry goes on


def test_two_instances_of_one_class_keep_their_own_state(tmp_path: Path) -> None:
    """Two WeightPenalty with disjoint rules: each resumes its own reference (keys from the rules); the
    same with explicit names; two instances with one key are refused by the Trainer."""
    first, last = DecayRules(exclude=["net.3.*"]), DecayRules(exclude=["net.0.*"])
    module = Lit(sgd(0.1, momentum=0.9))
    start = weights(module)
    make = [lambda: WeightPenalty(l2=0.5, reference="initial", rules=first), lambda: WeightPenalty(l1=0.01, rules=last)]
    ckpt = checkpoint(module, [m() for m in make], 1, tmp_path / "two.ckpt")
    callbacks = [m() for m in make]
    fit(Lit(sgd(0.1, momentum=0.9), seed=11), callbacks, max_epochs=2, ckpt_path=ckpt)
    assert set(callbacks[0].state_dict()["refs"]) == {"net.0.weight"}
    assert torch.equal(callbacks[0].state_dict()["refs"]["net.0.weight"], start["net.0.weight"])
    assert callbacks[1].state_dict()["steps"] == [2 * STEPS_PER_EPOCH]
    # Both rules changed: two entries of the class, two callbacks without theirs; which is which is unknown.
    moved = [
        WeightPenalty(l2=0.5, reference="initial", rules=DecayRules(exclude=["net.3.weight"])),
        WeightPenalty(l1=0.01, rules=DecayRules(exclude=["net.0.weight"])),
    ]
    with pytest.raises(MisconfigurationException, match="none of them unambiguously"):
        fit(Lit(sgd()), moved, max_epochs=2, ckpt_path=ckpt)
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `WeightPenalty`"):
        make_trainer([WeightPenalty(l1=0.01), WeightPenalty(l2=0.01)])
    named = [WeightPenalty(l1=0.01, name="a"), WeightPenalty(l1=0.02, name="b")]
    assert named[0].state_key != named[1].state_key
    assert WeightPenalty(l2=0.1).state_key == WeightPenalty(l2=0.9, l1=0.1).state_key == "WeightPenalty"


# ------------------------------------------------------------------------------ 3. validated state
@pytest.mark.parametrize(
    ("make", "edit", "field"),
    [
        (lambda: WeightDecay(0.1), lambda s: {**s, "steps": ["a"]}, "'steps'"),
        (lambda: WeightDecay(0.1), lambda s: {**s, "steps": [-1]}, "'steps'"),
        (lambda: WeightDecay(), lambda s: {**s, "taken_over": [[0, 0, "x", True]]}, "'taken_over'"),
        (lambda: WeightDecay(), lambda s: {**s, "taken_over": [[3, 0, 0.1, True]]}, "'taken_over'"),
        (lambda: WeightPenalty(l2=0.1, reference="initial"), lambda s: {**s, "refs": None}, "'refs'"),
        (lambda: WeightPenalty(l2=0.1, reference="initial"), lambda s: {**s, "refs": {"w": [1.0]}}, "'refs'"),
    ],
    ids=["steps-type", "steps-negative", "taken-over-type", "taken-over-index", "refs-none", "refs-type"],
)
def test_malformed_checkpoint_state_fails_at_load_naming_the_field(
    make: Any, edit: Callable[[dict[str, Any]], dict[str, Any]], field: str, tmp_path: Path
) -> None:
    cb = make()
    optimizer = sgd(0.1, 0.1) if cb.__class__ is WeightDecay and cb.takes_over else sgd(0.1)
    ckpt = checkpoint(Lit(optimizer), [cb], 1, tmp_path / "good.ckpt")
    raw = torch.load(ckpt, weights_only=False)
    raw["callbacks"][cb.state_key] = edit(raw["callbacks"][cb.state_key])
    torch.save(raw, tmp_path / "bad.ckpt")

    class NoStep(Callback):  # the error must come at load time, before any step
        def on_train_batch_start(self, *args: Any) -> None:
            raise AssertionError("a step started")

    with pytest.raises(ValueError, match=field):
        fit(Lit(optimizer), [make(), NoStep()], max_epochs=2, ckpt_path=tmp_path / "bad.ckpt")


class RestoresAfterSetup(SingleDeviceStrategy):
    """Lightning's single-device strategy restoring callbacks after its setup, as FSDP and ModelParallel do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def no_optimizer(module: nn.Module) -> Any:
    raise AssertionError("configure_optimizers ran: the entry was not refused at load")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda state: state["refs"].update({"net.0.weight": torch.zeros(3, 3)}),
            r"'refs\['net.0.weight'\]' has shape \(3, 3\)",
        ),
        (lambda state: state.update(steps=[STEPS_PER_EPOCH + 1]), r"'steps'.*global_step \(4\)"),
        (lambda state: state.update(steps=[1, 1]), r"'steps' has 2 step count.*1 optimizer"),
    ],
    ids=["refs-shape", "steps-beyond-global-step", "steps-per-optimizer"],
)
@pytest.mark.parametrize("restores_after_setup", [False, True], ids=["at-load", "at-train-start"])
def test_references_of_another_shape_or_mismatched_steps_are_refused_at_load(
    edit: Callable[[dict[str, Any]], None], match: str, restores_after_setup: bool, tmp_path: Path
) -> None:
    """A real checkpoint edited on disk. With an ordinary strategy, Lightning restores callbacks before its
    setup: the entry is refused right at load, before ``configure_optimizers``. A strategy that restores after
    its setup (FSDP, ModelParallel) still gets the refusal when training starts, before the first step."""
    ckpt, _ = l2sp_checkpoint(tmp_path)
    raw = torch.load(ckpt, weights_only=False)
    edit(raw["callbacks"]["WeightPenalty"])
    torch.save(raw, tmp_path / "edited.ckpt")

    class NoStep(Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            raise AssertionError("a step started")

    kw: dict[str, Any] = {"strategy": RestoresAfterSetup(torch.device("cpu"))} if restores_after_setup else {}
    module = Lit(sgd() if restores_after_setup else no_optimizer)
    with pytest.raises(ValueError, match=match):
        fit(module, [WeightPenalty(l2=0.5, reference="initial"), NoStep()], 2, ckpt_path=tmp_path / "edited.ckpt", **kw)


# ----------------------------------------------------------------------- 4. one callback, several fits
def test_one_callback_object_in_two_fits_starts_clean_the_second_time() -> None:
    """The L2-SP reference, step count and taken-over decay of the first fit are not carried into the
    second (a model of other shapes): its reference is its own start, so with zero data gradients nothing
    moves; the take-over reads the second optimizer, which has no decay."""
    penalty, decay = WeightPenalty(l2=0.5, reference="initial"), WeightDecay()
    fit(Lit(sgd(0.1, momentum=0.9)), [penalty], max_epochs=2)
    fit(Lit(sgd(0.1, 0.05)), [decay], max_epochs=1)
    assert decay.state_dict()["taken_over"] == [[0, 0, 0.05, False]]

    second = ZeroGrad(sgd(0.1), hidden_layers=2, seed=5)  # other shapes: net.3 is 8x8 here
    start = weights(second)
    fit(second, [penalty], max_epochs=1)
    assert all(torch.equal(start[n], w) for n, w in weights(second).items())
    assert penalty.state_dict()["steps"] == [STEPS_PER_EPOCH]
    assert {n: r.shape for n, r in penalty.state_dict()["refs"].items()} == {
        d.name: d.param.shape for d in DecayRules().classify(second).decay
    }
    third = ZeroGrad(sgd(0.1))
    start = weights(third)
    with pytest.warns(UserWarning, match="found no weight_decay to take over"):
        fit(third, [decay], max_epochs=1)
    assert decay.state_dict()["taken_over"] == []
    assert all(torch.equal(start[n], w) for n, w in weights(third).items())


# ----------------------------------------------------------------------- 5. optimizers rebuilt mid-fit
class RebuildOptimizersAtEpoch(Callback):
    """At the start of epoch ``epoch``, swaps the module's optimizer factory and calls Lightning's
    documented ``trainer.strategy.setup_optimizers(trainer)``. ``late``: in the epoch's first
    ``on_train_batch_start`` instead, after the regularizer's own (placed after it in the callbacks), so
    that the regularizer first meets the new optimizer inside its step."""

    def __init__(self, epoch: int, make: Callable[[nn.Module], Any], late: bool = False) -> None:
        self.epoch, self.make, self.late = epoch, make, late

    def rebuild(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            pl_module.optimizer_fn = self.make
            trainer.strategy.setup_optimizers(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.late:
            self.rebuild(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if self.late and i == 0:
            self.rebuild(trainer, pl_module)


@pytest.mark.parametrize(
    ("callback", "first", "second", "factor"),
    [
        (lambda: WeightDecay(), sgd(0.1, 0.05), sgd(0.1, 0.1), (1 - 0.1 * 0.05) ** 4 * (1 - 0.1 * 0.1) ** 4),
        (lambda: WeightPenalty(l2=0.2), sgd(0.1), sgd(0.05), (1 - 0.1 * 0.2) ** 4 * (1 - 0.05 * 0.2) ** 4),
        (lambda: WeightDecay(0.2), sgd(0.1), sgd(0.05), (1 - 0.1 * 0.2) ** 4 * (1 - 0.05 * 0.2) ** 4),
    ],
    ids=["take-over", "penalty", "decay"],
)
@pytest.mark.parametrize("late", [False, True], ids=["epoch-start", "inside-step"])
def test_optimizers_rebuilt_mid_fit_are_followed(
    callback: Any, first: Any, second: Any, factor: float, late: bool
) -> None:
    """Epoch 0 with one optimizer, epoch 1 with a new one: the callback regularizes through the new one
    (and takes its weight_decay over); only the decayed weights move, by the exact product of factors."""
    module = ZeroGrad(first)
    start = weights(module)
    cb = callback()
    rebuild = RebuildOptimizersAtEpoch(1, second, late)
    trainer = fit(module, [cb, rebuild] if late else [rebuild, cb], max_epochs=2)
    assert trainer.optimizers[0].param_groups[0]["lr"] == second(make_net()).param_groups[0]["lr"]
    assert trainer.optimizers[0].param_groups[0]["weight_decay"] == 0.0
    assert_factor(start, weights(module), {n: factor for n in decay_names(module)})
    assert cb.state_dict()["steps"] == [2 * STEPS_PER_EPOCH]


# --------------------------------------------------------------------------------- 6. frozen mid-fit
class FreezeAtEpoch(Callback):
    def __init__(self, epoch: int, name: str) -> None:
        self.epoch, self.name = epoch, name
        self.at_freeze: Tensor | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            p = pl_module.get_parameter(self.name)
            p.requires_grad_(False)
            self.at_freeze = p.detach().clone()


@pytest.mark.parametrize(
    "callback",
    [
        lambda: WeightPenalty(l1=0.05, l1_mode="proximal"),
        lambda: WeightPenalty(l1=0.05),
        lambda: WeightPenalty(l2=0.5),
        lambda: WeightDecay(0.5),
    ],
    ids=["proximal", "subgradient", "l2", "decay"],
)
def test_a_parameter_frozen_mid_fit_is_not_touched(callback: Any) -> None:
    """``requires_grad=False`` at epoch 1: no gradient, so the optimizer does not step it and no regularizer
    may move it (the proximal step soft-thresholded it before)."""
    freeze = FreezeAtEpoch(1, "net.0.weight")
    module = Lit(sgd(0.1, momentum=0.9))
    fit(module, [freeze, callback()], max_epochs=2)
    assert freeze.at_freeze is not None
    assert torch.equal(module.net[0].weight.detach(), freeze.at_freeze)
    assert not torch.equal(module.net[3].weight.detach(), Lit(sgd()).net[3].weight.detach())


# ------------------------------------------------------------------------- 7. unfreezing BaseFinetuning
class UnfreezeWithHelper(BaseFinetuning):
    def __init__(self, **kw: Any) -> None:
        super().__init__()
        self.kw = kw

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            unfreeze_and_add_decay_groups(pl_module.net[0], optimizer, lr=0.05, **self.kw)


class UnfreezeFlat(UnfreezeWithHelper):
    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=0.05)


def test_unfrozen_module_joins_as_decay_and_no_decay_groups() -> None:
    """The unfrozen ``net.0`` joins with its weight decayed at the optimizer's decay (exactly
    ``(1 - lr * wd) ** steps`` with zero data gradients) and its bias left alone; Lightning's flat group
    decays the bias too."""
    lam, lr = 0.3, 0.05

    def trainable(m: nn.Module) -> torch.optim.Optimizer:
        # net.0 is frozen here: the groups leave it out. The decay group inherits the default weight_decay.
        return torch.optim.SGD(decay_param_groups(m), lr=0.1, weight_decay=lam, foreach=False)

    module = ZeroGrad(trainable)
    start = weights(module)
    trainer = fit(module, [UnfreezeWithHelper()], max_epochs=3)
    after = weights(module)
    torch.testing.assert_close(after["net.0.weight"], start["net.0.weight"] * (1 - lr * lam) ** 8, rtol=1e-6, atol=0.0)
    assert torch.equal(after["net.0.bias"], start["net.0.bias"])
    names = [g["name"] for g in trainer.optimizers[0].param_groups]
    assert names[-2:] == ["unfrozen/decay", "unfrozen/no_decay"]
    assert [g["weight_decay"] for g in trainer.optimizers[0].param_groups[-2:]] == [lam, 0.0]

    flat = ZeroGrad(trainable)
    fit(flat, [UnfreezeFlat()], max_epochs=3)
    assert not torch.equal(weights(flat)["net.0.bias"], start["net.0.bias"]), "the flat group decays the bias"


class HookedZeroGrad(ZeroGrad):
    """A model-level ``no_weight_decay()`` (timm's hook) naming a weight of the module unfrozen later."""

    def no_weight_decay(self) -> set[str]:
        return {"net.0.weight"}


class UnfreezeWithModel(UnfreezeWithHelper):
    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            unfreeze_and_add_decay_groups(pl_module.net[0], optimizer, lr=0.05, model=pl_module)


def test_unfreezing_with_the_model_uses_the_fits_plan() -> None:
    """With ``model=``, the unfrozen parameters are classified as part of the whole model, as the callbacks
    and the groups see them: the model's ``no_weight_decay()`` keeps ``net.0.weight`` out of the decay group,
    so with zero data gradients it does not move; ``net.0`` classified by itself misses the hook and decays
    it by exactly ``(1 - lr * wd) ** steps``."""
    lam, lr = 0.3, 0.05

    def trainable(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(decay_param_groups(m), lr=0.1, weight_decay=lam, foreach=False)

    for unfreeze, moves in ((UnfreezeWithModel(), False), (UnfreezeWithHelper(), True)):
        module = HookedZeroGrad(trainable)
        start = weights(module)
        trainer = fit(module, [unfreeze], max_epochs=3)
        after = weights(module)["net.0.weight"]
        if moves:
            want = start["net.0.weight"] * (1 - lr * lam) ** (2 * STEPS_PER_EPOCH)
            torch.testing.assert_close(after, want, rtol=1e-6, atol=0.0)
        else:
            assert torch.equal(after, start["net.0.weight"])
        added = {g["name"]: g["params"] for g in trainer.optimizers[0].param_groups if "unfrozen" in g["name"]}
        net0 = module.net[0]
        if moves:
            assert added == {"unfrozen/decay": [net0.weight], "unfrozen/no_decay": [net0.bias]}
        else:  # as the fit's plan says
            assert added == {"unfrozen/no_decay": [net0.weight, net0.bias]}
            assert not DecayRules().classify(module).is_decayed(net0.weight)


# ------------------------------------------------------------------------ SIGKILL mid-run, resume last
KILL_AT_STEP = STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2  # in the middle of epoch 1
KILL_EPOCHS = 3


def all_callbacks() -> list[Callback]:
    """Every callback of the package at once: a decay schedule, L2-SP with proximal L1, the monitor."""
    return [
        WeightDecay(Linear(0.3, 0.0, 3 * STEPS_PER_EPOCH), rules=DecayRules(exclude=["net.3.*"])),
        WeightPenalty(l2=0.5, reference="initial", l1=0.01, l1_mode="proximal", rules=DecayRules(exclude=["net.0.*"])),
        WeightNormMonitor(),
    ]


def kill_fit(out: Path, ckpt_path: Any = None, kill_at: int | None = None) -> tuple[Lit, list[Callback]]:
    """A fit with every callback and ``ModelCheckpoint(save_last=True, every_n_train_steps=STEPS_PER_EPOCH)``
    (a checkpoint at each epoch boundary); with ``kill_at``, the process SIGKILLs itself after that step."""

    class Kill(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    module = Lit(
        lambda m: torch.optim.Adam(m.parameters(), lr=0.01, foreach=False), seed=0 if ckpt_path is None else 11
    )
    callbacks = all_callbacks()
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_train_steps=STEPS_PER_EPOCH, save_top_k=-1)
    trainer = make_trainer(
        [*callbacks, Kill(), ckpt],
        max_epochs=KILL_EPOCHS,
        logger=CSVLogger(out / "logs"),
        log_every_n_steps=2,
        enable_checkpointing=True,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return module, callbacks


def test_sigkill_mid_run_then_resume_from_last_is_bitwise_uninterrupted(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    killed = subprocess.run(
        [sys.executable, "-m", "tests.test_lifecycle", str(tmp_path / "killed"), str(KILL_AT_STEP)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "killed" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == STEPS_PER_EPOCH  # the epoch boundary before

    resumed, resumed_cbs = kill_fit(tmp_path / "resumed", ckpt_path=last)
    full, full_cbs = kill_fit(tmp_path / "full")
    for name, w in weights(full).items():
        assert torch.equal(w, weights(resumed)[name]), name
    for a, b in zip(full_cbs[:2], resumed_cbs[:2], strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa["steps"] == sb["steps"] == [KILL_EPOCHS * STEPS_PER_EPOCH]
        for name, ref in sa.get("refs", {}).items():
            assert torch.equal(ref, sb["refs"][name]), name


if __name__ == "__main__":  # the process that test_sigkill_mid_run_then_resume_from_last_is_bitwise_uninterrupted kills
    kill_fit(Path(sys.argv[1]), kill_at=int(sys.argv[2]))
    raise SystemExit("not killed")
