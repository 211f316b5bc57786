"""Importable pieces for the distributed tests: a tiny model, probe callbacks and spawned workers.

Spawned processes (``ddp_spawn``, ``torch.multiprocessing.spawn``) unpickle what they run by import, so
everything here is a top-level class or function of ``tests.dist_workers``. Every run writes its results
(full weights, classification, callback state, collective counts) to files under an output folder, and
the test in the parent process compares them with a single-process run of the same global batch.

The model is deliberately awkward to shard: widths of 15 and 3 split unevenly over two ranks, and one
``nn.Linear(15, 1)`` has a single row, so under FSDP2 one rank holds empty shards of it.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_decay import DecayGroupsMixin, DecayRules, WeightDecay, WeightPenalty

N_SAMPLES = 32
PER_RANK_BATCH = 4
WORLD = 2
EPOCHS = 2
STEPS_PER_EPOCH = N_SAMPLES // (PER_RANK_BATCH * WORLD)
LR = 0.05
WD = 0.1  # the optimizer's own weight_decay on the "decay" group, taken over by WeightDecay(None)
L1, L2 = 1e-3, 0.2


# ------------------------------------------------------------------------------------------ model
def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, 6, generator=g)
    y = torch.stack([x[:, :3].sum(1).sin(), x[:, 3:].prod(1), x.mean(1)], dim=1)
    return TensorDataset(x, y)


class Tiny(nn.Module):
    """``body`` (Linear, LayerNorm, Linear), ``head`` (Linear 15 -> 3) and ``gate`` (Linear 15 -> 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 15), nn.LayerNorm(15), nn.Tanh(), nn.Linear(15, 15))
        self.head = nn.Linear(15, 3)
        self.gate = nn.Linear(15, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(h) * torch.sigmoid(self.gate(h))


def make_tiny(seed: int = 0) -> Tiny:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Tiny()


class DistModel(DecayGroupsMixin, pl.LightningModule):
    """The mixin's decay / no-decay groups; the head's weights get no optimizer decay (the penalty does it).

    ``shard="fsdp2"`` or ``"hsdp"`` applies FSDP2 ``fully_shard`` in ``configure_model`` (for
    ``ModelParallelStrategy``).
    """

    decay_overrides = {"net.head.*": {"weight_decay": 0.0}, "net.gate.*": {"weight_decay": 0.0}}

    def __init__(self, batch_size: int = PER_RANK_BATCH, shard: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.net = make_tiny(seed)
        self.batch_size = batch_size
        self.shard = shard
        self.optimizer = torch.optim.AdamW
        self.optimizer_kwargs = {"lr": LR, "weight_decay": WD}
        self.record: dict[str, Any] = {}

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        # "fsdp2": shard over the data-parallel ranks. "hsdp": the whole 2-D mesh, which FSDP2 reads as
        # hybrid sharding: replicate over "data_parallel" (2), shard over "tensor_parallel" (1), so the
        # parameters are DTensors with (Replicate(), Shard(0)) placements.
        mesh = self.device_mesh if self.shard == "hsdp" else self.device_mesh["data_parallel"]
        for layer in (self.net.body[0], self.net.body[3], self.net.head, self.net.gate):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        plan = DecayRules().classify(self)
        self.record["plan"] = [(d.name, d.decay, d.shape, d.reason) for d in plan]
        self.record["param_types"] = sorted({type(p).__name__ for p in self.parameters()})
        optimizer = super().configure_optimizers()
        by_id = {id(d.param): d.name for d in plan}
        self.record["groups"] = [
            (g["name"], g.get("weight_decay"), [by_id[id(p)] for p in g["params"]]) for g in optimizer.param_groups
        ]
        return optimizer

    def train_dataloader(self) -> DataLoader:
        # Lightning's automatic DistributedSampler always shuffles training data, so the runs use
        # ``use_distributed_sampler=False`` and give rank r the samples r, r + world, ...: the global
        # batch of step k is then samples [k * B, (k + 1) * B), the batch of a single process.
        data = dataset()
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world > 1:
            data = Subset(data, list(range(rank, len(data), world)))
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)


# ------------------------------------------------------------------------------------ callbacks
def regularizers(cautious: bool = False) -> list[Callback]:
    """``WeightDecay`` taking over the body's AdamW decay (``cautious``: masked, issue 20); ``WeightPenalty``
    (L1 + L2-SP) on head and gate."""
    return [
        WeightDecay(weight_decay=None, cautious=cautious, rules=DecayRules(exclude=["net.head.*", "net.gate.*"])),
        WeightPenalty(l1=L1, l2=L2, reference="initial", rules=DecayRules(exclude=["net.body.*"])),
    ]


def monitor() -> Callback:
    from lightning_decay.monitor import WeightNormMonitor

    return WeightNormMonitor(log_grad_norm=True, log_update_ratio=True, log_sparsity=True)


def monitor_available() -> bool:
    try:
        from lightning_decay.monitor import WeightNormMonitor  # noqa: F401
    except ImportError:
        return False
    return True


_ALL_REDUCE_CALLS: Counter[str] = Counter()
_ORIGINAL_ALL_REDUCE: Callable[..., Any] | None = None


def _counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
    _ALL_REDUCE_CALLS["all_reduce"] += 1
    assert _ORIGINAL_ALL_REDUCE is not None
    return _ORIGINAL_ALL_REDUCE(*args, **kwargs)


def count_all_reduce() -> None:
    """Wrap ``torch.distributed.all_reduce`` in this process with a counter (idempotent)."""
    global _ORIGINAL_ALL_REDUCE
    if _ORIGINAL_ALL_REDUCE is None:
        _ORIGINAL_ALL_REDUCE = torch.distributed.all_reduce
        torch.distributed.all_reduce = _counting_all_reduce


class Mark(Callback):
    """Notes the ``all_reduce`` count in ``on_train_batch_end``; two marks bracket the callback between them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: list[int] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        count_all_reduce()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.counts.append(_ALL_REDUCE_CALLS["all_reduce"])

    @property
    def state_key(self) -> str:
        return f"Mark[{self.name}]"


class Dump(Callback):
    """At the end of fit, every rank writes ``{tag}_rank{r}.pt``: full weights, records, callback state."""

    def __init__(self, out_dir: str, tag: str) -> None:
        self.out_dir = out_dir
        self.tag = tag

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = {}
        for name, value in pl_module.state_dict().items():
            full = value.full_tensor() if hasattr(value, "full_tensor") else value  # a collective on DTensors
            weights[name] = full.detach().cpu().clone()
        marks = {cb.name: cb.counts for cb in trainer.callbacks if isinstance(cb, Mark)}
        states = {}
        for cb in trainer.callbacks:
            if isinstance(cb, (WeightDecay, WeightPenalty)):
                states[type(cb).__name__] = {"steps": list(cb._binding.steps), "calls": len(cb._binding.bound)}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizers[0].param_groups]
        out = {
            "weights": weights,
            "record": getattr(pl_module, "record", {}),
            "marks": marks,
            "states": states,
            "groups": groups,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
        }
        torch.save(out, Path(self.out_dir) / f"{self.tag}_rank{trainer.global_rank}.pt")


# ---------------------------------------------------------------------------------------- runs
def trainer_kwargs(
    out_dir: str,
    tag: str,
    with_monitor: bool,
    with_regularizers: bool = True,
    max_epochs: int = EPOCHS,
    cautious: bool = False,
) -> dict[str, Any]:
    callbacks: list[Callback] = regularizers(cautious) if with_regularizers else []
    if with_monitor and monitor_available():
        callbacks += [Mark("before"), monitor(), Mark("after")]
    callbacks += [
        Dump(out_dir, tag),
        ModelCheckpoint(dirpath=os.path.join(out_dir, f"{tag}_ckpt"), save_top_k=-1, every_n_epochs=1),
    ]
    return {
        "accelerator": "cpu",
        "max_epochs": max_epochs,
        "logger": CSVLogger(out_dir, name=tag, version=0),
        "log_every_n_steps": 1,
        "callbacks": callbacks,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
        "use_distributed_sampler": False,
    }


def fit(
    out_dir: str,
    tag: str,
    strategy: Any,
    devices: int,
    batch_size: int,
    shard: str | None = None,
    with_monitor: bool = True,
    with_regularizers: bool = True,
    ckpt_path: str | None = None,
    precision: str = "32-true",
    fp16_scale: float | None = None,
    cautious: bool = False,
) -> None:
    """One fit of ``DistModel`` with every callback; ``fp16_scale``: ``16-mixed`` with a GradScaler of that
    initial scale (Lightning refuses the ``"16-mixed"`` string on CPU, its plugin works); ``cautious``:
    ``WeightDecay(cautious=True)``."""
    torch.manual_seed(0)
    # A resumed run starts from other initial weights: everything it needs must come from the checkpoint
    # (the L2-SP reference "initial" included), not from a model that happens to be initialized the same.
    model = DistModel(batch_size=batch_size, shard=shard, seed=0 if ckpt_path is None else 1)
    trainer = pl.Trainer(
        strategy=strategy,
        devices=devices,
        **fp16_plugin(fp16_scale, precision),
        **trainer_kwargs(out_dir, tag, with_monitor, with_regularizers, cautious=cautious),
    )
    trainer.fit(model, ckpt_path=ckpt_path)


def fp16_plugin(init_scale: float | None, precision: str) -> dict[str, Any]:
    if init_scale is None:
        return {"precision": precision}
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp2_worker(rank: int, out_dir: str, port: int, scenarios: tuple[str, ...]) -> None:
    """One rank of 2-process ``ModelParallelStrategy`` runs (FSDP2), launched outside Lightning.

    ``ModelParallelStrategy`` has no spawn launcher (its subprocess launcher would re-run pytest), so the
    test starts the processes itself; Lightning sees ``LOCAL_RANK`` and launches none. The scenarios run
    one after the other in the same processes (the process group is kept between fits):
    ``"fsdp2"`` (all callbacks, two epochs), ``"fsdp2_resume"`` (the second epoch again, from the first
    epoch's checkpoint of ``"fsdp2"``), ``"hsdp"`` (hybrid sharding, all callbacks), ``"fsdp2_bf16"``
    (``"fsdp2"`` under ``bf16-mixed``), ``"fsdp2_cwd"`` (``WeightDecay(cautious=True)``) and ``"module_ref"``
    (:func:`module_reference_check`, best last). A scenario that raises writes ``{tag}_rank{r}.err`` and
    the next one runs.
    """
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    from lightning.pytorch.strategies import ModelParallelStrategy

    for tag in scenarios:
        if tag == "module_ref":
            module_reference_check(rank, out_dir)
            continue
        strategy = ModelParallelStrategy(
            data_parallel_size=WORLD, tensor_parallel_size=1, timeout=timedelta(seconds=60)
        )
        ckpt_path = None
        if tag == "fsdp2_resume":
            ckpt_path = os.path.join(out_dir, "fsdp2_ckpt", f"epoch=0-step={STEPS_PER_EPOCH}.ckpt")
        shard = "hsdp" if tag == "hsdp" else "fsdp2"
        precision = "bf16-mixed" if tag.endswith("_bf16") else "32-true"
        cautious = tag.endswith("_cwd")
        try:
            fit(
                out_dir, tag, strategy, WORLD, PER_RANK_BATCH, shard=shard, ckpt_path=ckpt_path, precision=precision,
                with_monitor=not cautious, cautious=cautious,
            )  # fmt: skip
        except Exception:
            Path(out_dir, f"{tag}_rank{rank}.err").write_text(traceback.format_exc())
        torch.distributed.barrier()


def module_reference_check(rank: int, out_dir: str) -> None:
    """``WeightPenalty(reference=<full tensor>)`` on an FSDP2 parameter whose rank-0 shard has the full shape.

    ``nn.Linear(15, 1).weight`` sharded over 2 ranks: rank 0 holds the (1, 15) row, rank 1 an empty (0, 15)
    shard. Turning the full reference into the local shard must give every rank its own part. Runs on a
    process group of its own with a short timeout, as a rank waiting for a collective the other never
    enters would otherwise block for the default group's timeout. Writes ``module_ref_rank{r}.pt``.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=5))
    mesh = DeviceMesh.from_group(group, "cpu")
    layer = make_tiny().gate
    full = layer.weight.detach().clone()
    fully_shard(layer, mesh=mesh)
    out: dict[str, Any] = {"local_shape": tuple(layer.weight.to_local().shape)}
    try:
        ref = WeightPenalty(l2=1.0)._references.ref_for("weight", layer.weight, full)
        torch.distributed.barrier(group=group)
        out["ref"] = ref.clone()
        out["expected"] = layer.weight.to_local().detach().clone()
    except Exception as err:  # a collective entered by one rank only times out
        out["error"] = f"{type(err).__name__}: {err}"[:500]
    torch.save(out, Path(out_dir) / f"module_ref_rank{rank}.pt")


def spawn(fn: Callable[..., Any], args: tuple[Any, ...], timeout: float = 240.0) -> None:
    """Run ``fn(rank, *args)`` in ``WORLD`` spawned processes; terminate them if they outlive ``timeout``."""
    context = torch.multiprocessing.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):  # raises if a process failed
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"{fn.__name__} did not finish in {timeout:.0f} s")


def load_result(out_dir: Path, tag: str, rank: int) -> dict[str, Any]:
    """What ``Dump`` wrote for ``tag`` on ``rank``; raises with the worker's traceback if the run failed."""
    err = out_dir / f"{tag}_rank{rank}.err"
    if err.exists():
        raise AssertionError(f"run {tag!r} failed on rank {rank}:\n{err.read_text()}")
    return torch.load(out_dir / f"{tag}_rank{rank}.pt", weights_only=False)


# ------------------------------------------------------------------------------------- readers
def read_metrics(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def metric_rows(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """``{step: value}`` of ``key``; raises if a step has the key in two rows (logged twice)."""
    out: dict[int, float] = {}
    for row in rows:
        if row.get(key):
            step = int(row["step"])
            if step in out:
                raise AssertionError(f"{key!r} logged twice at step {step}")
            out[step] = float(row[key])
    return out


# --------------------------------------------------------------------------- `ddp` (subprocess launcher)
def run_ddp_subprocess(out_dir: Path, timeout: float = 240.0) -> None:
    """All callbacks under ``strategy="ddp"``, the multi-GPU default: Lightning's subprocess launcher.

    That launcher starts the other ranks by running the command line of rank 0 again (here ``python -m
    tests.dist_workers OUT``, never pytest), so this module is run as a script in a child process.
    """
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, "-m", "tests.dist_workers", str(out_dir)], cwd=root, env=env, timeout=timeout, check=True
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    fit(sys.argv[1], "ddp_subprocess", "ddp", WORLD, PER_RANK_BATCH)
