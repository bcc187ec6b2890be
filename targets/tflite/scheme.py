"""The TFLite 16x8 encoding scheme, derived from one set of calibration ranges.

LiteRT's fully integer 16x8 kernels take (each verified in ``tests/test_tflite_kernels.py``):

- activations **int16 symmetric, zero point 0**: ``scale = max(|min|, |max|) / 32767`` (no uint16, no
  asymmetric int16: the kernels refuse a non-zero int16 zero point);
- weights **int8 symmetric per output channel**, ``scale_c = max|W_c| / 127``, integers in [-127, 127];
- biases **int32** with ``scale = s_in * s_w[c]`` (CONV_2D needs ``quantized_bias_type = INT32`` for that);
- LoRA factors **int8 symmetric, zero point 0**, ONE encoding per slot input shared by every task, from
  the range the QSS anchor/unified decision chose (:mod:`quadc.quant.qss`), so a task's stored bytes bind
  as they are;
- **fixed output scales** where the kernels demand them: LOGISTIC, SOFTMAX and TANH outputs ``1/32768``;
- **one scale** for every input and the output of a CONCATENATION (different input scales are silently
  wrong), and for the input and output of data-movement ops (RESHAPE, TRANSPOSE, STRIDED_SLICE, SPLIT,
  PAD, RESIZE_NEAREST_NEIGHBOR copy integers without rescaling).

**8-bit activations** (the plan's ``a8_tensors``: ``a8_fraction`` or ``w8a8``) are **int8 asymmetric**
(LiteRT's int8 kernels take any zero point; ``tests/test_tflite_int8_kernels.py``) over the range the plan
chose for them. A shared-scale group is one type: a group with a 16-bit member stays int16 as a whole
(``report["a8_kept_int16_by_group"]``). SOFTMAX's int8 output is fixed at scale 1/256, zero point -128;
LOGISTIC and TANH take any int8 output. :meth:`TfliteScheme.as_type` gives the encoding a tensor gets when
an op of the other width produces or reads it (the converter then adds a QUANTIZE).

:func:`tflite_scheme` is the one function: ``(legalized float graph, ranges, LoRA ranges) -> scheme``.
The ranges are what :func:`quadc.quant.calibrate.calibrate` returns (min/max per ONNX tensor name) and
the LoRA ranges what the QSS decision picked; :func:`scheme_from_plan` reads both from a
:class:`~quadc.quant.plan.QuantPlan` (whose encodings keep their float range as ``tmin``/``tmax``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.quant.affine import MIN_SCALE, Encoding, QType, compute_encoding

INT16_MAX = 32767
INT8_MAX = 127
#: Output scale LiteRT's int16 LOGISTIC, SOFTMAX and TANH kernels require.
FIXED_OUTPUT_SCALE = 1.0 / 32768
#: Factor by which calibrated activation ranges are widened before the int16 scale is set: inputs unlike
#: the calibration feeds then do not saturate, at the cost of one of int16's 15 magnitude bits (weights,
#: at 8 bits, stay the larger error).
DEFAULT_HEADROOM = 2.0
#: ONNX ops whose TFLite kernel fixes the output scale.
FIXED_SCALE_OPS = ("Sigmoid", "Softmax", "Tanh")
#: ONNX ops translated to TFLite ops that copy integers (output scale = input scale).
MOVEMENT_OPS = ("Reshape", "Transpose", "Slice", "Split", "Pad", "Resize", "Unsqueeze", "Squeeze", "Flatten",
                "Identity", "Cast")
#: ONNX ops whose inputs and output must share one scale.
SAME_SCALE_OPS = ("Concat",)


def _symmetric(lo: float, hi: float, qmax: int, qtype: QType) -> Encoding:
    amax = max(abs(float(lo)), abs(float(hi)))
    scale = amax / qmax if amax > 0 else 1.0 / qmax
    return Encoding(scale=max(scale, MIN_SCALE), zero_point=0, qtype=qtype, symmetric=True, tmin=lo, tmax=hi)


def int16_encoding(lo: float, hi: float) -> Encoding:
    """Symmetric int16 encoding (zero point 0) of the range ``[lo, hi]``: ``scale = max|.| / 32767``."""
    return _symmetric(lo, hi, INT16_MAX, QType.INT16)


def int8_encoding(lo: float, hi: float) -> Encoding:
    """Symmetric int8 encoding (zero point 0) of ``[lo, hi]``: ``scale = max|.| / 127``."""
    return _symmetric(lo, hi, INT8_MAX, QType.INT8)


def int8_asymmetric_encoding(lo: float, hi: float) -> Encoding:
    """int8 asymmetric encoding of ``[lo, hi]`` (zero included): ``scale = (hi - lo) / 255``."""
    return compute_encoding(lo, hi, QType.INT8, symmetric=False)


def fixed_encoding(scale: float = FIXED_OUTPUT_SCALE) -> Encoding:
    return Encoding(scale=scale, zero_point=0, qtype=QType.INT16, symmetric=True)


#: The int8 SOFTMAX output encoding LiteRT requires.
SOFTMAX_INT8 = Encoding(scale=1.0 / 256, zero_point=-128, qtype=QType.INT8, symmetric=False, tmin=0.0, tmax=255 / 256)


def weight_encoding(values: np.ndarray, axis: int) -> Encoding:
    """int8 symmetric per-channel encoding of a constant along ``axis`` (all-zero channels get scale 1)."""
    arr = np.asarray(values, np.float64)
    others = tuple(i for i in range(arr.ndim) if i != axis % arr.ndim)
    amax = np.abs(arr).max(axis=others) if arr.size else np.zeros(arr.shape[axis])
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0)
    return Encoding(scale=np.maximum(scale, MIN_SCALE), zero_point=np.zeros(scale.shape, np.int64),
                    qtype=QType.INT8, axis=axis % arr.ndim, symmetric=True)


def quantize_symmetric(values: np.ndarray, enc: Encoding, narrow: bool = False) -> np.ndarray:
    """Round-half-to-even quantization under a zero-point-0 encoding (``narrow``: clip to +-qmax)."""
    arr = np.asarray(values, np.float32)
    scale = enc.scale.astype(np.float32)
    if enc.axis is not None:
        shape = [1] * arr.ndim
        shape[enc.axis] = -1
        scale = scale.reshape(shape)
    q = np.rint(arr / scale)
    lo = -enc.qtype.qmax if narrow else enc.qtype.qmin
    return np.clip(q, lo, enc.qtype.qmax).astype(enc.qtype.np_dtype)


class _Groups:
    """Union-find over tensor names."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, names: Iterable[str]) -> None:
        roots = sorted({self.find(n) for n in names})
        for r in roots[1:]:
            self.parent[r] = roots[0]


def _dynamic(tensors: Iterable[gs.Tensor]) -> list[str]:
    return [t.name for t in tensors if isinstance(t, gs.Variable) and t.name]


def scale_constraints(graph: gs.Graph) -> tuple[list[list[str]], dict[str, float]]:
    """``(groups, fixed)``: sets of tensor names that must share one scale (data movement, concatenation)
    and tensors whose scale the kernel fixes (LOGISTIC/SOFTMAX/TANH outputs)."""
    groups = _Groups()
    fixed: dict[str, float] = {}
    for node in graph.nodes:
        if node.op in MOVEMENT_OPS:
            groups.union(_dynamic(node.inputs[:1]) + _dynamic(node.outputs))
        elif node.op in SAME_SCALE_OPS:
            groups.union(_dynamic(node.inputs) + _dynamic(node.outputs))
        elif node.op in FIXED_SCALE_OPS:
            fixed[node.outputs[0].name] = FIXED_OUTPUT_SCALE
    by_root: dict[str, list[str]] = {}
    for name in sorted(groups.parent):
        by_root.setdefault(groups.find(name), []).append(name)
    return [g for g in by_root.values() if len(g) > 1], fixed


@dataclass
class TfliteScheme:
    """Every encoding of a 16x8 TFLite graph: int16 (or, for 8-bit activations, int8) activations per ONNX
    tensor name, int8 LoRA inputs; ``fixed16``: outputs of LOGISTIC/SOFTMAX/TANH (1/32768 when int16);
    ``softmax``: SOFTMAX outputs (:data:`SOFTMAX_INT8` when int8)."""

    activations: dict[str, Encoding] = field(default_factory=dict)
    lora: dict[str, Encoding] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    fixed16: set[str] = field(default_factory=set)
    softmax: set[str] = field(default_factory=set)

    @property
    def int8_activations(self) -> list[str]:
        """The activations stored as int8, sorted."""
        return sorted(n for n, e in self.activations.items() if e.qtype is QType.INT8)

    def as_type(self, name: str, dtype: str) -> Encoding:
        """The encoding of activation ``name`` as ``dtype`` (``int16``/``int8``): its own when that is its
        type, else one over the same range (int16 symmetric; int8 asymmetric), or the fixed output encoding
        a LOGISTIC/SOFTMAX/TANH kernel of that width requires."""
        enc = self.activations[name]
        if enc.qtype.value == dtype:
            return enc
        lo, hi = float(np.min(enc.grid_min)), float(np.max(enc.grid_max))
        if dtype == "int16":
            return fixed_encoding() if name in self.fixed16 else int16_encoding(lo, hi)
        return SOFTMAX_INT8 if name in self.softmax else int8_asymmetric_encoding(lo, hi)


def tflite_scheme(graph: gs.Graph, ranges: Mapping[str, tuple[float, float]],
                  lora_ranges: Mapping[str, tuple[float, float]], headroom: float = DEFAULT_HEADROOM,
                  a8: Collection[str] = ()) -> TfliteScheme:
    """The 16x8 scheme of the legalized float ``graph`` from calibration ``ranges`` (ONNX tensor name ->
    (min, max)) and the shared LoRA ranges (slot input name -> (min, max)): int16 symmetric activations,
    shared groups widened to the union of their ranges, fixed output scales, int8 LoRA inputs. The
    activations named in ``a8`` become int8 asymmetric over their range (no headroom added: the plan's
    8-bit ranges carry their own), unless their shared-scale group has a 16-bit member."""
    groups, fixed = scale_constraints(graph)
    fixed16 = set(fixed)
    softmax = {n.outputs[0].name for n in graph.nodes if n.op == "Softmax"}
    merged = {k: (float(v[0]), float(v[1])) for k, v in ranges.items() if k not in lora_ranges}
    eight = {n for n in a8 if n in merged}
    kept16 = 0
    for group in groups:
        members = [n for n in group if n in merged]
        if any(n not in eight for n in members) and any(n in eight for n in members):
            kept16 += sum(n in eight for n in members)
            eight.difference_update(members)
    widened = 0
    for group in groups:
        members = [n for n in group if n in merged]
        if not members:
            continue
        if members[0] in eight:  # an int8 group: one range; a SOFTMAX output pins it to SOFTMAX_INT8
            lo = min(merged[n][0] for n in members)
            hi = max(merged[n][1] for n in members)
            if any(n in softmax for n in group):
                softmax.update(group)
            for n in members:
                widened += merged[n] != (lo, hi)
                merged[n] = (lo, hi)
            continue
        pinned = sorted({fixed[n] for n in group if n in fixed})
        if len(pinned) > 1:
            raise QuadcError(f"tensors {', '.join(group[:3])} must share one scale but their kernels fix different "
                             "ones; this graph cannot be written as 16x8 TFLite")
        lo = min(merged[n][0] for n in members)
        hi = max(merged[n][1] for n in members)
        if pinned:
            limit = pinned[0] * 32768
            if lo < -limit or hi > limit * (1 + 1e-6):
                raise QuadcError(f"tensor '{members[0]}' shares its scale with a LOGISTIC/SOFTMAX/TANH output (fixed "
                                 f"1/32768) but ranges over [{lo:.4g}, {hi:.4g}]; it would saturate")
            for n in group:
                fixed[n] = pinned[0]
        for n in members:
            widened += merged[n] != (lo, hi)
            merged[n] = (lo, hi)
    if headroom < 1.0:
        raise QuadcError(f"activation headroom must be at least 1, got {headroom}")
    def encoding(n: str, r: tuple[float, float]) -> Encoding:
        if n in eight:
            return SOFTMAX_INT8 if n in softmax else int8_asymmetric_encoding(*r)
        return fixed_encoding(fixed[n]) if n in fixed else int16_encoding(r[0] * headroom, r[1] * headroom)

    activations = {n: encoding(n, r) for n, r in merged.items()}
    for n, s in fixed.items():
        activations.setdefault(n, fixed_encoding(s))
    lora = {n: int8_encoding(*r) for n, r in lora_ranges.items()}
    report = {"activations": len(activations), "lora_inputs": len(lora), "shared_scale_groups": len(groups),
              "widened_to_group_range": widened, "fixed_output_scales": len(fixed),
              "int8_activations": len(eight), "a8_kept_int16_by_group": kept16}
    return TfliteScheme(activations, lora, report, fixed16, softmax)


def scheme_from_plan(graph: gs.Graph, plan: Any, headroom: float = DEFAULT_HEADROOM) -> TfliteScheme:
    """:func:`tflite_scheme` with the ranges a :class:`~quadc.quant.plan.QuantPlan` recorded: each activation
    encoding's calibrated ``tmin``/``tmax``, each LoRA input's shared (anchor or unified) range and the
    plan's 8-bit activations (``a8_tensors``)."""
    def rng(enc: Encoding) -> tuple[float, float]:
        return float(np.min(enc.tmin)), float(np.max(enc.tmax))

    return tflite_scheme(graph, {n: rng(e) for n, e in plan.activations.items()},
                         {n: rng(e) for n, e in plan.lora.items()}, headroom, a8=plan.a8_tensors)
