"""Entry-point plugins: the one loader behind passes (``quadc.passes``), targets (``quadc.targets``) and
encoding schemes (``quadc.schemes``). A broken third-party plugin is refused in one line naming it."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import metadata
from typing import Any

from quadc.errors import QuadcError

__all__ = ["plugin_label", "plugins"]


def plugin_label(kind: str, ep: metadata.EntryPoint) -> str:
    """How errors name a plugin: ``<kind> plugin '<name>' (<module:object>)``."""
    return f"{kind} plugin '{ep.name}' ({ep.value})"


def plugins(group: str, kind: str, base: type | None = None) -> Iterator[tuple[metadata.EntryPoint, Any]]:
    """Each entry point of ``group`` with the object it loads; an import error, or (with ``base``) an object
    that is not a subclass of ``base``, is a one-line :class:`QuadcError` naming the plugin."""
    for ep in metadata.entry_points(group=group):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party plugin must say so in one line
            raise QuadcError(f"{plugin_label(kind, ep)} failed to import: {exc}") from None
        if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
            raise QuadcError(f"{plugin_label(kind, ep)} is not a {base.__module__}.{base.__qualname__} subclass")
        yield ep, obj
