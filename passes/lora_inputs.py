"""Pass ``lora-inputs``: make every LoRA-augmented layer compute ``W x + alpha * A (B x)`` with A and B
supplied as graph inputs, so switching tasks is binding other tensors, never recompiling.

Slots are the union of the attach points of all LoRAs in ``ctx.loras`` (or the modules matching
the option ``targets``, comma-separated fnmatch patterns over module paths). Each
slot gets two graph inputs named from the module path, in the layout the ops consume so the graph
needs no Transpose:

- linear layers: ``<module>.lora_down`` = Bᵀ ``[d_in, r]`` and ``<module>.lora_up`` = (alpha·A)ᵀ
  ``[r, d_out]``, applied as ``MatMul(MatMul(x, down), up)``;
- conv layers: ``<module>.lora_down`` ``[r, d_in, kh, kw]`` (the base conv's kernel, stride, padding as
  the frontend reads it, and dilations) and ``<module>.lora_up`` ``[d_out, r, 1, 1]``, applied as
  ``Conv(Conv(x, down), up)``. A grouped conv (``group > 1``) is refused: a LoRA update ``up @ down`` is
  a dense conv over all input channels, which a grouped weight cannot hold (copying ``group`` to the down
  conv would let the 1x1 up conv mix the groups), and no LoRA format defines a grouped factorization.

Both inputs take the layer's activation type (``float32``, or ``float16`` in an fp16 model; the type
ONNX's MatMul/Gemm/Conv bind for the activation and the weight as the layer reads it, e.g. ``float32``
for bf16 weights behind a ``Cast``), recorded as ``LoRASlot.dtype`` so that packed task files and the
runtime's zero tensors match the graph.

The LoRA scale ``alpha`` is folded into ``up`` when a task is packed (:mod:`quadc.lora.pack`), and a
slot's rank is the largest rank any task uses there; smaller ranks are zero-padded, which is exact.
Binding all-zero tensors reproduces the base model exactly. The slots are recorded in
``ctx.lora_slots`` for packing.

Given::

    h = MatMul(x, W)               # down_blocks.0....attn1.to_q, W: [8, 8]
    y = Add(h, bias)

Result::

    graph inputs += to_q.lora_down: float[8, 4], to_q.lora_up: float[4, 8]
    h  = MatMul(x, W)
    y0 = Add(h, bias)              # MatMul+bias stay adjacent (one layer for later passes)
    d  = MatMul(x, to_q.lora_down)
    u  = MatMul(d, to_q.lora_up)
    y  = Add(y0, u)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.errors import QuadcError
from quadc.graph import variable
from quadc.lora.slots import DOWN_SUFFIX, UP_SUFFIX, LoRASlot, plan_slots
from quadc.passes.base import GraphPass, PassOption, PassResult, register_pass

__all__ = ["DOWN_SUFFIX", "LORA_DTYPES", "UP_SUFFIX", "LoRAInputs", "LoRASlot", "layer_dtype", "plan_slots"]

#: Float types a LoRA layer may compute in (onnxruntime runs both on CPU).
LORA_DTYPES = ("float32", "float16")
#: Ops that pass a weight through unchanged in type on its way to a layer.
_TYPE_PRESERVING = ("Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze")


def _np_dtype(dtype: object) -> np.dtype | None:
    """numpy dtype of a gs tensor's ``dtype`` (gs keeps types numpy lacks, e.g. bfloat16, as ONNX enums)."""
    if dtype is None:
        return None
    if isinstance(dtype, int | np.integer) and not isinstance(dtype, bool):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(dtype)))
    return np.dtype(dtype)  # type: ignore[arg-type]


def _arriving_dtype(tensor: gs.Tensor) -> np.dtype | None:
    """The type ``tensor`` has where it is consumed, read back through Cast/Identity/Transpose/... to a
    constant; None when the graph does not say."""
    for _ in range(16):
        if isinstance(tensor, gs.Constant) or tensor.dtype is not None:
            return _np_dtype(tensor.dtype)
        if len(tensor.inputs) != 1:
            return None
        producer = tensor.inputs[0]
        if producer.op == "Cast":
            return _np_dtype(int(producer.attrs["to"]))
        if producer.op == "Constant" and isinstance(producer.attrs.get("value"), gs.Constant):
            return _np_dtype(producer.attrs["value"].dtype)
        if producer.op not in _TYPE_PRESERVING or not producer.inputs:
            return None
        tensor = producer.inputs[0]
    return None


def _input_float_type(tensor: gs.Tensor) -> str:
    """The float type of an existing LoRA input: its own, or after qdq-insert made it an integer, the type
    its DequantizeLinear produces (the type of the scale)."""
    dtype = _np_dtype(tensor.dtype)
    if dtype is not None and dtype.kind == "f":
        return dtype.name
    for user in tensor.outputs:
        if user.op == "DequantizeLinear" and len(user.inputs) > 1 and user.inputs[1].dtype is not None:
            return _np_dtype(user.inputs[1].dtype).name  # type: ignore[union-attr]
    return "float32"


def layer_dtype(graph: gs.Graph, node: gs.Node) -> np.dtype:
    """The float type a MatMul/Gemm/Conv layer computes in: its activation's type when the graph records
    it, else the type its weight arrives with (ONNX binds one type T for both), else onnx shape inference."""
    candidates = [t for t in node.inputs[:2] if t is not None and t.name]
    for tensor in candidates:
        if not isinstance(tensor, gs.Constant) and tensor.dtype is not None:
            return _np_dtype(tensor.dtype)  # type: ignore[return-value]
    for tensor in candidates:
        found = _arriving_dtype(tensor)
        if found is not None:
            return found
    from quadc.graph import infer_shapes
    from quadc.quant.calibrate import clone_graph

    typed = infer_shapes(clone_graph(graph)).tensors()
    out = typed.get(node.outputs[0].name)
    if out is None or out.dtype is None:
        raise QuadcError(f"cannot tell the float type of layer '{node.name}' (shape inference gives none); "
                         "export the model with typed tensors")
    return _np_dtype(out.dtype)  # type: ignore[return-value]


def _after_bias(graph: gs.Graph, node: gs.Node, out: gs.Variable) -> gs.Variable:
    """The tensor to add the LoRA delta to: after the layer's bias ``Add`` when a MatMul has one.

    ``(W x + b) + delta`` equals ``(W x + delta) + b``; adding after the bias keeps MatMul+bias adjacent,
    the pattern that linear-to-conv and vendor converters fold into one layer with a bias. (On ORT CPU
    the full U-Net's steady-state forward measured the same either way: 4.79 s vs 4.68 s.)
    """
    if node.op != "MatMul" or len(out.outputs) != 1 or out in graph.outputs:
        return out
    nxt = out.outputs[0]
    if nxt.op == "Add" and len(nxt.inputs) == 2 and any(isinstance(t, gs.Constant) for t in nxt.inputs):
        return nxt.outputs[0]
    return out


@register_pass
class LoRAInputs(GraphPass):
    """Rewrite LoRA layers to W x + alpha*A(B x) with A and B as graph inputs (task switch = rebind)."""

    name = "lora-inputs"
    options = (
        PassOption("targets", str, None, "comma-separated fnmatch patterns of module paths that get LoRA "
                   "slots (default: the layers the given LoRAs use)"),
        PassOption("rank", int, None, "slot rank for --lora-targets layers no LoRA uses (default: the "
                   "largest LoRA rank, else 16)", low=1),
    )

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        slots = plan_slots(ctx.model_info, ctx.loras, self.opts["targets"], self.opts["rank"])
        existing = {t.name: t for t in graph.inputs}
        nodes = {n.name: n for n in graph.nodes}
        rewritten = 0
        for module, slot in slots.items():
            if slot.down_input in existing:  # already rewritten (idempotent)
                slots[module] = dataclasses.replace(slot, dtype=_input_float_type(existing[slot.down_input]))
                continue
            point = ctx.model_info.points[module]
            node = nodes.get(point.node)
            if node is None:
                raise QuadcError(f"layer '{module}' (node '{point.node}') is no longer in the graph; "
                                 "run lora-inputs before passes that rename layers")
            dtype = layer_dtype(graph, node).name
            if dtype not in LORA_DTYPES:
                raise QuadcError(f"layer '{module}' computes in {dtype}; LoRA inputs can be "
                                 f"{' or '.join(LORA_DTYPES)} (export the model in fp32 or fp16)")
            slots[module] = dataclasses.replace(slot, dtype=dtype)
            self._rewrite(graph, node, point, slots[module])
            rewritten += 1
        ctx.lora_slots = slots
        if rewritten:
            graph.toposort()
        return PassResult(changed=bool(rewritten), counts={"slots": len(slots), "rewritten": rewritten})

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        """Every slot's two inputs are graph inputs that feed the graph."""
        read = {t.name for n in graph.nodes for t in n.inputs}
        inputs = {t.name for t in graph.inputs}
        bad = [n for s in ctx.lora_slots.values() for n in (s.down_input, s.up_input)
               if n not in inputs or n not in read]
        return [f"every LoRA slot input is a graph input read by a node (not: {', '.join(bad[:3])})"] if bad else []

    @staticmethod
    def _rewrite(graph: gs.Graph, node: gs.Node, point, slot: LoRASlot) -> None:
        x = next((t for t in node.inputs if not isinstance(t, gs.Constant)), None)
        if x is None:
            raise QuadcError(f"layer '{slot.module}' has no activation input; the graph is not a U-Net export")
        out = node.outputs[0]
        attrs = {}
        if slot.kind == "conv":
            group = int(node.attrs.get("group", 1))
            if group != 1:
                raise QuadcError(f"layer '{slot.module}' is a grouped conv (group={group}); a LoRA update is a "
                                 "dense conv that a grouped weight cannot hold, so leave it out of the LoRA layers")
            attrs = {"strides": list(point.stride), "pads": list(point.padding),
                     "kernel_shape": list(point.kernel)}
            if "dilations" in node.attrs:
                attrs["dilations"] = [int(d) for d in node.attrs["dilations"]]
        dtype = np.dtype(slot.dtype)
        down = variable(slot.down_input, dtype, list(slot.down_shape))
        up = variable(slot.up_input, dtype, list(slot.up_shape))
        graph.inputs.extend([down, up])
        base = f"{point.node}/lora"
        # Intermediates stay untyped (shape inference fills them); only the sum keeps the layer's type.
        mid = variable(f"{base}/down_out")
        delta = variable(f"{base}/up_out")
        if slot.kind == "conv":
            graph.nodes.append(gs.Node("Conv", f"{base}/down", attrs=attrs, inputs=[x, down], outputs=[mid]))
            graph.nodes.append(gs.Node("Conv", f"{base}/up", attrs={"kernel_shape": [1, 1]},
                                       inputs=[mid, up], outputs=[delta]))
        else:
            graph.nodes.append(gs.Node("MatMul", f"{base}/down", inputs=[x, down], outputs=[mid]))
            graph.nodes.append(gs.Node("MatMul", f"{base}/up", inputs=[mid, up], outputs=[delta]))
        out = _after_bias(graph, node, out)
        consumers = list(out.outputs)
        is_graph_output = out in graph.outputs
        summed = variable(f"{base}/sum", out.dtype if out.shape else None, out.shape)
        add = gs.Node("Add", f"{base}/add", inputs=[out, delta], outputs=[summed])
        graph.nodes.append(add)
        for consumer in consumers:
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = summed
        if is_graph_output:
            graph.outputs[graph.outputs.index(out)] = summed
            summed.name, out.name = out.name, out.name + "/base"
