"""What the ``qnn`` target checks of its QDQ graph before handing it to onnxruntime-qnn.

Each check returns the problems it found as sentences (empty: the graph passes). Static input shapes are
checked before any pass (``Target.static_shapes``, :func:`quadc.graph_inputs.dynamic_inputs`).

- :func:`lora_defaults`: no LoRA slot input has an initializer default (a QNN context model whose LoRA
  inputs have defaults fails to load, and a default would hide an unbound task);
- :func:`matmul_pairs`: every MatMul of two dequantized dynamic tensors (activations, LoRA inputs) takes a
  pair of integer types the scheme allows (HTP: (u8,u8), (u8,u16), (u16,u8)).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from quadc.quant.affine import QType
from quadc.quant.schemes import EncodingScheme
from quadc.unet_inputs import is_lora_input

__all__ = ["lora_defaults", "matmul_pairs"]


def lora_defaults(model: onnx.ModelProto) -> list[str]:
    """LoRA slot inputs of a saved model that also have an initializer (a default value)."""
    inits = {i.name for i in model.graph.initializer}
    return [f"LoRA input '{i.name}' has an initializer default" for i in model.graph.input
            if is_lora_input(i.name) and i.name in inits]


def _dynamic_dq_type(tensor: gs.Tensor) -> QType | None:
    """The integer type a dynamic tensor (not a constant) is dequantized from, or None."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or node.op != "DequantizeLinear":
        return None
    source = node.inputs[0]
    if isinstance(source, gs.Constant):
        return None
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    dtype = zp.dtype if zp is not None else source.dtype
    try:
        return QType.from_onnx(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except Exception:  # not an integer type quadc knows
        return None


def matmul_pairs(graph: gs.Graph, scheme: EncodingScheme) -> list[str]:
    """MatMuls of two dequantized dynamic tensors whose type pair the scheme does not allow."""
    if not scheme.matmul_pairs:
        return []
    bad = []
    for node in _matmuls(graph.nodes):
        a, b = (_dynamic_dq_type(t) for t in node.inputs[:2])
        if a is not None and b is not None and (a, b) not in scheme.matmul_pairs:
            bad.append(f"MatMul '{node.name}' takes ({a}, {b})")
    return bad


def _matmuls(nodes: Iterable[gs.Node]) -> list[gs.Node]:
    return [n for n in nodes if n.op == "MatMul" and len(n.inputs) == 2]
