"""Without a ``Trainer``: what ``attach`` returns, and the unwrapping of Fabric's model and optimizers.

Fabric and plain PyTorch loops have no ``on_before_optimizer_step``. ``attach`` binds a callback's engine
(`lightning_decay._binding.Binding`) to the model and its optimizers with ``step_hooks=True``: its
per-step work then runs from a step pre-hook of each optimizer (after the step's closure when it is given
one), its post-step work (step counts, proximal L1, the monitor's logging) from a step post-hook. The same
code the Trainer hooks call, not a second implementation. Step hooks run only when a step really runs, so
a step the ``GradScaler`` skips is neither regularized nor counted.

``Fabric(callbacks=[WeightDecay(...)])`` alone would do nothing: Fabric calls only the hooks its loop
names, and after each optimizer step ``on_after_optimizer_step``, which the callbacks answer with
`not_attached_error` unless they are attached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_decay._compat import MisconfigurationException, rank_zero_warn

__all__ = ["Attachment", "not_attached_error", "unwrap"]


class Attachment:
    """What ``attach`` returns: the bound callback, its state for checkpoints, and ``remove``.

    Also a context manager: ``with decay.attach(model, optimizer): ...`` removes the hooks on exit.

    Attaching the same callback again (to other optimizers, or to the same ones: a new run) supersedes this
    attachment: its ``remove()`` then does nothing but warn, and the later attachment's ``remove()`` is the one
    that takes the callback off.

    Attributes:
        regularizer: The attached ``WeightDecay`` or ``WeightPenalty`` (or ``WeightNormMonitor``).
    """

    def __init__(self, regularizer: Any, steps: Callable[[], list[int]]) -> None:
        self.regularizer = regularizer
        self._steps = steps
        self._removed = False
        # The callback's live attachment is the latest one: an earlier one's `remove()` must not unbind it.
        # (The callback's `attach` has already replaced the earlier binding with its new one.)
        regularizer._attachment = self

    @property
    def steps(self) -> list[int]:
        """Optimizer steps taken so far while attached, per optimizer (schedules read these); the monitor's:
        the steps of its last optimizer."""
        return list(self._steps())

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
        self._removed = True
        if self.regularizer._attachment is not self:
            rank_zero_warn(
                f"{self!r}.remove() does nothing: {type(self.regularizer).__name__} was attached again since, and "
                "that later binding stays. Call remove() on the Attachment the later `attach` returned."
            )
            return
        self.regularizer._attachment = None
        self.regularizer.unbind()

    def __repr__(self) -> str:
        state = ", removed" if self._removed else "" if self.attached else ", superseded"
        return f"Attachment({self.regularizer!r}, steps={self.steps}{state})"

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def not_attached_error(owner: str, how: str, does: str = "regularizes nothing") -> MisconfigurationException:
    """The refusal of ``on_after_optimizer_step`` (Fabric calls it on the objects of ``Fabric(callbacks=...)``,
    no Trainer hook has this name) by a callback that is not attached: it would silently do nothing there."""
    return MisconfigurationException(
        f"{owner} was given to Fabric(callbacks=...), which calls only the hooks your loop names: as a Fabric "
        f"callback it {does}. Attach it to the model and optimizer instead, after `fabric.setup`: `{how}` (see "
        "the 'Fabric and plain PyTorch' docs page)."
    )


def unwrap(
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
