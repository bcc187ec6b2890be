"""Pass ``qnn-const-first``: an ``Add`` or ``Mul`` of a tensor and a constant reads the constant first.

Add and Mul commute (bit for bit in IEEE arithmetic), so the numbers do not change; what changes is what
Qualcomm's HTP backend makes of the graph. With the constant second — ``Add(MatMul(x, W) , bias)`` as the
dynamo exporter writes a linear layer — onnxruntime-qnn's HTP backend fails to finalize the whole U-Net
(``QNN_COMMON_ERROR_MEM_ALLOC``, measured with onnxruntime-qnn 2.7 on the x86 HTP backend), while the
same graph with the constant first — as the TorchScript exporter writes it — compiles and matches the CPU
(40 dB on the tiny U-Net). Quantizing those constants instead (uint16) lets it finalize but computes
wrong numbers, so the operand order is the legalization.

It renames nothing, so ranges calibrated before it still apply: the ``qnn`` target runs it after
``quant-plan``. Idempotent.

Given::

    y = Add(h, bias)          # bias: constant

Result::

    y = Add(bias, h)
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.passes.base import GraphPass, PassResult, register_pass
from quadc.passes.patterns import const_value

__all__ = ["COMMUTATIVE_OPS", "QnnConstFirst"]

#: Binary ops whose operands commute exactly.
COMMUTATIVE_OPS = ("Add", "Mul")


def _is_const(t: gs.Tensor) -> bool:
    return const_value(t) is not None


def _reversible(node: gs.Node) -> bool:
    """A commutative binary node whose second input is constant and whose first is not."""
    return (node.op in COMMUTATIVE_OPS and len(node.inputs) == 2 and (node.domain or "") in ("", "ai.onnx")
            and _is_const(node.inputs[1]) and not _is_const(node.inputs[0]))


@register_pass
class QnnConstFirst(GraphPass):
    """Put the constant operand of Add/Mul first (what the HTP backend finalizes; numbers unchanged)."""

    name = "qnn-const-first"

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        count = 0
        for node in graph.nodes:
            if _reversible(node):
                node.inputs = [node.inputs[1], node.inputs[0]]
                count += 1
        return PassResult(bool(count), {"swapped": count})

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        left = [n.name for n in graph.nodes if _reversible(n)]
        return [f"no Add/Mul reads a constant second ({left[0]} does)"] if left else []
