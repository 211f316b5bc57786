"""The public API under ``mypy --strict``: a user's script type-checks, and typos in it are errors.

``Any`` in a public signature (``attach`` returning ``Any``, ``configure_optimizers -> Any``) passes every
typo and every wrong use silently; the script in tests/typing_user.py uses the API as the docs do, and
copies of it with one typo each must fail. mypy runs on the package under test (``MYPYPATH``) with
``--follow-imports=silent``: the package's own internals are not what is checked, only what a user sees.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_decay

SCRIPT = Path(__file__).with_name("typing_user.py")

#: file stem -> (the line changed, the typo, the error mypy must report).
TYPOS = {
    "typo_attachment": ("decay.remove()", "decay.remov()", '"Attachment" has no attribute "remov"'),
    "typo_monitor": ("monitor.remove()", "monitor.remov()", '"Attachment" has no attribute "remov"'),
    "typo_steps": ("steps: list[int] = decay.steps", "steps: list[str] = decay.steps", "Incompatible types"),
    # `configure_optimizers -> Any` would let any return type through.
    "typo_optimizers": (
        "def optimizer_of(net: Net) -> OptimizerLRScheduler:",
        "def optimizer_of(net: Net) -> torch.optim.Optimizer:",
        "Incompatible return value type",
    ),
}


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is in the `test` extra")
def test_user_script_passes_mypy_strict_and_typos_fail(tmp_path: Path) -> None:
    text = SCRIPT.read_text()
    files = [tmp_path / "typing_user.py"]
    files[0].write_text(text)
    for stem, (line, typo, _) in TYPOS.items():
        assert line in text, line
        (tmp_path / f"{stem}.py").write_text(text.replace(line, typo))
        files.append(tmp_path / f"{stem}.py")
    src = Path(lightning_decay.__file__).resolve().parents[1]
    env = {**os.environ, "MYPYPATH": str(src)}
    cmd = [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental"]
    result = subprocess.run(
        [*cmd, "--cache-dir", str(tmp_path / "cache"), *map(str, files)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    out = result.stdout + result.stderr
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert not [e for e in errors if e.startswith("typing_user.py")], out
    for stem, (_, _, message) in TYPOS.items():
        mine = [e for e in errors if e.startswith(f"{stem}.py")]
        assert any(message in e for e in mine), out
    assert result.returncode == 1, out


def test_user_script_runs(tmp_path: Path) -> None:
    """The script is real code: it runs, and its step counts are the steps it took."""
    spec = importlib.util.spec_from_file_location("typing_user", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.plain_loop(str(tmp_path)) == [3]


def test_py_typed_is_shipped() -> None:
    """PEP 561: the marker is in the package, and the build ships it (package-data)."""
    assert (Path(lightning_decay.__file__).parent / "py.typed").is_file()
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'lightning_decay = ["py.typed"]' in pyproject
