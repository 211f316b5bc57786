"""DecayGroupsMixin: groups, default configure_optimizers, scheduler, plan summary, through real fits."""

from __future__ import annotations

import functools
import logging

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_decay import DecayGroupsMixin, DecayRules, decay_param_groups


def _data(n: int = 32) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


class Net(DecayGroupsMixin, pl.LightningModule):
    def __init__(self, optimizer=None, lr_scheduler=None, **kwargs) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 1))
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        for k, v in kwargs.items():
            setattr(self, k, v)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


def _fit(model: pl.LightningModule, epochs: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, _data())
    return trainer


class Reference(pl.LightningModule):
    """Independent reference: the hand-written configure_optimizers users write today."""

    def __init__(self, weight_decay: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 1))
        self.weight_decay = weight_decay

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        decay = [self.net[0].weight, self.net[3].weight]
        rest = [self.net[0].bias, self.net[1].weight, self.net[1].bias, self.net[3].bias]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=0.05
        )


def test_mixin_class_plus_kwargs_matches_hand_written_groups() -> None:
    model = Net(optimizer=torch.optim.AdamW, optimizer_kwargs={"lr": 0.05, "weight_decay": 0.1})
    trainer = _fit(model)
    ref = Reference(0.1)
    _fit(ref)
    groups = trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_mixin_partial_factory_and_scheduler_drives_every_group() -> None:
    model = Net(
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, weight_decay=0.01),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        lr_scheduler_config={"interval": "epoch"},
    )
    trainer = _fit(model, epochs=3)
    groups = trainer.optimizers[0].param_groups
    # weight_decay=None in the mixin: the factory's own weight_decay reaches the decay group only.
    assert {g["name"]: g["weight_decay"] for g in groups} == {"decay": 0.01, "no_decay": 0.0}
    assert all(g["lr"] == pytest.approx(0.1 * 0.5**3) for g in groups)


def test_mixin_uses_class_rules_and_overrides() -> None:
    class HeadFast(Net):
        decay_rules = DecayRules(exclude=["net.3.*"])
        decay_overrides = {"net.0.*": {"lr": 0.5}}

    model = HeadFast(optimizer=functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.2))
    optimizer = model.configure_optimizers()
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert set(by_name) == {"no_decay", "net.0.*/decay", "net.0.*/no_decay"}
    assert by_name["net.0.*/decay"]["lr"] == 0.5 and by_name["net.0.*/decay"]["weight_decay"] == 0.2
    assert by_name["no_decay"]["params"] == [
        model.net[1].weight,
        model.net[1].bias,
        model.net[3].weight,
        model.net[3].bias,
    ]


def test_mixin_logs_plan_summary_once(caplog: pytest.LogCaptureFixture) -> None:
    model = Net(optimizer=torch.optim.AdamW)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        _fit(model, epochs=1)
        model.decay_param_groups()
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DecayPlan:")]
    assert summaries == [model.decay_plan().summary()]


def test_mixin_without_optimizer_is_a_clear_error() -> None:
    with pytest.raises(AttributeError, match=r"self\.optimizer"):
        Net().configure_optimizers()
    with pytest.raises(TypeError, match=r"self\.optimizer"):
        Net(optimizer=3).configure_optimizers()


def test_mixin_groups_equal_the_functional_shortcut() -> None:
    model = Net()
    ours = model.decay_param_groups(0.3, lr=1e-3)
    theirs = decay_param_groups(model, 0.3, lr=1e-3)
    assert [(g["name"], g["weight_decay"], g["lr"], g["params"]) for g in ours] == [
        (g["name"], g["weight_decay"], g["lr"], g["params"]) for g in theirs
    ]
