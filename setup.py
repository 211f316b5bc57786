"""The metadata that comes from the repository's address: the long description and the project URLs.

Everything else is in pyproject.toml. The README is the index page, but its links are relative to the
repository (``docs/faq.md``, ``docs/img/weight_norms.png``), which the index cannot resolve: the long
description is the README with those links made absolute, to the files on GitHub and to the image's raw
bytes. The README itself keeps relative links, which work in a checkout and are checked by tests/test_docs.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from setuptools import setup

REPOSITORY = "https://github.com/lightning-decay/lightning-decay"
DOCUMENTATION = "https://lightning-decay.readthedocs.io"
BRANCH = "main"

PROJECT_URLS = {
    "Source": REPOSITORY,
    "Documentation": DOCUMENTATION,
    "Issues": f"{REPOSITORY}/issues",
}

# A Markdown link or image target: `](target)`, target without a scheme (`https:`, `mailto:`) or leading `#`/`/`.
_RELATIVE_TARGET = re.compile(r"(!?\[[^\]]*\]\()(?![a-zA-Z][a-zA-Z0-9+.-]*:|[#/])([^)\s]+)\)")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")


def absolute_links(markdown: str, repository: str = REPOSITORY, branch: str = BRANCH) -> str:
    """``markdown`` with every relative link pointing into ``repository`` at ``branch`` (images to raw files)."""

    def replace(match: re.Match[str]) -> str:
        opening, target = match.groups()
        path = target.split("#", 1)[0]
        if opening.startswith("!") or path.lower().endswith(_IMAGE_SUFFIXES):
            owner_repo = repository.removeprefix("https://github.com/")
            return f"{opening}https://raw.githubusercontent.com/{owner_repo}/{branch}/{target})"
        return f"{opening}{repository}/blob/{branch}/{target})"

    return _RELATIVE_TARGET.sub(replace, markdown)


if __name__ == "__main__":
    readme = (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8")
    setup(
        long_description=absolute_links(readme),
        long_description_content_type="text/markdown",
        project_urls=PROJECT_URLS,
    )
