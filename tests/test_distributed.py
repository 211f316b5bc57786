"""Distributed correctness on CPU (2 processes, gloo): DDP (``ddp_spawn``) and FSDP2 (``ModelParallelStrategy``).

Every feature must give the answers of one process with the same global batch. Three groups of runs are
shared by all tests of this module (module-scoped fixtures), and each writes its results to files that the
tests read (see :mod:`tests.dist_workers`):

- ``single``: one process, batch ``2 * PER_RANK_BATCH``, the reference;
- ``ddp`` and ``ddp_resume``: ``ddp_spawn`` on 2 CPU processes, then the second epoch again from the first
  epoch's checkpoint, with a model initialized from another seed;
- ``fsdp2``, ``fsdp2_resume`` and ``hsdp``: ``ModelParallelStrategy(data_parallel_size=2)`` with
  ``fully_shard`` in ``configure_model`` (the last one on the 2-D mesh: hybrid sharding, replicated
  parameters), in 2 processes the test starts itself.

Each run has ``WeightDecay`` (taking over AdamW's decay of the mixin's ``"decay"`` group), ``WeightPenalty``
(L1 + L2-SP toward the initial weights, on the head and gate) and ``WeightNormMonitor`` (weights, grads,
update ratios, sparsity) logging every step to a ``CSVLogger``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import dist_workers as W

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

needs_monitor = pytest.mark.skipif(not W.monitor_available(), reason="lightning_decay.monitor is not there yet")

STEPS = W.EPOCHS * W.STEPS_PER_EPOCH
MONITOR_PREFIXES = ("weight_norm/", "grad_norm/", "update_ratio/", "sparsity/")
PENALTY_KEYS = ("penalty/l1", "penalty/l2")
ATOL, RTOL = 1e-6, 1e-5


# --------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    W.fit(str(out), "single", "auto", 1, W.WORLD * W.PER_RANK_BATCH)
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    W.fit(str(out), "ddp", "ddp_spawn", W.WORLD, W.PER_RANK_BATCH)
    ckpt = out / "ddp_ckpt" / f"epoch=0-step={W.STEPS_PER_EPOCH}.ckpt"
    W.fit(str(out), "ddp_resume", "ddp_spawn", W.WORLD, W.PER_RANK_BATCH, ckpt_path=str(ckpt))
    return out


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    scenarios = ("fsdp2", "fsdp2_resume", "hsdp", "fsdp2_bf16", "fsdp2_cwd", "module_ref")
    W.spawn(W.fsdp2_worker, (str(out), W.free_port(), scenarios))
    return out


@pytest.fixture(scope="module")
def cwd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``WeightDecay(cautious=True)`` (issue 20) in one process and under ``ddp_spawn``."""
    out = tmp_path_factory.mktemp("cwd")
    W.fit(str(out), "single_cwd", "auto", 1, W.WORLD * W.PER_RANK_BATCH, with_monitor=False, cautious=True)
    W.fit(str(out), "ddp_cwd", "ddp_spawn", W.WORLD, W.PER_RANK_BATCH, with_monitor=False, cautious=True)
    return out


@pytest.fixture(scope="module")
def single_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single_bf16")
    W.fit(str(out), "single_bf16", "auto", 1, W.WORLD * W.PER_RANK_BATCH, precision="bf16-mixed")
    return out


# ---------------------------------------------------------------------------------------- helpers
def results(out: Path, tag: str) -> list[dict[str, Any]]:
    return [W.load_result(out, tag, rank) for rank in range(W.WORLD)]


def metrics(out: Path, tag: str) -> list[dict[str, str]]:
    files = list(out.glob(f"{tag}/*/metrics.csv"))
    assert len(files) == 1, f"expected one metrics.csv for {tag!r}, found {files}"
    return W.read_metrics(files[0])


def assert_weights_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{what} {n}: {m}")


def assert_same_on_every_rank(runs: list[dict[str, Any]]) -> None:
    first = runs[0]["weights"]
    for rank, run in enumerate(runs[1:], start=1):
        for name, value in first.items():
            assert torch.equal(run["weights"][name], value), f"{name} differs between rank 0 and rank {rank}"


def assert_metrics_match(rows: list[dict[str, str]], ref_rows: list[dict[str, str]], keys: list[str]) -> None:
    """Every key logged once per step, at the reference's steps, with the reference's values."""
    assert keys
    for key in keys:
        got, want = W.metric_rows(rows, key), W.metric_rows(ref_rows, key)
        assert sorted(got) == sorted(want), f"{key}: logged at steps {sorted(got)}, reference {sorted(want)}"
        for step, value in want.items():
            same = got[step] == value or math.isclose(got[step], value, rel_tol=1e-5, abs_tol=1e-7)
            assert same, f"{key} at step {step}: {got[step]} != {value} (single process)"


def monitor_keys(rows: list[dict[str, str]]) -> list[str]:
    return [k for k in rows[0] if k.startswith(MONITOR_PREFIXES)]


def assert_norms_of_final_weights(rows: list[dict[str, str]], weights: dict[str, torch.Tensor]) -> None:
    """The last logging step shows the weights after the last optimizer step: the final weights."""
    last = STEPS - 1
    for name, value in weights.items():
        logged = W.metric_rows(rows, f"weight_norm/{name}")[last]
        assert logged == pytest.approx(value.double().norm().item(), rel=1e-6), name
    total = math.sqrt(sum(v.double().square().sum().item() for v in weights.values()))
    assert W.metric_rows(rows, "weight_norm/total")[last] == pytest.approx(total, rel=1e-6)


# -------------------------------------------------------------------------------------------- DDP
def test_ddp_matches_single_process_and_every_rank_agrees(single: Path, ddp: Path) -> None:
    ref = W.load_result(single, "single", 0)
    runs = results(ddp, "ddp")
    assert_same_on_every_rank(runs)
    # Penalty and decay once per step, after gradient averaging: the single process's weights.
    assert_weights_close(runs[0]["weights"], ref["weights"], "ddp vs single")
    for run in runs:
        assert run["strategy"] == "DDPStrategy" and run["world_size"] == W.WORLD
        assert run["global_step"] == STEPS
        assert (
            run["states"]
            == ref["states"]
            == {
                "WeightDecay": {"steps": [STEPS], "calls": 1},
                "WeightPenalty": {"steps": [STEPS], "calls": 1},
            }
        )
        # The mixin's groups, and WeightDecay took the optimizer's decay over on every rank.
        assert run["record"]["groups"] == ref["record"]["groups"]
        assert run["record"]["plan"] == ref["record"]["plan"]
        assert [g["weight_decay"] for g in run["groups"]] == [0.0] * len(run["groups"])


def test_ddp_subprocess_launcher_matches_single_process(single: Path, tmp_path: Path) -> None:
    """``strategy="ddp"``: each rank builds its own callbacks (nothing pickled), same answers as one process."""
    W.run_ddp_subprocess(tmp_path)
    ref = W.load_result(single, "single", 0)
    runs = results(tmp_path, "ddp_subprocess")
    assert_same_on_every_rank(runs)
    assert_weights_close(runs[0]["weights"], ref["weights"], "ddp (subprocess launcher) vs single")
    for run in runs:
        assert run["strategy"] == "DDPStrategy" and run["world_size"] == W.WORLD
        assert run["states"] == ref["states"]
    assert_metrics_match(metrics(tmp_path, "ddp_subprocess"), metrics(single, "single"), list(PENALTY_KEYS))


def assert_bf16_close(runs: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    """bf16 activations: two layouts add the same products in another order, so not to 1e-6."""
    assert_same_on_every_rank(runs)
    for name, value in ref["weights"].items():
        torch.testing.assert_close(runs[0]["weights"][name], value, atol=2e-3, rtol=1e-2, msg=name)
    for run in runs:
        assert run["states"] == ref["states"]


def test_ddp_bf16_mixed_matches_single_process_bf16_mixed(single_bf16: Path, tmp_path: Path) -> None:
    """AMP under DDP: the callbacks see the averaged float32 gradients of a bf16 autocast, as on one process."""
    W.fit(str(tmp_path), "ddp_bf16", "ddp_spawn", W.WORLD, W.PER_RANK_BATCH, precision="bf16-mixed")
    assert_bf16_close(results(tmp_path, "ddp_bf16"), W.load_result(single_bf16, "single_bf16", 0))


def test_ddp_fp16_grad_scaler_skipped_steps_are_skipped_on_every_rank(tmp_path: Path) -> None:
    """16-mixed with a GradScaler whose first steps overflow: a step the scaler skips gets no decay, no
    proximal step and no step count on any rank. (Where the overflows fall depends on the per-rank
    batches, so the count is checked against this run's own scaler, not against one process.)"""
    init_scale = 2.0**24  # float16 gradients overflow at this scale for the first steps
    W.fit(str(tmp_path), "ddp_fp16", "ddp_spawn", W.WORLD, W.PER_RANK_BATCH, fp16_scale=init_scale)
    runs = results(tmp_path, "ddp_fp16")
    assert_same_on_every_rank(runs)
    ckpt = torch.load(tmp_path / "ddp_fp16_ckpt" / f"epoch=1-step={STEPS}.ckpt", weights_only=False)
    # Every skip halves the scale (growth needs 2000 clean steps), so the checkpoint's scale counts them.
    skipped = round(math.log2(init_scale / ckpt["MixedPrecision"]["scale"]))
    assert 0 < skipped < STEPS, "some steps were skipped, some ran"
    for run in runs:
        assert run["global_step"] == STEPS  # Lightning counts every batch
        assert run["states"] == {
            "WeightDecay": {"steps": [STEPS - skipped], "calls": 1},
            "WeightPenalty": {"steps": [STEPS - skipped], "calls": 1},
        }


def test_fsdp2_bf16_mixed_matches_single_process_bf16_mixed(single_bf16: Path, fsdp2: Path) -> None:
    assert_bf16_close(results(fsdp2, "fsdp2_bf16"), W.load_result(single_bf16, "single_bf16", 0))


def assert_monitor_like_single(
    rows: list[dict[str, str]], ref_rows: list[dict[str, str]], final_weights: dict[str, torch.Tensor]
) -> None:
    """The monitor logged the same keys as one process, once per step, with its values."""
    keys = monitor_keys(ref_rows)
    assert set(monitor_keys(rows)) == set(keys)
    assert_metrics_match(rows, ref_rows, keys)
    assert_norms_of_final_weights(rows, final_weights)


def test_ddp_penalty_logged_values(single: Path, ddp: Path) -> None:
    assert_metrics_match(metrics(ddp, "ddp"), metrics(single, "single"), list(PENALTY_KEYS))


@needs_monitor
def test_ddp_monitor_logs_once_from_rank_zero(single: Path, ddp: Path) -> None:
    runs = results(ddp, "ddp")
    assert_monitor_like_single(metrics(ddp, "ddp"), metrics(single, "single"), runs[0]["weights"])
    for run in runs:  # replicated parameters: nothing to reduce, no collective
        assert run["marks"]["before"] == run["marks"]["after"]
        assert len(run["marks"]["after"]) == STEPS


def test_ddp_resume_from_epoch_checkpoint(ddp: Path) -> None:
    uninterrupted = results(ddp, "ddp")[0]
    resumed = results(ddp, "ddp_resume")
    assert_same_on_every_rank(resumed)
    for run in resumed:
        assert run["global_step"] == STEPS
        assert run["states"] == uninterrupted["states"]
        assert [g["weight_decay"] for g in run["groups"]] == [0.0] * len(run["groups"])
    # From other initial weights: the checkpoint alone (weights, optimizer, callback state, the L2-SP
    # reference) makes the second epoch the uninterrupted one. Bitwise on CPU.
    for name, value in uninterrupted["weights"].items():
        assert torch.equal(resumed[0]["weights"][name], value), name
    rows, ref_rows = metrics(ddp, "ddp_resume"), metrics(ddp, "ddp")
    for key in [*PENALTY_KEYS, "weight_norm/total"] if W.monitor_available() else PENALTY_KEYS:
        got, want = W.metric_rows(rows, key), W.metric_rows(ref_rows, key)
        assert sorted(got) == list(range(W.STEPS_PER_EPOCH, STEPS))
        assert all(got[s] == pytest.approx(want[s], rel=1e-6) for s in got), key


# ------------------------------------------------------------------------------------------ FSDP2
def test_fsdp2_classifies_like_the_unwrapped_model(single: Path, fsdp2: Path) -> None:
    ref = W.load_result(single, "single", 0)
    for run in results(fsdp2, "fsdp2"):
        assert run["strategy"] == "ModelParallelStrategy"
        assert run["record"]["param_types"] == ["DTensor"]
        assert ref["record"]["param_types"] == ["Parameter"]
        # Same names, decisions, (global) shapes and reasons: "weight of Linear", not of fully_shard's
        # dynamic subclass FSDPLinear. The mixin builds the same groups.
        assert run["record"]["plan"] == ref["record"]["plan"]
        assert run["record"]["groups"] == ref["record"]["groups"]


def test_fsdp2_regularizers_match_unsharded(single: Path, fsdp2: Path) -> None:
    ref = W.load_result(single, "single", 0)
    runs = results(fsdp2, "fsdp2")
    assert_same_on_every_rank(runs)
    assert_weights_close(runs[0]["weights"], ref["weights"], "fsdp2 vs single")
    for run in runs:
        assert run["global_step"] == STEPS
        assert run["states"] == ref["states"]
        assert [g["weight_decay"] for g in run["groups"]] == [0.0] * len(run["groups"])


def test_fsdp2_penalty_logged_values(single: Path, fsdp2: Path) -> None:
    assert_metrics_match(metrics(fsdp2, "fsdp2"), metrics(single, "single"), list(PENALTY_KEYS))


@needs_monitor
def test_fsdp2_monitor_global_norms_with_one_all_reduce(single: Path, fsdp2: Path) -> None:
    runs = results(fsdp2, "fsdp2")
    # Norms of the full parameters (one rank holds empty shards of `gate`), not of the local shards.
    assert_monitor_like_single(metrics(fsdp2, "fsdp2"), metrics(single, "single"), runs[0]["weights"])
    for run in runs:
        before, after = run["marks"]["before"], run["marks"]["after"]
        assert len(after) == STEPS
        assert [a - b for a, b in zip(after, before, strict=True)] == [1] * STEPS


def test_fsdp2_resume_from_epoch_checkpoint(fsdp2: Path) -> None:
    uninterrupted = results(fsdp2, "fsdp2")[0]
    resumed = results(fsdp2, "fsdp2_resume")
    assert_same_on_every_rank(resumed)
    assert resumed[0]["states"] == uninterrupted["states"]
    assert_weights_close(resumed[0]["weights"], uninterrupted["weights"], "fsdp2 resumed vs uninterrupted")


def test_hsdp_replicated_dtensors_train_like_unsharded(single: Path, fsdp2: Path) -> None:
    ref = W.load_result(single, "single", 0)
    runs = results(fsdp2, "hsdp")
    assert_same_on_every_rank(runs)
    assert_weights_close(runs[0]["weights"], ref["weights"], "hsdp vs single")
    if W.monitor_available():  # replicas counted once
        assert_metrics_match(metrics(fsdp2, "hsdp"), metrics(single, "single"), monitor_keys(metrics(single, "single")))


def test_hsdp_penalty_logged_values(single: Path, fsdp2: Path) -> None:
    assert_metrics_match(metrics(fsdp2, "hsdp"), metrics(single, "single"), list(PENALTY_KEYS))


def test_fsdp2_full_reference_on_uneven_shards(fsdp2: Path) -> None:
    for rank in range(W.WORLD):
        run = torch.load(fsdp2 / f"module_ref_rank{rank}.pt", weights_only=False)
        assert "error" not in run, f"rank {rank}: {run.get('error')}"
        assert torch.equal(run["ref"], run["expected"]), rank


# ------------------------------------------------------------------------------- cautious decay (issue 20)
@pytest.mark.parametrize("tag", ["ddp_cwd", "fsdp2_cwd"])
def test_cautious_decay_across_ranks_is_the_single_process_run(
    tag: str, cwd: Path, fsdp2: Path, single: Path, request: pytest.FixtureRequest
) -> None:
    """DDP and FSDP2 (each rank masks its own shard with its own shard of the optimizer state): the weights of
    one process with the global batch, and not those of plain decay."""
    want = W.load_result(cwd, "single_cwd", 0)["weights"]
    runs = results(cwd if tag == "ddp_cwd" else fsdp2, tag)
    assert_same_on_every_rank(runs)
    assert_weights_close(runs[0]["weights"], want, tag)
    plain = W.load_result(single, "single", 0)["weights"]
    body = [n for n in want if n.startswith("net.body") and n.endswith("weight")]
    assert any(not torch.allclose(want[n], plain[n], atol=1e-4) for n in body)  # the mask acts
