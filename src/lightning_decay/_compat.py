"""The two namespaces of Lightning: ``lightning.pytorch`` and the standalone ``pytorch_lightning`` package.

Both ship the same code under different module names, so their classes are distinct: a
``pytorch_lightning.loggers.TensorBoardLogger`` is not an instance of ``lightning.pytorch``'s, and an
exception raised as one namespace's ``MisconfigurationException`` is not caught as the other's. Every
type check of the package against a Lightning class goes through the tuples here, which hold the classes
of ``lightning.pytorch`` and, when it is installed, those of ``pytorch_lightning`` (imported only then:
it is not a dependency).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from lightning.fabric.loggers import TensorBoardLogger as _LFTensorBoardLogger
from lightning.pytorch.callbacks import BaseFinetuning as _LBaseFinetuning
from lightning.pytorch.callbacks import Callback as _LCallback
from lightning.pytorch.loggers import TensorBoardLogger as _LTensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _LWandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy as _LDeepSpeed
from lightning.pytorch.utilities.exceptions import MisconfigurationException as _LMisconfiguration

__all__ = [
    "BASE_FINETUNING",
    "DEEPSPEED_STRATEGIES",
    "HISTOGRAM_LOGGERS",
    "PL_AVAILABLE",
    "TENSORBOARD_LOGGERS",
    "WANDB_LOGGERS",
    "Callback",
    "MisconfigurationException",
    "is_deepspeed",
    "uses_pytorch_lightning",
]


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


PL_AVAILABLE = _available("pytorch_lightning")

if PL_AVAILABLE:
    import lightning_utilities.core.rank_zero as _rank_zero

    # Both namespaces point the logger of the rank-zero messages they share (`lightning_utilities`) at their
    # own on import: importing `pytorch_lightning` here must not move `lightning.pytorch` users' messages
    # ("`Trainer.fit` stopped ...") to the `pytorch_lightning` logger, whose level they do not set.
    _log = _rank_zero.log
    import pytorch_lightning as _pl
    from lightning_fabric.loggers import TensorBoardLogger as _PLFTensorBoardLogger
    from pytorch_lightning.callbacks import BaseFinetuning as _PLBaseFinetuning
    from pytorch_lightning.loggers import TensorBoardLogger as _PLTensorBoardLogger
    from pytorch_lightning.loggers import WandbLogger as _PLWandbLogger
    from pytorch_lightning.strategies import DeepSpeedStrategy as _PLDeepSpeed
    from pytorch_lightning.utilities.exceptions import MisconfigurationException as _PLMisconfiguration

    _rank_zero.log = _log

    # The Trainer's loggers subclass Fabric's: Fabric's own (`fabric.loggers`) count too.
    TENSORBOARD_LOGGERS: tuple[type, ...] = (
        _LTensorBoardLogger,
        _PLTensorBoardLogger,
        _LFTensorBoardLogger,
        _PLFTensorBoardLogger,
    )
    WANDB_LOGGERS: tuple[type, ...] = (_LWandbLogger, _PLWandbLogger)
    BASE_FINETUNING: tuple[type, ...] = (_LBaseFinetuning, _PLBaseFinetuning)
    DEEPSPEED_STRATEGIES: tuple[type, ...] = (_LDeepSpeed, _PLDeepSpeed)

    class Callback(_LCallback, _pl.Callback):
        """A Lightning callback of both namespaces: either Trainer, and either LightningCLI's
        ``trainer.callbacks`` (which checks ``issubclass`` against its own namespace's ``Callback``), takes it.
        The two base classes are the same code: same hook names, same ``state_key``."""

    class MisconfigurationException(_LMisconfiguration, _PLMisconfiguration):
        """A configuration error, catchable as the ``MisconfigurationException`` of either namespace."""

else:
    TENSORBOARD_LOGGERS = (_LTensorBoardLogger, _LFTensorBoardLogger)
    WANDB_LOGGERS = (_LWandbLogger,)
    BASE_FINETUNING = (_LBaseFinetuning,)
    DEEPSPEED_STRATEGIES = (_LDeepSpeed,)

    class Callback(_LCallback):  # type: ignore[no-redef]
        """A ``lightning.pytorch`` callback."""

    class MisconfigurationException(_LMisconfiguration):  # type: ignore[no-redef]
        """A configuration error (``lightning.pytorch``'s ``MisconfigurationException``)."""


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
