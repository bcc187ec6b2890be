"""Merge one LoRA into a copy of the base weights: the conventional "one graph per task" baseline.

quadc never deploys merged graphs; benchmarks and quality comparisons build them to measure what QUAD
saves (storage, switch time) and to quantize each task on its own (the incompatible upper bound).

``W' = W + scale * up @ down`` in the layout the graph stores ``W``:

- MatMul weight ``[d_in, d_out]``: ``W' = W + (scale * up @ down)ᵀ``
- Gemm with ``transB=1`` (``[d_out, d_in]``): ``W' = W + scale * up @ down``
- Conv ``[d_out, d_in, kh, kw]``: the LoCon delta ``scale * (up[:, :, 0, 0] @ down.reshape(r, -1))``
  reshaped to the kernel.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.frontend.model_info import ModelInfo


def layer_delta(layer, point) -> np.ndarray:
    """The dense weight update of one LoRA layer, in the graph's storage layout for ``point``."""
    scale = np.float32(layer.scale)
    up = np.asarray(layer.up, np.float32)
    down = np.asarray(layer.down, np.float32)
    if point.kind == "conv":
        r = down.shape[0]
        delta = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(point.d_out, point.d_in, *point.kernel)
        return scale * delta
    delta = scale * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))  # [d_out, d_in]
    return delta.T if point.weight_layout == "in_out" else delta


def merge_lora(graph: gs.Graph, info: ModelInfo, lora) -> int:
    """Add ``lora``'s dense updates to the graph's weights in place; returns the layers merged."""
    tensors = graph.tensors()
    merged = 0
    for module, layer in lora.layers.items():
        point = info.points.get(module)
        if point is None:
            raise QuadcError(f"LoRA layer '{module}' is not a layer of this model")
        weight = tensors.get(point.weight)
        if not isinstance(weight, gs.Constant):
            raise QuadcError(f"layer '{module}': weight '{point.weight}' is not a constant of the graph")
        stored = np.asarray(weight.values)
        base = stored.astype(np.float32)
        delta = layer_delta(layer, point)
        if delta.shape != base.shape:
            raise QuadcError(f"layer '{module}': LoRA update {delta.shape} does not fit weight {base.shape}")
        weight.values = (base + delta).astype(stored.dtype)  # the model's own type (fp16, bf16 models)
        merged += 1
    return merged
