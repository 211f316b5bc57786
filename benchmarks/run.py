#!/usr/bin/env python
"""Benchmarks of lightning-decay's callbacks, as ratios against the alternatives, in one process.

    python benchmarks/run.py                                  # CPU (+ CUDA when present), small models
    python benchmarks/run.py --device cuda --size large       # GPU sizes
    python benchmarks/run.py --out docs/benchmarks.md         # also write the markdown table

Measured (medians of paired ratios over interleaved repetitions, after a warm-up):

1. step time (forward, backward, optimizer step) of each regularization against the optimizer's own
   ``weight_decay`` and against the naive ``for p in model.parameters(): reg = reg + torch.norm(p, 2)``;
2. a ``WeightNormMonitor`` logging step against a bare ``torch._foreach_norm`` and against Lightning's
   per-parameter ``grad_norm`` recipe applied to weights, and its cost amortized over ``log_every_n_steps``;
3. the wall time of a real ``Trainer.fit`` with ``WeightDecay`` + ``WeightPenalty`` + ``WeightNormMonitor``
   against the same fit without them;
4. the memory the callbacks hold (state) and allocate while they run (peak), against the parameters' bytes.

See ``benchmarks/README.md`` for the method.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import gc
import importlib.util
import json
import logging
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_decay import WeightDecay, WeightPenalty, decay_param_groups, kernels
from lightning_decay.rules import DecayRules

try:
    from lightning_decay.monitor import WeightNormMonitor
except ImportError:  # pragma: no cover - the monitor is optional for this script
    WeightNormMonitor = None  # type: ignore[assignment,misc]


def _load_models() -> Any:
    # Imported by path under a private name, so ``benchmarks/`` needs no package and no sys.path entry.
    name = "_lightning_decay_bench_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("models.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


M = _load_models()

MODELS = ("mlp", "gpt")
LR = 1e-3
WD = 0.05  # decoupled decay (AdamW, WeightDecay)
L2 = 1e-4  # coupled L2 (Adam/SGD weight_decay, WeightPenalty(l2))
L1 = 1e-5  # WeightPenalty(l1, proximal)
LOG_EVERY = 50  # Lightning's default log_every_n_steps


@dataclass(frozen=True)
class Budget:
    """Per-size repetition counts: ``steps`` per timed sample, ``fit_steps`` per ``Trainer.fit``."""

    warmup: int
    steps: int
    calls: int
    repeats: int
    fit_steps: int
    fit_warmup: int
    fit_repeats: int
    scale: tuple[int, int, int] = (1000, 5000, 20000)  # tensors of the scaling rows (5.*)
    scale_repeats: int = 3
    group_scale: tuple[int, int] = (10_000, 100_000)  # tensors of the grouping row against timm's rule (5.groups)
    large_numel: int = 2**24  # entries of the one large weight of the allocator figure of the memory rows (6.*)
    rss_shape: tuple[int, int] = (10_000, 5_000)  # the Linear(in, out) of the peak-RSS fits of rows 6.*
    rss_steps: int = 5  # steps of each of those fits
    rss_repeats: int = 3  # fits per variant (each in a fresh interpreter); 0: no RSS figure


BUDGETS = {
    "tiny": Budget(
        warmup=1,
        steps=2,
        calls=2,
        repeats=2,
        fit_steps=6,
        fit_warmup=2,
        fit_repeats=1,
        scale=(16, 32, 64),
        scale_repeats=1,
        group_scale=(16, 64),
        large_numel=2**16,
        rss_repeats=0,  # a fresh interpreter per fit costs seconds: the smoke test runs one on its own
    ),
    "small": Budget(
        warmup=5, steps=15, calls=20, repeats=7, fit_steps=70, fit_warmup=20, fit_repeats=9, scale_repeats=5
    ),
    # Past the caches, on CPU: the rows whose ratios are set by memory traffic (``--only 1.cwd_decay,2.equilibrium``).
    "medium": Budget(warmup=2, steps=3, calls=3, repeats=7, fit_steps=30, fit_warmup=5, fit_repeats=3),
    "large": Budget(
        warmup=5, steps=20, calls=20, repeats=9, fit_steps=300, fit_warmup=20, fit_repeats=4, large_numel=50 * 2**20
    ),
}


# ----------------------------------------------------------------------------------------- plumbing
class MemoryLogger(Logger):
    """A logger that only counts the metrics it is given: the callbacks' logging path without file I/O."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics = 0

    @property
    def name(self) -> str:
        return "bench"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics += len(metrics)


class BenchModule(pl.LightningModule):
    def __init__(self, model: nn.Module, make_optimizer: Callable[[nn.Module], Optimizer]) -> None:
        super().__init__()
        self.model = model
        self._make_optimizer = make_optimizer

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return M.loss_fn(self.model, batch)

    def configure_optimizers(self) -> Optimizer:
        return self._make_optimizer(self)


class RepeatBatch:
    """A data loader yielding the same (on-device) batch ``n`` times: no collation or copy in the timings."""

    def __init__(self, batch: tuple[Tensor, Tensor], n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter([self.batch] * self.n)


def make_trainer(device: torch.device, callbacks: Sequence[Callback] = (), max_steps: int = 1) -> pl.Trainer:
    return pl.Trainer(
        accelerator=device.type,
        devices=1,
        max_steps=max_steps,
        logger=MemoryLogger(),
        callbacks=list(callbacks),
        log_every_n_steps=LOG_EVERY,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def optimizer_factory(kind: str, weight_decay: float) -> Callable[[nn.Module], Optimizer]:
    """Decay / no-decay groups (``weight_decay`` on the decay group only), foreach implementation
    (``adam_fused`` / ``adamw_fused``: the fused one, CUDA)."""

    def make(module: nn.Module) -> Optimizer:
        groups = decay_param_groups(module, weight_decay=weight_decay)
        if kind in ("adam_fused", "adamw_fused"):
            cls = torch.optim.Adam if kind == "adam_fused" else torch.optim.AdamW
            return cls(groups, lr=LR, fused=True)
        if kind == "adam":
            return torch.optim.Adam(groups, lr=LR, foreach=True)
        if kind == "adamw":
            return torch.optim.AdamW(groups, lr=LR, foreach=True)
        if kind == "sgd":
            return torch.optim.SGD(groups, lr=LR, momentum=0.9, foreach=True)
        if kind == "nadam":
            return torch.optim.NAdam(groups, lr=LR, foreach=True)
        raise ValueError(kind)

    return make


#: The clock of the timings: ``time.process_time`` (this process's CPU time) on CPU, which other processes
#: on a shared machine do not advance, ``time.perf_counter`` (wall time, around synchronizations) on CUDA,
#: where the work runs on the device. ``--clock wall`` forces wall time everywhere.
CLOCK: dict[str, Callable[[], float]] = {"cpu": time.process_time, "cuda": time.perf_counter}


def clock(device: torch.device) -> Callable[[], float]:
    return CLOCK.get(device.type, time.perf_counter)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_penalty(model: nn.Module) -> Tensor:
    """What people write (and what the docs warn about: unsquared, biases and norms included)."""
    reg = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        reg = reg + torch.norm(p, 2)
    return reg


@dataclass
class Runner:
    """A model copy, its optimizer and callbacks, set up through their real hooks on a real ``Trainer``."""

    module: BenchModule
    optimizer: Optimizer
    callbacks: list[Callback]
    trainer: pl.Trainer
    batch: tuple[Tensor, Tensor]
    naive: bool = False

    def step(self) -> None:
        """One training step in Lightning's order: zero_grad, forward, backward, callbacks'
        ``on_before_optimizer_step``, ``optimizer.step()`` (which runs the callbacks' step hooks),
        callbacks' ``on_train_batch_end``."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = M.loss_fn(self.module.model, self.batch)
        if self.naive:
            loss = loss + L2 * naive_penalty(self.module.model)
        loss.backward()
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self.trainer, self.module, self.optimizer)
        self.optimizer.step()
        for cb in self.callbacks:  # a non-logging step: only the callbacks' "is this a logging step?" check
            cb.on_train_batch_end(self.trainer, self.module, None, self.batch, 0)


def make_runner(
    base: nn.Module,
    batch: tuple[Tensor, Tensor],
    device: torch.device,
    make_optimizer: Callable[[nn.Module], Optimizer],
    callbacks: Sequence[Callback] = (),
    naive: bool = False,
) -> Runner:
    module = BenchModule(copy.deepcopy(base), make_optimizer)
    optimizer = make_optimizer(module)
    trainer = make_trainer(device, callbacks)
    trainer.strategy.optimizers = [optimizer]
    trainer.training = True  # the fit loop is the active loop: `should_update_logs` counts its steps
    for cb in callbacks:
        cb.setup(trainer, module, "fit")
        cb.on_fit_start(trainer, module)
        cb.on_train_start(trainer, module)  # where the regularizers bind to the (restored) optimizers
    return Runner(module, optimizer, list(callbacks), trainer, batch, naive)


def interleaved(
    fns: dict[str, Callable[[], Any]], calls: int, repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function: ``repeats`` samples of ``calls`` calls, the functions interleaved
    (order reversed every repetition, ABC CBA ..., so linear drift hits all alike), GC off while timing."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for key in list(fns) if r % 2 == 0 else list(reversed(fns)):
                fn = fns[key]
                sync(device)
                t0 = clock(device)()
                for _ in range(calls):
                    fn()
                sync(device)
                samples[key].append((clock(device)() - t0) / calls)
    finally:
        gc.enable()
    return samples


def paired_ratios(samples: dict[str, list[float]], a: str, b: str) -> list[float]:
    """``time(a) / time(b)`` of each repetition (both measured in it)."""
    return [x / y for x, y in zip(samples[a], samples[b], strict=True)]


def paired_ratio(samples: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repetitions of ``time(a) / time(b)`` measured in the same repetition."""
    return statistics.median(paired_ratios(samples, a, b))


def spread(samples: dict[str, list[float]], a: str, b: str, fmt: str = "{:.2f}") -> str:
    """The range of the paired ratios, shown next to their median so noise is visible."""
    ratios = paired_ratios(samples, a, b)
    return f"[{fmt.format(min(ratios))}, {fmt.format(max(ratios))}]"


# -------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    key: str
    what: str
    value: str
    target: str
    ok: bool | None  # None: information only, or skipped

    @property
    def result(self) -> str:
        return "info" if self.ok is None else ("PASS" if self.ok else "MISS")


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, what: str, value: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append(Row(key, what, value, target or "-", ok))
        print(f"  {key:<28} {what:<62} {value:<34} {target or '-':<16} {self.rows[-1].result}", flush=True)


def _x(ratio: float) -> str:
    return f"{ratio:.3f}x"


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


# ---------------------------------------------------------------------------------- 1. step time
STEP_VARIANTS: dict[str, tuple[str, str, float, Callable[[], list[Callback]], bool]] = {
    # key: (description, optimizer, its weight_decay, callbacks, naive loop)
    "none": ("no regularization (Adam)", "adam", 0.0, list, False),
    "adamw": ("AdamW(weight_decay) on decay groups", "adamw", WD, list, False),
    "weight_decay": ("Adam + WeightDecay", "adam", 0.0, lambda: [WeightDecay(WD)], False),
    "adam_l2": ("Adam(weight_decay) on decay groups (coupled L2)", "adam", L2, list, False),
    "penalty_l2_adam": ("Adam + WeightPenalty(l2)", "adam", 0.0, lambda: [WeightPenalty(l2=L2)], False),
    "sgd_l2": ("SGD(weight_decay) on decay groups", "sgd", L2, list, False),
    "penalty_l2_sgd": ("SGD + WeightPenalty(l2)", "sgd", 0.0, lambda: [WeightPenalty(l2=L2)], False),
    "penalty_l1_prox": (
        "Adam + WeightPenalty(l1, proximal)",
        "adam",
        0.0,
        lambda: [WeightPenalty(l1=L1, l1_mode="proximal")],
        False,
    ),
    "naive": ("Adam + naive `reg += torch.norm(p, 2)` loop", "adam", 0.0, list, True),
    # Cautious weight decay: Adam's direction is known (read from its state); NAdam's is not (measured).
    "cautious": ("Adam + WeightDecay(cautious=True)", "adam", 0.0, lambda: [WeightDecay(WD, cautious=True)], False),
    "nadam_wd": ("NAdam + WeightDecay", "nadam", 0.0, lambda: [WeightDecay(WD)], False),
    "cautious_measured": (
        "NAdam + WeightDecay(cautious=True), measured",
        "nadam",
        0.0,
        lambda: [WeightDecay(WD, cautious=True)],
        False,
    ),
}
CAUTIOUS_CHECKS = [
    ("1.cwd", "Adam + WeightDecay(cautious) / Adam + WeightDecay (known direction)", "cautious", "weight_decay"),
    (
        "1.cwd_measured",
        "NAdam + WeightDecay(cautious) / NAdam + WeightDecay (measured)",
        "cautious_measured",
        "nadam_wd",
    ),
]


FUSED_VARIANTS: dict[str, tuple[str, str, float, Callable[[], list[Callback]], bool]] = {
    # CUDA only: against the fused optimizers, the fastest built-in decay there.
    "adamw_fused": ("AdamW(fused, weight_decay)", "adamw_fused", WD, list, False),
    "weight_decay_fused": ("Adam(fused) + WeightDecay", "adam_fused", 0.0, lambda: [WeightDecay(WD)], False),
    "adam_l2_fused": ("Adam(fused, weight_decay) (coupled L2)", "adam_fused", L2, list, False),
    "penalty_l2_fused": ("Adam(fused) + WeightPenalty(l2)", "adam_fused", 0.0, lambda: [WeightPenalty(l2=L2)], False),
}
FUSED_CHECKS = [
    ("1.wd_fused", "Adam(fused) + WeightDecay / AdamW(fused, wd)", "weight_decay_fused", "adamw_fused"),
    (
        "1.l2_fused",
        "Adam(fused) + WeightPenalty(l2) / Adam(fused, weight_decay=l2)",
        "penalty_l2_fused",
        "adam_l2_fused",
    ),
]


def bench_step(report: Report, tag: str, name: str, size: str, device: torch.device, budget: Budget) -> float:
    base, batch = M.build(name, size, device)
    variants = {**STEP_VARIANTS, **(FUSED_VARIANTS if device.type == "cuda" else {})}
    runners = {
        key: make_runner(base, batch, device, optimizer_factory(opt, wd), cbs(), naive)
        for key, (_, opt, wd, cbs, naive) in variants.items()
    }
    s = interleaved({k: r.step for k, r in runners.items()}, budget.steps, budget.repeats, budget.warmup, device)
    t_none = statistics.median(s["none"])
    n_tensors = sum(1 for _ in base.parameters())
    report.add(f"1.base/{tag}", f"step time, no regularization ({n_tensors} tensors)", f"{t_none * 1e3:.3f} ms")
    checks = [
        ("1.adamw", "AdamW(wd) / no regularization", "adamw", "none", None),
        ("1.wd", "Adam + WeightDecay / AdamW(wd)", "weight_decay", "adamw", ("<=", 1.05)),
        ("1.l2adam", "Adam + WeightPenalty(l2) / Adam(weight_decay=l2)", "penalty_l2_adam", "adam_l2", ("<=", 1.05)),
        ("1.l2sgd", "SGD + WeightPenalty(l2) / SGD(weight_decay=l2)", "penalty_l2_sgd", "sgd_l2", ("<=", 1.05)),
        ("1.l1prox", "Adam + WeightPenalty(l1, proximal) / no regularization", "penalty_l1_prox", "none", None),
    ]
    if device.type == "cuda":
        checks += [(key, what, a, b, ("<=", 1.05)) for key, what, a, b in FUSED_CHECKS]
    checks += [(key, what, a, b, None) for key, what, a, b in CAUTIOUS_CHECKS]  # whole steps: information
    for key, what, a, b, target in checks:
        ratio = paired_ratio(s, a, b)
        value = f"{_x(ratio)} {spread(s, a, b)}"
        if target is None:
            report.add(f"{key}/{tag}", what, value)
        else:
            op, bound = target
            ok = ratio <= bound if op == "<=" else ratio >= bound
            report.add(f"{key}/{tag}", what, value, f"{op} {bound}x", ok)
    # The time each regularization adds to a step, measured on its own (a difference of whole-step times
    # would drown it in the noise of the forward and backward passes): our callbacks' hooks around one
    # step (the calls Lightning makes, the step's own work left out) against the naive loop's own work,
    # its forward (`reg += torch.norm(p, 2)` per parameter) and its backward.
    naive_model = runners["naive"].module.model

    def naive_extra() -> None:
        (L2 * naive_penalty(naive_model)).backward()

    fns = {"naive": naive_extra}
    for key in ("weight_decay", "penalty_l2_adam"):
        r = runners[key]
        fns[key] = _hooks(r.trainer, r.module, r.optimizer, r.callbacks, r.batch)
    e = interleaved(fns, budget.calls, budget.repeats, budget.warmup, device)
    for key, what, ours in (
        ("1.extra_wd", "WeightDecay", "weight_decay"),
        ("1.extra_l2", "WeightPenalty(l2)", "penalty_l2_adam"),
    ):
        ratio = paired_ratio(e, ours, "naive")
        us = statistics.median(e[ours]) * 1e6, statistics.median(e["naive"]) * 1e6
        report.add(
            f"{key}/{tag}",
            f"added to a step: {what}'s hooks / naive loop's forward + backward ({us[0]:.0f} / {us[1]:.0f} us)",
            f"{_x(ratio)} {spread(e, ours, 'naive')}",
            "<= 0.15x",
            ratio <= 0.15,
        )
    return t_none


# ------------------------------------------------------------- 1. cautious decay: the decay's own cost
#: Width of the ``linear8`` model of rows 1.cwd_decay (8 x Linear(width, width)) at each size.
LINEAR8_WIDTH = {"tiny": 32, "small": 512, "medium": 2048, "large": 2048}
#: key: (optimizer, callbacks); the decay's hooks around one step, the step itself left out.
DECAY_VARIANTS: dict[str, tuple[str, Callable[[], list[Callback]]]] = {
    "plain": ("adam", lambda: [WeightDecay(WD)]),
    "known": ("adam", lambda: [WeightDecay(WD, cautious=True)]),
    "nadam_plain": ("nadam", lambda: [WeightDecay(WD)]),
    "measured": ("nadam", lambda: [WeightDecay(WD, cautious=True)]),
}
CWD_DECAY_TARGET = 1.5  # issue 20: the known direction's decay at most 1.5x plain decay's


def linear8(size: str, device: torch.device, seed: int = 0) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """8 x ``nn.Linear(w, w)`` (a few large tensors: the kernels' own throughput) and a fixed batch of 16 rows."""
    width = LINEAR8_WIDTH[size]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(8)])
    x, y = torch.randn(16, width, generator=gen), torch.randint(0, width, (16,), generator=gen)
    return model.to(device), (x.to(device), y.to(device))


def bench_cautious_decay(report: Report, dev_tag: str, size: str, device: torch.device, budget: Budget) -> None:
    """The decay's own time and peak memory, ``WeightDecay(cautious=True)`` against ``WeightDecay``: the hooks
    of one step (on_before_optimizer_step, the step hooks, on_train_batch_end) without the step, on
    a state a real step created (Adam: the known direction; NAdam: the measured update)."""
    builds = {"linear8": lambda: linear8(size, device), "gpt": lambda: M.build("gpt", size, device)}
    for name, build in builds.items():
        base, batch = build()
        runners = {
            key: make_runner(base, batch, device, optimizer_factory(opt, 0.0), make())
            for key, (opt, make) in DECAY_VARIANTS.items()
        }
        fns = {}
        for key, r in runners.items():
            r.step()  # the optimizer's state, as after a first step
            fns[key] = _hooks(r.trainer, r.module, r.optimizer, r.callbacks, r.batch)
        s = interleaved(fns, budget.calls, budget.repeats, budget.warmup, device)
        us = {k: statistics.median(v) * 1e6 for k, v in s.items()}
        known, measured = paired_ratio(s, "known", "plain"), paired_ratio(s, "measured", "nadam_plain")
        report.add(
            f"1.cwd_decay/{dev_tag}/{name}",
            f"decay's own time: WeightDecay(cautious), known direction / WeightDecay, Adam "
            f"({us['known']:.0f} / {us['plain']:.0f} us)",
            f"{_x(known)} {spread(s, 'known', 'plain')}",
            f"<= {CWD_DECAY_TARGET}x",
            known <= CWD_DECAY_TARGET,
        )
        report.add(
            f"1.cwd_decay_measured/{dev_tag}/{name}",
            f"decay's own time: WeightDecay(cautious), measured / WeightDecay, NAdam "
            f"({us['measured']:.0f} / {us['nadam_plain']:.0f} us)",
            f"{_x(measured)} {spread(s, 'measured', 'nadam_plain')}",
        )
        decayed = [d.param for d in DecayRules().classify(base) if d.decay]
        d_bytes = sum(p.numel() * p.element_size() for p in decayed)
        chunk = max(64 * 2**10, d_bytes // 32) + 64 * len(decayed)  # kernels' chunk budget, per-tensor scalars
        peaks = {k: peak_bytes(fns[k], device) for k in ("plain", "known", "measured")}
        report.add(
            f"1.cwd_mem/{dev_tag}/{name}",
            f"peak while the decay's hooks run, x decayed bytes ({_mb(d_bytes)}): plain / known / measured",
            " / ".join(f"{peaks[k] / d_bytes:.3f}x" for k in ("plain", "known", "measured")),
            f"known <= {chunk / d_bytes:.3f}x, measured <= {(d_bytes + chunk) / d_bytes:.3f}x",
            peaks["known"] <= chunk and peaks["measured"] <= d_bytes + chunk,
        )
        del runners, fns


# ----------------------------------------------------------------------------------- 2. monitor
def lightning_style_weight_norms(module: nn.Module, norm_type: float = 2.0) -> dict[str, float]:
    """``lightning.pytorch.utilities.grad_norm`` applied to weights, then ``.item()`` as a logger does."""
    norms = {f"weight_{norm_type}_norm/{n}": p.data.norm(norm_type) for n, p in module.named_parameters()}
    norms["weight_norm_total"] = torch.tensor(list(norms.values())).norm(norm_type)
    return {k: v.item() for k, v in norms.items()}


def bare_foreach_norms(params: list[Tensor]) -> list[float]:
    with torch.no_grad():
        return torch.stack(torch._foreach_norm(params, 2)).tolist()


def monitor_hooks(runner: Any, batch: Any, monitors: list[Any]) -> Callable[[Any], Callable[[], None]]:
    """After one step of ``runner`` (gradients and optimizer state exist, as during training) and each monitor's
    ``setup``: ``hooks(monitor)``, a call of the hooks Lightning runs around one optimizer step for it."""
    runner.step()
    trainer, module, opt = runner.trainer, runner.module, runner.optimizer
    for mon in monitors:
        mon.setup(trainer, module, "fit")
    progress = trainer.fit_loop.epoch_loop.batch_progress

    def hooks(mon: Any) -> Callable[[], None]:
        def call() -> None:
            progress.increment_ready()  # a new batch, as the fit loop would count it
            mon.on_before_optimizer_step(trainer, module, opt)
            mon.on_train_batch_end(trainer, module, None, batch, 0)

        return call

    return hooks


def bench_monitor(
    report: Report, tag: str, name: str, size: str, device: torch.device, budget: Budget, t_step: float
) -> None:
    keys = ("2.bare", "2.lightning", "2.amortized")
    if WeightNormMonitor is None:
        for key in keys:
            report.add(f"{key}/{tag}", "WeightNormMonitor", "skipped: lightning_decay.monitor not importable")
        return
    base, batch = M.build(name, size, device)
    logging_monitor = WeightNormMonitor(logging_interval=1)  # every call is a logging step
    idle_monitor = WeightNormMonitor()  # Trainer's log_every_n_steps=50; the step timed here is not logged
    runner = make_runner(base, batch, device, optimizer_factory("adam", 0.0))
    hooks = monitor_hooks(runner, batch, [logging_monitor, idle_monitor])
    trainer, module = runner.trainer, runner.module
    params = [p for p in module.parameters() if p.requires_grad]
    fns = {
        "monitor": hooks(logging_monitor),
        "bare": lambda: bare_foreach_norms(params),
        "lightning": lambda: lightning_style_weight_norms(module),
        "idle": hooks(idle_monitor),
    }
    s = interleaved(fns, budget.calls, budget.repeats, budget.warmup, device)
    logged = trainer.loggers[0].metrics  # type: ignore[attr-defined]
    if not logged:
        raise RuntimeError("WeightNormMonitor logged nothing: the benchmark does not measure a logging step")
    t_log = statistics.median(s["monitor"])
    ratio = paired_ratio(s, "monitor", "bare")
    report.add(
        f"2.bare/{tag}",
        f"monitor logging step / bare _foreach_norm + 1 copy ({len(params)} tensors)",
        f"{_x(ratio)} {spread(s, 'monitor', 'bare')} ({t_log * 1e6:.0f} us)",
        "<= 1.2x",
        ratio <= 1.2,
    )
    speedup = paired_ratio(s, "lightning", "monitor")
    bound = 10.0 if device.type == "cuda" else 1.0
    op = ">=" if device.type == "cuda" else ">"
    report.add(
        f"2.lightning/{tag}",
        "grad_norm-style per-parameter norms + .item() / monitor",
        f"{_x(speedup)} {spread(s, 'lightning', 'monitor')}",
        f"{op} {bound:g}x",
        speedup >= bound if device.type == "cuda" else speedup > bound,
    )
    t_idle = statistics.median(s["idle"])
    amortized = (t_log + (LOG_EVERY - 1) * t_idle) / LOG_EVERY / t_step
    report.add(
        f"2.amortized/{tag}",
        f"monitor cost at log_every_n_steps={LOG_EVERY} / step time",
        f"{amortized * 100:.3f} % (idle hook {t_idle * 1e6:.1f} us)",
        "< 1 %",
        amortized < 0.01,
    )


def bench_equilibrium(
    report: Report, tag: str, name: str, size: str, device: torch.device, budget: Budget, t_step: float
) -> None:
    """Row 2.equilibrium: a logging step of ``WeightNormMonitor(log_equilibrium=True)`` (angles, the kept snapshot,
    the scale-invariance score, the predictions) against one of ``WeightNormMonitor()`` (the weight-norm floor),
    ``AdamW(weight_decay)`` on the decay groups; beside it, the same with ``keep_snapshot=False`` (a fresh copy).
    Row 2.equilibrium_amortized: its cost at ``log_every_n_steps`` over ``t_step``, the time of a step."""
    key = f"2.equilibrium/{tag}"
    if WeightNormMonitor is None:
        for k in (key, f"2.equilibrium_amortized/{tag}"):
            report.add(k, "WeightNormMonitor(log_equilibrium=True)", "skipped: lightning_decay.monitor not importable")
        return
    base, batch = M.build(name, size, device)
    monitors = {
        "floor": WeightNormMonitor(logging_interval=1),
        "equilibrium": WeightNormMonitor(logging_interval=1, log_equilibrium=True, decay_report=False),
        "fresh": WeightNormMonitor(logging_interval=1, log_equilibrium=True, decay_report=False, keep_snapshot=False),
        "angle": WeightNormMonitor(logging_interval=1, log_angular_update=True),
        "idle": WeightNormMonitor(log_equilibrium=True, decay_report=False),  # log_every_n_steps: not this step
    }
    runner = make_runner(base, batch, device, optimizer_factory("adamw", WD))
    hooks = monitor_hooks(runner, batch, list(monitors.values()))
    module = runner.module
    s = interleaved({k: hooks(m) for k, m in monitors.items()}, budget.calls, budget.repeats, budget.warmup, device)
    if not monitors["equilibrium"]._probes.history.series:  # recorded where a prediction was logged
        raise RuntimeError("log_equilibrium logged no prediction: the benchmark does not measure its logging step")
    ratio = paired_ratio(s, "equilibrium", "floor")
    fresh = paired_ratio(s, "fresh", "floor")
    angle = paired_ratio(s, "angle", "floor")
    n = sum(1 for p in module.parameters() if p.requires_grad)
    report.add(
        key,
        f"monitor logging step, log_equilibrium=True / WeightNormMonitor() ({n} tensors, AdamW); "
        "keep_snapshot=False and log_angular_update alone beside it",
        f"{_x(ratio)} {spread(s, 'equilibrium', 'floor')} ({statistics.median(s['equilibrium']) * 1e6:.0f} / "
        f"{statistics.median(s['floor']) * 1e6:.0f} us); fresh copy {_x(fresh)} {spread(s, 'fresh', 'floor')}; "
        f"angle alone {_x(angle)} {spread(s, 'angle', 'floor')}",
        "<= 3x",
        ratio <= 3.0,
    )
    t_idle = statistics.median(s["idle"])
    amortized = (statistics.median(s["equilibrium"]) + (LOG_EVERY - 1) * t_idle) / LOG_EVERY / t_step
    report.add(
        f"2.equilibrium_amortized/{tag}",
        f"WeightNormMonitor(log_equilibrium=True) cost at log_every_n_steps={LOG_EVERY} / step time",
        f"{amortized * 100:.3f} % (idle hook {t_idle * 1e6:.1f} us)",
        "< 1 %",
        amortized < 0.01,
    )


# ------------------------------------------------------------------------------ 3. Trainer.fit
class FitTimer(Callback):
    """Wall time from the start of batch ``warmup`` to the end of training."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.t0 = self.t1 = 0.0
        self.running = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.warmup:
            sync(self.device)
            self.t0 = clock(self.device)()
            self.running = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(self.device)
        self.t1 = clock(self.device)()
        self.running = False


FIT_VARIANTS: dict[str, tuple[str, float, Callable[[], list[Callback]]]] = {
    # key: (optimizer, its weight_decay on the decay group, callbacks)
    "adamw": ("adamw", WD, list),
    "wd": ("adam", 0.0, lambda: [WeightDecay(WD)]),
    "none": ("adam", 0.0, list),
    "monitor": ("adam", 0.0, lambda: [WeightNormMonitor()] if WeightNormMonitor is not None else []),
}


def time_fit(base: nn.Module, batch: Any, key: str, device: torch.device, budget: Budget) -> float:
    """Seconds per step after warm-up of one ``Trainer.fit`` of a copy of ``base`` in variant ``key``."""
    steps = budget.fit_steps
    opt, wd, make = FIT_VARIANTS[key]
    module = BenchModule(copy.deepcopy(base), optimizer_factory(opt, wd))
    timer = FitTimer(budget.fit_warmup, device)
    trainer = make_trainer(device, [*make(), timer], max_steps=steps)
    gc.collect()
    trainer.fit(module, train_dataloaders=RepeatBatch(batch, steps))
    if trainer.global_step != steps:
        raise RuntimeError(f"fit ran {trainer.global_step} steps, expected {steps}")
    return (timer.t1 - timer.t0) / (steps - budget.fit_warmup)


def bench_fit(report: Report, tag: str, name: str, size: str, device: torch.device, budget: Budget) -> None:
    base, batch = M.build(name, size, device)
    steps = budget.fit_steps

    def fit(key: str) -> float:
        return time_fit(base, batch, key, device, budget)

    keys = list(FIT_VARIANTS)
    if budget.fit_repeats > 1:
        for key in keys:
            fit(key)  # warm-up: first-use costs (imports, allocator) out of the timed fits
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(budget.fit_repeats):
        for key in keys if r % 2 == 0 else reversed(keys):
            times[key].append(fit(key))
    for key, what, a, b, bound in (
        ("3.wd_fit", "Adam + WeightDecay / AdamW(weight_decay), same groups", "wd", "adamw", 1.03),
        ("3.monitor_fit", f"WeightNormMonitor() (log_every_n_steps={LOG_EVERY}) / none", "monitor", "none", 1.01),
    ):
        ratio = paired_ratio(times, a, b)
        report.add(
            f"{key}/{tag}",
            f"Trainer.fit {steps} steps, {what} ({statistics.median(times[b]) * 1e3:.2f} ms/step)",
            f"{_x(ratio)} {spread(times, a, b, '{:.3f}')}",
            f"<= {bound}x",
            ratio <= bound,
        )


# ------------------------------------------------------------------------------------- 4. memory
def bench_glue(report: Report, dev_tag: str, device: torch.device, budget: Budget) -> None:
    """The per-step glue on a tiny model, where it is the largest share of a step: ``Trainer.fit`` with
    ``Adam`` + ``WeightDecay`` against ``AdamW(weight_decay)`` on the same groups (the same math), and the
    same question answered in one process, free of the fits' noise (`glue_calls`)."""
    base, batch = M.build("mlp", "tiny", device)
    steps = budget.fit_steps

    def fit(key: str) -> float:
        return time_fit(base, batch, key, device, budget)

    keys = ["wd", "adamw"]
    for key in keys:
        fit(key)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(max(budget.fit_repeats, 2)):
        for key in keys if r % 2 == 0 else reversed(keys):
            times[key].append(fit(key))
    ratio = paired_ratio(times, "wd", "adamw")
    t_step = statistics.median(times["adamw"])
    report.add(
        f"3.glue_fit/{dev_tag}",
        f"Trainer.fit {steps} steps of the tiny MLP (the glue's share is largest), Adam + WeightDecay / "
        f"AdamW(weight_decay) ({t_step * 1e3:.2f} ms/step)",
        f"{_x(ratio)} {spread(times, 'wd', 'adamw', '{:.3f}')}",
        "<= 1.01x",
        ratio <= 1.01,
    )
    runner = make_runner(base, batch, device, optimizer_factory("adam", 0.0), [WeightDecay(WD)])
    runner.step()  # gradients and optimizer state exist, as during training
    s = interleaved(glue_calls(runner), *glue_budget(budget), budget.warmup, device)
    # Per repetition: 1 + (what the callback adds to a step - the decay AdamW does in its step) / the AdamW
    # fit step, logging steps amortized over log_every_n_steps.
    hooks = [((LOG_EVERY - 1) * a + b) / LOG_EVERY for a, b in zip(s["ordinary"], s["logging"], strict=True)]
    ratios = [1 + (h - k) / t_step for h, k in zip(hooks, s["adamw_decay"], strict=True)]
    ratio = statistics.median(ratios)
    us = {k: statistics.median(v) * 1e6 for k, v in {**s, "hooks": hooks}.items()}
    report.add(
        f"3.glue_hooks/{dev_tag}",
        f"the same in one process: 1 + (WeightDecay's per-step calls as Lightning makes them, {us['hooks']:.1f} us "
        f"(its decay kernel {us['kernel']:.1f} us, the rest glue) - the decay inside AdamW's step, "
        f"{us['adamw_decay']:.1f} us) / the AdamW fit step",
        f"{_x(ratio)} [{min(ratios):.4f}, {max(ratios):.4f}]",
        "<= 1.01x",
        ratio <= 1.01,
    )


def glue_budget(budget: Budget) -> tuple[int, int]:
    """(calls per sample, repetitions) of row 3.glue_hooks: its calls take microseconds, so many are cheap."""
    return max(budget.calls, 50), max(budget.repeats, 15)


def glue_calls(runner: Runner) -> dict[str, Callable[[], None]]:
    """What a ``WeightDecay`` costs a fit step beyond the step's own work, and what AdamW does instead.

    ``ordinary`` / ``logging``: the six per-step hooks Lightning calls on a callback, as its
    ``_call_callback_hooks`` calls each (a profiler context named by ``state_key`` around it), in the fit
    loop's order, with the optimizer's step pre- and post-hooks where ``optimizer.step`` runs them; on an
    ordinary step and on a logging step. ``kernel``: the callback's decay kernel alone, on its bucket.
    ``adamw_decay``: the multiply AdamW's foreach step runs for the same decay (``torch/optim/adam.py``,
    ``_multi_tensor_adam``: ``torch._foreach_mul_(device_params, 1 - lr * weight_decay)``).
    """
    trainer, module, opt, batch = runner.trainer, runner.module, runner.optimizer, runner.batch
    (callback,) = runner.callbacks
    loop = trainer.fit_loop.epoch_loop
    weights = [p for g in opt.param_groups if g["name"] == "decay" for p in g["params"]]
    factor = 1 - LR * WD
    loss = torch.zeros((), device=weights[0].device)
    before = [
        ("on_train_batch_start", (batch, 0)),
        ("on_before_zero_grad", (opt,)),
        ("on_before_backward", (loss,)),
        ("on_after_backward", ()),
        ("on_before_optimizer_step", (opt,)),
    ]

    def call(name: str, args: tuple[Any, ...]) -> None:
        with trainer.profiler.profile(f"[Callback]{callback.state_key}.{name}"):
            getattr(callback, name)(trainer, module, *args)

    def step_calls(batches_that_stepped: int) -> Callable[[], None]:
        def calls() -> None:
            loop._batches_that_stepped = batches_that_stepped  # which step `should_update_logs` sees
            pre, post = list(opt._optimizer_step_pre_hooks.values()), list(opt._optimizer_step_post_hooks.values())
            for hook in pre:
                hook(opt, (opt,), {"closure": None})
            for name, args in before:
                call(name, args)
            for hook in post:
                hook(opt, (opt,), {"closure": None})
            call("on_train_batch_end", (None, batch, 0))

        return calls

    def kernel() -> None:
        kernels.decay_(weights, factor)  # the decay group is the callback's one bucket (the same rules)

    @torch.no_grad()
    def adamw_decay() -> None:
        torch._foreach_mul_(weights, factor)

    return {
        "ordinary": step_calls(0),
        "logging": step_calls(LOG_EVERY - 1),
        "kernel": kernel,
        "adamw_decay": adamw_decay,
    }


def storage_bytes(tensors: Iterable[Tensor]) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def held_bytes(obj: Any, exclude: set[int]) -> int:
    """Bytes of the tensors reachable from ``obj``'s state, shared storages once, ``exclude`` (the
    parameters and gradients) left out. Modules, optimizers and the Trainer are references, not state."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, Tensor):
            st = o.untyped_storage()
            if st.data_ptr() not in exclude:
                storages[st.data_ptr()] = st.nbytes()
        elif isinstance(o, (nn.Module, Optimizer, pl.Trainer, type, str, bytes, int, float, bool)):
            continue
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif hasattr(o, "__dict__") and not callable(o):
            stack.extend(vars(o).values())
    return sum(storages.values())


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak of the bytes allocated while ``fn`` runs, above what was allocated when it started."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(events: Iterable[Any]) -> Iterable[Any]:
        for e in events:
            yield e
            yield from walk(e.children)

    allocs = [e for e in walk(prof.profiler.kineto_results.experimental_event_tree()) if e.tag == _EventType.Allocation]
    current = peak = 0
    for e in sorted(allocs, key=lambda e: e.start_time_ns):
        if e.extra_fields.device.type == "cpu":
            current += e.extra_fields.alloc_size
            peak = max(peak, current)
    return peak


def _callback_hooks(runner: Runner) -> Callable[[], None]:
    """Everything the runner's callbacks do around one optimizer step (a logging step), without the step."""
    trainer, module, opt, cbs = runner.trainer, runner.module, runner.optimizer, runner.callbacks
    progress = trainer.fit_loop.epoch_loop.batch_progress

    def hooks() -> None:
        progress.increment_ready()
        for cb in cbs:
            cb.on_before_optimizer_step(trainer, module, opt)
        for hook in [*opt._optimizer_step_pre_hooks.values(), *opt._optimizer_step_post_hooks.values()]:
            hook(opt, (), {})
        for cb in cbs:
            cb.on_train_batch_end(trainer, module, None, runner.batch, 0)

    return hooks


def bench_memory(report: Report, tag: str, name: str, size: str, device: torch.device) -> None:
    base, batch = M.build(name, size, device)
    plan = DecayRules().classify(base)
    p_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    d_bytes = sum(d.param.numel() * d.param.element_size() for d in plan if d.decay)
    report.add(f"4.params/{tag}", "parameter bytes (all / decayed)", f"{_mb(p_bytes)} / {_mb(d_bytes)}")
    n_tensors = sum(1 for _ in base.parameters())
    none = 0.05 * p_bytes + 64 * n_tensors  # no copy: 5 % of the parameters, plus per-tensor metadata
    cases: list[tuple[str, str, Callable[[], list[Callback]], float, float]] = [
        # key, description, callbacks, state bound, peak bound
        ("4.wd", "WeightDecay", lambda: [WeightDecay(WD)], none, none),
        ("4.l2", "WeightPenalty(l2)", lambda: [WeightPenalty(l2=L2)], none, none),
        ("4.l2sp", "WeightPenalty(l2, reference='initial') (L2-SP)",
         lambda: [WeightPenalty(l2=L2, reference="initial")], d_bytes + none, none),
        ("4.l1prox", "WeightPenalty(l1, proximal)", lambda: [WeightPenalty(l1=L1, l1_mode="proximal")], none, none),
    ]  # fmt: skip
    if WeightNormMonitor is not None:
        cases += [
            ("4.monitor", "WeightNormMonitor (logging step)", lambda: [WeightNormMonitor(logging_interval=1)], none,
             none),
            # The snapshot: kept between logging steps by default (state, one copy), else allocated per step.
            ("4.ratio", "WeightNormMonitor(log_update_ratio) (logging step)",
             lambda: [WeightNormMonitor(logging_interval=1, log_update_ratio=True)], p_bytes + none, none),
            ("4.ratio_fresh", "WeightNormMonitor(log_update_ratio, keep_snapshot=False) (logging step)",
             lambda: [WeightNormMonitor(logging_interval=1, log_update_ratio=True, keep_snapshot=False)], none,
             p_bytes + none),
        ]  # fmt: skip
    else:
        for key in ("4.monitor", "4.ratio", "4.ratio_fresh"):
            report.add(f"{key}/{tag}", "WeightNormMonitor", "skipped: lightning_decay.monitor not importable")
    for key, what, make, state_bound, peak_bound in cases:
        runner = make_runner(base, batch, device, optimizer_factory("adam", 0.0), make())
        runner.step()
        runner.trainer.fit_loop.epoch_loop._batches_that_stepped = LOG_EVERY - 1  # a logging step for all
        hooks = _callback_hooks(runner)
        hooks()  # warm: lazily built layouts are state, not a per-step cost
        params = list(runner.module.parameters())
        exclude = set(storage_bytes(params)) | set(storage_bytes(p.grad for p in params if p.grad is not None))
        state = sum(held_bytes(cb, exclude) for cb in runner.callbacks)
        peak = peak_bytes(hooks, device)
        ok = state <= state_bound and peak <= peak_bound
        report.add(
            f"{key}/{tag}",
            f"{what}: state / peak while its hooks run",
            f"{state / p_bytes:.2f}x / {peak / p_bytes:.2f}x params",
            f"<= {state_bound / p_bytes:.2f}x / {peak_bound / p_bytes:.2f}x",
            ok,
        )


# ------------------------------------------------------------------------------------- 5. scaling
SCALE_CALLBACKS: dict[str, tuple[str, Callable[[], Callback]]] = {
    # key: (description, callback); monitors on a logging step, the regularizers on an ordinary one
    "wd": ("WeightDecay", lambda: WeightDecay(WD)),
    "l2": ("WeightPenalty(l2)", lambda: WeightPenalty(l2=L2)),
    "l2sp": ("WeightPenalty(l2, reference='initial')", lambda: WeightPenalty(l2=L2, reference="initial")),
    "l1prox": ("WeightPenalty(l1, proximal)", lambda: WeightPenalty(l1=L1, l1_mode="proximal")),
    "l1sub": ("WeightPenalty(l1) (subgradient)", lambda: WeightPenalty(l1=L1)),
}
if WeightNormMonitor is not None:
    SCALE_CALLBACKS["monitor"] = ("WeightNormMonitor(), logging step", lambda: WeightNormMonitor(logging_interval=1))
    SCALE_CALLBACKS["monitor_all"] = (
        "WeightNormMonitor(every extra), logging step",
        lambda: WeightNormMonitor(
            logging_interval=1, log_grad_norm=True, log_update_ratio=True, log_angular_update=True, log_sparsity=True
        ),
    )


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call on the device's `clock`, Python's GC off during it."""
    gc.disable()
    now = clock(device)
    try:
        sync(device)
        t0 = now()
        fn()
        sync(device)
        return now() - t0
    finally:
        gc.enable()


def _k(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _scaling_row(
    report: Report,
    key: str,
    what: str,
    sizes: Sequence[int],
    seconds: Sequence[float],
    floor: Sequence[float] | None = None,
) -> None:
    """One row: the times at each size and the growth from the middle to the largest size, against linear
    growth, or against the growth of ``floor`` (torch's own foreach kernel on the same tensors) when larger:
    a per-step cost cannot grow slower than the kernels it runs."""
    growth = seconds[-1] / seconds[-2]
    linear = sizes[-1] / sizes[-2]
    values = " / ".join(f"{t * 1e3:.1f}" for t in seconds)
    bound = linear * 1.25
    value = f"{values} ms; x{growth:.1f} for x{linear:g} tensors"
    target = f"<= x{bound:g}"
    if floor is not None:
        floor_growth = floor[-1] / floor[-2]
        value += f" (bare _foreach_add_: x{floor_growth:.1f})"
        if floor_growth * 1.25 > bound:
            bound = floor_growth * 1.25
            target = f"<= 1.25 x bare ({bound:.1f})"
    report.add(key, f"{what} ({' / '.join(_k(n) for n in sizes)} tensors)", value, target, growth <= bound)


def bench_scaling(report: Report, dev_tag: str, device: torch.device, budget: Budget) -> None:
    """Set-up time and per-step cost of each callback for growing numbers of small tensors: linear growth."""
    from lightning_decay import _plan_cache
    from lightning_decay._monitor_run import TrainerRun

    sizes = budget.scale
    setup: dict[str, list[float]] = {k: [] for k in SCALE_CALLBACKS}
    step: dict[str, list[float]] = {k: [] for k in SCALE_CALLBACKS}
    classify: list[float] = []
    foreach: list[float] = []  # torch's own `_foreach_add_(grads, params)`: the floor of any per-step pass
    trainer = make_trainer(device)  # one for all: the callbacks only read its loggers, optimizers and loops
    trainer.training = True
    for n in sizes:
        model = BenchModule(M.ManyBlocks(n).to(device), optimizer_factory("adam", 0.0))
        gc.collect()  # once per size (a full collection takes a fraction of a second with torch loaded)
        with torch.no_grad():
            for p in model.parameters():
                p.grad = torch.randn_like(p)  # a step's gradients, without the forward and backward passes
        times = []
        for _ in range(budget.scale_repeats):
            times.append(_timed(lambda m=model: DecayRules().classify(m), device))  # type: ignore[misc]
        classify.append(min(times))
        foreach.append(_bare_foreach_time(model, device))
        for key, (_, make) in SCALE_CALLBACKS.items():
            setups, steps = [], []
            for _ in range(budget.scale_repeats):
                _plan_cache._cache.clear()  # each set-up classifies, as the first callback of a fit does
                cb = make()
                trainer.strategy.optimizers = [optimizer_factory("adam", 0.0)(model)]

                def set_up(cb: Callback = cb, trainer: pl.Trainer = trainer, model: nn.Module = model) -> None:
                    cb.setup(trainer, model, "fit")
                    cb.on_fit_start(trainer, model)
                    cb.on_train_start(trainer, model)  # where the regularizers bind to the optimizers
                    if isinstance(cb, WeightNormMonitor):  # its layout is built at the first logging step
                        cb._probes.ensure_layout(TrainerRun(trainer, cb._binding), model)

                setups.append(_timed(set_up, device))
                hooks = _hooks(trainer, model, trainer.optimizers[0], [cb], None)
                hooks()  # warm
                steps.append(_timed(hooks, device))
                cb.teardown(trainer, model, "fit")
            setup[key].append(min(setups))  # the least disturbed call
            step[key].append(min(steps))
        del model
    _scaling_row(report, f"5.classify/{dev_tag}", "DecayRules().classify, no_weight_decay() on every block", sizes,
                 classify)  # fmt: skip
    for key, (what, _) in SCALE_CALLBACKS.items():
        _scaling_row(report, f"5.setup/{dev_tag}/{key}", f"{what}: set-up hooks", sizes, setup[key])
        _scaling_row(report, f"5.step/{dev_tag}/{key}", f"{what}: its hooks in one step", sizes, step[key], foreach)
    bench_grouping(report, dev_tag, device, budget)


def timm_param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm 1.0's ``param_groups_weight_decay`` as ``create_optimizer_v2`` calls it: no decay for ``ndim <= 1``,
    a ``.bias`` suffix or a (glob) match of the top-level model's ``no_weight_decay()``."""
    no_weight_decay_list = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, p) for p in no_weight_decay_list):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def bench_grouping(report: Report, dev_tag: str, device: torch.device, budget: Budget) -> None:
    """``decay_param_groups`` against timm's rule on the same model, the same decisions asserted: paired ratios."""
    ratios: list[list[float]] = []
    times: list[tuple[float, float]] = []
    for n in budget.group_scale:
        model = M.ManyBlocks(n).to(device)
        ours = lambda m=model: decay_param_groups(m, WD)  # noqa: E731
        timm = lambda m=model: timm_param_groups_weight_decay(m, WD)  # noqa: E731
        decayed = {id(p) for g in ours() if g["weight_decay"] for p in g["params"]}
        if decayed != {id(p) for g in timm() if g["weight_decay"] for p in g["params"]}:
            raise AssertionError(f"decay_param_groups and timm's rule decide differently on ManyBlocks({n})")
        gc.collect()
        pairs = []
        for r in range(max(3, budget.scale_repeats)):  # ABBA: the order reversed every other repetition
            first, second = (ours, timm) if r % 2 == 0 else (timm, ours)
            a, b = _timed(first, device), _timed(second, device)
            pairs.append((a, b) if r % 2 == 0 else (b, a))
        ratios.append([a / b for a, b in pairs])
        times.append((statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)))
        del model
    medians = [statistics.median(r) for r in ratios]
    value = "; ".join(
        f"{_k(n)}: {m:.2f}x [{min(r):.2f}, {max(r):.2f}] ({a * 1e3:.1f} / {b * 1e3:.1f} ms)"
        for n, m, r, (a, b) in zip(budget.group_scale, medians, ratios, times, strict=True)
    )
    sizes = " / ".join(_k(n) for n in budget.group_scale)
    what = f"decay_param_groups / timm's param_groups_weight_decay, same decisions ({sizes} tensors)"
    report.add(f"5.groups/{dev_tag}", what, value, "<= 3x", max(medians) <= 3.0)


@torch.no_grad()
def _bare_foreach_time(model: nn.Module, device: torch.device) -> float:
    """The least of 5 calls of ``torch._foreach_add_(grads, params)`` over the model's tensors."""
    params = list(model.parameters())
    grads = [p.grad for p in params]

    def bare() -> None:
        torch._foreach_add_(grads, params, alpha=0.0)

    bare()  # warm
    return min(_timed(bare, device) for _ in range(5))


def _hooks(
    trainer: pl.Trainer, module: nn.Module, opt: Optimizer, cbs: Sequence[Callback], batch: Any
) -> Callable[[], None]:
    """What callbacks do around one optimizer step (not the step): Lightning's hook calls, in its order."""
    progress = trainer.fit_loop.epoch_loop.batch_progress

    def hooks() -> None:
        progress.increment_ready()
        for cb in cbs:
            cb.on_before_optimizer_step(trainer, module, opt)  # type: ignore[arg-type]
        for hook in [*opt._optimizer_step_pre_hooks.values(), *opt._optimizer_step_post_hooks.values()]:
            hook(opt, (), {})
        for cb in cbs:
            cb.on_train_batch_end(trainer, module, None, batch, 0)  # type: ignore[arg-type]

    return hooks


# --------------------------------------------------------------------------- 6. one large tensor
LARGE_CASES: dict[str, tuple[str, Callable[[], list[Callback]], float]] = {
    # key: (description, callbacks, target on state + peak, in multiples of the weight's bytes)
    "wd": ("WeightDecay", lambda: [WeightDecay(WD)], 0.05),
    "l2": ("WeightPenalty(l2)", lambda: [WeightPenalty(l2=L2)], 0.05),
    "l2sp": ("WeightPenalty(l2, reference='initial') (the reference: 1.0x)",
             lambda: [WeightPenalty(l2=L2, reference="initial")], 1.05),
    "l1prox": ("WeightPenalty(l1, proximal)", lambda: [WeightPenalty(l1=L1, l1_mode="proximal")], 0.05),
    "l1sub": ("WeightPenalty(l1) (subgradient)", lambda: [WeightPenalty(l1=L1)], 0.05),
}  # fmt: skip
if WeightNormMonitor is not None:
    LARGE_CASES.update(
        {
            "monitor": ("WeightNormMonitor()", lambda: [WeightNormMonitor(logging_interval=1)], 0.05),
            "ratio": ("WeightNormMonitor(log_update_ratio) (the snapshot: 1.0x)",
                      lambda: [WeightNormMonitor(logging_interval=1, log_update_ratio=True)], 1.05),
            "angle": ("WeightNormMonitor(log_angular_update) (the snapshot: 1.0x)",
                      lambda: [WeightNormMonitor(logging_interval=1, log_angular_update=True)], 1.05),
            "monitor_all": ("WeightNormMonitor(every extra) (the snapshot: 1.0x)",
                            lambda: [WeightNormMonitor(logging_interval=1, log_grad_norm=True, log_update_ratio=True,
                                                       log_angular_update=True, log_sparsity=True)], 1.05),
        }
    )  # fmt: skip


class LinearFit(pl.LightningModule):
    """One bias-free ``nn.Linear(d_in, d_out)`` (one huge weight), plain ``SGD``, the same batch of 8 rows."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.layer = nn.Linear(d_in, d_out, bias=False)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.layer(batch).square().mean()

    def configure_optimizers(self) -> Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def rss_child(key: str, shape: tuple[int, int], steps: int) -> dict[str, int]:
    """One ``Trainer.fit`` with the callbacks of ``LARGE_CASES[key]`` (none for ``"none"``), run in a fresh
    interpreter by `fit_peak_rss`; returns the peak RSS of this process and the steps run."""
    torch.manual_seed(0)
    callbacks = LARGE_CASES[key][1]() if key != "none" else []
    trainer = make_trainer(torch.device("cpu"), callbacks, max_steps=steps)
    batch = torch.randn(8, shape[0])
    trainer.fit(LinearFit(*shape), train_dataloaders=RepeatBatch(batch, steps))  # type: ignore[arg-type]
    # ru_maxrss is the kernel's high-water mark of the resident set (KiB on Linux): the exact peak, which a
    # sampler of the RSS (every millisecond, say) can only miss, never exceed.
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "steps": trainer.global_step}


def fit_peak_rss(key: str, shape: tuple[int, int], steps: int) -> int:
    """Peak RSS in bytes of `rss_child`'s fit, in a fresh interpreter (``python benchmarks/run.py --rss-child``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", key, "--rss-shape", f"{shape[0]}x{shape[1]}"]
    cmd += ["--rss-steps", str(steps), "--threads", str(torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"--rss-child {key} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["steps"] != steps:
        raise RuntimeError(f"--rss-child {key}: the fit ran {result['steps']} steps, expected {steps}")
    return int(result["peak_rss"])


def rss_runs(budget: Budget) -> dict[str, list[int]]:
    """Peak RSS of each case's fit and of the same fit without callbacks (``"none"``), ``rss_repeats`` fits each,
    interleaved (order reversed every repetition)."""
    keys = ["none", *LARGE_CASES]
    runs: dict[str, list[int]] = {k: [] for k in keys}
    for r in range(budget.rss_repeats):
        for key in keys if r % 2 == 0 else reversed(keys):
            runs[key].append(fit_peak_rss(key, budget.rss_shape, budget.rss_steps))
    mib = {k: " ".join(f"{v / 2**20:.1f}" for v in vs) for k, vs in runs.items()}
    print("   peak RSS (MiB) of each fit: " + "; ".join(f"{k}: {v}" for k, v in mib.items()), flush=True)
    return runs


def bench_large_tensor(report: Report, dev_tag: str, device: torch.device, budget: Budget) -> None:
    """Memory of each callback for one large weight: on CPU the peak RSS a user sees (whole fits in fresh
    processes), and beside it the allocator's figure (state + peak of its hooks)."""
    rss = rss_runs(budget) if device.type == "cpu" and budget.rss_repeats else None
    base, batch = M.build_large(budget.large_numel, device)
    w_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    for key, (what, make, bound) in LARGE_CASES.items():
        runner = make_runner(base, batch, device, optimizer_factory("sgd", 0.0), make())
        runner.step()
        runner.trainer.fit_loop.epoch_loop._batches_that_stepped = LOG_EVERY - 1  # a logging step for all
        hooks = _hooks(runner.trainer, runner.module, runner.optimizer, runner.callbacks, runner.batch)
        hooks()  # warm: lazily built layouts are state, not a per-step cost
        params = list(runner.module.parameters())
        exclude = set(storage_bytes(params)) | set(storage_bytes(p.grad for p in params if p.grad is not None))
        state = sum(held_bytes(cb, exclude) for cb in runner.callbacks)
        peak = peak_bytes(hooks, device)
        allocator = f"{state / w_bytes:.3f}x + {peak / w_bytes:.3f}x = {(state + peak) / w_bytes:.3f}x"
        if rss is None:  # on CUDA a target; on CPU (no RSS figures) information: it counts address space
            cuda = device.type == "cuda"
            report.add(
                f"6.mem/{dev_tag}/{key}",
                f"{what}: allocator: state + peak of its hooks, one {budget.large_numel / 2**20:g}Mi-entry weight",
                allocator,
                f"<= {bound + 0.05:g}x" if cuda else "",  # the allocator's figure counts one chunk more
                (state + peak) / w_bytes <= bound + 0.05 if cuda else None,
            )
        else:
            _rss_row(report, f"6.mem/{dev_tag}/{key}", what, rss, key, budget, bound, allocator)
        del runner, hooks, params
        if w_bytes >= 2**24:  # free the large weight's copies (a Trainer holds reference cycles) before the next
            gc.collect()


def _rss_row(
    report: Report, key: str, what: str, rss: dict[str, list[int]], case: str, budget: Budget, bound: float, alloc: str
) -> None:
    """A row of the peak RSS added to a fit: per repetition, the case's fit minus the fit without callbacks."""
    d_in, d_out = budget.rss_shape
    w_bytes = d_in * d_out * 4
    added = [(a - b) / w_bytes for a, b in zip(rss[case], rss["none"], strict=True)]
    median = statistics.median(added)
    report.add(
        key,
        f"{what}: peak RSS of a fit minus the fit without it, one Linear({d_in}, {d_out}) weight "
        f"({w_bytes / 2**20:.0f} MiB), SGD; allocator (bytes allocated, address space): state + peak of its "
        f"hooks, one {budget.large_numel / 2**20:g}Mi-entry weight",
        f"{median:+.3f}x [{min(added):+.3f}, {max(added):+.3f}]; allocator {alloc}",
        f"<= {bound}x",
        median <= bound,
    )


# ---------------------------------------------------------------------------------------- driver
def expected_keys(devices: Sequence[str], models: Sequence[str] = MODELS) -> list[str]:
    """Keys of every row a run over ``devices`` and ``models`` writes (for the smoke test)."""
    per_model = [
        "1.base", "1.adamw", "1.wd", "1.l2adam", "1.l2sgd", "1.l1prox", "1.cwd", "1.cwd_measured",
        "1.extra_wd", "1.extra_l2",
        "2.bare", "2.lightning", "2.amortized", "2.equilibrium", "2.equilibrium_amortized", "3.wd_fit", "3.monitor_fit",
        "4.params", "4.wd", "4.l2", "4.l2sp", "4.l1prox", "4.monitor", "4.ratio", "4.ratio_fresh",
    ]  # fmt: skip
    per_device = [
        *[f"{k}/{{}}/{m}" for m in ("linear8", "gpt") for k in ("1.cwd_decay", "1.cwd_decay_measured", "1.cwd_mem")],
        "3.glue_fit",
        "3.glue_hooks",
        "5.classify",
        *[f"5.{part}/{{}}/{cb}" for cb in SCALE_CALLBACKS for part in ("setup", "step")],
        "5.groups",
        *[f"6.mem/{{}}/{key}" for key in LARGE_CASES],
    ]
    keys = []
    for d in devices:
        for m in models:
            keys += [f"{k}/{d}/{m}" for k in per_model]
            if d == "cuda":  # the fused rows follow 1.l1prox
                at = keys.index(f"1.l1prox/{d}/{m}") + 1
                keys[at:at] = [f"{k}/{d}/{m}" for k, *_ in FUSED_CHECKS]
        keys += [k.format(d) if "{}" in k else f"{k}/{d}" for k in per_device]
    return keys


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(devices: Sequence[str]) -> str:
    parts = [
        f"torch {torch.__version__}",
        f"lightning {pl.__version__}",
        f"Python {platform.python_version()}",
        f"CPU: {_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)",
    ]
    if "cuda" in devices:
        parts.append(f"GPU: {torch.cuda.get_device_name(0)}")
    return "; ".join(parts)


METHOD = """\
**Method.** One process, one model copy per variant, the same fixed batch. Each number is the median over
{repeats} repetitions of a paired ratio (the two variants timed in the same repetition), followed by
[min, max] of those ratios; the variants are
interleaved and their order reversed every repetition (ABC CBA ...), after {warmup} warm-up calls each,
with Python's GC off while timing (and `torch.cuda.synchronize()` around each sample on CUDA). Clock:
{clock_text}.

1. *Step time*: forward, backward and `optimizer.step()` ({steps} steps per sample), every optimizer with
   `foreach=True` over the `decay`/`no_decay` groups of `decay_param_groups`. The callbacks run through
   their real code: built with a real `Trainer` object (not fitted), their `setup`, `on_fit_start` and
   `on_train_start` hooks called, then per step `on_before_optimizer_step`, `optimizer.step()` (which
   runs the step hooks they registered) and `on_train_batch_end` (not a logging step) -- the calls Lightning makes,
   without the fit loop's own overhead in the ratio. Baselines: the optimizer's own `weight_decay` with
   the same semantics (AdamW for `WeightDecay`, coupled `Adam`/`SGD(weight_decay)` for
   `WeightPenalty(l2)`) and the naive loop `for p in model.parameters(): reg = reg + torch.norm(p, 2)`
   added to the loss. Rows 1.extra_*: the time a regularization *adds* to a step, each measured on its
   own ({calls} calls per sample, interleaved as above): the callback's hooks around one step (the calls
   Lightning makes: `on_before_optimizer_step`, its optimizer step hooks, `on_train_batch_end`; the step's
   own work left out) against the naive loop's forward (`reg += torch.norm(p, 2)` per parameter) and
   backward. A difference of whole-step times would drown both in the noise of the forward and backward
   passes of the model, which dwarf them on a compute-bound CPU. Rows 1.cwd_decay: the same hooks of
   `WeightDecay(cautious=True)` against `WeightDecay` (the decay's own time, target {cwd_target}x for the
   known direction, Adam; the measured update with NAdam, information), on 8 x `Linear(w, w)` and the gpt
   model, after one real step (the optimizer's state exists); rows 1.cwd_mem: the peak allocated while
   those hooks run (as in 4), over the decayed weights' bytes; targets: the kernels' chunk budget for the
   known direction, one copy of the decayed weights more for the measured update.
2. *Monitor*: a logging step of `WeightNormMonitor()` (its `on_before_optimizer_step` and
   `on_train_batch_end` hooks, `logging_interval=1`, metrics handed to an in-memory logger) against
   `torch.stack(torch._foreach_norm(params, 2)).tolist()` and against Lightning's `grad_norm` recipe on
   weights (`p.data.norm(2)` per parameter, a total, `.item()` per value). Amortized cost = (logging
   step + {every_minus_one} non-logging hook calls) / {every} / the step time of row 1.base. Row
   2.equilibrium: a logging step of `WeightNormMonitor(log_equilibrium=True)` (angles into the kept snapshot
   buffer, the scale-invariance score, the predicted angles) against one of `WeightNormMonitor()`, the
   weight-norm floor, with `AdamW(weight_decay)` on the decay groups (`--only 2.equilibrium` runs it alone);
   beside it the same with `keep_snapshot=False`, whose snapshot is a fresh allocation, and
   `WeightNormMonitor(log_angular_update=True)` alone; row 2.equilibrium_amortized: its amortized cost, as
   above.
3. *Fit*: real `Trainer.fit` of {fit_steps} steps (timed from step {fit_warmup} to the end; in-memory logger,
   no progress bar or checkpointing, `log_every_n_steps={every}`), {fit_repeats} interleaved repetitions of
   four fits after a warm-up of each: `Adam` + `WeightDecay` against `AdamW(weight_decay)` on the same
   groups (the same math: the ratio is the callback's own overhead), and `WeightNormMonitor()` at the
   default interval against no callback. Row 3.glue_fit: the same `Adam` + `WeightDecay` against `AdamW`
   fits on the `tiny` MLP, whose step is so cheap that the callback's per-step glue (its hooks' Python)
   is the largest share it can be. Row 3.glue_hooks answers the same question in one process, free of the
   fits' noise (a fit samples tens of milliseconds, which load on a shared machine moves by tens of
   percent): the six per-step hooks Lightning calls on the callback, each in the profiler context its
   `_call_callback_hooks` opens, and the optimizer's step pre- and post-hooks, in the fit loop's order
   ({calls_glue} calls per sample, {repeats_glue} interleaved repetitions; logging steps amortized over
   `log_every_n_steps={every}`), minus the decay AdamW runs inside its step (its foreach
   `torch._foreach_mul_(params, 1 - lr * weight_decay)` on the same weights), over the median AdamW fit
   step of row 3.glue_fit: 1 + that share; the brackets are its range over the repetitions.
4. *Memory*, as multiples of the parameters' bytes: *state* is the bytes of the tensors the callbacks
   hold after a step (parameters, gradients and optimizer state left out); *peak* is the most memory
   allocated while their hooks for one step run ({peak_method}). Targets: no copy of the parameters,
   except L2-SP's reference (persistent) and the update-ratio snapshot: kept between logging steps by
   default (`keep_snapshot=True`: state, one copy), or allocated on logging steps only (`keep_snapshot=False`: row
   4.ratio_fresh, peak).
5. *Scaling*: a model of {scale} small tensors (blocks of Linear(8, 8) + LayerNorm(8), each block
   with a `no_weight_decay()` hook) and gradients set directly. *Set-up*: `setup`, `on_fit_start` and
   `on_train_start` (and
   the monitor's layout, built at its first logging step), the plan cache cleared before each, so each
   classifies; *step*: the callback's hooks around one optimizer step (the step itself left out): an
   ordinary step for the regularizers, a logging step for the monitors. A step's cost cannot grow slower
   than torch's foreach kernels over the same tensors, which on CPU grow faster than linearly once the
   tensors outgrow the caches: the rows show the growth of a bare `torch._foreach_add_(grads, params)`,
   and where it exceeds x4 the target is 1.25 times it. The least of {scale_repeats} calls
   in CPU time of the process (on CUDA: wall time), GC off during each. Linear
   growth means x4 for x4 tensors; target x5. Row 5.groups: `decay_param_groups` against timm 1.0's
   `param_groups_weight_decay` (reimplemented) on `ManyBlocks` of {group_scale} tensors, the same decay
   set asserted; the median of paired ratios of interleaved calls; target at most 3x at each size.
6. *One large tensor*: on CPU, the peak RSS a user sees: each variant is a real `Trainer.fit` of {rss_steps}
   steps in a fresh interpreter (`python benchmarks/run.py --rss-child KEY`), one `nn.Linear({rss_in}, {rss_out},
   bias=False)` weight, plain `SGD`, the process's `ru_maxrss` (the kernel's high-water mark of its resident set,
   so the exact peak, which sampling the RSS could only miss); the value is the median over {rss_repeats} interleaved
   repetitions of (peak with the callback - peak of the same fit without callbacks) / the weight's bytes, with
   its range. It counts everything the process holds: the callback's tensors, its temporaries and what the C
   allocator keeps of them after they are freed. Beside it, the allocator's figure: state + peak (as in 4)
   for one weight of {large_numel} float32 entries (an embedding table) on a logging step, which counts the
   bytes of tensors alive at once, not what malloc keeps, and on CPU address space, not resident pages (the
   L1 kernels' one buffer per call is a mapping of at least 32 MiB, of which one slice is written; see
   `kernels.MAPPED_BYTES`). Targets: 0.05x, plus 1.0x for L2-SP's reference and for the monitor's snapshot;
   on CUDA, where the rows are the allocator's figure, 0.05x more; without RSS figures (`--size tiny`) on CPU,
   none.
"""


def render(report: Report, args: argparse.Namespace, devices: Sequence[str], budget: Budget) -> str:
    peak_method = (
        "`torch.cuda.max_memory_allocated`"
        if devices == ["cuda"]
        else "CPU: allocation events of `torch.profiler(profile_memory=True)`; CUDA: `torch.cuda.max_memory_allocated`"
    )
    command = shlex.join(["python", "benchmarks/run.py", *args.argv])
    lines = [
        "# Benchmarks",
        "",
        "<!-- Written by `python benchmarks/run.py --out docs/benchmarks.md`; do not edit by hand. -->",
        "",
        f"Command: `{command.strip()}` (size `{args.size}`, devices {', '.join(devices)}).",
        "",
        f"Environment: {environment(devices)}.",
        "",
        METHOD.format(
            repeats=budget.repeats,
            warmup=budget.warmup,
            steps=budget.steps,
            calls=budget.calls,
            every=LOG_EVERY,
            every_minus_one=LOG_EVERY - 1,
            fit_steps=budget.fit_steps,
            fit_warmup=budget.fit_warmup,
            fit_repeats=budget.fit_repeats,
            calls_glue=glue_budget(budget)[0],
            repeats_glue=glue_budget(budget)[1],
            peak_method=peak_method,
            cwd_target=CWD_DECAY_TARGET,
            clock_text=(
                "wall time"
                if CLOCK["cpu"] is time.perf_counter
                else "on CPU the CPU time of this process (`time.process_time`: other processes on a shared "
                "machine do not advance it, as they do the wall clock), on CUDA wall time"
            ),
            scale=" / ".join(map(str, budget.scale)),
            scale_repeats=budget.scale_repeats,
            group_scale=" / ".join(map(str, budget.group_scale)),
            large_numel=budget.large_numel,
            rss_steps=budget.rss_steps,
            rss_in=budget.rss_shape[0],
            rss_out=budget.rss_shape[1],
            rss_repeats=budget.rss_repeats,
        ),
    ]
    if args.note:
        lines += [f"**Note.** {args.note}", ""]
    lines += [
        "| key | measurement | value | target | result |",
        "|---|---|---|---|---|",
    ]
    table = [f"| `{r.key}` | {r.what} | {r.value} | {r.target} | {r.result} |" for r in report.rows]
    if args.merge and args.out is not None and args.out.exists():
        table, command_lines = _merged(args.out.read_text(), table)
        lines[4:5] = [
            *command_lines,
            f"Rows {', '.join(sorted({r.key.split('/')[0] for r in report.rows}))} "
            f"updated by: `{command.strip()}` (size `{args.size}`, devices {', '.join(devices)}).",
        ]
    lines += table
    verdicts = [line.rsplit("|", 2)[-2].strip() for line in table]
    passed = verdicts.count("PASS")
    missed = [line.split("`")[1] for line, v in zip(table, verdicts, strict=True) if v == "MISS"]
    lines += ["", f"{passed} targets met, {len(missed)} missed" + (f": {', '.join(missed)}." if missed else ".")]
    return "\n".join(lines) + "\n"


def _merged(page: str, table: list[str]) -> tuple[list[str], list[str]]:
    """``page``'s table rows with those of ``table`` replacing the rows of the same key (new keys appended after
    the last row of their measurement), and ``page``'s lines naming the commands its rows came from."""
    key = lambda line: line.split("`")[1]  # noqa: E731
    new = {key(line): line for line in table}
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    merged = [new.pop(key(line), line) for line in rows]
    for k, line in new.items():
        same = [i for i, row in enumerate(merged) if key(row).split("/")[0] == k.split("/")[0]]
        merged.insert(same[-1] + 1 if same else len(merged), line)
    commands = [line for line in page.splitlines() if line.startswith(("Command:", "Rows "))]
    return merged, commands


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CPU, and CUDA when present"
    )
    parser.add_argument("--size", choices=tuple(BUDGETS), default="small")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: mlp,gpt")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per measurement (default per size)")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--note", default="", help="a sentence shown above the table (e.g. machine load)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --out: replace only the rows measured now in the existing page (e.g. --only 6), keep the others",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's default, one per core)"
    )
    parser.add_argument(
        "--clock",
        choices=("auto", "wall"),
        default="auto",
        help="auto: this process's CPU time on CPU, wall time on CUDA; wall: wall time everywhere",
    )
    parser.add_argument(
        "--only",
        default="1,2,3,4,5,6",
        help="comma-separated subset of the measurements 1-6 (2.equilibrium, 1.cwd_decay: those rows alone)",
    )
    parser.add_argument(
        "--rss-repeats", type=int, default=None, help="fits per variant of the peak-RSS rows 6.* (default per size)"
    )
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)  # internal: one fit, prints its RSS
    parser.add_argument("--rss-shape", default="10000x5000", help=argparse.SUPPRESS)
    parser.add_argument("--rss-steps", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    if args.rss_child is not None:
        _main_rss_child(args)
        return Report()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    devices = ["cpu", "cuda"] if args.device == "auto" and torch.cuda.is_available() else [args.device]
    devices = ["cpu"] if devices == ["auto"] else devices
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"--models: unknown {sorted(unknown)}; choose from {MODELS}")
    only = {s.strip() for s in args.only.split(",")}
    budget = BUDGETS[args.size]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.clock == "wall":
        CLOCK["cpu"] = time.perf_counter
    if args.repeats is not None:
        budget = Budget(**{**budget.__dict__, "repeats": args.repeats})
    if args.rss_repeats is not None:
        budget = Budget(**{**budget.__dict__, "rss_repeats": args.rss_repeats})

    report = Report()
    t_start = time.perf_counter()
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _run_all(report, args, devices, models, only, budget)
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    print(f"== done in {time.perf_counter() - t_start:.1f} s", flush=True)
    text = render(report, args, devices, budget)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return report


def _run_all(
    report: Report,
    args: argparse.Namespace,
    devices: Sequence[str],
    models: Sequence[str],
    only: set[str],
    budget: Budget,
) -> None:
    for dev in devices:
        device = torch.device(dev)
        for name in models:
            tag = f"{dev}/{name}"
            print(f"== {tag} ({args.size})", flush=True)
            t0 = time.perf_counter()
            t_step = bench_step(report, tag, name, args.size, device, budget) if "1" in only else float("nan")
            t1 = time.perf_counter()
            if ("2" in only or "2.equilibrium" in only) and t_step != t_step:
                t_step = _plain_step_time(name, args.size, device, budget)  # no row 1: for the amortized costs
            if "2" in only:
                bench_monitor(report, tag, name, args.size, device, budget, t_step)
            if "2" in only or "2.equilibrium" in only:
                bench_equilibrium(report, tag, name, args.size, device, budget, t_step)
            t2 = time.perf_counter()
            if "3" in only:
                bench_fit(report, tag, name, args.size, device, budget)
            t3 = time.perf_counter()
            if "4" in only:
                bench_memory(report, tag, name, args.size, device)
            t4 = time.perf_counter()
            gc.collect()  # model copies of this model's runners, before the next model's
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"   ({tag}: 1: {t1 - t0:.1f} s, 2: {t2 - t1:.1f} s, 3: {t3 - t2:.1f} s, 4: {t4 - t3:.1f} s)")
        if "1" in only or "1.cwd_decay" in only:
            print(f"== {dev} cautious decay, the decay's own cost (8 x Linear, gpt)", flush=True)
            bench_cautious_decay(report, dev, args.size, device, budget)
        if "3" in only:
            print(f"== {dev} per-step glue (tiny MLP)", flush=True)
            bench_glue(report, dev, device, budget)
        t0 = time.perf_counter()
        if "5" in only:
            print(f"== {dev} scaling ({', '.join(map(str, budget.scale))} tensors)", flush=True)
            bench_scaling(report, dev, device, budget)
        t1 = time.perf_counter()
        if "6" in only:
            print(f"== {dev} one large tensor ({budget.large_numel} entries)", flush=True)
            bench_large_tensor(report, dev, device, budget)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"   ({dev}: 5: {t1 - t0:.1f} s, 6: {time.perf_counter() - t1:.1f} s)")


def _main_rss_child(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    d_in, d_out = (int(n) for n in args.rss_shape.split("x"))
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = rss_child(args.rss_child, (d_in, d_out), args.rss_steps)
    print(json.dumps(result), flush=True)


def _plain_step_time(name: str, size: str, device: torch.device, budget: Budget) -> float:
    base, batch = M.build(name, size, device)
    runner = make_runner(base, batch, device, optimizer_factory("adam", 0.0))
    s = interleaved({"none": runner.step}, budget.steps, budget.repeats, budget.warmup, device)
    return statistics.median(s["none"])


if __name__ == "__main__":
    main()
