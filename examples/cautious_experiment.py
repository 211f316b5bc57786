"""Cautious weight decay, measured: Adam + decoupled decay against Adam + cautious decay, same ``wd``.

The setting of the main job (``examples/train_digits.py``): scikit-learn's bundled digits, half of them
training a 64-512-512-10 MLP with 20% random training labels (``--label-noise``), the other half validating
with clean labels; a real ``lightning.pytorch.Trainer.fit`` on CPU, offline. Two arms per seed, from the
same initialization and through the same batches:

- ``plain``: ``torch.optim.Adam(weight_decay=0)`` + ``WeightDecay(wd)``, decoupled decay of the Linear weights
  (the package's tests prove it equal to AdamW, ``tests/test_fabric.py``);
- ``cautious``: the same + ``cautious=True``: decay only where the update and the weight agree in sign
  (Chen et al., "Cautious Weight Decay", arXiv 2510.12402).

Only that flag differs. At the end each run gives the cross-entropy on the whole training set (noisy labels)
and on the validation set, the validation accuracy, the share of corrupted training images predicted with
their random label (memorized noise), the weight norms ``WeightNormMonitor`` logged at the last step, and
``weight_decay/cautious_fraction/decay`` (the share of decayed entries the mask let through): its last value
and its mean over the logged steps. Metrics are read back from ``CSVLogger`` files under ``--out``. The
script prints markdown tables (per seed; mean ± sample std over the seeds) and writes them to ``--markdown``.

Usage::

    python examples/cautious_experiment.py                       # 3 seeds x 2 arms x 1500 steps
    python examples/cautious_experiment.py --markdown table.md   # the tables of docs/cautious-experiment.md
    python examples/cautious_experiment.py --fast                # 5 steps, one seed: the smoke test
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decay import DecayRules, WeightDecay, WeightNormMonitor, decay_param_groups

# The main job's data, split and label noise (examples/train_digits.py), whether this file runs as a script or is
# loaded from its path (the tests): its folder on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import load_data

ARMS = ("plain", "cautious")
FRACTION = "weight_decay/cautious_fraction/decay"
LAYERS = ("net.0.weight", "net.2.weight", "net.4.weight")
# Result key -> column header. The summary shows the outcomes and the norms in two tables, the per-seed table
# all of them. (Per-run times are left out: on a shared machine they measure the neighbours.)
OUTCOMES = {
    "train_loss": "train loss",
    "val_loss": "val loss",
    "val_acc": "val acc",
    "noise_fit": "noise fit",
    "fraction_end": "mask kept (last)",
    "fraction_mean": "mask kept (mean)",
}
NORMS = {"decay_total": "\\|w\\| decay", **{f"norm/{layer}": f"\\|{layer}\\|" for layer in LAYERS}}
COLUMNS = {**OUTCOMES, **NORMS}


class DigitsMLP(LightningModule):
    """The main job's over-parameterized MLP, with Adam (``weight_decay=0``: the callback decays)."""

    def __init__(self, hidden: int, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Named groups, so the callback logs weight_decay/cautious_fraction/decay; both at weight_decay=0.
        return torch.optim.Adam(decay_param_groups(self, weight_decay=0.0), lr=self.lr)


def log_every(steps: int) -> int:
    """A logging interval that divides ``steps``, so the last logged weights are the final ones."""
    return next(k for k in (50, 25, 20, 10, 5, 1) if steps % k == 0)


@torch.no_grad()
def evaluate(model: DigitsMLP, data: TensorDataset) -> tuple[float, float]:
    """Cross-entropy and accuracy of ``model`` on the whole of ``data`` (NaN for an empty set)."""
    x, y = data.tensors
    if not len(y):
        return math.nan, math.nan
    model.eval()
    logits = model(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


@torch.no_grad()
def decay_norm(model: nn.Module) -> float:
    """Euclidean norm of the decayed weights, computed directly (the monitor's figure is checked against it)."""
    return math.sqrt(sum(float(p.pow(2).sum()) for p in DecayRules().classify(model).decay_params))


def read_metrics(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` of a ``CSVLogger`` run: metric -> ``[(step, value), ...]`` in step order."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(Path(log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            for key, value in row.items():
                if value != "":
                    series.setdefault(key, []).append((step, float(value)))
    return {key: sorted(values) for key, values in series.items()}


def train_one(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One arm of one seed: fit, then the final losses, accuracies and the monitor's last logged norms."""
    train, val, clean = load_data(args.label_noise, seed)
    seed_everything(seed, workers=True, verbose=False)  # the same initialization in both arms
    model = DigitsMLP(args.hidden, args.lr)
    init_norm = decay_norm(model)
    logger = CSVLogger(save_dir=args.out, name=arm, version=f"seed{seed}")
    trainer = Trainer(
        max_steps=args.steps,
        logger=logger,
        callbacks=[WeightDecay(args.weight_decay, cautious=arm == "cautious"), WeightNormMonitor()],
        log_every_n_steps=log_every(args.steps),
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        accelerator="cpu",
        devices=1,
    )
    # The same batches in both arms: the shuffling has its own generator, seeded here.
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    metrics = read_metrics(logger.log_dir)
    last_step, _ = metrics["weight_norm/decay_total"][-1]
    if last_step != args.steps - 1:  # the norms reported must be those of the final weights
        raise RuntimeError(f"WeightNormMonitor last logged step {last_step}, not the last step {args.steps - 1}")
    corrupted = train.tensors[1] != clean
    fractions = [v for _, v in metrics.get(FRACTION, [])]
    return {
        "arm": arm,
        "seed": seed,
        **dict(zip(("train_loss", "train_acc"), evaluate(model, train), strict=True)),
        **dict(zip(("val_loss", "val_acc"), evaluate(model, val), strict=True)),
        "noise_fit": evaluate(model, TensorDataset(*(t[corrupted] for t in train.tensors)))[1],
        "decay_total": metrics["weight_norm/decay_total"][-1][1],
        **{f"norm/{layer}": metrics[f"weight_norm/{layer}"][-1][1] for layer in LAYERS},
        "fraction_end": fractions[-1] if fractions else math.nan,
        "fraction_mean": statistics.fmean(fractions) if fractions else math.nan,
        "init_norm": init_norm,
        "final_norm": decay_norm(model),
        "seconds": seconds,
        "log_dir": logger.log_dir,
    }


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Arm -> column -> (mean, sample std) over the seeds (std NaN with one seed)."""
    summary: dict[str, dict[str, tuple[float, float]]] = {}
    for arm in ARMS:
        rows = [r for r in results if r["arm"] == arm]
        summary[arm] = {}
        for key in COLUMNS:
            values = [r[key] for r in rows]
            if any(math.isnan(v) for v in values):  # the plain arm has no mask
                summary[arm][key] = (math.nan, math.nan)
                continue
            std = statistics.stdev(values) if len(values) > 1 else math.nan
            summary[arm][key] = (statistics.fmean(values), std)
    return summary


def _cell(value: float) -> str:
    """A value to 3 decimals; NaN as a dash."""
    return "—" if math.isnan(value) else f"{value:.3f}"  # NaN: no mask in the plain arm


def _spread(mean: float, std: float) -> str:
    """``mean ± std``, or the mean alone with one seed."""
    return _cell(mean) if math.isnan(std) else f"{_cell(mean)} ± {_cell(std)}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table (cells already escaped: ``\\|`` for a literal bar)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def format_tables(results: list[dict[str, Any]], headline: str) -> str:
    """The markdown the script prints and writes: ``headline``, the two summary tables, the per-seed table."""
    summary = summarize(results)
    seeds = sorted({r["seed"] for r in results})
    parts = [headline, f"Mean ± sample standard deviation over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}):"]
    for columns in (OUTCOMES, NORMS):
        rows = [[arm, *(_spread(*stats[k]) for k in columns)] for arm, stats in summary.items()]
        parts.append(_table(["arm", *columns.values()], rows))
    seed_rows = [[r["arm"], str(r["seed"]), *(_cell(r[k]) for k in COLUMNS)] for r in results]
    parts += ["Per seed:", _table(["arm", "seed", *COLUMNS.values()], seed_rows)]
    return "\n\n".join(parts)


def headline(args: argparse.Namespace, runs: int, seconds: float) -> str:
    """The first line of the tables: the command, the schedule in timescales and the wall time."""
    tau = 1 / (args.lr * args.weight_decay)
    return (
        f"Measured by `{command_line(args)}`: {runs} runs of {args.steps} steps "
        f"({args.steps / tau:.2f} timescales tau = 1 / (lr * wd)), {seconds:.0f} s wall time."
    )


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces these numbers (every setting that changes them, spelled out)."""
    seeds = " ".join(map(str, args.seeds))
    return (
        f"python examples/cautious_experiment.py --seeds {seeds} --steps {args.steps} --lr {args.lr:g} "
        f"--weight-decay {args.weight_decay:g} --batch-size {args.batch_size} --hidden {args.hidden} "
        f"--label-noise {args.label_noise:g}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--fast`` overrides ``--steps`` and keeps the first seed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per run (default 1500)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's lr (default 3e-3)")
    p.add_argument("--weight-decay", type=float, default=0.5, help="wd of both arms (default 0.5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--label-noise", type=float, default=0.2, help="fraction of random training labels (default 0.2)")
    p.add_argument("--out", type=Path, default=Path("runs/cautious"), help="CSVLogger save_dir (default runs/cautious)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables (markdown) to this file")
    p.add_argument("--fast", action="store_true", help="5 steps, the first seed only: a smoke test")
    args = p.parse_args(argv)
    if args.fast:
        args.steps, args.seeds = 5, args.seeds[:1]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both arms for every seed, print the tables (and write them to ``--markdown``).

    Returns:
        ``{"results": [one dict per run], "summary": summarize(results), "markdown": the tables}``.
    """
    args = parse_args(argv)
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)  # keep the output to the tables
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message=".*(does not have many workers|LeafSpec|smaller than the logging interval|logs directory).*",
            )
            # A rerun overwrites the CSV logs of the same arm and seed (the "logs directory" warning above).
            results = [train_one(arm, seed, args) for seed in args.seeds for arm in ARMS]
    finally:
        log.setLevel(level)
    markdown = format_tables(results, headline(args, len(results), time.perf_counter() - start))
    print(markdown)
    print(f"\nCSV logs under {args.out}")
    if args.markdown is not None:
        args.markdown.write_text(markdown + "\n")
    return {"results": results, "summary": summarize(results), "markdown": markdown}


if __name__ == "__main__":
    main()
