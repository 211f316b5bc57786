"""A user's script, type-checked with ``mypy --strict`` by tests/test_typing.py (and run there too).

It uses the public API the way the docs do: a plain loop with ``attach``, a Fabric-style monitor, and a
``LightningModule`` with ``DecayGroupsMixin``. Every name here must keep its precise type: an ``Any``
would let a typo such as ``attachment.remov()`` through.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.types import OptimizerLRScheduler

from lightning_decay import (
    Attachment,
    DecayGroupsMixin,
    DecayRules,
    WeightDecay,
    WeightNormMonitor,
    WeightPenalty,
    attach,
    decay_param_groups,
)


class Net(DecayGroupsMixin, pl.LightningModule):
    decay_rules = DecayRules(decay_bias=False)

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.AdamW

    def configure_optimizers(self) -> OptimizerLRScheduler:
        return super().configure_optimizers()


def plain_loop(log_dir: str) -> list[int]:
    """Three steps of SGD with decoupled decay and a monitor; the decay's step counts."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(decay_param_groups(model, weight_decay=0.0), lr=0.1)
    decay = WeightDecay(0.05).attach(model, optimizer)  # no annotation: the return type must be precise
    monitor = WeightNormMonitor(logging_interval=1).attach(model, optimizer, CSVLogger(log_dir))
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    state: dict[str, Any] = decay.state_dict()
    decay.load_state_dict(state)
    steps: list[int] = decay.steps
    decay.remove()
    monitor.remove()
    penalty: Attachment
    with attach(WeightPenalty(l1=1e-3), model, optimizer) as penalty:
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        label: str = repr(penalty)
    assert label.startswith("Attachment(WeightPenalty(")
    return steps


def optimizer_of(net: Net) -> OptimizerLRScheduler:
    return net.configure_optimizers()
