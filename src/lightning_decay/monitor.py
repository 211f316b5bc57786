"""``WeightNormMonitor``: log what weight decay does to each layer, at the cost of one host copy per log.

The callback is thin glue around :mod:`lightning_decay.norms`: it decides when to measure, keeps the
per-bucket index tensors, and hands the numbers to every logger the way ``LearningRateMonitor`` does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_decay import norms as K
from lightning_decay.rules import DecayRules

__all__ = ["WeightNormMonitor"]

_GRANULARITIES = ("param", "module")
_TOTALS = ("total", "decay_total", "no_decay_total")


@dataclass
class _Subset:
    """Index tensors (built once, cached) mapping a list of parameter positions to buckets."""

    idx: Tensor  # positions into the layout's parameters
    members: Tensor  # positions into the subset that belong to a bucket
    buckets: Tensor  # compact bucket id of each member
    names: list[str]  # compact bucket id -> bucket name


@dataclass
class _Layout:
    """Everything about the monitored parameters that only changes when the optimizers change."""

    params: list[Tensor]
    names: list[str]
    bucket_names: list[str]
    bucket_of: list[int | None]
    opt_indices: dict[int, list[int]]
    device: torch.device
    dtype: torch.dtype
    sharded: bool
    contrib: Tensor | None
    decay_group: Tensor
    has_group: tuple[bool, bool]
    local_numel: Tensor
    global_numel: Tensor
    signature: tuple[Any, ...]
    subsets: dict[tuple[int, ...], _Subset] = field(default_factory=dict)

    def subset(self, positions: tuple[int, ...]) -> _Subset:
        cached = self.subsets.get(positions)
        if cached is None:
            compact: dict[int, int] = {}
            members, buckets = [], []
            for j, i in enumerate(positions):
                b = self.bucket_of[i]
                if b is not None:
                    members.append(j)
                    buckets.append(compact.setdefault(b, len(compact)))
            cached = _Subset(
                idx=torch.tensor(positions, dtype=torch.long, device=self.device),
                members=torch.tensor(members, dtype=torch.long, device=self.device),
                buckets=torch.tensor(buckets, dtype=torch.long, device=self.device),
                names=[self.bucket_names[b] for b in compact],
            )
            self.subsets[positions] = cached
        return cached


@dataclass
class _Pending:
    """What a logging step has gathered between ``on_before_optimizer_step`` and ``on_train_batch_end``."""

    batch: int
    step: int
    seen: set[int] = field(default_factory=set)
    grad_idx: list[int] = field(default_factory=list)
    grad_parts: list[Tensor] = field(default_factory=list)
    snap_idx: list[int] = field(default_factory=list)
    snapshots: list[Tensor] = field(default_factory=list)


class WeightNormMonitor(Callback):
    r"""Log weight norms (and optionally gradient norms, update ratios, sparsity) to every logger.

    On each logging step it logs, per parameter tensor (default), per module (``granularity="module"``)
    or per regex-defined block (``blocks=``):

    - ``weight_norm/{name}``: the ``norm_type`` norm of the weights after the optimizer step, plus
      ``weight_norm/total``, ``weight_norm/decay_total`` and ``weight_norm/no_decay_total`` (the two
      groups of the :class:`~lightning_decay.DecayRules` plan; a total is left out if its group is empty);
    - ``grad_norm/{name}`` and ``grad_norm/total`` (``log_grad_norm=True``): gradients as Lightning's
      ``grad_norm`` sees them in ``on_before_optimizer_step``: unscaled by AMP, before clipping. Fused
      optimizers under a ``GradScaler`` still hold scaled gradients there; they are divided by the scale.
      Parameters without a gradient that step (frozen, unused) are skipped;
    - ``update_ratio/{name}`` (``log_update_ratio=True``): ``||w_after - w_before||_2 / ||w_before||_2``
      over the optimizer step (about ``1e-3`` is the usual rule of thumb). The weights are snapshotted
      (one foreach copy) only on logging steps, right before the step;
    - ``angular_update/{name}`` (``log_angular_update=True``): the angle in radians between ``w_before``
      and ``w_after``, ``arccos`` of their cosine similarity clamped to ``[-1, 1]``, computed in float64.
      For weights followed by a normalization layer the loss is scale invariant, so this angle *is* the
      effective learning rate; under weight decay it settles at an equilibrium, about
      ``sqrt(2 * lr * weight_decay)`` for plain SGD (Kosson et al., "Rotational equilibrium"). The cosine
      comes from ``||w_before||``, ``||w_after||`` and ``||Δw||`` (foreach norms that add up across
      shards, no per-tensor dot product); ``Δw`` is exact in the weights' dtype unless an entry changes
      by more than 2x, so the cosine is off by at most ``eps * ||Δw||^2 / (2 ||w_before|| ||w_after||)``;
    - ``sparsity/{name}`` (``log_sparsity=True``): the fraction of entries exactly equal to zero;
    - TensorBoard histograms ``weight_hist/{name}`` of the weights (``log_histograms=True``), through
      ``add_histogram`` of each ``TensorBoardLogger``. These copy every weight to the host: use sparingly.

    ``/`` above stands for ``group_separator``. Names are the cleaned parameter names
    (:func:`~lightning_decay.clean_param_name`); a tied parameter is measured once, under its first name.
    Update ratios and angles are always Euclidean; ``norm_type`` applies to weight and gradient norms.

    **When and with which step.** A step logs when ``trainer._logger_connector.should_update_logs`` is
    true (``log_every_n_steps``), or every ``logging_interval`` optimizer steps when that is given. The
    decision is taken in ``on_before_optimizer_step``, which fires once per real optimizer step (after
    AMP unscaling and before clipping; with gradient accumulation only on the stepping micro-batch).
    Gradients and the snapshot are taken there; the weight metrics in ``on_train_batch_end``, after the
    step. The step label is ``trainer.fit_loop.epoch_loop._batches_that_stepped`` read in that hook, the
    same label Lightning gives to ``self.log`` metrics of that batch. With automatic optimization that
    label ``s`` equals ``trainer.global_step`` *before* the step, so the weights logged at ``s`` are those
    of ``global_step == s + 1``: the checkpoint ``ModelCheckpoint(every_n_train_steps=k)`` writes as
    ``step={s + 1}``. With ``log_every_n_steps=k`` the labels are ``k - 1, 2k - 1, ...`` and match the
    checkpoints ``step=k, 2k, ...``. With several optimizers (manual optimization) the label still counts
    batches, while ``global_step`` counts every optimizer's steps; each optimizer's gradients and
    snapshot are taken in its own ``on_before_optimizer_step``. Nothing is computed on other steps.

    **Cost.** One ``torch._foreach_norm`` per (device, dtype) group and quantity, on-device aggregation
    into buckets with index tensors built once, and exactly one device-to-host copy per logging step (all
    scalars stacked). Parameter lists are rebuilt only when the optimizers' parameter groups change.

    **Sharded parameters.** DTensor parameters (FSDP2 ``fully_shard``, tensor parallel) are measured on
    their local shards and the partial results of the step are reduced with one ``all_reduce`` over the
    default process group (two when ``norm_type=inf`` is combined with the Euclidean extras), so the
    logged norm is that of the full parameter. Replicated parameters (DDP, ``Replicate`` placements) are
    counted once and need no reduction. Every rank must run the callback (Lightning does that); only the
    loggers are rank-zero-only.

    **Frozen parameters.** By default only parameters with ``requires_grad=True`` when the parameter lists
    are built are monitored; ``include_frozen=True`` adds the weight norms, sparsity and histograms of
    frozen ones. Gradient norms and updates never include them (they have no gradient, no step). Lists are
    rebuilt when a param group is added (``BaseFinetuning`` unfreezing), not when only ``requires_grad``
    changes.

    **Non-finite values.** A NaN or Inf norm is logged as it is and reported once per parameter by a
    warning naming it; training goes on. (Gradient norms are not reported under a ``GradScaler``, where
    overflowing steps are routine and skipped.)

    Args:
        norm_type: ``1``, ``2`` (default) or ``inf`` / ``"inf"``.
        granularity: ``"param"`` (default, one value per parameter tensor) or ``"module"`` (one value per
            module owning parameters directly, named by its path).
        blocks: Block name -> regular expression (``re.search`` on the cleaned parameter name; first match
            wins, in mapping order). Parameters matching no block count only in the totals. Exclusive
            with ``granularity="module"``.
        rules: The :class:`~lightning_decay.DecayRules` that split the decay / no-decay totals; default
            ``DecayRules()``. Use the same rules as the optimizer's groups.
        logging_interval: Log every this many optimizer steps; ``None`` (default) follows the Trainer's
            ``log_every_n_steps``.
        log_grad_norm: Also log gradient norms.
        log_update_ratio: Also log ``||Δw|| / ||w||`` of the step.
        log_angular_update: Also log the angle between the weights before and after the step.
        log_sparsity: Also log the fraction of exact zeros.
        log_histograms: Also log TensorBoard weight histograms.
        include_frozen: Also monitor the weights of parameters with ``requires_grad=False``.
        group_separator: Separator between the metric and the name, ``"/"`` as in Lightning's ``grad_norm``.

    Raises:
        ValueError: If an argument has a value outside those listed above, naming it.
        TypeError: If an argument has the wrong type.
        MisconfigurationException: At ``setup``, if the Trainer has no logger.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_decay import WeightNormMonitor
        >>> monitor = WeightNormMonitor(granularity="module", log_update_ratio=True)
        >>> trainer = Trainer(callbacks=[monitor], log_every_n_steps=50)  # doctest: +SKIP
    """

    def __init__(
        self,
        norm_type: float | int | str = 2,
        granularity: str = "param",
        blocks: Mapping[str, str | re.Pattern[str]] | None = None,
        rules: DecayRules | None = None,
        logging_interval: int | None = None,
        log_grad_norm: bool = False,
        log_update_ratio: bool = False,
        log_angular_update: bool = False,
        log_sparsity: bool = False,
        log_histograms: bool = False,
        include_frozen: bool = False,
        group_separator: str = "/",
    ) -> None:
        self.norm_type = K.parse_norm_type(norm_type)
        if granularity not in _GRANULARITIES:
            raise ValueError(f"`granularity` must be one of {list(_GRANULARITIES)}, got {granularity!r}")
        if blocks is not None and granularity != "param":
            raise ValueError("`blocks` and `granularity='module'` exclude each other: give one of them")
        self.granularity = granularity
        self.blocks = _compile_blocks(blocks)
        if rules is not None and not isinstance(rules, DecayRules):
            raise TypeError(f"`rules` must be a lightning_decay.DecayRules or None, got {type(rules).__name__}")
        self.rules = rules if rules is not None else DecayRules()
        if logging_interval is not None and (
            isinstance(logging_interval, bool) or not isinstance(logging_interval, int) or logging_interval < 1
        ):
            raise ValueError(f"`logging_interval` must be a positive int or None, got {logging_interval!r}")
        self.logging_interval = logging_interval
        flags = {
            "log_grad_norm": log_grad_norm,
            "log_update_ratio": log_update_ratio,
            "log_angular_update": log_angular_update,
            "log_sparsity": log_sparsity,
            "log_histograms": log_histograms,
            "include_frozen": include_frozen,
        }
        for flag, value in flags.items():
            if not isinstance(value, bool):
                raise TypeError(f"`{flag}` must be True or False, got {value!r}")
        self.log_grad_norm = log_grad_norm
        self.log_update_ratio = log_update_ratio
        self.log_angular_update = log_angular_update
        self.log_sparsity = log_sparsity
        self.log_histograms = log_histograms
        self.include_frozen = include_frozen
        if not isinstance(group_separator, str) or not group_separator:
            raise ValueError(f"`group_separator` must be a non-empty string, got {group_separator!r}")
        self.group_separator = group_separator

        self._layout: _Layout | None = None
        self._pending: _Pending | None = None
        self._decided_batch: int | None = None
        self._warned: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `WeightNormMonitor` callback with a Trainer that has no logger (`logger=False`)."
            )
        if self.log_grad_norm and type(trainer.strategy).__name__.startswith("DeepSpeed"):
            rank_zero_warn(
                "WeightNormMonitor(log_grad_norm=True) under DeepSpeed: `p.grad` is not the real gradient "
                "there (ZeRO partitions it), so grad norms are not meaningful."
            )
        # Parameters may still be replaced (configure_model, sharding): lists are built at the first log.
        self._layout = None
        self._pending = None
        self._decided_batch = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        loop = trainer.fit_loop.epoch_loop
        batch = loop.batch_progress.total.ready
        if self._decided_batch != batch:
            # First optimizer of this batch: decide once, so every optimizer of a batch agrees.
            self._decided_batch = batch
            self._pending = None
            if self._is_logging_step(trainer):
                self._ensure_layout(trainer, pl_module)
                self._pending = _Pending(batch=batch, step=loop._batches_that_stepped)
        pending, layout = self._pending, self._layout
        if pending is None or layout is None:
            return
        # A parameter shared by two optimizers is measured with the first one that steps it.
        positions = [i for i in layout.opt_indices.get(id(optimizer), ()) if i not in pending.seen]
        pending.seen.update(positions)
        if not positions:
            return
        with torch.no_grad():
            if self.log_grad_norm:
                self._gather_grads(trainer, optimizer, layout, pending, positions)
            if self.log_update_ratio or self.log_angular_update:
                pending.snap_idx.extend(positions)
                pending.snapshots.extend(K.clone_tensors([K.local_tensor(layout.params[i]) for i in positions]))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pending, self._pending = self._pending, None
        if pending is None or self._layout is None:
            return
        if pending.batch != trainer.fit_loop.epoch_loop.batch_progress.total.ready:
            return  # stale: the batch that started it did not finish
        with torch.no_grad():
            self._log_step(trainer, self._layout, pending)

    # ---------------------------------------------------------------- helpers
    def _is_logging_step(self, trainer: pl.Trainer) -> bool:
        if not trainer.loggers:
            return False
        if self.logging_interval is None:
            return trainer._logger_connector.should_update_logs
        return (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % self.logging_interval == 0

    def _ensure_layout(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        signature = _optimizer_signature(trainer)
        if self._layout is None or self._layout.signature != signature:
            self._layout = self._build_layout(trainer, pl_module, signature)

    def _build_layout(self, trainer: pl.Trainer, pl_module: pl.LightningModule, signature: tuple[Any, ...]) -> _Layout:
        plan = self.rules.classify(pl_module, include_frozen=True)
        decisions = [d for d in plan if self.include_frozen or d.param.requires_grad]
        params = [d.param for d in decisions]
        names = [d.name for d in decisions]
        bucket_names: list[str] = []
        bucket_ids: dict[str, int] = {}
        bucket_of: list[int | None] = []
        for d in decisions:
            bucket = self._bucket_name(d.name, d.aliases)
            if bucket is None:
                bucket_of.append(None)
            else:
                if bucket not in bucket_ids:
                    bucket_ids[bucket] = len(bucket_names)
                    bucket_names.append(bucket)
                bucket_of.append(bucket_ids[bucket])

        position = {id(p): i for i, p in enumerate(params)}
        opt_indices: dict[int, list[int]] = {}
        for opt in trainer.optimizers:
            seen: dict[int, None] = {}
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in position:
                        seen.setdefault(position[id(p)])
            opt_indices[id(opt)] = list(seen)

        device = trainer.strategy.root_device
        dtype = K.wide_dtype(device)
        sharded = any(K.is_sharded(p) for p in params)
        contrib = None
        if sharded:
            contrib = torch.tensor([K.contributes_to_sum(p) for p in params], dtype=torch.bool, device=device)
        decay_flags = [plan.is_decayed(p) for p in params]
        return _Layout(
            params=params,
            names=names,
            bucket_names=bucket_names,
            bucket_of=bucket_of,
            opt_indices=opt_indices,
            device=device,
            dtype=dtype,
            sharded=sharded,
            contrib=contrib,
            decay_group=torch.tensor([0 if f else 1 for f in decay_flags], dtype=torch.long, device=device),
            has_group=(any(decay_flags), not all(decay_flags)),
            local_numel=torch.tensor([K.local_tensor(p).numel() for p in params], dtype=dtype, device=device),
            global_numel=torch.tensor([p.numel() for p in params], dtype=dtype, device=device),
            signature=signature,
        )

    def _bucket_name(self, name: str, aliases: tuple[str, ...]) -> str | None:
        if self.blocks is not None:
            for block, pattern in self.blocks.items():
                if any(pattern.search(n) for n in (name, *aliases)):
                    return block
            return None
        if self.granularity == "module":
            owner = name.rpartition(".")[0]
            return owner or name  # a parameter of the root module stands for itself
        return name

    def _gather_grads(
        self,
        trainer: pl.Trainer,
        optimizer: Optimizer,
        layout: _Layout,
        pending: _Pending,
        positions: list[int],
    ) -> None:
        present = [(i, layout.params[i].grad) for i in positions if layout.params[i].grad is not None]
        if not present:
            return
        grads = [K.local_tensor(g) for _, g in present]
        parts = K.partials(grads, self.norm_type, dtype=layout.dtype, device=layout.device)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None)
        if scale is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Fused optimizers unscale inside ``step``: the grads seen here are still multiplied by the
            # scale. Divide on the device (no ``.item()``); p=2 partials are squares.
            inv = scale.reshape(()).to(device=layout.device, dtype=layout.dtype).reciprocal()
            parts = parts * (inv.square() if self.norm_type == 2 else inv)
        pending.grad_idx.extend(i for i, _ in present)
        pending.grad_parts.append(parts)

    def _log_step(self, trainer: pl.Trainer, layout: _Layout, pending: _Pending) -> None:
        p, dev, dtype = self.norm_type, layout.device, layout.dtype
        weights = [K.local_tensor(t) for t in layout.params]
        n = len(weights)

        # 1. Local partials, each with the positions of its parameters (for replica masks).
        pieces: dict[str, tuple[Tensor, Tensor | None, str]] = {}
        pieces["w"] = (K.partials(weights, p, dtype=dtype, device=dev), None, K.reduce_op(p))
        if pending.grad_parts:
            gsub = layout.subset(tuple(pending.grad_idx))
            pieces["g"] = (torch.cat(pending.grad_parts), gsub.idx, K.reduce_op(p))
        if pending.snapshots:
            usub = layout.subset(tuple(pending.snap_idx))
            after = [weights[i] for i in pending.snap_idx]
            delta = K.sub_tensors(after, pending.snapshots)
            pieces["a2"] = (K.partials(pending.snapshots, 2, dtype=dtype, device=dev), usub.idx, "sum")
            pieces["b2"] = (K.partials(after, 2, dtype=dtype, device=dev), usub.idx, "sum")
            pieces["d2"] = (K.partials(delta, 2, dtype=dtype, device=dev), usub.idx, "sum")
        if self.log_sparsity:
            nonzero = K.grouped_norms(weights, 0, dtype=dtype, device=dev)
            pieces["zeros"] = (layout.local_numel - nonzero, None, "sum")

        # 2. One reduction across shards, only when some parameter is sharded.
        if layout.sharded:
            pieces = _reduce_pieces(pieces, layout)
        values = {k: v for k, (v, _, _) in pieces.items()}

        # 3. Combine into buckets and finalize, on the device; collect (keys, tensors).
        sep = self.group_separator
        keys: list[str] = []
        outs: list[Tensor] = []

        def emit(metric: str, names: list[str], tensor: Tensor) -> None:
            keys.extend(f"{metric}{sep}{name}" for name in names)
            outs.append(tensor.reshape(-1).to(dtype))

        w = values["w"]
        # Per-parameter norms first, for the non-finite report (not logged under these names).
        outs.append(K.finalize_partials(w, p))
        grad_per_param: Tensor | None = None
        if "g" in values:
            grad_per_param = K.finalize_partials(values["g"], p)
            outs.append(grad_per_param)
        wsub = layout.subset(tuple(range(n)))
        emit("weight_norm", wsub.names, self._bucketed(w, wsub))
        emit("weight_norm", ["total"], K.finalize_partials(K.combine_partials(w, _zeros_like_idx(w), 1, p), p))
        groups = K.finalize_partials(K.combine_partials(w, layout.decay_group, 2, p), p)
        for g, name in enumerate(("decay_total", "no_decay_total")):
            if layout.has_group[g]:
                emit("weight_norm", [name], groups[g])

        if "g" in values:
            g_parts = values["g"]
            emit("grad_norm", gsub.names, self._bucketed(g_parts, gsub))
            total = K.combine_partials(g_parts, _zeros_like_idx(g_parts), 1, p)
            emit("grad_norm", ["total"], K.finalize_partials(total, p))

        if "a2" in values:
            size = len(usub.names)
            a2, b2, d2 = (
                K.combine_partials(values[k][usub.members], usub.buckets, size, 2) for k in ("a2", "b2", "d2")
            )
            if self.log_update_ratio:
                emit("update_ratio", usub.names, d2.sqrt() / a2.sqrt())
            if self.log_angular_update:
                cos = (a2 + b2 - d2) / (2 * (a2 * b2).sqrt())
                emit("angular_update", usub.names, torch.arccos(cos.clamp(-1.0, 1.0)))

        if "zeros" in values:
            zeros = K.combine_partials(values["zeros"][wsub.members], wsub.buckets, len(wsub.names), 1)
            numel = K.combine_partials(layout.global_numel[wsub.members], wsub.buckets, len(wsub.names), 1)
            emit("sparsity", wsub.names, zeros / numel)

        # 4. The one device-to-host copy of the step.
        host = torch.cat(outs).tolist()
        w_host, host = host[:n], host[n:]
        g_host: list[float] = []
        if grad_per_param is not None:
            g_host, host = host[: len(pending.grad_idx)], host[len(pending.grad_idx) :]
        metrics = dict(zip(keys, host, strict=True))

        self._report_non_finite("weight", layout.names, w_host, pending.step)
        if g_host and getattr(trainer.precision_plugin, "scaler", None) is None:
            self._report_non_finite("gradient", [layout.names[i] for i in pending.grad_idx], g_host, pending.step)

        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=pending.step)
        if self.log_histograms:
            self._log_histograms(trainer, layout, pending.step)

    def _bucketed(self, partial: Tensor, subset: _Subset) -> Tensor:
        if self.granularity == "param" and self.blocks is None:
            return K.finalize_partials(partial, self.norm_type)  # buckets are the parameters
        combined = K.combine_partials(partial[subset.members], subset.buckets, len(subset.names), self.norm_type)
        return K.finalize_partials(combined, self.norm_type)

    def _report_non_finite(self, what: str, names: list[str], values: list[float], step: int) -> None:
        for name, value in zip(names, values, strict=True):
            if not math.isfinite(value) and (what, name) not in self._warned:
                self._warned.add((what, name))
                rank_zero_warn(
                    f"WeightNormMonitor: the {what} norm of parameter {name!r} is {value} at step {step}. "
                    "It is logged as is; this warning is shown once per parameter."
                )

    def _log_histograms(self, trainer: pl.Trainer, layout: _Layout, step: int) -> None:
        tb_loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not tb_loggers:
            return
        members: dict[int, list[Tensor]] = {}
        for param, bucket in zip(layout.params, layout.bucket_of, strict=True):
            if bucket is not None:
                members.setdefault(bucket, []).append(param)
        for bucket, params in members.items():
            # ``full_tensor`` is a collective: every rank gathers, only rank zero's logger writes.
            flat = [(t.full_tensor() if K.is_sharded(t) else t).detach().reshape(-1) for t in params]
            values = torch.cat(flat).float().cpu()
            tag = f"weight_hist{self.group_separator}{layout.bucket_names[bucket]}"
            for logger in tb_loggers:
                logger.experiment.add_histogram(tag, values, step)


def _compile_blocks(blocks: Mapping[str, str | re.Pattern[str]] | None) -> dict[str, re.Pattern[str]] | None:
    if blocks is None:
        return None
    if not isinstance(blocks, Mapping) or not blocks:
        raise ValueError(f"`blocks` must be a non-empty mapping of block name -> regex, got {blocks!r}")
    compiled: dict[str, re.Pattern[str]] = {}
    for name, pattern in blocks.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"`blocks` names must be non-empty strings, got {name!r}")
        if name in _TOTALS:
            raise ValueError(f"`blocks` name {name!r} is reserved for the totals {list(_TOTALS)}")
        try:
            compiled[name] = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"`blocks[{name!r}]` is not a valid regular expression: {pattern!r} ({err})") from err
    return compiled


def _optimizer_signature(trainer: pl.Trainer) -> tuple[Any, ...]:
    # O(param groups), not O(params): enough to notice BaseFinetuning adding a group.
    return tuple((id(opt), tuple(len(g["params"]) for g in opt.param_groups)) for opt in trainer.optimizers)


def _zeros_like_idx(values: Tensor) -> Tensor:
    return torch.zeros(values.shape[0], dtype=torch.long, device=values.device)


def _reduce_pieces(
    pieces: dict[str, tuple[Tensor, Tensor | None, str]], layout: _Layout
) -> dict[str, tuple[Tensor, Tensor | None, str]]:
    """All-reduce every piece at once: one SUM vector (replicas masked out) and, for p=inf, one MAX vector."""
    assert layout.contrib is not None
    by_op: dict[str, list[str]] = {"sum": [], "max": []}
    for key, (_, _, op) in pieces.items():
        by_op[op].append(key)
    out = dict(pieces)
    stacks: dict[str, Tensor | None] = {}
    for op, keys in by_op.items():
        if not keys:
            stacks[op] = None
            continue
        parts = []
        for key in keys:
            value, idx, _ = pieces[key]
            if op == "sum":
                mask = layout.contrib if idx is None else layout.contrib[idx]
                # ``where``, not a product: 0 * inf would turn an Inf norm into NaN.
                value = torch.where(mask, value, torch.zeros_like(value))
            parts.append(value)
        stacks[op] = torch.cat(parts)
    K.all_reduce_partials(stacks["sum"], stacks["max"])
    for op, keys in by_op.items():
        stack = stacks[op]
        if stack is None:
            continue
        sizes = [pieces[k][0].numel() for k in keys]
        for key, value in zip(keys, stack.split(sizes), strict=True):
            out[key] = (value, pieces[key][1], op)
    return out
