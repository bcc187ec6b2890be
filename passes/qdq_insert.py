"""Pass ``qdq-insert``: insert standard QuantizeLinear/DequantizeLinear nodes from the quantization plan.

Everything comes from ``ctx.plan`` (a :class:`~quadc.quant.plan.QuantPlan`); the pass decides
nothing about ranges, only where the nodes go:

- **activations** (``plan.activations``): each float graph input or node output gets ``Q -> DQ`` right
  after its producer and every consumer reads the DQ output. A graph output keeps its name: the DQ output
  takes it and the float tensor becomes ``<name>_QuantizeLinear_Input``. A constant listed here is
  quantized offline (int initializer + DQ). Each encoding's qtype is used as is (uint16 for A16, uint8
  for the plan's A8 tensors).
- **weights** (``plan.weights``): the float constant becomes ``<w>_quantized`` (uint8 per-tensor or int8
  symmetric per-channel with ``axis``) feeding ``DequantizeLinear``; every consumer reads the DQ output.
- **biases** of Conv/Gemm (and of Instance-/LayerNormalization whose scale is in ``plan.weights``) whose
  input and weight are quantized: int32 with ``scale = x_scale * w_scale`` and zero point 0, as
  onnxruntime's QNN quantizer (``get_qnn_qdq_config``) makes them; option ``bias="float"`` keeps them
  float (QNN HTP accepts a float Conv bias; it cannot finalize an InstanceNormalization whose scale and
  bias are float).
- **LoRA slot inputs** (``plan.lora``): the graph input's dtype becomes the encoding's integer type
  (uint8) and feeds ``DequantizeLinear`` with the ONE shared scale/zero point, so every task's stored
  bytes bind as they are. With ``plan.lora_float_inputs`` the input stays float and gets ``Q -> DQ``.
- **activation x activation MatMuls** (attention ``Q·Kᵀ`` and ``P·V``): with option
  ``act_matmul_8bit`` the second input of a MatMul whose inputs are both 16-bit activations is
  re-quantized to uint8 (``DQ16 -> Q8 -> DQ8``, as onnxruntime's QNN mixed-precision "convert" does) so
  the pair is (u16, u8), one of HTP's MatMul type pairs. (onnxruntime-qnn's HTP backend also accepts a
  u16 x u16 MatMul by converting input 1 to 8 bits itself; the option makes that conversion explicit, so
  the ORT CPU reference computes what HTP computes.)

**float16 graphs.** A tensor is quantized in its own float type: ONNX Q/DQ take the scale in the type of
the float tensor (DequantizeLinear outputs the scale's type), so a float16 tensor (an fp16 model's
activations, weights and LoRA inputs) gets a float16 scale. Each such scale is the smallest float16 at or
above the planned one (at least float16's smallest subnormal), so the grid still covers the planned range
and zero stays exact, and that encoding replaces the plan's entry, so ``encodings.json`` and the packed
LoRA integers match the graph bit for bit. An int32 bias scale ``x_scale * w_scale`` (about 1e-4 * 1e-3)
is usually below float16's normal range, so for a float16 layer it is computed in float32 and then rounded
up to a float16 the same way. Float biases of float16 layers are refused (``bias="float"``): onnxruntime's
``WeightBiasQuantization`` turns them into int32 at session start with the scale product taken in float16,
which underflows (measured on the tiny fp16 U-Net: -11 dB SQNR instead of +22 dB). Tensors of other float
types (bf16 weights behind a ``Cast``; ``const-fold`` folds those to float32 first) are left alone. Tensors
without a recorded type get theirs from onnx shape inference. 8-bit activations on float16 tensors
(``w8a8``, ``a8_fraction``) are refused: onnxruntime 1.32 fuses 8-bit Q/DQ around a Concat into
``QLinearConcat``, which rejects float16 scales, so such a graph does not load.

16-bit Q/DQ needs opset 21 (per-axis Q/DQ needs 13, float16 Q/DQ 19). Option ``opset``: ``"21"`` (default) upgrades a
graph below that with ``onnx.version_converter`` on the weight-free proto (initializers become unloaded references, so models
over 2 GB convert too) and re-attaches the original constants; ``"contrib"`` keeps the opset and puts
every Q/DQ node in the ``com.microsoft`` domain (onnxruntime's contrib ops, as its quantizer does with
``UseQDQContribOps``).

Names follow onnxruntime's quantizer: ``<t>_scale``, ``<t>_zero_point``, ``<t>_QuantizeLinear[_Output]``,
``<t>_DequantizeLinear[_Output]``, ``<w>_quantized``. The pass is idempotent: tensors already read
through a Q/DQ pair and integer LoRA inputs are left alone.

Given::

    graph inputs: x: float[1, 3, 8], to_q.lora_down: float[8, 2], to_q.lora_up: float[2, 6]
    h = MatMul(x, w)
    d = MatMul(x, to_q.lora_down)
    u = MatMul(d, to_q.lora_up)
    y = Add(h, u)                                  # graph output

Result (w8a16, uint8 LoRA inputs)::

    graph inputs: x: float[1, 3, 8], to_q.lora_down: uint8[8, 2], to_q.lora_up: uint8[2, 6]
    xq = QuantizeLinear(x, x_scale, x_zero_point)                  # uint16
    xd = DequantizeLinear(xq, x_scale, x_zero_point)
    wd = DequantizeLinear(w_quantized, w_scale, w_zero_point)      # uint8 initializer
    ld = DequantizeLinear(to_q.lora_down, to_q.lora_down_scale, to_q.lora_down_zero_point)
    h  = MatMul(xd, wd) -> Q -> DQ
    d  = MatMul(xd, ld) -> Q -> DQ ...
    y_QuantizeLinear_Input = Add(hd, ud)
    y  = DequantizeLinear(QuantizeLinear(y_QuantizeLinear_Input, ...), ...)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.errors import QuadcError
from quadc.graph import computed_weights_as_dims, constant_values, export_proto
from quadc.passes.base import GraphPass, PassOption, PassResult, register_pass
from quadc.quant.affine import Encoding, QType, compute_encoding, quantize
from quadc.quant.plan import QuantPlan

QDQ_OPSETS = ("21", "contrib")
BIAS_MODES = ("int32", "float")
#: First standard opset whose QuantizeLinear/DequantizeLinear take 16-bit integers.
OPSET_16BIT = 21
#: First standard opset with per-axis QuantizeLinear/DequantizeLinear.
OPSET_PER_AXIS = 13
#: First standard opset whose QuantizeLinear/DequantizeLinear take float16 tensors and scales.
OPSET_FLOAT16 = 19
#: IR version that opset 21 needs.
IR_VERSION_21 = 10
CONTRIB_DOMAIN = "com.microsoft"
_INT32 = np.iinfo(np.int32)
#: Ops whose input 2 is a bias added to ``input0 (*) input1``: int32 with scale x_scale * w_scale (as
#: onnxruntime's QDQ quantizer does for Conv, Gemm and the normalizations whose scale is quantized).
_BIAS_OPS = ("Conv", "Gemm", "InstanceNormalization", "LayerNormalization")
_STRIPPED = "__quadc_stripped__"
#: Float types qdq-insert quantizes; Q/DQ scales take the tensor's type.
_QUANT_FLOATS = (np.dtype(np.float32), np.dtype(np.float16))
_F16 = np.finfo(np.float16)


def _f16_at_or_above(scale: np.ndarray) -> np.ndarray:
    """The smallest float16 at or above each (positive float32) scale, at least float16's smallest
    subnormal, as float32 values."""
    want = np.asarray(scale, np.float32)
    with np.errstate(over="ignore"):
        s16 = want.astype(np.float16)
    s16 = np.where(s16.astype(np.float32) < want, np.nextafter(s16, np.float16(np.inf)), s16)
    s16 = np.maximum(s16, np.float16(_F16.smallest_subnormal))
    if not np.all(np.isfinite(s16)):
        raise QuadcError(f"a quantization scale ({float(want.max()):.3g}) exceeds float16's range; this float16 "
                         "tensor cannot be quantized with it")
    return s16.astype(np.float32)


def in_float_type(enc: Encoding, dtype: np.dtype) -> Encoding:
    """``enc`` with each scale representable in ``dtype`` (float32: ``enc`` itself): the smallest float16 at
    or above the scale, at least float16's smallest subnormal. The zero point is kept, so zero stays
    exact and the grid covers at least the planned range."""
    if np.dtype(dtype) != np.float16:
        return enc
    want = np.asarray(enc.scale, np.float32)
    scale = _f16_at_or_above(want)
    if np.array_equal(scale, want):
        return enc
    return Encoding(scale=scale, zero_point=enc.zero_point, qtype=enc.qtype, axis=enc.axis,
                    symmetric=enc.symmetric, tmin=enc.tmin, tmax=enc.tmax)


def _all_encodings(plan: QuantPlan) -> list[Encoding]:
    return [*plan.activations.values(), *plan.weights.values(), *plan.lora.values()]


def upgrade_opset(graph: gs.Graph, version: int = OPSET_16BIT) -> None:
    """Convert ``graph`` in place to opset ``version`` without decoding or copying any weight.

    ``onnx.version_converter`` runs on a proto whose initializers are unloaded references (it fails on
    protos over 2 GB). Only the nodes the converter changed or added are imported (the rest, usually all
    but a few, stay the same objects), wired to the graph's own tensors, so external weights stay lazy;
    when that cannot be done (a changed node with a subgraph, a graph input or output it renamed), the
    whole converted graph is imported and every original constant put back.
    """
    with computed_weights_as_dims(graph):  # a pass's lazily computed weights stay uncomputed
        model, _ = export_proto(graph)
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL and len(init.raw_data) == 0:
            continue
        init.ClearField("raw_data")
        for fld in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            init.ClearField(fld)
        del init.external_data[:]
        init.data_location = onnx.TensorProto.EXTERNAL
        entry = init.external_data.add()
        entry.key, entry.value = "location", _STRIPPED
    try:
        converted = onnx.version_converter.convert_version(model, version)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise QuadcError(
            f"cannot convert the graph from opset {graph.opset} to {version} ({exc}); export the model at "
            f"opset {version}, or compile with the option qdq_opset='contrib' (com.microsoft Q/DQ)"
        ) from None
    if not _adopt_changed_nodes(graph, model, converted):
        _adopt_all_nodes(graph, converted)
    graph.opset = version
    # vars(): gs.Graph's __getattr__ logs an error for attributes it does not have.
    opsets = dict(vars(graph).get("opset_imports") or {})
    opsets[""] = version
    graph.opset_imports = opsets  # type: ignore[attr-defined]
    graph.ir_version = max(int(vars(graph).get("ir_version") or 0), IR_VERSION_21)  # type: ignore[attr-defined]


def _adopt_all_nodes(graph: gs.Graph, converted: onnx.ModelProto) -> None:
    """Replace the graph's nodes, inputs and outputs by the converted model's, with the original constants."""
    new = gs.import_onnx(converted)
    originals = {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    for node in new.nodes:
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and tensor.name in originals:
                node.inputs[i] = originals[tensor.name]
    outputs = [originals.get(t.name, t) if isinstance(t, gs.Constant) else t for t in new.outputs]
    graph.nodes = new.nodes
    graph.inputs = new.inputs
    graph.outputs = outputs


def _adopt_changed_nodes(graph: gs.Graph, exported: onnx.ModelProto, converted: onnx.ModelProto) -> bool:
    """Put the converter's changed and added nodes in place of the originals, keeping every unchanged node
    and every tensor object; False (nothing done) when that cannot be done safely."""
    if [i.name for i in exported.graph.input] != [i.name for i in converted.graph.input] or \
            [o.name for o in exported.graph.output] != [o.name for o in converted.graph.output]:
        return False
    originals = list(graph.nodes)
    same: dict[int, gs.Node] = {}  # converted node index -> the unchanged original node
    by_output = {tuple(n.output): i for i, n in enumerate(exported.graph.node)}
    changed = []
    for j, node in enumerate(converted.graph.node):
        i = by_output.get(tuple(node.output))
        if i is not None and node == exported.graph.node[i]:
            same[j] = originals[i]
        else:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                return False
            changed.append(j)
    if not changed and len(same) == len(originals):
        _take_inferred_types(graph, converted)
        return True
    tensors = graph.tensors()
    added = [init for init in converted.graph.initializer if init.name not in tensors]  # an adapter's own
    sub = onnx.helper.make_graph([converted.graph.node[j] for j in changed], "changed", [], [], added)
    imported = gs.import_onnx(onnx.helper.make_model(sub, opset_imports=converted.opset_import))
    kept = {id(n) for n in same.values()}
    for node in originals:
        if id(node) not in kept:
            node.inputs.clear()
            node.outputs.clear()
    for node in imported.nodes:
        for k, t in enumerate(node.inputs):
            if t.name in tensors:
                node.inputs[k] = tensors[t.name]
        for k, t in enumerate(node.outputs):
            if t.name in tensors:
                node.outputs[k] = tensors[t.name]
    new_nodes = iter(imported.nodes)
    graph.nodes = [same[j] if j in same else next(new_nodes) for j in range(len(converted.graph.node))]
    _take_inferred_types(graph, converted)
    return True


def _take_inferred_types(graph: gs.Graph, converted: onnx.ModelProto) -> None:
    """Give tensors without a type or shape the ones the converter inferred (its value_info), as importing
    the whole converted graph would."""
    infos = {vi.name: vi.type.tensor_type for vi in converted.graph.value_info if vi.type.HasField("tensor_type")}
    for tensor in graph.tensors().values():
        ttype = infos.get(tensor.name)
        if ttype is None or not isinstance(tensor, gs.Variable):
            continue
        if tensor.dtype is None and ttype.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if tensor.shape is None and ttype.HasField("shape"):
            tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim]


class _Builder:
    """Creates Q/DQ nodes with unique, deterministic names in one graph."""

    def __init__(self, graph: gs.Graph, domain: str | None):
        self.graph = graph
        self.domain = domain
        self.taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def name(self, base: str) -> str:
        """``base``, or ``base_<i>`` with the smallest free ``i``; reserved from then on."""
        if base not in self.taken:
            self.taken.add(base)
            return base
        i = 1
        while f"{base}_{i}" in self.taken:
            i += 1
        self.taken.add(f"{base}_{i}")
        return f"{base}_{i}"

    def params(self, base: str, enc: Encoding, dtype: Any = np.float32) -> tuple[gs.Constant, gs.Constant]:
        """The scale (in the float type ``dtype`` of the quantized tensor) and zero point (the qtype's
        dtype) constants of ``enc``."""
        scale = gs.Constant(self.name(f"{base}_scale"), np.asarray(enc.scale, dtype=dtype))
        zero = gs.Constant(self.name(f"{base}_zero_point"), np.asarray(enc.zero_point, dtype=enc.qtype.np_dtype))
        return scale, zero

    def node(self, op: str, base: str, inputs: list[gs.Tensor], output: gs.Variable,
             axis: int | None) -> gs.Node:
        """Append ``op`` (QuantizeLinear/DequantizeLinear) named ``<base>_<op>``, in the chosen domain."""
        attrs = {"axis": int(axis)} if axis is not None else {}
        node = gs.Node(op=op, name=self.name(f"{base}_{op}"), attrs=attrs, inputs=inputs, outputs=[output])
        if self.domain:
            node.domain = self.domain
        self.graph.nodes.append(node)
        return node

    def dequantize(self, base: str, qtensor: gs.Tensor, scale: gs.Tensor, zero: gs.Tensor,
                   axis: int | None, shape: Any, dtype: Any = np.float32) -> gs.Variable:
        """Append ``DequantizeLinear(qtensor, scale, zero)``; returns its output ``<base>_DequantizeLinear_Output``."""
        out = gs.Variable(self.name(f"{base}_DequantizeLinear_Output"),
                          dtype=np.dtype(dtype) if dtype is not None else None, shape=shape)
        self.node("DequantizeLinear", base, [qtensor, scale, zero], out, axis)
        return out

    def qdq(self, base: str, tensor: gs.Tensor, enc: Encoding,
            dtype: Any = np.float32) -> tuple[gs.Node, gs.Variable]:
        """``DQ(Q(tensor))`` with ``enc`` (``dtype``: the tensor's float type); returns the Q node and the DQ
        output (consumers untouched)."""
        scale, zero = self.params(base, enc, dtype)
        # A tensor without a known shape gets untyped Q/DQ outputs (shape inference fills them), so the
        # graph never declares a wrong rank.
        known = tensor.shape is not None
        q_out = gs.Variable(self.name(f"{base}_QuantizeLinear_Output"),
                            dtype=enc.qtype.np_dtype if known else None, shape=tensor.shape)
        q_node = self.node("QuantizeLinear", base, [tensor, scale, zero], q_out, enc.axis)
        dq = self.dequantize(base, q_out, scale, zero, enc.axis, tensor.shape, dtype if known else None)
        return q_node, dq


def _unique_nodes(nodes: Iterable[gs.Node]) -> list[gs.Node]:
    """``nodes`` without repeats (gs nodes are unhashable), first occurrence first."""
    seen: set[int] = set()
    out = []
    for node in nodes:
        if id(node) not in seen:
            seen.add(id(node))
            out.append(node)
    return out


def _replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor, skip: gs.Node | None = None) -> None:
    """Make every consumer of ``old`` (except ``skip``) read ``new``."""
    for node in _unique_nodes(old.outputs):
        if node is skip:
            continue
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if isinstance(tensor, gs.Variable) and tensor.inputs else None


def _dtype_of(tensor: gs.Tensor) -> np.dtype | None:
    """numpy dtype of a gs tensor, None when unknown or a type numpy lacks (gs keeps bfloat16 as an enum)."""
    if tensor.dtype is None or isinstance(tensor.dtype, int):
        return None
    return np.dtype(tensor.dtype)


class _FloatTypes:
    """Float type of each tensor: its recorded dtype, else onnx shape inference's (run once, on a copy)."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self._inferred: dict[str, Any] | None = None

    def of(self, tensor: gs.Tensor) -> np.dtype | None:
        """The tensor's dtype; None for a type numpy lacks (bfloat16). Unknown types count as float32."""
        if tensor.dtype is not None:
            return _dtype_of(tensor)
        if self._inferred is None:
            from quadc.graph import infer_shapes
            from quadc.quant.calibrate import clone_graph

            typed = infer_shapes(clone_graph(self.graph))
            self._inferred = {n: t.dtype for n, t in typed.tensors().items() if t.dtype is not None}
        inferred = self._inferred.get(tensor.name)
        if inferred is None:
            return np.dtype(np.float32)
        return None if isinstance(inferred, int) else np.dtype(inferred)

    def quantizable(self, tensor: gs.Tensor) -> np.dtype | None:
        """The tensor's float type when qdq-insert quantizes it (float32 or float16), else None."""
        dtype = self.of(tensor)
        return dtype if dtype in _QUANT_FLOATS else None


def _already_quantized(tensor: gs.Tensor) -> bool:
    """True when ``tensor`` is a DQ output or already feeds a QuantizeLinear."""
    producer = _producer(tensor)
    if producer is not None and producer.op == "DequantizeLinear":
        return True
    return any(n.op == "QuantizeLinear" for n in tensor.outputs)


@register_pass
class QdqInsert(GraphPass):
    """Insert QuantizeLinear/DequantizeLinear from the plan: A16/A8 activations, W8 weights, uint8 LoRA inputs."""

    name = "qdq-insert"
    requires = ("lora-inputs", "quant-plan")
    preserves_numerics = False
    options = (
        PassOption("opset", str, "21", "16-bit Q/DQ as standard ops at opset 21 (upgrades the graph) or in the "
                   "com.microsoft domain at the model's opset", choices=QDQ_OPSETS),
        PassOption("bias", str, "int32", "Conv/Gemm/norm biases as int32 (as QNN expects) or float",
                   choices=BIAS_MODES),
        PassOption("act_matmul_8bit", bool, False, "make the second input of activation x activation "
                   "MatMuls 8-bit (what HTP does)"),
    )

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        plan = ctx.plan
        if not isinstance(plan, QuantPlan):
            raise QuadcError("qdq-insert needs a quantization plan (ctx.plan); run the quant-plan stage before it "
                             "(preset qdq = quant-plan,qdq-insert)")
        opset_mode = self.opts["opset"]
        bias_mode = self.opts["bias"]
        counts = {"opset_upgraded": 0, "activations": 0, "static": 0, "weights": 0, "biases": 0,
                  "lora_inputs": 0, "converts": 0, "already": 0, "missing": 0, "skipped": 0}
        encodings = _all_encodings(plan)
        needed = OPSET_16BIT if any(e.qtype.bits == 16 for e in encodings) else OPSET_PER_AXIS
        tensors = graph.tensors()
        types = _FloatTypes(graph)
        if any(n in tensors and types.of(tensors[n]) == np.float16 for n in (*plan.lora, *plan.weights,
                                                                                 *plan.activations)):
            needed = max(needed, OPSET_FLOAT16)
        a8_f16 = sorted(n for n, e in plan.activations.items() if e.qtype.bits == 8 and n not in plan.lora
                        and n not in plan.weights and n in tensors and types.of(tensors[n]) == np.float16)
        if a8_f16:
            raise QuadcError(f"{len(a8_f16)} float16 activation(s) have 8-bit encodings (e.g. '{a8_f16[0]}'), which "
                             "onnxruntime cannot load (its QLinearConcat fusion rejects float16 scales); quantize "
                             "float16 models with --precision w8a16 and --a8-fraction 0")
        domain = None
        if encodings and graph.opset < needed:
            if opset_mode == "21":
                upgrade_opset(graph, OPSET_16BIT)
                counts["opset_upgraded"] = 1
            else:
                domain = CONTRIB_DOMAIN
        elif opset_mode == "contrib" and graph.opset < OPSET_16BIT:
            domain = CONTRIB_DOMAIN
        build = _Builder(graph, domain)
        tensors = graph.tensors()  # again: an opset upgrade re-imports the nodes (types stay keyed by name)
        bias_jobs = self._bias_jobs(graph, plan)
        if bias_mode == "float":
            f16 = next((n for n, _, _ in bias_jobs if _dtype_of(n.inputs[2]) == np.float16), None)
            if f16 is not None:
                raise QuadcError(f"bias=float cannot keep the float16 bias of '{f16.name}': onnxruntime would make it "
                                 "int32 with a float16 scale that underflows; use bias=int32 for float16 models")
            bias_jobs = []

        for name in sorted(plan.lora):
            self._lora_input(graph, build, tensors, name, plan.lora, plan.lora_float_inputs, counts)
        for name in sorted(plan.weights):
            self._static_or_activation(graph, build, types, tensors, name, plan.weights, counts, "weights")
        for name in sorted(plan.activations):
            if name in plan.lora or name in plan.weights:
                continue
            self._static_or_activation(graph, build, types, tensors, name, plan.activations, counts, "activations")
        for node, x_name, w_name in bias_jobs:
            # The plan's entries now, after float16 tensors got their float16 scales.
            self._bias(build, node, plan.activations[x_name], plan.weights[w_name], counts)
        if self.opts["act_matmul_8bit"]:
            self._act_matmul_8bit(graph, build, plan, types, counts)

        changed = any(counts[k] for k in ("opset_upgraded", "activations", "static", "weights", "biases",
                                          "lora_inputs", "converts"))
        if changed:
            graph.toposort()
        return PassResult(changed=changed, counts=counts)

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        """Every LoRA slot input is read only through a DequantizeLinear with the plan's one shared
        encoding (integer inputs) or through Q -> DQ (float inputs)."""
        plan = ctx.plan
        if plan is None:
            return ["ctx.plan is set"]
        inputs = {t.name: t for t in graph.inputs}
        bad = []
        for name, enc in plan.lora.items():
            t = inputs.get(name)
            if t is None:
                continue
            readers = {n.op for n in t.outputs}
            want = "QuantizeLinear" if plan.lora_float_inputs else "DequantizeLinear"
            if readers != {want}:
                bad.append(name)
            elif not plan.lora_float_inputs and any(
                    float(np.asarray(n.inputs[1].values)) != float(np.asarray(enc.scale)) for n in t.outputs):
                bad.append(name)
        return [f"every LoRA input is read through its one shared encoding (not: {', '.join(bad[:3])})"] if bad else []

    # ----------------------------------------------------------------------------------------- pieces
    @staticmethod
    def _lora_input(graph: gs.Graph, build: _Builder, tensors: dict[str, gs.Tensor], name: str,
                    section: dict[str, Encoding], float_inputs: bool, counts: dict[str, int]) -> None:
        tensor = tensors.get(name)
        if tensor is None or not any(t is tensor for t in graph.inputs):
            counts["missing"] += 1
            return
        dtype = _dtype_of(tensor)
        if dtype is not None and dtype.kind in "iu":
            counts["already"] += 1
            return
        dtype = dtype if dtype in _QUANT_FLOATS else np.dtype(np.float32)
        enc = section[name] = in_float_type(section[name], dtype)
        if float_inputs:
            if _already_quantized(tensor):
                counts["already"] += 1
                return
            q_node, dq = build.qdq(name, tensor, enc, dtype)
            _replace_uses(graph, tensor, dq, skip=q_node)
            counts["lora_inputs"] += 1
            return
        consumers = _unique_nodes(tensor.outputs)
        tensor.dtype = enc.qtype.np_dtype
        scale, zero = build.params(name, enc, dtype)
        dq = build.dequantize(name, tensor, scale, zero, enc.axis, tensor.shape, dtype)
        for node in consumers:
            for i, t in enumerate(node.inputs):
                if t is tensor:
                    node.inputs[i] = dq
        counts["lora_inputs"] += 1

    @staticmethod
    def _static_or_activation(graph: gs.Graph, build: _Builder, types: _FloatTypes, tensors: dict[str, gs.Tensor],
                              name: str, section: dict[str, Encoding], counts: dict[str, int], kind: str) -> None:
        tensor = tensors.get(name)
        if tensor is None:
            counts["missing"] += 1
            return
        dtype = types.quantizable(tensor)
        if dtype is None:
            counts["skipped"] += 1
            return
        if isinstance(tensor, gs.Constant) or not _already_quantized(tensor):
            section[name] = in_float_type(section[name], dtype)
        enc = section[name]
        if isinstance(tensor, gs.Constant):
            values = np.asarray(constant_values(tensor), dtype=np.float32)  # .values would keep it mapped
            qvalues = quantize(values, enc)
            qconst = gs.Constant(build.name(f"{name}_quantized"), qvalues)
            scale, zero = build.params(name, enc, dtype)
            dq = build.dequantize(name, qconst, scale, zero, enc.axis, list(values.shape), dtype)
            _replace_uses(graph, tensor, dq)
            if any(t is tensor for t in graph.outputs):
                graph.outputs = [dq if t is tensor else t for t in graph.outputs]
                dq.name = name  # the float constant is no longer referenced
            counts["weights" if kind == "weights" else "static"] += 1
            return
        if _already_quantized(tensor):
            counts["already"] += 1
            return
        is_output = any(t is tensor for t in graph.outputs)
        q_node, dq = build.qdq(name, tensor, enc, dtype)
        _replace_uses(graph, tensor, dq, skip=q_node)
        if is_output:
            graph.outputs = [dq if t is tensor else t for t in graph.outputs]
            float_name = build.name(f"{name}_QuantizeLinear_Input")
            tensor.name, dq.name = float_name, name
        counts[kind if kind == "activations" else "static"] += 1

    @staticmethod
    def _bias_jobs(graph: gs.Graph, plan: QuantPlan) -> list[tuple[gs.Node, str, str]]:
        """(node, input name, weight name) for every Conv/Gemm/Instance-/LayerNormalization whose float 1-D
        bias can become int32 (its input and weight/scale have plan encodings)."""
        jobs = []
        for node in graph.nodes:
            if node.op not in _BIAS_OPS or len(node.inputs) < 3:
                continue
            x, w, b = node.inputs[:3]
            if not (isinstance(w, gs.Constant) and isinstance(b, gs.Constant)):
                continue
            if b.name in plan.weights or b.name in plan.activations or len(b.shape) != 1:
                continue
            if _dtype_of(b) not in _QUANT_FLOATS:
                continue
            x_enc, w_enc = plan.activations.get(x.name), plan.weights.get(w.name)
            if x_enc is None or w_enc is None or x_enc.per_channel:
                continue
            if w_enc.per_channel:
                transb = int(node.attrs.get("transB", 0)) if node.op == "Gemm" else 1
                out_axis = 0 if transb or len(w.shape) == 1 else 1
                if (w_enc.axis % len(w.shape)) != out_axis or w_enc.num_channels != b.shape[0]:
                    continue
            jobs.append((node, x.name, w.name))
        return jobs

    @staticmethod
    def _bias(build: _Builder, node: gs.Node, x_enc: Encoding, w_enc: Encoding, counts: dict[str, int]) -> None:
        bias = node.inputs[2]
        if not isinstance(bias, gs.Constant):
            counts["already"] += 1
            return
        dtype = _dtype_of(bias)
        values = np.asarray(bias.values, dtype=np.float32)
        scale = (x_enc.scale.astype(np.float32) * w_enc.scale.astype(np.float32)).astype(np.float32)
        # Like onnxruntime's quantizer: widen a scale too small for the bias to fit int32.
        need = np.abs(values.astype(np.float64)) / _INT32.max * 1.0001
        need = need if scale.ndim else np.asarray(need.max() if need.size else 0.0)
        scale = np.maximum(scale, need.astype(np.float32)).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        if dtype == np.float16:
            scale = _f16_at_or_above(scale)
        with np.errstate(over="ignore", invalid="ignore"):
            q = np.clip(np.rint(np.divide(values, scale, dtype=np.float32)), _INT32.min, _INT32.max)
        qconst = gs.Constant(build.name(f"{bias.name}_quantized"), q.astype(np.int32))
        scale_c = gs.Constant(build.name(f"{bias.name}_scale"), np.asarray(scale, dtype=dtype))
        zero_c = gs.Constant(build.name(f"{bias.name}_zero_point"), np.zeros(scale.shape, np.int32))
        axis = 0 if scale.ndim else None
        node.inputs[2] = build.dequantize(bias.name, qconst, scale_c, zero_c, axis, list(values.shape), dtype)
        counts["biases"] += 1

    @staticmethod
    def _act_matmul_8bit(graph: gs.Graph, build: _Builder, plan: QuantPlan, types: _FloatTypes,
                         counts: dict[str, int]) -> None:
        """Re-quantize the second input of u16 x u16 activation MatMuls to uint8 (QNN HTP pairs)."""

        def dynamic_dq(t: gs.Tensor) -> gs.Node | None:
            dq = _producer(t)
            if dq is None or dq.op != "DequantizeLinear":
                return None
            q = _producer(dq.inputs[0])
            return dq if q is not None and q.op == "QuantizeLinear" else None

        def bits(dq: gs.Node) -> int:
            return np.dtype(dq.inputs[2].dtype).itemsize * 8

        chains: dict[str, gs.Variable] = {}
        for node in list(graph.nodes):
            if node.op != "MatMul" or len(node.inputs) != 2:
                continue
            a_dq, b_dq = dynamic_dq(node.inputs[0]), dynamic_dq(node.inputs[1])
            if a_dq is None or b_dq is None or bits(a_dq) != 16 or bits(b_dq) != 16:
                continue
            b = node.inputs[1]
            if b.name not in chains:
                q = _producer(b_dq.inputs[0])
                source = q.inputs[0].name.removesuffix("_QuantizeLinear_Input")
                enc16 = plan.activations.get(source)
                if enc16 is None or enc16.per_channel:
                    scale = float(np.asarray(b_dq.inputs[1].values))
                    zp = int(np.asarray(b_dq.inputs[2].values))
                    qt = QType.from_onnx(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(b_dq.inputs[2].dtype)))
                    lo, hi = (qt.qmin - zp) * scale, (qt.qmax - zp) * scale
                else:
                    lo, hi = float(enc16.tmin), float(enc16.tmax)
                dtype = _dtype_of(b_dq.inputs[1]) or np.dtype(np.float32)  # the float type the DQ outputs
                enc8 = in_float_type(compute_encoding(lo, hi, QType.UINT8), dtype)
                chains[b.name] = build.qdq(f"{source}_u8", b, enc8, dtype)[1]
            node.inputs[1] = chains[b.name]
            counts["converts"] += 1
