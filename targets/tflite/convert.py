"""Translate the legalized float ONNX graph into a TFLite model, float32 or fully integer 16x8.

Input: the graph after ``float`` and ``tflite::legalize`` (static shapes, normalizations lowered). Each
ONNX op becomes the TFLite op below; 4-D activations are NHWC (:mod:`.layout` tracks where every
tensor's dims lie, so ONNX Transposes cost nothing and a TRANSPOSE is written only where an op needs
another layout). A :class:`Policy` decides the tensor types: :class:`FloatPolicy` (float32, to check the
translation) or :class:`IntPolicy` (a :class:`~.scheme.TfliteScheme`: int16 activations with zero point 0,
int8 per-channel weights, int32 biases, int8 LoRA inputs).

**Mixed widths.** Each op gets a type before it is translated: int8 when every activation it reads and
writes is int8 (the plan's 8-bit tensors), else int16. An input stored at the other width is read through a
QUANTIZE (int16 <-> int8, over the stored tensor's range; once per tensor and width); an output planned at
the other width is written at the op's width (:meth:`~.scheme.TfliteScheme.as_type`: the same range, or
the fixed LOGISTIC/SOFTMAX/TANH encoding that width requires) and a QUANTIZE after the op gives the planned
tensor. Constant operands of elementwise ops take the op's width; LoRA factors stay int8 weights.

=====================================  ==================================================================
ONNX                                   TFLite
=====================================  ==================================================================
Conv (weights constant or LoRA input)  CONV_2D (OHWI filter; SAME/VALID, else PAD + VALID; fused RELU)
MatMul x @ W, W constant (+ bias Add)  FULLY_CONNECTED (2-D weights [out, in], keep_num_dims, bias fused)
MatMul of two activations / LoRA       BATCH_MATMUL (int16 x int16, or int16 x int8 LoRA factor)
Gemm (constant B)                      FULLY_CONNECTED
Add / Sub / Mul / Div                  ADD / SUB / MUL / DIV (division by a constant becomes MUL)
ReduceMean                             MEAN
Reciprocal(Sqrt(x))                    RSQRT
Sigmoid / Tanh / Relu                  LOGISTIC / TANH / RELU (or fused into the producer)
Erf-form GELU (x*0.5*(1+erf(x/√2)))    GELU
Softmax (last axis)                    SOFTMAX
Concat / Split (equal) / Slice         CONCATENATION / SPLIT / STRIDED_SLICE
Reshape / Unsqueeze / Squeeze / Flatten RESHAPE (or nothing when the buffer is already right)
Transpose                              nothing (layout bookkeeping) or TRANSPOSE where needed
Pad (constant 0)                       PAD
Resize (nearest, asymmetric, floor)    RESIZE_NEAREST_NEIGHBOR
Identity / Cast to float               nothing
=====================================  ==================================================================

Anything else is refused in one line naming the op: never a silently different graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from ai_edge_litert import schema_py_generated as schema

from quadc.errors import QuadcError
from quadc.quant.affine import quantize
from quadc.targets.tflite import layout as L
from quadc.targets.tflite.scheme import (
    TfliteScheme,
    int8_asymmetric_encoding,
    int16_encoding,
    quantize_symmetric,
    weight_encoding,
)
from quadc.targets.tflite.writer import Quant, TfliteWriter

Perm = L.Perm
INT16 = "INT16"


# ------------------------------------------------------------------------------------------------ policies
class Policy:
    """How tensors are typed: the activation dtype and how constants and LoRA inputs are stored."""

    act_dtype = "float32"

    def act(self, name: str) -> Quant | None:
        return None

    def dtype_of(self, name: str) -> str:
        """The stored type of activation ``name`` (``act_dtype`` unless the scheme makes it 8-bit)."""
        return self.act_dtype

    def has(self, name: str) -> bool:
        """Whether ``name`` is an activation with an encoding of its own."""
        return False

    def act_as(self, name: str, dtype: str) -> Quant | None:
        """The quantization of activation ``name`` when an op of type ``dtype`` writes it."""
        return self.act(name)

    def weight(self, values: np.ndarray, axis: int) -> tuple[np.ndarray, Quant | None]:
        return np.asarray(values, np.float32), None

    def bias(self, values: np.ndarray, x: Quant | None, w: Quant | None) -> tuple[np.ndarray, Quant | None]:
        return np.asarray(values, np.float32), None

    def const_act(self, values: np.ndarray, dtype: str | None = None) -> tuple[np.ndarray, Quant | None]:
        return np.asarray(values, np.float32), None

    def lora(self, name: str) -> tuple[str, Quant | None]:
        return "float32", None


class FloatPolicy(Policy):
    """Everything float32: the translation alone, to compare with the ONNX graph."""


def _quant(enc: Any) -> Quant:
    if enc.axis is None:
        return Quant.per_tensor(float(enc.scale), int(enc.zero_point))
    return Quant.per_channel([float(s) for s in enc.scale], enc.axis)


class IntPolicy(Policy):
    """Fully integer 16x8 from a :class:`TfliteScheme`; counts int32 bias values that saturate."""

    act_dtype = "int16"

    def __init__(self, scheme: TfliteScheme):
        self.scheme = scheme
        self.bias_saturated = 0

    def act(self, name: str) -> Quant:
        return _quant(self._enc(name))

    def _enc(self, name: str) -> Any:
        enc = self.scheme.activations.get(name)
        if enc is None:
            raise QuadcError(f"no calibrated range for tensor '{name}'; the scheme must come from calibrating this "
                             "graph (after tflite::legalize)")
        return enc

    def dtype_of(self, name: str) -> str:
        return self._enc(name).qtype.value

    def has(self, name: str) -> bool:
        return name in self.scheme.activations

    def act_as(self, name: str, dtype: str) -> Quant:
        self._enc(name)
        return _quant(self.scheme.as_type(name, dtype))

    def weight(self, values: np.ndarray, axis: int) -> tuple[np.ndarray, Quant]:
        enc = weight_encoding(values, axis)
        return quantize_symmetric(values, enc, narrow=True), _quant(enc)

    def bias(self, values: np.ndarray, x: Quant | None, w: Quant | None) -> tuple[np.ndarray, Quant]:
        assert x is not None and w is not None
        scales = np.float64(x.scale[0]) * np.asarray(w.scale, np.float64)
        if scales.size == 1:
            scales = np.full(np.asarray(values).size, scales[0])
        q = np.rint(np.asarray(values, np.float64) / scales)
        info = np.iinfo(np.int32)
        self.bias_saturated += int(np.count_nonzero((q < info.min) | (q > info.max)))
        quant = Quant.per_channel(scales, 0) if len(w.scale) > 1 else Quant.per_tensor(scales[0])
        return np.clip(q, info.min, info.max).astype(np.int32), quant

    def const_act(self, values: np.ndarray, dtype: str | None = None) -> tuple[np.ndarray, Quant]:
        arr = np.asarray(values, np.float32)
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if dtype == "int8":
            enc = int8_asymmetric_encoding(lo, hi)
            return quantize(arr, enc), _quant(enc)
        enc = int16_encoding(lo, hi)
        return quantize_symmetric(arr, enc), _quant(enc)

    def lora(self, name: str) -> tuple[str, Quant]:
        enc = self.scheme.lora.get(name)
        if enc is None:
            raise QuadcError(f"no shared encoding for LoRA input '{name}'; plan the LoRA encodings first")
        return "int8", _quant(enc)


# ------------------------------------------------------------------------------------------------- result
@dataclass
class IOSpec:
    """One model input or output: ONNX name and shape, its TFLite layout (perm), dtype and quantization."""

    name: str
    shape: list[int]
    perm: list[int]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None
    kind: str = "model"  # model | lora | host

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "shape": self.shape, "perm": self.perm, "dtype": self.dtype, "kind": self.kind}
        if self.scale is not None:
            d.update({"scale": self.scale, "zero_point": self.zero_point})
        return d


@dataclass
class Translation:
    """The written model and its interface."""

    data: bytes
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    ops: dict[str, int] = field(default_factory=dict)


@dataclass
class _T:
    """A translated tensor: TFLite index, its ONNX shape and the perm it is stored under."""

    index: int
    shape: list[int]
    perm: Perm


def _grid_range(dtype: str, q: Quant) -> tuple[float, float]:
    """The real range an integer tensor of ``dtype`` covers under per-tensor ``q``."""
    info = np.iinfo(np.dtype(dtype))
    scale, zp = float(q.scale[0]), int(q.zero_point[0])
    return (info.min - zp) * scale, (info.max - zp) * scale


def _const(t: gs.Tensor) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def _scalar(t: gs.Tensor) -> float | None:
    v = _const(t)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def _only_consumer(t: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    return t.outputs[0] if len(t.outputs) == 1 and t.name not in graph_outputs else None


_ACT = {"Relu": schema.ActivationFunctionType.RELU}


class Converter:
    """One translation run (see the module docstring)."""

    def __init__(self, graph: gs.Graph, policy: Policy, *, host_outputs: Sequence[gs.Tensor] = (),
                 host_nodes: Sequence[gs.Node] = (), lora_inputs: Sequence[str] = ()):
        self.g = graph
        self.p = policy
        self.w = TfliteWriter(description="quadc 16x8" if policy.act_dtype == "int16" else "quadc float")
        self.t: dict[str, _T] = {}
        self._converted: dict[tuple[str, Perm, str], _T] = {}
        self.skip: set[int] = {id(n) for n in host_nodes}
        self.host_outputs = list(host_outputs)
        self.lora = set(lora_inputs)
        self.outputs = {t.name for t in graph.outputs}
        self.io_in: list[IOSpec] = []
        self.ops: dict[str, int] = {}
        self.gelu: dict[int, tuple[gs.Tensor, gs.Tensor]] = {}
        #: The integer type of the op being translated (None: no conversions, as for graph I/O).
        self.unit: str | None = None
        self._pending: list[tuple[str, int, _T]] = []
        self._retyped: dict[tuple[str, str], _T] = {}

    # ------------------------------------------------------------------------------------------ helpers
    def _op(self, op: str, inputs: Sequence[int], outputs: Sequence[int], options: Any = None) -> None:
        self.ops[op] = self.ops.get(op, 0) + 1
        self.w.op(op, inputs, outputs, options, version=self._version(op))

    def _version(self, op: str) -> int:
        """Operator versions as TFLite's op_version rules give them for int16 activations (1 for float)."""
        if self.p.act_dtype != "int16":
            return 1
        return {"CONV_2D": 4, "FULLY_CONNECTED": 5, "BATCH_MATMUL": 3, "ADD": 3, "SUB": 5, "MUL": 4,
                "MEAN": 3, "SOFTMAX": 3, "CONCATENATION": 3, "LOGISTIC": 3, "TANH": 3, "RELU": 3, "PAD": 3,
                "TRANSPOSE": 5, "SPLIT": 4, "RESIZE_NEAREST_NEIGHBOR": 4, "RSQRT": 2, "STRIDED_SLICE": 1,
                "RESHAPE": 1, "GELU": 1, "DIV": 1}.get(op, 1)

    def _new(self, name: str, shape: Sequence[int], perm: Perm, quant_from: str | None = None) -> _T:
        key = quant_from or name
        planned = self.p.dtype_of(key)
        idx = self.w.tensor(name, L.physical_shape(shape, perm), planned, quant=self.p.act(key))
        if self.unit is None or planned == self.unit:
            return _T(idx, list(shape), perm)
        # The op runs at the other width: it writes a tensor of its own type, converted after it.
        unit_idx = self.w.tensor(f"{name}/{self.unit}", L.physical_shape(shape, perm), self.unit,
                                 quant=self.p.act_as(key, self.unit))
        self._pending.append((name, unit_idx, _T(idx, list(shape), perm)))
        return _T(unit_idx, list(shape), perm)

    def _flush_pending(self) -> None:
        """QUANTIZE each output an op wrote at its own width into the tensor's planned type."""
        for name, unit_idx, planned in self._pending:
            self._op("QUANTIZE", [unit_idx], [planned.index])
            self.t[name] = planned
        self._pending.clear()

    def _retype(self, name: str) -> _T:
        """Activation ``name`` in the current op's integer type (a QUANTIZE where it is stored otherwise;
        LoRA factors keep their int8 weight type)."""
        src = self.t[name]
        have = self.w.dtype_of(src.index)
        if self.unit is None or have == self.unit or have not in ("int8", "int16") or name in self.lora:
            return src
        key = (name, self.unit)
        if key not in self._retyped:
            q = self.w.quant_of(src.index)
            assert q is not None
            lo, hi = _grid_range(have, q)
            enc = int8_asymmetric_encoding(lo, hi) if self.unit == "int8" else int16_encoding(lo, hi)
            idx = self.w.tensor(f"{name}/{self.unit}", self.w.shape_of(src.index), self.unit, quant=_quant(enc))
            self._op("QUANTIZE", [src.index], [idx])
            self._retyped[key] = _T(idx, src.shape, src.perm)
        return self._retyped[key]

    def _unit_of(self, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor]) -> str | None:
        """int8 when every activation an op reads and writes is int8, else int16 (float: None)."""
        if self.p.act_dtype != "int16":
            return None
        types = [self.w.dtype_of(self.t[t.name].index) for t in inputs
                 if t.name in self.t and t.name not in self.lora and _const(t) is None]
        types += [self.p.dtype_of(t.name) for t in outputs if self.p.has(t.name)]
        return "int8" if types and all(x == "int8" for x in types) else "int16"

    def _like(self, name: str, src: _T, shape: Sequence[int], perm: Perm) -> _T:
        """A new tensor with the same type and quantization as ``src`` (data movement)."""
        idx = self.w.tensor(name, L.physical_shape(shape, perm), self.w.dtype_of(src.index), quant=self.w.quant_of(src.index))
        return _T(idx, list(shape), perm)

    def _int32(self, name: str, values: Sequence[int] | np.ndarray) -> int:
        return self.w.constant(name, np.asarray(values, np.int32))

    def get(self, t: gs.Tensor | str, perm: Perm | None = None) -> _T:
        """The translated tensor ``t`` (or its name), converted to ``perm`` if given."""
        name = t if isinstance(t, str) else t.name
        if name not in self.t:
            raise QuadcError(f"tensor '{name}' is used before it is computed (or is a constant where TFLite needs "
                             "an activation)")
        src = self._retype(name)
        if perm is None or tuple(perm) == src.perm:
            return src
        key = (name, tuple(perm), self.w.dtype_of(src.index))
        if key in self._converted:
            return self._converted[key]
        out = self._like(f"{name}/perm{''.join(map(str, perm))}", src, src.shape, tuple(perm))
        if L.moves_only_unit_dims(src.shape, src.perm, perm):
            shape = self._int32(f"{name}/perm_shape", self.w.shape_of(out.index))
            opts = schema.ReshapeOptionsT()
            opts.newShape = self.w.shape_of(out.index)
            self._op("RESHAPE", [src.index, shape], [out.index], opts)
        else:
            tp = L.transpose_between(src.shape, src.perm, perm)
            self._op("TRANSPOSE", [src.index, self._int32(f"{name}/perm_axes", tp)], [out.index],
                     schema.TransposeOptionsT())
        self._converted[key] = out
        return out

    def _expand(self, t: gs.Tensor, rank: int, perm: Perm) -> _T:
        """Activation ``t`` broadcast-expanded (unit dims prepended) to ``rank`` and stored under ``perm``."""
        src = self.t[t.name]
        if len(src.shape) == rank:
            return self.get(t, perm)
        shape = [1] * (rank - len(src.shape)) + src.shape
        base = self.get(t, L.identity(len(src.shape)))
        ident = L.identity(rank)
        name = f"{t.name}/rank{rank}/{self.w.dtype_of(base.index)}"
        if name not in self.t:
            out = self._like(f"{t.name}/rank{rank}", base, shape, ident)
            opts = schema.ReshapeOptionsT()
            opts.newShape = shape
            self._op("RESHAPE", [base.index, self._int32(f"{t.name}/rank{rank}_shape", shape)], [out.index], opts)
            self.t[name] = out
        return self.get(name, perm)

    def _fuse_act(self, out: gs.Tensor) -> tuple[int, gs.Tensor]:
        """(fused activation code, the tensor that is the op's real output) when ``out``'s only reader is
        an activation TFLite fuses."""
        nxt = _only_consumer(out, self.outputs)
        if nxt is not None and nxt.op in _ACT:
            self.skip.add(id(nxt))
            return _ACT[nxt.op], nxt.outputs[0]
        return schema.ActivationFunctionType.NONE, out

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> Translation:
        consumers_conv_w = {n.inputs[1].name for n in self.g.nodes if n.op == "Conv" and len(n.inputs) > 1}
        host_only = self._host_only_inputs()
        for t in self.g.inputs:
            if t.name in host_only:
                continue
            if t.name in self.lora:
                perm = L.NHWC if t.name in consumers_conv_w and len(t.shape) == 4 else L.identity(len(t.shape))
                dtype, q = self.p.lora(t.name)
                idx = self.w.tensor(t.name, L.physical_shape(t.shape, perm), dtype, quant=q)
                self.t[t.name] = _T(idx, list(t.shape), perm)
                self._io(t.name, "lora")
            else:
                perm = L.NHWC if len(t.shape) == 4 else L.identity(len(t.shape))
                self.t[t.name] = self._new(t.name, t.shape, perm)
                self._io(t.name, "model")
        for t in self.host_outputs:
            perm = L.NHWC if len(t.shape) == 4 else L.identity(len(t.shape))
            self.t[t.name] = self._new(t.name, t.shape, perm)
            self._io(t.name, "host")
        self._find_gelus()
        for node in self.g.nodes:
            if id(node) in self.gelu:
                x, out = self.gelu[id(node)]
                self.unit = self._unit_of([x], [out])
                self._gelu(x, out)
                self._flush_pending()
                continue
            if id(node) in self.skip:
                continue
            handler = getattr(self, f"_op_{node.op}", None)
            if handler is None:
                raise QuadcError(f"ONNX op {node.op} (node '{node.name}') has no TFLite 16x8 lowering in quadc; "
                                 "the TFLite targets cannot compile this graph")
            self.unit = self._unit_of(node.inputs, node.outputs)
            handler(node)
            self._flush_pending()
        self.unit = None
        outputs = [self._output(t) for t in self.g.outputs]
        self.w.set_io([self.t[s.name].index for s in self.io_in], [o[0] for o in outputs])
        return Translation(self.w.to_bytes(), self.io_in, [o[1] for o in outputs], dict(sorted(self.ops.items())))

    def _host_only_inputs(self) -> set[str]:
        if not self.skip:
            return set()
        readers: dict[str, list[gs.Node]] = {}
        for n in self.g.nodes:
            for t in n.inputs:
                readers.setdefault(t.name, []).append(n)
        return {t.name for t in self.g.inputs
                if readers.get(t.name) and all(id(n) in self.skip for n in readers[t.name])}

    def _io(self, name: str, kind: str) -> None:
        t = self.t[name]
        q = self.w.quant_of(t.index)
        self.io_in.append(IOSpec(name, list(t.shape), list(t.perm), self.w.dtype_of(t.index),
                                 q.scale[0] if q else None, q.zero_point[0] if q else None, kind))

    def _output(self, t: gs.Tensor) -> tuple[int, IOSpec]:
        want = L.NHWC if len(t.shape) == 4 else L.identity(len(t.shape))
        out = self.get(t, want)
        tensor = self.w.tensors[out.index]
        if tensor.name != t.name and t.name not in self.w._names:
            self.w._names.pop(tensor.name, None)
            tensor.name = t.name
            self.w._names[t.name] = out.index
        q = self.w.quant_of(out.index)
        return out.index, IOSpec(t.name, list(out.shape), list(out.perm), self.w.dtype_of(out.index),
                                 q.scale[0] if q else None, q.zero_point[0] if q else None)

    # ------------------------------------------------------------------------------------------ aliases
    def _alias(self, node: gs.Node) -> None:
        self.t[node.outputs[0].name] = self.get(node.inputs[0])

    def _op_Identity(self, node: gs.Node) -> None:  # noqa: N802
        self._alias(node)

    def _op_Cast(self, node: gs.Node) -> None:  # noqa: N802
        if int(node.attrs.get("to", 1)) != 1:
            raise QuadcError(f"Cast '{node.name}' to a non-float type has no place in the TFLite graph")
        self._alias(node)

    def _op_Transpose(self, node: gs.Node) -> None:  # noqa: N802
        src = self.get(node.inputs[0])
        perm = node.attrs.get("perm", list(range(len(src.shape)))[::-1])
        self.t[node.outputs[0].name] = _T(src.index, list(node.outputs[0].shape), L.after_transpose(src.perm, perm))

    def _reshape(self, node: gs.Node) -> None:
        x, out = node.inputs[0], node.outputs[0]
        src = self.get(x)
        perm = L.reshape_perm(src.shape, src.perm, out.shape)
        if perm is None:
            src = self.get(x, L.identity(len(src.shape)))
            perm = L.reshape_perm(src.shape, src.perm, out.shape)
            assert perm is not None
        if L.physical_shape(out.shape, perm) == self.w.shape_of(src.index):
            self.t[out.name] = _T(src.index, list(out.shape), perm)
            return
        res = self._like(out.name, src, out.shape, perm)
        opts = schema.ReshapeOptionsT()
        opts.newShape = self.w.shape_of(res.index)
        self._op("RESHAPE", [src.index, self._int32(f"{out.name}/shape", opts.newShape)], [res.index], opts)
        self.t[out.name] = res

    _op_Reshape = _op_Unsqueeze = _op_Squeeze = _op_Flatten = _reshape

    # --------------------------------------------------------------------------------------------- conv
    def _op_Conv(self, node: gs.Node) -> None:  # noqa: N802
        if int(node.attrs.get("group", 1)) != 1:
            raise QuadcError(f"grouped Conv '{node.name}' has no TFLite 16x8 lowering in quadc")
        x = self.get(node.inputs[0], L.NHWC)
        wt = node.inputs[1]
        out_c, _, kh, kw = wt.shape
        strides = list(node.attrs.get("strides", [1, 1]))
        dil = list(node.attrs.get("dilations", [1, 1]))
        pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") and not any(pads):
            raise QuadcError(f"Conv '{node.name}' uses auto_pad; export with explicit pads")
        wvals = _const(wt)
        if wvals is not None:
            data, wq = self.p.weight(wvals.transpose(0, 2, 3, 1), 0)
            w_idx = self.w.tensor(f"{wt.name}/ohwi", data.shape, data.dtype.name, quant=wq, data=data)
        elif wt.name in self.lora:
            w_idx = self.get(wt, L.NHWC).index
            wq = self.w.quant_of(w_idx)
        else:
            raise QuadcError(f"Conv '{node.name}' has a weight computed at run time; only constants and LoRA "
                             "inputs are supported")
        bvals = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        bdata, bq = self.p.bias(np.zeros(out_c, np.float32) if bvals is None else bvals,
                                self.w.quant_of(x.index), wq)
        b_idx = self.w.tensor(f"{node.name}/bias", bdata.shape, bdata.dtype.name, quant=bq, data=bdata)
        padding, x = self._conv_padding(node, x, pads, (kh, kw), strides, dil)
        act, out = self._fuse_act(node.outputs[0])
        y = self._new(out.name, out.shape, L.NHWC)
        opts = schema.Conv2DOptionsT()
        opts.padding = padding
        opts.strideH, opts.strideW = int(strides[0]), int(strides[1])
        opts.dilationHFactor, opts.dilationWFactor = int(dil[0]), int(dil[1])
        opts.fusedActivationFunction = act
        if self.p.act_dtype == "int16":
            opts.quantizedBiasType = schema.TensorType.INT32  # without it the int16 kernel misreads int32 biases
        self._op("CONV_2D", [x.index, w_idx, b_idx], [y.index], opts)
        self.t[out.name] = y

    def _conv_padding(self, node: gs.Node, x: _T, pads: list[int], kernel: tuple[int, int], strides: list[int],
                      dil: list[int]) -> tuple[int, _T]:
        """SAME or VALID when the ONNX pads equal TFLite's, else an explicit PAD then VALID."""
        if not any(pads):
            return schema.Padding.VALID, x
        same = []
        for i, size in enumerate(x.shape[2:]):
            eff = (kernel[i] - 1) * dil[i] + 1
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + eff - size, 0)
            same += [total // 2, total - total // 2]
        onnx_pairs = [pads[0], pads[2], pads[1], pads[3]]  # (top, bottom, left, right)
        if onnx_pairs == same:
            return schema.Padding.SAME, x
        shape = [x.shape[0], x.shape[1], x.shape[2] + pads[0] + pads[2], x.shape[3] + pads[1] + pads[3]]
        padded = self._like(f"{node.name}/pad", x, shape, L.NHWC)
        paddings = np.array([[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]], np.int32)
        self._op("PAD", [x.index, self.w.constant(f"{node.name}/paddings", paddings)], [padded.index],
                 schema.PadOptionsT())
        return schema.Padding.VALID, padded

    # ------------------------------------------------------------------------------------------- matmul
    def _fc(self, node: gs.Node, x_t: gs.Tensor, weight_oi: np.ndarray, bias: np.ndarray | None,
            out: gs.Tensor) -> None:
        x = self.get(x_t)
        if x.perm[-1] != len(x.shape) - 1:
            x = self.get(x_t, L.identity(len(x.shape)))
        data, wq = self.p.weight(weight_oi, 0)
        w_idx = self.w.tensor(f"{node.name}/weights", data.shape, data.dtype.name, quant=wq, data=data)
        bdata, bq = self.p.bias(np.zeros(weight_oi.shape[0], np.float32) if bias is None else bias,
                                self.w.quant_of(x.index), wq)
        b_idx = self.w.tensor(f"{node.name}/bias", bdata.shape, bdata.dtype.name, quant=bq, data=bdata)
        act, out = self._fuse_act(out)
        y = self._new(out.name, out.shape, x.perm)
        opts = schema.FullyConnectedOptionsT()
        opts.keepNumDims = True
        opts.fusedActivationFunction = act
        if self.p.act_dtype == "int16":
            opts.quantizedBiasType = schema.TensorType.INT32
        self._op("FULLY_CONNECTED", [x.index, w_idx, b_idx], [y.index], opts)
        self.t[out.name] = y

    def _bias_add(self, out: gs.Tensor, n_out: int) -> tuple[np.ndarray | None, gs.Tensor]:
        """(bias, tensor after it) when ``out``'s only reader adds a constant vector of length ``n_out``."""
        nxt = _only_consumer(out, self.outputs)
        if nxt is None or nxt.op != "Add":
            return None, out
        other = nxt.inputs[1] if nxt.inputs[0] is out else nxt.inputs[0]
        vals = _const(other)
        if vals is None or vals.size != n_out or vals.shape[-1:] != (n_out,):
            return None, out
        self.skip.add(id(nxt))
        return vals.reshape(-1).astype(np.float32), nxt.outputs[0]

    def _op_MatMul(self, node: gs.Node) -> None:  # noqa: N802
        a, b = node.inputs
        bv = _const(b)
        if _const(a) is not None:
            raise QuadcError(f"MatMul '{node.name}' has a constant left operand; quadc's TFLite lowering takes "
                             "x @ W only")
        if bv is not None and bv.ndim >= 2 and all(d == 1 for d in bv.shape[:-2]):
            w2 = bv.reshape(bv.shape[-2:])
            bias, out = self._bias_add(node.outputs[0], w2.shape[1])
            self._fc(node, a, np.ascontiguousarray(w2.T), bias, out)
            return
        self._bmm(node)

    def _bmm(self, node: gs.Node) -> None:
        a, b = node.inputs
        out = node.outputs[0]
        ra, rb = len(a.shape), len(b.shape)
        x = self.get(a, L.identity(ra))
        if b.name in self.lora or isinstance(b, gs.Constant):
            if isinstance(b, gs.Constant):
                data, q = self.p.weight(np.asarray(b.values), -1)
                y_idx = self.w.tensor(f"{node.name}/rhs", data.shape, data.dtype.name, quant=q, data=data)
            else:
                y_idx = self.get(b, L.identity(rb)).index
            adj_y = False
        else:
            src = self._retype(b.name)
            swapped = L.identity(rb)[:-2] + (rb - 1, rb - 2)
            if src.perm == swapped:
                y_idx, adj_y = src.index, True
            else:
                y_idx, adj_y = self.get(b, L.identity(rb)).index, False
        y = self._new(out.name, out.shape, L.identity(len(out.shape)))
        opts = schema.BatchMatMulOptionsT()
        opts.adjY = adj_y
        self._op("BATCH_MATMUL", [x.index, y_idx], [y.index], opts)
        self.t[out.name] = y

    def _op_Gemm(self, node: gs.Node) -> None:  # noqa: N802
        a, b = node.inputs[:2]
        bv = _const(b)
        if bv is None or int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0 \
                or float(node.attrs.get("beta", 1.0)) != 1.0:
            raise QuadcError(f"Gemm '{node.name}' is not x @ W + b with constant W; no TFLite lowering in quadc")
        w_oi = bv if int(node.attrs.get("transB", 0)) else bv.T
        cv = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        if len(node.inputs) > 2 and node.inputs[2].name and cv is None:
            raise QuadcError(f"Gemm '{node.name}' has a non-constant C; no TFLite lowering in quadc")
        self._fc(node, a, np.ascontiguousarray(w_oi), None if cv is None else cv.reshape(-1), node.outputs[0])

    # --------------------------------------------------------------------------------------- elementwise
    def _binary(self, node: gs.Node, op: str, options: Any, replace: Mapping[int, np.ndarray] | None = None) -> None:
        out = node.outputs[0]
        rank = len(out.shape)
        acts = [t for t in node.inputs if _const(t) is None]
        if not acts:
            raise QuadcError(f"{node.op} '{node.name}' has only constant inputs; run const-fold first")
        lead = max(acts, key=lambda t: (len(self.t[t.name].shape) == rank, int(np.prod(self.t[t.name].shape))))
        lead_t = self.t[lead.name]
        perm = lead_t.perm if len(lead_t.shape) == rank else L.identity(rank)
        indices = []
        for i, t in enumerate(node.inputs):
            values = (replace or {}).get(i, _const(t))
            if values is None:
                indices.append(self._expand(t, rank, perm).index)
                continue
            values = np.asarray(values, np.float32).reshape([1] * (rank - np.ndim(values)) + list(np.shape(values)))
            values = values.transpose(perm) if values.ndim == rank and rank > 1 else values
            data, q = self.p.const_act(values, self.unit)
            indices.append(self.w.tensor(f"{node.name}/{t.name}", data.shape, data.dtype.name, quant=q, data=data))
        act = schema.ActivationFunctionType.NONE
        if options is not None and hasattr(options, "fusedActivationFunction"):
            act, out = self._fuse_act(out)
            options.fusedActivationFunction = act
        y = self._new(out.name, out.shape, perm)
        self._op(op, indices, [y.index], options)
        self.t[out.name] = y

    def _op_Add(self, node: gs.Node) -> None:  # noqa: N802
        opts = schema.AddOptionsT()
        opts.potScaleInt16 = False  # general int16 scales, not powers of two
        self._binary(node, "ADD", opts)

    def _op_Sub(self, node: gs.Node) -> None:  # noqa: N802
        opts = schema.SubOptionsT()
        opts.potScaleInt16 = False
        self._binary(node, "SUB", opts)

    def _op_Mul(self, node: gs.Node) -> None:  # noqa: N802
        self._binary(node, "MUL", schema.MulOptionsT())

    def _op_Div(self, node: gs.Node) -> None:  # noqa: N802
        divisor = _const(node.inputs[1])
        if divisor is not None:  # x / c  ->  x * (1/c)
            if np.any(divisor == 0):
                raise QuadcError(f"Div '{node.name}' divides by a constant that holds 0")
            self._binary(node, "MUL", schema.MulOptionsT(),
                         replace={1: np.asarray(1.0 / np.asarray(divisor, np.float64), np.float32)})
            return
        if _const(node.inputs[0]) is not None and _scalar(node.inputs[0]) == 1.0:
            x = node.inputs[1]
            if len(x.inputs) == 1 and x.inputs[0].op == "Sqrt" and len(x.outputs) == 1:
                self._rsqrt(node, x.inputs[0])
                return
        self._binary(node, "DIV", schema.DivOptionsT())

    # ----------------------------------------------------------------------------------------- unary ops
    def _unary(self, node: gs.Node, op: str, options: Any = None, x: gs.Tensor | None = None) -> None:
        src = self.get(x if x is not None else node.inputs[0])
        out = node.outputs[0]
        y = self._new(out.name, out.shape, src.perm)
        self._op(op, [src.index], [y.index], options)
        self.t[out.name] = y

    def _op_Sigmoid(self, node: gs.Node) -> None:  # noqa: N802
        self._unary(node, "LOGISTIC")

    def _op_Tanh(self, node: gs.Node) -> None:  # noqa: N802
        self._unary(node, "TANH")

    def _op_Relu(self, node: gs.Node) -> None:  # noqa: N802
        self._unary(node, "RELU")

    def _op_Sqrt(self, node: gs.Node) -> None:  # noqa: N802
        nxt = _only_consumer(node.outputs[0], self.outputs)
        if nxt is not None and nxt.op == "Reciprocal":
            self.skip.add(id(nxt))
            self._rsqrt(nxt, node)
            return
        raise QuadcError(f"Sqrt '{node.name}' is not followed by Reciprocal; only RSQRT has an int16 kernel")

    def _rsqrt(self, node: gs.Node, sqrt: gs.Node) -> None:
        self._unary(node, "RSQRT", x=sqrt.inputs[0])

    def _op_Reciprocal(self, node: gs.Node) -> None:  # noqa: N802
        raise QuadcError(f"Reciprocal '{node.name}' without Sqrt before it has no int16 kernel in quadc's lowering")

    def _op_Softmax(self, node: gs.Node) -> None:  # noqa: N802
        src = self.t[node.inputs[0].name]
        rank = len(src.shape)
        axis = int(node.attrs.get("axis", -1)) % rank
        if axis != rank - 1:
            raise QuadcError(f"Softmax '{node.name}' over axis {axis} (not the last); no TFLite lowering in quadc")
        perm = src.perm if src.perm[-1] == rank - 1 else L.identity(rank)
        opts = schema.SoftmaxOptionsT()
        opts.beta = 1.0
        x = self.get(node.inputs[0], perm)
        out = node.outputs[0]
        y = self._new(out.name, out.shape, perm)
        self._op("SOFTMAX", [x.index], [y.index], opts)
        self.t[out.name] = y

    def _op_Erf(self, node: gs.Node) -> None:  # noqa: N802
        raise QuadcError(f"Erf '{node.name}' outside the GELU pattern x*0.5*(1+erf(x/sqrt(2))) has no TFLite "
                         "int16 kernel")

    def _find_gelus(self) -> None:
        """Mark every Erf-form GELU: its first node emits GELU, the others are skipped."""
        for node in self.g.nodes:
            if node.op != "Erf" or id(node) in self.skip:
                continue
            match = _match_gelu(node, self.outputs)
            if match is not None:
                x, out, inner = match
                last = out.inputs[0]
                self.gelu[id(last)] = (x, out)
                self.skip.update(id(n) for n in inner if n is not last)

    def _gelu(self, x: gs.Tensor, out: gs.Tensor) -> None:
        src = self.get(x)
        y = self._new(out.name, out.shape, src.perm)
        self._op("GELU", [src.index], [y.index], schema.GeluOptionsT())
        self.t[out.name] = y

    # ------------------------------------------------------------------------------------- shape & data
    def _op_ReduceMean(self, node: gs.Node) -> None:  # noqa: N802
        src = self.get(node.inputs[0])
        rank = len(src.shape)
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            axes = _const(node.inputs[1]).tolist()
        axes = sorted(int(a) % rank for a in (axes if axes is not None else range(rank)))
        keep = int(node.attrs.get("keepdims", 1))
        phys = [src.perm.index(a) for a in axes]
        out = node.outputs[0]
        if keep:
            perm = src.perm
        else:
            kept = [p for p in src.perm if p not in axes]
            perm = tuple(sorted(kept).index(p) for p in kept)
        y = self._new(out.name, out.shape, perm)
        opts = schema.ReducerOptionsT()
        opts.keepDims = bool(keep)
        self._op("MEAN", [src.index, self._int32(f"{node.name}/axes", phys)], [y.index], opts)
        self.t[out.name] = y

    def _op_Concat(self, node: gs.Node) -> None:  # noqa: N802
        if any(_const(t) is not None for t in node.inputs):
            raise QuadcError(f"Concat '{node.name}' with a constant input has no lowering in quadc")
        first = self.t[node.inputs[0].name]
        perm = first.perm
        rank = len(first.shape)
        axis = int(node.attrs["axis"]) % rank
        xs = [self.get(t, perm).index for t in node.inputs]
        out = node.outputs[0]
        y = self._new(out.name, out.shape, perm)
        opts = schema.ConcatenationOptionsT()
        opts.axis = perm.index(axis)
        self._op("CONCATENATION", xs, [y.index], opts)
        self.t[out.name] = y

    def _op_Split(self, node: gs.Node) -> None:  # noqa: N802
        src = self.get(node.inputs[0])
        rank = len(src.shape)
        axis = int(node.attrs.get("axis", 0)) % rank
        sizes = [o.shape[axis] for o in node.outputs]
        if len(set(sizes)) != 1:
            raise QuadcError(f"Split '{node.name}' into unequal parts {sizes} has no int16 lowering in quadc")
        outs = [self._like(o.name, src, o.shape, src.perm) for o in node.outputs]
        opts = schema.SplitOptionsT()
        opts.numSplits = len(outs)
        axis_t = self.w.constant(f"{node.name}/axis", np.array(src.perm.index(axis), np.int32))
        self._op("SPLIT", [axis_t, src.index], [o.index for o in outs], opts)
        for o, t in zip(node.outputs, outs, strict=True):
            self.t[o.name] = t

    def _op_Slice(self, node: gs.Node) -> None:  # noqa: N802
        src = self.get(node.inputs[0])
        rank = len(src.shape)
        vals = [_const(t) for t in node.inputs[1:]]
        if any(v is None for v in vals):
            raise QuadcError(f"Slice '{node.name}' with computed bounds has no lowering in quadc")
        starts, ends = vals[0].tolist(), vals[1].tolist()
        axes = vals[2].tolist() if len(vals) > 2 else list(range(len(starts)))
        steps = vals[3].tolist() if len(vals) > 3 else [1] * len(starts)
        begin, end, stride = [0] * rank, list(src.shape), [1] * rank
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            a = int(a) % rank
            if st <= 0:
                raise QuadcError(f"Slice '{node.name}' with step {st} has no lowering in quadc")
            size = src.shape[a]
            s = min(max(s + size if s < 0 else s, 0), size)
            e = min(max(e + size if e < 0 else e, 0), size)
            begin[a], end[a], stride[a] = s, e, st
        out = node.outputs[0]
        y = self._like(out.name, src, out.shape, src.perm)
        args = [self._int32(f"{node.name}/{k}", [v[p] for p in src.perm])
                for k, v in (("begin", begin), ("end", end), ("strides", stride))]
        self._op("STRIDED_SLICE", [src.index, *args], [y.index], schema.StridedSliceOptionsT())
        self.t[out.name] = y

    def _op_Pad(self, node: gs.Node) -> None:  # noqa: N802
        src = self.get(node.inputs[0])
        rank = len(src.shape)
        mode = node.attrs.get("mode", "constant")
        pads = node.attrs.get("pads")
        if pads is None:
            pads = _const(node.inputs[1]).tolist()
        value = _scalar(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else 0.0
        if mode not in ("constant", b"constant") or value not in (0.0, None) or len(node.inputs) > 3:
            raise QuadcError(f"Pad '{node.name}' (mode {mode}, value {value}) has no lowering in quadc; only zero "
                             "padding")
        pairs = [[int(pads[i]), int(pads[i + rank])] for i in range(rank)]
        out = node.outputs[0]
        y = self._like(out.name, src, out.shape, src.perm)
        paddings = np.array([pairs[p] for p in src.perm], np.int32)
        self._op("PAD", [src.index, self.w.constant(f"{node.name}/paddings", paddings)], [y.index],
                 schema.PadOptionsT())
        self.t[out.name] = y

    def _op_Resize(self, node: gs.Node) -> None:  # noqa: N802
        mode = node.attrs.get("mode", "nearest")
        ctm = node.attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest = node.attrs.get("nearest_mode", "round_prefer_floor")
        out = node.outputs[0]
        x = self.get(node.inputs[0], L.NHWC)
        if mode != "nearest" or ctm != "asymmetric" or nearest != "floor" or len(out.shape) != 4 \
                or out.shape[:2] != x.shape[:2]:
            raise QuadcError(f"Resize '{node.name}' (mode {mode}, {ctm}, {nearest}) has no lowering in quadc; only "
                             "nearest/asymmetric/floor over H and W")
        y = self._like(out.name, x, out.shape, L.NHWC)
        size = self._int32(f"{node.name}/size", out.shape[2:])
        self._op("RESIZE_NEAREST_NEIGHBOR", [x.index, size], [y.index], schema.ResizeNearestNeighborOptionsT())
        self.t[out.name] = y


def _match_gelu(erf: gs.Node, outputs: set[str]) -> tuple[gs.Tensor, gs.Tensor, list[gs.Node]] | None:
    """``(x, gelu output, nodes to skip)`` when ``erf`` is the core of ``x * 0.5 * (1 + erf(x / sqrt 2))``."""
    pre = erf.inputs[0]
    if len(pre.inputs) != 1 or len(pre.outputs) != 1:
        return None
    scale = pre.inputs[0]
    if scale.op == "Div" and np.isclose(_scalar(scale.inputs[1]) or 0, np.sqrt(2), rtol=1e-3):
        x = scale.inputs[0]
    elif scale.op == "Mul" and np.isclose(_scalar(scale.inputs[1]) or 0, 1 / np.sqrt(2), rtol=1e-3):
        x = scale.inputs[0]
    else:
        return None
    add = _only_consumer(erf.outputs[0], outputs)
    if add is None or add.op != "Add" or not np.isclose(_scalar(add.inputs[1]) or _scalar(add.inputs[0]) or 0, 1):
        return None
    a = add.outputs[0]
    m1 = _only_consumer(a, outputs)
    if m1 is None or m1.op != "Mul":
        return None
    other = m1.inputs[1] if m1.inputs[0] is a else m1.inputs[0]
    inner = [scale, erf, add, m1]
    if other is x or _scalar(other) is not None and np.isclose(_scalar(other), 0.5):
        m2 = _only_consumer(m1.outputs[0], outputs)
        if m2 is None or m2.op != "Mul":
            return None
        last = m2.inputs[1] if m2.inputs[0] is m1.outputs[0] else m2.inputs[0]
        want_half = other is x
        if (want_half and np.isclose(_scalar(last) or 0, 0.5)) or (not want_half and last is x):
            return x, m2.outputs[0], [*inner, m2]
        return None
    # other = Mul(x, 0.5) computed separately
    if len(other.inputs) == 1 and other.inputs[0].op == "Mul" and len(other.outputs) == 1:
        h = other.inputs[0]
        if x in h.inputs and any(_scalar(t) is not None and np.isclose(_scalar(t), 0.5) for t in h.inputs):
            return x, m1.outputs[0], [*inner, h]
    return None


def translate(graph: gs.Graph, policy: Policy, *, lora_inputs: Sequence[str] = (),
              host: Any = None) -> Translation:
    """Translate the legalized ``graph`` (not modified) under ``policy``; ``host`` is a
    :class:`~.host.HostSplit` whose nodes are left out and whose outputs become model inputs."""
    from quadc.quant.calibrate import clone_graph

    g = clone_graph(graph)
    by_name = {n.name: n for n in g.nodes}
    host_nodes = [by_name[n.name] for n in host.nodes] if host is not None else []
    tensors = g.tensors()
    host_outputs = [tensors[t.name] for t in host.outputs] if host is not None else []
    return Converter(g, policy, host_outputs=host_outputs, host_nodes=host_nodes, lora_inputs=lora_inputs).run()


def check_ops(translation: Translation, allowed: Mapping[str, Any] | Sequence[str], target: str) -> None:
    """A QuadcError naming the first TFLite op outside ``allowed`` (the vendor plugin's list)."""
    extra = [op for op in translation.ops if op not in allowed]
    if extra:
        raise QuadcError(f"TFLite op {extra[0]} is not in target '{target}''s supported op list; the graph cannot "
                         "be compiled for it")
