"""Pass ``dce``: remove nodes, tensors and constants that no graph output depends on.

Wraps onnx-graphsurgeon's ``cleanup``. Graph inputs are kept (a deployed graph's input list is its ABI)
unless the option ``remove_unused_inputs`` is true.

Given::

    y = Relu(x)
    dead = Sigmoid(x)        # nothing reads `dead`

Result::

    y = Relu(x)
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.graph import tidy
from quadc.passes.base import GraphPass, PassOption, PassResult, register_pass


@register_pass
class DeadCodeElimination(GraphPass):
    """Remove nodes and tensors that no graph output depends on (onnx-graphsurgeon cleanup)."""

    name = "dce"
    options = (PassOption("remove_unused_inputs", bool, False, "also drop graph inputs nothing reads"),)

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        nodes_before = len(graph.nodes)
        tensors_before = len(graph.tensors())
        inputs_before = len(graph.inputs)
        tidy(graph, remove_unused_inputs=self.opts["remove_unused_inputs"])
        counts = {
            "nodes_removed": nodes_before - len(graph.nodes),
            "tensors_removed": tensors_before - len(graph.tensors()),
            "inputs_removed": inputs_before - len(graph.inputs),
        }
        return PassResult(changed=any(counts.values()), counts=counts)
