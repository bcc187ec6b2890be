"""Pass ``tflite::legalize``: the float graph in the op vocabulary the 16x8 TFLite kernels run.

Runs after the ``float`` preset and before ``quant-plan``, so the one calibration covers every tensor
the TFLite graph will have (the normalizations' means, variances and reciprocal square roots included):

1. **Static shapes**: onnx shape inference, then every shape computation (``Shape``, ``Gather`` of a
   shape, ``sqrt(head_dim)``...) folded to constants. A tensor whose shape stays unknown is refused in
   one line (TFLite here takes static shapes only).
2. **Normalizations** lowered to ``ReduceMean``/``Sub``/``Mul``/``Add``/``Sqrt``/``Reciprocal``
   (``Sqrt -> Reciprocal`` becomes one RSQRT in TFLite): ``LayerNormalization`` over its trailing axes,
   ``InstanceNormalization`` over the spatial axes, and GroupNorm as exported (``Reshape [N, G, -1] ->
   InstanceNormalization -> Reshape``) over ``[N, G, C/G, H*W]`` so the groups stay contiguous in NHWC.
   The normalization's output tensor keeps its name.

Given::

    n = LayerNormalization(x, gamma, beta, axis=-1, epsilon=1e-5)

Result::

    m = ReduceMean(x, axes=[-1]);  d = Sub(x, m);  v = ReduceMean(Mul(d, d), axes=[-1])
    r = Reciprocal(Sqrt(Add(v, 1e-5)));  n = Add(Mul(Mul(d, r), gamma), beta)
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.errors import QuadcError
from quadc.graph import infer_shapes
from quadc.passes.base import GraphPass, PassResult

NORM_OPS = ("LayerNormalization", "InstanceNormalization")


def fold_static_shapes(graph: gs.Graph) -> None:
    """Infer shapes and fold every computation on constants and static shapes (twice: folding exposes
    more shapes)."""
    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    for _ in range(2):
        infer_shapes(graph)
        graph.fold_constants(fold_shapes=True, error_ok=True)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    infer_shapes(graph)


def check_static(graph: gs.Graph) -> None:
    """A QuadcError naming the first tensor whose shape is not fully known."""
    for t in [*graph.inputs, *(o for n in graph.nodes for o in n.outputs)]:
        if t.shape is None or any(not isinstance(d, int) or d < 0 for d in t.shape):
            raise QuadcError(f"tensor '{t.name}' has no static shape ({t.shape}); the TFLite targets need static "
                             "shapes (export the model with fixed input shapes)")


class _Emit:
    """Appends nodes computing a lowering, named after the normalization's output."""

    def __init__(self, graph: gs.Graph, base: str, opset: int):
        self.graph, self.base, self.opset, self.i = graph, base, opset, 0

    def const(self, name: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{self.base}/tflite/{name}", np.asarray(values))

    def __call__(self, op: str, inputs: list[gs.Tensor], shape: list[int], *, out: gs.Variable | None = None,
                 attrs: dict | None = None) -> gs.Variable:
        self.i += 1
        if out is None:
            out = gs.Variable(f"{self.base}/tflite/{op}_{self.i}", np.float32, shape)
        self.graph.nodes.append(gs.Node(op, f"{self.base}/tflite/{op}_{self.i}", attrs or {}, inputs, [out]))
        return out

    def mean(self, x: gs.Tensor, axes: list[int], shape: list[int]) -> gs.Variable:
        if self.opset >= 18:
            return self("ReduceMean", [x, self.const(f"axes_{self.i + 1}", np.array(axes, np.int64))], shape,
                        attrs={"keepdims": 1})
        return self("ReduceMean", [x], shape, attrs={"axes": axes, "keepdims": 1})


def _lower(graph: gs.Graph, x: gs.Tensor, axes: list[int], eps: float, out: gs.Variable,
           scale: np.ndarray | None, bias: np.ndarray | None, opset: int) -> None:
    """``out = (x - mean) / sqrt(var + eps) * scale + bias`` over ``axes`` (scale/bias already shaped to
    broadcast against x, or None when they are identities)."""
    emit = _Emit(graph, out.name, opset)
    shape = list(x.shape)
    reduced = [1 if i in axes else d for i, d in enumerate(shape)]
    mean = emit.mean(x, axes, reduced)
    d = emit("Sub", [x, mean], shape)
    var = emit.mean(emit("Mul", [d, d], shape), axes, reduced)
    std = emit("Sqrt", [emit("Add", [var, emit.const("epsilon", np.array(eps, np.float32))], reduced)], reduced)
    rstd = emit("Reciprocal", [std], reduced)
    steps = [("Mul", scale), ("Add", bias)]
    steps = [(op, v) for op, v in steps if v is not None]
    y = emit("Mul", [d, rstd], shape, out=None if steps else out)
    for k, (op, values) in enumerate(steps):
        y = emit(op, [y, emit.const(op.lower(), values.astype(np.float32))], shape,
                 out=out if k == len(steps) - 1 else None)


def _const(t: gs.Tensor) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def _affine(values: np.ndarray | None, identity: float, shape: list[int]) -> np.ndarray | None:
    """``values`` reshaped to ``shape``, or None when absent or all equal to ``identity``."""
    if values is None or np.all(values == identity):
        return None
    return values.reshape(shape)


def _group_source(node: gs.Node) -> tuple[gs.Node, gs.Tensor] | None:
    """(Reshape, its 4-D input) when an InstanceNormalization normalizes GroupNorm groups: its input is
    ``Reshape(x [N, C, H, W], [N, G, -1])`` read by nothing else."""
    x = node.inputs[0]
    if len(x.inputs) != 1 or len(x.outputs) != 1 or x.inputs[0].op != "Reshape":
        return None
    reshape = x.inputs[0]
    src = reshape.inputs[0]
    if src.shape is None or len(src.shape) != 4 or len(x.shape) != 3:
        return None
    n, c, h, w = src.shape
    groups = x.shape[1]
    if x.shape[0] != n or c % groups or x.shape[2] != (c // groups) * h * w:
        return None
    return reshape, src


def lower_norms(graph: gs.Graph) -> dict[str, int]:
    """Replace LayerNormalization / InstanceNormalization nodes by their primitive computation."""
    opset = int(graph.opset or 17)
    counts = {"layer_norm": 0, "instance_norm": 0, "group_norm": 0}
    for node in [n for n in graph.nodes if n.op in NORM_OPS]:
        x, out = node.inputs[0], node.outputs[0]
        eps = float(node.attrs.get("epsilon", 1e-5))
        rank = len(x.shape)
        scale = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        bias = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        if (len(node.inputs) > 1 and scale is None) or (len(node.inputs) > 2 and node.inputs[2].name and bias is None):
            raise QuadcError(f"{node.op} '{node.name}' has a non-constant scale or bias; TFLite lowering needs "
                             "constants there")
        if node.op == "LayerNormalization":
            axis = int(node.attrs.get("axis", -1)) % rank
            axes = list(range(axis, rank))
            bshape = [1] * axis + list(x.shape[axis:])
            _lower(graph, x, axes, eps, out, _affine(scale, 1.0, bshape), _affine(bias, 0.0, bshape), opset)
            counts["layer_norm"] += 1
        else:
            group = _group_source(node)
            if group is not None:
                reshape, src = group
                n, c, h, w = src.shape
                groups = x.shape[1]
                grouped = gs.Variable(f"{out.name}/tflite/groups", np.float32, [n, groups, c // groups, h * w])
                shape_c = gs.Constant(f"{out.name}/tflite/group_shape",
                                      np.array([n, groups, c // groups, h * w], np.int64))
                graph.nodes.append(gs.Node("Reshape", f"{out.name}/tflite/Reshape_groups", {},
                                           [src, shape_c], [grouped]))
                reshape.outputs.clear()
                out.shape = list(grouped.shape)
                bshape = [1, groups, 1, 1]
                _lower(graph, grouped, [2, 3], eps, out, _affine(scale, 1.0, bshape), _affine(bias, 0.0, bshape),
                       opset)
                counts["group_norm"] += 1
            else:
                bshape = [1, x.shape[1]] + [1] * (rank - 2)
                _lower(graph, x, list(range(2, rank)), eps, out, _affine(scale, 1.0, bshape),
                       _affine(bias, 0.0, bshape), opset)
                counts["instance_norm"] += 1
        node.outputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return counts


class TfliteLegalize(GraphPass):
    """Static shapes folded; Layer/Instance/GroupNorm lowered to TFLite-kernel primitives (for tflite targets)."""

    name = "tflite::legalize"
    preserves_numerics = True

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        before = sorted(n.op for n in graph.nodes)
        fold_static_shapes(graph)
        counts = lower_norms(graph)
        infer_shapes(graph)
        check_static(graph)
        return PassResult(changed=sorted(n.op for n in graph.nodes) != before, counts=counts)

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        left = [n.name for n in graph.nodes if n.op in NORM_OPS]
        return [f"no normalization op is left (found {', '.join(left[:3])})"] if left else []
