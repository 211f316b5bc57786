"""Lightning glue shared by ``WeightPenalty`` and ``WeightDecay``: which tensors, when, and how resumed.

The parameters to regularize are found once per optimizer and bucketed by (param group, device,
dtype, sharded or not), like torch's optimizers group their foreach work; the buckets are rebuilt
only when an optimizer's param groups change (``BaseFinetuning`` adding a group). Per step, the
only Python work is gathering ``.grad`` of each bucket, as torch's optimizers do too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_decay import kernels
from lightning_decay._compat import Callback, MisconfigurationException, is_deepspeed
from lightning_decay.norms import all_reduce_partials, contributes_to_sum, is_dtensor, local_tensor
from lightning_decay.plan import DecayPlan, ParamDecision
from lightning_decay.rules import DecayRules, as_rules
from lightning_decay.schedules import check_coefficient


@dataclass
class Bucket:
    """Parameters of one optimizer param group sharing device, dtype and sharding."""

    group_index: int
    params: list[nn.Parameter]
    names: list[str]
    sharded: bool
    tag: Any = None
    locals: list[Tensor] = field(default_factory=list)
    refs: list[Tensor] | None = None
    # Sharded buckets: per parameter, whether this rank's partial sums enter a cross-rank sum. False on
    # all replicas but one of a parameter replicated over a mesh dimension (HSDP), so it counts once.
    counted: Tensor | None = None
    # Index ranges of the parameters for the chunked kernels (`kernels.chunk_ranges`), which bound their
    # temporaries to a few percent of the bucket. Computed once, from the local sizes, so a step loops
    # over a few chunks, never over parameters; ranges, not lists of tensors, because sharded buckets
    # get fresh local views each step (of the same shapes).
    chunks: list[tuple[int, int]] = field(init=False, default_factory=list)
    # `list(range(len(params)))`, the positions `with_grads` returns when every parameter has a gradient.
    every: list[int] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.locals = [local_tensor(p) for p in self.params]
        self.chunks = kernels.chunk_ranges(self.locals)
        self.every = list(range(len(self.params)))
        if self.sharded and self.params:
            flags = [contributes_to_sum(p) for p in self.params]
            self.counted = torch.tensor(flags, dtype=torch.bool, device=self.locals[0].device)

    def weights(self) -> list[Tensor]:
        # FSDP2 may hand out fresh local views between steps; plain parameters never change.
        return [local_tensor(p) for p in self.params] if self.sharded else self.locals

    def with_grads(self) -> tuple[list[Tensor], list[Tensor], list[int]]:
        """(weights, grads, positions) of the parameters that have a gradient this step.

        When every parameter has one (``len(positions) == len(params)``), the weights are ``weights()``
        and the positions ``every``, both shared with the bucket: callers must not modify them.
        """
        grads = [p.grad for p in self.params]
        weights = self.weights()
        if all(g is not None for g in grads):
            idx = self.every  # the common case: no further per-parameter work
        else:
            idx = [i for i, g in enumerate(grads) if g is not None]
            weights = [weights[i] for i in idx]
            grads = [grads[i] for i in idx]
        if self.sharded:
            grads = [local_tensor(g) for g in grads]  # type: ignore[arg-type]
        return weights, grads, idx  # type: ignore[return-value]


class OptimizerBuckets:
    """The buckets of one optimizer, rebuilt when its param groups change."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.signature: tuple[int, ...] = ()
        self.buckets: list[Bucket] = []
        self.handles: list[RemovableHandle] = []

    def current_signature(self) -> tuple[int, ...]:
        return tuple(len(g["params"]) for g in self.optimizer.param_groups)


class RegularizerCallback(Callback):
    """Base of the regularization callbacks: buckets, hooks, refusals, double-decay checks, resume."""

    def __init__(self, rules: DecayRules | None) -> None:
        self.rules = as_rules(rules)
        self._plan: DecayPlan | None = None
        self._per_optimizer: list[OptimizerBuckets] = []
        self._steps: list[int] = []
        self._scaler: Any = None
        self._pl_module: nn.Module | None = None
        self._warned_nonfinite: set[str] = set()
        self._state_key: str | None = None

    # ------------------------------------------------------------- subclass API
    def _regularizes(self, decision: ParamDecision) -> bool:
        return decision.decay

    def _decays_like_weight_decay(self) -> bool:
        """Whether an optimizer's own ``weight_decay`` on the same parameters would be a double decay."""
        return True

    def _bucket_tag(self, decision: ParamDecision) -> Any:
        """Extra bucket key, for subclasses whose parameters need different treatment."""
        return None

    def _on_buckets_built(self, index: int, entry: OptimizerBuckets) -> None:
        """Called after the buckets of optimizer ``index`` are (re)built."""

    def _register_optimizer_hooks(self, index: int, optimizer: Optimizer) -> list[RemovableHandle]:
        return []

    def _state_key_fields(self) -> dict[str, Any]:
        """What tells two instances apart in a checkpoint (with ``rules``, added here)."""
        return {}

    @property
    def state_key(self) -> str:
        # Computed once: Lightning asks for it in every hook call, and two instances that differ only
        # in `rules` (or a reference) must not share a key.
        if self._state_key is None:
            self._state_key = self._generate_state_key(**self._state_key_fields(), rules=repr(self.rules))
        return self._state_key

    # -------------------------------------------------------------- lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if is_deepspeed(trainer.strategy):
            raise MisconfigurationException(
                f"{type(self).__name__} does not support {strategy}: under ZeRO `p.grad` is not the real gradient "
                "and `on_before_optimizer_step` fires on every micro-batch. Use the optimizer's own weight_decay "
                "with the decay / no-decay groups of `DecayGroupsMixin` or `decay_param_groups`, which DeepSpeed "
                "honors."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pl_module = pl_module
        self._plan = self.rules.classify(pl_module, include_frozen=True)
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        optimizers = list(trainer.optimizers)
        if len(self._steps) != len(optimizers):
            self._steps = [self._steps[0] if self._steps else 0] * len(optimizers)
        self._per_optimizer = [OptimizerBuckets(opt) for opt in optimizers]
        for i, entry in enumerate(self._per_optimizer):
            self._rebuild(i, entry)
            entry.handles = self._register_optimizer_hooks(i, entry.optimizer)
        self._check_other_callbacks(trainer)

    def _regularized_ids(self) -> set[int]:
        return {id(p) for entry in self._per_optimizer for b in entry.buckets for p in b.params}

    def _check_other_callbacks(self, trainer: pl.Trainer) -> None:
        if not self._decays_like_weight_decay():
            return
        mine = self._regularized_ids()
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self or not isinstance(other, RegularizerCallback) or not other._per_optimizer:
                continue
            if other._decays_like_weight_decay() and (mine & other._regularized_ids()):
                raise MisconfigurationException(
                    f"Double weight decay: {type(self).__name__} and {type(other).__name__} both pull the same "
                    "parameters toward zero. Give them disjoint `rules`, or keep one of them."
                )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for entry in self._per_optimizer:
            for handle in entry.handles:
                handle.remove()
        self._per_optimizer = []

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self._steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps = list(state_dict.get("steps", []))

    # --------------------------------------------------------------- buckets
    def _index_of(self, optimizer: Optimizer) -> int | None:
        for i, entry in enumerate(self._per_optimizer):
            if entry.optimizer is optimizer:
                return i
        return None

    def _buckets(self, index: int) -> list[Bucket]:
        entry = self._per_optimizer[index]
        if entry.current_signature() != entry.signature:
            self._rebuild(index, entry)
        return entry.buckets

    def _rebuild(self, index: int, entry: OptimizerBuckets) -> None:
        assert self._plan is not None
        plan = self._plan
        optimizer = entry.optimizer
        unknown = any(plan.decision_for(p) is None for g in optimizer.param_groups for p in g["params"])
        if unknown and self._pl_module is not None:
            # Parameters created after fit start (rare): classify again, the plan is cheap.
            plan = self._plan = self.rules.classify(self._pl_module, include_frozen=True)
        buckets: list[Bucket] = []
        for gi, group in enumerate(optimizer.param_groups):
            keyed: dict[tuple[Any, ...], list[ParamDecision]] = {}
            for p in group["params"]:
                d = plan.decision_for(p)
                if d is None or not self._regularizes(d):
                    continue
                key = (str(p.device), p.dtype, is_dtensor(p), self._bucket_tag(d))
                keyed.setdefault(key, []).append(d)
            for (_, _, sharded, tag), decisions in keyed.items():
                names = [d.name for d in decisions]
                buckets.append(Bucket(gi, [d.param for d in decisions], names, sharded=sharded, tag=tag))
        entry.buckets = buckets
        entry.signature = entry.current_signature()
        self._check_double_decay(index, entry)
        self._on_buckets_built(index, entry)

    def _check_double_decay(self, index: int, entry: OptimizerBuckets) -> None:
        if not self._decays_like_weight_decay():
            return
        for bucket in entry.buckets:
            group = entry.optimizer.param_groups[bucket.group_index]
            wd = group.get("weight_decay", 0.0)
            if wd:
                name = group.get("name", f"param group {bucket.group_index}")
                raise MisconfigurationException(
                    f"Double weight decay: {type(entry.optimizer).__name__}'s {name!r} has weight_decay={wd} on "
                    f"parameters that {type(self).__name__} also regularizes ({_few(bucket.names)}). Set "
                    "weight_decay=0 in the optimizer for those parameters (the 'no_decay'/'decay' groups of "
                    "decay_param_groups help), or let WeightDecay(weight_decay=None) take the optimizer's "
                    "weight_decay over."
                )

    def _all_buckets(self) -> Iterator[tuple[int, Bucket]]:
        for i in range(len(self._per_optimizer)):
            for b in self._buckets(i):
                yield i, b

    # ----------------------------------------------------------------- steps
    def _grad_scale(self, optimizer: Optimizer) -> Tensor | None:
        """The AMP scale still on the gradients in ``on_before_optimizer_step``, or ``None`` if unscaled."""
        if self._scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scale = getattr(self._scaler, "_scale", None)
            return scale if isinstance(scale, Tensor) else None
        return None

    @staticmethod
    def _step_ran(optimizer: Optimizer) -> bool:
        """In an optimizer step post-hook: whether the step really updated the weights.

        Step hooks do not run at all when the GradScaler skips a step, except for fused optimizers,
        which it steps anyway with a ``found_inf`` flag; reading that flag is the one host sync here.
        """
        found_inf = getattr(optimizer, "found_inf", None)
        return not (isinstance(found_inf, Tensor) and found_inf.item() != 0)

    def _unscaled_in_step(self, optimizer: Optimizer) -> bool:
        """Whether a GradScaler hands ``optimizer`` scaled gradients to unscale inside ``step`` (fused ones)."""
        return self._scaler is not None and bool(getattr(optimizer, "_step_supports_amp_scaling", False))

    def _found_inf(self, optimizer: Optimizer) -> Tensor | None:
        """After ``GradScaler.unscale_``: 1.0 if this step will be skipped for inf/NaN gradients, else 0.0.

        A device tensor, so masking with it needs no host sync. ``None`` without a scaler.
        """
        if self._unscaled_in_step(optimizer):
            found = getattr(optimizer, "found_inf", None)  # set by GradScaler.step around a fused step
            return found if isinstance(found, Tensor) else None
        states = getattr(self._scaler, "_per_optimizer_states", None)
        per_device = (states or {}).get(id(optimizer), {}).get("found_inf_per_device") if states else None
        if not per_device:
            return None
        values = list(per_device.values())
        return values[0] if len(values) == 1 else torch.stack([v.to(values[0].device) for v in values]).sum()

    def _check_finite(self) -> None:
        """Warn once per parameter whose weights turned non-finite (one host copy; call on logging steps)."""
        local_parts: list[Tensor] = []
        sharded_parts: list[Tensor] = []
        names: list[str] = []
        sharded_names: list[str] = []
        for _, b in self._all_buckets():
            if b.sharded:
                sharded_parts += kernels.sum_abs(b.weights())
                sharded_names += b.names
            else:
                local_parts += kernels.sum_abs(b.weights())
                names += b.names
        self._warn_nonfinite(names + sharded_names, to_host(local_parts, sharded_parts))

    def _warn_nonfinite(self, names: list[str], values: list[float]) -> None:
        for name, v in zip(names, values, strict=True):
            if not math.isfinite(v) and name not in self._warned_nonfinite:
                self._warned_nonfinite.add(name)
                rank_zero_warn(f"{type(self).__name__}: parameter {name!r} has non-finite values ({v})")


def should_log(trainer: pl.Trainer) -> bool:
    return bool(trainer.loggers) and trainer._logger_connector.should_update_logs


def coefficient(schedule: Callable[[int], float], step: int, argument: str) -> float:
    """The schedule's value at ``step``, validated (a schedule may not return a negative value)."""
    return check_coefficient(schedule(step), argument, step)


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def to_host(
    local_parts: list[Tensor], sharded_parts: list[Tensor], sharded_counted: list[Tensor] | None = None
) -> list[float]:
    """0-dim values to Python floats: one copy per device; sharded parts summed across ranks first.

    Sharded parts are per-shard sums (of squares or absolute values), so one all-reduce of their stack
    gives the global values; every rank must call this with the same layout. ``sharded_counted``
    (``Bucket.counted`` vectors, concatenated in the order of ``sharded_parts``) zeroes the parts of
    replicas that must not count again; without it every rank's part is added.
    """
    pieces: list[Tensor] = []
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in local_parts:
        by_device.setdefault(t.device, []).append(t)
    order = [t for ts in by_device.values() for t in ts]
    pieces += [torch.stack(ts).cpu() for ts in by_device.values()]
    if sharded_parts:
        sharded = torch.stack(sharded_parts)
        if sharded_counted:
            # `where`, not a product: NaN * 0 is NaN, and skipped replicas must add exactly nothing.
            sharded = torch.where(torch.cat(sharded_counted), sharded, 0.0)
        all_reduce_partials(sharded, None)
        pieces.append(sharded.cpu())
    values = torch.cat(pieces).tolist() if pieces else []
    if len(by_device) > 1:  # restore the caller's order
        position = {id(t): i for i, t in enumerate(order)}
        values[: len(order)] = [values[position[id(t)]] for t in local_parts]
    return values
