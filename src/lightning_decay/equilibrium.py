r"""Rotational equilibrium of scale-invariant weights: predicted angle, timescale, scale invariance, verdict.

Framework-free (torch only, no Lightning). A weight followed by a normalization layer is scale invariant:
the loss does not change when it is scaled, so its gradient is orthogonal to it and shrinks as ``1/|w|``.
Weight decay then sets its *effective* learning rate, and the angle it turns per step settles at an
equilibrium that depends on the hyperparameters only (Kosson, Messmer, Jaggi, "Rotational Equilibrium",
ICML 2024). It gets there in a few timescales ``tau = 1/(lr * wd)`` steps (Wang & Aitchison 2024).

Derivation (the steady state of the norm recursion, in the spirit of Kosson et al.'s Section 3):
take an update that is a linear filter of the (normalized) gradients, ``u_t = lr * sum_k c_k g_{t-k}``,
gradients that are a random walk (uncorrelated across steps, orthogonal to ``w`` when computed), and a
decay that shrinks ``w`` by the fraction ``D`` per step. Write ``t = sum_k c_k`` (how far one gradient
moves ``w`` in total, in units of ``lr * g``) and ``r = sum_k c_k**2`` (the expected ``|u|**2`` per
step, in units of ``lr**2 |g|**2``). In equilibrium the decay removes what the gradients add to
``|w|**2``: ``2 D |w|**2 = (lr t)**2 |g|**2``. The update of one step is orthogonal to ``w`` to first
order, so the angle is ``|u| / |w|``, and

```text
angle**2 = lr**2 r |g|**2 / |w|**2 = 2 D r / t**2.
```

The decay per step is ``D = lr * (wd_decoupled + wd_coupled * t)``: a decoupled decay (AdamW,
``WeightDecay``) shrinks by ``lr * wd`` once, a coupled L2 term ``wd * w`` added to the gradient is
filtered like the gradient (momentum amplifies it by ``t``). For each optimizer:

- SGD: ``t = r = 1``, so ``sqrt(2 lr wd)``.
- SGD with momentum ``m`` and dampening ``d`` (``b = m b + (1-d) g``, ``u = lr b``): ``t = (1-d)/(1-m)``,
  ``r = (1-d)**2/(1-m**2)``; coupled decay: ``sqrt(2 lr wd (1-d)/(1+m))`` (Kosson et al.'s
  ``sqrt(2 lr wd/(1+m))`` at ``d = 0``); decoupled decay: ``sqrt(2 lr wd (1-m)/(1+m))``.
- SGD with Nesterov (``u = g + m b``, ``d = 0``): ``c_0 = 1 + m``, ``c_k = m**(k+1)``, so ``t = 1/(1-m)``,
  ``r = (1+2m-2m**3)/(1-m**2)``; coupled decay: ``sqrt(2 lr wd (1+2m-2m**3)/(1+m))``.
- Adam/AdamW: the first moment is momentum ``beta1`` with dampening ``beta1``: ``t = 1``,
  ``r = (1-b1)/(1+b1)``; decoupled decay: ``sqrt(2 lr wd (1-b1)/(1+b1))`` (Kosson et al.).
- RMSprop with momentum ``m``: ``t = 1/(1-m)``, ``r = 1/(1-m**2)``; decoupled decay:
  ``sqrt(2 lr wd (1-m)/(1+m))``, ``sqrt(2 lr wd)`` without momentum.

So dampening multiplies the effective learning rate by ``1 - d`` for a coupled decay (``lr * (1-d)`` is
the lr of an undampened SGD with the same steady state) and drops out for a decoupled one. Nesterov
(``u = g_t + m * b_t``) has ``c_0 = 1 + m``, ``c_k = m**(k+1)``. Adam's first moment is momentum with
dampening ``beta1``; its second moment only rescales the gradient (``v`` tracks ``|g|**2`` as ``|w|``
moves), which cancels in the angle. A coupled L2 inside an adaptive optimizer (``Adam(weight_decay>0)``,
``RMSprop(weight_decay>0)``) is divided by ``sqrt(v)`` as well: its decay per step depends on the gradient
scale, and there is no closed form in the hyperparameters (``None`` with a reason).

The timescale is ``tau = 1/D`` steps (``1/(lr * wd)`` for SGD and AdamW, Wang & Aitchison's
``tau_iter``). Under a schedule the natural generalisation of "steps / tau" is the integral of the decay
rate, ``sum_t D_t`` (``sum_t lr_t * wd_t``): after it, the initial norm has shrunk by ``exp(-sum_t D_t)``.

Wiring into ``WeightNormMonitor`` (one probe, on a logging step, per monitored tensor): the monitor
already has ``angular_update/{name}``; it needs, per param group of that tensor, the optimizer class and
the group dict (``lr``, ``weight_decay``, ``momentum``, ``dampening``, ``nesterov``, ``betas``,
``decoupled_weight_decay``), the decay a ``WeightDecay`` callback applied to the group
(``applied_weight_decay``; converted with ``lr_mode_coefficient`` for ``mode="lr_ratio"`` and
``"constant"``; a taken-over decay of SGD/Adam is coupled, of AdamW decoupled), and the ``l2`` of a
``WeightPenalty`` on it (coupled). ``predict_from_param_group`` gives the predicted angle and the
decay rate ``D`` (host floats, once per logging step and group). ``grad_weight_cosines`` needs the
gradients and the weights of the step (on the device, one foreach pass; no host sync until logging).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = [
    "AT_EQUILIBRIUM_TOLERANCE",
    "SCALE_INVARIANT_MAX_SCORE",
    "SETTLED_TIMESCALES",
    "TOO_WEAK_TIMESCALES",
    "Prediction",
    "cosines_from_partials",
    "equilibrium_angle",
    "filter_factors",
    "grad_weight_cosines",
    "grad_weight_partials",
    "lr_mode_coefficient",
    "predict_from_param_group",
    "scale_invariance_scores",
    "tail_mean",
    "timescale_epochs",
    "timescale_steps",
    "timescales_covered",
    "verdict",
]

#: A tensor is scale invariant when ``|cos(grad, w)| * sqrt(numel)`` is below this. A gradient direction
#: uncorrelated with ``w`` gives ``|cos| ~ sqrt(2/pi) / sqrt(numel)`` (score about 0.8, rarely under 0.1
#: averaged over logging steps); a loss that depends on the scale adds a radial part on top. A weight
#: followed by a normalization layer has ``grad . w = 0`` exactly up to float rounding and the
#: normalization's ``eps`` (a radial part of about ``eps / var``): float32 behind ``LayerNorm(eps=1e-5)``
#: scores about 3e-3 (tests/test_equilibrium.py), bf16 products about 1e-2. 0.1 lies an order of magnitude
#: from both.
SCALE_INVARIANT_MAX_SCORE = 0.1
#: "At equilibrium" when ``measured / predicted`` lies in ``[1/(1+tol), 1+tol]``. A clean simulation
#: is within 10 % (tests/test_equilibrium.py); real gradients carry signal besides noise, and lr/wd drift
#: during the last tenth of the logged steps, so the verdict allows twice that.
AT_EQUILIBRIUM_TOLERANCE = 0.2
#: Below this many timescales the decay shrank the weights by under ``1 - exp(-0.1)``, about 10 %, over
#: the whole run: "decay too weak to matter in this run".
TOO_WEAK_TIMESCALES = 0.1
#: After this many timescales the norm has settled (``|w|**2`` relaxes as ``exp(-2 D t)`` or faster,
#: ``exp(-6)`` after 3): a measured angle still off the prediction is then "not at equilibrium".
SETTLED_TIMESCALES = 3.0


@dataclass(frozen=True)
class Prediction:
    """The predicted equilibrium of one param group.

    Attributes:
        angle: The angular update per step in radians at equilibrium, or ``None`` (see ``reason``).
        decay_rate: ``D``, the fraction by which the decay shrinks the weights per step (``tau = 1/D``).
        reason: Why ``angle`` is ``None``; empty otherwise.
    """

    angle: float | None
    decay_rate: float
    reason: str = ""


def filter_factors(momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> tuple[float, float]:
    """``(t, r)`` of a momentum filter: total displacement and per-step ``|u|**2`` per gradient (module doc).

    Args:
        momentum: The momentum ``m`` in ``[0, 1)`` (Adam's ``beta1``).
        dampening: The dampening ``d`` in ``[0, 1]`` (Adam: ``beta1``).
        nesterov: Nesterov momentum (needs ``dampening == 0``, as in ``torch.optim.SGD``).

    Raises:
        ValueError: If ``momentum`` is not in ``[0, 1)``, ``dampening`` not in ``[0, 1]``, or Nesterov has
            a dampening or no momentum.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}")
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"`dampening` must be in [0, 1], got {dampening!r}")
    if nesterov:
        if momentum <= 0.0 or dampening != 0.0:
            raise ValueError("Nesterov momentum requires a momentum and zero dampening (as torch.optim.SGD)")
        return 1.0 / (1.0 - momentum), (1.0 + 2.0 * momentum - 2.0 * momentum**3) / (1.0 - momentum**2)
    keep = 1.0 - dampening
    return keep / (1.0 - momentum), keep**2 / (1.0 - momentum**2)


def equilibrium_angle(
    lr: float,
    decoupled: float = 0.0,
    coupled: float = 0.0,
    *,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    adaptive: bool = False,
) -> Prediction:
    """The equilibrium angle ``sqrt(2 D r) / t`` with ``D = lr * (decoupled + coupled * t)`` (module doc).

    Args:
        lr: The learning rate.
        decoupled: Decoupled decay coefficient, ``w *= 1 - lr * decoupled`` per step (AdamW, ``WeightDecay``).
        coupled: Coupled L2 coefficient, ``g += coupled * w`` (SGD's ``weight_decay``, ``WeightPenalty(l2)``).
        momentum: See ``filter_factors``.
        dampening: See ``filter_factors``.
        nesterov: See ``filter_factors``.
        adaptive: The update is divided by a running gradient scale (Adam, RMSprop): then a coupled L2
            has no closed form.

    Raises:
        ValueError: If ``lr``, ``decoupled`` or ``coupled`` is negative or not finite, or the momentum
            arguments are invalid.
    """
    for value, argument in ((lr, "lr"), (decoupled, "decoupled"), (coupled, "coupled")):
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"`{argument}` must be a finite number >= 0, got {value!r}")
    t, r = filter_factors(momentum, dampening, nesterov)
    if adaptive and coupled > 0.0:
        reason = (
            "coupled L2 inside an adaptive optimizer (Adam/RMSprop weight_decay > 0) is divided by sqrt(v): "
            "its decay depends on the gradient scale, no closed form"
        )
        return Prediction(None, lr * decoupled, reason)
    rate = lr * (decoupled + coupled * t)
    return Prediction(math.sqrt(2.0 * rate * r) / t, rate)


def lr_mode_coefficient(mode: str, weight_decay: float, lr: float, initial_lr: float) -> float:
    """The ``mode="lr"`` coefficient equal to a ``WeightDecay`` decay of ``mode`` (shrink ``lr * result``).

    ``"lr"``: ``weight_decay``; ``"lr_ratio"`` (shrink ``lr / lr0 * wd``): ``wd / lr0``; ``"constant"``
    (shrink ``wd``): ``wd / lr`` (0 when ``lr`` is 0: then nothing moves).

    Raises:
        ValueError: If ``mode`` is not one of ``"lr"``, ``"lr_ratio"``, ``"constant"``.
    """
    if mode == "lr":
        return weight_decay
    if mode == "lr_ratio":
        return weight_decay / initial_lr if initial_lr > 0 else 0.0
    if mode == "constant":
        return weight_decay / lr if lr > 0 else 0.0
    raise ValueError(f"`mode` must be one of 'lr', 'lr_ratio', 'constant', got {mode!r}")


def predict_from_param_group(
    group: Mapping[str, Any],
    optimizer: Any,
    decoupled_weight_decay: float = 0.0,
    coupled_l2: float = 0.0,
) -> Prediction:
    """The equilibrium of a torch optimizer's param group, plus decay applied from outside.

    Args:
        group: The param group dict (``lr``, ``weight_decay``, ``momentum``, ``dampening``, ``nesterov``,
            ``betas``, ``decoupled_weight_decay`` as the optimizer has them).
        optimizer: The optimizer, its class, or the class name: ``SGD``, ``Adam``, ``AdamW``, ``RMSprop``.
        decoupled_weight_decay: The ``mode="lr"`` coefficient of a ``WeightDecay`` on the group.
        coupled_l2: A coupled L2 coefficient added to the gradient (``WeightPenalty(l2)``, or a decay a
            ``WeightDecay`` took over from SGD/Adam).

    Returns:
        The ``Prediction``; ``angle`` is ``None`` with a reason for a coupled L2 in Adam/RMSprop and
        for optimizers without a derivation here.
    """
    name = _optimizer_kind(optimizer)
    lr = float(group["lr"])  # a tensor lr: one host read, on a logging step only
    own = float(group.get("weight_decay", 0.0))
    if name == "SGD":
        momentum = float(group.get("momentum", 0.0))
        dampening = float(group.get("dampening", 0.0)) if momentum > 0 else 0.0
        return equilibrium_angle(
            lr, decoupled_weight_decay, own + coupled_l2, momentum=momentum, dampening=dampening,
            nesterov=bool(group.get("nesterov", False)),
        )  # fmt: skip
    if name in ("Adam", "AdamW"):
        beta1 = float(group["betas"][0])
        decoupled = name == "AdamW" or bool(group.get("decoupled_weight_decay", False))
        own_decoupled, own_coupled = (own, 0.0) if decoupled else (0.0, own)
        return equilibrium_angle(
            lr, own_decoupled + decoupled_weight_decay, own_coupled + coupled_l2, momentum=beta1, dampening=beta1,
            adaptive=True,
        )  # fmt: skip
    if name == "RMSprop":
        momentum = float(group.get("momentum", 0.0))
        return equilibrium_angle(lr, decoupled_weight_decay, own + coupled_l2, momentum=momentum, adaptive=True)
    rate = lr * decoupled_weight_decay
    return Prediction(None, rate, f"no equilibrium derived for {name} (SGD, Adam, AdamW, RMSprop are)")


def _optimizer_kind(optimizer: Any) -> str:
    """The first of SGD, AdamW, Adam, RMSprop in the class's MRO (a subclass is its base), else its name."""
    if isinstance(optimizer, str):
        return optimizer
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for base in cls.__mro__:
        if base.__module__.startswith("torch.optim") and base.__name__ in _DERIVED:
            return base.__name__
    return cls.__name__


_DERIVED = ("SGD", "Adam", "AdamW", "RMSprop")


def timescale_steps(decay_rate: float) -> float:
    """``tau = 1 / D`` steps (``1 / (lr * wd)`` for SGD and AdamW); ``inf`` without decay."""
    return 1.0 / decay_rate if decay_rate > 0 else math.inf


def timescale_epochs(tau_steps: float, steps_per_epoch: int) -> float:
    """``tau`` in epochs: ``tau_steps / steps_per_epoch`` (Wang & Aitchison's ``tau_epoch``)."""
    if steps_per_epoch < 1:
        raise ValueError(f"`steps_per_epoch` must be >= 1, got {steps_per_epoch!r}")
    return tau_steps / steps_per_epoch


def timescales_covered(
    decay_rates: Sequence[float], steps: Sequence[int] | None = None, total_steps: int | None = None
) -> float:
    """How many timescales a run covered: ``sum_t D_t`` over its optimizer steps (``sum_t lr_t * wd_t``).

    Args:
        decay_rates: ``D`` per step, or per logging step when ``steps`` is given.
        steps: The optimizer step (0-based) of each value: each value then holds from its step to the
            next one's, the first from step 0, the last up to ``total_steps``.
        total_steps: The number of optimizer steps of the run (default: the last step + 1).
    """
    if not decay_rates:
        return 0.0
    if steps is None:
        return float(sum(decay_rates))
    if len(steps) != len(decay_rates):
        raise ValueError(f"`steps` has {len(steps)} entries for {len(decay_rates)} decay rates")
    end = steps[-1] + 1 if total_steps is None else total_steps
    bounds = [0, *steps[1:], end]
    return float(sum(rate * max(b - a, 0) for rate, a, b in zip(decay_rates, bounds[:-1], bounds[1:], strict=True)))


def tail_mean(values: Sequence[float], fraction: float = 0.1) -> float:
    """The mean of the last ``fraction`` of ``values`` (at least one value); ``nan`` for none."""
    if not values:
        return math.nan
    count = max(1, math.ceil(len(values) * fraction))
    return float(sum(values[-count:]) / count)


def grad_weight_cosines(grads: Sequence[Tensor], weights: Sequence[Tensor]) -> list[Tensor]:
    """``|cos(grad, w)|`` per tensor as 0-dim float32 tensors on each tensor's device; 0 if either is zero.

    One pass of foreach kernels per (device, dtype) group, no host sync. The signed dot product comes
    from two 1-norms, ``sum p = 2 * sum max(p, 0) - sum |p|`` with ``p = grad * w``: its rounding error is
    relative to ``sum |p| <= |grad| |w|``, so an exactly orthogonal pair gives ``|cos|`` of float rounding.
    """
    if len(grads) != len(weights):
        raise ValueError(f"`grads` has {len(grads)} tensors for {len(weights)} weights")
    # Foreach norms refuse empty tensors: an empty pair has nothing to align, 0 (shapes only, no sync).
    out = [torch.zeros((), dtype=torch.float32, device=g.device) if g.numel() == 0 else None for g in grads]
    nonempty = [i for i, c in enumerate(out) if c is None]
    pairs = [[grads[i] for i in nonempty], [weights[i] for i in nonempty]]
    for [group_g, group_w], positions in _group_tensors_by_device_and_dtype(pairs, with_indices=True).values():  # type: ignore[arg-type]
        g, w = cast("list[Tensor]", group_g), cast("list[Tensor]", group_w)
        products = torch._foreach_mul(g, w)
        absolute = torch.stack(torch._foreach_norm(products, 1, dtype=torch.float32))
        torch._foreach_clamp_min_(products, 0.0)
        positive = torch.stack(torch._foreach_norm(products, 1, dtype=torch.float32))
        denominator = torch.stack(torch._foreach_norm(g, 2, dtype=torch.float32)) * torch.stack(
            torch._foreach_norm(w, 2, dtype=torch.float32)
        )
        cos = ((2.0 * positive - absolute).abs() / denominator).clamp(max=1.0)
        cos = torch.where(denominator > 0, cos, torch.zeros_like(cos))
        for j, c in zip(positions, cos.unbind(), strict=True):
            out[nonempty[j]] = c
    return out  # type: ignore[return-value]


def grad_weight_partials(
    grads: Sequence[Tensor],
    weights: Sequence[Tensor],
    scratch: Sequence[Tensor] | None = None,
    with_weights: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad . w, |grad|**2, |w|**2)`` per tensor, three 1-D float32 tensors in input order (first device).

    Partials that add up across tensors and shards (sum them, then ``|cos| = |dot| / sqrt(g2 * w2)``): the
    signed dot product comes from two 1-norms as in `grad_weight_cosines`. Stacked per (device, dtype) group,
    no per-tensor Python work. The products ``grad * w`` are written into ``scratch`` when given (tensors of
    the weights' shapes, dtypes and devices, overwritten: a kept snapshot buffer before the snapshot is
    taken), else into fresh tensors. Empty tensors give zeros. ``with_weights=False`` leaves ``|w|**2`` at zero
    (for a caller that has it already).

    float32/float64 tensors on the CPU take one BLAS dot product per tensor instead (no buffer): CPU foreach
    kernels loop over the tensors anyway, and a 1-norm costs there about 2.5 times a 2-norm, so the product
    and two 1-norms cost about 5 times the dots.
    """
    if len(grads) != len(weights) or (scratch is not None and len(scratch) != len(weights)):
        raise ValueError(f"`grads`, `weights` and `scratch` differ in length ({len(grads)}, {len(weights)})")
    device = weights[0].device if len(weights) else torch.device("cpu")
    out = torch.zeros(3, len(weights), dtype=torch.float32, device=device)
    nonempty = [i for i, w in enumerate(weights) if w.numel() > 0]
    if not nonempty:
        return out[0], out[1], out[2]
    lists = [[grads[i] for i in nonempty], [weights[i] for i in nonempty]]
    if scratch is not None:
        lists.append([scratch[i] for i in nonempty])
    for groups, positions in _group_tensors_by_device_and_dtype(lists, with_indices=True).values():  # type: ignore[arg-type]
        g, w = cast("list[Tensor]", groups[0]), cast("list[Tensor]", groups[1])
        dot = _dots(g, w, None if scratch is None else cast("list[Tensor]", groups[2]))
        g2 = torch.stack(torch._foreach_norm(g, 2, dtype=torch.float32)).square()
        w2 = torch.stack(torch._foreach_norm(w, 2, dtype=torch.float32)).square() if with_weights else g2 * 0
        index = torch.tensor([nonempty[j] for j in positions], dtype=torch.long, device=device)
        out.index_copy_(1, index, torch.stack([dot, g2, w2]).to(device))
    return out[0], out[1], out[2]


def _dots(g: list[Tensor], w: list[Tensor], scratch: list[Tensor] | None) -> Tensor:
    """``grad . w`` per tensor of one (device, dtype) group, float32 (see `grad_weight_partials`)."""
    if g[0].device.type == "cpu" and g[0].dtype in (torch.float32, torch.float64):
        return torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(g, w, strict=True)]).float()
    if scratch is not None:
        products = scratch
        torch._foreach_copy_(products, g)
        torch._foreach_mul_(products, w)
    else:
        products = list(torch._foreach_mul(g, w))
    absolute = torch.stack(torch._foreach_norm(products, 1, dtype=torch.float32))
    torch._foreach_clamp_min_(products, 0.0)
    positive = torch.stack(torch._foreach_norm(products, 1, dtype=torch.float32))
    return 2.0 * positive - absolute


def cosines_from_partials(dot: Tensor, g2: Tensor, w2: Tensor) -> Tensor:
    """``|cos(grad, w)|`` from summed `grad_weight_partials`, clamped to 1; 0 where either is zero (no NaN)."""
    denominator = (g2 * w2).sqrt()
    cos = (dot.abs() / denominator).clamp(max=1.0)
    return torch.where(denominator > 0, cos, torch.zeros_like(cos))


def scale_invariance_scores(cosines: Tensor, numels: Tensor) -> Tensor:
    """``|cos(grad, w)| * sqrt(numel)``: about 0.8 for an unrelated direction, ~0 for a scale-invariant weight.

    Compare with ``SCALE_INVARIANT_MAX_SCORE`` (averaged over logging steps). Elementwise on the device.
    """
    return cosines * numels.to(cosines.dtype).sqrt()


def verdict(
    covered: float,
    measured: float | None,
    predicted: float | None,
    score: float | None,
    reason: str = "",
) -> str:
    """The verdict in words for one layer (thresholds: the module's named constants).

    Args:
        covered: Timescales the run covered (``timescales_covered``).
        measured: The mean angle over the last tenth of the logged steps (``None``/``nan``: not measured).
        predicted: The predicted equilibrium angle, ``None`` when there is none (then ``reason``).
        score: The mean scale-invariance score (``scale_invariance_scores``), ``None`` if unknown.
        reason: Why there is no prediction.
    """
    if score is not None and score > SCALE_INVARIANT_MAX_SCORE:
        return f"not scale invariant (score {score:.2g}), so equilibrium does not apply"
    if predicted is None:
        return f"no equilibrium prediction: {reason}" if reason else "no equilibrium prediction"
    if covered < TOO_WEAK_TIMESCALES:
        return f"decay too weak to matter in this run (covered {covered:.2g} tau)"
    if measured is None or not math.isfinite(measured) or predicted <= 0:
        return f"no angle measured (covered {covered:.2g} tau)"
    ratio = measured / predicted
    if 1.0 / (1.0 + AT_EQUILIBRIUM_TOLERANCE) <= ratio <= 1.0 + AT_EQUILIBRIUM_TOLERANCE:
        return f"at equilibrium (covered {covered:.2g} tau)"
    if covered < SETTLED_TIMESCALES:
        return f"still approaching (covered {covered:.2g} tau)"
    return f"not at equilibrium after {covered:.2g} tau (measured/predicted {ratio:.2f})"
