"""Importable model and data for the LightningCLI tests (class paths in YAML must resolve)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lightning_decay import DecayGroupsMixin


class RegressionData(pl.LightningDataModule):
    def __init__(self, n: int = 32, batch_size: int = 8) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(self.n, 6, generator=g), torch.randn(self.n, 1, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=self.batch_size)


def build_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 1))


class PlainModel(pl.LightningModule):
    """No configure_optimizers: LightningCLI's automatic --optimizer provides it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


class InjectedModel(DecayGroupsMixin, PlainModel):
    """The dependency-injection pattern Lightning's CLI docs recommend, with the mixin's groups."""

    def __init__(
        self, optimizer: OptimizerCallable = torch.optim.AdamW, lr_scheduler: LRSchedulerCallable | None = None
    ) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
