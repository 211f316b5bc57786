"""The monitor's probes, with no Trainer: which steps log, what is gathered before the step, what is logged.

`Probes` does the work of ``WeightNormMonitor`` on any run (``lightning_decay._monitor_run``: a Trainer's,
or an attached one's): at the first optimizer step of a batch it decides whether the batch logs; before
each optimizer step of a logging batch it takes the gradient norms and the snapshot for update ratios and
angles; after the batch it measures the weights and hands every metric to the loggers with one host copy.
The layout of the parameters (``lightning_decay._monitor_layout``) is built once per version of the run's
binding (``run.binding``: the monitor's engine binding, under a Trainer as attached).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_decay import _amp
from lightning_decay import norms as K
from lightning_decay._compat import TENSORBOARD_LOGGERS, WANDB_LOGGERS, rank_zero_warn
from lightning_decay._decay_history import DecayHistory
from lightning_decay._equilibrium_probe import EquilibriumProbe
from lightning_decay._host import NonFiniteWarnings, split_to_host
from lightning_decay._messages import few_names
from lightning_decay._monitor_layout import Layout, Pending, Subset, build_layout, layout_signature, reduce_pieces
from lightning_decay._plan_cache import plan_for
from lightning_decay.equilibrium import cosines_from_partials, grad_weight_partials

__all__ = ["Probes", "bucket_name"]

Pieces = dict[str, tuple[Tensor, Tensor | None, str]]


def bucket_name(options: Any, name: str, aliases: tuple[str, ...]) -> str | None:
    """The bucket a parameter is logged under: its block, its owner module, or itself; ``None``: totals only."""
    if options.blocks is not None:
        for block, pattern in options.blocks.items():
            if any(pattern.search(n) for n in (name, *aliases)):
                return block
        return None
    if options.granularity == "module":
        owner = name.rpartition(".")[0]
        return owner or name  # a parameter of the root module stands for itself
    return name


class Probes:
    """The measurements of one ``WeightNormMonitor`` (``options``: the monitor, whose arguments they read)."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.layout: Layout | None = None
        self.pending: Pending | None = None
        self.decided_batch: int | None = None
        self.warned_blocks: set[str] = set()
        self.nonfinite = NonFiniteWarnings("WeightNormMonitor")
        self.equilibrium = EquilibriumProbe("WeightNormMonitor")
        self.history = DecayHistory()  # ``log_equilibrium``: the series of the decay report

    def reset(self) -> None:
        """A new fit: parameters may still be replaced (configure_model, sharding); lists built at the first log."""
        self.layout, self.pending, self.decided_batch = None, None, None
        self.equilibrium.reset()
        self.history.clear()

    # ------------------------------------------------------------------------- before the step
    def before_step(self, run: Any, module: nn.Module, optimizer: Optimizer) -> None:
        """Decide whether this batch logs (at its first optimizer step); gather the gradients and snapshots."""
        o = self.options
        batch = run.batch
        if self.decided_batch != batch:
            # First optimizer of this batch: decide once, so every optimizer of a batch agrees.
            self.decided_batch = batch
            self.pending = None
            if run.should_log(o.logging_interval):
                self.ensure_layout(run, module)
                self.pending = Pending(batch=batch, step=run.label)
        pending, layout = self.pending, self.layout
        snapshot = o.log_update_ratio or o.log_angular_update
        if pending is None or layout is None or not (o.log_grad_norm or snapshot):
            return  # weight norms alone need nothing before the step
        # A parameter shared by two optimizers is measured with the first one that steps it.
        positions = [i for i in layout.opt_indices.get(id(optimizer), []) if i not in pending.seen]
        pending.seen.update(positions)
        if not positions:
            return
        if len(positions) == len(layout.params):  # every parameter (distinct positions): in layout order, so
            positions = layout.in_order  # their gradients and snapshot mirror the parameters' split
        with torch.no_grad():
            if o.log_grad_norm:
                self._gather_grads(run, optimizer, layout, pending, positions)
            if o.log_equilibrium:
                # The lr this step uses (schedulers step before `on_train_batch_end`): host floats, this step only.
                pending.lrs[id(optimizer)] = [float(g["lr"]) for g in optimizer.param_groups]
                self._gather_scores(layout, pending, positions)
            if snapshot:
                pending.snap_idx.extend(positions)
                pending.snapshots.extend(layout.snapshot(positions, o.keep_snapshot))

    def _gather_grads(
        self, run: Any, optimizer: Optimizer, layout: Layout, pending: Pending, positions: list[int]
    ) -> None:
        present = [(i, layout.params[i].grad) for i in positions if layout.params[i].grad is not None]
        if not present:
            return
        idx = [i for i, _ in present]
        grads = layout.mirror(layout.local([g for _, g in present]), idx)  # type: ignore[misc]
        # float32 kernels (fp16/bf16 widened to float32, as Lightning's ``grad_norm``), combined in float64.
        p = self.options.norm_type
        parts = K.partials(grads, p, dtype=layout.dtype, device=layout.device, accumulate=torch.float32)
        scale = _amp.grad_scale(run.scaler, optimizer)
        if scale is not None:
            # Fused optimizers unscale inside ``step``: the grads seen here are still multiplied by the
            # scale. Divide on the device (no ``.item()``); p=2 partials are squares.
            inv = scale.reshape(()).to(device=layout.device, dtype=layout.dtype).reciprocal()
            parts = parts * (inv.square() if p == 2 else inv)
        pending.grad_idx.extend(idx)
        pending.grad_parts.append(parts)

    def _gather_scores(self, layout: Layout, pending: Pending, positions: list[int]) -> None:
        """The partials of ``|cos(grad, w)|`` of the positions with a gradient (before the snapshot, whose kept
        buffers hold the products ``grad * w`` meanwhile: no memory beyond the snapshot's)."""
        present = [i for i in positions if layout.params[i].grad is not None]
        if not present:
            return
        grads = layout.local([layout.params[i].grad for i in present])  # type: ignore[misc]
        weights = layout.local([layout.params[i] for i in present])
        scratch = None
        if self.options.keep_snapshot:
            key = layout.in_order if len(present) == len(layout.params) else present
            scratch = layout.snapshot_buffers(key, weights)
        # ``|w_before|**2`` is the snapshot's ``a2`` (taken right after, of a superset of these positions).
        dot, g2, _ = grad_weight_partials(grads, weights, scratch, with_weights=False)
        pending.score_idx.extend(present)
        pending.scores.append(torch.stack([dot, g2]).to(device=layout.device, dtype=layout.dtype))

    # -------------------------------------------------------------------------- after the step
    def after_step(self, run: Any) -> None:
        pending, self.pending = self.pending, None
        if pending is None or self.layout is None:
            return
        if pending.batch != run.batch:
            return  # stale: the batch that started it did not finish
        with torch.no_grad():
            self._log_step(run, self.layout, pending)

    def ensure_layout(self, run: Any, module: nn.Module) -> None:
        binding = run.binding
        binding.refresh()  # the engine's signature check: a changed param group rebuilds its buckets
        if self.layout is None or self.layout.signature != layout_signature(binding):
            # Frozen parameters are classified too; ``build_layout`` keeps them only with ``include_frozen``.
            o = self.options
            plan = plan_for(o.rules, module, include_frozen=True)
            self.layout = build_layout(plan, binding, run.device, self._bucket_name, o.include_frozen)
            self._warn_empty_blocks(plan, self.layout)

    def _bucket_name(self, name: str, aliases: tuple[str, ...]) -> str | None:
        return bucket_name(self.options, name, aliases)

    def _warn_empty_blocks(self, plan: Any, layout: Layout) -> None:
        """Warn once per ``blocks`` entry whose regex matches no monitored parameter (it is never logged)."""
        if self.options.blocks is None:
            return
        for block, pattern in self.options.blocks.items():
            if block not in layout.bucket_names and block not in self.warned_blocks:
                self.warned_blocks.add(block)
                rank_zero_warn(
                    f"WeightNormMonitor: `blocks[{block!r}]` ({pattern.pattern!r}) matches no monitored parameter, "
                    f"so it is never logged; the parameter names are {few_names([d.name for d in plan])}"
                )

    def _log_step(self, run: Any, layout: Layout, pending: Pending) -> None:
        weights = layout.local(layout.params)
        weight_groups = layout.weight_groups or K.TensorGroups(weights, layout.device)
        pieces, w_norms = self._local_pieces(layout, pending, weights, weight_groups)
        if layout.sharded:  # one reduction across shards, only when some parameter is sharded
            pieces = reduce_pieces(pieces, layout)
            w_norms = K.finalize_partials(pieces["w"][0], self.options.norm_type)  # of the reduced partials
        outs, labels, w_at, g_at = self._metrics(layout, pending, {k: v for k, (v, _, _) in pieces.items()}, w_norms)
        # The one device-to-host copy of the step, split back by the (host-known) sizes of the tensors.
        chunks = split_to_host(outs)
        metrics: dict[str, float] = {}
        for chunk, keys in zip(chunks, labels, strict=True):
            if keys is not None:
                metrics.update(zip(keys, chunk, strict=True))
        if self.options.log_equilibrium:
            self._equilibrium_metrics(run, layout, pending, metrics)
        self.nonfinite.check(layout.names, chunks[w_at], "weight norm", pending.step)
        if g_at is not None and run.scaler is None:  # under a GradScaler overflowing steps are routine
            self.nonfinite.check(
                [layout.names[i] for i in pending.grad_idx], chunks[g_at], "gradient norm", pending.step
            )
        for logger in run.loggers:
            logger.log_metrics(metrics, step=pending.step)
        if self.options.log_histograms:
            self._log_histograms(run.loggers, layout, pending.step)

    def _equilibrium_metrics(self, run: Any, layout: Layout, pending: Pending, metrics: dict[str, float]) -> None:
        """``angular_update_equilibrium/{name}`` into ``metrics`` (host floats), and the history of the report."""
        families = ("angular_update_equilibrium", "angular_update", "scale_invariance", "weight_norm")
        keys = [layout.subset_of_all().metric_keys(f, self.options.group_separator) for f in families]
        nan = float("nan")
        for bp in self.equilibrium.predictions(layout, run.binding, pending.lrs):
            b, predicted = bp.bucket, bp.prediction.angle
            metrics[keys[0][b]] = predicted  # type: ignore[assignment]
            angle = metrics.get(keys[1][b])
            if angle is None:  # not stepped this time (no snapshot): nothing measured to compare
                continue
            values = {
                "angle": angle,
                "predicted": predicted,
                "lr": bp.lr,
                "weight_decay": bp.weight_decay,
                "decay_rate": bp.prediction.decay_rate,
                "score": metrics.get(keys[2][b], nan),
                "norm": metrics.get(keys[3][b], nan),
            }
            self.history.record(layout.bucket_names[b], pending.step, values)  # type: ignore[arg-type]

    def _identity(self) -> bool:
        """Whether the buckets are the parameters (nothing to combine)."""
        return self.options.granularity == "param" and self.options.blocks is None

    def _local_pieces(
        self, layout: Layout, pending: Pending, weights: list[Tensor], groups: K.TensorGroups
    ) -> tuple[Pieces, Tensor]:
        """This rank's partials, each with the positions of its parameters (for replica masks), and the weight norms.

        Weight and gradient norms run float32 kernels (fp16/bf16 widened to float32, float32 as it is; float64
        kernels are twice as slow on CPU) and are combined in the layout's ``dtype``.
        """
        o, dtype, dev = self.options, layout.dtype, layout.device
        p = o.norm_type
        pieces: Pieces = {}
        # The angle over every parameter needs ``||w_after||^2``: with p=2 the squares of the weight norms are
        # reused, one pass over the weights instead of two.
        reuse = (
            o.log_angular_update
            and p == 2
            and isinstance(layout.mirror(pending.snapshots, pending.snap_idx), K.TensorGroups)
        )
        w_norms = groups.norms(p, dtype=dtype, accumulate=torch.float32)
        if layout.sharded or not self._identity():  # partials to reduce across shards, or to combine into buckets
            pieces["w"] = (w_norms.square() if p == 2 else w_norms, None, K.reduce_op(p))
        if pending.grad_parts:
            pieces["g"] = (torch.cat(pending.grad_parts), layout.subset(tuple(pending.grad_idx)).idx, K.reduce_op(p))
        if pending.snapshots:
            # float32 kernels, combined in ``dtype``: the angle's formula (``K.angular_updates``) needs no float64
            # sums, and a float64 kernel on CPU makes a float64 copy of the float32 tensors it reduces.
            acc = torch.float32
            idx = layout.subset(tuple(pending.snap_idx)).idx
            before = layout.mirror(pending.snapshots, pending.snap_idx)
            after = layout.mirror([weights[i] for i in pending.snap_idx], pending.snap_idx)
            pieces["a2"] = (K.partials(before, 2, dtype=dtype, device=dev, accumulate=acc), idx, "sum")
            b2 = w_norms.square()[idx] if reuse else K.partials(after, 2, dtype=dtype, device=dev, accumulate=acc)
            pieces["b2"] = (b2, idx, "sum")
            # ``before - after`` in place into the snapshot, no second copy of the weights: it is ``-Δw``
            # exactly (IEEE subtraction is antisymmetric), so the same norm.
            layout.subtract_(before, after)
            pieces["d2"] = (K.partials(before, 2, dtype=dtype, device=dev, accumulate=acc), idx, "sum")
            pending.snapshots.clear()  # the copy is no longer needed
        if pending.scores:
            idx = layout.subset(tuple(pending.score_idx)).idx
            scores = torch.cat(pending.scores, dim=1)
            pieces.update({k: (scores[j], idx, "sum") for j, k in enumerate(("gw", "gg"))})
        if o.log_sparsity:
            # Counted by float32 kernels (no float64 copy of the weights), in slices of at most 2**24 entries
            # for large tensors: exact (``K.COUNT_EXACT``), combined in ``dtype``.
            nonzero = groups.norms(0, dtype=dtype, accumulate=torch.float32)
            pieces["zeros"] = (layout.local_numel - nonzero, None, "sum")
        return pieces, w_norms

    def _metrics(
        self, layout: Layout, pending: Pending, values: dict[str, Tensor], w_norms: Tensor
    ) -> tuple[list[Tensor], list[list[str] | None], int, int | None]:
        """Combined into buckets and finalized, on the device: the tensors, each with its metric keys (built
        once per layout) or ``None`` if only read here; and where the weight and gradient norms are."""
        o, dtype = self.options, layout.dtype
        p, sep, identity = o.norm_type, o.group_separator, self._identity()
        outs: list[Tensor] = []
        labels: list[list[str] | None] = []

        def emit(keys: list[str] | None, tensor: Tensor) -> int:
            if tensor.dtype != dtype or tensor.dim() != 1:  # (attribute reads are cheaper than no-op calls)
                tensor = tensor.reshape(-1).to(dtype)
            outs.append(tensor)
            labels.append(keys)
            return len(outs) - 1

        wsub = layout.subset_of_all()
        # Per-parameter norms, for the non-finite report; logged as they are when buckets are parameters.
        w_at = emit(wsub.metric_keys("weight_norm", sep) if identity else None, w_norms)
        if not identity:
            emit(wsub.metric_keys("weight_norm", sep), self._bucketed(values["w"], wsub))
        # total, decay_total, no_decay_total: the norm of the per-parameter norms of each row of the mask
        emit(layout.total_keys("weight_norm", sep), K.masked_norms(w_norms, layout.total_mask, p, layout.zero))
        g_at: int | None = None
        if "g" in values:
            gsub, g_parts = layout.subset(tuple(pending.grad_idx)), values["g"]
            g_at = emit(gsub.metric_keys("grad_norm", sep) if identity else None, K.finalize_partials(g_parts, p))
            if not identity:
                emit(gsub.metric_keys("grad_norm", sep), self._bucketed(g_parts, gsub))
            emit([f"grad_norm{sep}total"], K.finalize_partials(K.combine_all_partials(g_parts, p), p))
        if "a2" in values:
            usub = layout.subset(tuple(pending.snap_idx))
            a2, b2, d2 = (self._combined(values[k], usub, 2) for k in ("a2", "b2", "d2"))
            if o.log_update_ratio:
                emit(usub.metric_keys("update_ratio", sep), K.update_ratios(a2, d2))
            if o.log_angular_update:
                emit(usub.metric_keys("angular_update", sep), K.angular_updates(a2, b2, d2))
        if "gw" in values:
            emit(*self._scores(layout, pending, values))
        if "zeros" in values:
            zeros = self._combined(values["zeros"], wsub, 1)
            numel = self._combined(layout.global_numel, wsub, 1)
            emit(wsub.metric_keys("sparsity", sep), zeros / numel)
        return outs, labels, w_at, g_at

    def _scores(self, layout: Layout, pending: Pending, values: dict[str, Tensor]) -> tuple[list[str], Tensor]:
        """``scale_invariance/{name}``: ``|cos(grad, w)| * sqrt(numel)`` per tensor, averaged over a bucket's."""
        ssub = layout.subset(tuple(pending.score_idx))
        a2 = values["a2"]  # |w_before|^2 of the snapshot's positions, a superset of the scores' (same order)
        if pending.score_idx != pending.snap_idx:
            at = {p: j for j, p in enumerate(pending.snap_idx)}
            a2 = a2[torch.tensor([at[p] for p in pending.score_idx], dtype=torch.long, device=a2.device)]
        cos = cosines_from_partials(values["gw"], values["gg"], a2)
        scores = cos * layout.global_numel[ssub.idx].sqrt()
        keys = ssub.metric_keys("scale_invariance", self.options.group_separator)
        if self._identity():
            return keys, scores
        n = len(ssub.names)
        total = K.combine_partials(scores[ssub.members], ssub.buckets, n, 1)
        count = K.combine_partials(torch.ones_like(scores)[ssub.members], ssub.buckets, n, 1)
        return keys, total / count

    def _combined(self, partial: Tensor, subset: Subset, norm_type: float) -> Tensor:
        """Partials of the subset's parameters combined per bucket (as they are when buckets are parameters)."""
        if self._identity():
            return partial
        return K.combine_partials(partial[subset.members], subset.buckets, len(subset.names), norm_type)

    def _bucketed(self, partial: Tensor, subset: Subset) -> Tensor:
        return K.finalize_partials(self._combined(partial, subset, self.options.norm_type), self.options.norm_type)

    def _log_histograms(self, loggers: list[Any], layout: Layout, step: int) -> None:
        tb_loggers = [lg for lg in loggers if isinstance(lg, TENSORBOARD_LOGGERS)]
        wandb_loggers = [lg for lg in loggers if isinstance(lg, WANDB_LOGGERS)]
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
            tag = f"weight_hist{self.options.group_separator}{layout.bucket_names[bucket]}"
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
