"""``WeightNormMonitor``: log what weight decay does to each layer, at the cost of one host copy per log.

The callback is thin glue around `lightning_decay.norms`: it decides when to measure, keeps the layout
of the parameters (``lightning_decay._monitor_layout``: buckets and index tensors, built once), and hands
the numbers to every logger the way ``LearningRateMonitor`` does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_decay import norms as K
from lightning_decay._checks import check_choice, check_flag
from lightning_decay._compat import (
    HISTOGRAM_LOGGERS,
    TENSORBOARD_LOGGERS,
    WANDB_LOGGERS,
    Callback,
    MisconfigurationException,
    is_deepspeed,
    pl,
    rank_zero_warn,
)
from lightning_decay._monitor_layout import Layout, Pending, Subset, build_layout, optimizer_signature, reduce_pieces
from lightning_decay._plan_cache import plan_for
from lightning_decay._repr import ArgumentsRepr
from lightning_decay._tb_layout import custom_scalars_layout, depth_key
from lightning_decay.names import clean_names
from lightning_decay.plan import few_names
from lightning_decay.rules import DecayRules, as_rules, module_rules

if TYPE_CHECKING:
    from lightning_decay._attach import Attachment

__all__ = ["WeightNormMonitor"]

_GRANULARITIES = ("param", "module")
_TOTALS = ("total", "decay_total", "no_decay_total")


class WeightNormMonitor(ArgumentsRepr, Callback):
    r"""Log weight norms (and optionally gradient norms, update ratios, sparsity) to every logger.

    On each logging step it logs, per parameter tensor (default), per module (``granularity="module"``)
    or per regex-defined block (``blocks=``):

    - ``weight_norm/{name}``: the ``norm_type`` norm of the weights after the optimizer step, plus
      ``weight_norm/total``, ``weight_norm/decay_total`` and ``weight_norm/no_decay_total`` (the two
      groups of the [`DecayRules`][lightning_decay.DecayRules] plan; a total is left out if its group is
      empty);
    - ``grad_norm/{name}`` and ``grad_norm/total`` (``log_grad_norm=True``): gradients as Lightning's
      ``grad_norm`` sees them in ``on_before_optimizer_step``: unscaled by AMP, before clipping. Fused
      optimizers under a ``GradScaler`` still hold scaled gradients there; they are divided by the scale.
      Parameters without a gradient that step (frozen, unused) are skipped;
    - ``update_ratio/{name}`` (``log_update_ratio=True``): ``||w_after - w_before||_2 / ||w_before||_2``
      over the optimizer step (about ``1e-3`` is the usual rule of thumb). The weights are snapshotted
      (one foreach copy) only on logging steps, right before the step. Where ``w_before`` is zero (a
      LayerNorm bias at init, a weight pruned by proximal L1) the ratio is 0 if the tensor stays zero
      and 1 if it moves (all of ``w_after`` is update), never ``inf`` or ``NaN``;
    - ``angular_update/{name}`` (``log_angular_update=True``): the angle in radians between ``w_before``
      and ``w_after``, ``arccos`` of their cosine similarity clamped to ``[-1, 1]``, computed in float64.
      For weights followed by a normalization layer the loss is scale invariant, so this angle *is* the
      effective learning rate; under weight decay it settles at an equilibrium, about
      ``sqrt(2 * lr * weight_decay)`` for plain SGD (Kosson et al., "Rotational equilibrium"). The cosine
      comes from ``||w_before||``, ``||w_after||`` and ``||Δw||`` (foreach norms that add up across
      shards, no per-tensor dot product); ``Δw`` is exact in the weights' dtype unless an entry changes
      by more than 2x, so the cosine is off by at most ``eps * ||Δw||^2 / (2 ||w_before|| ||w_after||)``.
      A zero vector has no direction: the angle is 0 when ``w_before`` or ``w_after`` is zero;
    - ``sparsity/{name}`` (``log_sparsity=True``): the fraction of entries exactly equal to zero;
    - histograms ``weight_hist/{name}`` of the weights (``log_histograms=True``), through ``add_histogram`` of
      each ``TensorBoardLogger`` and as a ``wandb.Histogram`` to each ``WandbLogger`` (at the scalars'
      ``trainer/global_step``); other loggers take none, and a monitor without a logger that does warns once.
      These copy every weight to the host: use sparingly.

    With a ``TensorBoardLogger`` it also writes, once when training starts, a layout for TensorBoard's
    *Custom Scalars* tab ([`custom_scalars`][lightning_decay.WeightNormMonitor.custom_scalars]): one
    category per metric family, a chart per total, then per block or depth of the model, in model order,
    the decayed tensors and the others in separate charts (``blocks.3 · decayed``, ``blocks.3 · not decayed``).

    ``/`` above stands for ``group_separator``. Names are the cleaned parameter names
    ([`clean_names`][lightning_decay.clean_names]); a tied parameter is measured once, under its first name.
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
        rules: The [`DecayRules`][lightning_decay.DecayRules] that split the decay / no-decay totals;
            default: the LightningModule's ``decay_rules`` (``DecayGroupsMixin``), else ``DecayRules()``, so
            the totals follow the optimizer's groups.
        logging_interval: Log every this many optimizer steps; ``None`` (default) follows the Trainer's
            ``log_every_n_steps``.
        log_grad_norm: Also log gradient norms.
        log_update_ratio: Also log ``||Δw|| / ||w||`` of the step.
        log_angular_update: Also log the angle between the weights before and after the step.
        log_sparsity: Also log the fraction of exact zeros.
        log_histograms: Also log weight histograms, to TensorBoard and Weights & Biases loggers (a warning
            when there is neither).
        include_frozen: Also monitor the weights of parameters with ``requires_grad=False``.
        group_separator: Separator between the metric and the name, ``"/"`` as in Lightning's ``grad_norm``.

    Raises:
        ValueError: If an argument has a value outside those listed above, naming it.
        TypeError: If an argument has the wrong type.
        MisconfigurationException: At ``setup``, if the Trainer has no logger.

    Examples:
        ```python
        from lightning.pytorch import Trainer
        from lightning_decay import WeightNormMonitor

        monitor = WeightNormMonitor(granularity="module", log_update_ratio=True)
        trainer = Trainer(callbacks=[monitor], log_every_n_steps=50)
        ```
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
        check_choice(granularity, list(_GRANULARITIES), "granularity")
        if blocks is not None and granularity != "param":
            raise ValueError("`blocks` and `granularity='module'` exclude each other: give one of them")
        self.granularity = granularity
        self.blocks = _compile_blocks(blocks)
        self.rules = as_rules(rules)
        self._given_rules = rules  # None: the LightningModule's `decay_rules` at setup, else the defaults
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
            check_flag(value, flag)
        self.log_grad_norm = log_grad_norm
        self.log_update_ratio = log_update_ratio
        self.log_angular_update = log_angular_update
        self.log_sparsity = log_sparsity
        self.log_histograms = log_histograms
        self.include_frozen = include_frozen
        if not isinstance(group_separator, str) or not group_separator:
            raise ValueError(f"`group_separator` must be a non-empty string, got {group_separator!r}")
        self.group_separator = group_separator

        self._layout: Layout | None = None
        self._pending: Pending | None = None
        self._decided_batch: int | None = None
        self._warned: set[tuple[str, str]] = set()
        self._custom_scalars_written: set[int] = set()  # id() of the SummaryWriters that have the layout
        self._standalone: Any = None  # what `attach` gives the hooks in place of a Trainer
        self._attachment: Any = None  # the live `Attachment`, whose `remove()` takes the hooks off

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._attachment is not None:  # attached before (Fabric, plain PyTorch): the Trainer takes it over
            self._attachment.remove()
        self.rules = module_rules(pl_module, self._given_rules)
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `WeightNormMonitor` callback with a Trainer that has no logger (`logger=False`)."
            )
        self.check_histogram_loggers(trainer.loggers)
        if self.log_grad_norm and is_deepspeed(trainer.strategy):
            rank_zero_warn(
                "WeightNormMonitor(log_grad_norm=True) under DeepSpeed: `p.grad` is not the real gradient "
                "there (ZeRO partitions it), so grad norms are not meaningful."
            )
        # Parameters may still be replaced (configure_model, sharding): lists are built at the first log.
        self._layout = None
        self._pending = None
        self._decided_batch = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The Custom Scalars layout, once per SummaryWriter (TensorBoard reads one per run). Only the rank-0
        # logger has a real writer; the others' `experiment` ignores the call.
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TENSORBOARD_LOGGERS)]
        writers = [w for w in writers if id(w) not in self._custom_scalars_written]
        if not writers:
            return
        layout = self.custom_scalars(pl_module)
        for writer in writers:
            writer.add_custom_scalars(layout)
            self._custom_scalars_written.add(id(writer))

    def attach(self, model: nn.Module, optimizers: Any, loggers: Any, scaler: Any = None) -> Attachment:
        """Monitor ``model`` without a Trainer (Fabric, plain PyTorch): the same hooks, run from the step hooks.

        Every ``logging_interval`` optimizer steps (50 if ``None``) the metrics go to ``loggers``
        (``fabric.loggers``, or any objects with ``log_metrics(metrics, step)``; a TensorBoard logger also
        gets the Custom Scalars layout and, when asked, the histograms), labelled with the number of steps
        before the one measured, as under a Trainer.

        Args:
            model: The model (a Fabric-wrapped one is unwrapped).
            optimizers: One optimizer or a sequence; a step of the last one ends a logging step.
            loggers: One logger or a list of them.
            scaler: The ``torch.amp.GradScaler`` stepping them, if any (found by itself under Fabric).

        Returns:
            An [`Attachment`][lightning_decay.Attachment]; ``remove()`` takes the hooks off.
        """
        from lightning_decay._attach import attach_monitor

        return attach_monitor(self, model, optimizers, loggers, scaler)

    def check_histogram_loggers(self, loggers: Any) -> None:
        """With ``log_histograms=True``, warn (once per monitor) when none of ``loggers`` takes histograms.

        Histograms go to TensorBoard (``add_histogram``) and Weights & Biases (``wandb.Histogram``) loggers;
        others (CSV, MLflow...) get the scalars only. Called at ``setup`` and by ``attach``.
        """
        if not self.log_histograms or any(isinstance(lg, HISTOGRAM_LOGGERS) for lg in loggers):
            return
        if ("histograms", "") not in self._warned:
            self._warned.add(("histograms", ""))
            names = ", ".join(type(lg).__name__ for lg in loggers) or "none"
            rank_zero_warn(
                f"WeightNormMonitor(log_histograms=True) has no logger that takes histograms (loggers: {names}): "
                "no histogram will be logged. Add a TensorBoardLogger or a WandbLogger, or set log_histograms=False."
            )

    def on_after_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Called by Fabric on the objects of ``Fabric(callbacks=...)`` after each optimizer step (no Trainer
        hook has this name). A monitor that is not attached would silently log nothing there: refused."""
        if self._standalone is None:
            raise MisconfigurationException(
                "WeightNormMonitor was given to Fabric(callbacks=...), which calls only the hooks your loop names: "
                "as a Fabric callback it logs nothing. Attach it instead, after `fabric.setup`: "
                "`WeightNormMonitor(logging_interval=...).attach(model, optimizer, fabric.loggers)` (see the "
                "'Fabric and plain PyTorch' docs page)."
            )

    def custom_scalars(self, module: nn.Module) -> dict[str, dict[str, list[Any]]]:
        """The TensorBoard Custom Scalars layout of this monitor's metrics for ``module``.

        One category per metric family logged (``weight_norm``, then ``grad_norm``, ``update_ratio``,
        ``angular_update``, ``sparsity`` when asked). In each, a chart per total first (``totals · all``,
        ``totals · decayed``, ``totals · not decayed``), then the names grouped up to their first numbered
        component (``blocks.3``, ``encoder.layers.0``), else by owner module, in model order, and split by
        the plan's decision: ``blocks.3 · decayed`` and ``blocks.3 · not decayed`` (a bias never shares
        a chart and a y-axis with its weight matrix). A module or block that holds both kinds
        (``granularity="module"``, ``blocks=``) is drawn under ``· decayed + not decayed``. A tied tensor
        is drawn in the charts of each of its names. With ``blocks=``, the blocks are the charts'
        lines (``blocks · decayed``, ...). The monitor writes it to each ``TensorBoardLogger`` when
        training starts; every parameter of ``module`` is laid out, frozen ones included, so that a tensor
        unfrozen later has its place.

        Args:
            module: The model the monitor measures.

        Returns:
            ``{category: {chart: ["Multiline", [tag regex, ...]]}}``, as ``SummaryWriter.add_custom_scalars``
            takes it.
        """
        plan = plan_for(self.rules, module, include_frozen=True)
        positions: dict[str, int] = {}
        names = clean_names(module)  # the plan's names: wrappers found in the module tree
        for i, (name, _) in enumerate(module.named_parameters(remove_duplicate=False)):
            positions.setdefault(names.get(name, name), i)
        rows = []
        for d in plan:
            bucket = self._bucket_name(d.name, d.aliases)
            if bucket is None:
                continue
            for name in (d.name, *d.aliases):
                if self.blocks is not None:
                    chart = "blocks"
                elif self.granularity == "module":
                    chart = depth_key(name.rpartition(".")[0] or name, is_param=False)
                else:
                    chart = depth_key(name)
                rows.append((bucket, chart, positions.get(name, len(positions)), d.decay))
        flags = (self.log_grad_norm, self.log_update_ratio, self.log_angular_update, self.log_sparsity)
        optional = ("grad_norm", "update_ratio", "angular_update", "sparsity")
        families = ["weight_norm", *(f for f, on in zip(optional, flags, strict=True) if on)]
        totals = {"weight_norm": list(_TOTALS), "grad_norm": ["total"]}
        return custom_scalars_layout(families, rows, totals, self.group_separator)

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
                self._pending = Pending(batch=batch, step=loop._batches_that_stepped)
        pending, layout = self._pending, self._layout
        snapshot = self.log_update_ratio or self.log_angular_update
        if pending is None or layout is None or not (self.log_grad_norm or snapshot):
            return  # weight norms alone need nothing before the step
        # A parameter shared by two optimizers is measured with the first one that steps it.
        all_positions = layout.opt_indices.get(id(optimizer), [])
        first = not pending.seen  # the usual case: the optimizer's precomputed lists are used as they are
        positions = all_positions if first else [i for i in all_positions if i not in pending.seen]
        pending.seen.update(positions)
        if not positions:
            return
        whole = first and id(optimizer) in layout.whole
        with torch.no_grad():
            if self.log_grad_norm:
                self._gather_grads(trainer, optimizer, layout, pending, positions, whole)
            if snapshot and whole and layout.weight_groups is not None:
                # Every parameter, in layout order: one foreach copy of the split made at layout time.
                pending.snap_idx = list(layout.everything)
                pending.snap_sources = layout.params
                pending.snapshots = layout.weight_groups.clone()
                pending.snap_whole = True
            elif snapshot:
                if layout.weight_groups is None:  # DTensors: their local tensors
                    sources = [K.local_tensor(layout.params[i]) for i in positions]
                else:
                    sources = layout.opt_params[id(optimizer)] if first else [layout.params[i] for i in positions]
                pending.snap_idx.extend(positions)
                pending.snap_sources.extend(sources)
                pending.snapshots.extend(K.clone_tensors(sources))

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
        if self._layout is None or self._layout.signature != optimizer_signature(trainer.optimizers):
            # Frozen parameters are classified too; ``build_layout`` keeps them only with ``include_frozen``.
            plan = plan_for(self.rules, pl_module, include_frozen=True)
            device = trainer.strategy.root_device
            self._layout = build_layout(plan, trainer.optimizers, device, self._bucket_name, self.include_frozen)
            self._warn_empty_blocks(plan, self._layout)

    def _warn_empty_blocks(self, plan: Any, layout: Layout) -> None:
        """Warn once per ``blocks`` entry whose regex matches no monitored parameter (it is never logged)."""
        if self.blocks is None:
            return
        for block, pattern in self.blocks.items():
            if block not in layout.bucket_names and ("blocks", block) not in self._warned:
                self._warned.add(("blocks", block))
                rank_zero_warn(
                    f"WeightNormMonitor: `blocks[{block!r}]` ({pattern.pattern!r}) matches no monitored parameter, "
                    f"so it is never logged; the parameter names are {few_names([d.name for d in plan])}"
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
        layout: Layout,
        pending: Pending,
        positions: list[int],
        whole: bool = False,
    ) -> None:
        grads_whole = [p.grad for p in layout.params] if whole else None
        if grads_whole is not None and layout.weight_groups is not None and all(g is not None for g in grads_whole):
            # Every parameter has a gradient: the gradients mirror the parameters' split, no regrouping.
            present_idx: list[int] = list(layout.everything)
            grads: Any = layout.weight_groups.like(grads_whole)
            pending.grads_whole = True
        else:
            present = [(i, layout.params[i].grad) for i in positions if layout.params[i].grad is not None]
            if not present:
                return
            plain = layout.weight_groups is not None
            grads = [g for _, g in present] if plain else [K.local_tensor(g) for _, g in present]
            present_idx = [i for i, _ in present]
        # float32 kernels (fp16/bf16 widened to float32, as Lightning's ``grad_norm``), combined in float64.
        parts = K.partials(grads, self.norm_type, dtype=layout.dtype, device=layout.device, accumulate=torch.float32)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None)
        if scale is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Fused optimizers unscale inside ``step``: the grads seen here are still multiplied by the
            # scale. Divide on the device (no ``.item()``); p=2 partials are squares.
            inv = scale.reshape(()).to(device=layout.device, dtype=layout.dtype).reciprocal()
            parts = parts * (inv.square() if self.norm_type == 2 else inv)
        pending.grad_idx.extend(present_idx)
        pending.grad_parts.append(parts)

    def _log_step(self, trainer: pl.Trainer, layout: Layout, pending: Pending) -> None:
        p, dev, dtype = self.norm_type, layout.device, layout.dtype
        if layout.weight_groups is not None:  # no DTensor: the (device, dtype) split made at layout time
            weights, weight_groups = layout.params, layout.weight_groups
        else:
            weights = [K.local_tensor(t) for t in layout.params]
            weight_groups = K.TensorGroups(weights, dev)

        # 1. Local partials, each with the positions of its parameters (for replica masks). Weight and
        #    gradient norms run float32 kernels (fp16/bf16 widened to float32, float32 as it is; float64
        #    kernels are twice as slow on CPU) and are combined in ``dtype``.
        pieces: dict[str, tuple[Tensor, Tensor | None, str]] = {}
        identity = self.granularity == "param" and self.blocks is None  # the buckets are the parameters
        # With the angle over every parameter, p=2 weight norms are accumulated in ``dtype`` so that their
        # squares are the angle's ``||w_after||^2``: one pass over the weights instead of two.
        reuse_b2 = pending.snap_whole and p == 2
        w_acc = dtype if reuse_b2 and self.log_angular_update else torch.float32
        w_norms = weight_groups.norms(p, dtype=dtype, accumulate=w_acc)
        if layout.sharded or not identity:  # partials to reduce across shards, or to combine into buckets
            pieces["w"] = (w_norms.square() if p == 2 else w_norms, None, K.reduce_op(p))
        if pending.grad_parts:
            gsub = layout.subset_of_all() if pending.grads_whole else layout.subset(tuple(pending.grad_idx))
            pieces["g"] = (torch.cat(pending.grad_parts), gsub.idx, K.reduce_op(p))
        if pending.snapshots:
            # The angle needs the squares accumulated in ``dtype`` (float64): its cosine subtracts nearly
            # equal squares. The ratio alone does not, and a float64 kernel on CPU makes a float64 copy
            # of each float32 tensor it reduces (large tensors: of one slice at a time).
            acc = dtype if self.log_angular_update else torch.float32
            before: Any
            after: Any
            if pending.snap_whole and layout.weight_groups is not None:
                # Every parameter in layout order: the snapshot mirrors the parameters' split (no regrouping).
                usub = layout.subset_of_all()
                before, after = layout.weight_groups.like(pending.snapshots), layout.weight_groups
            else:
                usub = layout.subset(tuple(pending.snap_idx))
                plain = layout.weight_groups is not None
                before = pending.snapshots
                after = pending.snap_sources if plain else [weights[i] for i in pending.snap_idx]
            pieces["a2"] = (K.partials(before, 2, dtype=dtype, device=dev, accumulate=acc), usub.idx, "sum")
            b2 = w_norms.square() if reuse_b2 else K.partials(after, 2, dtype=dtype, device=dev, accumulate=acc)
            pieces["b2"] = (b2, usub.idx, "sum")
            # ``before - after`` in place into the snapshot, no second copy of the weights: it is ``-Δw``
            # exactly (IEEE subtraction is antisymmetric), so the same norm.
            if isinstance(before, K.TensorGroups):
                before.sub_(after)
            else:
                K.sub_tensors_(before, after)
            d2 = K.partials(before, 2, dtype=dtype, device=dev, accumulate=acc)
            pieces["d2"] = (d2, usub.idx, "sum")
            pending.snapshots.clear()  # the copy is no longer needed
        if self.log_sparsity:
            nonzero = weight_groups.norms(0, dtype=dtype)  # counted in ``dtype``: exact in float64
            pieces["zeros"] = (layout.local_numel - nonzero, None, "sum")

        # 2. One reduction across shards, only when some parameter is sharded.
        if layout.sharded:
            pieces = reduce_pieces(pieces, layout)
        values = {k: v for k, (v, _, _) in pieces.items()}

        # 3. Combine into buckets and finalize, on the device: the tensors, each with its metric keys
        #    (built once per layout, not per logging step) or ``None`` if only read here.
        sep = self.group_separator
        outs: list[Tensor] = []
        labels: list[list[str] | None] = []

        def emit(keys: list[str] | None, tensor: Tensor) -> int:
            if tensor.dtype != dtype or tensor.dim() != 1:  # (attribute reads are cheaper than no-op calls)
                tensor = tensor.reshape(-1).to(dtype)
            outs.append(tensor)
            labels.append(keys)
            return len(outs) - 1

        wsub = layout.subset_of_all()
        if layout.sharded:
            w_norms = K.finalize_partials(values["w"], p)  # of the reduced partials
        # Per-parameter norms, for the non-finite report; logged as they are when buckets are parameters.
        w_at = emit(wsub.metric_keys("weight_norm", sep) if identity else None, w_norms)
        if not identity:
            emit(wsub.metric_keys("weight_norm", sep), self._bucketed(values["w"], wsub))
        # total, decay_total, no_decay_total: the norm of the per-parameter norms of each row of the mask
        emit(layout.total_keys("weight_norm", sep), K.masked_norms(w_norms, layout.total_mask, p, layout.zero))

        g_at: int | None = None
        if "g" in values:
            g_parts = values["g"]
            g_keys = gsub.metric_keys("grad_norm", sep)
            g_at = emit(g_keys if identity else None, K.finalize_partials(g_parts, p))
            if not identity:
                emit(g_keys, self._bucketed(g_parts, gsub))
            emit([f"grad_norm{sep}total"], K.finalize_partials(K.combine_all_partials(g_parts, p), p))

        if "a2" in values:
            size = len(usub.names)
            if identity:  # one bucket per parameter, in the subset's order: nothing to combine
                a2, b2, d2 = values["a2"], values["b2"], values["d2"]
            else:
                a2, b2, d2 = (
                    K.combine_partials(values[k][usub.members], usub.buckets, size, 2) for k in ("a2", "b2", "d2")
                )
            if self.log_update_ratio:
                emit(usub.metric_keys("update_ratio", sep), K.update_ratios(a2, d2))
            if self.log_angular_update:
                emit(usub.metric_keys("angular_update", sep), K.angular_updates(a2, b2, d2))

        if "zeros" in values:
            if identity:
                zeros, numel = values["zeros"], layout.global_numel
            else:
                zeros = K.combine_partials(values["zeros"][wsub.members], wsub.buckets, len(wsub.names), 1)
                numel = K.combine_partials(layout.global_numel[wsub.members], wsub.buckets, len(wsub.names), 1)
            emit(wsub.metric_keys("sparsity", sep), zeros / numel)

        # 4. The one device-to-host copy of the step, split back by the (host-known) sizes of the tensors.
        host = torch.cat(outs).tolist()
        chunks: list[list[float]] = []
        metrics: dict[str, float] = {}
        start = 0
        for out, keys in zip(outs, labels, strict=True):
            chunk = host[start : start + out.numel()]
            start += len(chunk)
            chunks.append(chunk)
            if keys is not None:
                metrics.update(zip(keys, chunk, strict=True))

        if not _all_finite(chunks[w_at]):
            self._report_non_finite("weight", layout.names, chunks[w_at], pending.step)
        g_host = chunks[g_at] if g_at is not None else []
        if g_host and not _all_finite(g_host) and getattr(trainer.precision_plugin, "scaler", None) is None:
            self._report_non_finite("gradient", [layout.names[i] for i in pending.grad_idx], g_host, pending.step)

        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=pending.step)
        if self.log_histograms:
            self._log_histograms(trainer, layout, pending.step)

    def _bucketed(self, partial: Tensor, subset: Subset) -> Tensor:
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

    def _log_histograms(self, trainer: pl.Trainer, layout: Layout, step: int) -> None:
        tb_loggers = [lg for lg in trainer.loggers if isinstance(lg, TENSORBOARD_LOGGERS)]
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WANDB_LOGGERS)]
        if not (tb_loggers or wandb_loggers):
            return
        members: dict[int, list[Tensor]] = {}
        for param, bucket in zip(layout.params, layout.bucket_of, strict=True):
            if bucket is not None:
                members.setdefault(bucket, []).append(param)
        histograms: dict[str, Tensor] = {}
        for bucket, params in members.items():
            # ``full_tensor`` is a collective: every rank gathers, only rank zero's logger writes.
            flat = [(t.full_tensor() if K.is_sharded(t) else t).detach().reshape(-1) for t in params]
            tag = f"weight_hist{self.group_separator}{layout.bucket_names[bucket]}"
            histograms[tag] = torch.cat(flat).float().cpu()
        for logger in tb_loggers:
            for tag, values in histograms.items():
                logger.experiment.add_histogram(tag, values, step)
        if wandb_loggers:
            import wandb  # a WandbLogger is there, so wandb is installed (its logger needs it)

            # One `log_metrics` per logger, so the histograms share the scalars' `trainer/global_step`.
            logged = {tag: wandb.Histogram(values.numpy()) for tag, values in histograms.items()}
            for logger in wandb_loggers:
                logger.log_metrics(logged, step=step)


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


def _all_finite(values: list[float]) -> bool:
    """Whether no value is NaN or +-Inf, in one C-level pass (norms are >= 0, so the sum is finite unless
    one is not, or unless it overflows; then the caller's per-value check decides)."""
    return math.isfinite(sum(values))
