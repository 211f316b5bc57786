"""One set of rules for the run: callbacks given no ``rules`` use the LightningModule's ``decay_rules``, and a
callback whose rules disagree with the optimizer's named groups is reported at fit start."""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_decay import DecayGroupsMixin, DecayRules, WeightDecay, WeightNormMonitor


class Model(DecayGroupsMixin, pl.LightningModule):
    """Zero data gradient: only the decay callback moves the weights. SGD with weight_decay=0 in every group."""

    decay_rules = DecayRules(exclude=["a.*"])

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.optimizer = functools.partial(torch.optim.SGD, lr=0.1, weight_decay=0.0)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return 0.0 * self.b(self.a(batch[0])).sum()


def _fit(model: pl.LightningModule, *callbacks: pl.Callback, **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=3,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **{"logger": False, **kwargs},
    )
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 4)), batch_size=2)
    trainer.fit(model, data)
    return trainer


def test_callback_without_rules_uses_the_modules_decay_rules(recwarn: pytest.WarningsRecorder) -> None:
    model = Model()
    a, b = model.a.weight.detach().clone(), model.b.weight.detach().clone()
    _fit(model, WeightDecay(0.5))
    assert torch.equal(model.a.weight, a)  # excluded by the module's rules, as in the optimizer's groups
    torch.testing.assert_close(model.b.weight, b * (1 - 0.1 * 0.5) ** 3, rtol=1e-6, atol=0)
    assert not [w for w in recwarn if "optimizer holds" in str(w.message)]


def test_explicit_rules_that_decay_a_no_decay_group_are_reported() -> None:
    model = Model()
    a = model.a.weight.detach().clone()
    with pytest.warns(
        UserWarning, match=r"WeightDecay regularizes 'a\.weight', which the optimizer holds in a 'no_decay'"
    ):
        _fit(model, WeightDecay(0.5, rules=DecayRules()))
    torch.testing.assert_close(model.a.weight, a * (1 - 0.1 * 0.5) ** 3, rtol=1e-6, atol=0)  # as told


def test_explicit_rules_that_skip_a_decay_group_are_reported() -> None:
    with pytest.warns(UserWarning, match=r"leaves alone 'b\.weight', which the optimizer holds in a 'decay'"):
        _fit(Model(), WeightDecay(0.5, rules=DecayRules(exclude=["a.*", "b.*"])))


def test_monitor_without_rules_splits_totals_by_the_modules_rules(tmp_path: Any) -> None:
    model = Model()
    monitor = WeightNormMonitor()
    _fit(model, monitor, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    assert monitor.rules is Model.decay_rules


def test_module_decay_rules_of_the_wrong_type_is_an_error() -> None:
    model = Model()
    model.decay_rules = {"exclude": ["a.*"]}  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"decay_rules` must be a lightning_decay\.DecayRules"):
        _fit(model, WeightDecay(0.5))
