"""``WeightPenalty``: L1 / L2 / L2-SP penalties added through the gradient, once per optimizer step.

The Lightning adapter of `lightning_decay._references.References` (L2-SP), and of
`lightning_decay._penalty_effect.GradientPenalty` and ``ProximalL1``: the arguments, the ``penalty/*``
values on logging steps, and the ``refs`` field of the saved state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor, nn

from lightning_decay._checks import check_choice, check_flag
from lightning_decay._compat import pl, rank_zero_warn
from lightning_decay._lightning import Regularizer, should_log
from lightning_decay._options import patterns
from lightning_decay._penalty_effect import GradientPenalty, ProximalL1, penalty_values, uses
from lightning_decay._references import References
from lightning_decay.rules import DecayRules
from lightning_decay.schedules import Constant, ScheduleLike, as_schedule

__all__ = ["WeightPenalty"]

_L1_MODES = ("subgradient", "proximal")


class WeightPenalty(Regularizer):
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
        self._l1 = as_schedule(l1, "l1")
        self._l2 = as_schedule(l2, "l2")
        self._l2_head = self._l2 if l2_head is None else as_schedule(l2_head, "l2_head")
        self.l1_mode = check_choice(l1_mode, _L1_MODES, "l1_mode")
        self._references = References(reference, patterns(head, "head"))
        self.head = self._references.head
        self.log_penalty = check_flag(log_penalty, "log_penalty")
        proximal = self.l1_mode == "proximal"
        effects = [
            self._references,
            GradientPenalty(self._l2, self._l2_head, None if proximal else self._l1),
            *([ProximalL1(self._l1)] if proximal else []),
        ]
        super().__init__(
            rules, name, missing_state, effects, tag=self._references.tag, decays=self._decays, pull=self._pull
        )
        self._warn_no_ops(l2_head)

    @property
    def _reference(self) -> Any:
        return self._references.reference

    def _pull(self) -> str:
        # L2-SP does not shrink the weights: it pulls them back toward the reference (only new ones toward zero).
        return "toward its reference weights (L2-SP)" if self._reference is not None else "toward zero"

    def _decays(self) -> bool:
        """Whether the penalty pulls weights toward zero like ``weight_decay`` (an L2 term)."""
        return uses(self._l2) or uses(self._l2_head)

    def _warn_no_ops(self, l2_head: ScheduleLike | None) -> None:
        """Warn about arguments that can have no effect, naming them."""
        if not any(uses(s) for s in (self._l1, self._l2, self._l2_head)):
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
        if self.l1_mode == "proximal" and not uses(self._l1):
            rank_zero_warn("WeightPenalty: `l1_mode='proximal'` does nothing with `l1=0`")

    # -------------------------------------------------------------------------- logging
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.log_penalty or not self._binding.bound or not should_log(trainer):
            return
        for key, value in self.penalty_values().items():
            pl_module.log(key, value, on_step=True, on_epoch=False, prog_bar=False, batch_size=1)

    def penalty_values(self) -> dict[str, float]:
        """The current ``penalty/l1`` and ``penalty/l2`` values, with one device-to-host copy.

        Under FSDP2 the per-shard sums are added across ranks with one all-reduce (every rank must call),
        a replicated parameter's (HSDP) from one replica only.
        """
        l1 = self._l1 if uses(self._l1) else None
        l2 = self._l2 if self._decays() else None
        return penalty_values(self._binding, l1, l2, self._l2_head, self._nonfinite)

    # ---------------------------------------------------------------------------- state
    def _state(self) -> dict[str, Any]:
        return {"refs": self._references.state()}

    def _validated(self, state: dict[str, Any]) -> None:
        References.validated(state.get("refs", {}))

    def _load(self, state: dict[str, Any]) -> None:
        self._references.load(state.get("refs", {}))

    def _needed(self) -> list[str]:
        needed = self._references.saved_state_needed()
        used = [(a, s) for a, s in (("l1", self._l1), ("l2", self._l2), ("l2_head", self._l2_head)) if uses(s)]
        scheduled = [f"`{a}`" for a, s in used if not isinstance(s, Constant)]
        if scheduled:
            needed.append(f"the step count of the {', '.join(scheduled)} schedule{'s' if len(scheduled) > 1 else ''}")
        return needed

    def _missing(self) -> list[str]:
        return self._references.missing_from_loaded()

    def _check_module(self, state: dict[str, Any], module: nn.Module) -> None:
        self._references.check_against_module(state.get("refs", {}), module, self.rules)
