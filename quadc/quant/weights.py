"""Weight encodings: which constants of a graph are weights, their output-channel axis, their encodings.

Weights are the constant weight inputs of MatMul, Gemm and Conv (other constants are never decoded),
plus the scales of InstanceNormalization/LayerNormalization (Qualcomm's HTP backend only finalizes
normalizations whose scale is quantized). Each gets the scheme's weight encoding
(:meth:`quadc.quant.schemes.EncodingScheme.weight_encoding`; under ``qnn-htp`` uint8 asymmetric per-tensor,
or with ``per_channel`` int8 symmetric) along its output-channel axis: Conv ``[out, in, kh, kw]``: 0; MatMul ``x @ W`` with
``W [.., in, out]``: last; MatMul ``W @ x``: second to last; Gemm ``B``: 0 with ``transB=1``, else 1;
Gemm ``A``: 0, or 1 with ``transA=1``; normalization scales: 0.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from quadc.graph import constant_values
from quadc.quant.affine import Encoding
from quadc.quant.schemes import QNN_HTP, EncodingScheme

__all__ = ["weight_axes", "weight_encodings"]

_NORM_OPS = ("InstanceNormalization", "LayerNormalization")
_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


def weight_axes(graph: gs.Graph) -> dict[str, int]:
    """Constant weight inputs of MatMul/Gemm/Conv, and the scales of InstanceNorm/LayerNorm, -> their
    output-channel axis (no weight is decoded)."""
    axes: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in _NORM_OPS:
            if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
                axes.setdefault(node.inputs[1].name, 0)
            continue
        if node.op not in _WEIGHT_OPS:
            continue
        positions = (1,) if node.op == "Conv" else (0, 1)
        for pos in positions:
            if pos >= len(node.inputs):
                continue
            t = node.inputs[pos]
            if not isinstance(t, gs.Constant) or t.name in axes:
                continue
            ndim = len(t.shape)
            if node.op == "Conv":
                axis = 0
            elif node.op == "Gemm":
                trans = int(node.attrs.get("transB" if pos == 1 else "transA", 0))
                axis = (0 if trans else 1) if pos == 1 else (1 if trans else 0)
            else:  # MatMul
                axis = ndim - 1 if pos == 1 else max(ndim - 2, 0)
            axes[t.name] = axis
    return axes


def weight_encodings(graph: gs.Graph, per_channel: bool | None = None,
                     scheme: EncodingScheme = QNN_HTP) -> dict[str, Encoding]:
    """Encodings of the weights (:func:`weight_axes`) in the ``scheme``'s types: per-tensor, or per output
    channel when the scheme (or, where it leaves the choice, ``per_channel``; None: the scheme's default)
    says so; 1-D weights stay per-tensor. Weights are read with :func:`~quadc.graph.constant_values`, so
    none stays mapped."""
    consts = {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    channel = scheme.weights_per_channel(per_channel)
    return {name: scheme.weight_encoding(np.asarray(constant_values(consts[name])), axis, channel)
            for name, axis in weight_axes(graph).items()}
