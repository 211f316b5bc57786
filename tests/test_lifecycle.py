"""The life of a run: binding without a Trainer, resume, reuse, optimizers replaced, frozen and unfrozen
parameters (issue #11).

Each case runs a real ``Trainer.fit`` with real checkpoints and checks the weights against an independent
reference. Many use a zero data gradient (``loss = 0 * output``) and plain SGD, so that only the
regularization moves the weights and a decayed weight is exactly ``w * (1 - lr * wd) ** steps`` (up to the
float32 rounding of ``steps`` multiplications) while the others do not move at all.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_decay import DecayRules, WeightDecay, WeightPenalty, decay_param_groups
from tests.test_penalty import BATCH, N_SAMPLES, Lit, dataset, loader, make_net, make_trainer, weights

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


def params(module: nn.Module) -> dict[str, Tensor]:
    return weights(module)


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
@pytest.mark.parametrize(
    ("callback", "plain", "reference"),
    [
        (
            lambda: WeightDecay(0.1),
            lambda m: torch.optim.Adam(m.parameters(), lr=0.01, foreach=False),
            lambda m: torch.optim.AdamW(decay_param_groups(m, weight_decay=0.1), lr=0.01, foreach=False),
        ),
        (
            lambda: WeightPenalty(l2=0.2),
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, foreach=False),
            lambda m: torch.optim.SGD(decay_param_groups(m, weight_decay=0.2), lr=0.1, momentum=0.9, foreach=False),
        ),
        (
            lambda: WeightDecay(),  # takes over SGD's coupled decay, on the decayed parameters only
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.2, foreach=False),
            lambda m: torch.optim.SGD(decay_param_groups(m, weight_decay=0.2), lr=0.1, momentum=0.9, foreach=False),
        ),
    ],
    ids=["decay", "penalty", "take-over-coupled"],
)
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
