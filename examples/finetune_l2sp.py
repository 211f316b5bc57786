"""Fine-tuning with few labels: no regularization, L2 toward zero, and L2-SP toward the pretrained weights.

Offline and on CPU, on scikit-learn's bundled 8x8 digits:

1. **Pretrain** an MLP (backbone 64-256-256 + a 5-way head) on the digits 0-4.
2. **Fine-tune** the pretrained backbone with a *new* 5-way head on the digits 5-9, from only
   ``--labels-per-class`` labelled images per class (10 by default); every other image of 5-9 is the test set.

Three fine-tuning runs start from the same pretrained backbone, the same new head and the same batches
(SGD with momentum, ``weight_decay=0`` in the optimizer, on the groups of ``decay_param_groups``):

- ``none``: no regularization;
- ``l2``: ``WeightPenalty(l2=...)``, L2 toward zero on every weight matrix (backbone and head);
- ``l2_sp``: ``WeightPenalty(l2=..., reference=pretrained, l2_head=...)``, L2-SP (Li et al., 2018): the
  backbone's weight matrices are pulled toward their pretrained values, the new head toward zero.

Biases and other 1-D tensors are not regularized in either run (the default ``DecayRules``). Each run is
repeated for ``--seeds`` draws of the labelled images; the table gives the mean (and spread) of the test
accuracy and of the distance ``||w - w_pretrained||`` of the backbone's weights, and TensorBoard logs of
every run (``penalty/l2``, validation accuracy, the weight norms of ``WeightNormMonitor``) go to ``--out``.

Usage::

    python examples/finetune_l2sp.py              # under a minute on 2 CPU cores
    python examples/finetune_l2sp.py --fast       # a few steps, for the smoke test
    tensorboard --logdir runs/finetune_l2sp
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decay import WeightNormMonitor, WeightPenalty, decay_param_groups

RUNS = ("none", "l2", "l2_sp")


class Classifier(LightningModule):
    """A backbone and a linear head; SGD with momentum, no ``weight_decay`` (the callbacks regularize)."""

    def __init__(self, backbone: nn.Module, features: int, num_classes: int, lr: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(features, num_classes)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(decay_param_groups(self, weight_decay=0.0), lr=self.lr, momentum=0.9)


def make_backbone(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())


def load_data() -> tuple[Tensor, Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.as_tensor(x / 16.0, dtype=torch.float32), torch.as_tensor(y)


def trainer(args: argparse.Namespace, epochs: int, logger: Any, callbacks: list[Any], every: int) -> Trainer:
    fast = {"max_steps": 3, "limit_val_batches": 1} if args.fast else {}
    return Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1 if args.fast else every,
        check_val_every_n_epoch=1 if args.fast else every,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        accelerator="cpu",
        devices=1,
        **fast,
    )


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def distance(backbone: nn.Module, reference: dict[str, Tensor]) -> float:
    """``||w - w_pretrained||`` over the backbone's weight matrices (those the penalties act on)."""
    squares = [(p.detach() - reference[n]).square().sum() for n, p in backbone.named_parameters() if p.ndim >= 2]
    return torch.stack(squares).sum().sqrt().item()


def pretrain(args: argparse.Namespace, x: Tensor, y: Tensor) -> tuple[nn.Module, float]:
    """Train backbone + 5-way head on the digits 0-4; return the backbone and its held-out accuracy."""
    seed_everything(args.seed, workers=True, verbose=False)
    source = y < 5
    xs, ys = x[source], y[source]
    order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(args.seed))
    train, held_out = order[: int(0.8 * len(order))], order[int(0.8 * len(order)) :]
    model = Classifier(make_backbone(args.hidden), args.hidden, 5, lr=0.05)
    logger = TensorBoardLogger(save_dir=args.out, name="pretrain", default_hp_metric=False)
    loader = DataLoader(TensorDataset(xs[train], ys[train]), batch_size=64, shuffle=True)
    trainer(args, args.pretrain_epochs, logger, [], every=10).fit(model, loader)
    return model.backbone, accuracy(model, xs[held_out], ys[held_out])


def finetune(
    run: str, seed: int, args: argparse.Namespace, pretrained: nn.Module, train: TensorDataset, test: TensorDataset
) -> dict[str, Any]:
    seed_everything(seed, workers=True, verbose=False)  # the same new head and batches for every run
    model = Classifier(copy.deepcopy(pretrained), args.hidden, 5, lr=args.lr)
    reference = {f"backbone.{k}": v.detach().clone() for k, v in pretrained.state_dict().items()}
    callbacks: list[Any] = [WeightNormMonitor()]
    if run == "l2":
        callbacks.append(WeightPenalty(l2=args.l2))
    elif run == "l2_sp":
        callbacks.append(WeightPenalty(l2=args.alpha, reference=reference, l2_head=args.beta))
    logger = TensorBoardLogger(save_dir=args.out, name=f"{run}/seed{seed}", default_hp_metric=False)
    fit = trainer(args, args.epochs, logger, callbacks, every=10)
    fit.fit(model, DataLoader(train, batch_size=len(train), shuffle=True), DataLoader(test, batch_size=1024))
    return {
        "run": run,
        "seed": seed,
        "test_acc": accuracy(model, *test.tensors),
        "train_acc": accuracy(model, *train.tensors),
        "distance": distance(model.backbone, {k.removeprefix("backbone."): v for k, v in reference.items()}),
        "log_dir": logger.log_dir,
    }


def split(x: Tensor, y: Tensor, per_class: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """``per_class`` labelled images of each digit 5-9 (labels 0-4 for the new head); the rest is the test set."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for digit in range(5, 10):
        idx = torch.nonzero(y == digit).flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    train = torch.cat(picked)
    test = torch.nonzero((y >= 5) & ~torch.isin(torch.arange(len(y)), train)).flatten()
    return TensorDataset(x[train], y[train] - 5), TensorDataset(x[test], y[test] - 5)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for run in RUNS:
        mine = [r for r in results if r["run"] == run]
        acc = [r["test_acc"] for r in mine]
        dist = [r["distance"] for r in mine]
        rows.append(
            {
                "run": run,
                "test_acc": statistics.mean(acc),
                "test_acc_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "train_acc": statistics.mean(r["train_acc"] for r in mine),
                "distance": statistics.mean(dist),
                "distance_sd": statistics.stdev(dist) if len(dist) > 1 else 0.0,
                "seeds": len(mine),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    coefficients = {"none": "-", "l2": f"l2={args.l2:g}", "l2_sp": f"alpha={args.alpha:g}, beta={args.beta:g}"}
    header = ("run", "penalty", "test_acc", "train_acc", "||w - w_pretrained||")
    lines = [
        (
            r["run"],
            coefficients[r["run"]],
            f"{r['test_acc']:.3f} ± {r['test_acc_sd']:.3f}",
            f"{r['train_acc']:.3f}",
            f"{r['distance']:.3f} ± {r['distance_sd']:.3f}",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in lines)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/finetune_l2sp"), help="TensorBoard save_dir")
    p.add_argument("--labels-per-class", type=int, default=10, help="labelled images per digit 5-9 (default 10)")
    p.add_argument("--seeds", type=int, default=3, help="draws of the labelled images (default 3)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument("--epochs", type=int, default=60, help="fine-tuning epochs, one full batch each (default 60)")
    p.add_argument("--lr", type=float, default=0.05, help="fine-tuning learning rate (default 0.05)")
    p.add_argument("--l2", type=float, default=0.01, help="L2 toward zero of the l2 run (default 0.01)")
    p.add_argument("--alpha", type=float, default=0.01, help="L2-SP pull toward the pretrained backbone (default 0.01)")
    p.add_argument("--beta", type=float, default=0.01, help="L2-SP pull of the new head toward zero (default 0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a few steps, one seed: a smoke test")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    seeds = [args.seed + i for i in range(1 if args.fast else args.seeds)]
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)  # keep the output to the table
    try:
        with warnings.catch_warnings():
            quiet = "does not have many workers|LeafSpec|logging interval|val_dataloader"
            warnings.filterwarnings("ignore", message=f".*({quiet}).*")
            x, y = load_data()
            pretrained, source_acc = pretrain(args, x, y)
            results = []
            for seed in seeds:
                train, test = split(x, y, args.labels_per_class, seed)
                results += [finetune(run, seed, args, pretrained, train, test) for run in RUNS]
    finally:
        log.setLevel(level)
    rows = summarize(results)
    print()
    print(f"pretrained on digits 0-4: held-out accuracy {source_acc:.3f}")
    print(
        f"fine-tuned on digits 5-9 from {args.labels_per_class} labels per class ({len(train)} images), tested on "
        f"the other {len(test)};\nmean ± standard deviation over {len(seeds)} draws of the labelled images; "
        "||w - w_pretrained||: the backbone's weight matrices at the end"
    )
    print(format_table(rows, args))
    print(f"\nTensorBoard logs: tensorboard --logdir {args.out}")
    return {"rows": rows, "results": results, "source_acc": source_acc}


if __name__ == "__main__":
    main()
