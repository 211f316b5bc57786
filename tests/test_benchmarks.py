"""Smoke test of ``benchmarks/run.py``: it runs end to end at tiny sizes and writes every row.

No timing is asserted here: the numbers come from ``python benchmarks/run.py`` on a quiet machine.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.bench import load_benchmark


def test_benchmark_runs_and_writes_every_row(tmp_path: Path) -> None:
    run = load_benchmark()
    out = tmp_path / "benchmarks.md"
    threads = torch.get_num_threads()
    try:  # one thread: tiny tensors gain nothing from more, and a busy machine makes OpenMP waits slow
        report = run.main(["--device", "cpu", "--size", "tiny", "--repeats", "2", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)

    text = out.read_text()
    assert text.startswith("# Benchmarks")
    expected = run.expected_keys(["cpu"])
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == expected
    assert [r.key for r in report.rows] == expected
    for row in rows:
        assert row.endswith(("| PASS |", "| MISS |", "| info |")), row
    # Every target is shown with its verdict; the verdicts themselves are not asserted (tiny sizes, noise).
    assert sum(r.ok is not None for r in report.rows) >= 20
    assert "targets met" in text


def test_peak_rss_of_a_fit_in_a_fresh_interpreter() -> None:
    """The harness of the peak-RSS rows (6.mem on CPU): one real fit in a fresh interpreter, its ``ru_maxrss``.

    A fit of a 64 MiB weight holds the weight and its gradient at once, so its peak RSS exceeds their bytes
    (a unit slip, KiB read as bytes, would give a thousandth of that)."""
    run = load_benchmark()
    shape = (4096, 4096)
    peak = run.fit_peak_rss("l1prox", shape, steps=2)
    assert peak > 2 * shape[0] * shape[1] * 4
