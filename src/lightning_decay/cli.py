"""``DecayLightningCLI``: LightningCLI whose automatic ``--optimizer`` builds decay / no-decay groups.

Plain ``LightningCLI`` instantiates the automatic optimizer with ``model.parameters()``, one flat group
in which biases and normalization weights decay too (Lightning issue #20743). This subclass hands the
optimizer the groups of [`DecayRules`][lightning_decay.DecayRules] instead, before the automatic
``--lr_scheduler`` is built on it, so the scheduler drives every group.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

from lightning_decay.rules import DecayRules, as_rules

__all__ = ["DecayLightningCLI"]


class DecayLightningCLI(LightningCLI):
    """A ``LightningCLI`` for which ``--optimizer AdamW --optimizer.weight_decay 0.05`` means decay groups.

    The optimizer's ``weight_decay`` (its own default or the value given on the command line) applies
    to the ``"decay"`` group; the ``"no_decay"`` group gets ``weight_decay=0.0``. The rules come from
    ``model.decay_rules`` when the model defines it (as [`DecayGroupsMixin`][lightning_decay.DecayGroupsMixin]
    models do), else from ``decay_rules`` given here, else the defaults.

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

    def __init__(self, *args: Any, decay_rules: DecayRules | None = None, **kwargs: Any) -> None:
        self.decay_rules = None if decay_rules is None else as_rules(decay_rules, "decay_rules")
        super().__init__(*args, **kwargs)

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        # LightningCLI builds the automatic optimizer with `self.model.parameters()`. Shadow that one call
        # with the decay groups (an instance attribute, removed right after), so the optimizer and the
        # scheduler built on it see the groups. Everything else about the automatic optimizer is unchanged.
        model = self.model
        rules = getattr(model, "decay_rules", None)
        rules = as_rules(self.decay_rules if rules is None else rules, f"{type(model).__name__}.decay_rules")

        def decay_groups(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            return rules.classify(model).param_groups(weight_decay=None)

        model.__dict__["parameters"] = decay_groups
        try:
            super()._add_configure_optimizers_method_to_model(subcommand)
        finally:
            del model.__dict__["parameters"]
