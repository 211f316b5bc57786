"""WeightDecay(timescale_epochs=tau): lambda = 1 / (lr0 * tau * S) per group, checked by exact shrink factors."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_decay import WeightDecay, decay_param_groups


class ZeroGrad(pl.LightningModule):
    """Zero data gradient (the loss is 0 * output): only the decay moves the weights."""

    def __init__(self, lrs: tuple[float, float] = (0.1, 0.1), scheduler: Any = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.lrs = lrs
        self.scheduler = scheduler

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return 0.0 * self.b(self.a(batch[0])).sum()

    def configure_optimizers(self) -> Any:
        # Two groups with different lrs; the no-decay groups (biases) with weight_decay 0 too.
        groups = [
            {"params": decay_param_groups(self.a, 0.0)[0]["params"], "lr": self.lrs[0], "weight_decay": 0.0},
            {"params": [self.a.bias, self.b.bias], "lr": self.lrs[0], "weight_decay": 0.0},
            {"params": [self.b.weight], "lr": self.lrs[1], "weight_decay": 0.0},
        ]
        opt = torch.optim.SGD(groups)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}


def _data(n: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(n, 4)), batch_size=1)


def _fit(model: pl.LightningModule, callback: WeightDecay, batches: int, **trainer: Any) -> pl.Trainer:
    t = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer,
        callbacks=[callback],
    )
    t.fit(model, _data(batches))
    return t


@pytest.mark.parametrize(
    ("batches", "accumulate", "limit", "max_steps", "steps_per_epoch"),
    [
        (6, 1, 1.0, -1, 6),  # two full epochs, 12 steps
        (10, 3, 1.0, 6, 4),  # ceil(10 / 3) = 4 steps per epoch (the last batch steps too); stops after 6
        (10, 2, 7, 5, 4),  # limit_train_batches=7 -> ceil(7 / 2) = 4; max_steps ends the run mid-epoch
    ],
)
def test_constant_lr_shrinks_by_one_minus_one_over_tau_s_per_step(
    batches: int, accumulate: int, limit: Any, max_steps: int, steps_per_epoch: int
) -> None:
    tau = 3.0
    model = ZeroGrad(lrs=(0.1, 0.02))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = WeightDecay(timescale_epochs=tau)
    trainer = _fit(
        model,
        callback,
        batches,
        max_epochs=2,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        limit_train_batches=limit,
    )
    steps = trainer.global_step
    assert steps == (max_steps if max_steps > 0 else 2 * steps_per_epoch)
    # Both weight matrices -- lr 0.1 and 0.02, so lambda 1/(0.1 tau S) and 1/(0.02 tau S) -- shrink alike.
    factor = (1 - 1 / (tau * steps_per_epoch)) ** steps
    for name in ("a.weight", "b.weight"):
        torch.testing.assert_close(model.get_parameter(name), before[name] * factor, rtol=1e-6, atol=0)
    for name in ("a.bias", "b.bias"):
        assert torch.equal(model.get_parameter(name), before[name])
    assert callback.derived_weight_decay(0, 2) == pytest.approx(1 / (0.02 * tau * steps_per_epoch))


def test_scheduled_lr_uses_initial_lr_as_lr0() -> None:
    # lr halves every step from 0.1: lambda from initial_lr 0.1, the shrink of step k is lr_k / (0.1 tau S).
    tau, batches = 2.0, 4
    model = ZeroGrad(lrs=(0.1, 0.1), scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    before = model.a.weight.detach().clone()
    _fit(model, WeightDecay(timescale_epochs=tau), batches, max_epochs=1)
    factor = math.prod(1 - 0.1 * 0.5**k / (0.1 * tau * batches) for k in range(batches))
    torch.testing.assert_close(model.a.weight, before * factor, rtol=1e-6, atol=0)


def test_each_group_is_explained_at_fit_start(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        _fit(ZeroGrad(lrs=(0.1, 0.05)), WeightDecay(timescale_epochs=5), 4, max_epochs=1)
    lines = [r.getMessage() for r in caplog.records if "tau=5 epochs" in r.getMessage()]
    assert len(lines) == 2  # the two groups holding decayed weights; the biases' group is not decayed
    assert "lr0=0.1, S=4 steps/epoch, tau=5 epochs -> weight_decay=0.5" in lines[0]
    assert "lr0=0.05, S=4 steps/epoch, tau=5 epochs -> weight_decay=1" in lines[1]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"timescale_epochs": 0}, ValueError, "timescale_epochs"),
        ({"timescale_epochs": float("inf")}, ValueError, "timescale_epochs"),
        ({"timescale_epochs": "10"}, TypeError, "timescale_epochs"),
        ({"timescale_epochs": 10, "weight_decay": 0.1}, ValueError, "not both"),
        ({"timescale_epochs": 10, "mode": "constant"}, ValueError, "mode='lr'"),
    ],
)
def test_bad_timescale_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        WeightDecay(**kwargs)


def test_unknown_epoch_length_is_refused() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(torch.randn(4),) for _ in range(3)])

    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[WeightDecay(timescale_epochs=1)],
    )
    with pytest.raises(MisconfigurationException, match="no length"):
        trainer.fit(ZeroGrad(), torch.utils.data.DataLoader(Stream(), batch_size=1))


def test_timescale_shorter_than_a_step_is_refused() -> None:
    # tau * S = 0.2 * 4 <= 1: the factor 1 - 1/(tau S) would flip the weights.
    with pytest.raises(MisconfigurationException, match="tau must exceed 1/S"):
        _fit(ZeroGrad(), WeightDecay(timescale_epochs=0.2), 4, max_epochs=1)
