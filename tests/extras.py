"""Optional test dependencies: skipped where missing, except in CI, where a missing one is a failure.

The ``test`` extra installs them all (``pip install -e ".[test]"``); ``.ci/run`` sets ``CI=1`` (GitHub
Actions sets ``CI=true``) so that a broken install cannot turn a test into a silent skip.
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def require(modules: tuple[str, ...], what: str) -> None:
    """Skip (fail in CI) unless every module of ``modules`` is importable; ``what`` names what needs them."""
    missing = [m for m in modules if not installed(m)]
    if not missing:
        return
    message = f"{what}: {', '.join(missing)} not installed (pip install -e '.[test]')"
    if in_ci():
        pytest.fail(f"{message}; CI installs the test extra and must run these tests", pytrace=False)
    pytest.skip(message, allow_module_level=True)
