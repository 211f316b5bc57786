"""Smoke tests of the examples, run in-process with their fast settings (a few optimizer steps each)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.extras import require

require(("sklearn", "matplotlib", "jsonargparse"), "the examples")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(path: Path) -> ModuleType:
    name = f"_example_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_train_digits_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train_digits = load(EXAMPLES / "train_digits.py")
    results = train_digits.main(["--fast", "--out", str(tmp_path)])

    out = capsys.readouterr().out
    assert "no_decay" in out and "|w| decay" in out and "val_acc" in out  # the comparison table
    assert "weight of Linear" in out  # the printed plan
    assert [r["run"] for r in results] == ["no_decay", "decay"]
    for r in results:
        assert 0.0 <= r["train_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0
        assert r["total"] > r["decay_total"] > 0 and r["no_decay_total"] > 0
    for run in ("no_decay", "decay"):
        events = list((tmp_path / run).glob("version_*/events.out.tfevents.*"))
        assert events, f"no TensorBoard event file for {run}"

    # plot_norms reads those event files and writes a PNG
    plot_norms = load(EXAMPLES / "plot_norms.py")
    png = plot_norms.main(["--logdir", str(tmp_path), "--output", str(tmp_path / "norms.png")])
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("config", "optimizer", "decay_wd"),
    [("mixin.yaml", "AdamW", 0.05), ("callbacks.yaml", "Adam", 0.0)],
)
def test_cli_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str, optimizer: str, decay_wd: float
) -> None:
    cli_train = load(EXAMPLES / "cli" / "train.py")
    cli = cli_train.main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "cli" / config),
            "--trainer.max_steps",
            "2",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    assert cli.trainer.global_step == 2
    (opt,) = cli.trainer.optimizers
    assert type(opt).__name__ == optimizer
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["decay", "no_decay"]
    assert len(groups["decay"]["params"]) == 2  # the two Linear weights
    assert len(groups["no_decay"]["params"]) == 4  # two biases, LayerNorm weight and bias
    assert groups["decay"]["weight_decay"] == decay_wd
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert len(cli.trainer.lr_scheduler_configs) == 1
    assert f"{optimizer} group 'decay'" in capsys.readouterr().out  # printed by the PrintGroups callback

    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert "WeightNormMonitor" in names
    if config == "callbacks.yaml":
        assert "WeightDecay" in names
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_gpt_tied_fast(capsys: pytest.CaptureFixture[str]) -> None:
    gpt = load(EXAMPLES / "gpt_tied.py")
    result = gpt.main(["--fast"])
    plan, groups = result["plan"], result["groups"]
    tied = plan["lm_head.weight"]
    assert tied is plan["wte.weight"] and tied.aliases == ("lm_head.weight",)
    assert not tied.decay
    assert sum(len(g["params"]) for g in groups.values()) == len(plan)  # the tied tensor once
    assert result["trainer"].global_step == 3
    assert "wte.weight (= lm_head.weight)" in capsys.readouterr().out


def test_finetune_l2sp_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load(EXAMPLES / "finetune_l2sp.py")
    out = example.main(["--fast", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "||w - w_pretrained||" in printed and "l2_sp" in printed  # the table
    rows = {r["run"]: r for r in out["rows"]}
    assert list(rows) == ["none", "l2", "l2_sp"]
    for r in out["results"]:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["distance"] > 0
        assert list(Path(r["log_dir"]).glob("events.out.tfevents.*")), f"no TensorBoard event file for {r['run']}"
    # The three runs share the pretrained backbone, the new head and the batches: only the penalty differs,
    # so after the same few steps the runs are apart, and L2-SP is the one closest to the pretrained weights.
    assert rows["l2_sp"]["distance"] < rows["none"]["distance"] < rows["l2"]["distance"]


def test_vit_tensorboard_fast(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    example = load(EXAMPLES / "vit_tensorboard.py")
    out = example.main(["--fast", "--out", str(tmp_path)])
    assert out["trainer"].global_step == 3
    acc = EventAccumulator(out["log_dir"], size_guidance={"tensors": 0})
    acc.Reload()
    assert len(acc.Tensors("custom_scalars__config__")) == 1  # the layout the screenshot in the docs shows
    charts = list(out["layout"]["weight_norm"])
    assert charts.index("blocks.2") < charts.index("blocks.10") and charts[0] == "totals"
