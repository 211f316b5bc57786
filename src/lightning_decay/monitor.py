"""``WeightNormMonitor``: log what weight decay does to each layer, at the cost of one host copy per log.

The Lightning adapter of `lightning_decay._probes.Probes`, which decides when to measure, keeps the layout
of the parameters (``lightning_decay._monitor_layout``: buckets and index tensors, built once), and hands
the numbers to every logger the way ``LearningRateMonitor`` does. Which parameters each optimizer steps
comes from the engine, a `lightning_decay._binding.Binding` to the run's optimizers: under a Trainer one with
no step hooks, bound at train start and following ``trainer.optimizers``; ``attach`` binds one whose step
hooks run the same probes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_decay import norms as K
from lightning_decay._attach import Attachment, not_attached_error, unwrap
from lightning_decay._binding import Binding, Effect, every_param, never
from lightning_decay._checks import check_choice, check_flag
from lightning_decay._compat import (
    TENSORBOARD_LOGGERS,
    Callback,
    MisconfigurationException,
    deepspeed_problem,
    pl,
    rank_zero_warn,
)
from lightning_decay._monitor_charts import TOTALS, ChartWriter, custom_scalars
from lightning_decay._monitor_run import AttachedRun, TrainerRun
from lightning_decay._probes import Probes
from lightning_decay._repr import ArgumentsRepr
from lightning_decay.decay_report import ReportRow
from lightning_decay.rules import DecayRules, as_rules, module_rules

__all__ = ["WeightNormMonitor"]

_GRANULARITIES = ("param", "module")
_FLAGS = ("log_grad_norm", "log_update_ratio", "log_angular_update", "log_sparsity", "log_histograms")
_FLAGS += ("include_frozen", "log_equilibrium", "keep_snapshot")


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
      (one foreach copy, into a buffer kept between logging steps: ``keep_snapshot``) only on logging
      steps, right before the step. Where ``w_before`` is zero (a
      LayerNorm bias at init, a weight pruned by proximal L1) the ratio is 0 if the tensor stays zero
      and 1 if it moves (all of ``w_after`` is update), never ``inf`` or ``NaN``;
    - ``angular_update/{name}`` (``log_angular_update=True``): the angle in radians between ``w_before``
      and ``w_after``. For weights followed by a normalization layer the loss is scale invariant, so this
      angle *is* the effective learning rate; under weight decay it settles at an equilibrium, about
      ``sqrt(2 * lr * weight_decay)`` for plain SGD (Kosson et al., "Rotational equilibrium"). It comes
      from ``a = ||w_before||``, ``b = ||w_after||`` and ``d = ||Δw||`` (foreach norms that add up across
      shards, no per-tensor dot product) as ``2 asin(sqrt(d² - (a - b)²) / (2 sqrt(ab)))``, where errors in
      ``a`` and ``b`` enter only at second order, so float32 kernels give it to float32 precision; ``Δw``
      is exact in the weights' dtype unless an entry changes by more than 2x. A zero vector has no
      direction: the angle is 0 when ``w_before`` or ``w_after`` is zero;
    - ``angular_update_equilibrium/{name}`` and ``scale_invariance/{name}`` (``log_equilibrium=True``, which
      turns ``log_angular_update`` on): the predicted equilibrium angle of the tensor's param group (from
      the lr the step used, momentum or betas, and the decay that really applies: the optimizer's own
      ``weight_decay``, a ``WeightDecay`` or ``WeightPenalty(l2)`` bound to the same optimizer), and
      ``|cos(grad, w)| * sqrt(numel)`` of the step (a module's or block's: the mean of its tensors'), near 0
      for a scale-invariant weight. Tensors no decay reaches get no prediction; a coupled L2 inside
      Adam/RMSprop and cautious decay have no closed form (nothing logged, a warning once per group). At the
      end of fit (``decay_report``) the report is printed and written as ``decay_report.md`` and
      ``decay_report.png`` into the logger's ``log_dir`` (``default_root_dir`` without one), the picture
      also to each ``TensorBoardLogger``; see ``docs/decay-doing-anything.md`` and
      [`write_decay_report`][lightning_decay.WeightNormMonitor.write_decay_report];
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
        log_equilibrium: Also log the predicted equilibrium angle and the scale-invariance score (and the
            angle itself), and keep their history for the decay report.
        decay_report: Write the decay report at the end of fit (rank zero); ``None`` (default): when
            ``log_equilibrium``. ``True`` needs ``log_equilibrium=True``.
        keep_snapshot: Copy the snapshot of update ratios and angles into buffers kept between logging
            steps (at most one extra copy of the monitored weights, held for the whole fit; no allocation
            and no page faults on a logging step). ``False``: a fresh copy per logging step, freed after it.

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
        log_equilibrium: bool = False,
        decay_report: bool | None = None,
        keep_snapshot: bool = True,
    ) -> None:
        self.norm_type = K.parse_norm_type(norm_type)
        check_choice(granularity, list(_GRANULARITIES), "granularity")
        if blocks is not None and granularity != "param":
            raise ValueError("`blocks` and `granularity='module'` exclude each other: give one of them")
        self.granularity = granularity
        self.blocks = _compile_blocks(blocks)
        self.rules = as_rules(rules)
        self._given_rules = rules  # None: the LightningModule's `decay_rules` at setup, else the defaults
        self.logging_interval = _interval(logging_interval)
        flags = (log_grad_norm, log_update_ratio, log_angular_update, log_sparsity, log_histograms, include_frozen)
        for flag, value in zip(_FLAGS, (*flags, log_equilibrium, keep_snapshot), strict=True):
            check_flag(value, flag)
        self.log_equilibrium, self.keep_snapshot = log_equilibrium, keep_snapshot
        self.decay_report = _report_flag(decay_report, log_equilibrium)
        self.log_grad_norm, self.log_update_ratio, self.log_sparsity = log_grad_norm, log_update_ratio, log_sparsity
        self.log_angular_update = log_angular_update or log_equilibrium  # the measured half of the equilibrium
        self.log_histograms, self.include_frozen = log_histograms, include_frozen
        self.group_separator = _separator(group_separator)

        self._probes = Probes(self)
        self._charts = ChartWriter()  # the Custom Scalars layouts written, the histogram warning
        # The engine's binding to the run's optimizers (which parameters each steps): under a Trainer with no
        # step hooks (Lightning's hooks drive the monitor), attached with them (they do).
        self._binding: Binding | None = None
        #: The rows of the last decay report written (empty before one is): what a script prints or checks.
        self.decay_report_rows: list[ReportRow] = []
        self._attachment: Any = None  # the live `Attachment`, whose `remove()` takes the hooks off

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._attachment is not None:  # attached before (Fabric, plain PyTorch): the Trainer takes it over
            self._attachment.remove()
        self.unbind()  # a binding of an earlier fit (bound again at train start)
        self.rules = module_rules(pl_module, self._given_rules)
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `WeightNormMonitor` callback with a Trainer that has no logger (`logger=False`)."
            )
        self.check_histogram_loggers(trainer.loggers)
        problem = deepspeed_problem(trainer.strategy)
        if self.log_grad_norm and problem is not None:
            rank_zero_warn(f"WeightNormMonitor(log_grad_norm=True) under {problem}: grad norms are not meaningful.")
        self._probes.reset()
        self.decay_report_rows = []  # a second fit reports its own run only

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._charts.write_custom_scalars(self, trainer.loggers, pl_module)
        self._bind_to_trainer(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.unbind()

    def _bind_to_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Binding:
        # Here, as the regularizers: the optimizers exist and the strategy has wrapped or sharded the model.
        binding = Binding("WeightNormMonitor", [], selects=every_param, decays=never, hooks=False)
        binding.bind(pl_module, trainer.optimizers, None, self.rules, step_hooks=False)
        self._binding = binding
        return binding

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``decay_report``: the report of the fit, on rank zero, beside the logs (or in ``default_root_dir``)."""
        if not self.decay_report or not trainer.is_global_zero:
            return
        if not self._probes.history.series:
            rank_zero_warn(
                "WeightNormMonitor(log_equilibrium=True): no decayed monitored tensor was measured on a logging "
                "step, so there is no decay report (no weight decay applies, or no step logged)."
            )
            return
        directory = getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir
        batches, accumulate = trainer.num_training_batches, trainer.accumulate_grad_batches
        per_epoch = math.ceil(batches / accumulate) if math.isfinite(batches) and batches > 0 else None
        label = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.write_decay_report(directory, total_steps=label, steps_per_epoch=per_epoch, loggers=trainer.loggers)

    def write_decay_report(
        self,
        directory: str | Path,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        loggers: Sequence[Any] = (),
    ) -> list[ReportRow]:
        """Print the decay report of what ``log_equilibrium=True`` measured, and write it into ``directory``.

        Writes ``decay_report.md`` (the table) and ``decay_report.png`` (measured against predicted angle per
        layer, and the weight norms; needs matplotlib), and adds the picture to each TensorBoard logger of
        ``loggers`` (``add_figure``, tag ``decay_report``). Under a Trainer it runs by itself at the end of fit
        (``decay_report=True``); attached (Fabric, plain PyTorch), call it when training ends.

        Args:
            directory: Where the two files go (created).
            total_steps: Optimizer steps of the run (default: those counted while attached, else up to the
                last logging step).
            steps_per_epoch: For ``tau`` in epochs (``-`` without it).
            loggers: Loggers to give the picture to (TensorBoard ones take it).

        Returns:
            The rows of the report (``lightning_decay.decay_report.ReportRow``).
        """
        binding = self._binding
        if total_steps is None and binding is not None and binding.step_hooks and binding.steps:
            total_steps = binding.steps[-1]  # attached: the steps counted (under a Trainer the hook passes them)
        writers = [lg.experiment for lg in loggers if isinstance(lg, TENSORBOARD_LOGGERS)]
        step = total_steps if total_steps is not None else 0
        self.decay_report_rows = self._probes.history.write(directory, total_steps, steps_per_epoch, writers, step)
        return self.decay_report_rows

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
        module, opts, scaler = unwrap(model, optimizers, scaler)
        loggers = list(loggers) if isinstance(loggers, (list, tuple)) else [loggers]
        if not loggers or not all(callable(getattr(lg, "log_metrics", None)) for lg in loggers):
            raise TypeError(f"`loggers` must be loggers with a `log_metrics(metrics, step)` method, got {loggers!r}")
        self.check_histogram_loggers(loggers)
        self.unbind()
        # The same hooks as under a Trainer, from the optimizers' step hooks: `before_step` after each
        # closure, the logging after a step of the last optimizer; every step counted, as the Trainer's label.
        binding = Binding("WeightNormMonitor", [], selects=every_param, decays=never, count_skipped=True)
        run = AttachedRun(binding, loggers, next(iter(module.parameters())).device)
        binding.effects.append(_Attached(self._probes, run, module))
        self._probes.reset()
        self._charts.write_custom_scalars(self, loggers, module)
        binding.bind(module, opts, scaler, self.rules, step_hooks=True)
        self._binding = binding
        return Attachment(self, steps=lambda: [run.label])

    def unbind(self) -> None:
        """Take the step hooks of ``attach`` off (``Attachment.remove``); under a Trainer, at teardown."""
        if self._binding is not None:
            self._binding.unbind()
            self._binding = None

    def check_histogram_loggers(self, loggers: Any) -> None:
        """With ``log_histograms=True``, warn (once per monitor) when none of ``loggers`` takes histograms.

        Histograms go to TensorBoard (``add_histogram``) and Weights & Biases (``wandb.Histogram``) loggers;
        others (CSV, MLflow...) get the scalars only. Called at ``setup`` and by ``attach``.
        """
        self._charts.check_histogram_loggers(self, loggers)

    def on_after_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Called by Fabric on the objects of ``Fabric(callbacks=...)`` after each optimizer step (no Trainer
        hook has this name). A monitor that is not attached would silently log nothing there: refused."""
        if self._binding is None or not self._binding.step_hooks:
            how = "WeightNormMonitor(logging_interval=...).attach(model, optimizer, fabric.loggers)"
            raise not_attached_error("WeightNormMonitor", how, does="logs nothing")

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
        return custom_scalars(self, module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        binding = self._binding
        if binding is None or not binding.bound:
            binding = self._bind_to_trainer(trainer, pl_module)  # hooks called without `on_train_start`
        elif binding.index_of(optimizer) is None:  # rebuilt (``strategy.setup_optimizers``): bound afresh
            binding.follow(trainer.optimizers)
        self._probes.before_step(TrainerRun(trainer, binding), pl_module, optimizer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._probes.pending is not None and self._binding is not None:  # a logging step
            self._probes.after_step(TrainerRun(trainer, self._binding))


def _interval(logging_interval: Any) -> int | None:
    """``logging_interval`` checked: a positive int, or ``None`` (the Trainer's ``log_every_n_steps``)."""
    if logging_interval is not None and (
        isinstance(logging_interval, bool) or not isinstance(logging_interval, int) or logging_interval < 1
    ):
        raise ValueError(f"`logging_interval` must be a positive int or None, got {logging_interval!r}")
    return logging_interval


def _separator(group_separator: Any) -> str:
    """``group_separator`` checked: a non-empty string."""
    if not isinstance(group_separator, str) or not group_separator:
        raise ValueError(f"`group_separator` must be a non-empty string, got {group_separator!r}")
    return group_separator


def _report_flag(decay_report: bool | None, log_equilibrium: bool) -> bool:
    """``decay_report`` checked; ``None`` follows ``log_equilibrium``."""
    if decay_report is None:
        return log_equilibrium
    check_flag(decay_report, "decay_report")
    if decay_report and not log_equilibrium:
        raise ValueError("`decay_report=True` needs `log_equilibrium=True` (the report is made of its values)")
    return decay_report


def _compile_blocks(blocks: Mapping[str, str | re.Pattern[str]] | None) -> dict[str, re.Pattern[str]] | None:
    if blocks is None:
        return None
    if not isinstance(blocks, Mapping) or not blocks:
        raise ValueError(f"`blocks` must be a non-empty mapping of block name -> regex, got {blocks!r}")
    compiled: dict[str, re.Pattern[str]] = {}
    for name, pattern in blocks.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"`blocks` names must be non-empty strings, got {name!r}")
        if name in TOTALS:
            raise ValueError(f"`blocks` name {name!r} is reserved for the totals {list(TOTALS)}")
        try:
            compiled[name] = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"`blocks[{name!r}]` is not a valid regular expression: {pattern!r} ({err})") from err
    return compiled


class _Attached(Effect):
    """The monitor's probes as an effect of its binding, when attached without a Trainer."""

    def __init__(self, probes: Probes, run: AttachedRun, module: nn.Module) -> None:
        self.probes, self.run, self.module = probes, run, module

    def before_step(self, binding: Binding, index: int) -> None:
        self.probes.before_step(self.run, self.module, binding.bound[index].optimizer)

    def after_step(self, binding: Binding, index: int) -> None:
        if index == len(binding.bound) - 1:  # a step of the last optimizer ends a logging step
            self.probes.after_step(self.run)
