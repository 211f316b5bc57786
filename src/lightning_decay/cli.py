"""``DecayLightningCLI``: LightningCLI whose automatic ``--optimizer`` builds decay / no-decay groups.

Plain ``LightningCLI`` instantiates the automatic optimizer with ``model.parameters()``, one flat group
in which biases and normalization weights decay too (Lightning issue #20743). This subclass hands the
optimizer the groups of [`DecayRules`][lightning_decay.DecayRules] instead, before the automatic
``--lr_scheduler`` is built on it, so the scheduler drives every group.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import numbers
import re
from typing import TYPE_CHECKING, Any

from lightning_decay._compat import NAMESPACE, uses_pytorch_lightning
from lightning_decay._plan_cache import plan_for
from lightning_decay.decay import decoupled_by_name
from lightning_decay.layers import apply_lr_scale, validate_layer_decay
from lightning_decay.plan import validate_weight_decay
from lightning_decay.rules import DecayRules, as_rules

__all__ = ["DecayLightningCLI"]

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
else:
    # The LightningCLI of the namespace the package's defaults come from: `lightning.pytorch` where installed.
    LightningCLI = importlib.import_module(f"{NAMESPACE}.cli").LightningCLI


class _DecayGroupsCLI:
    """What the ``LightningCLI`` of either namespace gets: the ``decay`` section and the automatic optimizer
    over decay groups. ``DecayLightningCLI`` puts it on ``lightning.pytorch``'s ``LightningCLI``; a
    ``pytorch_lightning`` model gets it on that namespace's."""

    def __init__(self, *args: Any, decay_rules: DecayRules | None = None, **kwargs: Any) -> None:
        self.decay_rules = None if decay_rules is None else as_rules(decay_rules, "decay_rules")
        super().__init__(*args, **kwargs)

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_default_arguments_to_parser(parser)  # type: ignore[misc]
        add_decay_section(parser)

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        # LightningCLI builds the automatic optimizer with `self.model.parameters()`. Shadow that one call
        # with the decay groups (an instance attribute, removed right after), so the optimizer and the
        # scheduler built on it see the groups. Everything else about the automatic optimizer is unchanged.
        model = self.model  # type: ignore[attr-defined]
        rules, layer_decay = self._apply_decay_section(model)
        self._check_automatic_weight_decay(subcommand)
        base_lr = self._automatic_optimizer_lr(subcommand) if layer_decay is not None else None

        def decay_groups(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            groups = plan_for(rules, model).param_groups(
                weight_decay=None, layer_decay=layer_decay, layer_of=getattr(model, "layer_of", None)
            )
            apply_lr_scale(groups, base_lr)  # the automatic scheduler is built right after the optimizer
            return groups

        model.__dict__["parameters"] = decay_groups
        try:
            super()._add_configure_optimizers_method_to_model(subcommand)  # type: ignore[misc]
        finally:
            del model.__dict__["parameters"]

    def _apply_decay_section(self, model: Any) -> tuple[DecayRules, float | None]:
        """Write the ``decay`` section to the model; return the run's rules and layer decay."""
        section = self._get(self.config_init, "decay", None)
        given = getattr(section, "rules", None) if section is not None else None
        layer_decay = getattr(section, "layer_decay", None) if section is not None else None
        if isinstance(given, DecayRules) and repr(given) != repr(DecayRules()):
            rules = given
        else:
            rules = getattr(model, "decay_rules", None)
            rules = as_rules(self.decay_rules if rules is None else rules, f"{type(model).__name__}.decay_rules")
        if getattr(model, "decay_rules", None) is not rules:
            model.decay_rules = rules  # one set of rules: the callbacks given no `rules` read it
        if layer_decay is not None:
            validate_layer_decay(layer_decay, "decay.layer_decay")
            model.layer_decay = layer_decay
        return rules, layer_decay

    def _automatic_optimizer_lr(self, subcommand: str | None) -> float | None:
        """The lr the automatic optimizer will be built with (its config, else its class default)."""
        return self._automatic_optimizer_arg(subcommand, "lr")[0]

    def _automatic_optimizer_arg(self, subcommand: str | None, name: str) -> tuple[Any, str]:
        """An argument the automatic optimizer will be built with (its config, else its class default),
        and the optimizer's class name (``""`` without an automatic optimizer)."""
        parser = self._parser(subcommand)
        keys = [k for k, (_, link) in parser._optimizers.items() if link == "AUTOMATIC"]
        init = self._get(self.config_init, keys[0], None) if keys else None
        if init is None:
            return None, ""
        # `{class_path, init_args}` for a subclass-mode optimizer, the arguments themselves otherwise.
        args = getattr(init, "init_args", None) or init
        value = args.get(name) if hasattr(args, "get") else None
        class_path = getattr(init, "class_path", None)
        cls = parser._optimizers[keys[0]][0]
        cls_name = class_path.rsplit(".", 1)[-1] if class_path else getattr(cls, "__name__", "")
        if value is None:
            param = inspect.signature(cls).parameters.get(name) if isinstance(cls, type) else None
            value = None if param is None or param.default is inspect.Parameter.empty else param.default
        return value, cls_name

    def _check_automatic_weight_decay(self, subcommand: str | None) -> None:
        """The automatic optimizer's ``weight_decay`` (the decay group's) checked as `decay_param_groups` checks
        its own, and, for a decoupled decay (AdamW), its factor ``1 - lr * weight_decay`` at the configured lr."""
        wd, cls_name = self._automatic_optimizer_arg(subcommand, "weight_decay")
        if wd is None:
            return
        wd = validate_weight_decay(wd, "optimizer.init_args.weight_decay")
        decoupled = self._automatic_optimizer_arg(subcommand, "decoupled_weight_decay")[0]
        if decoupled is None:
            decoupled = decoupled_by_name(cls_name)
        lr = self._automatic_optimizer_lr(subcommand)
        if decoupled and isinstance(lr, numbers.Real) and lr * wd >= 1.0:
            raise ValueError(
                f"`optimizer.init_args.weight_decay`={wd} with lr {lr}: {cls_name}'s decoupled decay multiplies "
                f"the weights by 1 - lr * weight_decay = {1.0 - lr * wd:g} <= 0 at every step, which flips or zeros "
                "them. It must be < 1 / lr (AdamW-style values are about 1e-4 to 0.1)."
            )


class DecayLightningCLI(_DecayGroupsCLI, LightningCLI):
    """A ``LightningCLI`` for which ``--optimizer AdamW --optimizer.weight_decay 0.05`` means decay groups.

    The optimizer's ``weight_decay`` (its own default or the value given on the command line) applies
    to the ``"decay"`` group; the ``"no_decay"`` group gets ``weight_decay=0.0``.

    The ``decay`` config section holds the run's rules and layer-wise lr decay:

    ```yaml
    decay:
      rules: {exclude: ["head.*"], decay_embeddings: false}   # DecayRules options
      layer_decay: 0.75
    ```

    Rules set there are written to ``model.decay_rules``, so the automatic optimizer, a
    [`DecayGroupsMixin`][lightning_decay.DecayGroupsMixin] model's ``configure_optimizers`` and the callbacks
    given no ``rules`` all use the same ones. Left at their defaults, the rules come from
    ``model.decay_rules`` when the model defines it, else from ``decay_rules`` given here, else the
    defaults. ``decay.layer_decay`` is written to ``model.layer_decay`` (used by the mixin) and, for the
    automatic optimizer, splits the groups by layer with ``lr = optimizer lr * layer_decay ** (L - 1 - i)``
    before the automatic scheduler is built.

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
            --lr_scheduler CosineAnnealingLR --lr_scheduler.T_max 100 \\
            --decay.rules.exclude '[head.*]' --decay.layer_decay 0.75
        ```
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # A model, data module or Trainer class of `pytorch_lightning` needs that namespace's LightningCLI:
        # lightning.pytorch's Trainer refuses a pytorch_lightning.LightningModule, and the other way round.
        # (The flavour is not a subclass of this class, so Python does not call `__init__` a second time.)
        if cls is DecayLightningCLI and NAMESPACE != "pytorch_lightning":
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


def add_decay_section(parser: LightningArgumentParser) -> None:
    """Add the ``decay`` section (``decay.rules.*`` from ``DecayRules``, ``decay.layer_decay``) to ``parser``."""
    parser.add_class_arguments(DecayRules, "decay.rules", instantiate=True, skip={"predicate"})
    # jsonargparse takes the help from the docstrings, written for the docs site (``code``, [`X`][ref]),
    # and prints the default itself ("(type: bool, default: False)"): the docstrings' "Default ``False``." goes.
    for action in parser._actions:
        if action.dest.startswith("decay.rules") and action.help:
            action.help = console_text(
                _DEFAULT.sub(lambda m: f" As in {m.group(1)}." if m.group(1) else "", action.help)
            )
    parser.add_argument(
        "--decay.layer_decay",
        type=float | None,
        default=None,
        help="Layer-wise lr decay in (0, 1]: layer i of L gets lr * layer_decay ** (L - 1 - i). Default: none.",
    )


_DEFAULT = re.compile(r" ?Default ``[^`]*``(?: \(([^)]*)\))?\.")  # "Default ``True`` (timm, nanoGPT)."
_CROSS_REF = re.compile(r"\[`([^`\]]+)`\]\[[^\]]*\]")  # mkdocstrings' [`DecayRules`][lightning_decay.DecayRules]
_LITERAL = re.compile(r"``([^`]+)``|`([^`]+)`")  # RST ``code`` and Markdown `code`


def console_text(text: str) -> str:
    """A docstring sentence as a terminal shows it: cross-references by name, code quoted, no backticks.

    ``"Decay biases (names ending in ``bias``)."`` -> ``"Decay biases (names ending in 'bias')."``
    """
    text = _CROSS_REF.sub(r"\1", text)
    return _LITERAL.sub(lambda m: f"'{m.group(1) or m.group(2)}'", text)
