"""Resume in one place: a callback's key in checkpoints, the entry found for it, and the checks made at load.

`Resume` holds every flag of a resumed run -- whether a saved state was loaded, the checkpoint's own counts,
the module an entry is checked against at load, the unclaimed entries of the same class -- and nothing
else holds any. The callbacks call it from their Lightning hooks; what an entry must contain is asked of
the effects (``validated``, ``saved_state_needed``, ``missing_from_loaded``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_decay._checks import check_choice, is_count
from lightning_decay._compat import MisconfigurationException, rank_zero_info, rank_zero_warn
from lightning_decay.rules import DecayRules

__all__ = ["MISSING_STATE", "RESTORED_HINT", "Resume"]

#: What a resumed run does when the checkpoint has no state for a callback that needs one.
MISSING_STATE = ("raise", "restart")

RESTORED_HINT = (
    " This run resumes from a checkpoint, and Lightning restored the optimizer's param groups (their "
    "weight_decay included) from it: the run that wrote it decayed in the optimizer. To go on with the same "
    "decay, resume with WeightDecay(weight_decay=None), which takes it over (on the decayed parameters only)."
)


class Resume:
    """How one callback resumes: its ``state_key``, the adoption of a renamed entry, the load-time checks.

    Args:
        callback: The callback (its class names the key and the messages; ``_generate_state_key`` builds keys).
        name: The callback's ``name`` argument.
        given_rules: The ``rules`` argument (``None``: the module's, which must not move the key).
        missing_state: ``"raise"`` or ``"restart"``.
    """

    def __init__(self, callback: Any, name: str | None, given_rules: DecayRules | None, missing_state: str) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"`name` must be a string (the callback's key in checkpoints) or None, got {name!r}")
        if name == "":
            raise ValueError("`name` must be a non-empty string or None, got ''")
        self.missing_state = check_choice(missing_state, MISSING_STATE, "missing_state")
        self.cls, self.owner = type(callback), type(callback).__name__
        self.key = _state_key(callback, name, given_rules)
        self.loaded = False  # a saved state was loaded for the current run
        self.orphans: list[str] = []  # a resumed checkpoint's entries of this class that no callback claims
        self.resumed = False  # the current fit resumed from a checkpoint (messages only)
        # The module an entry is checked against at load, when Lightning restores callbacks before the
        # strategy's setup (ordinary strategies); `None` where the strategy restores later (FSDP, DeepSpeed).
        self.load_target: nn.Module | None = None
        # (global_step, number of optimizer states) of the checkpoint being restored, from `on_load_checkpoint`.
        self.counts: tuple[int | None, int | None] | None = None

    def new_run(self, load_target: nn.Module | None = None) -> None:
        """A new fit (or attach): nothing loaded yet."""
        self.loaded, self.orphans, self.resumed = False, [], False
        self.load_target, self.counts = load_target, None

    def end_fit(self) -> None:
        self.load_target, self.counts = None, None

    # ------------------------------------------------------------------------------ load
    def read_checkpoint(self, checkpoint: Mapping[str, Any], callbacks: Sequence[Any]) -> Any:
        """At ``on_load_checkpoint``: note the checkpoint's counts; the entry to adopt if this key is missing.

        An entry whose key changed (written under another ``rules``, or by a version whose keys held the
        coefficients) is adopted if it is the only unclaimed entry of this class and this callback the only
        one of its class without an entry. Returns that entry, or ``None``.
        """
        states = checkpoint.get("optimizer_states")
        global_step = checkpoint.get("global_step")
        self.counts = (
            global_step if isinstance(global_step, int) else None,
            len(states) if isinstance(states, (list, tuple)) else None,
        )
        entries = checkpoint.get("callbacks") or {}
        if self.key in entries:
            return None
        mine = [cb for cb in callbacks if type(cb) is self.cls]
        claimed = {cb.state_key for cb in callbacks}
        qualname = self.cls.__qualname__
        orphans = [
            k
            for k in entries
            if isinstance(k, str) and (k == qualname or k.startswith(qualname + "{")) and k not in claimed
        ]
        missing = [cb for cb in mine if cb.state_key not in entries]
        if len(orphans) == 1 and len(missing) == 1:
            rank_zero_info(
                f"{self.owner}: the checkpoint's entry {orphans[0]!r} is taken as this callback's "
                f"(key {self.key!r}): the only one of its class"
            )
            return entries[orphans[0]]
        self.orphans = orphans
        return None

    def validated(self, state_dict: Any) -> dict[str, Any]:
        """The base fields of a saved state, checked (a bad one fails here, not in a kernel)."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{self.owner}: a saved state must be a mapping, got {type(state_dict).__name__}")
        steps = state_dict.get("steps")
        if not isinstance(steps, (list, tuple)) or not all(is_count(s) for s in steps):
            raise ValueError(
                f"{self.owner}: the state field 'steps' must be a list of integers >= 0 (one step count "
                f"per optimizer), got {steps!r}"
            )
        return dict(state_dict)

    def check_loaded(self, steps: Sequence[int]) -> None:
        """At load, under a Trainer restore: the entry's step counts against the checkpoint's own counts."""
        counts, self.counts = self.counts, None
        if counts is not None:
            self.check_steps(steps, *counts)
        self.loaded = True

    def check_steps(self, steps: Sequence[int], global_step: int | None, optimizers: int | None) -> None:
        if optimizers is not None and steps and len(steps) != optimizers:
            raise ValueError(
                f"{self.owner}: the state field 'steps' has {len(steps)} step count(s) ({list(steps)}), the "
                f"checkpoint holds {optimizers} optimizer state(s): the entry belongs to another configuration. "
                "Resume from that run's checkpoint, or start a new fit."
            )
        if global_step is not None and any(s > global_step for s in steps):
            raise ValueError(
                f"{self.owner}: the checkpoint's state field 'steps' ({list(steps)}) counts more optimizer "
                f"steps than the checkpoint's global_step ({global_step}): the entry belongs to another run. "
                "Resume from that run's checkpoint, or start a new fit."
            )

    # ------------------------------------------------------------------------ train start
    def train_start(self, ckpt_path: Any, needed: list[str], missing: list[str]) -> None:
        """When training starts: refuse (or, with ``missing_state='restart'``, warn about) a resume that
        lacks state this callback needs. ``needed``: what no entry at all would lose; ``missing``: what the
        loaded entry lacks."""
        self.load_target, self.counts = None, None  # restored by now
        self.resumed = bool(ckpt_path)
        if not self.resumed:
            return
        lacking = missing if self.loaded else needed
        if not lacking:
            return
        what = " and ".join(lacking)
        where = (
            f"its saved state (key {self.key!r}) lacks {what}"
            if self.loaded
            else f"the checkpoint has no saved state for it (key {self.key!r}), which would hold {what}"
        )
        if self.missing_state == "restart":
            rank_zero_warn(f"{self.owner}: {where}; starting afresh as asked (missing_state='restart')")
            return
        found = (
            f" It has entries {self.orphans} of this class, none of them unambiguously this one's."
            if self.orphans
            else ""
        )
        raise MisconfigurationException(
            f"{self.owner} resumes from {ckpt_path}, but {where}.{found} Resume from a checkpoint written with "
            "this callback (give each instance of a class a fixed `name=` so its key stays the same), or pass "
            f"`missing_state='restart'` to start {what} afresh from here."
        )

    @property
    def hint(self) -> str:
        """What to add to a double-decay error of a resumed run."""
        return RESTORED_HINT if self.resumed else ""


def _state_key(callback: Any, name: str | None, given_rules: DecayRules | None) -> str:
    """Made of what identifies the callback, never of coefficients a resumed run may tune: the class, then
    ``name`` if given, else ``rules`` when they are not the default ones."""
    if name is not None:
        return callback._generate_state_key(name=name)
    if given_rules is not None and repr(given_rules) != repr(DecayRules()):
        return callback._generate_state_key(rules=repr(given_rules))  # the given rules: the key must not move
    return type(callback).__qualname__
