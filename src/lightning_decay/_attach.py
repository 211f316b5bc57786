"""Regularization without a ``Trainer``: ``WeightDecay`` / ``WeightPenalty`` attached to a plain optimizer.

Fabric and plain PyTorch loops have no ``on_before_optimizer_step``. ``attach`` binds a regularizer to
the model and its optimizers and runs its per-step work from a step pre-hook of each optimizer (after the
step's closure when it is given one), its post-step work (step counts, proximal L1) from a step post-hook:
the same code the Trainer hooks call, not a second implementation. Step hooks run only when a step really
runs, so a step the ``GradScaler`` skips is neither regularized nor counted.

``Fabric(callbacks=[WeightDecay(...)])`` alone would do nothing: Fabric calls only the hooks its loop
names, and after each optimizer step ``on_after_optimizer_step``, which the regularizers answer with an
error that points here unless they are attached.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_decay._compat import rank_zero_warn
from lightning_decay._regularizer import RegularizerCallback, after_closure

if TYPE_CHECKING:
    from lightning_decay.monitor import WeightNormMonitor

__all__ = ["Attachment", "attach", "attach_monitor"]


class Attachment:
    """What ``attach`` returns: the bound regularizer, its state for checkpoints, and ``remove``.

    Also a context manager: ``with decay.attach(model, optimizer): ...`` removes the hooks on exit.

    Attaching the same callback again (to other optimizers, or to the same ones: a new run) supersedes this
    attachment: its ``remove()`` then does nothing but warn, and the later attachment's ``remove()`` is the one
    that takes the callback off.

    Attributes:
        regularizer: The attached ``WeightDecay`` or ``WeightPenalty`` (or ``WeightNormMonitor``).
    """

    def __init__(self, regularizer: Any, handles: Sequence[RemovableHandle] = (), steps: Any = None) -> None:
        self.regularizer = regularizer
        self._handles = list(handles)
        self._steps = steps
        self._removed = False
        # The callback's live attachment is the latest one: an earlier one's `remove()` must not unbind it.
        previous = regularizer._attachment
        regularizer._attachment = self
        if isinstance(previous, Attachment) and previous._handles:
            previous._remove_handles()  # hooks of its own (a monitor's): superseded, they stop now

    @property
    def steps(self) -> list[int]:
        """Optimizer steps taken so far while attached, per optimizer (schedules read these)."""
        return list(self._steps()) if self._steps is not None else list(self.regularizer._steps)

    @property
    def attached(self) -> bool:
        """Whether this attachment is the callback's live one: not removed, and not superseded by a later one."""
        return not self._removed and self.regularizer._attachment is self

    def state_dict(self) -> dict[str, Any]:
        """The regularizer's state (step counts, references, taken-over decay), to save beside the optimizer's."""
        state: dict[str, Any] = self.regularizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by ``state_dict`` (after the optimizer's own ``load_state_dict``)."""
        self.regularizer.load_state_dict(state_dict)

    def remove(self) -> None:
        """Remove the step hooks: the optimizers step as if the regularizer had never been attached.

        Only this attachment's own binding: on one superseded by a later ``attach`` of the same callback, it
        warns and does nothing. Removing twice does nothing; a ``Trainer`` given the callback removes it.
        """
        if self._removed:
            return
        if self.regularizer._attachment is not self:
            rank_zero_warn(
                f"{self!r}.remove() does nothing: {type(self.regularizer).__name__} was attached again since, and "
                "that later binding stays. Call remove() on the Attachment the later `attach` returned."
            )
            self._removed = True
            return
        self._removed = True
        self.regularizer._attachment = None
        if isinstance(self.regularizer, RegularizerCallback):
            self.regularizer.unbind()
        else:
            self.regularizer._standalone = None
        self._remove_handles()

    def _remove_handles(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __repr__(self) -> str:
        state = ", removed" if self._removed else "" if self.attached else ", superseded"
        return f"Attachment({self.regularizer!r}, steps={self.steps}{state})"

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(
    regularizer: RegularizerCallback,
    model: nn.Module,
    optimizers: Optimizer | Sequence[Optimizer],
    scaler: Any = None,
) -> Attachment:
    """Attach ``regularizer`` to ``model`` and its optimizers through their step hooks; a new run.

    ``regularizer.attach(model, optimizers)`` is the same. Call it after ``fabric.setup`` under Fabric;
    in a plain loop, after building the optimizer. Every ``optimizer.step()`` then regularizes first.

    Args:
        regularizer: A ``WeightDecay`` or ``WeightPenalty``.
        model: The model the optimizers step; a Fabric-wrapped module (``fabric.setup``) is unwrapped.
        optimizers: One optimizer or a sequence (Fabric-wrapped ones are unwrapped).
        scaler: The ``torch.amp.GradScaler`` that steps them, if any; under Fabric the precision plugin's
            is found by itself.

    Returns:
        The [`Attachment`][lightning_decay.Attachment].

    Raises:
        TypeError: If ``regularizer``, ``model`` or ``optimizers`` has the wrong type.
        MisconfigurationException: On double decay (an optimizer's own ``weight_decay`` on the weights the
            regularizer also decays).

    Examples:
        ```python
        import torch
        from lightning_decay import WeightDecay, attach, decay_param_groups

        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
        optimizer = torch.optim.Adam(decay_param_groups(model, weight_decay=0.0), lr=1e-3)
        handle = attach(WeightDecay(0.05), model, optimizer)  # Adam + decoupled decay = AdamW
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        handle.steps  # [1]
        ```
    """
    if not isinstance(regularizer, RegularizerCallback):
        raise TypeError(f"`regularizer` must be a WeightDecay or WeightPenalty, got {type(regularizer).__name__}")
    module, opts, scaler = _unwrap(model, optimizers, scaler)
    regularizer.reset()  # a new run; `bind` replaces any previous binding
    regularizer.bind(module, opts, scaler, step_hooks=True)
    return Attachment(regularizer)


def attach_monitor(
    monitor: WeightNormMonitor,
    model: nn.Module,
    optimizers: Optimizer | Sequence[Optimizer],
    loggers: Any,
    scaler: Any = None,
) -> Attachment:
    """Run ``monitor`` from the optimizers' step hooks, logging to ``loggers``: ``WeightNormMonitor.attach``.

    The monitor's own hooks run with a stand-in for the few things they read of a Trainer: the optimizers,
    the device, the ``GradScaler``, the loggers (anything with ``log_metrics(metrics, step)``: Fabric's
    ``fabric.loggers``, Lightning's loggers) and the step count. A step is one step of the last optimizer
    of ``optimizers``; it logs every ``monitor.logging_interval`` steps (50 when ``None``, the Trainer's
    default ``log_every_n_steps``), with the label of the Trainer: the number of steps before it.
    """
    module, opts, scaler = _unwrap(model, optimizers, scaler)
    loggers = list(loggers) if isinstance(loggers, (list, tuple)) else [loggers]
    if not loggers or not all(callable(getattr(lg, "log_metrics", None)) for lg in loggers):
        raise TypeError(f"`loggers` must be loggers with a `log_metrics(metrics, step)` method, got {loggers!r}")
    monitor.check_histogram_loggers(loggers)
    epoch_loop = SimpleNamespace(
        batch_progress=SimpleNamespace(total=SimpleNamespace(ready=0)), _batches_that_stepped=0
    )
    device = next(iter(module.parameters())).device
    trainer = SimpleNamespace(
        optimizers=opts,
        loggers=loggers,
        strategy=SimpleNamespace(root_device=device),
        precision_plugin=SimpleNamespace(scaler=scaler),
        fit_loop=SimpleNamespace(epoch_loop=epoch_loop),
        # `logging_interval=None`: every 50 steps, as the Trainer's default `log_every_n_steps`; the monitor
        # itself is left as built (given to a Trainer later, it follows that Trainer's `log_every_n_steps`).
        _logger_connector=_EveryNSteps(epoch_loop, 50),
    )
    monitor._layout, monitor._pending, monitor._decided_batch = None, None, None
    monitor.on_train_start(trainer, module)  # type: ignore[arg-type]  (the Custom Scalars layout)

    def pre_hook(opt: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        def measure() -> None:
            monitor.on_before_optimizer_step(trainer, module, opt)  # type: ignore[arg-type]

        return after_closure(args, kwargs, measure)

    def post_hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
        monitor.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]
        epoch_loop._batches_that_stepped += 1
        epoch_loop.batch_progress.total.ready += 1

    monitor._standalone = trainer  # attached: Fabric's `on_after_optimizer_step` finds it at work
    handles = [o.register_step_pre_hook(pre_hook) for o in opts]
    handles.append(opts[-1].register_step_post_hook(post_hook))
    return Attachment(monitor, handles, steps=lambda: [epoch_loop._batches_that_stepped])


class _EveryNSteps:
    """The Trainer's ``_logger_connector.should_update_logs`` for a fixed ``log_every_n_steps``."""

    def __init__(self, epoch_loop: SimpleNamespace, every: int) -> None:
        self.epoch_loop, self.every = epoch_loop, every

    @property
    def should_update_logs(self) -> bool:
        return (self.epoch_loop._batches_that_stepped + 1) % self.every == 0


def _unwrap(
    model: nn.Module, optimizers: Optimizer | Sequence[Optimizer], scaler: Any
) -> tuple[nn.Module, list[Optimizer], Any]:
    """The user's module and optimizers under Fabric's wrappers, and the GradScaler (Fabric's, when not given)."""
    if scaler is None:
        scaler = getattr(getattr(getattr(model, "_strategy", None), "precision", None), "scaler", None)
    opts = [_unwrap_optimizer(o) for o in ([optimizers] if isinstance(optimizers, Optimizer) else optimizers)]
    if not opts or not all(isinstance(o, Optimizer) for o in opts):
        raise TypeError(f"`optimizers` must be a torch optimizer or a non-empty sequence of them, got {optimizers!r}")
    return _unwrap_module(model), opts, scaler


def _unwrap_module(model: Any) -> nn.Module:
    # Fabric's `_FabricModule` (either namespace): `.module` is the user's module, with its own names.
    if type(model).__name__ == "_FabricModule":
        model = model.module
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    return model


def _unwrap_optimizer(optimizer: Any) -> Any:
    # Fabric's `_FabricOptimizer` steps the optimizer it wraps, whose step hooks are the ones that run.
    inner = getattr(optimizer, "_optimizer", None)
    return inner if isinstance(inner, Optimizer) and hasattr(optimizer, "_strategy") else optimizer
