"""Pass ``transpose-cancel``: remove inverse Transpose/Reshape pairs, merge consecutive ones, and move
layout converters through layout-agnostic ops until they meet and cancel.

It runs the layout engine of :mod:`quadc.passes.layout` (the one ``linear-to-conv`` uses) to a fixed
point over the whole graph; see there for the rules. It is the clean-up after passes that leave
converters behind, e.g. ``mha-split`` run before or after ``linear-to-conv``: a per-head Split/Concat on
the last axis of a token-layout tensor becomes a Split/Concat on the channel axis, each head's key
``Transpose(Transpose(...))`` cancels to a Reshape, the query keeps one 3-D Transpose for the scores
MatMul, and the value product comes out channels first (``MatMul(v_h[B, d, S], Transpose(p_h))``).
Counts: ``rewrites`` (engine rules applied) and ``transposes_left``.

Given (golden case ``sink_elementwise``; ``a``: ``[1, 4, 1, 3]``)::

    t = Transpose(Reshape(a, [1, 4, 3]), [0, 2, 1])        # N -> T
    g = Sigmoid(t)
    y = Mul(t, g)
    z = Reshape(Transpose(y, [0, 2, 1]), [1, 4, 1, 3])     # T -> N

Result::

    g = Sigmoid(a)
    z = Mul(a, g)
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.passes.base import GraphPass, PassResult, get_pass, register_pass
from quadc.passes.layout import count_ops, ensure_static_shapes, run_layout_engine

__all__ = ["TransposeCancel"]


@register_pass
class TransposeCancel(GraphPass):
    """Cancel inverse Transpose/Reshape pairs and sink layout converters through layout-agnostic ops."""

    name = "transpose-cancel"

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        ensure_static_shapes(graph, fold=lambda g: get_pass("const-fold").run(g, ctx))
        before = count_ops(graph, "Transpose")
        counts = run_layout_engine(graph)
        rewrites = sum(counts.values())
        left = count_ops(graph, "Transpose")
        return PassResult(changed=bool(rewrites), counts={"rewrites": rewrites, "transposes_removed": before - left,
                                                          "transposes_left": left})
