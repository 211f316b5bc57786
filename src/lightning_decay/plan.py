"""The result of classifying a model: which parameters decay, which do not, and why.

A `DecayPlan` is produced by [`DecayRules.classify`][lightning_decay.DecayRules.classify] and is pure data: it
holds references to the parameters, never copies, and knows nothing about Lightning.
"""

from __future__ import annotations

import fnmatch
import functools
import itertools
import math
import operator
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_decay._messages import unknown_name_message
from lightning_decay._options import check_group_options
from lightning_decay.layers import LayerAssignment, LayerOf, assign_layers, validate_layer_decay
from lightning_decay.schedules import check_coefficient

__all__ = ["DecayPlan", "ParamDecision", "validate_weight_decay"]

DECAY_GROUP = "decay"
NO_DECAY_GROUP = "no_decay"


@dataclass(frozen=True)
class ParamDecision:
    """What the rules decided for one parameter tensor.

    Attributes:
        name: The cleaned name of the parameter (its first name, for tied parameters).
        param: The parameter itself.
        decay: Whether weight decay and penalties apply.
        reason: The rule that decided, in words.
        shape: The logical (unsharded, unflattened) shape when known, else ``param.shape``.
        module_type: The class name of the module that owns the parameter.
        aliases: Further names of a tied parameter, empty when it has only one.
        numel: The number of entries of ``shape`` (property).
        group: ``"decay"`` or ``"no_decay"`` (property).
    """

    name: str
    param: nn.Parameter
    decay: bool
    reason: str
    shape: tuple[int, ...]
    module_type: str
    aliases: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def group(self) -> str:
        return DECAY_GROUP if self.decay else NO_DECAY_GROUP


def make_decision(
    name: str,
    param: nn.Parameter,
    decay: bool,
    reason: str,
    shape: tuple[int, ...],
    module_type: str,
    aliases: tuple[str, ...] = (),
) -> ParamDecision:
    """``ParamDecision(...)``, built without the frozen dataclass's ``object.__setattr__`` per field.

    The same object as the constructor makes (equal, hashable, frozen); `DecayRules.classify` makes one per
    tensor, and at 100k tensors the generated ``__init__`` was a fifth of ``decay_param_groups``' time.
    """
    decision = object.__new__(ParamDecision)
    fields = {"name": name, "param": param, "decay": decay, "reason": reason, "shape": shape}
    fields["module_type"], fields["aliases"] = module_type, aliases
    object.__setattr__(decision, "__dict__", fields)
    return decision


@dataclass(frozen=True)
class PlanColumns:
    """The fields of a plan's decisions as parallel tuples, one entry per parameter (see `DecayPlan._from_columns`)."""

    names: tuple[str, ...] = ()
    params: tuple[nn.Parameter, ...] = ()
    decay: tuple[bool, ...] = ()
    reasons: tuple[str, ...] = ()
    shapes: tuple[Sequence[int], ...] = ()  # as stored (a torch.Size from classify); decisions hold tuples
    module_types: tuple[str, ...] = ()
    aliases: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[str, nn.Parameter, bool, str, Sequence[int], str, tuple[str, ...]]]):
        """The columns of ``(name, param, decay, reason, shape, module_type, aliases)`` rows."""
        return cls(*zip(*rows, strict=True)) if rows else cls()

    @classmethod
    def of(cls, decisions: Sequence[ParamDecision]) -> PlanColumns:
        return cls.from_rows(
            [(d.name, d.param, d.decay, d.reason, d.shape, d.module_type, d.aliases) for d in decisions]
        )


def validate_weight_decay(value: float | None, argument: str = "weight_decay") -> float | None:
    """``value`` as a Python float, or ``None``; raise naming ``argument`` unless it is a finite number >= 0."""
    return None if value is None else check_coefficient(value, argument)


class DecayPlan:
    """The decay / no-decay decision for every trainable parameter of a model.

    Build one with [`DecayRules.classify`][lightning_decay.DecayRules.classify]. Iterating yields
    [`ParamDecision`][lightning_decay.ParamDecision] objects in registration order; every trainable
    parameter appears exactly once, tied parameters under their first name. ``plan[name]`` looks a
    decision up by name or tied alias.

    Attributes:
        decisions: Every [`ParamDecision`][lightning_decay.ParamDecision], in registration order.
        frozen: Names of parameters left out because ``requires_grad=False``.
        decay: The decisions of the decay group (property; ``no_decay`` for the other group).
        decay_names: Their names (property; ``no_decay_names`` for the other group).
        decay_params: Their parameters (property; ``no_decay_params`` for the other group).

    Examples:
        ```python
        from torch import nn
        from lightning_decay import DecayRules

        plan = DecayRules().classify(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
        plan.decay_names, plan.no_decay_names  # (['0.weight'], ['0.bias', '1.weight', '1.bias'])
        groups = plan.param_groups(weight_decay=0.05)
        [(g["name"], g["weight_decay"]) for g in groups]  # [('decay', 0.05), ('no_decay', 0.0)]
        ```
    """

    def __init__(
        self, decisions: Sequence[ParamDecision], frozen: Sequence[str] = (), module: nn.Module | None = None
    ) -> None:
        self.decisions: tuple[ParamDecision, ...] = tuple(decisions)
        self._columns = PlanColumns.of(self.decisions)
        #: Names of parameters left out because ``requires_grad=False``.
        self.frozen: tuple[str, ...] = tuple(frozen)
        # The classified model: layer-wise lr decay reads its tree.
        self._module = module
        # (layer_decay, layer_of, assignment) of the last `param_groups(layer_decay=...)`, for explain/table.
        self._layers: tuple[float, LayerOf | None, LayerAssignment] | None = None

    @classmethod
    def _from_columns(
        cls, columns: PlanColumns, frozen: Sequence[str] = (), module: nn.Module | None = None
    ) -> DecayPlan:
        """The plan of these decisions, column by column; its `ParamDecision` objects are built when first read.

        `DecayRules.classify` builds plans this way: building optimizer groups needs only the parameters and
        their verdicts, and at 100k tensors one object per tensor was a quarter of ``decay_param_groups``' time.
        """
        plan = cls.__new__(cls)
        plan._columns, plan.frozen, plan._module, plan._layers = columns, tuple(frozen), module, None
        return plan

    # ----------------------------------------------------------------- lookups
    @functools.cached_property
    def decisions(self) -> tuple[ParamDecision, ...]:  # set by __init__; built on first use by `_from_columns`
        c = self._columns
        shapes = map(tuple, c.shapes)  # classify keeps each tensor's torch.Size (or list) until a decision is read
        return tuple(map(make_decision, c.names, c.params, c.decay, c.reasons, shapes, c.module_types, c.aliases))

    # Built on the first lookup: building optimizer groups needs neither (at 100k tensors, a tenth of the time).
    @functools.cached_property
    def _by_id(self) -> dict[int, ParamDecision]:
        return {id(d.param): d for d in self.decisions}

    @functools.cached_property
    def _by_name(self) -> dict[str, ParamDecision]:
        by_name: dict[str, ParamDecision] = {}
        for d in self.decisions:
            by_name[d.name] = d
            for n in d.aliases:
                by_name[n] = d
        return by_name

    def __iter__(self) -> Iterator[ParamDecision]:
        return iter(self.decisions)

    def __len__(self) -> int:
        return len(self._columns.params)

    def __getitem__(self, name: str) -> ParamDecision:
        """The decision for a (cleaned) parameter name or any of its tied aliases.

        Raises:
            KeyError: If no parameter has that name; the message suggests the closest names.
        """
        try:
            return self._by_name[name]
        except KeyError:
            if name in self.frozen:
                raise KeyError(f"{name!r} is frozen (requires_grad=False): the plan left it out") from None
            message = unknown_name_message(name, list(self._by_name), "a trainable parameter of this plan")
            raise KeyError(message) from None

    def __contains__(self, param: object) -> bool:
        return id(param) in self._by_id

    def decision_for(self, param: torch.Tensor) -> ParamDecision | None:
        """The decision for a parameter object, or ``None`` if the plan does not know it."""
        return self._by_id.get(id(param))

    def is_decayed(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is in the decay group (``False`` for parameters the plan does not know)."""
        d = self._by_id.get(id(param))
        return d is not None and d.decay

    def explain(self, name: str, layer_decay: float | None = None, layer_of: LayerOf | None = None) -> str:
        """One line saying which group ``name`` is in and the rule that put it there.

        With ``layer_decay`` (or after [`param_groups`][lightning_decay.DecayPlan.param_groups] was called
        with one), also the parameter's layer, how it was found and its lr scale.

        Examples:
            ```python
            from torch import nn
            from lightning_decay import DecayRules

            model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
            DecayRules().classify(model).explain("0.weight", layer_decay=0.5)
            # "0.weight: decay (weight of Linear); layer 1 of 4 (stack (the model's children) block 0),
            #  lr_scale 0.5**2 = 0.25"
            ```

        Raises:
            KeyError: If no parameter has that name; the message suggests the closest names.
        """
        d = self[name]
        text = f"{d.name}: {d.group} ({d.reason})"
        layers = self.layer_assignment(layer_decay, layer_of)
        if layers is not None:
            text += "; " + layers[1].explain(d.name, layers[0])
        return text

    def layer_assignment(
        self, layer_decay: float | None = None, layer_of: LayerOf | None = None
    ) -> tuple[float, LayerAssignment] | None:
        """``(layer_decay, assignment)`` for these arguments, else the last ``param_groups`` ones, else ``None``."""
        if layer_decay is None and layer_of is None:
            return None if self._layers is None else (self._layers[0], self._layers[2])
        layer_decay = validate_layer_decay(layer_decay)
        decay = 1.0 if layer_decay is None else layer_decay
        return decay, assign_layers(self._module, list(self._columns.names), layer_of)

    @property
    def decay(self) -> list[ParamDecision]:
        return [d for d in self.decisions if d.decay]

    @property
    def no_decay(self) -> list[ParamDecision]:
        return [d for d in self.decisions if not d.decay]

    @property
    def decay_names(self) -> list[str]:
        return [d.name for d in self.decay]

    @property
    def no_decay_names(self) -> list[str]:
        return [d.name for d in self.no_decay]

    @property
    def decay_params(self) -> list[nn.Parameter]:
        return list(itertools.compress(self._columns.params, self._columns.decay))

    @property
    def no_decay_params(self) -> list[nn.Parameter]:
        return list(itertools.compress(self._columns.params, map(operator.not_, self._columns.decay)))

    # ------------------------------------------------------------------ groups
    def param_groups(
        self,
        weight_decay: float | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        layer_decay: float | None = None,
        layer_of: LayerOf | None = None,
        **group_kwargs: Any,
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups named ``"decay"`` and ``"no_decay"`` (per layer with ``layer_decay``).

        The no-decay group always carries an explicit ``weight_decay=0.0`` so it never inherits the
        optimizer's default. Empty groups are dropped, and every parameter of the plan is in exactly
        one group (checked).

        Layer-wise lr decay (``layer_decay``): the groups are split by layer too, named
        ``"layer_{i}/decay"`` and ``"layer_{i}/no_decay"``, and carry timm's ``"lr_scale"`` key,
        ``layer_decay ** (L - 1 - i)`` for layer ``i`` of ``L`` (see [`lightning_decay.layers`][lightning_decay.layers]
        for how layers are found). ``lr`` is left alone: timm's schedulers multiply by ``lr_scale``; for
        torch's and Lightning's, fold it into ``lr`` with
        [`apply_lr_scale`][lightning_decay.layers.apply_lr_scale] (``DecayGroupsMixin`` and
        ``DecayLightningCLI`` do).

        Group options: ``group_kwargs`` and the override values are optimizer hyperparameters, set on
        the groups as given, except names that are arguments of a grouping function rather than of an
        optimizer (``DecayRules`` options, timm's ``no_weight_decay_list``, ``min_scale``...), and
        ``params``, ``name`` and (with ``layer_decay``) ``lr_scale``, which are set per group: those are
        refused. torch's optimizers keep unknown group keys without a word, so a key that no ``torch.optim``
        optimizer takes gets a warning naming the closest one (it stays on the groups: a custom optimizer
        may read it), and [`DecayGroupsMixin`][lightning_decay.DecayGroupsMixin] also checks the groups
        against the optimizer it builds.

        Args:
            weight_decay: Weight decay of the decay group. ``None`` leaves the key out, so the
                optimizer's own default (for instance a LightningCLI ``init_args.weight_decay``) applies.
            overrides: Glob pattern on parameter names -> extra group options, like mmengine's
                ``custom_keys``: ``{"head.*": {"lr": 1e-3}}``. Parameters matching a pattern go to groups
                named ``"{pattern}/decay"`` and ``"{pattern}/no_decay"`` (``"{pattern}/layer_{i}/decay"``
                with ``layer_decay``); the first matching pattern in mapping order wins. A ``weight_decay``
                given here applies to the pattern's decay group; its no-decay group keeps ``0.0``.
            layer_decay: Layer-wise lr decay in ``(0, 1]``; ``None`` (default) for plain decay / no-decay
                groups.
            layer_of: Layer overrides: ``name -> int | None`` or ``{glob pattern: int}``; negative ids count
                from the last layer (``{"head.*": -1}``).
            **group_kwargs: Options added to every group (``lr``, ``betas``, ...).

        Returns:
            A list of parameter-group dicts ready for any ``torch.optim.Optimizer``.

        Raises:
            ValueError: If ``weight_decay`` is negative or not finite, ``layer_decay`` is not in ``(0, 1]``,
                a parameter has no layer, or a group option is one of the refused names above.
            TypeError: If ``weight_decay`` is not a number, ``overrides`` not a mapping of mappings, or
                ``layer_of`` of the wrong type.

        Examples:
            ```python
            from torch import nn
            from lightning_decay import DecayRules

            model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
            groups = DecayRules().classify(model).param_groups(0.05, layer_decay=0.5)
            [(g["name"], g["lr_scale"]) for g in groups][:2]  # [('layer_1/decay', 0.25), ('layer_1/no_decay', 0.25)]
            ```
        """
        weight_decay = validate_weight_decay(weight_decay)
        layer_decay = validate_layer_decay(layer_decay)
        check_group_options(group_kwargs, "param_groups", layer_decay is not None)
        overrides = checked_overrides(overrides, layer_decay is not None)
        layers = None
        if layer_decay is not None:
            layer_decay, layers = self.layer_assignment(layer_decay, layer_of)  # type: ignore[misc]
            self._layers = (layer_decay, layer_of, layers)
        elif layer_of is not None:
            raise ValueError("`layer_of` only applies with `layer_decay`: pass layer_decay=... too")

        buckets = self._buckets(overrides, layers)
        used = {pattern for pattern, _, _ in buckets}
        for pattern in overrides:
            if pattern not in used:
                warnings.warn(f"param_groups: override pattern {pattern!r} matches no parameter", stacklevel=2)

        groups: list[dict[str, Any]] = []
        layer_ids: list[int | None] = [None] if layers is None else list(range(layers.num_layers))
        for pattern in [None, *overrides]:
            for layer in layer_ids:
                for decay in (True, False):
                    params = buckets.get((pattern, layer, decay))
                    if not params:
                        continue
                    group: dict[str, Any] = {"params": params, **group_kwargs}
                    if pattern is not None:
                        group.update(overrides[pattern])
                    name = DECAY_GROUP if decay else NO_DECAY_GROUP
                    if layer is not None:
                        name = f"layer_{layer}/{name}"
                        group["lr_scale"] = layer_decay ** (layers.num_layers - 1 - layer)  # type: ignore[operator,union-attr]
                    group["name"] = name if pattern is None else f"{pattern}/{name}"
                    if not decay:
                        group["weight_decay"] = 0.0
                    elif weight_decay is not None and "weight_decay" not in (overrides.get(pattern) or {}):
                        group["weight_decay"] = weight_decay
                    groups.append(group)
        self._check_coverage(groups)
        return groups

    def _check_coverage(self, groups: list[dict[str, Any]]) -> None:
        # minGPT-style guarantee: every parameter in exactly one group. Counted with C-level set operations;
        # the names are looked up only to say what went wrong.
        grouped = list(map(id, itertools.chain.from_iterable(g["params"] for g in groups)))
        seen = set(grouped)
        params = self._columns.params  # distinct: the same count and every one of them seen is set equality
        if len(seen) == len(grouped) == len(params) and seen.issuperset(map(id, params)):
            return
        count: dict[int, int] = {}
        for key in grouped:
            count[key] = count.get(key, 0) + 1
            if count[key] > 1:
                raise AssertionError(f"parameter {self._by_id[key].name!r} is in two groups")
        missing = [d.name for d in self.decisions if id(d.param) not in seen]
        if missing:
            raise AssertionError(f"parameters missing from the groups: {missing}")

    def _buckets(
        self, overrides: Mapping[str, Any], layers: LayerAssignment | None
    ) -> dict[tuple[str | None, int | None, bool], list[nn.Parameter]]:
        """The parameters of each ``(override pattern or None, layer or None, decay)``, in the plan's order."""
        if not overrides and layers is None:  # the usual case: two groups, from the columns, no per-tensor lookups
            return {(None, None, True): self.decay_params, (None, None, False): self.no_decay_params}
        buckets: dict[tuple[str | None, int | None, bool], list[nn.Parameter]] = {}
        for d in self.decisions:
            pattern = next((p for p in overrides if _matches_any(p, d)), None)
            layer = None if layers is None else layers.layers[d.name]
            buckets.setdefault((pattern, layer, d.decay), []).append(d.param)
        return buckets

    # --------------------------------------------------------------- rendering
    def summary(self) -> str:
        """One line with the counts, as `DecayGroupsMixin.configure_optimizers` logs it."""
        dn = sum(d.numel for d in self.decay)
        nn_ = sum(d.numel for d in self.no_decay)
        text = (
            f"DecayPlan: decay {len(self.decay)} tensors ({_human(dn)} params), "
            f"no_decay {len(self.no_decay)} tensors ({_human(nn_)} params)"
        )
        if self.frozen:
            text += f", {len(self.frozen)} frozen skipped"
        return text

    def table(self, layer_decay: float | None = None, layer_of: LayerOf | None = None) -> str:
        """A readable table: name, shape, numel, group, reason, with totals.

        With ``layer_decay`` (or after ``param_groups(layer_decay=...)``), also each parameter's layer and
        lr scale.
        """
        layers = self.layer_assignment(layer_decay, layer_of)
        header: tuple[str, ...] = ("name", "shape", "numel", "group", "reason")
        if layers is not None:
            header += ("layer", "lr_scale")
        rows = []
        for d in self.decisions:
            name = d.name if not d.aliases else f"{d.name} (= {', '.join(d.aliases)})"
            row: tuple[str, ...] = (name, "x".join(map(str, d.shape)) or "scalar", f"{d.numel:,}", d.group, d.reason)
            if layers is not None:
                row += (str(layers[1].layers[d.name]), f"{layers[1].lr_scale(d.name, layers[0]):.4g}")
            rows.append(row)
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:{'>' if i == 2 else '<'}{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        lines = [line.rstrip() for line in lines]
        lines.append(self.summary())
        if layers is not None:
            lines.append(f"Layers: {layers[1].num_layers} from {layers[1].source}, layer_decay {layers[0]:g}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"<{self.summary()}>"


def checked_overrides(overrides: Any, layer_decay: bool) -> dict[str, Mapping[str, Any]]:
    """``param_groups``' ``overrides``, checked: a mapping of glob pattern -> group options (or ``None``)."""
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(
            "`overrides` must be a mapping of glob pattern -> group options (such as {'head.*': {'lr': 1e-3}}) "
            f"or None, got {type(overrides).__name__}: {overrides!r}"
        )
    overrides = dict(overrides or {})
    for pattern, options in overrides.items():
        if not isinstance(options, Mapping):
            raise TypeError(f"`overrides[{pattern!r}]` must be a mapping of group options, got {options!r}")
        check_group_options(options, f"`overrides[{pattern!r}]`", layer_decay)
        validate_weight_decay(options.get("weight_decay"), f"overrides[{pattern!r}]['weight_decay']")
    return overrides


def _matches_any(pattern: str, d: ParamDecision) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) for n in (d.name, *d.aliases))


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
