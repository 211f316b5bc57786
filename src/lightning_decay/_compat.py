"""The two namespaces of Lightning: ``lightning.pytorch`` and the standalone ``pytorch_lightning`` package.

Both ship the same code under different module names, so their classes are distinct: a
``pytorch_lightning.loggers.TensorBoardLogger`` is not an instance of ``lightning.pytorch``'s, and an
exception raised as one namespace's ``MisconfigurationException`` is not caught as the other's. Every
type check of the package against a Lightning class goes through the tuples here, which hold the classes
of each namespace that is installed, and only those are imported: the package works with ``lightning``
alone, with ``pytorch-lightning`` alone (its dependency, see pyproject.toml), or with both (every
``lightning`` release since 2.4 depends on ``pytorch-lightning``). With both, both are imported: the
callbacks subclass the ``Callback`` of each, or one namespace's ``LightningCLI`` would refuse them in
``trainer.callbacks``. ``NAMESPACE`` is the one the package's own defaults come from (``DecayLightningCLI``,
``BaseFinetuning``): ``lightning.pytorch`` where installed.

Nothing here imports TensorBoard: Lightning's logger classes import it only when a logger writes.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

# The same functions under both namespaces (`lightning_utilities`'); importing a namespace below sets their rank.
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn

__all__ = [
    "BASE_FINETUNING",
    "DEEPSPEED_STRATEGIES",
    "HISTOGRAM_LOGGERS",
    "LIGHTNING_AVAILABLE",
    "NAMESPACE",
    "PL_AVAILABLE",
    "TENSORBOARD_LOGGERS",
    "WANDB_LOGGERS",
    "BaseFinetuning",
    "Callback",
    "MisconfigurationException",
    "is_deepspeed",
    "pl",
    "rank_zero_info",
    "rank_zero_warn",
    "uses_pytorch_lightning",
]


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


LIGHTNING_AVAILABLE = _available("lightning")
PL_AVAILABLE = _available("pytorch_lightning")
if not (LIGHTNING_AVAILABLE or PL_AVAILABLE):
    raise ImportError(
        "lightning-decay needs PyTorch Lightning: `pip install pytorch-lightning` (its dependency) or `pip install "
        "lightning`; neither `lightning` nor `pytorch_lightning` can be imported."
    )

# (Trainer namespace, Fabric namespace) of each installed flavour; the first is `NAMESPACE`.
_FLAVOURS = [
    *([("lightning.pytorch", "lightning.fabric")] if LIGHTNING_AVAILABLE else []),
    *([("pytorch_lightning", "lightning_fabric")] if PL_AVAILABLE else []),
]
NAMESPACE = _FLAVOURS[0][0]


def _classes(module: str, name: str, fabric: bool = False) -> tuple[type, ...]:
    """Class ``name`` of ``{namespace}.{module}`` for each installed namespace (with ``fabric``: of its Fabric)."""
    return tuple(getattr(importlib.import_module(f"{ns[1 if fabric else 0]}.{module}"), name) for ns in _FLAVOURS)


def _import_namespaces() -> None:
    import lightning_utilities.core.rank_zero as rank_zero

    # Both namespaces point the logger of the rank-zero messages they share (`lightning_utilities`) at their
    # own on import: importing `pytorch_lightning` after `lightning.pytorch` must not move `lightning.pytorch`
    # users' messages ("`Trainer.fit` stopped ...") to the `pytorch_lightning` logger, whose level they do not set.
    importlib.import_module(NAMESPACE)
    log = rank_zero.log
    for trainer_ns, _ in _FLAVOURS[1:]:
        importlib.import_module(trainer_ns)
    rank_zero.log = log


_import_namespaces()

# The Trainer's loggers subclass Fabric's: Fabric's own (`fabric.loggers`) count too.
TENSORBOARD_LOGGERS: tuple[type, ...] = (
    *_classes("loggers", "TensorBoardLogger"),
    *_classes("loggers", "TensorBoardLogger", fabric=True),
)
DEEPSPEED_STRATEGIES: tuple[type, ...] = _classes("strategies", "DeepSpeedStrategy")
WANDB_LOGGERS: tuple[type, ...] = _classes("loggers", "WandbLogger")
BASE_FINETUNING: tuple[type, ...] = _classes("callbacks", "BaseFinetuning")

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import BaseFinetuning, Callback
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
else:
    pl = importlib.import_module(NAMESPACE)
    # Static methods only (make_trainable, filter_params, ...): the same code in both namespaces.
    BaseFinetuning = pl.callbacks.BaseFinetuning

    class Callback(*_classes("callbacks", "Callback")):
        """A Lightning callback of each installed namespace: either Trainer, and either LightningCLI's
        ``trainer.callbacks`` (which checks ``issubclass`` against its own namespace's ``Callback``), takes it.
        The base classes are the same code: same hook names, same ``state_key``."""

    class MisconfigurationException(*_classes("utilities.exceptions", "MisconfigurationException")):
        """A configuration error, catchable as the ``MisconfigurationException`` of each installed namespace."""


#: The loggers ``WeightNormMonitor(log_histograms=True)`` writes histograms to.
HISTOGRAM_LOGGERS: tuple[type, ...] = TENSORBOARD_LOGGERS + WANDB_LOGGERS


def is_deepspeed(strategy: Any) -> bool:
    """Whether ``strategy`` is a DeepSpeed strategy of either namespace (or a class named like one)."""
    return isinstance(strategy, DEEPSPEED_STRATEGIES) or "DeepSpeed" in type(strategy).__name__


def uses_pytorch_lightning(*classes: Any) -> bool:
    """Whether any of ``classes`` (classes or instances; ``None`` is skipped) comes from ``pytorch_lightning``."""
    for c in classes:
        if c is None:
            continue
        cls = c if isinstance(c, type) else type(c)
        if any(base.__module__.split(".")[0] == "pytorch_lightning" for base in cls.__mro__):
            return True
    return False


def deepspeed_problem(strategy: Any) -> str | None:
    """Why the package's callbacks cannot see real gradients under ``strategy``, or ``None`` if they can.

    Under ZeRO ``p.grad`` is not the real gradient (DeepSpeed partitions it) and ``on_before_optimizer_step``
    fires on every micro-batch. The regularizers refuse; the monitor warns about its gradient norms.
    """
    if not is_deepspeed(strategy):
        return None
    return (
        f"{type(strategy).__name__}: under ZeRO `p.grad` is not the real gradient (DeepSpeed partitions it) and "
        "`on_before_optimizer_step` fires on every micro-batch"
    )
