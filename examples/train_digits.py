"""The main job: an over-parameterized MLP on scikit-learn's digits, with and without weight decay.

Offline and on CPU: the 1797 8x8 digit images ship with scikit-learn. Half of them train a
64-512-512-10 MLP (about 300K weights for 900 images); the other half validate. To make
over-fitting visible on such an easy task, a fraction of the *training* labels is replaced by random
ones (``--label-noise``, 0.2 by default; validation labels stay clean): an unregularized network
memorizes the noise, its weights grow, and its validation accuracy drops.

Two runs start from the same initialization and see the same batches:

- ``no_decay``: AdamW with ``weight_decay=0.0`` (torch's AdamW default is 0.01, so it is set explicitly);
- ``decay``: AdamW with ``weight_decay=--weight-decay`` on the ``"decay"`` group of
  :class:`~lightning_decay.DecayGroupsMixin` (the Linear weights); biases get ``weight_decay=0.0``.

``WeightNormMonitor`` logs ``weight_norm/*`` (and update ratios) to TensorBoard under
``--out/{run}/version_N``; ``examples/plot_norms.py`` turns them into ``docs/img/weight_norms.png``. In the
``decay`` run it also logs the equilibrium diagnostics (``log_equilibrium=True``) and writes
``decay_report.md`` / ``decay_report.png`` beside its logs; the verdict lines close the output.
At the end a table compares train / validation accuracy (torchmetrics ``Accuracy``) and the weight
norms.

Usage::

    python examples/train_digits.py                 # under half a minute on 2 idle CPU cores
    python examples/train_digits.py --fast          # a few steps, for the smoke test
    tensorboard --logdir runs/digits
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import Accuracy

from lightning_decay import DecayGroupsMixin, DecayRules, WeightNormMonitor

RUNS = ("no_decay", "decay")


class DigitsMLP(DecayGroupsMixin, LightningModule):
    """A deliberately too large MLP. ``configure_optimizers`` comes from the mixin."""

    def __init__(self, hidden: int = 512, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )
        # DecayGroupsMixin.configure_optimizers calls self.optimizer(decay groups, **self.optimizer_kwargs).
        # The "decay" group has no weight_decay key, so the optimizer's keyword applies to it; the
        # "no_decay" group always carries weight_decay=0.0.
        self.optimizer = torch.optim.AdamW
        self.optimizer_kwargs = {"lr": lr, "weight_decay": weight_decay}
        self.train_acc = Accuracy(task="multiclass", num_classes=10)
        self.val_acc = Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc)


def load_data(label_noise: float, seed: int) -> tuple[TensorDataset, TensorDataset, torch.Tensor]:
    """Digits split half / half (stratified), pixels scaled to [0, 1], noise on the training labels.

    Returns the training set (noisy labels), the validation set and the clean training labels.
    """
    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(x / 16.0, y, train_size=0.5, stratify=y, random_state=seed)
    clean = torch.as_tensor(y_tr)
    g = torch.Generator().manual_seed(seed)
    noisy = torch.rand(len(clean), generator=g) < label_noise
    y_tr = clean.clone()
    y_tr[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=g)
    train = TensorDataset(torch.as_tensor(x_tr, dtype=torch.float32), y_tr)
    val = TensorDataset(torch.as_tensor(x_va, dtype=torch.float32), torch.as_tensor(y_va))
    return train, val, clean


@torch.no_grad()
def accuracy(model: DigitsMLP, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    metric = Accuracy(task="multiclass", num_classes=10)
    return float(metric(model(x), y)) if len(y) else float("nan")


@torch.no_grad()
def weight_norms(model: DigitsMLP) -> dict[str, float]:
    """Euclidean norms of all trainable parameters, of the decayed ones and of the others."""
    plan = DecayRules().classify(model)

    def norm(params: list[torch.Tensor]) -> float:
        return math.sqrt(sum(float(p.pow(2).sum()) for p in params))

    return {
        "total": norm([d.param for d in plan]),
        "decay_total": norm(plan.decay_params),
        "no_decay_total": norm(plan.no_decay_params),
    }


def train_one(
    run: str, args: argparse.Namespace, train: TensorDataset, val: TensorDataset, clean: torch.Tensor
) -> dict[str, Any]:
    seed_everything(args.seed, workers=True, verbose=False)  # same initialization and batches for both runs
    wd = args.weight_decay if run == "decay" else 0.0
    model = DigitsMLP(hidden=args.hidden, lr=args.lr, weight_decay=wd)
    if run == "decay":
        print(model.decay_plan())  # which tensors decay and why
    logger = TensorBoardLogger(save_dir=args.out, name=run, default_hp_metric=False)
    # The decay run also measures whether its decay is doing anything (docs/decay-doing-anything.md): the
    # equilibrium angle, and the decay report written beside its logs when fit ends.
    monitor = WeightNormMonitor(log_update_ratio=True, log_equilibrium=run == "decay")
    fast = {"max_steps": 3, "limit_val_batches": 1, "num_sanity_val_steps": 0} if args.fast else {}
    trainer = Trainer(
        max_epochs=args.max_epochs,
        logger=logger,
        callbacks=[monitor],
        log_every_n_steps=1 if args.fast else 10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        accelerator="cpu",
        devices=1,
        **fast,
    )
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(val, batch_size=512)
    start = time.perf_counter()
    trainer.fit(model, train_loader, val_loader)
    seconds = time.perf_counter() - start
    corrupted = train.tensors[1] != clean
    return {
        "run": run,
        "weight_decay": wd,
        "train_acc": accuracy(model, *train.tensors),
        "val_acc": accuracy(model, *val.tensors),
        # Fraction of the corrupted training images predicted with their random label: memorized noise.
        "noise_fit": accuracy(model, train.tensors[0][corrupted], train.tensors[1][corrupted]),
        **weight_norms(model),
        "seconds": seconds,
        "log_dir": logger.log_dir,
        "verdicts": [(row.layer, row.verdict) for row in monitor.decay_report_rows],
    }


def format_table(results: list[dict[str, Any]]) -> str:
    header = ("run", "wd", "train_acc", "val_acc", "gap", "noise_fit", "|w| total", "|w| decay", "|w| no_decay", "time")
    rows = [
        (
            r["run"],
            f"{r['weight_decay']:g}",
            f"{r['train_acc']:.3f}",
            f"{r['val_acc']:.3f}",
            f"{r['train_acc'] - r['val_acc']:+.3f}",
            f"{r['noise_fit']:.3f}",
            f"{r['total']:.2f}",
            f"{r['decay_total']:.2f}",
            f"{r['no_decay_total']:.2f}",
            f"{r['seconds']:.0f}s",
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/digits"), help="TensorBoard save_dir (default runs/digits)")
    p.add_argument("--max-epochs", type=int, default=60, help="epochs per run (default 60)")
    p.add_argument("--weight-decay", type=float, default=1.0, help="AdamW weight_decay of the decay run (default 1.0)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--label-noise", type=float, default=0.2, help="fraction of random training labels (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="3 steps per run: a smoke test")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)  # keep the output to the plan and the table
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec).*")
            train, val, clean = load_data(args.label_noise, args.seed)
            results = [train_one(run, args, train, val, clean) for run in RUNS]
    finally:
        log.setLevel(level)
    print()
    print(f"digits: {len(train)} train images ({args.label_noise:.0%} random labels), {len(val)} validation images")
    print(
        "train_acc: against the training labels as given (noisy); gap: train_acc - val_acc; noise_fit: share of\n"
        "the corrupted training images predicted with their random label; |w|: Euclidean norms at the end."
    )
    print(format_table(results))
    for r in results:
        if r["verdicts"]:
            print(f"\nIs the decay doing anything? ({r['run']} run; decay_report.md in {r['log_dir']})")
            print("\n".join(f"  {layer}: {verdict}" for layer, verdict in r["verdicts"]))
    print(f"\nTensorBoard logs: tensorboard --logdir {args.out}")
    return results


if __name__ == "__main__":
    main()
