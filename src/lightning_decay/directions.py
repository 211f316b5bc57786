"""This step's update direction of an optimizer, read from its state and gradients before its step.

Cautious weight decay (Chen et al., arXiv 2510.12402) decays an entry only where the optimizer's update
``u`` and the weight agree in sign: ``x <- x - lr * (u + wd * 1[u * x >= 0] * x)``. Only the sign of
``u`` matters, so positive denominators, bias corrections and step sizes drop out. A direction here is
a tensor per parameter whose sign is that of ``u``, where the optimizer's own step (with its
``weight_decay=0``: the decoupled decay is ours) moves the weight by ``-lr * positive * u``. It is
computed before the step, by replaying the optimizer's own update of the state that sets the sign:

========================  ==================================  =============================================
optimizer (torch 2.13)    sign of ``u``                       from (site-packages ``torch/optim/``)
========================  ==================================  =============================================
Adam, AdamW (amsgrad)     ``exp_avg.lerp(g, 1 - beta1)``,     ``adam.py``: ``exp_avg.lerp_(grad, 1 - beta1)``,
                          zeros as ``exp_avg`` on a first     ``param.addcdiv_(exp_avg, denom, -step_size)``,
                          step                                ``denom = sqrt(v or max v) / bc2 + eps > 0``
RAdam                     as Adam                             ``radam.py``: both branches add
                                                              ``-exp_avg / bc1 * lr * (rect * adaptive)``
Adamax                    as Adam                             ``adamax.py``: ``addcdiv_(exp_avg, exp_inf)``
SGD                       ``g``; momentum: ``momentum * buf   ``sgd.py``: ``buf = grad.clone()`` on a first
                          + (1 - dampening) * g`` (``g`` on   step, ``buf.mul_(momentum).add_(grad, ...)``,
                          a first step); Nesterov:            nesterov ``grad.add(buf, alpha=momentum)``,
                          ``g + momentum * buf_new``          ``param.add_(grad, alpha=-lr)``
RMSprop (centered)        ``g``; momentum: ``momentum * buf   ``rmsprop.py``: ``param.addcdiv_(grad, avg)``
                          + g / avg`` (replayed)              or ``buf.mul_(momentum).addcdiv_(grad, avg)``
Adagrad                   ``g``                               ``adagrad.py``: ``addcdiv_(grad, std, -clr)``
Adadelta (``eps > 0``)    ``g``                               ``adadelta.py``: ``param.add_(delta, -lr)``,
                                                              ``delta = sqrt(acc + eps) / sqrt(v + eps) * g``
========================  ==================================  =============================================

``g`` is the gradient, negated under ``maximize`` as the optimizer does. Where the direction is ``g``
itself it is exact whatever the kernel (fused included). Where it is a new value of the state (Adam's
first moment, a momentum buffer), it is the optimizer's own value bitwise only if it is computed by the
same kernels: the same foreach ops as the optimizer's foreach path, or their per-tensor counterparts
(always on CPU, where the two paths round a scalar differently in place: that is replayed). So these
are refused (the caller measures the update instead, from the weights before and after the step; never
an approximate mask): ``fused=True``; a non-CPU device where the optimizer takes its single-tensor path;
tensor ``betas``/``momentum``; a nonzero ``weight_decay`` of the optimizer; complex parameters; sparse
gradients; NAdam (its update ``c1 * g + c2 * exp_avg`` has two coefficients, so its sign is not that
of one tensor the optimizer computes, and rounding can flip it where the two nearly cancel); any other
optimizer (``Muon``'s orthogonalized momentum, ``Rprop``, ``ASGD``'s built-in shrink, ``Adafactor``,
``SparseAdam``, Lion, custom ones) unless a direction is registered with
[`register_direction`][lightning_decay.directions.register_direction]. (Capturable Adam on CUDA runs the
same lerp, but it is not tested here, on CPU.)

The direction is this step's: the state is read before the step and updated on copies, so call it after
every change to the gradients (unscaling, clipping, penalties) and right before ``optimizer.step()``.

Cost (see [`lightning_decay.cautious`][lightning_decay.cautious]):

- known direction: extra memory ``Direction.temporaries`` chunk-sized tensors at a time (the direction
  and its intermediates; one more, the decayed chunk, for bf16/fp16 weights), which ``cautious_chunks``
  fits in the chunk budget (a few percent of the weights) whatever the model's size; no copy of the
  weights. Time: the direction's foreach passes (1 for Adam's lerp, 2-3 for SGD momentum, about 8 for
  RMSprop with momentum) plus 7 passes over the chunk for the mask and the decay, against 1 for plain
  decay (``benchmarks/run.py`` rows 1.cwd_decay measure it; see ``docs/cautious.md``).
- measured update: one copy of the decayed weights, taken before the step (the caller's), plus two
  chunk-sized temporaries; about 9 passes over the chunk after the step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _default_to_fused_or_foreach

from lightning_decay.norms import local_tensor

__all__ = ["Direction", "DirectionFn", "StateCache", "direction", "direction_fn", "register_direction"]

#: ``(optimizer, param_group, params) -> Direction | reason``: ``params`` are parameters of the group,
#: of one device and dtype, each with a gradient; a string says why no exact direction exists.
DirectionFn = Callable[[Optimizer, dict[str, Any], list[Tensor]], "Direction | str"]
Pieces = list[Tensor | None]


@dataclass(frozen=True)
class Direction:
    """How to form this step's update direction for a list of parameters, one chunk at a time.

    Attributes:
        inputs: Lists aligned with the parameters (the gradients first, then state tensors; ``None``
            where a parameter has no state yet), sliced into chunks like the parameters.
        compute: Called with the chunk's slices of ``inputs``; returns fresh tensors (the caller may
            modify them) whose signs are those of the update direction, entry by entry.
        temporaries: The most chunk-sized tensors ``compute`` holds at once, its output included.
    """

    inputs: tuple[Pieces, ...]
    compute: Callable[..., list[Tensor]]
    temporaries: int = 1


_REGISTRY: dict[type[Optimizer], DirectionFn] = {}


def register_direction(optimizer_class: type[Optimizer], fn: DirectionFn) -> None:
    """Register the direction of an optimizer class (replacing any registered one).

    Args:
        optimizer_class: A subclass of ``torch.optim.Optimizer``.
        fn: ``fn(optimizer, param_group, params)`` returning a [`Direction`][lightning_decay.directions.Direction]
            whose sign is exactly that of this step's update, or a string saying why there is none.

    Raises:
        TypeError: If ``optimizer_class`` is not an Optimizer subclass or ``fn`` is not callable.
    """
    if not (inspect.isclass(optimizer_class) and issubclass(optimizer_class, Optimizer)):
        raise TypeError(f"optimizer_class must be a subclass of torch.optim.Optimizer, got {optimizer_class!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable (optimizer, param_group, params) -> Direction | str, got {fn!r}")
    _REGISTRY[optimizer_class] = fn


def direction_fn(optimizer_class: type[Optimizer]) -> DirectionFn | None:
    """The direction registered for ``optimizer_class``: its own, else the nearest base class's in its MRO.

    A base's direction is inherited only if the subclass keeps the base's ``step`` (torch wraps
    ``step`` per class for profiling, hence the unwrap): a subclass that rewrites the update has its
    own direction, which only its author can register.
    """
    if optimizer_class in _REGISTRY:
        return _REGISTRY[optimizer_class]
    step = inspect.unwrap(optimizer_class.step)
    for base in optimizer_class.__mro__[1:]:
        if base in _REGISTRY:
            return _REGISTRY[base] if inspect.unwrap(base.step) is step else None  # type: ignore[attr-defined]
    return None


def direction(
    optimizer: Optimizer, group: dict[str, Any], params: list[Tensor], cache: StateCache | None = None
) -> Direction | str:
    """This step's direction of ``params`` (one group, one device and dtype, all with gradients).

    Args:
        optimizer: The optimizer about to step.
        group: The param group of ``params``.
        params: Parameters of the group, of one device and dtype, each with a gradient.
        cache: A [`StateCache`][lightning_decay.directions.StateCache] of these ``params`` (the same list
            object at every step) with this step's gradients set: the built-in directions then look the
            state up only when it changed, and loop over no parameter on other steps.

    Returns:
        A [`Direction`][lightning_decay.directions.Direction], or why there is no exact one (the caller
        then measures the update from the weights before and after the step).
    """
    fn = direction_fn(type(optimizer))
    if fn is None:
        return f"no direction is registered for {type(optimizer).__qualname__} (see register_direction)"
    if cache is None or cache.params is not params:
        return fn(optimizer, group, params)
    token = _CACHE.set(cache)
    try:
        return fn(optimizer, group, params)
    finally:
        _CACHE.reset(token)


class StateCache:
    """What the directions look up per parameter, kept for one fixed list of parameters between steps.

    The state lists (``exp_avg``, ``momentum_buffer``...) are kept once every parameter has its state,
    and looked up again when the optimizer's state may have changed: another ``optimizer.state`` object
    (``load_state_dict`` replaces it), another number of entries (a step creating state), another dict or
    tensor for the first parameter (state moved or replaced). Before every parameter has its state (the
    first steps) they are looked up at every step, so that no state created later is missed. An optimizer
    rebuilt is another optimizer: the caller drops its caches (``Binding.follow`` makes the effects forget).

    Facts fixed with the parameters (sparse gradients, the optimizer's foreach decision) are kept for the
    cache's life. Holding the looked-up state keeps it alive until the next look-up (one step).

    Args:
        params: The parameters, the same list object at every step.
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.grads: list[Tensor] | None = None  # this step's local gradients, aligned with params (the caller's)
        self.facts: dict[Any, Any] = {}
        self._seen: tuple[Any, ...] | None = None  # (keys, optimizer.state, its length, first dict, first tensors)
        self._lists: tuple[Pieces, ...] = ()
        self._full: tuple[bool, ...] = ()  # per list: no None in it
        self.lookups = 0  # state look-ups so far (what the tests count)

    def states(self, optimizer: Optimizer, keys: tuple[str, ...]) -> tuple[Pieces, ...]:
        """The local state tensors ``keys`` of the parameters (``None`` where not created yet)."""
        state = optimizer.state
        first = state.get(self.params[0])
        seen = self._seen
        if (
            seen is not None
            and seen[0] == keys
            and seen[1] is state
            and seen[2] == len(state)
            and seen[3] is first
            and all(t is first.get(k) for k, t in zip(keys, seen[4], strict=True))  # type: ignore[union-attr]
        ):
            return self._lists
        self.lookups += 1
        per = [state.get(p) for p in self.params]
        self._lists = tuple([None if s is None else _local(s.get(k)) for s in per] for k in keys)
        self._full = tuple(all(t is not None for t in lst) for lst in self._lists)
        complete = all(per)  # every parameter has its (non-empty) state: the lists are final until it changes
        self._seen = (keys, state, len(state), first, tuple(first.get(k) for k in keys)) if complete else None  # type: ignore[union-attr]
        return self._lists


_CACHE: ContextVar[StateCache | None] = ContextVar("lightning_decay_state_cache", default=None)


def _local(t: Tensor | None) -> Tensor | None:
    return None if t is None else local_tensor(t)


def _full(tensors: Pieces) -> bool:
    """Whether every parameter has this state tensor (known without a loop for the current cache's lists)."""
    cache = _CACHE.get()
    if cache is not None:
        for lst, full in zip(cache._lists, cache._full, strict=True):
            if lst is tensors:
                return full
    return all(t is not None for t in tensors)


def _fact(key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept in the current cache under ``key`` (a fact fixed with its parameters)."""
    cache = _CACHE.get()
    if cache is None:
        return compute()
    if key not in cache.facts:
        cache.facts[key] = compute()
    return cache.facts[key]


def _refusal(optimizer: Optimizer, group: dict[str, Any], params: list[Tensor], replayed: bool) -> str | None:
    """Why the group's direction is not exact, or ``None``; ``replayed``: it recomputes optimizer state."""
    name = type(optimizer).__qualname__
    wd = group.get("weight_decay", 0)
    if isinstance(wd, Tensor) or wd != 0:
        return f"{name} has weight_decay={wd} of its own (the cautious decay replaces it: set it to 0)"
    if params and (params[0].is_complex() or not params[0].is_floating_point()):
        return f"{name} has {params[0].dtype} parameters (the sign test needs real floating point)"
    if _fact("sparse", lambda: any(p.grad is not None and p.grad.is_sparse for p in params)):
        return f"{name} has sparse gradients"
    if not replayed:
        return None
    if group.get("fused"):
        return f"{name}(fused=True): its fused kernel's rounding of the state is not replayed by foreach ops"
    if params and params[0].device.type != "cpu" and not _foreach_path(optimizer, group):
        return (
            f"{name} takes its single-tensor path on {params[0].device.type}, whose kernels may round its state "
            "differently from the foreach ops replaying it (foreach=True, the default there, is supported)"
        )
    return None


def _foreach_path(optimizer: Optimizer, group: dict[str, Any]) -> bool:
    """Whether the optimizer's step takes its foreach path for this group, as its functional API decides."""
    foreach = group.get("foreach")
    if foreach is not None:
        return bool(foreach)
    if group.get("fused"):
        return False
    differentiable = bool(group.get("differentiable", False)) and not isinstance(optimizer, torch.optim.SGD)
    if isinstance(optimizer, torch.optim.Adam) and isinstance(group["lr"], Tensor) and not group.get("capturable"):
        return False  # adam.py: "Do not flip on foreach for ... lr is a Tensor and capturable=False"
    if differentiable:
        return False
    # torch decides from the parameters with a gradient, all of a supported type and device; when the
    # group's parameters all agree, any of its subsets does (kept), else decided again at each step.
    cache = _CACHE.get()
    if cache is not None:
        kept = cache.facts.get("foreach")
        if kept is None or kept[0] is not group["params"]:
            kept = cache.facts["foreach"] = (group["params"], _agreed_foreach(group["params"]))
        if kept[1] is not None:
            return kept[1]
    with_grads = [p for p in group["params"] if p.grad is not None]
    return _default_to_fused_or_foreach(with_grads, False, use_fused=False)[1]


def _agreed_foreach(params: list[Tensor]) -> bool | None:
    """torch's foreach decision for every single parameter, if it is the same for all (``None`` if mixed)."""
    each = {_default_to_fused_or_foreach([p], False, use_fused=False)[1] for p in params}
    return each.pop() if len(each) == 1 else None


def _gather(optimizer: Optimizer, params: list[Tensor], *keys: str) -> tuple[Pieces, ...]:
    """The gradients and the state tensors ``keys`` of ``params`` (``None`` where not created yet).

    From the current `StateCache` when there is one (its gradients, its kept state lists).
    """
    cache = _CACHE.get()
    if cache is not None and cache.grads is not None:
        return (cache.grads, *cache.states(optimizer, keys))  # type: ignore[return-value]
    if any(p.grad is None for p in params):
        raise ValueError("params must all have a gradient this step (leave out those without one, as AdamW does)")
    grads: Pieces = [local_tensor(p.grad) for p in params]  # type: ignore[arg-type]
    states = [optimizer.state.get(p, {}) for p in params]
    found = [[s.get(k) for s in states] for k in keys]
    return (grads, *([None if t is None else local_tensor(t) for t in ts] for ts in found))


def _signed(grads: list[Tensor], maximize: bool) -> list[Tensor]:
    """The gradient the optimizer steps along: negated (a new list) under ``maximize``, as it does."""
    return torch._foreach_neg(grads) if maximize else grads


def _filled(tensors: Pieces, like: list[Tensor]) -> list[Tensor]:
    """``tensors`` with zeros where a state is missing: the optimizers create their state as zeros."""
    return [torch.zeros_like(g) if t is None else t for t, g in zip(tensors, like, strict=True)]


def _mul(tensors: list[Tensor], scalar: float, in_place: bool) -> list[Tensor]:
    """New ``tensors * scalar``, rounded as the optimizer's own op: torch's in-place foreach multiply
    rounds the scalar to a low-precision dtype first; the out-of-place one and ``Tensor.mul_`` do not."""
    if not in_place:
        return torch._foreach_mul(tensors, scalar)
    out = torch._foreach_clone(tensors)
    torch._foreach_mul_(out, scalar)
    return out


def _add_scalar(tensors: list[Tensor], scalar: float, in_place: bool) -> list[Tensor]:
    """``tensors + scalar``, in place on our temporaries as the foreach path does, else out of place."""
    if in_place:
        torch._foreach_add_(tensors, scalar)
        return tensors
    return torch._foreach_add(tensors, scalar)


def first_moment_direction(optimizer: Optimizer, group: dict[str, Any], params: list[Tensor]) -> Direction | str:
    """Adam, AdamW, RAdam, Adamax: the sign of the new first moment ``exp_avg.lerp(g, 1 - beta1)``.

    Every other factor of their update is positive: Adam's ``lr / bc1`` over ``sqrt(v_hat) + eps``
    (``max v`` with ``amsgrad``), RAdam's rectified or unrectified ``lr / bc1`` (``rect > 0`` whenever
    ``rho_t > 5``, so its early steps keep the sign of the first moment), Adamax's ``lr / bc1`` over
    ``exp_inf``. On a first step the moment is zeros, as the optimizer creates it.
    """
    beta1 = group["betas"][0]
    if isinstance(beta1, Tensor):
        return f"{type(optimizer).__qualname__} has a tensor beta1 (cast to the parameters' dtype on some paths)"
    reason = _refusal(optimizer, group, params, replayed=True)
    if reason is not None:
        return reason
    weight, maximize = 1 - beta1, bool(group.get("maximize", False))
    inputs = _gather(optimizer, params, "exp_avg")
    every = _full(inputs[1])  # every parameter has its moment: no per-chunk check

    def compute(grads: list[Tensor], moments: Pieces) -> list[Tensor]:
        g = _signed(grads, maximize)
        if every or all(m is not None for m in moments):
            return torch._foreach_lerp(moments, g, weight)  # type: ignore[arg-type]
        have = [i for i, m in enumerate(moments) if m is not None]
        missing = [i for i, m in enumerate(moments) if m is None]
        started = [torch.zeros_like(g[i]) for i in missing]  # a first step: zeros, moved by the same lerp
        torch._foreach_lerp_(started, [g[i] for i in missing], weight)
        moved = torch._foreach_lerp([moments[i] for i in have], [g[i] for i in have], weight) if have else []  # type: ignore[misc]
        return _merge(len(g), (missing, started), (have, moved))

    return Direction(inputs, compute, 1 + maximize)


def gradient_direction(optimizer: Optimizer, group: dict[str, Any], params: list[Tensor]) -> Direction | str:
    """SGD without momentum, RMSprop without momentum, Adagrad: the sign of the (maximized) gradient.

    The update is ``lr * g`` or ``lr * g / positive`` (RMSprop's ``sqrt(avg) + eps``, Adagrad's
    ``sqrt(sum) + eps``): exact whatever the optimizer's kernel, fused included.
    """
    reason = _refusal(optimizer, group, params, replayed=False)
    if reason is not None:
        return reason
    maximize = bool(group.get("maximize", False))

    def compute(grads: list[Tensor]) -> list[Tensor]:
        return torch._foreach_neg(grads) if maximize else torch._foreach_sign(grads)

    return Direction(_gather(optimizer, params), compute, 1)


def _without_replay(
    optimizer: Optimizer, group: dict[str, Any], params: list[Tensor], name: str, scalars: tuple[str, ...]
) -> Direction | str | None:
    """What a momentum optimizer's direction is before any replay of its buffer: a refusal where one of
    ``scalars`` is a tensor or the replay cannot be exact, the gradient without momentum; else None."""
    if any(isinstance(group[key], Tensor) for key in scalars):
        return f"{name} has a tensor {' or '.join(scalars)}"
    if group["momentum"] == 0:
        return gradient_direction(optimizer, group, params)
    return _refusal(optimizer, group, params, replayed=True)


def sgd_direction(optimizer: Optimizer, group: dict[str, Any], params: list[Tensor]) -> Direction | str:
    """SGD: the gradient; with momentum the new buffer (the gradient on a first step), or Nesterov's
    ``g + momentum * buf_new``, replayed with the ops and in-place roundings of the optimizer's path."""
    early = _without_replay(optimizer, group, params, "SGD", ("momentum", "dampening"))
    if early is not None:
        return early
    momentum, dampening = group["momentum"], group["dampening"]
    maximize, nesterov = bool(group.get("maximize", False)), bool(group["nesterov"])
    # sgd.py's foreach path multiplies the buffers in place only when all of its device group have one
    in_place = _foreach_path(optimizer, group) and _all_have(optimizer, group, params, "momentum_buffer")
    inputs = _gather(optimizer, params, "momentum_buffer")
    every = _full(inputs[1])

    def compute(grads: list[Tensor], bufs: Pieces) -> list[Tensor]:
        g = _signed(grads, maximize)
        if every or all(b is not None for b in bufs):
            new = _mul(bufs, momentum, in_place)  # type: ignore[arg-type]
            torch._foreach_add_(new, g, alpha=1 - dampening)
        else:
            # sgd.py: a parameter without a buffer starts one as a copy of its gradient, undamped (a copy
            # only where we return it unchanged: a negated gradient is ours already, Nesterov only reads it)
            fresh = maximize or nesterov
            new = [(t if fresh else t.clone()) if b is None else t for t, b in zip(g, bufs, strict=True)]
            have = [i for i, b in enumerate(bufs) if b is not None]
            if have:  # ... and the others move theirs one tensor at a time (mul_ rounds like out of place)
                moved = _mul([bufs[i] for i in have], momentum, False)  # type: ignore[misc]
                torch._foreach_add_(moved, [g[i] for i in have], alpha=1 - dampening)
                for i, t in zip(have, moved, strict=True):
                    new[i] = t
        if nesterov:
            return torch._foreach_add(g, new, alpha=momentum)
        return new

    return Direction(inputs, compute, 2 + maximize)


def _all_have(optimizer: Optimizer, group: dict[str, Any], params: list[Tensor], key: str) -> bool:
    """Whether every parameter of the group with a gradient, of ``params``' device and dtype, has ``key``.

    With a `StateCache`: once every such parameter has it, with or without a gradient, it stays so until the
    state changes (``optimizer.state`` replaced, or entries added): kept until then.
    """
    if not params:
        return True
    cache, state = _CACHE.get(), optimizer.state
    if cache is not None:
        kept = cache.facts.get(("all_have", key))
        if kept is not None and kept[0] is state and kept[1] == len(state) and kept[2] is group["params"]:
            return True
    device, dtype = params[0].device, params[0].dtype
    same = [p for p in group["params"] if p.device == device and p.dtype == dtype]
    if all(state.get(p, {}).get(key) is not None for p in same):
        if cache is not None:
            cache.facts[("all_have", key)] = (state, len(state), group["params"])
        return True
    return all(state.get(p, {}).get(key) is not None for p in same if p.grad is not None)


def _merge(n: int, *parts: tuple[list[int], list[Tensor] | tuple[Tensor, ...]]) -> list[Tensor]:
    """One list of ``n`` tensors from ``(positions, tensors)`` parts covering ``range(n)``."""
    out: list[Tensor] = [None] * n  # type: ignore[list-item]
    for positions, tensors in parts:
        for i, t in zip(positions, tensors, strict=True):
            out[i] = t
    return out


def rmsprop_direction(optimizer: Optimizer, group: dict[str, Any], params: list[Tensor]) -> Direction | str:
    """RMSprop: the gradient; with momentum the new buffer ``momentum * buf + g / avg``, replayed.

    ``avg`` is replayed as ``rmsprop.py`` computes it (``sqrt`` of the new ``square_avg``, minus the new
    ``grad_avg`` squared when ``centered``, plus ``eps``), since with momentum the sign depends on it.
    """
    early = _without_replay(optimizer, group, params, "RMSprop", ("momentum", "alpha"))
    if early is not None:
        return early
    momentum = group["momentum"]
    alpha, eps, centered = group["alpha"], group["eps"], bool(group["centered"])
    maximize, in_place = bool(group.get("maximize", False)), _foreach_path(optimizer, group)

    inputs = _gather(optimizer, params, "square_avg", "momentum_buffer", "grad_avg")
    every = _full(inputs[1]) and _full(inputs[2]) and (not centered or _full(inputs[3]))

    def filled(tensors: Pieces, like: list[Tensor]) -> list[Tensor]:
        return tensors if every else _filled(tensors, like)  # type: ignore[return-value]

    def compute(grads: list[Tensor], squares: Pieces, bufs: Pieces, averages: Pieces) -> list[Tensor]:
        g = _signed(grads, maximize)
        avg = _mul(filled(squares, g), alpha, in_place)  # the new square_avg, then avg in its place
        torch._foreach_addcmul_(avg, g, g, value=1 - alpha)
        if centered:
            mean = torch._foreach_lerp(filled(averages, g), g, 1 - alpha)
            torch._foreach_addcmul_(avg, mean, mean, value=-1)
            del mean
        torch._foreach_sqrt_(avg)
        avg = _add_scalar(avg, eps, in_place)
        new = _mul(filled(bufs, g), momentum, in_place)
        torch._foreach_addcdiv_(new, g, avg)
        return new

    return Direction(inputs, compute, 3 + maximize)


def adadelta_direction(optimizer: Optimizer, group: dict[str, Any], params: list[Tensor]) -> Direction | str:
    """Adadelta: the gradient (``adadelta.py``: ``delta = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g``).

    The factor is positive only with ``eps > 0``: with ``eps = 0`` the first ``acc_delta`` is 0 and so
    is every update, whose direction is then 0, not the gradient's sign.
    """
    if not group["eps"] > 0:
        return f"Adadelta has eps={group['eps']} (its update is 0, not along the gradient, from acc_delta = 0)"
    return gradient_direction(optimizer, group, params)


def nadam_refusal(optimizer: Optimizer, group: dict[str, Any], params: list[Tensor]) -> str:
    """NAdam: refused, so that its update is measured (see the module)."""
    return (
        "NAdam's update c1 * g + c2 * exp_avg (nadam.py: two addcdiv_ with different coefficients) has no "
        "exact sign from one tensor the optimizer computes"
    )


for _cls, _fn in [
    (torch.optim.Adam, first_moment_direction),
    (torch.optim.AdamW, first_moment_direction),
    (torch.optim.RAdam, first_moment_direction),
    (torch.optim.Adamax, first_moment_direction),
    (torch.optim.SGD, sgd_direction),
    (torch.optim.RMSprop, rmsprop_direction),
    (torch.optim.Adagrad, gradient_direction),
    (torch.optim.Adadelta, adadelta_direction),
    (torch.optim.NAdam, nadam_refusal),
]:
    register_direction(_cls, _fn)
