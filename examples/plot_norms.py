"""Plot the per-layer weight norms that ``examples/train_digits.py`` logged, with and without decay.

Reads the TensorBoard event files of the latest version of each run (``{logdir}/no_decay/version_N``
and ``{logdir}/decay/version_N``) with tensorboard's ``EventAccumulator`` and draws one panel per
``weight_norm/*`` tag (the layers, then the decay / no-decay totals) plus the validation accuracy.

Usage::

    python examples/train_digits.py
    python examples/plot_norms.py                       # -> docs/img/weight_norms.png
    python examples/plot_norms.py --logdir runs/digits --output norms.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

RUNS = {"no_decay": ("no weight decay", "tab:red"), "decay": ("AdamW weight decay", "tab:blue")}
ROOT = Path(__file__).resolve().parents[1]


def latest_version(run_dir: Path) -> Path:
    versions = sorted(run_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    if not versions:
        raise FileNotFoundError(f"no TensorBoard version_* folder under {run_dir}: run examples/train_digits.py first")
    return versions[-1]


def load_scalars(log_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = ([e.step for e in events], [e.value for e in events])
    return out


def panels(tags: set[str]) -> list[str]:
    """Layer weights first (registration order of their names), then totals, then accuracy."""
    layers = sorted(
        (t for t in tags if t.startswith("weight_norm/") and not t.endswith("total") and t.endswith("weight")),
        key=lambda t: [int(p) if p.isdigit() else p for p in t.split("/", 1)[1].split(".")],
    )
    totals = [t for t in ("weight_norm/decay_total", "weight_norm/no_decay_total") if t in tags]
    return layers + totals + [t for t in ("val/acc",) if t in tags]


def plot(logdir: Path, output: Path) -> Path:
    data = {run: load_scalars(latest_version(logdir / run)) for run in RUNS}
    common = set.intersection(*(set(d) for d in data.values()))
    shown = panels(common)
    if not shown:
        raise ValueError(f"no weight_norm/* scalars in {logdir}: was WeightNormMonitor used?")
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, shown, strict=False):
        for run, (label, color) in RUNS.items():
            steps, values = data[run][tag]
            ax.plot(steps, values, label=label, color=color, linewidth=1.6)
        title = tag.split("/", 1)[1] if tag.startswith("weight_norm/") else "validation accuracy"
        if title.endswith("total"):
            title = {"decay_total": "all decayed weights", "no_decay_total": "biases (not decayed)"}[title]
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("accuracy" if tag == "val/acc" else "L2 norm")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=9)
    fig.suptitle("Digits MLP: weight norms with and without weight decay (WeightNormMonitor)", fontsize=12)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="Plot weight norms logged by examples/train_digits.py.")
    p.add_argument("--logdir", type=Path, default=Path("runs/digits"), help="the --out of train_digits.py")
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "img" / "weight_norms.png")
    args = p.parse_args(argv)
    path = plot(args.logdir, args.output)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
