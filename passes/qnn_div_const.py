"""Pass ``qnn-div-const``: a ``Div`` of a tensor by a float constant becomes a ``Mul`` by its reciprocal.

Qualcomm's HTP backend fails to finalize a QDQ graph holding ``Div(x, c)`` with ``c`` a float constant
(``QNN_COMMON_ERROR_MEM_ALLOC``, measured with onnxruntime-qnn 2.7 on the x86 HTP backend). The bundled
VAE decoder has ten: ``latent / scaling_factor`` at its input and the ``output_scale_factor`` /
``rescale_output_factor`` divisions of its resnets and attention; bisecting its QDQ graph, the prefix up
to ``post_quant_conv`` compiles and the one that adds ``decoder/conv_in`` behind the ``Div`` fails, and the
same graph with every such ``Div`` written as ``Mul(x, 1/c)`` compiles whole. The U-Net of the ``tiny`` and
``sd15`` exports has none, so there the pass changes nothing.

``x * (1/c)`` may differ from ``x / c`` in the last bit of a float32 (exact when ``c`` is a power of two,
e.g. the common ``1.0``). The ``Mul`` writes the ``Div``'s output tensor (same name), so ranges calibrated
before the rewrite still name it: the ``qnn`` target runs it after ``quant-plan`` and ``qnn-gelu`` (whose
pattern reads ``Div(x, sqrt(2))``) and before ``qnn-const-first`` (which then puts the constant first) and
``qdq-insert``. A constant with a zero or whose reciprocal is not finite, and a constant numerator, are
left alone. Idempotent.

Given::

    y = Div(x, 0.3958852)     # constant divisor

Result::

    y = Mul(x, 2.5259910)     # its float32 reciprocal
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.passes.base import GraphPass, PassResult, register_pass
from quadc.passes.patterns import const_value

__all__ = ["QnnDivConst", "reciprocal_of_divisor"]


def reciprocal_of_divisor(node: gs.Node) -> np.ndarray | None:
    """The reciprocal of ``node``'s constant float divisor when ``node`` is a standard ``Div`` of a
    non-constant tensor by one whose reciprocal is finite; else None."""
    if node.op != "Div" or len(node.inputs) != 2 or (node.domain or "") not in ("", "ai.onnx"):
        return None
    if const_value(node.inputs[0]) is not None:
        return None
    divisor = const_value(node.inputs[1])
    if divisor is None or divisor.dtype.kind != "f" or not np.all(divisor != 0):
        return None
    with np.errstate(over="ignore"):
        reciprocal = np.array(np.reciprocal(divisor), dtype=divisor.dtype).reshape(divisor.shape)
    return reciprocal if np.all(np.isfinite(reciprocal)) else None


@register_pass
class QnnDivConst(GraphPass):
    """Write ``Div(x, c)`` (``c`` a float constant) as ``Mul(x, 1/c)``, which the HTP backend finalizes."""

    name = "qnn-div-const"

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        count = 0
        for node in graph.nodes:
            reciprocal = reciprocal_of_divisor(node)
            if reciprocal is None:
                continue
            name = f"{node.inputs[1].name}_reciprocal"
            node.op = "Mul"
            node.inputs = [node.inputs[0], gs.Constant(f"{name}_{count}" if name in graph.tensors() else name,
                                                       reciprocal)]
            count += 1
        return PassResult(bool(count), {"rewritten": count})

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        left = [n.name for n in graph.nodes if reciprocal_of_divisor(n) is not None]
        return [f"no Div reads a float constant divisor ({left[0]} does)"] if left else []
