"""No host read on the steps that do not log: the callbacks' hooks read no tensor value back to Python there.

A host sync (``tensor.item()``, ``float(tensor)``, ``if tensor:``) stalls an accelerator until its queue
drains; the callbacks keep every per-step value on the device and copy to the host only on logging steps.
On the CPU nothing stalls, but the same reads go through ATen's ``aten::_local_scalar_dense``, which a
``TorchDispatchMode`` sees. Each test fits a real model with a real ``Trainer``; a last callback wraps, at
train start, the hooks the callbacks under test run per step (their Lightning hooks and the step pre-/post-
hooks they registered on the optimizer, not the optimizer's own step: torch's Adam reads its ``step`` on the
CPU) so that they run inside the mode, and records the scalar reads per step. Steps that log (every
``log_every_n_steps``) may read; no other may, from the second step on (the first checks the optimizer's
settings once: a tensor lr's factor, for instance). ``tests/test_cuda.py`` runs the same on CUDA with
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_decay import WeightDecay, WeightNormMonitor, WeightPenalty
from tests.test_penalty import Lit, loader

LOG_EVERY = 4
HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end", "on_before_zero_grad")


class ScalarReads(TorchDispatchMode):
    """Counts ``aten::_local_scalar_dense`` (what ``item()``, ``float()`` and ``bool()`` of a tensor run)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def scalar_reads() -> Iterator[list[int]]:
    """CPU: counts the scalar reads inside (one element, the count)."""
    mode, out = ScalarReads(), [0]
    with mode:
        yield out
    out[0] = mode.count


@contextlib.contextmanager
def cuda_syncs() -> Iterator[list[int]]:
    """CUDA: counts the synchronizing calls inside, as ``torch.cuda.set_sync_debug_mode("warn")`` reports them."""
    out = [0]
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield out
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    out[0] = sum("synchroniz" in str(w.message) for w in caught)


class RecordReads(Callback):
    """Wraps the per-step hooks of ``watched`` (callbacks, and their step hooks on the optimizers) in ``detect``."""

    def __init__(self, watched: list[Callback], detect: Callable[[], Any]) -> None:
        self.watched, self.detect = watched, detect
        self.reads: dict[int, int] = {}
        self.trainer: pl.Trainer | None = None

    def _counted(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.detect() as count:
                out = fn(*args, **kwargs)
            assert self.trainer is not None
            step = self.trainer.global_step
            self.reads[step] = self.reads.get(step, 0) + count[0]
            return out

        return wrapper

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainer = trainer  # here, after the callbacks under test bound to the optimizers (listed before)
        for cb in self.watched:
            for name in HOOKS:
                setattr(cb, name, self._counted(getattr(cb, name)))
        for opt in trainer.optimizers:
            for hooks in (opt._optimizer_step_pre_hooks, opt._optimizer_step_post_hooks):
                for key, hook in list(hooks.items()):
                    hooks[key] = self._counted(hook)


def _fit(
    optimizer: Callable[[Any], Any], callbacks: list[Callback], max_steps: int = 12, accelerator: str = "cpu"
) -> dict[int, int]:
    recorder = RecordReads(callbacks, scalar_reads if accelerator == "cpu" else cuda_syncs)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=max_steps,
        log_every_n_steps=LOG_EVERY,
        logger=CSVLogger("/tmp/ld_host_sync", name="csv"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, recorder],
    )
    trainer.fit(Lit(optimizer), loader())
    assert recorder.reads, "no hook was recorded: the test measures nothing"
    return recorder.reads


def _adam(**kw: Any) -> Callable[[Any], Any]:
    return lambda m: torch.optim.Adam(m.parameters(), lr=0.01, **kw)


CASES: dict[str, tuple[Callable[[Any], Any], Callable[[], list[Callback]]]] = {
    "decay": (_adam(), lambda: [WeightDecay(0.1)]),
    "decay-schedule-lr_ratio": (
        _adam(),
        lambda: [WeightDecay(lambda step: 0.1 / (1 + step), mode="lr_ratio")],
    ),
    "decay-tensor-lr": (lambda m: torch.optim.Adam(m.parameters(), lr=torch.tensor(0.01)), lambda: [WeightDecay(0.1)]),
    "decay-cautious-known": (_adam(), lambda: [WeightDecay(0.1, cautious=True)]),
    "decay-cautious-measured": (
        lambda m: torch.optim.NAdam(m.parameters(), lr=0.01),
        lambda: [WeightDecay(0.1, cautious=True)],
    ),
    "penalty-l1-proximal-l2": (_adam(), lambda: [WeightPenalty(l1=0.01, l2=0.01, l1_mode="proximal")]),
    "penalty-l2sp": (_adam(), lambda: [WeightPenalty(l2=0.01, reference="initial")]),
    "monitor-everything": (
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1),
        lambda: [
            WeightNormMonitor(
                log_grad_norm=True,
                log_update_ratio=True,
                log_sparsity=True,
                log_equilibrium=True,
                decay_report=False,
            )
        ],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_scalar_read_after_the_first_step(case: str) -> None:
    optimizer, make = CASES[case]
    reads = _fit(optimizer, make())
    later = {s: n for s, n in reads.items() if s >= 1}
    assert len(later) >= 10, later
    assert all(n == 0 for n in later.values()), f"{case}: scalar reads per step: {later}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(CASES))
def test_no_cuda_sync_on_steps_that_do_not_log(case: str) -> None:
    optimizer, make = CASES[case]
    reads = _fit(optimizer, make(), accelerator="gpu")
    # The batch whose step makes global_step g logs when g % LOG_EVERY == 0; its hooks are recorded under
    # g - 1 (before the step) and g (after it): both left out, with the first step.
    quiet = {s: n for s, n in reads.items() if s >= 1 and s % LOG_EVERY not in (0, LOG_EVERY - 1)}
    assert quiet, "no quiet step was recorded"
    assert all(n == 0 for n in quiet.values()), f"{case}: synchronizing calls on steps that do not log: {quiet}"


def test_the_detector_sees_a_scalar_read() -> None:
    """The check above can fail: a callback that reads a value every step is caught on every step."""

    class ReadsEveryStep(Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            float(next(pl_module.parameters()).norm())

    reads = _fit(_adam(), [ReadsEveryStep()], max_steps=6)
    assert all(reads[s] >= 1 for s in range(6)), reads
