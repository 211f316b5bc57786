"""The L2-SP reference (Li et al., 2018) as an effect: the weights the L2 term pulls toward, and their checks.

`References` owns the reference tensors (``refs`` in checkpoints): taken from the weights when a fit
starts (``"initial"``), or given as a mapping or module, checked before any weight changes, and cut into
this rank's shards under FSDP2. It tags each decayed parameter for the buckets -- ``"sp"`` (has a
reference), ``"head"`` (a new parameter, pulled toward zero with ``l2_head``) or ``"zero"`` -- and hands
each bucket its references; `lightning_decay._penalty_effect.GradientPenalty` adds the gradient.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_decay._binding import Binding, Effect
from lightning_decay._compat import rank_zero_warn
from lightning_decay._messages import closest_names, few_names, unknown_name_message
from lightning_decay._plan_cache import plan_for
from lightning_decay.names import clean_names, clean_param_name
from lightning_decay.norms import is_dtensor, local_tensor
from lightning_decay.plan import DecayPlan, ParamDecision
from lightning_decay.rules import DecayRules

__all__ = [
    "References",
    "buffer_names",
    "check_reference_argument",
    "check_reference_tensor",
    "report_unknown_reference_names",
]


class References(Effect):
    """The L2-SP references of one ``WeightPenalty``, by parameter name, on the parameters' devices.

    For a DTensor parameter a reference is a DTensor with its layout around this rank's shard, so that
    ``state`` can gather the full tensor; a full tensor (from a checkpoint or the user) until the buckets
    cut this rank's shard out of it.
    """

    def __init__(self, reference: Any, head: tuple[str, ...]) -> None:
        self.reference = check_reference_argument(reference)
        self.head = head
        self.refs: dict[str, Tensor] = {}
        self.head_checked = False

    def is_head(self, decision: ParamDecision) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for p in self.head for n in (decision.name, *decision.aliases))

    def tag(self, decision: ParamDecision) -> str:
        if decision.name in self.refs:
            return "sp"
        # New parameters: named by `head`, or (L2-SP) decayed ones left without a reference.
        return "head" if self.is_head(decision) or self.reference is not None else "zero"

    # ------------------------------------------------------------------------- effect
    def prepare(self, binding: Binding, plan: DecayPlan) -> None:
        if self.head and not self.head_checked:
            self.head_checked = True
            names = [n for d in plan for n in (d.name, *d.aliases)]
            for pattern in self.head:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    rank_zero_warn(
                        f"WeightPenalty: `head` pattern {pattern!r} matches no parameter; "
                        + unknown_name_message(pattern, names, "a parameter name").split("; ", 1)[1]
                    )
        if self.reference is None:
            self.refs = {}  # a resumed L2-SP state of a run now without a reference: plain L2
        elif self.reference == "initial" and self.refs:
            self._check_loaded_references(plan)  # resumed: the first fit's weights, not today's
        else:
            # A fresh fit, or an explicit reference (a mapping or module: it is what the user asks for now).
            self.refs = {}
            assert binding.module is not None
            self.refs = self._collect_references(plan, binding.module)

    def buckets_built(self, binding: Binding, index: int) -> None:
        for b in binding.bound[index].buckets:
            if b.tag == "sp":
                b.refs = [self.ref_for(name, p) for name, p in zip(b.names, b.params, strict=True)]

    def reset(self) -> None:
        self.refs = {}

    # -------------------------------------------------------------------------- state
    def saved_state_needed(self) -> list[str]:
        return ["the L2-SP reference (the weights where the first fit started)"] if self.reference == "initial" else []

    def missing_from_loaded(self) -> list[str]:
        # An entry without references (written with `reference=None`) cannot give "initial" its weights.
        return ["the L2-SP reference"] if self.reference == "initial" and not self.refs else []

    def state(self) -> dict[str, Tensor]:
        # Sharded references are saved whole: ModelParallelStrategy writes callback states from rank 0 only
        # (its shards alone would be wrong for the other ranks), and a full tensor restores under any layout.
        # `full_tensor` is a collective: Lightning collects callback states on every rank before saving,
        # and every rank holds the same references in the same order. On the host, like Lightning's
        # offloaded model state, so gathering a large model does not need room for it on the device.
        return {k: v.full_tensor().cpu() if is_dtensor(v) else v for k, v in self.refs.items()}

    @staticmethod
    def validated(refs: Any) -> None:
        typed = isinstance(refs, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in refs.items())
        if not typed:
            raise ValueError(
                "WeightPenalty: the state field 'refs' must be a mapping of parameter names to tensors (the L2-SP "
                f"reference; empty without one), got {_summary(refs)}"
            )
        bad = [k for k, v in refs.items() if not v.is_floating_point()]
        if bad:
            raise ValueError(f"WeightPenalty: the state field 'refs[{bad[0]!r}]' is not a floating-point tensor")

    def load(self, refs: Mapping[str, Tensor]) -> None:
        # Bound again at train start (after any restore), where the references are checked against the
        # parameters' shapes and cut into shards.
        self.refs = dict(refs)

    def check_against_module(self, refs: Mapping[str, Tensor], module: nn.Module, rules: DecayRules) -> None:
        # Only "initial" resumes its saved references (an explicit reference replaces them, None drops them).
        if self.reference == "initial" and refs:
            self._check_reference_shapes(refs, plan_for(rules, module, include_frozen=True))

    def _check_reference_shapes(self, refs: Mapping[str, Tensor], plan: DecayPlan) -> dict[str, tuple[int, ...]]:
        """Refuse loaded references of other shapes than their parameters; the shapes of those regularized."""
        shapes = {d.name: tuple(d.param.shape) for d in plan if d.decay and not self.is_head(d)}
        for name, ref in refs.items():
            if name in shapes and tuple(ref.shape) != shapes[name]:
                raise ValueError(
                    f"WeightPenalty: the state field 'refs[{name!r}]' has shape {tuple(ref.shape)}, the parameter "
                    f"{shapes[name]}: a checkpoint of another model? Pass `reference=` explicitly to start over."
                )
        return shapes

    def _check_loaded_references(self, plan: DecayPlan) -> None:
        shapes = self._check_reference_shapes(self.refs, plan)
        without = [n for n in shapes if n not in self.refs]
        if without:
            rank_zero_warn(
                f"WeightPenalty: the resumed L2-SP reference has no entry for {few_names(without, 3)}, regularized "
                "now (other `rules`?): they are pulled toward zero with `l2_head`"
            )

    def _collect_references(self, plan: DecayPlan, module: nn.Module) -> dict[str, Tensor]:
        if self.reference == "initial":
            # A DTensor parameter's clone is a DTensor too: this rank's shard, with the layout to gather it.
            return {d.name: d.param.detach().clone() for d in plan if d.decay and not self.is_head(d)}
        # Buffers too: a key that is exactly a buffer's name is not cleaned by spelling into another name.
        params = [n for d in plan for n in (d.name, *d.aliases)] + list(plan.frozen)
        known = set(params) | buffer_names(module)
        given = reference_by_name(self.reference, known)  # type: ignore[arg-type]
        # Every check before the first copy: a bad reference leaves the callback and the model untouched.
        matched: list[tuple[ParamDecision, Tensor]] = []
        for d in plan:
            ref = next((given[n] for n in (d.name, *d.aliases) if n in given), None)
            if ref is None or not d.decay or self.is_head(d):
                continue
            check_reference_tensor(f"reference[{d.name!r}]", ref, tuple(d.param.shape))
            matched.append((d, ref))
        if not matched:
            regularized = [d.name for d in plan if d.decay and not self.is_head(d)]
            first = next(iter(given), "")
            raise ValueError(
                "`reference` names none of the regularized parameters of the model: "
                + unknown_name_message(first, regularized, "one of them")
            )
        report_unknown_reference_names(given, params, known)
        refs: dict[str, Tensor] = {}
        for d, ref in matched:
            self.ref_for(d.name, d.param, ref)
            refs[d.name] = self.refs[d.name]  # as stored: a sharded parameter's keeps its layout
        return refs

    def ref_for(self, name: str, param: nn.Parameter, ref: Tensor | None = None) -> Tensor:
        """This rank's part of ``param``'s reference (``self.refs[name]`` by default), stored back in ``refs``.

        A plain ``ref`` of a DTensor parameter is the full tensor: the parameter's global shape, whatever
        the shape of this rank's shard (uneven shards: one rank's may be the whole tensor, another's empty).
        """
        ref = self.refs[name] if ref is None else ref
        target = local_tensor(param)
        if is_dtensor(ref):
            if is_dtensor(param) and tuple(ref.placements) != tuple(param.placements):
                ref = ref.redistribute(param.device_mesh, param.placements)  # every rank: same layouts
            ref = ref.to_local()
        elif is_dtensor(param):
            if tuple(ref.shape) != tuple(param.shape):
                shapes = f"{tuple(ref.shape)}, the (full) parameter {tuple(param.shape)}"
                raise ValueError(f"The reference of {name!r} has shape {shapes}")
            from torch.distributed.tensor import distribute_tensor

            # Every rank holds the full tensor, so each cuts its own shard out of it (`src_data_rank=None`):
            # no collective, which ranks whose shards differ in shape could not enter alike. A clone, so
            # the full tensor is not kept alive by a view of it.
            full = ref.detach().to(target.device)
            ref = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local().clone()
        ref = ref.detach().to(device=target.device, dtype=target.dtype)
        self.refs[name] = self._with_layout(ref, param)
        return ref

    @staticmethod
    def _with_layout(shard: Tensor, param: nn.Parameter) -> Tensor:
        """``shard`` as a DTensor laid out like ``param`` (no communication), or itself for a plain parameter."""
        if not is_dtensor(param):
            return shard
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            shard, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )


def reference_by_name(reference: Mapping[str, Tensor] | nn.Module, known: set[str]) -> dict[str, Tensor]:
    """The reference tensors under the model's cleaned names (``known``: the names of the model).

    A module's names are cleaned from its module tree (`clean_names`: only real wrappers lose their
    component). A mapping's keys are bare strings: a key that is a name of the model is taken as it is
    (a user's attribute called ``module`` keeps its own reference), any other under its spelling-based
    cleaning (`clean_param_name`: a DDP checkpoint's ``module.`` prefix goes). An exact key wins over
    one that only cleans to the same name.
    """
    if isinstance(reference, nn.Module):
        names = clean_names(reference)
        return {names.get(k, k): v for k, v in reference.state_dict().items()}
    given = {k: v for k, v in reference.items() if k in known}
    for key, value in reference.items():
        if key not in known:
            given.setdefault(clean_param_name(key), value)
    return given


def _summary(value: Any) -> str:
    """A short description of a malformed state field (not a dump of a large mapping of tensors)."""
    if isinstance(value, Mapping):
        kinds = sorted({f"{type(k).__name__} -> {type(v).__name__}" for k, v in value.items()})
        return f"a mapping of {', '.join(kinds)}"
    return f"{type(value).__name__}: {value!r}"[:200]


def check_reference_argument(reference: Any) -> Any:
    """The ``reference`` argument, checked for what can be checked without the model.

    Raises:
        ValueError: A string other than ``"initial"``.
        TypeError: Anything but ``None``, ``"initial"``, a mapping of names to tensors or an ``nn.Module``;
            a mapping with a key that is not a string or a value that is not a tensor.
    """
    if reference is None or isinstance(reference, nn.Module):
        return reference
    if isinstance(reference, str):
        if reference != "initial":
            raise ValueError(f"`reference` must be None, 'initial', a mapping or an nn.Module, got {reference!r}")
        return reference
    if not isinstance(reference, Mapping):
        raise TypeError(
            "`reference` must be None, 'initial', a mapping of parameter names to tensors or an nn.Module, "
            f"got {type(reference).__name__}: {reference!r}"
        )
    for key, value in reference.items():
        if not isinstance(key, str):
            raise TypeError(f"`reference` keys must be parameter names (str), got {key!r}")
        if not isinstance(value, Tensor):
            raise TypeError(
                f"`reference[{key!r}]` must be a torch.Tensor, got {type(value).__name__}; "
                "convert it with torch.as_tensor(...)"
            )
    return reference


def check_reference_tensor(argument: str, ref: Any, shape: tuple[int, ...]) -> None:
    """Refuse a reference that is not a finite floating tensor of ``shape`` (one host sync, when training starts)."""
    if not isinstance(ref, Tensor):
        raise TypeError(f"`{argument}` must be a torch.Tensor, got {type(ref).__name__}")
    if not (ref.is_floating_point()):
        raise TypeError(f"`{argument}` must have a floating dtype like its parameter, got {ref.dtype}")
    if tuple(ref.shape) != shape:
        raise ValueError(f"`{argument}` has shape {tuple(ref.shape)}, the parameter {shape}")
    if not bool(torch.isfinite(ref).all()):
        bad = int((~torch.isfinite(ref)).sum())
        raise ValueError(f"`{argument}` has {bad} non-finite value(s) (NaN or inf): every weight would become NaN")


def buffer_names(module: nn.Module) -> set[str]:
    """The buffers' names cleaned like the parameters', from the module tree: the owner's path, then the buffer's."""
    tree = clean_names(module)
    names = set()
    for raw, _ in module.named_buffers(remove_duplicate=False):
        owner, _, leaf = raw.rpartition(".")
        path = tree.get(owner, owner)
        names.add(f"{path}.{leaf}" if path else leaf)
    return names


def report_unknown_reference_names(given: Mapping[str, Any], params: Sequence[str], known: set[str]) -> None:
    """Warn once about reference names the model has neither as a parameter nor as a buffer.

    A pretrained ``state_dict`` often carries a classifier the new model replaced, so unknown names are
    not an error; but a name that misses by a prefix or a typo silently leaves its parameter without a
    reference, so the warning names the closest names of the model. ``params``: the model's parameter
    names (the suggestions); ``known``: those and its buffers' names.
    """
    unknown = [k for k in given if k not in known]
    if not unknown:
        return
    lines = []
    for k in unknown[:5]:
        close = closest_names(k, params)
        lines.append(f"{k!r}" + (f" (closest: {', '.join(repr(c) for c in close)})" if close else ""))
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    rank_zero_warn(
        f"WeightPenalty: {len(unknown)} `reference` name(s) are not parameters of the model and are ignored: "
        + "; ".join(lines)
        + more
    )
