"""One classification per fit: the callbacks, the L2-SP references, the monitor and the mixin share a plan,
and a changed set of parameters gives a fresh one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decay import DecayGroupsMixin, DecayRules, WeightDecay, WeightNormMonitor, WeightPenalty
from lightning_decay._plan_cache import plan_for


class MixinModel(DecayGroupsMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
        self.optimizer = torch.optim.Adam

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


def test_one_classification_per_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    classify = DecayRules.classify

    def counting(self: DecayRules, module: nn.Module, include_frozen: bool = False) -> Any:
        calls.append(id(module))
        return classify(self, module, include_frozen)

    monkeypatch.setattr(DecayRules, "classify", counting)
    model = MixinModel()
    callbacks = [
        WeightDecay(0.1, rules=DecayRules(exclude=["net.2.*"])),
        WeightPenalty(l2=1e-2, reference="initial", rules=DecayRules(include=["net.2.weight"], exclude=["net.0.*"])),
        WeightNormMonitor(log_update_ratio=True),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        callbacks=callbacks,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    trainer.fit(model, DataLoader(TensorDataset(x, x[:, :1]), batch_size=4))
    # Three distinct rules: the mixin's and the monitor's (both DecayRules()), the decay's, the penalty's.
    assert len(calls) == 3 and set(calls) == {id(model)}
    # Sharing did not mix them up: each callback regularizes what its own rules say.
    wd, penalty = callbacks[0], callbacks[1]
    assert wd._binding.plan is not None and wd._binding.plan.decay_names == ["net.0.weight"]
    assert penalty._binding.plan is not None and penalty._binding.plan.decay_names == ["net.2.weight"]
    assert sorted(penalty._references.refs) == ["net.2.weight"]


def test_equal_rules_share_a_plan_and_different_rules_do_not() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    plan = plan_for(DecayRules(), model, include_frozen=True)
    assert plan_for(DecayRules(), model, include_frozen=True).decisions is plan.decisions  # not classified again
    other = plan_for(DecayRules(decay_bias=True), model, include_frozen=True)
    assert other is not plan and other["0.bias"].decay and not plan["0.bias"].decay
    rules = DecayRules()
    rules.exclude = ("0.*",)  # options changed after construction: a new key
    assert not plan_for(rules, model, include_frozen=True)["0.weight"].decay


def test_changed_parameters_give_a_fresh_plan() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    rules = DecayRules()
    first = plan_for(rules, model)
    model.append(nn.Linear(2, 3))  # a new head
    second = plan_for(rules, model)
    assert second.decisions is not first.decisions and second.decay_names == ["0.weight", "2.weight"]
    model[0].weight = nn.Parameter(torch.zeros(2, 2))  # a replaced parameter
    third = plan_for(rules, model)
    assert third["0.weight"].param is model[0].weight
    # Freezing needs no new classification, but is seen.
    model[2].requires_grad_(False)
    frozen = plan_for(rules, model)
    assert frozen.frozen == ("2.weight", "2.bias") and "2.weight" not in frozen.decay_names
    assert [(d.name, d.decay, d.reason) for d in frozen] == [(d.name, d.decay, d.reason) for d in rules.classify(model)]
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="all 6 are frozen"):
        plan_for(rules, model)


def test_cache_does_not_keep_a_model_alive() -> None:
    import gc
    import weakref

    model = nn.Linear(2, 2)
    plan_for(DecayRules(predicate=lambda n, p, m: None), model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
