"""Pass ``qnn::requantize``: every HTP op of a mixed uint8/uint16 QDQ graph gets activations of one type.

onnxruntime-qnn hands HTP one quantized op per QDQ node unit (``DQ -> op -> Q``), and a unit is formed
only when the op's activation inputs and outputs share one integer type (a Conv reading uint8 and writing
uint16, an Add of uint8 and uint16, a LayerNormalization uint8 -> uint16 are left as loose Q/DQ and float
ops). With ``a8_fraction`` the plan mixes uint8 and uint16 tensors freely, and such a graph failed to
finalize on the HTP backend (``QNN_COMMON_ERROR_MEM_ALLOC`` on the tiny U-Net at ``a8_fraction=0.3``: 22
units left loose, among them 6 Conv, 4 normalizations and 2 attention MatMuls).

The legalization (run after ``qdq-insert``) gives each op one **unit type**: uint8 when every activation
it reads and writes is uint8, uint16 otherwise (the op runs its 16-bit kernel unless all its I/O are
8-bit). Then:

- an activation input of the other type is re-quantized to the unit type by a ``DQ -> Q -> DQ`` chain,
  which onnxruntime-qnn turns into a QNN ``Convert``. uint8 -> uint16 is lossless: the uint16 encoding is
  ``scale / 257``, ``zero_point * 257``, whose grid holds every uint8 value (``q -> 257 q``);
- an output planned uint8 under a uint16 unit is written as uint16 under that same lossless encoding and
  then converted to its planned uint8 encoding (rounding to the finer grid first changes no uint8 value),
  so consumers see exactly the planned uint8 tensor;
- a MatMul of two activations reads its second input as uint8 (HTP's MatMul pairs are (u8, u8),
  (u16, u8), and a (u8, u16) -> u8 unit failed validation): a uint16 second input is converted to uint8
  over its uint16 range, as ``qdq-insert``'s ``act_matmul_8bit`` does for u16 x u16.

A data-movement op (Reshape, Transpose, Resize, Slice, Split, ...) computes nothing: it runs at its input's
type and writes its input's encoding, and where its planned output has another encoding and either side
is 8-bit, a convert follows (the tiny U-Net at ``a8_fraction=0.6`` failed to finalize on one Resize whose
uint16 output encoding differed from its input's, converted from uint8; with the same encoding on both
sides it finalizes). Purely 16-bit movement ops keep their calibrated encodings, as in w8a16 graphs.

Constant weights, biases and LoRA slot inputs (DequantizeLinear of an initializer or of a graph input) are
not activations here and keep their types. A graph without uint8 activations is left unchanged. Each
tensor is converted once per type, however many ops read it. Idempotent.

Given (``a`` uint8, ``b`` uint16, ``y`` planned uint8)::

    a8 = DQ(Q8(a));  b16 = DQ(Q16(b))
    s = Add(a8, b16);  y8 = DQ(Q8(s))

Result::

    a16 = DQ(Q16'(a8))                    # lossless: scale_a / 257, zp_a * 257
    s = Add(a16, b16);  y8 = DQ(Q8(DQ(Q16'(s))))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.passes.base import GraphPass, PassResult
from quadc.quant.affine import QType, compute_encoding

__all__ = ["QnnRequantize", "UPCAST", "mixed_units"]

#: uint8 -> uint16 without loss: 65535 = 255 * 257, so ``(q - zp) * s == (257 q - 257 zp) * (s / 257)``.
UPCAST = 257
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
#: Ops that move data without computing: on HTP their output must keep their input's encoding.
MOVEMENT_OPS = ("Reshape", "Transpose", "Resize", "Slice", "Split", "Squeeze", "Unsqueeze", "Flatten", "Identity",
                "Expand", "Cast", "DepthToSpace", "SpaceToDepth", "Tile")


@dataclass(frozen=True)
class _Act:
    """An activation read through ``DQ(Q(x))``: the DQ node and its per-tensor encoding."""

    dq: gs.Node
    scale: float
    zero_point: int
    qtype: QType

    @property
    def float_dtype(self) -> np.dtype:
        return np.dtype(self.dq.inputs[1].dtype)


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None


def _per_tensor(node: gs.Node) -> tuple[float, int, QType] | None:
    scale, zero = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    if not isinstance(scale, gs.Constant) or not isinstance(zero, gs.Constant) or np.size(scale.values) != 1:
        return None
    try:
        qtype = QType.parse(np.dtype(zero.values.dtype).name)
    except Exception:  # not one of quadc's integer types
        return None
    return float(np.asarray(scale.values).reshape(-1)[0]), int(np.asarray(zero.values).reshape(-1)[0]), qtype


def _activation_in(t: gs.Tensor) -> _Act | None:
    """The activation encoding ``t`` is read with: ``t = DQ(Q(x))`` with per-tensor encodings."""
    dq = _producer(t)
    if dq is None or dq.op != "DequantizeLinear":
        return None
    q = _producer(dq.inputs[0])
    if q is None or q.op != "QuantizeLinear":  # a constant, or an integer graph input (LoRA slot)
        return None
    enc = _per_tensor(dq)
    return _Act(dq, *enc) if enc else None


def _activation_out(t: gs.Tensor) -> list[gs.Node]:
    """The QuantizeLinear nodes that quantize ``t`` with a per-tensor encoding."""
    return [c for c in t.outputs if c.op == "QuantizeLinear" and _per_tensor(c) is not None]


def _matmul_rhs(node: gs.Node) -> int | None:
    """1 when ``node`` is a MatMul of two activations (its second input then must be uint8), else None."""
    if node.op == "MatMul" and len(node.inputs) == 2 and all(_activation_in(t) for t in node.inputs):
        return 1
    return None


class _Chains:
    """Builds ``Q -> DQ`` chains with unique names, one per (tensor, encoding)."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes}
        self.cache: dict[tuple[str, str, float, int], gs.Variable] = {}
        self.count = 0

    def _name(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def qdq(self, x: gs.Tensor, qtype: QType, scale: float, zero_point: int, dtype: np.dtype,
            tag: str) -> gs.Variable:
        """``DQ(Q(x))`` under the given encoding (reused for the same tensor and encoding)."""
        key = (x.name, qtype.value, scale, zero_point)
        if key in self.cache:
            return self.cache[key]
        base = f"{x.name.removesuffix('_DequantizeLinear_Output')}_{tag}"
        s = gs.Constant(self._name(f"{base}_scale"), np.asarray(scale, dtype))
        z = gs.Constant(self._name(f"{base}_zero_point"), np.asarray(zero_point, qtype.np_dtype))
        q_out = gs.Variable(self._name(f"{base}_QuantizeLinear_Output"), dtype=qtype.np_dtype, shape=x.shape)
        dq_out = gs.Variable(self._name(f"{base}_DequantizeLinear_Output"), dtype=dtype, shape=x.shape)
        self.graph.nodes.append(gs.Node("QuantizeLinear", self._name(f"{base}_QuantizeLinear"),
                                        inputs=[x, s, z], outputs=[q_out]))
        self.graph.nodes.append(gs.Node("DequantizeLinear", self._name(f"{base}_DequantizeLinear"),
                                        inputs=[q_out, s, z], outputs=[dq_out]))
        self.cache[key] = dq_out
        self.count += 1
        return dq_out

    def upcast(self, x: gs.Tensor, scale: float, zero_point: int, dtype: np.dtype) -> gs.Variable:
        """``x`` (on a uint8 grid ``scale``/``zero_point``) on the lossless uint16 grid."""
        return self.qdq(x, QType.UINT16, float(np.float32(scale / UPCAST)) if dtype == np.float32 else scale / UPCAST,
                        zero_point * UPCAST, dtype, "u16")

    def downcast(self, x: gs.Tensor, act: _Act) -> gs.Variable:
        """``x`` (a uint16 activation) re-quantized to uint8 over the same range."""
        lo = (act.qtype.qmin - act.zero_point) * act.scale
        hi = (act.qtype.qmax - act.zero_point) * act.scale
        enc = compute_encoding(lo, hi, QType.UINT8)
        return self.qdq(x, QType.UINT8, float(enc.scale), int(enc.zero_point), act.float_dtype, "u8")


class QnnRequantize(GraphPass):
    """Give every op of a mixed uint8/uint16 QDQ graph one activation type (HTP node units)."""

    name = "qnn::requantize"
    preserves_numerics = False  # a uint16 second MatMul input becomes uint8

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        chains = _Chains(graph)
        counts = {"units_u8": 0, "units_u16": 0, "inputs_up": 0, "inputs_down": 0, "outputs_up": 0,
                  "movement_converts": 0}
        if not any(a.qtype is QType.UINT8 for n in graph.nodes if n.op not in QDQ_OPS
                   for t in n.inputs if (a := _activation_in(t)) is not None):
            return PassResult(False, counts)
        for node in [n for n in graph.nodes if n.op not in QDQ_OPS]:
            self._legalize(node, chains, counts)
        if chains.count:
            graph.toposort()
        return PassResult(bool(chains.count), {**counts, "chains": chains.count})

    @staticmethod
    def _legalize(node: gs.Node, chains: _Chains, counts: dict[str, int]) -> None:
        rhs = _matmul_rhs(node)
        ins = {i: a for i, t in enumerate(node.inputs) if (a := _activation_in(t)) is not None}
        outs = [(t, q) for t in node.outputs for q in _activation_out(t)]
        if not outs:
            return
        if node.op in MOVEMENT_OPS and 0 in ins:
            QnnRequantize._movement(node, ins[0], outs, chains, counts)
            return
        widths = {a.qtype.bits for i, a in ins.items() if i != rhs} | {_per_tensor(q)[2].bits for _, q in outs}  # type: ignore[index]
        unit = 16 if 16 in widths else 8
        counts[f"units_u{unit}"] += 1
        for i, act in ins.items():
            if i == rhs:
                if act.qtype.bits == 16:
                    node.inputs[i] = chains.downcast(node.inputs[i], act)
                    counts["inputs_down"] += 1
            elif act.qtype.bits != unit:
                node.inputs[i] = chains.upcast(node.inputs[i], act.scale, act.zero_point, act.float_dtype)
                counts["inputs_up"] += 1
        if unit == 16:
            for t, q in outs:
                scale, zero, qtype = _per_tensor(q)  # type: ignore[misc]
                if qtype.bits == 8:
                    q.inputs[0] = chains.upcast(t, scale, zero, np.dtype(q.inputs[1].dtype))
                    counts["outputs_up"] += 1

    @staticmethod
    def _movement(node: gs.Node, src: _Act, outs: list[tuple[gs.Tensor, gs.Node]], chains: _Chains,
                  counts: dict[str, int]) -> None:
        """A data-movement op runs at its input's type and writes its input's encoding; where a planned
        output differs and either side is 8-bit, a convert follows (HTP failed to finalize a Resize whose
        uint16 output encoding differed from its input's, when that input came from a uint8 tensor)."""
        counts[f"units_u{src.qtype.bits}"] += 1
        for t, q in outs:
            scale, zero, qtype = _per_tensor(q)  # type: ignore[misc]
            same = (qtype, zero) == (src.qtype, src.zero_point) and np.isclose(scale, src.scale, rtol=1e-6)
            if not same and 8 in (qtype.bits, src.qtype.bits):
                q.inputs[0] = chains.qdq(t, src.qtype, src.scale, src.zero_point, src.float_dtype, "moved")
                counts["movement_converts"] += 1

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        """Every op's activation inputs (but a MatMul's uint8 second input) and outputs share one type."""
        return mixed_units(graph)[:5]


def mixed_units(graph: gs.Graph) -> list[str]:
    """Ops whose activation inputs (a MatMul's second one aside) and outputs are not all one type, and
    MatMuls of two activations whose second input is not uint8 (empty: HTP forms every node unit)."""
    bad = []
    for node in graph.nodes:
        if node.op in QDQ_OPS:
            continue
        rhs = _matmul_rhs(node)
        ins = {a.qtype for i, t in enumerate(node.inputs) if i != rhs and (a := _activation_in(t)) is not None}
        outs = {_per_tensor(q)[2] for t in node.outputs for q in _activation_out(t)}  # type: ignore[index]
        if len(ins | outs) > 1:
            bad.append(f"{node.op} '{node.name}' mixes {', '.join(sorted(str(x) for x in ins | outs))} activations")
        if rhs is not None and _activation_in(node.inputs[rhs]).qtype is not QType.UINT8:  # type: ignore[union-attr]
            bad.append(f"MatMul '{node.name}' reads a second activation that is not uint8")
    return bad
