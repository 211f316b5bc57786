"""``DecayLightningCLI``: LightningCLI whose automatic ``--optimizer`` builds decay / no-decay groups.

Plain ``LightningCLI`` instantiates the automatic optimizer with ``model.parameters()``, one flat group
in which biases and normalization weights decay too (Lightning issue #20743). This subclass hands the
optimizer the groups of [`DecayRules`][lightning_decay.DecayRules] instead, before the automatic
``--lr_scheduler`` is built on it, so the scheduler drives every group.
"""

from __future__ import annotations

import functools
from typing import Any

from lightning.pytorch.cli import LightningCLI

from lightning_decay._compat import uses_pytorch_lightning
from lightning_decay.rules import DecayRules, as_rules

__all__ = ["DecayLightningCLI"]


class _DecayGroupsCLI:
    """What the ``LightningCLI`` of either namespace gets: the automatic optimizer over decay groups."""

    def __init__(self, *args: Any, decay_rules: DecayRules | None = None, **kwargs: Any) -> None:
        self.decay_rules = None if decay_rules is None else as_rules(decay_rules, "decay_rules")
        super().__init__(*args, **kwargs)

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        # LightningCLI builds the automatic optimizer with `self.model.parameters()`. Shadow that one call
        # with the decay groups (an instance attribute, removed right after), so the optimizer and the
        # scheduler built on it see the groups. Everything else about the automatic optimizer is unchanged.
        model = self.model  # type: ignore[attr-defined]
        rules = getattr(model, "decay_rules", None)
        rules = as_rules(self.decay_rules if rules is None else rules, f"{type(model).__name__}.decay_rules")

        def decay_groups(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            return rules.classify(model).param_groups(weight_decay=None)

        model.__dict__["parameters"] = decay_groups
        try:
            super()._add_configure_optimizers_method_to_model(subcommand)  # type: ignore[misc]
        finally:
            del model.__dict__["parameters"]


class DecayLightningCLI(_DecayGroupsCLI, LightningCLI):
    """A ``LightningCLI`` for which ``--optimizer AdamW --optimizer.weight_decay 0.05`` means decay groups.

    The optimizer's ``weight_decay`` (its own default or the value given on the command line) applies
    to the ``"decay"`` group; the ``"no_decay"`` group gets ``weight_decay=0.0``. The rules come from
    ``model.decay_rules`` when the model defines it (as [`DecayGroupsMixin`][lightning_decay.DecayGroupsMixin]
    models do), else from ``decay_rules`` given here, else the defaults.

    The ``LightningCLI`` of the model's namespace is used: with a ``pytorch_lightning.LightningModule``
    (or a ``pytorch_lightning`` data module or Trainer class), ``DecayLightningCLI(...)`` returns the same
    CLI built on ``pytorch_lightning.cli.LightningCLI``, whose Trainer accepts that model.

    Args:
        *args: Passed to ``LightningCLI``.
        decay_rules: Classification policy for models without a ``decay_rules`` attribute.
        **kwargs: Passed to ``LightningCLI``.

    Examples:
        ```python
        # main.py
        from lightning_decay import DecayLightningCLI

        DecayLightningCLI(MyModel, MyDataModule)
        ```

        ```bash
        python main.py fit --optimizer AdamW --optimizer.lr 1e-3 --optimizer.weight_decay 0.05 \\
            --lr_scheduler CosineAnnealingLR --lr_scheduler.T_max 100
        ```
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # A model, data module or Trainer class of `pytorch_lightning` needs that namespace's LightningCLI:
        # lightning.pytorch's Trainer refuses a pytorch_lightning.LightningModule, and the other way round.
        # (The flavour is not a subclass of this class, so Python does not call `__init__` a second time.)
        if cls is DecayLightningCLI:
            names = ("model_class", "datamodule_class", "trainer_class")
            if uses_pytorch_lightning(*args[:2], *(kwargs.get(n) for n in names)):
                return _pytorch_lightning_flavour()(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, *args: Any, decay_rules: DecayRules | None = None, **kwargs: Any) -> None:
        super().__init__(*args, decay_rules=decay_rules, **kwargs)


@functools.cache
def _pytorch_lightning_flavour() -> type:
    """``DecayLightningCLI`` on ``pytorch_lightning.cli.LightningCLI``, built on first use."""
    from pytorch_lightning.cli import LightningCLI as PLLightningCLI

    return type("DecayLightningCLI", (_DecayGroupsCLI, PLLightningCLI), {"__module__": __name__})
