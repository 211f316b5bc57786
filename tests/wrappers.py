"""The real wrapper modules of torch and Lightning, built on CPU in the test process.

DDP and FSDP1 need a process group: `process_group` starts a one-rank gloo group for the duration of a
``with`` block and destroys it afterwards, so no other test sees it. Each builder returns the wrapper
and the attribute (name component) it holds the model under.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """A one-rank gloo process group (file rendezvous, nothing listens on a port)."""
    if dist.is_initialized():  # pragma: no cover - a test left one behind
        raise RuntimeError("a process group is already initialized")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{Path(tmp) / 'rdzv'}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def ddp(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel`` on CPU (inside `process_group`)."""
    return nn.parallel.DistributedDataParallel(model)


def fsdp1(model: nn.Module, wrap_types: set[type[nn.Module]] | None = None) -> nn.Module:
    """FSDP1 ``FullyShardedDataParallel(use_orig_params=True)`` on CPU (inside `process_group`), with
    every module of ``wrap_types`` wrapped too (names gain ``_fsdp_wrapped_module.`` at each)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = ModuleWrapPolicy(wrap_types) if wrap_types else None
    return FullyShardedDataParallel(
        model,
        use_orig_params=True,
        device_id=torch.device("cpu"),
        auto_wrap_policy=policy,
        sharding_strategy=ShardingStrategy.NO_SHARD,  # what one rank gets anyway, said here to avoid a warning
    )


def fabric_module(model: nn.Module) -> nn.Module:
    """Fabric's ``_FabricModule`` as ``Fabric(accelerator="cpu").setup_module`` returns it."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    return fabric.setup_module(model)
