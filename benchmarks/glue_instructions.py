"""Instructions per step of the fits of row 3.glue_fit, counted by callgrind: no clock, so no machine load in them.

    PY=$(python -c 'import sys; print(sys.executable)')   # the interpreter itself, not a pyenv shim
    valgrind --tool=callgrind --dump-before=getpgrp --callgrind-out-file=/tmp/cg.%p \\
        $PY benchmarks/glue_instructions.py wd,adamw,none,wd,adamw
    python benchmarks/glue_instructions.py wd,adamw,none,wd,adamw --read /tmp/cg.PID

Each fit is the one of row 3.glue_fit (``Trainer.fit`` of the tiny MLP, one torch thread, in-memory logger,
``log_every_n_steps=50``) and calls ``os.getpgrp()`` when steps ``K0`` and ``K1`` start. Callgrind, told
``--dump-before=getpgrp``, writes the instructions counted since its last dump at each of those calls, so the
even-numbered parts (``.2``, ``.4``, ...) hold the ``K1 - K0`` steps of each fit in turn, a logging step among
them, and nothing of start-up or teardown. ``--read`` prints the instructions per step of each fit and the
ratio of the variants to ``adamw``. Variants (``run.FIT_VARIANTS``): ``wd`` (Adam + ``WeightDecay``),
``adamw`` (``AdamW(weight_decay)``), ``none`` (Adam without decay). Under callgrind a fit runs ~50x slower
than natively, and the interpreter's start about 3 minutes: one run of five fits takes about 8 minutes.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from pathlib import Path
from typing import Any

K0, K1 = 20, 70  # the steps counted: from the start of step K0 to the start of step K1
STEPS = K1 + 2


def fit(variant: str) -> None:
    """One fit of the tiny MLP in ``variant``, with ``os.getpgrp()`` at the start of steps ``K0`` and ``K1``."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as R  # the benchmark's own models and fits

    class Marks(R.Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step in (K0, K1):
                os.getpgrp()  # the mark callgrind dumps before

    base, batch = R.M.build("mlp", "tiny", torch.device("cpu"))
    optimizer, weight_decay, callbacks = R.FIT_VARIANTS[variant]
    module = R.BenchModule(copy.deepcopy(base), R.optimizer_factory(optimizer, weight_decay))
    trainer = R.make_trainer(torch.device("cpu"), [*callbacks(), Marks()], max_steps=STEPS)
    trainer.fit(module, train_dataloaders=R.RepeatBatch(batch, STEPS))
    if trainer.global_step != STEPS:
        raise RuntimeError(f"fit ran {trainer.global_step} steps, expected {STEPS}")


def read(prefix: str, variants: list[str]) -> None:
    """Instructions per step of each fit (parts ``prefix.2``, ``.4``, ...), and the ratios to ``adamw``."""
    per_step: dict[str, list[float]] = {}
    for i, variant in enumerate(variants):
        part = Path(f"{prefix}.{2 * (i + 1)}").read_text()
        total = next(int(line.split()[1]) for line in part.splitlines() if line.startswith("totals:"))
        per_step.setdefault(variant, []).append(total / (K1 - K0))
        print(f"fit {i + 1} {variant}: {total / (K1 - K0) / 1e6:.3f} M instructions/step")
    base = per_step.get("adamw")
    for variant, counts in per_step.items():
        if base and variant != "adamw":
            mean, ref = sum(counts) / len(counts), sum(base) / len(base)
            print(f"{variant} / adamw: {mean / ref:.4f} ({(mean - ref) / 1e3:+.1f} k instructions/step)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", help="comma-separated fits, in order: wd, adamw, none")
    parser.add_argument("--read", metavar="PREFIX", help="read the parts PREFIX.N callgrind wrote, print the counts")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if args.read:
        read(args.read, variants)
        return
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for variant in variants:
        fit(variant)


if __name__ == "__main__":
    main()
