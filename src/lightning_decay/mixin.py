"""``DecayGroupsMixin``: decay / no-decay optimizer groups for a ``LightningModule`` in one line."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.optim import Optimizer

from lightning_decay._compat import rank_zero_info
from lightning_decay._options import check_optimizer_groups
from lightning_decay._plan_cache import plan_for
from lightning_decay.layers import LayerOf, apply_lr_scale
from lightning_decay.plan import DecayPlan
from lightning_decay.rules import DecayRules, module_rules

if TYPE_CHECKING:
    # The same alias in both namespaces (a union of optimizers, schedulers and their config dicts).
    from lightning.pytorch.utilities.types import OptimizerLRScheduler

__all__ = ["DecayGroupsMixin"]

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[[Optimizer], Any]


class DecayGroupsMixin:
    """Give a ``LightningModule`` decay / no-decay parameter groups and a ready ``configure_optimizers``.

    Inherit it before ``LightningModule``. The default
    [`configure_optimizers`][lightning_decay.DecayGroupsMixin.configure_optimizers] builds the optimizer
    from ``self.optimizer`` -- an ``OptimizerCallable`` injected by ``LightningCLI``, an optimizer class,
    or any callable taking parameter groups -- called with
    [`decay_param_groups`][lightning_decay.DecayGroupsMixin.decay_param_groups] and the optional
    ``self.optimizer_kwargs``. ``self.lr_scheduler`` (an ``LRSchedulerCallable`` or scheduler class,
    optional) is called with the optimizer, and ``self.lr_scheduler_config`` (for instance
    ``{"interval": "step"}``) completes Lightning's scheduler dict.

    Layer-wise lr decay: with ``layer_decay`` set, the groups are split by layer
    (``"layer_{i}/decay"``...) and each group's ``lr`` is the optimizer's lr times its scale
    ``layer_decay ** (L - 1 - i)``, set before the scheduler is built, so torch's and Lightning's
    schedulers keep the ratios between layers (and ``LearningRateMonitor`` shows one curve per group).

    One set of rules for the run: ``WeightDecay``, ``WeightPenalty`` and ``WeightNormMonitor`` given no
    ``rules`` use this module's ``decay_rules``.

    Attributes:
        decay_rules: Class attribute to override: the [`DecayRules`][lightning_decay.DecayRules]; default
            rules when ``None``. ``DecayLightningCLI`` sets it from its ``decay.rules`` config section.
        decay_overrides: Class attribute to override: per-pattern group options, see
            [`DecayPlan.param_groups`][lightning_decay.DecayPlan.param_groups].
        layer_decay: Layer-wise lr decay in ``(0, 1]``, or ``None`` (default) for none. A class attribute,
            an ``__init__`` argument you assign, or ``decay.layer_decay`` of ``DecayLightningCLI``.
        layer_of: Layer overrides, ``name -> int | None`` or ``{glob pattern: int}`` (see
            [`lightning_decay.layers`][lightning_decay.layers]).

    Examples:
        ```python
        import torch
        from lightning.pytorch import LightningModule
        from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
        from lightning_decay import DecayGroupsMixin

        class Model(DecayGroupsMixin, LightningModule):
            def __init__(self, optimizer: OptimizerCallable = torch.optim.AdamW,
                         lr_scheduler: LRSchedulerCallable | None = None):
                super().__init__()
                self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
                self.net = torch.nn.Linear(32, 2)
        ```

        With ``model.optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 1e-3, weight_decay: 0.05}}``
        in a LightningCLI config, weights decay at 0.05 while biases and norms get ``weight_decay=0.0``.
    """

    decay_rules: DecayRules | None = None
    decay_overrides: Mapping[str, Mapping[str, Any]] | None = None
    layer_decay: float | None = None
    layer_of: LayerOf | None = None

    def decay_plan(self, rules: DecayRules | None = None) -> DecayPlan:
        """Classify this module's trainable parameters (``rules`` beats ``self.decay_rules``)."""
        module = self._as_module()
        return plan_for(module_rules(module, rules), module)

    def decay_param_groups(
        self,
        weight_decay: float | None = None,
        rules: DecayRules | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        layer_decay: float | None = None,
        layer_of: LayerOf | None = None,
        **group_kwargs: Any,
    ) -> list[dict[str, Any]]:
        """``"decay"`` / ``"no_decay"`` groups for this module (per layer with ``layer_decay``).

        Args:
            weight_decay: Decay of the decay group; ``None`` keeps the optimizer's own default.
            rules: Classification policy; defaults to ``self.decay_rules``, then ``DecayRules()``.
            overrides: Per-pattern group options; defaults to ``self.decay_overrides``.
            layer_decay: Layer-wise lr decay; defaults to ``self.layer_decay``. The groups carry
                ``"lr_scale"``; ``configure_optimizers`` folds it into ``lr``.
            layer_of: Layer overrides; defaults to ``self.layer_of``.
            **group_kwargs: Options for every group.
        """
        plan = self.decay_plan(rules)
        groups = plan.param_groups(
            weight_decay,
            overrides or self.decay_overrides,
            layer_decay=self.layer_decay if layer_decay is None else layer_decay,
            layer_of=self.layer_of if layer_of is None else layer_of,
            **group_kwargs,
        )
        if not getattr(self, "_decay_plan_logged", False):
            rank_zero_info(plan.summary())
            self._decay_plan_logged = True
        return groups

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """Build ``self.optimizer`` over the decay groups, with ``self.lr_scheduler`` when set.

        With layer-wise lr decay, each group's ``lr`` becomes the optimizer's lr times the group's
        ``lr_scale`` before the scheduler is built.

        Raises:
            AttributeError: If ``self.optimizer`` is missing.
            TypeError: If ``self.optimizer`` or ``self.lr_scheduler`` is not callable.
            ValueError: If a group carries a key the optimizer does not take (an override or group option
                misspelled, or meant for another optimizer).
        """
        factory = getattr(self, "optimizer", None)
        if factory is None:
            raise AttributeError(
                f"{type(self).__name__} uses DecayGroupsMixin.configure_optimizers but has no `self.optimizer`: "
                "assign an optimizer class (torch.optim.AdamW), an OptimizerCallable from LightningCLI, "
                "or any callable taking parameter groups, or override configure_optimizers"
            )
        if not callable(factory):
            raise TypeError(f"`self.optimizer` must be callable with parameter groups, got {factory!r}")
        kwargs = dict(getattr(self, "optimizer_kwargs", None) or {})
        optimizer = factory(self.decay_param_groups(), **kwargs)
        check_optimizer_groups(optimizer)
        apply_lr_scale(optimizer)  # before the scheduler records each group's initial_lr
        scheduler_factory = getattr(self, "lr_scheduler", None)
        if scheduler_factory is None:
            return optimizer
        if not callable(scheduler_factory):
            raise TypeError(f"`self.lr_scheduler` must be callable with the optimizer, got {scheduler_factory!r}")
        config = dict(getattr(self, "lr_scheduler_config", None) or {})
        config["scheduler"] = scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _as_module(self) -> nn.Module:
        if not isinstance(self, nn.Module):
            raise TypeError(f"DecayGroupsMixin must be mixed into an nn.Module, not {type(self).__name__}")
        return self
