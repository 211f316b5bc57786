"""mkdocs hooks: the package version in the site, and links to the repository's source files.

The pages of ``docs/`` link to the examples and tests that back them with relative paths
(``../examples/train_digits.py``), which GitHub resolves when it renders ``docs/*.md`` but which point
outside the built site. Here each such link becomes a link to the file in the repository
(``repo_url`` + ``blob/{branch}/`` + path, the branch taken from ``edit_uri``), so the site has no dead
links and the pages keep working on GitHub. Any other link out of ``docs/`` is left for mkdocs'
``validation.links.not_found`` to report.
"""

from __future__ import annotations

import ast
import posixpath
import re
from pathlib import Path
from typing import Any

# Where the linked sources live, relative to the repository root.
SOURCE_DIRS = ("examples/", "tests/", "benchmarks/", "src/")
_LINK = re.compile(r"(\]\(\s*<?)([^)\s>#]+)([^)\s>]*>?(?:\s+\"[^\"]*\")?\s*\))")


def package_version(root: Path) -> str:
    """``__version__`` of ``src/lightning_decay/__init__.py``, read without importing the package (torch)."""
    tree = ast.parse((root / "src" / "lightning_decay" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise RuntimeError("src/lightning_decay/__init__.py defines no __version__")


def source_base(repo_url: str, edit_uri: str) -> str:
    """``https://github.com/o/r/blob/main/`` from ``repo_url`` and an ``edit_uri`` such as ``edit/main/docs/``."""
    parts = edit_uri.strip("/").split("/")
    branch = parts[1] if len(parts) > 1 and parts[0] in ("edit", "blob") else "main"
    return f"{repo_url.rstrip('/')}/blob/{branch}/"


def rewrite_source_links(markdown: str, page_path: str, base: str) -> str:
    """Point relative links from the page ``page_path`` (in ``docs/``) to repository sources at ``base``."""
    page_dir = posixpath.dirname(posixpath.join("docs", page_path))

    def fix(match: re.Match[str]) -> str:
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I) or target.startswith("/"):
            return match.group(0)
        path = posixpath.normpath(posixpath.join(page_dir, target))
        if not path.startswith(SOURCE_DIRS):
            return match.group(0)
        return f"{match.group(1)}{base}{path}{match.group(3)}"

    return _LINK.sub(fix, markdown)


def on_config(config: Any) -> Any:
    root = Path(config.config_file_path).parent
    config.site_name = f"{config.site_name} {package_version(root)}"
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return rewrite_source_links(markdown, page.file.src_uri, source_base(config.repo_url, config.edit_uri))
