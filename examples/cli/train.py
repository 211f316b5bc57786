"""LightningCLI with decay / no-decay groups, two ways, on scikit-learn's digits.

1. ``mixin.yaml``: the model inherits :class:`~lightning_decay.DecayGroupsMixin` and receives its optimizer
   and scheduler as ``OptimizerCallable`` / ``LRSchedulerCallable`` arguments (Lightning's recommended
   pattern). ``model.optimizer: {class_path: torch.optim.AdamW, init_args: {weight_decay: 0.05}}`` decays
   the Linear weights at 0.05 and gives biases and LayerNorm parameters ``weight_decay=0.0``. Plain
   ``LightningCLI`` works the same for this model.
2. ``callbacks.yaml``: a plain model without ``configure_optimizers``; :class:`~lightning_decay.DecayLightningCLI`
   builds the automatic top-level ``optimizer:`` / ``lr_scheduler:`` sections over the decay / no-decay
   groups (plain ``LightningCLI`` would build one flat group), and ``trainer.callbacks`` adds
   ``WeightDecay`` (decoupled decay for Adam) and ``WeightNormMonitor``.

Usage::

    python examples/cli/train.py fit --config examples/cli/mixin.yaml
    python examples/cli/train.py fit --config examples/cli/callbacks.yaml
    python examples/cli/train.py fit --config examples/cli/mixin.yaml --print_config   # the full config
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decay import DecayGroupsMixin, DecayLightningCLI


class DigitsDataModule(LightningDataModule):
    """scikit-learn's bundled 8x8 digits: the first ``n_train`` images train, the rest validate."""

    def __init__(self, batch_size: int = 64, n_train: int = 1200) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.n_train = n_train

    def setup(self, stage: str) -> None:
        x, y = load_digits(return_X_y=True)
        x = torch.as_tensor(x / 16.0, dtype=torch.float32)
        y = torch.as_tensor(y)
        self.train_set = TensorDataset(x[: self.n_train], y[: self.n_train])
        self.val_set = TensorDataset(x[self.n_train :], y[self.n_train :])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)


class Classifier(LightningModule):
    """An MLP with a LayerNorm. No ``configure_optimizers``: the CLI's ``optimizer:`` section provides it."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())


class MixinClassifier(DecayGroupsMixin, Classifier):
    """The same network; its optimizer and scheduler are injected, its groups come from the mixin.

    Args:
        hidden: Width of the hidden layer.
        optimizer: Called with the decay / no-decay parameter groups (``DecayGroupsMixin.configure_optimizers``).
        lr_scheduler: Called with the optimizer, optional.
    """

    def __init__(
        self,
        hidden: int = 256,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(hidden)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler


class PrintGroups(Callback):
    """Print the optimizer's param groups once training starts, to see what was built (after a resumed
    optimizer was restored and ``WeightDecay()`` took its decay over)."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for opt in trainer.optimizers:
            for g in opt.param_groups:
                print(
                    f"{type(opt).__name__} group {g.get('name')!r}: {len(g['params'])} tensors, "
                    f"lr={g['lr']:g}, weight_decay={g['weight_decay']:g}"
                )


def main(args: list[str] | None = None, run: bool = True) -> DecayLightningCLI:
    """Run the CLI (``args=None`` reads ``sys.argv``); returns it so tests can inspect ``cli.trainer``."""
    return DecayLightningCLI(
        Classifier,
        DigitsDataModule,
        subclass_mode_model=True,  # `model: class_path: MixinClassifier` or `Classifier` in the YAML
        seed_everything_default=0,
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
