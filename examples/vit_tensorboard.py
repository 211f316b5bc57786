"""A 12-block ViT on scikit-learn's digits, logged for TensorBoard's Custom Scalars tab.

Each 8x8 digit is cut into 16 patches of 2x2 pixels; a ViT of 12 pre-norm blocks (timm's layout:
``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
mlp.fc2}``, ``norm``, ``head``) trains with AdamW on the decay / no-decay groups. ``WeightNormMonitor`` logs
weight norms, update ratios and angular updates of its ~150 tensors and, through the ``TensorBoardLogger``,
a Custom Scalars layout: one category per metric, a chart per total, then per block in model order
(``blocks.2`` before ``blocks.10``) one chart of its decayed and one of its not-decayed tensors. The
screenshot in ``docs/img/custom_scalars.png`` is this run.

Usage::

    python examples/vit_tensorboard.py            # under a minute on 2 CPU cores
    tensorboard --logdir runs/vit_digits          # then open the "Custom Scalars" tab
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decay import DecayGroupsMixin, WeightNormMonitor


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d)})
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(d, 2 * d), "fc2": nn.Linear(2 * d, d)})

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.attn["qkv"](self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).unbind(2)
        y = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.attn["proj"](y.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp["fc2"](nn.functional.gelu(self.mlp["fc1"](self.norm2(x))))


class ViT(DecayGroupsMixin, LightningModule):
    """timm's ViT layout, small; ``no_weight_decay()`` keeps ``cls_token`` / ``pos_embed`` out of decay."""

    def __init__(self, depth: int = 12, d: int = 32, heads: int = 4, lr: float = 3e-3, weight_decay: float = 0.1):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, d, 2, stride=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)
        self.optimizer = torch.optim.AdamW
        self.optimizer_kwargs = {"lr": lr, "weight_decay": weight_decay}

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, 16, d)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images), labels)
        self.log("train/loss", loss)
        return loss


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/vit_digits"))
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--fast", action="store_true", help="3 steps, for the smoke test")
    args = p.parse_args(argv)
    seed_everything(0, verbose=False)
    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.as_tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.as_tensor(y))
    model = ViT()
    logger = TensorBoardLogger(save_dir=args.out, name="", default_hp_metric=False)
    monitor = WeightNormMonitor(log_update_ratio=True, log_angular_update=True)
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)  # keep the output to the last line
    try:
        trainer = Trainer(
            max_steps=3 if args.fast else args.max_steps,
            logger=logger,
            callbacks=[monitor],
            log_every_n_steps=1 if args.fast else 4,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec).*")
            trainer.fit(model, DataLoader(data, batch_size=64, shuffle=True))
    finally:
        log.setLevel(level)
    print(f"TensorBoard logs: tensorboard --logdir {args.out}  (the Custom Scalars tab)")
    return {"trainer": trainer, "log_dir": logger.log_dir, "layout": monitor.custom_scalars(model)}


if __name__ == "__main__":
    main()
