"""Pass ``qnn-groupnorm``: ``GroupNormalization`` becomes the InstanceNormalization form that Qualcomm's
HTP backend runs (onnxruntime-qnn refuses GroupNormalization on HTP).

``GroupNormalization(x, scale, bias)`` with ``G`` groups over ``x [N, C, ...]`` (static shape) becomes::

    r = Reshape(x, [N, G, -1])
    n = InstanceNormalization(r, ones[G], zeros[G], epsilon)   # per (sample, group) over the group
    b = Reshape(n, shape(x))
    y = Add(bias[C, 1, ...], Mul(scale[C, 1, ...], b))

the form the TorchScript exporter writes for ``torch.nn.GroupNorm``. ``y`` keeps the original output
tensor. Opset 21 takes a per-channel ``scale``/``bias`` ``[C]``; opset 18's per-group ``[G]`` form is
expanded to channels. The input shape comes from the graph or from onnx shape inference; a
GroupNormalization whose input shape is not static, or whose scale or bias is not constant, is left
alone and counted (``skipped``).

The pass adds tensors that need their own calibrated ranges (the normalized values), so it belongs
before ``quant-plan``. On graphs without GroupNormalization (the TorchScript exports) it changes nothing,
so the graph, its fingerprint and its calibration stay shared with the other targets.

Given::

    y = GroupNormalization<num_groups=2, epsilon=1e-5>(x, s, b)      # x: float[1, 8, 4, 4], opset 21

Result::

    r = Reshape(x, [1, 2, -1])
    n = InstanceNormalization<epsilon=1e-5>(r, [1, 1], [0, 0])
    u = Reshape(n, [1, 8, 4, 4])
    m = Mul(s[8, 1, 1], u)
    y = Add(b[8, 1, 1], m)
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.graph import unique_name
from quadc.passes.base import GraphPass, PassResult, op_count, register_pass
from quadc.passes.patterns import const_value

__all__ = ["QnnGroupNorm"]


def _static_shape(t: gs.Tensor) -> list[int] | None:
    shape = t.shape
    if shape is None or len(shape) < 3 or not all(isinstance(d, int | np.integer) and d > 0 for d in shape):
        return None
    return [int(d) for d in shape]


def _inferred_shapes(graph: gs.Graph) -> dict[str, list[int]]:
    """Static shapes of the graph's tensors from onnx shape inference on a copy (``graph`` unchanged)."""
    from quadc.graph import infer_shapes
    from quadc.quant.calibrate import clone_graph

    return {name: shape for name, t in infer_shapes(clone_graph(graph)).tensors().items()
            if (shape := _static_shape(t)) is not None}


@register_pass
class QnnGroupNorm(GraphPass):
    """Lower GroupNormalization to Reshape + InstanceNormalization + Reshape + Mul + Add (what HTP runs)."""

    name = "qnn-groupnorm"

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        counts = {"lowered": 0, "skipped": 0}
        nodes = [n for n in graph.nodes if n.op == "GroupNormalization" and (n.domain or "") in ("", "ai.onnx")]
        if not nodes:
            return PassResult(False, counts)
        taken = set(graph.tensors()) | {n.name for n in graph.nodes}
        inferred = _inferred_shapes(graph) if any(_static_shape(n.inputs[0]) is None for n in nodes) else {}
        for node in nodes:
            x = node.inputs[0]
            shape = _static_shape(x) or inferred.get(x.name)
            scale = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            bias = const_value(node.inputs[2]) if len(node.inputs) > 2 else None
            groups = int(node.attrs.get("num_groups", 0))
            if shape is None or scale is None or bias is None or groups <= 0 or shape[1] % groups:
                counts["skipped"] += 1
                continue
            channels = shape[1]
            if scale.size == groups and channels != groups:  # opset 18: one scale per group
                scale, bias = np.repeat(scale, channels // groups), np.repeat(bias, channels // groups)
            if scale.size != channels or bias.size != channels:
                counts["skipped"] += 1
                continue
            self._lower(graph, node, x, shape, groups, scale, bias, taken)
            counts["lowered"] += 1
        if counts["lowered"]:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(bool(counts["lowered"]), counts)

    @staticmethod
    def _lower(graph: gs.Graph, node: gs.Node, x: gs.Tensor, shape: list[int], groups: int,
               scale: np.ndarray, bias: np.ndarray, taken: set[str]) -> None:
        y = node.outputs[0]
        base = y.name
        dtype = x.dtype if x.dtype is not None else np.float32
        fdtype = np.dtype(dtype)
        per_channel = [shape[1]] + [1] * (len(shape) - 2)

        def const(suffix: str, values: np.ndarray) -> gs.Constant:
            return gs.Constant(unique_name(graph, f"{base}_qnn_gn_{suffix}", taken), np.ascontiguousarray(values))

        def var(suffix: str, shp: list[int]) -> gs.Variable:
            return gs.Variable(unique_name(graph, f"{base}_qnn_gn_{suffix}", taken), dtype=dtype, shape=shp)

        grouped = [shape[0], groups, int(np.prod(shape[1:])) // groups]
        r = var("grouped", grouped)
        n = var("normalized", grouped)
        u = var("ungrouped", list(shape))
        m = var("scaled", list(shape))
        eps = float(node.attrs.get("epsilon", 1e-5))
        name = node.name or base
        graph.nodes.extend([
            gs.Node("Reshape", f"{name}/qnn_gn/Reshape", inputs=[x, const("group_shape", np.array([shape[0], groups, -1], np.int64))],
                    outputs=[r]),
            gs.Node("InstanceNormalization", f"{name}/qnn_gn/InstanceNormalization", attrs={"epsilon": eps},
                    inputs=[r, const("ones", np.ones(groups, fdtype)), const("zeros", np.zeros(groups, fdtype))], outputs=[n]),
            gs.Node("Reshape", f"{name}/qnn_gn/Reshape_back", inputs=[n, const("shape", np.array(shape, np.int64))], outputs=[u]),
            # Constants first, as qnn-const-first leaves them (HTP's preferred operand order).
            gs.Node("Mul", f"{name}/qnn_gn/Mul", inputs=[const("scale", scale.astype(fdtype).reshape(per_channel)), u],
                    outputs=[m]),
            gs.Node("Add", f"{name}/qnn_gn/Add", inputs=[const("bias", bias.astype(fdtype).reshape(per_channel)), m],
                    outputs=[y]),
        ])
        node.outputs.clear()

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        left = op_count(graph, "GroupNormalization")
        return [f"no GroupNormalization with a static input shape is left ({left} remain)"] if any(
            n.op == "GroupNormalization" and _static_shape(n.inputs[0]) is not None for n in graph.nodes) else []
