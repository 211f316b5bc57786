"""Checkpoints written by the release before the engine redesign (issue #19) resume exactly.

The fixtures in ``tests/fixtures/`` were written by ``python -m tests.fixtures.make_release_fixtures`` with
the code of that release: each a Lightning checkpoint after 2 epochs, the weights that code reached when it
resumed the checkpoint for 2 more epochs, and its callbacks' state at the end. Here the code under test
resumes the same checkpoints with the same scenarios (built by the same module) and must reach the same
weights bitwise: both sides run the same float32 CPU kernels in the same order (foreach off, no shuffling),
so any difference is a change of behaviour, not rounding. The state must have the same keys and fields,
and the same values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.make_release_fixtures import FIRST_EPOCHS, HERE, MORE_EPOCHS, SCENARIOS, callback_states, fit


def assert_same_state(got: Any, want: Any, where: str) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same_state(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_state(g, w, f"{where}[{i}]")
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_release_checkpoint_resumes_to_the_release_weights(scenario: Any, tmp_path: Path) -> None:
    ckpt = HERE / f"{scenario.name}.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    trainer, module = fit(scenario, FIRST_EPOCHS + MORE_EPOCHS, tmp_path, ckpt_path=ckpt)

    want = torch.load(HERE / f"{scenario.name}.resumed.pt", weights_only=False)
    got = module.net.state_dict()
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{scenario.name}: {name} differs from the release's resume"
    # The resume really went on from the checkpoint: some weight moved in the resumed epochs.
    first = {k[len("net.") :]: v for k, v in checkpoint["state_dict"].items()}
    assert any(not torch.equal(first[k], v) for k, v in want.items())

    # Same state keys, same fields, same values as the release's resumed callbacks.
    assert_same_state(
        callback_states(trainer), torch.load(HERE / f"{scenario.name}.state.pt", weights_only=False), "state"
    )
    assert trainer.global_step == checkpoint["global_step"] * (FIRST_EPOCHS + MORE_EPOCHS) // FIRST_EPOCHS


def test_release_checkpoints_hold_the_documented_fields() -> None:
    """The entries as the release wrote them: ``steps`` everywhere, ``taken_over`` and ``refs`` where they belong."""
    fields = {
        name: {
            key: sorted(entry)
            for key, entry in torch.load(HERE / f"{name}.ckpt", weights_only=False)["callbacks"].items()
        }
        for name in ("takeover_sgd", "l2sp_schedule", "decay_schedule_proximal_l1")
    }
    assert fields["takeover_sgd"] == {"WeightDecay": ["steps", "taken_over"]}
    assert fields["l2sp_schedule"] == {"WeightPenalty": ["refs", "steps"]}
    assert fields["decay_schedule_proximal_l1"] == {
        "WeightDecay": ["steps", "taken_over"],
        "WeightPenalty": ["refs", "steps"],
    }
