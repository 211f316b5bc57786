"""The README's code sample runs, and its two set-up commands name what CI and the examples use."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_sample_runs() -> None:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python sample"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    model = namespace["model"]
    groups = model.configure_optimizers().param_groups  # type: ignore[attr-defined]
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]


def test_readme_setup_commands_match_ci_and_examples() -> None:
    text = README.read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    assert len(commands) == 2, "exactly two set-up commands"
    main_job, tests = commands
    script = main_job.split("python ", 1)[1].split()[0]
    assert (README.parent / script).is_file(), script
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 -m pytest" in ci and "pytest" in tests
    assert '"torch==2.13.0"' in ci and '"torch==2.13.0"' in tests and "[test]" in ci and "[test]" in tests
