"""The documentation site builds, its links resolve, and the docstring examples run.

``mkdocs build --strict`` catches broken cross-references, anchors between pages and docstrings griffe cannot
parse. It skips where the docs tools are not installed, except in CI (``CI`` set, as ``.ci/run`` does), where
a missing tool is a failure: the ``test`` extra installs them.

The relative links of ``docs/*.md`` and ``README.md`` to the examples and tests (``../tests/...``) resolve in the
repository, which is checked here; in the site they point at ``repo_url`` (``scripts/mkdocs_hooks.py``), and a
link mkdocs cannot resolve fails the build.
"""

from __future__ import annotations

import ast
import html
import io
import os
import re
import subprocess
import sys
import textwrap
import time
import tokenize
import unicodedata
from pathlib import Path

import pytest

from tests.extras import require

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SRC = ROOT / "src" / "lightning_decay"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
DOCS_MODULES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _require_docs_tools() -> None:
    require(DOCS_MODULES, "the docs build")


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    _require_docs_tools()
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, f"mkdocs build --strict failed ({elapsed:.1f} s):\n{proc.stdout}\n{proc.stderr}"
    # A link mkdocs cannot resolve is a 404 in the site, whatever level mkdocs.yml gives it.
    assert "not found among documentation files" not in proc.stderr + proc.stdout, proc.stderr
    site = tmp_path / "site"
    api = (site / "api" / "index.html").read_text()
    # Sphinx roles and ``Example::`` blocks are not Markdown: they would show up literally.
    assert not re.search(r":(class|meth|func|mod|attr|math):`|Example::", api)
    _assert_signatures_formatted(api)
    _assert_source_links_exist(site)
    import lightning_decay

    title = re.search(r"<title>(.*?)</title>", (site / "index.html").read_text()).group(1)
    assert f"lightning-decay {lightning_decay.__version__}" in title


def _assert_signatures_formatted(api: str) -> None:
    """API signatures are formatted (ruff) to mkdocs.yml's ``line_length``, not one line of 400 characters."""
    blocks = re.findall(r'class="doc-signature[^>]*>(.*?)</code>', api, flags=re.S)
    signatures = [html.unescape(re.sub(r"<[^>]+>", "", s)) for s in blocks]
    assert len(signatures) > 10
    config = (ROOT / "mkdocs.yml").read_text()
    limit = int(re.search(r"^\s*line_length:\s*(\d+)", config, flags=re.M).group(1))
    too_long = [line for s in signatures for line in s.splitlines() if len(line) > limit]
    assert not too_long, too_long


def _assert_source_links_exist(site: Path) -> None:
    """Links the docs hook pointed at the repository name files that exist in this checkout."""
    config = (ROOT / "mkdocs.yml").read_text()
    repo_url = re.search(r"^repo_url:\s*(\S+)", config, flags=re.M).group(1).rstrip("/")
    blob = re.compile(re.escape(repo_url) + r"/blob/[^/\"]+/([^\"#]+)")
    targets = {t for page in site.rglob("*.html") for t in blob.findall(page.read_text())}
    assert {"examples/vit_tensorboard.py", "tests/test_math_claims.py"} <= targets
    assert [t for t in targets if not (ROOT / t).is_file()] == []


# ------------------------------------------------------------------------------------------- links
_FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)
_CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1", flags=re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", flags=re.M)


def _slug(title: str) -> str:
    """The anchor of a heading, as Python-Markdown's ``toc`` extension (mkdocs' default) makes it."""
    title = re.sub(r"\{[^}]*\}\s*$", "", title)  # attr_list
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "").replace("*", "")
    value = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def _anchors(page: Path) -> tuple[set[str], tuple[str, ...]]:
    """Heading slugs and explicit ``{#id}`` of a page, and the identifiers of its ``::: object`` blocks."""
    text = _FENCE.sub("", page.read_text())
    anchors = {_slug(h) for h in _HEADING.findall(text)} | set(re.findall(r"\{[^}]*#([\w.-]+)[^}]*\}", text))
    objects = tuple(re.findall(r"^:::\s*([\w.]+)", text, flags=re.M))
    return anchors, objects


def _links(page: Path) -> list[str]:
    text = _CODE_SPAN.sub("", _FENCE.sub("", page.read_text()))
    return _LINK.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file {file}")
            continue
        if ROOT not in file.parents and file != ROOT:
            broken.append(f"{target}: outside the repository")
            continue
        if anchor and file.suffix == ".md":
            anchors, objects = _anchors(file)
            # mkdocstrings gives each rendered object (and its members) its dotted path as id.
            if anchor not in anchors and not any(anchor == o or anchor.startswith(o + ".") for o in objects):
                broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_docs_name_existing_tests() -> None:
    """The math pages cite tests by name (``test_...``); every cited test exists."""
    defined = set()
    for file in (ROOT / "tests").glob("*.py"):
        defined |= set(re.findall(r"^\s*def (test_\w+)", file.read_text(), flags=re.M))
    cited = {name for page in PAGES for name in re.findall(r"`(test_\w+)`", page.read_text())}
    assert cited - defined == set()


def test_api_page_lists_every_public_name() -> None:
    """Every name of ``lightning_decay.__all__`` has its ``::: lightning_decay.<name>`` entry in docs/api.md."""
    import lightning_decay

    listed = set(re.findall(r"^::: lightning_decay\.(\w+)\s*$", (DOCS / "api.md").read_text(), flags=re.M))
    assert set(lightning_decay.__all__) - listed == set()


# ------------------------------------------------------------------------------ docstring examples
_ROLE = re.compile(r":(class|meth|func|mod|attr|obj|exc|data|math|ref):`|^\s*Example::\s*$", flags=re.M)
_PY_BLOCK = re.compile(r"^\s*```python\n(.*?)^\s*```", flags=re.S | re.M)
# Examples that need objects defined by the reader (a model, a data module) and are not run here.
_NOT_RUNNABLE = {"cli.py:DecayLightningCLI"}


def _docstrings() -> list[tuple[str, str]]:
    found = []
    for file in sorted(SRC.glob("*.py")):
        tree = ast.parse(file.read_text())
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc:
                found.append((f"{file.name}:{getattr(node, 'name', '<module>')}", doc))
    return found


DOCSTRINGS = _docstrings()
EXAMPLES = [(where, textwrap.dedent(block)) for where, doc in DOCSTRINGS for block in _PY_BLOCK.findall(doc)]


def test_docstrings_are_markdown() -> None:
    """mkdocstrings renders Markdown: Sphinx roles and ``Example::`` blocks would show up literally."""
    offenders = [where for where, doc in DOCSTRINGS if _ROLE.search(doc)]
    assert not offenders, offenders
    assert {w for w, _ in EXAMPLES} >= _NOT_RUNNABLE, "a skipped example is gone: update _NOT_RUNNABLE"


def _expected(line: str) -> object:
    """The literal after ``#`` at the end of ``line`` (``expr  # ['decay', 'no_decay']``), else ``...``."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line).readline))
    except (tokenize.TokenError, SyntaxError):
        return ...
    comments = [t.string for t in tokens if t.type == tokenize.COMMENT]
    if not comments:
        return ...
    try:
        return ast.literal_eval(comments[-1][1:].strip())
    except (ValueError, SyntaxError):
        return ...


RUNNABLE = [e for e in EXAMPLES if e[0] not in _NOT_RUNNABLE]


@pytest.mark.parametrize(("where", "code"), RUNNABLE, ids=[where for where, _ in RUNNABLE])
def test_docstring_example_runs(where: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a docstring's python block; ``expr  # literal`` lines must evaluate to the literal."""
    monkeypatch.chdir(tmp_path)
    lines = code.splitlines()
    namespace: dict[str, object] = {"__name__": "docstring_example"}
    for node in ast.parse(code).body:
        expected = _expected(lines[node.end_lineno - 1]) if isinstance(node, ast.Expr) else ...
        if expected is ...:
            exec(compile(ast.Module([node], []), where, "exec"), namespace)
        else:
            value = eval(compile(ast.Expression(node.value), where, "eval"), namespace)
            assert value == expected, f"{where}: {ast.unparse(node)} is {value!r}, the docstring says {expected!r}"
