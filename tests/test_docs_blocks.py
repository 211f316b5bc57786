"""Every ```python block of README.md and docs/*.md runs as written.

Each page's blocks run in order as one program (a block may use what an earlier block of the same page
defined), in a fresh interpreter, in a temporary working directory (so ``lightning_logs/`` and the like
land there, not in the repository), on CPU, with the Hugging Face and TensorBoard network switches off,
under a time limit per page. What cannot run that way (a download, a GPU, a cluster) is fenced as
```text or ```bash instead. A block that fails is reported with its page and line numbers: each block is
compiled at its own line of the page, so tracebacks point into the page.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TIMEOUT_S = 60  # per page

# A fence opening at the start of a line (optionally indented, as inside an admonition), up to its
# closing fence of the same indentation.
_BLOCK = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", flags=re.S | re.M)

_RUNNER = r"""
import json, sys, textwrap
blocks = json.loads(sys.stdin.read())
namespace = {"__name__": "__main__"}
for page, line, code in blocks:
    # Pad with empty lines so that tracebacks give the line numbers of the page.
    exec(compile("\n" * line + textwrap.dedent(code), page, "exec"), namespace)
"""


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """``(line of the first code line - 1, code)`` of each ```python block of ``page``, in page order."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start("code")), m.group("code")) for m in _BLOCK.finditer(text)]


def test_python_blocks_are_found() -> None:
    """The extraction sees the blocks (a changed fence style must not turn this file into a no-op)."""
    counts = {p.relative_to(ROOT).as_posix(): len(python_blocks(p)) for p in PAGES}
    text_counts = {p.relative_to(ROOT).as_posix(): p.read_text().count("```python") for p in PAGES}
    assert counts == text_counts
    assert counts["README.md"] >= 1 and counts["docs/getting-started.md"] >= 4


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_python_blocks_run(page: Path, tmp_path: Path) -> None:
    name = page.relative_to(ROOT).as_posix()
    blocks = [(str(page), line, code) for line, code in python_blocks(page)]
    before = {p.name for p in ROOT.iterdir()}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "PL_DISABLE_FORK": "1",
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _RUNNER],
            input=json.dumps(blocks),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: its python blocks did not finish within {TIMEOUT_S} s")
    assert proc.returncode == 0, f"{name}: a python block failed\n{proc.stderr[-4000:]}"
    assert {p.name for p in ROOT.iterdir()} <= before, f"{name}: its python blocks wrote into the repository"
