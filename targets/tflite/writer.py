"""Write a TFLite flatbuffer through the TFLite schema's object API (no TensorFlow).

:class:`TfliteWriter` collects tensors, constant buffers and operators of one subgraph as the schema's
``TensorT`` / ``BufferT`` / ``OperatorT`` objects (``ai_edge_litert.schema_py_generated``) and packs a
``ModelT`` with the ``flatbuffers`` builder. The bytes depend only on what was added, in the order it
was added: the same graph gives the same file.

Example::

    w = TfliteWriter()
    x = w.tensor("x", [1, 4], "int16", quant=Quant.per_tensor(0.01))
    wt = w.constant("w", np.ones((3, 4), np.int8), quant=Quant.per_channel([0.1] * 3, axis=0))
    y = w.tensor("y", [1, 3], "int16", quant=Quant.per_tensor(0.02))
    w.op("FULLY_CONNECTED", [x, wt, -1], [y], schema.FullyConnectedOptionsT())
    w.set_io([x], [y])
    data = w.to_bytes()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from quadc.errors import QuadcError

#: Flatbuffer file identifier of TFLite models.
FILE_IDENTIFIER = b"TFL3"
#: TFLite schema version written into ``ModelT.version``.
SCHEMA_VERSION = 3
#: Alignment of constant buffers (what TFLite's own exporter uses).
BUFFER_ALIGNMENT = 16

TENSOR_TYPES: dict[str, int] = {
    "float32": schema.TensorType.FLOAT32,
    "int32": schema.TensorType.INT32,
    "int64": schema.TensorType.INT64,
    "int16": schema.TensorType.INT16,
    "int8": schema.TensorType.INT8,
    "uint8": schema.TensorType.UINT8,
    "uint16": schema.TensorType.UINT16,
    "bool": schema.TensorType.BOOL,
}
NUMPY_OF_TYPE: dict[int, np.dtype] = {code: np.dtype(name) for name, code in TENSOR_TYPES.items()}


def builtin_code(op: str) -> int:
    """The ``BuiltinOperator`` code of an op name such as ``"CONV_2D"``."""
    code = getattr(schema.BuiltinOperator, op, None)
    if not isinstance(code, int):
        raise QuadcError(f"'{op}' is not a TFLite builtin operator")
    return code


def builtin_name(code: int) -> str:
    """The name of a ``BuiltinOperator`` code."""
    for name, value in vars(schema.BuiltinOperator).items():
        if value == code and not name.startswith("_"):
            return name
    return str(code)


@dataclass(frozen=True)
class Quant:
    """Quantization parameters of one tensor: scales, zero points and (per-channel) the axis."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    @classmethod
    def per_tensor(cls, scale: float, zero_point: int = 0) -> Quant:
        return cls((float(np.float32(scale)),), (int(zero_point),))

    @classmethod
    def per_channel(cls, scales: Sequence[float], axis: int) -> Quant:
        """Symmetric per-channel parameters (zero points 0) along ``axis``."""
        return cls(tuple(float(np.float32(s)) for s in scales), (0,) * len(scales), int(axis))

    def to_schema(self) -> schema.QuantizationParametersT:
        q = schema.QuantizationParametersT()
        q.scale = list(self.scale)
        q.zeroPoint = list(self.zero_point)
        q.quantizedDimension = self.axis
        return q


class _AlignedBufferT(schema.BufferT):
    """A ``BufferT`` whose data vector is aligned to :data:`BUFFER_ALIGNMENT` bytes (the generated
    ``Pack`` aligns byte vectors to 1, which leaves int32/float data unaligned)."""

    def Pack(self, builder: flatbuffers.Builder) -> int:  # noqa: N802  (the schema's method name)
        payload = bytes(self.data) if self.data is not None else b""
        data = None
        if self.data is not None:
            builder.StartVector(1, len(payload), BUFFER_ALIGNMENT)
            builder.head = builder.head - len(payload)
            builder.Bytes[builder.head:builder.head + len(payload)] = payload
            builder.vectorNumElems = len(payload)
            data = builder.EndVector()
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        return schema.BufferEnd(builder)


def _options_type(options: Any) -> int:
    """The ``BuiltinOptions`` union tag of an options object (``Conv2DOptionsT`` -> ``Conv2DOptions``)."""
    name = type(options).__name__
    tag = getattr(schema.BuiltinOptions, name[:-1] if name.endswith("T") else name, None)
    if not isinstance(tag, int):
        raise QuadcError(f"{name} is not a TFLite builtin options table")
    return tag


class TfliteWriter:
    """Builder of a one-subgraph TFLite model (tensors, buffers, operators) with deterministic bytes."""

    def __init__(self, description: str = "quadc") -> None:
        self.description = description
        self.tensors: list[schema.TensorT] = []
        self.buffers: list[schema.BufferT] = [schema.BufferT()]  # buffer 0: the empty sentinel
        self.operators: list[schema.OperatorT] = []
        self.opcodes: list[schema.OperatorCodeT] = []
        self._opcode_index: dict[tuple[int, int], int] = {}
        self._names: dict[str, int] = {}
        self.inputs: list[int] = []
        self.outputs: list[int] = []
        self.signature_key = "serving_default"

    # ------------------------------------------------------------------------------------------ tensors
    def unique(self, name: str) -> str:
        """``name``, or ``name_1``, ``name_2``... if it is taken."""
        if name not in self._names:
            return name
        i = 1
        while f"{name}_{i}" in self._names:
            i += 1
        return f"{name}_{i}"

    def tensor(self, name: str, shape: Sequence[int], dtype: str, *, quant: Quant | None = None,
               data: np.ndarray | None = None) -> int:
        """Add a tensor (a constant when ``data`` is given); returns its index. Names are made unique."""
        if dtype not in TENSOR_TYPES:
            raise QuadcError(f"TFLite writer: unsupported tensor type {dtype}")
        t = schema.TensorT()
        t.name = self.unique(name)
        t.shape = [int(d) for d in shape]
        t.type = TENSOR_TYPES[dtype]
        if quant is not None:
            t.quantization = quant.to_schema()
        if data is not None:
            arr = np.array(data, dtype=np.dtype(dtype), order="C")  # keeps 0-d arrays 0-d
            if list(arr.shape) != t.shape:
                raise QuadcError(f"TFLite writer: constant {name} has shape {list(arr.shape)}, declared {t.shape}")
            buf = _AlignedBufferT()
            buf.data = arr.tobytes()
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        self.tensors.append(t)
        index = len(self.tensors) - 1
        self._names[t.name] = index
        return index

    def constant(self, name: str, data: np.ndarray, *, quant: Quant | None = None) -> int:
        """Add a constant tensor holding ``data`` (its dtype and shape)."""
        arr = np.asarray(data)
        return self.tensor(name, arr.shape, arr.dtype.name, quant=quant, data=arr)

    def shape_of(self, index: int) -> list[int]:
        return list(self.tensors[index].shape)

    def dtype_of(self, index: int) -> str:
        return NUMPY_OF_TYPE[self.tensors[index].type].name

    def quant_of(self, index: int) -> Quant | None:
        q = self.tensors[index].quantization
        if q is None or not q.scale:
            return None
        return Quant(tuple(q.scale), tuple(q.zeroPoint), q.quantizedDimension)

    # ---------------------------------------------------------------------------------------- operators
    def op(self, op: str, inputs: Sequence[int], outputs: Sequence[int], options: Any = None,
           version: int = 1) -> None:
        """Append an operator (``inputs`` may hold -1 for an omitted optional input)."""
        key = (builtin_code(op), int(version))
        if key not in self._opcode_index:
            code = schema.OperatorCodeT()
            code.builtinCode = key[0]
            code.deprecatedBuiltinCode = min(key[0], 127)  # the int8 field saturates at PLACEHOLDER (127)
            code.version = key[1]
            self.opcodes.append(code)
            self._opcode_index[key] = len(self.opcodes) - 1
        o = schema.OperatorT()
        o.opcodeIndex = self._opcode_index[key]
        o.inputs = [int(i) for i in inputs]
        o.outputs = [int(i) for i in outputs]
        if options is not None:
            o.builtinOptionsType = _options_type(options)
            o.builtinOptions = options
        self.operators.append(o)

    def set_io(self, inputs: Sequence[int], outputs: Sequence[int]) -> None:
        self.inputs = [int(i) for i in inputs]
        self.outputs = [int(i) for i in outputs]

    # ------------------------------------------------------------------------------------------- output
    def model(self) -> schema.ModelT:
        """The ``ModelT`` (one subgraph, one signature naming inputs and outputs by tensor name)."""
        sub = schema.SubGraphT()
        sub.tensors = self.tensors
        sub.inputs = self.inputs
        sub.outputs = self.outputs
        sub.operators = self.operators
        sub.name = "main"
        sig = schema.SignatureDefT()
        sig.signatureKey = self.signature_key
        sig.subgraphIndex = 0
        sig.inputs = [self._tensor_map(i) for i in self.inputs]
        sig.outputs = [self._tensor_map(i) for i in self.outputs]
        m = schema.ModelT()
        m.version = SCHEMA_VERSION
        m.description = self.description
        m.operatorCodes = self.opcodes
        m.subgraphs = [sub]
        m.buffers = self.buffers
        m.signatureDefs = [sig]
        return m

    def _tensor_map(self, index: int) -> schema.TensorMapT:
        tm = schema.TensorMapT()
        tm.name = self.tensors[index].name
        tm.tensorIndex = index
        return tm

    def to_bytes(self) -> bytes:
        """The packed flatbuffer with the ``TFL3`` identifier."""
        builder = flatbuffers.Builder(1024)
        builder.Finish(self.model().Pack(builder), file_identifier=FILE_IDENTIFIER)
        return bytes(builder.Output())


def read_model(data: bytes) -> schema.ModelT:
    """Unpack a TFLite flatbuffer into the schema's object API (``ModelT``)."""
    if len(data) < 8 or data[4:8] != FILE_IDENTIFIER:
        raise QuadcError("not a TFLite flatbuffer (no TFL3 identifier)")
    return schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
