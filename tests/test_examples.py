"""Smoke tests of the examples, run in-process with their fast settings (a few optimizer steps each)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import re
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

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


@pytest.fixture(scope="module")
def main_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], str, Path]:
    """The main job as the docs run it (``python examples/train_digits.py``, 60 epochs per run), once."""
    out = tmp_path_factory.mktemp("digits")
    train_digits = load(EXAMPLES / "train_digits.py")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        results = train_digits.main(["--out", str(out)])
    return results, printed.getvalue(), out


def test_train_digits(main_job: tuple[list[dict[str, Any]], str, Path], tmp_path: Path) -> None:
    results, out, logdir = main_job
    assert "no_decay" in out and "|w| decay" in out and "val_acc" in out  # the comparison table
    assert "weight of Linear" in out  # the printed plan
    assert [r["run"] for r in results] == ["no_decay", "decay"]
    for r in results:
        assert 0.0 <= r["train_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0
        assert r["total"] > r["decay_total"] > 0 and r["no_decay_total"] > 0
    for run in ("no_decay", "decay"):
        events = list((logdir / run).glob("version_*/events.out.tfevents.*"))
        assert events, f"no TensorBoard event file for {run}"

    # The decay run writes its decay report beside its logs and the job ends with its verdict lines.
    decay = results[1]
    assert (Path(decay["log_dir"]) / "decay_report.md").is_file()
    assert (Path(decay["log_dir"]) / "decay_report.png").stat().st_size > 10_000
    assert decay["verdicts"] and not results[0]["verdicts"]
    verdict_lines = out.split("Is the decay doing anything?")[1]
    for layer, verdict in decay["verdicts"]:
        assert f"{layer}: {verdict}" in verdict_lines

    # plot_norms reads those event files and writes a PNG
    plot_norms = load(EXAMPLES / "plot_norms.py")
    png = plot_norms.main(["--logdir", str(logdir), "--output", str(tmp_path / "norms.png")])
    assert png.stat().st_size > 10_000


# How far another machine's run may be from the page. The job is seeded and deterministic on one machine,
# but another CPU's kernels (AVX2 against AVX-512) sum in another order, and over 60 epochs those
# last-bit differences change the prediction of a few borderline images. Measured on one AMD EPYC, the
# page's AVX-512 run against the same machine held to AVX2 (`ATEN_CPU_CAPABILITY=avx2
# MKL_ENABLE_INSTRUCTIONS=AVX2`, which gives what issue 22 saw on two other machines): train_acc 0.004,
# val_acc 0.004, gap 0.006, noise_fit 0.018 apart at most, norms 0.6%. The tolerances are about twice that,
# in images: 10 of the 898 training or 899 validation images, 6 of the 161 corrupted training images
# (noise_fit), and 1.5% for the norms.
TOLERANCE = {"train_acc": 0.012, "val_acc": 0.012, "gap": 0.015, "noise_fit": 0.04}
NORM_RTOL = 0.015
NORM_COLUMNS = {"|w| total": "total", "|w| decay": "decay_total", "|w| no_decay": "no_decay_total"}


def _page_table(text: str) -> dict[str, dict[str, float]]:
    """The ```text table that follows "The main job's final table" on the page: run -> column -> value."""
    block = re.search(r"The main job's final table.*?```text\n(.*?)```", text, flags=re.S)
    assert block, "the page has no main-job table"
    header, _, *rows = block.group(1).strip().splitlines()
    columns = re.split(r"\s{2,}", header.strip())
    table = {}
    for row in rows:
        cells = row.split()
        table[cells[0]] = {c: float(v) for c, v in zip(columns[1:], cells[1:], strict=True)}
    return table


def test_docs_show_the_main_job_table(main_job: tuple[list[dict[str, Any]], str, Path]) -> None:
    results, _, _ = main_job
    run = {r["run"]: r for r in results}
    page = (EXAMPLES.parent / "docs" / "index.md").read_text()
    table = _page_table(page)
    assert list(table) == list(run)
    for name, row in table.items():
        fresh = run[name]
        measured = {**fresh, "wd": fresh["weight_decay"], "gap": fresh["train_acc"] - fresh["val_acc"]}
        for column, value in row.items():
            key = NORM_COLUMNS.get(column, column)
            if column == "wd":
                assert value == measured["wd"], name
            elif key in TOLERANCE:
                assert abs(value - measured[key]) <= TOLERANCE[key], (
                    f"{name} {column}: page {value}, run {measured[key]:.3f}"
                )
            else:
                assert value == pytest.approx(measured[key], rel=NORM_RTOL), f"{name} {column}: page {value}"
    # And the sentences that quote it.
    fitted = re.search(r"\((\d+)% of them fitted instead of (\d+)%\)", page)
    assert fitted and abs(int(fitted.group(1)) / 100 - run["decay"]["noise_fit"]) <= TOLERANCE["noise_fit"] + 0.005
    assert abs(int(fitted.group(2)) / 100 - run["no_decay"]["noise_fit"]) <= TOLERANCE["noise_fit"] + 0.005
    val = re.search(r"validation accuracy from ([\d.]+)% to\s+([\d.]+)%", page)
    assert val and abs(float(val.group(1)) / 100 - run["no_decay"]["val_acc"]) <= TOLERANCE["val_acc"]
    assert abs(float(val.group(2)) / 100 - run["decay"]["val_acc"]) <= TOLERANCE["val_acc"]


def _page_report(text: str) -> dict[str, dict[str, str]]:
    """The ```text table under "## The main job's report" on the page: layer -> column -> cell."""
    block = re.search(r"## The main job's report.*?```text\n(.*?)```", text, flags=re.S)
    assert block, "the page has no main-job report"
    header, *rows = block.group(1).strip().splitlines()
    columns = re.split(r"\s{2,}", header.strip())
    return {cells[0]: dict(zip(columns, cells, strict=True)) for cells in (re.split(r"\s{2,}", r) for r in rows)}


def test_docs_show_the_main_job_decay_report(main_job: tuple[list[dict[str, Any]], str, Path]) -> None:
    results, _, _ = main_job
    fresh = (Path(results[1]["log_dir"]) / "decay_report.md").read_text()
    lines = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in fresh.splitlines()]
    header = next(cells for cells in lines if cells[0] == "layer")
    run = {cells[0]: dict(zip(header, cells, strict=True)) for cells in lines if cells[0].startswith("net.")}
    page = _page_report((EXAMPLES.parent / "docs" / "decay-doing-anything.md").read_text())
    assert list(page) == list(run)
    for layer, row in page.items():
        got = run[layer]
        # Exact on any CPU: the schedule's numbers (lr, wd, steps) and the closed form.
        for column in ("tau (steps)", "timescales", "predicted angle", "scale invariant"):
            assert row[column] == got[column], (layer, column)
        # The measured angle is a training outcome: another CPU's last bits move it (see TOLERANCE above),
        # the mean over 9 logged steps by a few percent; 15 % leaves room and still tells 0.4 from 1.
        assert float(row["measured angle"]) == pytest.approx(float(got["measured angle"]), rel=0.15), layer
        assert row["verdict"].split(" (")[0] == got["verdict"].split(" (")[0], layer


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
    assert charts.index("blocks.2 · decayed") < charts.index("blocks.10 · decayed") and charts[0] == "totals · all"
    assert charts.index("blocks.2 · decayed") + 1 == charts.index("blocks.2 · not decayed")  # side by side


# ------------------------------------------------------------------------- cautious weight decay, measured
def _markdown_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text``: rows of cells, the header first, the ``|---|`` line left out."""
    tables: list[list[list[str]]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        previous = line
    return tables


def test_cautious_experiment_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load(EXAMPLES / "cautious_experiment.py")
    out = example.main(["--fast", "--out", str(tmp_path), "--markdown", str(tmp_path / "table.md")])
    printed = capsys.readouterr().out
    assert out["markdown"] in printed and (tmp_path / "table.md").read_text() == out["markdown"] + "\n"
    outcomes, norms, per_seed = _markdown_tables(out["markdown"])
    for table in (outcomes, norms, per_seed):
        assert [row[0] for row in table[1:]] == ["plain", "cautious"]
    plain, cautious = out["results"]
    assert (plain["arm"], cautious["arm"], plain["seed"], cautious["seed"]) == ("plain", "cautious", 0, 0)
    for r in (plain, cautious):
        for key in ("train_loss", "val_loss", "val_acc", "noise_fit", *example.NORMS):
            assert math.isfinite(r[key]) and r[key] > 0, (r["arm"], key)
        assert 0 < r["val_acc"] <= 1
        # The norm WeightNormMonitor logged at the last step is that of the final weights.
        assert r["decay_total"] == pytest.approx(r["final_norm"], rel=1e-5)
    # Same initialization in both arms; only the mask differs, so the final weights do.
    assert plain["init_norm"] == cautious["init_norm"]
    assert plain["final_norm"] != cautious["final_norm"]
    # The plain arm logs no mask; the cautious arm's share of decayed entries kept is in (0, 1].
    assert math.isnan(plain["fraction_end"]) and math.isnan(plain["fraction_mean"])
    assert example.FRACTION not in example.read_metrics(plain["log_dir"])
    assert example.FRACTION in example.read_metrics(cautious["log_dir"])
    assert 0 < cautious["fraction_end"] <= 1 and 0 < cautious["fraction_mean"] <= 1
    shown = dict(zip(per_seed[0], per_seed[2], strict=True))
    assert float(shown["mask kept (last)"]) == pytest.approx(cautious["fraction_end"], abs=5e-4)
    assert float(shown["val acc"]) == pytest.approx(cautious["val_acc"], abs=5e-4)
    assert dict(zip(per_seed[0], per_seed[1], strict=True))["mask kept (last)"] == "—"


def _page_experiment() -> tuple[str, str]:
    """docs/cautious-experiment.md: the command of its ```bash block and the tables between its markers."""
    page = (EXAMPLES.parent / "docs" / "cautious-experiment.md").read_text()
    command = re.search(r"```bash\n(python examples/cautious_experiment\.py[^\n]*)\n```", page)
    tables = re.search(
        r"<!-- cautious_experiment\.py: begin -->\n\n(.*?)\n<!-- cautious_experiment\.py: end -->", page, re.S
    )
    assert command and tables, "the page names no command or has no generated tables"
    return command.group(1), tables.group(1)


def _check_spread(summary: list[list[str]], rows: list[dict[str, str]]) -> None:
    """Each ``mean ± std`` cell of a summary table is the mean and sample std of the per-seed cells."""
    header = summary[0][1:]
    for arm, *cells in summary[1:]:
        for column, cell in zip(header, cells, strict=True):
            values = [r[column] for r in rows if r["arm"] == arm]
            if arm == "plain" and column.startswith("mask kept"):
                assert cell == "—" and set(values) == {"—"}  # plain decay has no mask
                continue
            mean, std = (float(x) for x in cell.split(" ± "))
            floats = [float(v) for v in values]
            # The per-seed values are rounded to 3 decimals: that moves the mean by at most 0.0005 and the
            # std by at most 0.0005 * sqrt(n / (n - 1)); the summary is rounded once more (0.0005).
            n = len(floats)
            assert abs(mean - statistics.fmean(floats)) <= 0.001 + 1e-9, (arm, column, mean)
            assert abs(std - statistics.stdev(floats)) <= 0.0005 * (1 + math.sqrt(n / (n - 1))) + 1e-9, (arm, column)


def test_docs_cautious_experiment_table_is_consistent() -> None:
    """The page's tables are those of the command it names (a full rerun takes minutes: checked offline).

    The "Measured by" line is the command line the example prints for the page's command, so the settings
    are the page's; the per-seed rows cover every arm and seed; each summary cell is the mean and sample std
    of the per-seed rows (to their rounding); and the example's own formatting of those rows gives the
    page's per-seed table cell for cell.
    """
    example = load(EXAMPLES / "cautious_experiment.py")
    command, text = _page_experiment()
    args = example.parse_args(command.split()[2:])
    assert not args.fast and len(args.seeds) >= 3
    headline = text.split("\n", 1)[0]
    measured = re.fullmatch(r"Measured by `([^`]*)`: (\d+) runs of (\d+) steps .*, \d+ s wall time\.", headline)
    assert measured and measured.group(1) == example.command_line(args)
    assert (int(measured.group(2)), int(measured.group(3))) == (len(example.ARMS) * len(args.seeds), args.steps)
    outcomes, norms, per_seed = _markdown_tables(text)
    header = per_seed[0]
    rows = [dict(zip(header, row, strict=True)) for row in per_seed[1:]]
    assert [(r["arm"], int(r["seed"])) for r in rows] == [(a, s) for s in args.seeds for a in example.ARMS]
    assert header[2:] == outcomes[0][1:] + norms[0][1:] == list(example.COLUMNS.values())
    _check_spread(outcomes, rows)
    _check_spread(norms, rows)
    parsed = [
        {"arm": r["arm"], "seed": int(r["seed"])}
        | {key: math.nan if r[c] == "—" else float(r[c]) for key, c in zip(example.COLUMNS, header[2:], strict=True)}
        for r in rows
    ]
    assert _markdown_tables(example.format_tables(parsed, headline))[2] == per_seed
