"""Pass ``const-fold``: evaluate every node whose inputs are all constants, and shape expressions.

Wraps onnx-graphsurgeon's ``fold_constants`` (ORT evaluates the foldable subgraph) followed by
``cleanup``. External weights are materialized only when they feed a foldable node; all others stay on
disk.

Given::

    c = Constant<[1.0, 2.0]>
    d = Mul(c, 2.0)
    y = Add(x, d)

Result::

    y = Add(x, Constant<[2.0, 4.0]>)
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.graph import ExternalValues, tidy
from quadc.passes.base import GraphPass, PassResult, register_pass

# Nodes whose outputs should never be folded into big new constants by this pass.
_SIZE_THRESHOLD = 64 << 20
_INT_TYPES = (onnx.TensorProto.INT32, onnx.TensorProto.INT64)


def _materialize_foldable_inputs(graph: gs.Graph) -> int:
    """Load external constants that feed all-constant nodes, so ORT can evaluate them in memory."""
    loaded = 0
    for node in graph.nodes:
        if node.inputs and all(isinstance(t, gs.Constant) for t in node.inputs):
            for t in node.inputs:
                if isinstance(t._values, ExternalValues):
                    t.values = np.array(t._values.load())
                    loaded += 1
    return loaded


def _lower_constant_nodes(graph: gs.Graph) -> int:
    """Turn each ``Constant`` node holding a tensor ``value`` into that constant tensor (gs's first fold
    step, done here so that a graph with nothing else to fold, such as one fresh from an opset conversion,
    skips the rest); the nodes are left disconnected for cleanup."""
    lowered = 0
    for node in graph.nodes:
        value = node.attrs.get("value") if node.op == "Constant" and len(node.attrs) == 1 else None
        if isinstance(value, gs.Constant) and len(node.outputs) == 1:
            out = node.outputs[0]
            out.to_constant(value._values)
            out.inputs.clear()
            lowered += 1
    return lowered


def _may_fold(graph: gs.Graph) -> bool:
    """Whether onnx-graphsurgeon's ``fold_constants`` can change anything: a node whose inputs are all
    constants (``Constant`` nodes and nodes without inputs included), a ``Shape`` node, or a ``Cast`` to
    an integer type (gs elides float casts between integer casts). Without one, the whole-graph copy and
    walk that ``fold_constants`` costs (seconds on SD1.5) is skipped."""
    for node in graph.nodes:
        if not node.outputs:  # disconnected (a lowered Constant node): cleanup drops it
            continue
        if node.op == "Shape" or (node.op == "Cast" and node.attrs.get("to") in _INT_TYPES):
            return True
        if all(isinstance(t, gs.Constant) for t in node.inputs if not t.is_empty()):
            return True
    return False


def _signature(graph: gs.Graph) -> tuple[int, int]:
    return len(graph.nodes), sum(1 for t in graph.tensors().values() if isinstance(t, gs.Constant))


@register_pass
class ConstFold(GraphPass):
    """Fold all-constant subgraphs and static shape computations into constants (onnx-graphsurgeon)."""

    name = "const-fold"

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        before_nodes = len(graph.nodes)
        before_sig = _signature(graph)
        logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
        gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
        _lower_constant_nodes(graph)
        if _may_fold(graph):
            _materialize_foldable_inputs(graph)
            graph.fold_constants(fold_shapes=True, size_threshold=_SIZE_THRESHOLD, error_ok=True)
        tidy(graph)
        removed = before_nodes - len(graph.nodes)
        return PassResult(changed=_signature(graph) != before_sig, counts={"nodes_folded": max(removed, 0)})
