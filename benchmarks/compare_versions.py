"""The code under test against an older revision, interleaved in one process (issue #19: no row slower).

    python benchmarks/compare_versions.py --ref 7f5faa3 [--repeats 9] [--threads 1]
    python benchmarks/compare_versions.py --ref 7f5faa3 --only-groups    # decay_param_groups only (row 5.groups)

The older revision's ``src/lightning_decay`` is extracted with ``git archive`` into a temporary directory and
renamed ``lightning_decay_old`` (every import rewritten), so both import side by side. Each measurement
times the two versions' callbacks on their own copy of the same model, interleaved and in reversed order
every repetition (ABBA...), with the CPU time of the process (other processes on a shared machine do not
advance it), after a warm-up; the result is the median of the paired ratios new / old and their range.

Rows: the hooks around one optimizer step (what Lightning calls: ``on_before_optimizer_step``, the step
hooks, ``on_train_batch_end``; the step itself left out) for each regularizer and the monitor (an ordinary
step, a logging step, a logging step with every extra); and ``Trainer.fit`` of a tiny model with Adam +
``WeightDecay`` against ``AdamW(weight_decay)``, for both versions (the per-step glue). With ``--groups``,
``decay_param_groups`` of both versions and timm's rule on the models of row 5.groups.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

import run as R  # noqa: E402

import models as M  # noqa: E402


def load_old(ref: str, where: Path) -> Any:
    """``lightning_decay`` as of ``ref``, importable as ``lightning_decay_old``."""
    blob = subprocess.run(["git", "archive", ref, "src/lightning_decay"], cwd=ROOT, check=True, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(blob.stdout)) as tar:
        tar.extractall(where, filter="data")
    src, dst = where / "src" / "lightning_decay", where / "lightning_decay_old"
    dst.mkdir()
    for path in src.glob("*.py"):
        (dst / path.name).write_text(re.sub(r"\blightning_decay\b", "lightning_decay_old", path.read_text()))
    sys.path.insert(0, str(where))
    return importlib.import_module("lightning_decay_old")


CASES: dict[str, Callable[[Any], list[Any]]] = {
    "WeightDecay": lambda ld: [ld.WeightDecay(R.WD)],
    "WeightPenalty(l2)": lambda ld: [ld.WeightPenalty(l2=R.L2)],
    "WeightPenalty(l2, reference='initial')": lambda ld: [ld.WeightPenalty(l2=R.L2, reference="initial")],
    "WeightPenalty(l1, proximal)": lambda ld: [ld.WeightPenalty(l1=R.L1, l1_mode="proximal")],
    "WeightNormMonitor(), ordinary step": lambda ld: [ld.WeightNormMonitor()],
    "WeightNormMonitor(), logging step": lambda ld: [ld.WeightNormMonitor(logging_interval=1)],
    "WeightNormMonitor(every extra), logging step": lambda ld: [
        ld.WeightNormMonitor(
            logging_interval=1, log_grad_norm=True, log_update_ratio=True, log_angular_update=True, log_sparsity=True
        )
    ],
}


def hooks_of(base: torch.nn.Module, batch: Any, callbacks: list[Any]) -> Callable[[], None]:
    optimizer = "adam" if not any("Penalty" in type(c).__name__ for c in callbacks) else "sgd"
    runner = R.make_runner(base, batch, torch.device("cpu"), R.optimizer_factory(optimizer, 0.0), callbacks)
    runner.step()  # gradients and optimizer state exist, as during training
    return R._callback_hooks(runner)


def compare_hooks(old: Any, new: Any, model: str, repeats: int) -> list[tuple[str, str]]:
    base, batch = M.build(model, "small", torch.device("cpu"))
    rows = []
    for name, make in CASES.items():
        fns = {"new": hooks_of(base, batch, make(new)), "old": hooks_of(base, batch, make(old))}
        s = R.interleaved(fns, 20, repeats, 5, torch.device("cpu"))
        ratio = R.paired_ratio(s, "new", "old")
        t_new, t_old = statistics.median(s["new"]) * 1e6, statistics.median(s["old"]) * 1e6
        rows.append(
            (
                f"{model}: {name}: hooks of one step",
                f"{ratio:.3f}x {R.spread(s, 'new', 'old')} ({t_new:.0f} / {t_old:.0f} us)",
            )
        )
    return rows


def compare_fit(old: Any, new: Any, repeats: int, steps: int = 200, warmup: int = 50) -> list[tuple[str, str]]:
    base, batch = M.build("mlp", "tiny", torch.device("cpu"))
    variants = {
        "new_wd": ("adam", 0.0, lambda: [new.WeightDecay(R.WD)]),
        "old_wd": ("adam", 0.0, lambda: [old.WeightDecay(R.WD)]),
        "adamw": ("adamw", R.WD, list),
    }

    def fit(key: str) -> float:
        opt, wd, make = variants[key]
        module = R.BenchModule(copy.deepcopy(base), R.optimizer_factory(opt, wd))
        timer = R.FitTimer(warmup, torch.device("cpu"))
        trainer = R.make_trainer(torch.device("cpu"), [*make(), timer], max_steps=steps)
        trainer.fit(module, train_dataloaders=R.RepeatBatch(batch, steps))
        return (timer.t1 - timer.t0) / (steps - warmup)

    for key in variants:
        fit(key)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        for key in list(variants) if r % 2 == 0 else reversed(list(variants)):
            times[key].append(fit(key))
    ms = statistics.median(times["adamw"]) * 1e3
    return [
        (f"Trainer.fit tiny MLP, {steps} steps: new Adam + WeightDecay / AdamW ({ms:.2f} ms/step)",
         f"{R.paired_ratio(times, 'new_wd', 'adamw'):.3f}x {R.spread(times, 'new_wd', 'adamw', '{:.3f}')}"),
        ("... old Adam + WeightDecay / AdamW",
         f"{R.paired_ratio(times, 'old_wd', 'adamw'):.3f}x {R.spread(times, 'old_wd', 'adamw', '{:.3f}')}"),
        ("... new / old Adam + WeightDecay",
         f"{R.paired_ratio(times, 'new_wd', 'old_wd'):.3f}x {R.spread(times, 'new_wd', 'old_wd', '{:.3f}')}"),
    ]  # fmt: skip


def compare_groups(
    old: Any, new: Any, repeats: int, sizes: tuple[int, ...] = (10_000, 100_000)
) -> list[tuple[str, str]]:
    """``decay_param_groups`` of both versions on ``ManyBlocks`` (row 5.groups' model), after checking that they
    decide alike, and timm's rule (row 5.groups' reference) beside them."""
    rows = []
    for n in sizes:
        model = M.ManyBlocks(n)
        fns = {
            "new": lambda m=model: new.decay_param_groups(m, R.WD),
            "old": lambda m=model: old.decay_param_groups(m, R.WD),
            "timm": lambda m=model: R.timm_param_groups_weight_decay(m, R.WD),
        }
        decided = {k: [[id(p) for p in g["params"]] for g in fns[k]() if g["weight_decay"]] for k in ("new", "old")}
        if decided["new"] != decided["old"]:
            raise AssertionError(f"the two versions group ManyBlocks({n}) differently")
        s = R.interleaved(fns, 1, max(3, repeats), 1, torch.device("cpu"))
        ms = {k: statistics.median(v) * 1e3 for k, v in s.items()}
        for a, b in (("new", "old"), ("new", "timm"), ("old", "timm")):
            rows.append(
                (
                    f"decay_param_groups ManyBlocks({R._k(n)} tensors): {a} / {b}",
                    f"{R.paired_ratio(s, a, b):.2f}x {R.spread(s, a, b)} ({ms[a]:.1f} / {ms[b]:.1f} ms)",
                )
            )
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="7f5faa3", help="the older revision")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="mlp,gpt")
    parser.add_argument("--no-fit", action="store_true")
    parser.add_argument("--cases", default="", help="only the cases whose name contains this")
    parser.add_argument("--groups", action="store_true", help="also decay_param_groups on row 5.groups' models")
    parser.add_argument("--only-groups", action="store_true", help="only decay_param_groups (no hooks, no fit)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import lightning_decay as new

    with tempfile.TemporaryDirectory() as tmp:
        old = load_old(args.ref, Path(tmp))
        for name in [n for n in CASES if args.cases not in n]:
            del CASES[name]
        rows = []
        if not args.only_groups:
            rows += [row for model in args.models.split(",") for row in compare_hooks(old, new, model, args.repeats)]
            if not args.no_fit:
                rows += compare_fit(old, new, args.repeats)
        if args.groups or args.only_groups:
            rows += compare_groups(old, new, args.repeats)
    print(f"new = working tree, old = {args.ref}; new / old, median of {args.repeats} interleaved repetitions [range]")
    print("| measurement | new / old |\n|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")


if __name__ == "__main__":
    main()
