"""What ``WeightNormMonitor`` reads of the run it measures: under a Trainer, or attached without one.

The monitor's work needs the optimizers, the loggers, the device, the GradScaler, the batch being run and
the step label, and whether this step logs. Both runs hold the monitor's binding
(``lightning_decay._binding.Binding``): its bound optimizers and bucket index are what the monitor measures.
`TrainerRun` reads the rest from a Trainer, live (the binding follows ``trainer.optimizers``, with no step
hooks); `AttachedRun` from the binding's step counts of the last optimizer (the label) and the loggers
``attach`` was given. Real, small classes: no stand-in Trainer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from lightning_decay._binding import Binding

__all__ = ["AttachedRun", "TrainerRun"]

#: ``logging_interval=None`` without a Trainer: every 50 steps, the Trainer's default ``log_every_n_steps``.
DEFAULT_INTERVAL = 50


class TrainerRun:
    """A Trainer, as the monitor reads it (made per hook call: the batch and its label are read once here)."""

    __slots__ = ("batch", "binding", "trainer")

    def __init__(self, trainer: Any, binding: Binding) -> None:
        self.trainer, self.binding = trainer, binding
        #: Which batch runs (every optimizer step of one batch has the same).
        self.batch: int = trainer.fit_loop.epoch_loop.batch_progress.total.ready

    @property
    def label(self) -> int:
        """The step label of this batch's metrics, as ``self.log`` gives it."""
        return self.trainer.fit_loop.epoch_loop._batches_that_stepped

    @property
    def optimizers(self) -> list[Optimizer]:
        return [entry.optimizer for entry in self.binding.bound]

    @property
    def loggers(self) -> list[Any]:
        return self.trainer.loggers

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device

    @property
    def scaler(self) -> Any:
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def should_log(self, interval: int | None) -> bool:
        trainer = self.trainer
        if not trainer.loggers:
            return False
        if interval is None:
            return trainer._logger_connector.should_update_logs
        return (self.label + 1) % interval == 0


class AttachedRun:
    """A monitor attached to optimizers: a step is one step of the last of them."""

    def __init__(self, binding: Binding, loggers: list[Any], device: torch.device) -> None:
        self.binding, self.loggers, self.device = binding, loggers, device

    @property
    def optimizers(self) -> list[Optimizer]:
        return [entry.optimizer for entry in self.binding.bound]

    @property
    def scaler(self) -> Any:
        return self.binding.scaler

    @property
    def label(self) -> int:
        steps = self.binding.steps
        return steps[-1] if steps else 0

    batch = label  # one batch per step of the last optimizer

    def should_log(self, interval: int | None) -> bool:
        return (self.label + 1) % (interval or DEFAULT_INTERVAL) == 0
