"""Weight decay and L1/L2 regularization done right for PyTorch Lightning."""

from lightning_decay._attach import Attachment
from lightning_decay._lightning import attach
from lightning_decay.cli import DecayLightningCLI
from lightning_decay.decay import WeightDecay
from lightning_decay.directions import register_direction
from lightning_decay.finetuning import unfreeze_and_add_decay_groups
from lightning_decay.groups import decay_param_groups
from lightning_decay.mixin import DecayGroupsMixin
from lightning_decay.monitor import WeightNormMonitor
from lightning_decay.names import clean_names, clean_param_name
from lightning_decay.penalty import WeightPenalty
from lightning_decay.plan import DecayPlan, ParamDecision
from lightning_decay.rules import DecayRules

__all__ = [
    "Attachment",
    "DecayGroupsMixin",
    "DecayLightningCLI",
    "DecayPlan",
    "DecayRules",
    "ParamDecision",
    "WeightDecay",
    "WeightNormMonitor",
    "WeightPenalty",
    "attach",
    "clean_names",
    "clean_param_name",
    "decay_param_groups",
    "register_direction",
    "unfreeze_and_add_decay_groups",
]

__version__ = "0.1.0"
