"""Pass infrastructure: the ``GraphPass`` base class, ``PassResult`` and the registry.

A pass is a class registered under a kebab-case name with :func:`register_pass`. It declares the
passes that must have run before it (``requires``), whether it keeps the graph's numbers
(``preserves_numerics``, used by the pipeline's numeric verify mode) and whether it consumes the
quantization plan (``needs_encodings``). ``run(graph, ctx)`` mutates the
graph in place and returns a :class:`PassResult`. Passes keep no state between runs and are idempotent:
running one twice changes nothing the second time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import onnx_graphsurgeon as gs

from quadc.errors import QuadcError

if TYPE_CHECKING:
    from quadc.context import CompileContext


@dataclass
class PassResult:
    """What a pass did: whether the graph changed, and counts of what it rewrote."""

    changed: bool
    counts: dict[str, int] = field(default_factory=dict)


class GraphPass:
    """Base class of every pass. Subclasses set ``name`` and implement ``run``."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    preserves_numerics: ClassVar[bool] = True
    #: The compile driver builds the quantization plan (ctx.encodings) before the first such pass.
    needs_encodings: ClassVar[bool] = False

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        """First line of the pass's docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


_REGISTRY: dict[str, type[GraphPass]] = {}


def register_pass(cls: type[GraphPass]) -> type[GraphPass]:
    """Class decorator: register a pass under its kebab-case ``name``."""
    name = cls.name
    if not name or name != name.lower() or " " in name or "_" in name:
        raise ValueError(f"pass name must be kebab-case, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"pass {name!r} is registered twice")
    _REGISTRY[name] = cls
    return cls


def registered_passes() -> dict[str, type[GraphPass]]:
    """All registered passes by name (importing quadc.passes registers the built-in ones)."""
    import quadc.passes  # noqa: F401  (registers built-ins)

    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> GraphPass:
    """A fresh instance of the pass called ``name``."""
    passes = registered_passes()
    if name not in passes:
        raise QuadcError(f"unknown pass '{name}'; known passes: {', '.join(passes)}")
    return passes[name]()


PassFactory = Callable[[], GraphPass]
