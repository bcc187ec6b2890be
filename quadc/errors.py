"""The one exception type for user mistakes.

A :class:`QuadcError` carries one sentence that says what is wrong, where, and how to fix it. The CLI
prints it without a traceback and exits non-zero; anything else is an internal bug and keeps its
traceback.
"""

from __future__ import annotations


class QuadcError(Exception):
    """A user-facing error: bad input, bad option, or an environment that lacks an extra."""


def require_extra(module: str, extra: str) -> None:
    """Raise a QuadcError naming the pip extra when an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise QuadcError(f"this needs the optional dependency '{module}': pip install 'quadc[{extra}]'")
