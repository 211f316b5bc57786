"""``WeightPenalty``: L1 / L2 / L2-SP penalties added through the gradient, once per optimizer step."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_decay import kernels
from lightning_decay._checks import check_choice, check_flag
from lightning_decay._compat import pl, rank_zero_warn
from lightning_decay._plan_cache import plan_for
from lightning_decay._regularizer import (
    OptimizerBuckets,
    RegularizerCallback,
    coefficient,
    should_log,
    to_host,
)
from lightning_decay.names import clean_names, clean_param_name
from lightning_decay.norms import is_dtensor, local_tensor
from lightning_decay.plan import DecayPlan, ParamDecision, closest_names, few_names, unknown_name_message
from lightning_decay.rules import DecayRules, _patterns
from lightning_decay.schedules import Constant, ScheduleLike, as_schedule

__all__ = ["WeightPenalty"]

_L1_MODES = ("subgradient", "proximal")


class WeightPenalty(RegularizerCallback):
    r"""Add ``l1 * sum|w| + l2 / 2 * sum w^2`` to the cost through the gradient of the decayed weights.

    The gradient of the penalty, ``l2 * w + l1 * sign(w)``, is added to ``p.grad`` in
    ``on_before_optimizer_step``: once per real optimizer step (so gradient accumulation is handled),
    after DDP has averaged and AMP has unscaled the gradients, and before gradient clipping -- exactly
    where the gradient of a loss term would be. The penalty is the *squared* L2 norm, as in the
    regularized cost ``C = C_0 + λ/2 * sum w^2``, not the unsquared ``torch.norm(p, 2)``.
    With plain ``SGD`` this is torch's ``SGD(weight_decay=l2)``; with Adam it is L2 regularization,
    not AdamW's decoupled decay (use [`WeightDecay`][lightning_decay.WeightDecay] for that).

    Which tensors: the ``"decay"`` ones of the [`DecayRules`][lightning_decay.DecayRules] plan (by default not
    biases, normalization parameters or other 1-D tensors); each is regularized once, by the optimizer
    that owns it.

    L1 modes:
        - ``"subgradient"`` adds ``l1 * sign(w)`` to the gradient: exact for any optimizer, but weights
          oscillate around zero and are never exactly zero.
        - ``"proximal"`` soft-thresholds after each optimizer step, ``w <- sign(w) * max(|w| - lr * l1, 0)``,
          which gives exact zeros (sparse weights); it is the proximal-gradient method for SGD and a good
          heuristic for adaptive optimizers.

    L2-SP (Li et al., 2018): with ``reference``, the L2 term pulls toward reference weights ``w0``
    instead of zero, ``l2 / 2 * ||w - w0||^2``. ``"initial"`` takes the weights when training starts (the
    pretrained backbone when fine-tuning); a mapping of parameter names to tensors, or a module whose
    ``state_dict`` has the model's names, gives them explicitly. Parameters without a reference (a new
    head) get ``l2_head / 2 * ||w||^2``. Say which parameters are new with ``head`` (glob patterns on
    parameter names, as in [`DecayRules`][lightning_decay.DecayRules]): those never get a reference, even
    with ``reference="initial"``, and always get ``l2_head`` toward zero; without a ``reference``, ``head``
    gives them ``l2_head`` and the other parameters ``l2``. References are checked when training starts, before
    any weight changes: tensors (not lists or arrays) of a floating dtype, finite, of the parameter's
    shape; names the model does not have are reported with the closest ones. The reference costs one
    extra copy of each referenced parameter on its device, in its dtype (a local shard under FSDP2), and
    is saved in checkpoints (whole: under FSDP2 gathered to the host of every rank when saving, and
    sharded again on resume).

    Every argument is keyword-only: ``WeightPenalty(1e-4)`` would not say whether ``1e-4`` is L1 or L2.
    A penalty whose coefficients are all 0, ``l2_head`` without ``reference`` or ``head`` (or with
    ``reference="initial"`` and no ``head``, where every decayed parameter has a reference), and
    ``l1_mode="proximal"`` with ``l1=0`` do nothing and warn; so does a ``head`` pattern that matches no
    parameter (when training starts).

    Args:
        l1: L1 coefficient, a number, a [`schedules`][lightning_decay.schedules] schedule or
            ``step -> float``.
        l2: L2 (or L2-SP) coefficient, same forms.
        l1_mode: ``"subgradient"`` or ``"proximal"``.
        reference: ``None``, ``"initial"``, a ``{name: tensor}`` mapping or an ``nn.Module`` (L2-SP).
        l2_head: L2 coefficient toward zero for the new parameters: those matching ``head``, and with a
            ``reference`` the decayed parameters without one. Default ``l2``.
        head: Glob patterns (or one pattern) naming the new parameters, such as ``["head.*"]``.
        rules: Which parameters are regularized; default: the LightningModule's ``decay_rules``, else
            [`DecayRules`][lightning_decay.DecayRules]``()``.
        log_penalty: Log ``penalty/l1`` and ``penalty/l2`` (the current penalty values) on logging steps.
        name: The callback's key in checkpoints (``WeightPenalty{'name': ...}``); needed only to keep two
            instances with the same ``rules`` apart, or a key fixed across changes of ``rules``.
        missing_state: What a resumed fit does when the checkpoint has no state for this callback and the
            state matters (``reference="initial"``'s reference, a schedule's step count): ``"raise"``
            (default) or ``"restart"`` (the reference becomes the resumed weights, schedules start again
            from step 0).

    Raises:
        ValueError: If a coefficient is negative or not finite (a schedule: at the step it returns one),
            ``l1_mode`` or ``missing_state`` is unknown, ``reference`` is a string other than ``"initial"``,
            or a loaded state is malformed (naming the field). At train start, if a reference tensor is not
            finite or has another shape than its parameter, or no reference name is a regularized parameter
            of the model.
        TypeError: If an argument has the wrong type (a string for ``rules``, ``"false"`` for
            ``log_penalty``, a list or NumPy array as a reference tensor); at train start, a reference
            tensor of a non-floating dtype.
        MisconfigurationException: At train start (after a resumed optimizer is restored) or when param
            groups change, if an optimizer's own ``weight_decay`` would decay the same parameters (double
            decay); when resuming without the saved reference or schedule step; under DeepSpeed.

    Examples:
        ```python
        from lightning.pytorch import Trainer
        from lightning_decay import WeightPenalty

        trainer = Trainer(callbacks=[WeightPenalty(l2=1e-4)])
        ```
    """

    def __init__(
        self,
        *,
        l1: ScheduleLike = 0.0,
        l2: ScheduleLike = 0.0,
        l1_mode: Literal["subgradient", "proximal"] = "subgradient",
        reference: Literal["initial"] | Mapping[str, Tensor] | nn.Module | None = None,
        l2_head: ScheduleLike | None = None,
        head: Sequence[str] | str = (),
        rules: DecayRules | None = None,
        log_penalty: bool = True,
        name: str | None = None,
        missing_state: Literal["raise", "restart"] = "raise",
    ) -> None:
        super().__init__(rules, name=name, missing_state=missing_state)
        self._l1 = as_schedule(l1, "l1")
        self._l2 = as_schedule(l2, "l2")
        self._l2_head = self._l2 if l2_head is None else as_schedule(l2_head, "l2_head")
        self.l1_mode = check_choice(l1_mode, _L1_MODES, "l1_mode")
        self._reference = check_reference_argument(reference)
        self.head = _patterns(head, "head")
        self.log_penalty = check_flag(log_penalty, "log_penalty")
        self._warn_no_ops(l2_head)
        self._head_checked = False
        # name -> reference for L2-SP, on the parameter's device. For a DTensor parameter a DTensor with its
        # layout around this rank's shard, so that ``state_dict`` can gather the full tensor; a full tensor
        # (from a checkpoint or the user) until the buckets cut this rank's shard out of it.
        self._refs: dict[str, Tensor] = {}

    def _warn_no_ops(self, l2_head: ScheduleLike | None) -> None:
        """Warn about arguments that can have no effect, naming them."""
        if not any(self._uses(s) for s in (self._l1, self._l2, self._l2_head)):
            rank_zero_warn("WeightPenalty: `l1`, `l2` and `l2_head` are all 0, so the callback does nothing")
        if l2_head is not None and self._reference is None and not self.head:
            rank_zero_warn(
                "WeightPenalty: `l2_head` is ignored without `reference` or `head`: it applies to new parameters, "
                "those matching `head` or, with a `reference`, those without one. Use `l2` alone, or name the new "
                "parameters with `head=[...]`."
            )
        if l2_head is not None and self._reference == "initial" and not self.head:
            rank_zero_warn(
                "WeightPenalty: `l2_head` never applies with reference='initial' and no `head`: every decayed "
                "parameter gets its fit-start weights as reference. Name the new parameters with `head=[...]` "
                "(for instance head=['head.*']) to pull them toward zero with `l2_head`."
            )
        if self.l1_mode == "proximal" and not self._uses(self._l1):
            rank_zero_warn("WeightPenalty: `l1_mode='proximal'` does nothing with `l1=0`")

    def _is_head(self, decision: ParamDecision) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for p in self.head for n in (decision.name, *decision.aliases))

    def _l2_of(self, tag: str) -> Any:
        """The L2 schedule of a bucket: ``l2`` toward a reference or toward zero, ``l2_head`` for new parameters."""
        return self._l2_head if tag == "head" else self._l2

    # ------------------------------------------------------------ base hooks
    def _uses(self, schedule: Any) -> bool:
        return not (isinstance(schedule, Constant) and schedule.value == 0.0)

    def _decays_like_weight_decay(self) -> bool:
        return self._uses(self._l2) or self._uses(self._l2_head)

    def _pull(self) -> str:
        # L2-SP does not shrink the weights: it pulls them back toward the reference (only new ones toward zero).
        return "toward its reference weights (L2-SP)" if self._reference is not None else "toward zero"

    def _bucket_tag(self, decision: ParamDecision) -> Any:
        if decision.name in self._refs:
            return "sp"
        # New parameters: named by `head`, or (L2-SP) decayed ones left without a reference.
        return "head" if self._is_head(decision) or self._reference is not None else "zero"

    def _on_buckets_built(self, index: int, entry: OptimizerBuckets) -> None:
        for b in entry.buckets:
            if b.tag == "sp":
                b.refs = [self._ref_for(name, p) for name, p in zip(b.names, b.params, strict=True)]

    def _register_optimizer_hooks(self, index: int, optimizer: Optimizer) -> list[RemovableHandle]:
        def after_step(opt: Optimizer, args: Any, kwargs: Any) -> None:
            if not self._step_ran(opt):
                return
            if self.l1_mode == "proximal":
                l1 = coefficient(self._l1, self._steps[index], "l1")
                if l1:
                    for b in self._buckets(index):
                        lr = opt.param_groups[b.group_index]["lr"]
                        # Only the parameters the optimizer stepped (those with a gradient): a frozen or
                        # unused one is left alone, as the optimizer leaves it. The gradients are still
                        # there (zero_grad comes after the step). In the bucket's precomputed chunks when
                        # all have one: the temporary is one chunk, not a copy.
                        weights, _, idx = b.with_grads()
                        if weights:
                            chunks = b.chunks if len(idx) == len(b.params) else None
                            kernels.soft_threshold_(weights, lr * l1, chunks)
            self._steps[index] += 1

        return [optimizer.register_step_post_hook(after_step)]

    # ----------------------------------------------------------- lifecycle
    def _reset_state(self) -> None:
        self._refs = {}

    def _saved_state_needed(self) -> list[str]:
        needed = []
        if self._reference == "initial":
            needed.append("the L2-SP reference (the weights where the first fit started)")
        used = [(a, s) for a, s in (("l1", self._l1), ("l2", self._l2), ("l2_head", self._l2_head)) if self._uses(s)]
        if any(self._step_dependent(s) for _, s in used):
            names = ", ".join(f"`{a}`" for a, s in used if self._step_dependent(s))
            plural = "s" if ", " in names else ""
            needed.append(f"the step count of the {names} schedule{plural}")
        return needed

    def _missing_from_loaded_state(self) -> list[str]:
        # An entry without references (written with `reference=None`) cannot give "initial" its weights.
        return ["the L2-SP reference"] if self._reference == "initial" and not self._refs else []

    def _prepare(self, plan: DecayPlan) -> None:
        if self.head and not self._head_checked:
            self._head_checked = True
            names = [n for d in plan for n in (d.name, *d.aliases)]
            for pattern in self.head:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    rank_zero_warn(
                        f"WeightPenalty: `head` pattern {pattern!r} matches no parameter; "
                        + unknown_name_message(pattern, names, "a parameter name").split("; ", 1)[1]
                    )
        if self._reference is None:
            self._refs = {}  # a resumed L2-SP state of a run now without a reference: plain L2
        elif self._reference == "initial" and self._refs:
            self._check_loaded_references(plan)  # resumed: the first fit's weights, not today's
        else:
            # A fresh fit, or an explicit reference (a mapping or module: it is what the user asks for now).
            self._refs = {}
            self._refs = self._collect_references(plan)

    def _check_reference_shapes(self, refs: Mapping[str, Tensor], plan: DecayPlan) -> dict[str, tuple[int, ...]]:
        """Refuse loaded references of other shapes than their parameters; the shapes of those regularized."""
        shapes = {d.name: tuple(d.param.shape) for d in plan if d.decay and not self._is_head(d)}
        for name, ref in refs.items():
            if name in shapes and tuple(ref.shape) != shapes[name]:
                raise ValueError(
                    f"WeightPenalty: the state field 'refs[{name!r}]' has shape {tuple(ref.shape)}, the parameter "
                    f"{shapes[name]}: a checkpoint of another model? Pass `reference=` explicitly to start over."
                )
        return shapes

    def _check_against_module(self, state: dict[str, Any], module: nn.Module) -> None:
        # Only "initial" resumes its saved references (an explicit reference replaces them, None drops them).
        if self._reference == "initial" and state.get("refs"):
            self._check_reference_shapes(state["refs"], plan_for(self.rules, module, include_frozen=True))

    def _check_loaded_references(self, plan: DecayPlan) -> None:
        shapes = self._check_reference_shapes(self._refs, plan)
        without = [n for n in shapes if n not in self._refs]
        if without:
            rank_zero_warn(
                f"WeightPenalty: the resumed L2-SP reference has no entry for {few_names(without, 3)}, regularized "
                "now (other `rules`?): they are pulled toward zero with `l2_head`"
            )

    def _collect_references(self, plan: DecayPlan) -> dict[str, Tensor]:
        if self._reference == "initial":
            # A DTensor parameter's clone is a DTensor too: this rank's shard, with the layout to gather it.
            return {d.name: d.param.detach().clone() for d in plan if d.decay and not self._is_head(d)}
        assert self._module is not None  # bound
        # Buffers too: a key that is exactly a buffer's name is not cleaned by spelling into another name.
        params = [n for d in plan for n in (d.name, *d.aliases)] + list(plan.frozen)
        known = set(params) | buffer_names(self._module)
        given = _reference_by_name(self._reference, known)  # type: ignore[arg-type]
        # Every check before the first copy: a bad reference leaves the callback and the model untouched.
        matched: list[tuple[ParamDecision, Tensor]] = []
        for d in plan:
            ref = next((given[n] for n in (d.name, *d.aliases) if n in given), None)
            if ref is None or not d.decay or self._is_head(d):
                continue
            check_reference_tensor(f"reference[{d.name!r}]", ref, tuple(d.param.shape))
            matched.append((d, ref))
        if not matched:
            regularized = [d.name for d in plan if d.decay and not self._is_head(d)]
            first = next(iter(given), "")
            raise ValueError(
                "`reference` names none of the regularized parameters of the model: "
                + unknown_name_message(first, regularized, "one of them")
            )
        report_unknown_reference_names(given, params, known)
        refs: dict[str, Tensor] = {}
        for d, ref in matched:
            self._ref_for(d.name, d.param, ref)
            refs[d.name] = self._refs[d.name]  # as stored: a sharded parameter's keeps its layout
        return refs

    def _ref_for(self, name: str, param: nn.Parameter, ref: Tensor | None = None) -> Tensor:
        """This rank's part of ``param``'s reference (``self._refs[name]`` by default), stored back in ``_refs``.

        A plain ``ref`` of a DTensor parameter is the full tensor: the parameter's global shape, whatever
        the shape of this rank's shard (uneven shards: one rank's may be the whole tensor, another's empty).
        """
        ref = self._refs[name] if ref is None else ref
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
        self._refs[name] = self._with_layout(ref, param)
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

    def state_dict(self) -> dict[str, Any]:
        # Sharded references are saved whole: ModelParallelStrategy writes callback states from rank 0 only
        # (its shards alone would be wrong for the other ranks), and a full tensor restores under any layout.
        # `full_tensor` is a collective: Lightning collects callback states on every rank before saving,
        # and every rank holds the same references in the same order. On the host, like Lightning's
        # offloaded model state, so gathering a large model does not need room for it on the device.
        refs = {k: v.full_tensor().cpu() if is_dtensor(v) else v for k, v in self._refs.items()}
        return {**super().state_dict(), "refs": refs}

    def _validated(self, state_dict: Any) -> dict[str, Any]:
        state = super()._validated(state_dict)
        refs = state.get("refs", {})
        typed = isinstance(refs, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in refs.items())
        if not typed:
            raise ValueError(
                "WeightPenalty: the state field 'refs' must be a mapping of parameter names to tensors (the L2-SP "
                f"reference; empty without one), got {_summary(refs)}"
            )
        bad = [k for k, v in refs.items() if not v.is_floating_point()]
        if bad:
            raise ValueError(f"WeightPenalty: the state field 'refs[{bad[0]!r}]' is not a floating-point tensor")
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        # Bound again at train start (after any restore), where the references are checked against the
        # parameters' shapes and cut into shards.
        self._refs = dict(state.get("refs", {}))

    # --------------------------------------------------------------- steps
    def _before_step(self, index: int, optimizer: Optimizer) -> None:
        step = self._steps[index]
        l2 = coefficient(self._l2, step, "l2")
        l2_head = coefficient(self._l2_head, step, "l2_head")
        l1 = coefficient(self._l1, step, "l1") if self.l1_mode == "subgradient" else 0.0
        scale = self._grad_scale(optimizer)  # fused optimizers: the gradients are still scaled here
        for b in self._buckets(index):
            c2 = l2_head if b.tag == "head" else l2
            if not (c2 or l1):
                continue
            weights, grads, idx = b.with_grads()
            if not grads:
                continue
            # The bucket's chunks index all its parameters; for the few steps where some have no
            # gradient, the kernels chunk the subset themselves.
            full = len(idx) == len(b.params)
            chunks = b.chunks if full else None
            if c2:
                refs = b.refs if b.refs is None or full else [b.refs[i] for i in idx]
                kernels.add_l2_gradient_(grads, weights, c2 if scale is None else scale * c2, refs, chunks)
            if l1:
                kernels.add_l1_subgradient_(grads, weights, l1 if scale is None else scale * l1, chunks)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.log_penalty or not self._per_optimizer or not should_log(trainer):
            return
        values = self.penalty_values()
        for key, value in values.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, prog_bar=False, batch_size=1)

    def penalty_values(self) -> dict[str, float]:
        """The current ``penalty/l1`` and ``penalty/l2`` values, with one device-to-host copy.

        Under FSDP2 the per-shard sums are added across ranks with one all-reduce (every rank must call),
        a replicated parameter's (HSDP) from one replica only.
        """
        use_l1, use_l2 = self._uses(self._l1), self._decays_like_weight_decay()
        local_parts: list[Tensor] = []
        sharded_parts: list[Tensor] = []
        sharded_counted: list[Tensor] = []
        names: list[str] = []
        sharded_names: list[str] = []
        coeffs: list[tuple[str, float]] = []
        sharded_coeffs: list[tuple[str, float]] = []
        for index, b in self._all_buckets():
            step = self._steps[index]
            weights = b.weights()
            if b.sharded:
                parts, nm, cf = sharded_parts, sharded_names, sharded_coeffs
            else:
                parts, nm, cf = local_parts, names, coeffs
            if use_l2:
                c2 = coefficient(self._l2_of(b.tag), step, "l2_head" if b.tag == "head" else "l2")
                parts += kernels.squared_distances(weights, b.refs, b.chunks)
                nm += b.names
                cf += [("penalty/l2", c2 / 2)] * len(weights)
            if use_l1:
                c1 = coefficient(self._l1, step, "l1")
                parts += kernels.sum_abs(weights)
                nm += b.names
                cf += [("penalty/l1", c1)] * len(weights)
            if b.counted is not None:  # a sharded bucket, once per kind of part it added above
                sharded_counted += [b.counted] * (use_l1 + use_l2)
        host = to_host(local_parts, sharded_parts, sharded_counted)
        self._warn_nonfinite(names + sharded_names, host)
        out = {k: 0.0 for k in (["penalty/l1"] if use_l1 else []) + (["penalty/l2"] if use_l2 else [])}
        for (key, c), v in zip(coeffs + sharded_coeffs, host, strict=True):
            out[key] += c * v
        return out


def _reference_by_name(reference: Mapping[str, Tensor] | nn.Module, known: set[str]) -> dict[str, Tensor]:
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


# ------------------------------------------------------------------------------ reference checks
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
