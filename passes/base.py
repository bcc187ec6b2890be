"""Pass infrastructure: ``GraphPass``, declared ``PassOption``s, ``PassResult`` and the registry.

A pass is a class registered under a kebab-case name with :func:`register_pass` (built-ins) or through
the ``quadc.passes`` entry-point group (plugins, whose names carry a namespace: ``qnn::legalize``). It
declares:

- ``requires``: passes that must have run before it (order);
- ``options``: its :class:`PassOption` s (name, type, default, help), parsed and validated once when the
  pass is built, read in ``run`` as ``self.opts["name"]``;
- ``precondition`` / ``postcondition``: what must hold of the graph before and after it, as a list of
  violated statements (empty when all hold); the pipeline checks them in verify mode and names the pass
  that broke one;
- ``preserves_numerics``: whether the numeric verify mode compares outputs before and after it;
- ``fixed_point``: whether the pipeline repeats it until it reports no change.

``run(graph, ctx)`` mutates the graph in place and returns a :class:`PassResult`. Passes keep no state
between runs and are idempotent: running one twice changes nothing the second time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.options import PassOption, parse_bool, parse_options

__all__ = ["GraphPass", "PassOption", "PassResult", "get_pass", "op_count", "parse_bool", "register_pass",
           "registered_passes"]

if TYPE_CHECKING:
    from quadc.context import CompileContext

ENTRY_POINT_GROUP = "quadc.passes"
_NAME = re.compile(r"^(?:[a-z][a-z0-9]*(?:-[a-z0-9]+)*::)?[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")
@dataclass
class PassResult:
    """What a pass did: whether the graph changed, and counts of what it rewrote."""

    changed: bool
    counts: dict[str, int] = field(default_factory=dict)


class GraphPass:
    """Base class of every pass. Subclasses set ``name`` and implement ``run``."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[PassOption, ...]] = ()
    preserves_numerics: ClassVar[bool] = True
    fixed_point: ClassVar[bool] = False

    def __init__(self, **values: Any) -> None:
        self.opts: dict[str, Any] = self.parse_options(values)

    @classmethod
    def parse_options(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """Every declared option: the given value parsed and checked, else its default."""
        return parse_options(cls.options, values, cls.name)

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def precondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        """Statements about the graph that must hold before the pass and do not (empty: all hold)."""
        return []

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        """Statements about the graph that must hold after the pass and do not (empty: all hold)."""
        return []

    @classmethod
    def summary(cls) -> str:
        """First line of the pass's docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


_REGISTRY: dict[str, type[GraphPass]] = {}
_PLUGINS_LOADED = False


def _check_name(name: str, where: str) -> None:
    if not _NAME.match(name or ""):
        raise ValueError(f"{where}: pass name must be kebab-case (optionally 'namespace::name'), got {name!r}")


def register_pass(cls: type[GraphPass]) -> type[GraphPass]:
    """Class decorator: register a pass under its kebab-case ``name``."""
    _check_name(cls.name, cls.__qualname__)
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_plugins() -> None:
    """Register the passes of every ``quadc.passes`` entry point (a GraphPass subclass). A plugin's
    pass name must carry a namespace (``vendor::name``) so it can never shadow a built-in pass."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from quadc.plugins import plugin_label, plugins

    for ep, cls in plugins(ENTRY_POINT_GROUP, "pass", GraphPass):
        if "::" not in cls.name:
            raise QuadcError(f"{plugin_label('pass', ep)} must name its pass 'namespace::name', got '{cls.name}'")
        try:
            register_pass(cls)
        except ValueError as exc:
            raise QuadcError(f"{plugin_label('pass', ep)}: {exc}") from None


def registered_passes() -> dict[str, type[GraphPass]]:
    """All registered passes by name: the built-ins and those of installed plugins."""
    import quadc.passes  # noqa: F401  (registers built-ins)

    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str, options: Mapping[str, Any] | None = None) -> GraphPass:
    """A fresh instance of the pass called ``name`` with ``options`` parsed and checked."""
    passes = registered_passes()
    if name not in passes:
        raise QuadcError(f"unknown pass '{name}'; known passes and presets: {', '.join(_known_names(passes))}")
    return passes[name](**dict(options or {}))


def _known_names(passes: Mapping[str, Any]) -> list[str]:
    from quadc.passes.presets import PRESETS

    return [*PRESETS, *passes]


def op_count(graph: gs.Graph, ops: Sequence[str] | str) -> int:
    """How many nodes of the given op type(s) the graph has (for pre-/postconditions)."""
    wanted = {ops} if isinstance(ops, str) else set(ops)
    return sum(1 for n in graph.nodes if n.op in wanted)
