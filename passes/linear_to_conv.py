"""Pass ``linear-to-conv``: every linear layer (MatMul/Gemm with a constant weight) becomes a 1x1 ``Conv``
on the channels-first layout ``[B, C, 1, S]`` (``[B, C, 1, 1]`` for the time embedding), and the layout
changes once at each Transformer2D boundary instead of around every layer.

Found by pattern, never by name: ``MatMul(x, W)`` with ``x`` ``[B, S, C_in]`` or ``[B, C_in]`` and a
constant ``W`` ``[C_in, C_out]`` (or ``Transpose(W')``), with a following ``Add`` of a constant bias;
``Gemm(x, W, b)``. Each becomes ``Conv(toN(x), W[C_out, C_in, 1, 1], b)`` followed by ``toT`` (the
converters of :mod:`quadc.passes.layout`); a weight is transposed only when its layer is converted, and
lazily (an external weight stays on disk until the graph is written; a Gemm weight is only reshaped).

A LoRA branch on a converted layer (``MatMul(MatMul(x, down), up)`` added to the layer, ``down``/``up``
graph inputs listed in ``ctx.lora_slots``) moves to the channels layout: ``up[d_out, r] @ (down[r, d_in]
@ x[B, d_in, S])``, dynamic left MatMul operands, added to the Conv in N; the slot is recorded as
``slot.in_channels_layout()`` so task files are packed in that layout and the graph inputs change shape.

Then the layout engine (:func:`quadc.passes.layout.run_layout_engine`) sinks and cancels the converters:
LayerNorm becomes a channel-axis norm, the GEGLU split and the residual adds work in N, and the entry/exit
of each Transformer2D (``[B, C, H, W]`` <-> ``[B, HW, C]``) become Reshapes. In each attention the q/k/v
head reshapes act on channels: ``k`` is ``Reshape(k_n, [B, H, d, S])`` (no transpose), ``q`` is its
``Transpose(perm [0, 1, 3, 2])``, and the value product comes out channels first as
``MatMul(Reshape(v_n, [B, H, d, S]), Transpose(p))``. Counts: ``matmul_to_conv`` (layers converted),
``lora_to_channels`` (LoRA branches moved), ``transposes_left`` (Transpose nodes in the graph after it).

Given (golden case ``linear_bias``)::

    h = MatMul(x, w[4, 6])                       # x: [1, 3, 4]
    y = Add(b[6], h)

Result::

    xt = Transpose(x, [0, 2, 1])
    xn = Reshape(xt, [1, 4, 1, 3])
    yn = Conv(xn, w[6, 4, 1, 1], b_conv[6])      # w transposed, same name
    y  = Transpose(Reshape(yn, [1, 6, 3]), [0, 2, 1])

Between two converted layers the converters cancel (golden ``layernorm_residual``): a LayerNorm there becomes
``ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div`` over axis 1 with ``gamma``/``beta`` as ``[C, 1, 1]``, and the
residual ``Add`` reads both Convs' outputs directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from quadc.context import CompileContext
from quadc.graph import ExternalValues
from quadc.lora.slots import LoRASlot
from quadc.passes.base import GraphPass, PassResult, get_pass, register_pass
from quadc.passes.layout import (
    Editor,
    LazyArray,
    count_ops,
    ensure_static_shapes,
    run_layout_engine,
    static_shape,
    to_channels,
    to_tokens,
    transpose_2d,
)
from quadc.passes.patterns import producer

__all__ = ["LinearLayer", "LinearToConv", "find_linear_layers"]


@dataclass
class LinearLayer:
    """One linear layer found in the graph: its node, activation, weight and what to fold in."""

    node: gs.Node
    x: gs.Tensor
    weight: gs.Constant
    out_in: bool  # weight stored [C_out, C_in] (Gemm transB=1, or MatMul of a transposed constant)
    weight_via: gs.Node | None  # the Transpose node between the constant and the MatMul, if any
    bias: gs.Tensor | None
    bias_node: gs.Node | None  # the Add that adds the bias after a MatMul
    out: gs.Tensor  # the layer's output (after the bias)
    c_in: int
    c_out: int
    alpha: float = 1.0
    beta: float = 1.0
    cast: gs.Node | None = None  # a Cast from the stored type (bf16, fp16) to the compute type, if any


def _constant_weight(t: gs.Tensor) -> tuple[gs.Constant, bool, gs.Node | None] | None:
    """``(constant, out_in, transpose node)`` when ``t`` is a rank-2 constant or its 2-D Transpose (the
    Cast of a stored weight is looked through by :func:`find_linear_layers`)."""
    if isinstance(t, gs.Constant) and t.shape is not None and len(t.shape) == 2:
        return t, False, None
    node = producer(t)
    if (node is not None and node.op == "Transpose" and isinstance(node.inputs[0], gs.Constant)
            and len(node.inputs[0].shape or ()) == 2 and list(node.attrs.get("perm", [1, 0])) == [1, 0]):
        return node.inputs[0], True, node
    return None


def _bias_value(t: gs.Tensor, c_out: int) -> np.ndarray | None:
    """A constant bias that broadcasts as ``[C_out]`` along the last axis, as a ``[C_out]`` array."""
    if not isinstance(t, gs.Constant) or t.shape is None:
        return None
    shape = [int(d) for d in t.shape]
    if int(np.prod(shape, dtype=np.int64)) not in (1, c_out) or any(d != 1 for d in shape[:-1]):
        return None
    value = np.asarray(t.values)
    return np.broadcast_to(value.reshape(-1), (c_out,)).astype(value.dtype)


def find_linear_layers(graph: gs.Graph) -> list[LinearLayer]:
    """Every MatMul/Gemm with a constant weight on a ``[B, S, C]`` or ``[B, C]`` activation."""
    outputs = {id(t) for t in graph.outputs}
    layers: list[LinearLayer] = []
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        x = node.inputs[0]
        shape = static_shape(x)
        w_in = node.inputs[1]
        cast = producer(w_in) if producer(w_in) is not None and producer(w_in).op == "Cast" else None
        found = _constant_weight(cast.inputs[0] if cast is not None else w_in)
        if isinstance(x, gs.Constant) or shape is None or found is None:
            continue
        weight, out_in, via = found
        if node.op == "Gemm":
            if int(node.attrs.get("transA", 0)) or len(shape) != 2 or via is not None:
                continue
            out_in = bool(int(node.attrs.get("transB", 0)))
        elif len(shape) not in (2, 3):
            continue
        w_shape = [int(d) for d in weight.shape]
        if w_shape[1 if out_in else 0] != shape[-1]:
            continue
        if cast is not None and via is not None:
            continue
        layer = LinearLayer(node, x, weight, out_in, via, None, None, node.outputs[0], shape[-1],
                            w_shape[0 if out_in else 1], float(node.attrs.get("alpha", 1.0)),
                            float(node.attrs.get("beta", 1.0)), cast)
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            if _bias_value(node.inputs[2], layer.c_out) is None:
                continue
            layer.bias = node.inputs[2]
        elif node.op == "MatMul" and len(layer.out.outputs) == 1 and id(layer.out) not in outputs:
            add = layer.out.outputs[0]
            other = [t for t in add.inputs if t is not layer.out]
            if add.op == "Add" and len(other) == 1 and _bias_value(other[0], layer.c_out) is not None \
                    and static_shape(add.outputs[0]) == static_shape(layer.out):
                layer.bias, layer.bias_node, layer.out = other[0], add, add.outputs[0]
        layers.append(layer)
    return layers


@dataclass
class LoRABranch:
    """The LoRA branch of a layer: ``Add(layer output, MatMul(MatMul(x, down), up))``."""

    slot: LoRASlot
    down: gs.Node
    up: gs.Node
    add: gs.Node


def find_lora_branch(layer: LinearLayer, slots_by_down: dict[str, LoRASlot], outputs: set[int]) -> LoRABranch | None:
    """The LoRA branch on ``layer``, found structurally: a MatMul of the layer's input by a graph input that
    ``ctx.lora_slots`` lists as a ``down`` (matmul layout), then by its ``up``, added to the layer output."""
    if len(layer.out.outputs) != 1 or id(layer.out) in outputs:
        return None
    add = layer.out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    delta = next(t for t in add.inputs if t is not layer.out)
    up = producer(delta)
    if up is None or up.op != "MatMul" or len(delta.outputs) != 1 or id(delta) in outputs:
        return None
    mid = up.inputs[0]
    down = producer(mid)
    if down is None or down.op != "MatMul" or down.inputs[0] is not layer.x or len(mid.outputs) != 1:
        return None
    slot = slots_by_down.get(down.inputs[1].name)
    if slot is None or slot.layout != "matmul" or up.inputs[1].name != slot.up_input or id(mid) in outputs:
        return None
    return LoRABranch(slot, down, up, add)


def _conv_weight(layer: LinearLayer) -> LazyValues | np.ndarray:
    """The layer's weight as ``[C_out, C_in, 1, 1]`` values, computed when read (reshape-only weights of
    an external file stay references into it)."""
    src = layer.weight._values
    shape = (layer.c_out, layer.c_in, 1, 1)
    dtype = np.dtype(layer.weight.dtype) if not isinstance(layer.weight.dtype, int) else np.float32
    if layer.out_in and layer.alpha == 1.0 and isinstance(src, ExternalValues):
        proto = onnx.TensorProto()
        proto.CopyFrom(src.tensor)
        del proto.dims[:]
        proto.dims.extend(shape)
        return ExternalValues(proto, src.source, src._registry)
    alpha = layer.alpha
    fn: Callable[[np.ndarray], np.ndarray]
    if layer.out_in:
        def fn(w: np.ndarray) -> np.ndarray:
            return (w * alpha if alpha != 1.0 else w).reshape(shape)
    else:
        def fn(w: np.ndarray) -> np.ndarray:
            wt = transpose_2d(w)
            return (wt * alpha if alpha != 1.0 else wt).reshape(shape)
    return LazyArray(src, fn, shape, dtype)


def _weight_constant(ed: Editor, layer: LinearLayer) -> gs.Constant:
    """The Conv weight: the same constant rewritten in place when only this layer reads it (its name
    stays), else a new one."""
    values = _conv_weight(layer)
    w = layer.weight
    between = layer.weight_via or layer.cast
    readers = [n for n in w.outputs if n is not layer.node and n is not between]
    via_only = between is None or len(between.outputs[0].outputs) == 1
    if not readers and via_only:
        w._values = values
        return w
    return gs.Constant(ed.name(f"{w.name}_conv"), values)


def _convert(ed: Editor, layer: LinearLayer, branch: LoRABranch | None, graph: gs.Graph) -> LoRASlot | None:
    """Replace ``layer`` (and its LoRA branch) by the Conv form; returns the slot in its new layout."""
    name = layer.node.name or f"{layer.node.op}_{layer.c_in}x{layer.c_out}"
    shape = static_shape(layer.x) or []
    rank = len(shape)
    b, s = shape[0], (shape[1] if rank == 3 else 1)
    dtype = layer.x.dtype
    final = branch.add.outputs[0] if branch else layer.out
    bias = None
    if layer.bias is not None:
        value = _bias_value(layer.bias, layer.c_out)
        assert value is not None
        scaled = value if layer.beta == 1.0 else (value * layer.beta).astype(value.dtype)
        bias = ed.const(f"{layer.bias.name}_conv" if layer.bias.name else f"{name}/bias", scaled)
    weight = _weight_constant(ed, layer)
    for node in (layer.node, layer.bias_node, *((branch.down, branch.up, branch.add) if branch else ())):
        if node is not None:
            ed.remove(node)
    for between in (layer.weight_via, layer.cast):
        if between is not None and not between.outputs[0].outputs:
            ed.remove(between)
    if layer.cast is not None:  # the weight stays in its stored type, cast as before
        stored = weight
        weight = ed.var(f"{stored.name}/cast", [layer.c_out, layer.c_in, 1, 1], dtype)
        ed.node("Cast", f"{name}/weight_cast", [stored], [weight], dict(layer.cast.attrs))
    x_n, x_cs = to_channels(ed, layer.x, name)
    y = ed.var(f"{name}/conv_out", [b, layer.c_out, 1, s], dtype)
    ed.node("Conv", name, [x_n, weight, *([bias] if bias is not None else [])], [y],
            {"kernel_shape": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1})
    slot = None
    if branch is not None:
        slot = branch.slot.in_channels_layout()
        inputs = {t.name: t for t in graph.inputs}
        down_in, up_in = inputs[slot.down_input], inputs[slot.up_input]
        down_in.shape, up_in.shape = list(slot.down_shape), list(slot.up_shape)
        mid = ed.var(f"{name}/lora/down_out", [b, slot.rank, s], dtype)
        ed.node("MatMul", f"{name}/lora/down", [down_in, x_cs], [mid])
        delta = ed.var(f"{name}/lora/up_out", [b, layer.c_out, s], dtype)
        ed.node("MatMul", f"{name}/lora/up", [up_in, mid], [delta])
        delta_n = ed.reshape(delta, [b, layer.c_out, 1, s], f"{name}/lora/to_nchw")
        total = ed.var(f"{name}/lora/sum", [b, layer.c_out, 1, s], dtype)
        ed.node("Add", f"{name}/lora/add", [y, delta_n], [total])
        y = total
    to_tokens(ed, y, rank, name, out=final)
    return slot


@register_pass
class LinearToConv(GraphPass):
    """MatMul/Gemm with constant weights -> 1x1 Conv on [B, C, 1, S]; layout changes once per block."""

    name = "linear-to-conv"

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        ensure_static_shapes(graph, fold=lambda g: get_pass("const-fold").run(g, ctx))
        ed = Editor(graph)
        slots_by_down = {s.down_input: s for s in ctx.lora_slots.values()}
        outputs = {id(t) for t in graph.outputs}
        converted = moved = 0
        for layer in find_linear_layers(graph):
            branch = find_lora_branch(layer, slots_by_down, outputs) if slots_by_down else None
            slot = _convert(ed, layer, branch, graph)
            converted += 1
            if slot is not None:
                ctx.lora_slots[slot.module] = slot
                moved += 1
        engine = run_layout_engine(graph, ed)
        rewrites = sum(engine.values())
        counts = {"matmul_to_conv": converted, "lora_to_channels": moved, "layout_rewrites": rewrites,
                  "transposes_left": count_ops(graph, "Transpose")}
        return PassResult(changed=bool(converted or rewrites), counts=counts)

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        left = find_linear_layers(graph)
        if not left:
            return []
        names = ", ".join(layer.node.name or layer.node.op for layer in left[:3])
        return [f"{len(left)} MatMul/Gemm with a constant weight remain ({names})"]
