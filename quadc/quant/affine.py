"""The one module of quantization math: integer types, encodings, and ONNX-exact quantize/dequantize.

An :class:`Encoding` is an affine map between float32 values and the integers of a :class:`QType`::

    real = (q - zero_point) * scale            q in [qmin, qmax]

:func:`quantize` and :func:`dequantize` reproduce ONNX ``QuantizeLinear`` / ``DequantizeLinear`` as run by
onnxruntime's CPU provider bit for bit (checked by ``tests/test_quant_affine.py``):

* QuantizeLinear: ``q = saturate(round_half_to_even(x / scale) + zero_point)``. ORT *divides* in float32
  (multiplying by a float32 reciprocal differs on a few values per thousand), rounds half to even,
  saturates +-inf and out-of-range values to qmax/qmin, and on x86-64 maps NaN to ``qmin`` whatever the
  zero point (the ONNX spec leaves NaN undefined; we copy ORT).
* DequantizeLinear: ``real = float32(q - zero_point) * scale``: the integer difference is exact, then one
  float32 multiply. ``q * scale - zero_point * scale`` is *not* what ORT computes.

Per-channel encodings carry a 1-D scale and zero point and the ``axis`` they run along, like the ONNX
operators' ``axis`` attribute.

Example::

    enc = compute_encoding(-0.7, 2.3, QType.UINT16)
    q = quantize(x, enc)            # np.uint16, identical to onnxruntime's QuantizeLinear
    y = dequantize(q, enc)          # np.float32, identical to DequantizeLinear
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import TensorProto

from quadc.errors import QuadcError

__all__ = [
    "MIN_SCALE",
    "Encoding",
    "QType",
    "compute_encoding",
    "dequantize",
    "encoding_from_tensor",
    "fake_quant",
    "merge_ranges",
    "quantize",
    "sqnr_db",
]

#: Smallest scale :func:`compute_encoding` produces: float32's smallest normal number, so no scale is
#: zero or subnormal (hardware that flushes subnormals to zero would divide by zero).
MIN_SCALE = float(np.finfo(np.float32).tiny)


class QType(enum.Enum):
    """An integer type of a quantized tensor: ``int8``, ``uint8``, ``int16`` or ``uint16``."""

    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"
    UINT16 = "uint16"

    @property
    def np_dtype(self) -> np.dtype:
        """The numpy dtype of the quantized integers."""
        return np.dtype(self.value)

    @property
    def bits(self) -> int:
        """Bit width: 8 or 16."""
        return self.np_dtype.itemsize * 8

    @property
    def signed(self) -> bool:
        """True for int8/int16."""
        return self.np_dtype.kind == "i"

    @property
    def qmin(self) -> int:
        """Smallest integer of the type (-128, 0, -32768 or 0)."""
        return int(np.iinfo(self.np_dtype).min)

    @property
    def qmax(self) -> int:
        """Largest integer of the type (127, 255, 32767 or 65535)."""
        return int(np.iinfo(self.np_dtype).max)

    @property
    def onnx_type(self) -> int:
        """The ``onnx.TensorProto`` element type (``TensorProto.INT8`` ...)."""
        return _ONNX_TYPES[self]

    @property
    def midpoint(self) -> int:
        """Zero point of a symmetric encoding: 0 for signed types, 128 or 32768 for unsigned ones."""
        return 0 if self.signed else 1 << (self.bits - 1)

    @classmethod
    def parse(cls, value: QType | str) -> QType:
        """Return ``value`` as a QType; accepts a QType or a name such as ``"uint16"``."""
        if isinstance(value, QType):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(q.value for q in cls)
            raise QuadcError(f"unknown quantized type '{value}'; use one of {names}") from None

    @classmethod
    def from_onnx(cls, onnx_type: int) -> QType:
        """The QType of an ``onnx.TensorProto`` element type."""
        for qtype, code in _ONNX_TYPES.items():
            if code == onnx_type:
                return qtype
        name = (
            TensorProto.DataType.Name(onnx_type) if onnx_type in TensorProto.DataType.values() else onnx_type
        )
        raise QuadcError(
            f"ONNX element type {name} is not a supported quantized type; use INT8, UINT8, INT16 or UINT16"
        )

    @classmethod
    def from_bits(cls, bits: int, signed: bool) -> QType:
        """The QType with ``bits`` (8 or 16) and the given signedness."""
        for qtype in cls:
            if qtype.bits == bits and qtype.signed == signed:
                return qtype
        raise QuadcError(f"bit width {bits} is not supported; use 8 or 16")

    def __str__(self) -> str:
        return self.value


_ONNX_TYPES: dict[QType, int] = {
    QType.INT8: TensorProto.INT8,
    QType.UINT8: TensorProto.UINT8,
    QType.INT16: TensorProto.INT16,
    QType.UINT16: TensorProto.UINT16,
}


def _float_array(value: Any, what: str) -> np.ndarray:
    """``value`` as a float64 array, or a QuadcError naming ``what``."""
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise QuadcError(f"{what} must be a number or an array of numbers, got {value!r}") from None
    return arr


@dataclass(eq=False)
class Encoding:
    """Scale and zero point of one quantized tensor, per-tensor (``axis is None``) or per-channel.

    ``scale`` is float32 and ``zero_point`` has the qtype's numpy dtype; both are 0-d arrays for a
    per-tensor encoding and 1-D arrays (one entry per channel along ``axis``) for a per-channel one.
    ``symmetric`` encodings have their zero point at :attr:`QType.midpoint`. ``tmin``/``tmax`` record the
    float range the encoding was computed from (float32, same shape as ``scale``); when not given they are
    the representable range. They are informational only: two encodings are equal (``==``) when they have
    the same qtype, axis, symmetric flag and bit-identical scales and zero points, i.e. when they quantize
    identically.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    qtype: QType
    axis: int | None = None
    symmetric: bool = False
    tmin: np.ndarray | None = None
    tmax: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.qtype = QType.parse(self.qtype)
        if self.axis is not None:
            if isinstance(self.axis, bool) or not isinstance(self.axis, int | np.integer):
                raise QuadcError(f"encoding axis must be an integer or None, got {self.axis!r}")
            self.axis = int(self.axis)
        self.symmetric = bool(self.symmetric)
        scale = _float_array(self.scale, "encoding scale")
        zp = np.array(self.zero_point)
        if self.axis is None:
            if scale.size != 1 or zp.size != 1:
                raise QuadcError(
                    f"a per-tensor encoding needs one scale and one zero point, got {scale.size} and {zp.size}; "
                    "set axis for a per-channel encoding"
                )
            scale, zp = scale.reshape(()), zp.reshape(())
        else:
            if scale.ndim != 1 or zp.shape != scale.shape or scale.size == 0:
                raise QuadcError(
                    f"a per-channel encoding needs 1-D scale and zero point of equal non-zero length, got shapes "
                    f"{scale.shape} and {zp.shape}"
                )
        if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            raise QuadcError(
                f"encoding scale must be finite and positive, got {scale.tolist()}; recompute the encoding"
            )
        with np.errstate(over="ignore"):
            scale32 = scale.astype(np.float32)
        if not np.all(scale32 > 0) or not np.all(np.isfinite(scale32)):
            raise QuadcError(f"encoding scale {scale.tolist()} does not fit float32; recompute the encoding")
        if zp.dtype.kind == "f":
            if not np.all(np.isfinite(zp)) or not np.all(zp == np.round(zp)):
                raise QuadcError(f"encoding zero point must be an integer, got {zp.tolist()}")
        elif zp.dtype.kind not in "iub":
            raise QuadcError(f"encoding zero point must be an integer, got {zp.tolist()!r}")
        q = self.qtype
        if np.any(zp < q.qmin) or np.any(zp > q.qmax):
            raise QuadcError(
                f"zero point {zp.tolist()} is outside the {q} range [{q.qmin}, {q.qmax}]; "
                "recompute the encoding or use a wider type"
            )
        zp = zp.astype(q.np_dtype)
        if self.symmetric and np.any(zp != q.midpoint):
            raise QuadcError(
                f"a symmetric {q} encoding needs zero point {q.midpoint}, got {zp.tolist()}; "
                "set symmetric=False or fix the zero point"
            )
        self.scale = scale32
        self.zero_point = zp
        self.tmin = self._range_field(self.tmin, "tmin", self.grid_min)
        self.tmax = self._range_field(self.tmax, "tmax", self.grid_max)

    def _range_field(self, value: Any, what: str, default: np.ndarray) -> np.ndarray:
        if value is None:
            return default
        arr = _float_array(value, f"encoding {what}")
        if arr.size != self.scale.size:
            raise QuadcError(f"encoding {what} has {arr.size} values but the scale has {self.scale.size}")
        return arr.reshape(self.scale.shape).astype(np.float32)

    @property
    def per_channel(self) -> bool:
        """True when the encoding has one scale per channel along :attr:`axis`."""
        return self.axis is not None

    @property
    def num_channels(self) -> int:
        """Number of scales: 1 for a per-tensor encoding."""
        return int(self.scale.size)

    def _grid_value(self, q: int) -> np.ndarray:
        """``(q - zero_point) * scale`` in float32, like DequantizeLinear."""
        with np.errstate(over="ignore"):  # inf only for scales near float32's maximum
            return (np.int32(q) - self.zero_point.astype(np.int32)).astype(np.float32) * self.scale

    @property
    def grid_min(self) -> np.ndarray:
        """The smallest representable value, ``(qmin - zero_point) * scale``."""
        return self._grid_value(self.qtype.qmin)

    @property
    def grid_max(self) -> np.ndarray:
        """The largest representable value, ``(qmax - zero_point) * scale``."""
        return self._grid_value(self.qtype.qmax)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Encoding):
            return NotImplemented
        return (
            self.qtype is other.qtype
            and self.axis == other.axis
            and self.symmetric == other.symmetric
            and self.scale.shape == other.scale.shape
            and np.array_equal(self.scale.view(np.uint32), other.scale.view(np.uint32))
            and np.array_equal(self.zero_point, other.zero_point)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    def __repr__(self) -> str:
        axis = "" if self.axis is None else f", axis={self.axis}"
        sym = ", symmetric" if self.symmetric else ""
        return f"Encoding({self.qtype}, scale={self.scale.tolist()}, zero_point={self.zero_point.tolist()}{axis}{sym})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict; :meth:`from_dict` rebuilds an identical encoding (float32 exact)."""
        return {
            "qtype": self.qtype.value,
            "axis": self.axis,
            "symmetric": self.symmetric,
            "scale": self.scale.tolist(),
            "zero_point": self.zero_point.tolist(),
            "tmin": self.tmin.tolist() if self.tmin is not None else None,
            "tmax": self.tmax.tolist() if self.tmax is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Encoding:
        """Rebuild an encoding from :meth:`to_dict`'s output."""
        if not isinstance(data, Mapping):
            raise QuadcError(f"an encoding must be a JSON object, got {type(data).__name__}")
        missing = [key for key in ("qtype", "scale", "zero_point") if key not in data]
        if missing:
            raise QuadcError(f"encoding {dict(data)!r} lacks the field(s) {', '.join(missing)}")
        return cls(
            scale=data["scale"],
            zero_point=data["zero_point"],
            qtype=QType.parse(data["qtype"]),
            axis=data.get("axis"),
            symmetric=bool(data.get("symmetric", False)),
            tmin=data.get("tmin"),
            tmax=data.get("tmax"),
        )


def compute_encoding(
    tmin: Any,
    tmax: Any,
    qtype: QType | str,
    *,
    symmetric: bool = False,
    axis: int | None = None,
) -> Encoding:
    """The encoding of the float range ``[tmin, tmax]`` (arrays of one value per channel when ``axis`` is set).

    The range is first widened to include 0, so that zero is exactly representable (it quantizes to the
    zero point and dequantizes to exactly 0.0). Then, with ``N = qmax - qmin``:

    * asymmetric: ``scale = (max - min) / N`` and ``zero_point = clip(round(qmin - min / scale), qmin, qmax)``
      (round half to even). This is the standard formula; the QUAD paper's printed zero point
      ``z = floor(Tmin / s - qmin)`` is garbled (wrong sign and floor instead of round) and is not used.
    * symmetric: ``scale = max(|min|, |max|) * 2 / N``; the zero point is 0 for signed types and the
      midpoint (128 or 32768) for unsigned ones, as ONNX and QNN do.

    The scale is computed in float64 and stored as float32; the zero point is computed from that float32
    scale. A degenerate range (``min == max == 0``) gets scale 1.0, and no scale is below
    :data:`MIN_SCALE`, so nothing divides by zero. Raises :class:`QuadcError` for non-finite bounds,
    ``tmin > tmax`` or mismatched shapes.
    """
    q = QType.parse(qtype)
    lo = _float_array(tmin, "tmin")
    hi = _float_array(tmax, "tmax")
    if axis is None:
        if lo.size != 1 or hi.size != 1:
            raise QuadcError(
                f"a per-tensor range needs one tmin and one tmax, got {lo.size} and {hi.size}; pass axis for per-channel"
            )
        lo, hi = lo.reshape(()), hi.reshape(())
    elif lo.ndim != 1 or hi.shape != lo.shape or lo.size == 0:
        raise QuadcError(
            f"a per-channel range needs 1-D tmin and tmax of equal non-zero length, got shapes {lo.shape} and {hi.shape}"
        )
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise QuadcError(
            f"range [{lo.tolist()}, {hi.tolist()}] is not finite; calibrate on data without NaN or inf"
        )
    if np.any(lo > hi):
        raise QuadcError(
            f"range minimum {lo.tolist()} exceeds maximum {hi.tolist()}; pass (tmin, tmax) in that order"
        )
    wlo = np.minimum(lo, 0.0)
    whi = np.maximum(hi, 0.0)
    steps = float(q.qmax - q.qmin)
    if symmetric:
        width = np.maximum(np.abs(wlo), np.abs(whi)) * 2.0
    else:
        width = whi - wlo
    scale64 = np.where(width > 0, width / steps, 1.0)
    scale64 = np.maximum(scale64, MIN_SCALE)
    scale = scale64.astype(np.float32)
    # float64 -> float32 may round a huge scale up to inf only for ranges beyond float32 itself.
    if symmetric:
        zp = np.full(scale.shape, q.midpoint, dtype=np.int64)
    else:
        zp = np.clip(np.rint(q.qmin - wlo / scale.astype(np.float64)), q.qmin, q.qmax).astype(np.int64)
    return Encoding(scale=scale, zero_point=zp, qtype=q, axis=axis, symmetric=symmetric, tmin=lo, tmax=hi)


def encoding_from_tensor(
    x: Any,
    qtype: QType | str,
    symmetric: bool = False,
    axis: int | None = None,
) -> Encoding:
    """The :func:`compute_encoding` of ``x``'s min and max (per channel along ``axis`` when given)."""
    arr = np.asarray(x, dtype=np.float32)
    if arr.size == 0:
        raise QuadcError("cannot compute an encoding from an empty tensor; calibrate on at least one value")
    if not np.all(np.isfinite(arr)):
        raise QuadcError(
            "the tensor holds NaN or inf values, so it has no finite range; clean the calibration data"
        )
    if axis is None:
        return compute_encoding(arr.min(), arr.max(), qtype, symmetric=symmetric)
    ax = _normalize_axis(axis, arr.ndim)
    others = tuple(i for i in range(arr.ndim) if i != ax)
    return compute_encoding(arr.min(axis=others), arr.max(axis=others), qtype, symmetric=symmetric, axis=axis)


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise QuadcError(
            f"axis {axis} is out of range for a tensor of rank {ndim}; use an axis in [{-ndim}, {ndim - 1}]"
        )
    return axis % ndim


def _broadcast(enc: Encoding, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``values`` (shaped like the scale) reshaped to broadcast against a tensor of ``shape``."""
    if enc.axis is None:
        return values
    ax = _normalize_axis(enc.axis, len(shape))
    if shape[ax] != enc.num_channels:
        raise QuadcError(
            f"tensor of shape {shape} has {shape[ax]} channels along axis {enc.axis} but the encoding has "
            f"{enc.num_channels}; use an encoding computed for this tensor"
        )
    target = [1] * len(shape)
    target[ax] = enc.num_channels
    return values.reshape(target)


def quantize(x: Any, enc: Encoding) -> np.ndarray:
    """ONNX ``QuantizeLinear``, bit-exact with onnxruntime's CPU provider.

    ``x`` is cast to float32 first (as a float32 graph input would be); the result has the qtype's dtype.
    ``q = saturate(round_half_to_even(x / scale) + zero_point)`` in float32; +-inf saturate, NaN gives qmin.
    """
    arr = np.asarray(x, dtype=np.float32)
    scale = _broadcast(enc, enc.scale, arr.shape)
    zp = _broadcast(enc, enc.zero_point.astype(np.float32), arr.shape)
    q = enc.qtype
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        v = np.asarray(np.divide(arr, scale, dtype=np.float32))
        np.rint(v, out=v)
        v += zp
        np.clip(v, q.qmin, q.qmax, out=v)
    v[np.isnan(v)] = q.qmin
    return v.astype(q.np_dtype)


def dequantize(q: Any, enc: Encoding) -> np.ndarray:
    """ONNX ``DequantizeLinear``, bit-exact with onnxruntime: ``float32(q - zero_point) * scale``."""
    arr = np.asarray(q)
    if arr.dtype.kind not in "iu":
        raise QuadcError(
            f"dequantize needs integer values, got dtype {arr.dtype}; pass the output of quantize"
        )
    scale = _broadcast(enc, enc.scale, arr.shape)
    zp = _broadcast(enc, enc.zero_point.astype(np.int32), arr.shape)
    return np.asarray((arr.astype(np.int32) - zp).astype(np.float32) * scale, dtype=np.float32)


def fake_quant(x: Any, enc: Encoding) -> np.ndarray:
    """``dequantize(quantize(x, enc), enc)``: the float32 values a Q/DQ pair lets through."""
    return dequantize(quantize(x, enc), enc)


def merge_ranges(items: Iterable[Encoding | tuple[Any, Any]]) -> tuple[float, float]:
    """The smallest range covering every item: ``(min of mins, max of maxes)`` as Python floats.

    Items are encodings (their recorded ``tmin``/``tmax``; per-channel ones contribute all channels) or
    ``(min, max)`` pairs of numbers or arrays. Used to build one shared ("unified") encoding for tensors
    that must use the same scale and zero point.
    """
    lows: list[float] = []
    highs: list[float] = []
    for item in items:
        if isinstance(item, Encoding):
            lo, hi = item.tmin, item.tmax
        else:
            try:
                lo, hi = item
            except (TypeError, ValueError):
                raise QuadcError(f"merge_ranges takes encodings or (min, max) pairs, got {item!r}") from None
        lo_arr = _float_array(lo, "range minimum")
        hi_arr = _float_array(hi, "range maximum")
        if lo_arr.size == 0 or hi_arr.size == 0:
            raise QuadcError("merge_ranges got an empty range; pass ranges with at least one value")
        lows.append(float(lo_arr.min()))
        highs.append(float(hi_arr.max()))
    if not lows:
        raise QuadcError("merge_ranges needs at least one range; calibrate at least one tensor first")
    lo_all, hi_all = min(lows), max(highs)
    if not (math.isfinite(lo_all) and math.isfinite(hi_all)):
        raise QuadcError(
            f"merged range [{lo_all}, {hi_all}] is not finite; calibrate on data without NaN or inf"
        )
    return lo_all, hi_all


def sqnr_db(ref: Any, test: Any) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum(ref^2) / sum((ref - test)^2))`` in dB (float64).

    ``inf`` when ``test`` equals ``ref`` exactly (including both all-zero); ``-inf`` when ``ref`` is all zero
    but ``test`` is not.
    """
    r = np.asarray(ref, dtype=np.float64)
    t = np.asarray(test, dtype=np.float64)
    if r.shape != t.shape:
        raise QuadcError(f"sqnr_db needs arrays of one shape, got {r.shape} and {t.shape}")
    return sqnr_db_from_sums(float(np.sum(np.square(r))), float(np.sum(np.square(r - t))))


def sqnr_db_from_sums(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` in dB from the sums of squares ``signal = sum(ref^2)`` and
    ``noise = sum((ref - test)^2)``, for SQNRs accumulated over many runs; ``inf`` when ``noise`` is 0,
    ``-inf`` when only ``signal`` is 0 (as :func:`sqnr_db`)."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
