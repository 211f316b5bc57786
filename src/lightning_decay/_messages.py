"""Message helpers shared by every error and warning that names parameters or options.

No dependency on the rest of the package: any module may use them (``plan``, ``rules``, the engine, the
adapters), so none of them has to import another for its wording.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

__all__ = ["closest_names", "few_names", "unknown_name_message"]


def closest_names(name: str, known: Sequence[str], n: int = 3) -> list[str]:
    """The known names most like ``name``: first those that differ only by leading components (a prefix
    such as ``net.`` added or missing), then the closest by ``difflib``."""
    suffix_of = [k for k in known if k.endswith("." + name) or name.endswith("." + k)]
    similar = difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    return list(dict.fromkeys(suffix_of + similar))[:n]


def unknown_name_message(name: str, known: Sequence[str], what: str) -> str:
    """``'{name}' is not {what}``, with the closest known names, or a few of them when none is close."""
    close = closest_names(name, known)
    if close:
        return f"{name!r} is not {what}; did you mean {', '.join(repr(c) for c in close)}?"
    return f"{name!r} is not {what}; the names are {few_names(known)}"


def few_names(names: Sequence[str], n: int = 5) -> str:
    """The first ``n`` names, quoted, and how many more."""
    shown = ", ".join(repr(x) for x in list(names)[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
