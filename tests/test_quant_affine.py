"""quadc.quant.affine: bit-exactness against onnxruntime's QuantizeLinear/DequantizeLinear, and range math."""

from __future__ import annotations

import functools
import math
import platform

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from quadc.errors import QuadcError
from quadc.quant import (
    MIN_SCALE,
    Encoding,
    QType,
    compute_encoding,
    dequantize,
    encoding_from_tensor,
    fake_quant,
    merge_ranges,
    quantize,
    sqnr_db,
)

ALL_QTYPES = list(QType)


@functools.cache
def _session(op: str, onnx_type: int, opset: int, axis: int | None) -> ort.InferenceSession:
    """A one-node QuantizeLinear or DequantizeLinear model with x, scale and zero point as inputs."""
    float_t, int_t = TensorProto.FLOAT, onnx_type
    in_t, out_t = (float_t, int_t) if op == "QuantizeLinear" else (int_t, float_t)
    inputs = [
        helper.make_tensor_value_info("x", in_t, None),
        helper.make_tensor_value_info("s", float_t, None),
        helper.make_tensor_value_info("z", int_t, None),
    ]
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node(op, ["x", "s", "z"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", out_t, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _ort_quantize(x: np.ndarray, enc: Encoding, opset: int = 21) -> np.ndarray:
    sess = _session("QuantizeLinear", enc.qtype.onnx_type, opset, enc.axis)
    return sess.run(None, {"x": x.astype(np.float32), "s": enc.scale, "z": enc.zero_point})[0]


def _ort_dequantize(q: np.ndarray, enc: Encoding, opset: int = 21) -> np.ndarray:
    sess = _session("DequantizeLinear", enc.qtype.onnx_type, opset, enc.axis)
    return sess.run(None, {"x": q, "s": enc.scale, "z": enc.zero_point})[0]


def _random_encoding(rng: np.random.Generator, qtype: QType, channels: int | None = None) -> Encoding:
    """An encoding with a random float32 scale (10^-5 .. 10^2) and a random in-range zero point."""
    n = 1 if channels is None else channels
    scale = (rng.uniform(1.0, 10.0, n) * 10.0 ** rng.integers(-6, 2, n)).astype(np.float32)
    zp = rng.integers(qtype.qmin, qtype.qmax + 1, n)
    if channels is None:
        return Encoding(scale=scale[0], zero_point=zp[0], qtype=qtype)
    return Encoding(scale=scale, zero_point=zp, qtype=qtype, axis=1)


def _hard_values(rng: np.random.Generator, enc: Encoding, shape: tuple[int, ...]) -> np.ndarray:
    """Exact ties (k + 0.5) * scale and their float neighbours, plus in- and out-of-range noise."""
    scale = enc.scale if enc.axis is None else enc.scale.reshape([1, -1] + [1] * (len(shape) - 2))
    span = enc.qtype.qmax - enc.qtype.qmin
    k = rng.integers(-span - 50, span + 50, shape).astype(np.float32)
    ties = ((k + np.float32(0.5)) * scale).astype(np.float32)
    kinds = rng.integers(0, 5, shape)
    x = np.where(kinds == 1, np.nextafter(ties, np.float32(np.inf)), ties)
    x = np.where(kinds == 2, np.nextafter(ties, np.float32(-np.inf)), x)
    x = np.where(kinds == 3, (rng.standard_normal(shape) * span * 0.7 * scale).astype(np.float32), x)
    x = np.where(kinds == 4, (rng.standard_normal(shape) * span * 5 * scale).astype(np.float32), x)
    return x.astype(np.float32)


SPECIALS = np.array(
    [0.0, -0.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.5, -128.5, 255.5, 32767.5, 65535.5, 1e30, -1e30, 3.4e38,
     -3.4e38, np.inf, -np.inf, 1e-45, -1e-45, 1e-38],
    dtype=np.float32,
)  # fmt: skip


@pytest.mark.parametrize("qtype", ALL_QTYPES, ids=str)
def test_quantize_matches_ort_per_tensor(qtype):
    rng = np.random.default_rng(qtype.bits * 10 + qtype.signed)
    for _ in range(12):
        enc = _random_encoding(rng, qtype)
        with np.errstate(over="ignore"):
            x = np.concatenate([_hard_values(rng, enc, (3000,)), SPECIALS * enc.scale, SPECIALS])
        q = quantize(x, enc)
        assert q.dtype == qtype.np_dtype
        assert np.array_equal(q, _ort_quantize(x, enc))


@pytest.mark.parametrize("qtype", ALL_QTYPES, ids=str)
def test_quantize_matches_ort_per_channel(qtype):
    rng = np.random.default_rng(100 + qtype.bits + qtype.signed)
    for _ in range(6):
        enc = _random_encoding(rng, qtype, channels=5)
        x = _hard_values(rng, enc, (4, 5, 37))
        assert np.array_equal(quantize(x, enc), _ort_quantize(x, enc))
        q = rng.integers(qtype.qmin, qtype.qmax + 1, (4, 5, 37)).astype(qtype.np_dtype)
        assert np.array_equal(dequantize(q, enc), _ort_dequantize(q, enc))


@pytest.mark.parametrize("qtype", [QType.INT8, QType.UINT8], ids=str)
def test_8bit_matches_opset13(qtype):
    rng = np.random.default_rng(7)
    for channels in (None, 3):
        enc = _random_encoding(rng, qtype, channels)
        x = _hard_values(rng, enc, (2, 3, 50))
        assert np.array_equal(quantize(x, enc), _ort_quantize(x, enc, opset=13))
        q = quantize(x, enc)
        assert np.array_equal(dequantize(q, enc), _ort_dequantize(q, enc, opset=13))


@pytest.mark.parametrize("qtype", ALL_QTYPES, ids=str)
def test_dequantize_matches_ort(qtype):
    rng = np.random.default_rng(200 + qtype.bits + qtype.signed)
    for _ in range(12):
        enc = _random_encoding(rng, qtype)
        q = rng.integers(qtype.qmin, qtype.qmax + 1, 5000).astype(qtype.np_dtype)
        q[:2] = qtype.qmin, qtype.qmax
        y = dequantize(q, enc)
        assert y.dtype == np.float32
        assert np.array_equal(y, _ort_dequantize(q, enc))


def test_round_half_to_even_and_saturation():
    enc = Encoding(scale=1.0, zero_point=0, qtype=QType.INT8)
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -128.5, 1e9, -np.inf], np.float32)
    assert quantize(x, enc).tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -128, 127, -128]
    # ORT divides by the scale: multiplying by the float32 reciprocal would round 3 * 0.1 differently.
    enc = Encoding(scale=np.float32(0.1), zero_point=0, qtype=QType.INT16)
    x = np.float32(3) * np.float32(0.1)
    assert quantize(x, enc) == np.rint(np.float32(x) / np.float32(0.1))


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="NaN result is ORT's x86 behaviour"
)
@pytest.mark.parametrize("qtype", ALL_QTYPES, ids=str)
def test_nan_matches_ort(qtype):
    for zp in (qtype.qmin, qtype.midpoint, qtype.qmax):
        enc = Encoding(scale=0.25, zero_point=zp, qtype=qtype)
        x = np.linspace(-10, 10, 41).astype(np.float32)
        x[::3] = np.nan
        q = quantize(x, enc)
        assert np.array_equal(q, _ort_quantize(x, enc))
        assert np.all(q[::3] == qtype.qmin)


def test_quantize_scalar_and_float64_input():
    enc = compute_encoding(-1.0, 1.0, QType.UINT8)
    assert quantize(0.0, enc).shape == ()
    x64 = np.array([0.1234567891234, -0.5], dtype=np.float64)
    assert np.array_equal(quantize(x64, enc), _ort_quantize(x64.astype(np.float32), enc))


@pytest.mark.parametrize("qtype", ALL_QTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_zero_exactly_representable(qtype, symmetric):
    rng = np.random.default_rng(300 + qtype.bits + qtype.signed + 2 * symmetric)
    lo = -np.abs(rng.standard_normal(200)) * 10.0 ** rng.integers(-4, 4, 200)
    hi = np.abs(rng.standard_normal(200)) * 10.0 ** rng.integers(-4, 4, 200)
    lo[:20], hi[20:40] = 0.0, 0.0  # one-sided ranges
    lo[40:60] = rng.uniform(0.1, 5, 20)  # ranges that do not contain zero get widened
    hi[40:60] = lo[40:60] + 1.0
    for a, b in zip(lo, hi, strict=True):
        enc = compute_encoding(a, b, qtype, symmetric=symmetric)
        zero = np.array([0.0, -0.0], np.float32)
        assert np.array_equal(fake_quant(zero, enc), np.zeros(2, np.float32))
        assert quantize(zero, enc).tolist() == [int(enc.zero_point)] * 2
        assert enc.grid_min <= 0.0 <= enc.grid_max
    pc = compute_encoding(lo, hi, qtype, symmetric=symmetric, axis=0)
    assert np.all(fake_quant(np.zeros((200, 3), np.float32), pc) == 0.0)


@pytest.mark.parametrize("qtype", ALL_QTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_error_at_most_half_a_step_inside_range(qtype, symmetric):
    rng = np.random.default_rng(400 + qtype.bits + qtype.signed + 2 * symmetric)
    for _ in range(100):
        a, b = np.sort(rng.standard_normal(2) * 10.0 ** rng.integers(-3, 3))
        enc = compute_encoding(a, b, qtype, symmetric=symmetric)
        lo, hi = min(a, 0.0), max(b, 0.0)
        if symmetric:
            lo, hi = -max(-lo, hi), max(-lo, hi)
        x = np.concatenate([rng.uniform(lo, hi, 2000), [lo, hi]]).astype(np.float32)
        x = np.clip(x, np.float32(lo), np.float32(hi))
        err = np.abs(fake_quant(x, enc).astype(np.float64) - x.astype(np.float64))
        step = float(enc.scale)
        # Half a step, plus float32 rounding (2^-24 relative) of the scale, of x and of the dequantized
        # product, each at most (qmax - qmin) steps wide: about 0.01 step at 16 bits, 5e-5 at 8 bits.
        slack = 3 * (qtype.qmax - qtype.qmin) * 2.0**-24
        assert err.max() <= step * (0.5 + slack), (enc, err.max() / step)


def test_compute_encoding_formulas():
    enc = compute_encoding(-1.0, 3.0, QType.UINT8)
    assert enc.scale == np.float32(4.0 / 255)
    assert int(enc.zero_point) == round(0 - (-1.0) / float(np.float32(4.0 / 255)))
    assert enc.tmin == np.float32(-1.0) and enc.tmax == np.float32(3.0)
    enc = compute_encoding(-1.0, 3.0, QType.INT8, symmetric=True)
    assert enc.scale == np.float32(6.0 / 255) and int(enc.zero_point) == 0 and enc.symmetric
    enc = compute_encoding(-1.0, 3.0, QType.UINT16, symmetric=True)
    assert enc.scale == np.float32(6.0 / 65535) and int(enc.zero_point) == 32768
    assert int(compute_encoding(-1.0, 3.0, QType.UINT8, symmetric=True).zero_point) == 128
    # A positive-only range is widened to include zero: zero point at qmin.
    enc = compute_encoding(2.0, 5.0, QType.INT16)
    assert int(enc.zero_point) == -32768 and enc.scale == np.float32(5.0 / 65535)
    enc = compute_encoding(-5.0, -2.0, QType.UINT8)
    assert int(enc.zero_point) == 255


@pytest.mark.parametrize("qtype", ALL_QTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_degenerate_ranges(qtype, symmetric):
    with np.errstate(all="raise"):
        enc = compute_encoding(0.0, 0.0, qtype, symmetric=symmetric)
    assert enc.scale == np.float32(1.0)
    assert fake_quant(np.float32(0.0), enc) == 0.0
    tiny = compute_encoding(0.0, 1e-42, qtype, symmetric=symmetric)
    assert float(tiny.scale) == MIN_SCALE
    pc = compute_encoding([0.0, -1.0], [0.0, 1.0], qtype, symmetric=symmetric, axis=0)
    assert pc.scale[0] == np.float32(1.0) and np.isfinite(pc.scale).all()


def test_compute_encoding_rejects_bad_ranges():
    with pytest.raises(QuadcError, match="exceeds maximum"):
        compute_encoding(1.0, -1.0, QType.UINT8)
    with pytest.raises(QuadcError, match="not finite"):
        compute_encoding(0.0, np.inf, QType.UINT8)
    with pytest.raises(QuadcError, match="per-tensor range"):
        compute_encoding([0.0, 1.0], [1.0, 2.0], QType.UINT8)
    with pytest.raises(QuadcError, match="per-channel range"):
        compute_encoding([[0.0]], [[1.0]], QType.UINT8, axis=0)
    with pytest.raises(QuadcError, match="unknown quantized type"):
        compute_encoding(0.0, 1.0, "int4")


def test_encoding_from_tensor_per_channel():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    enc = encoding_from_tensor(w, QType.INT8, symmetric=True, axis=0)
    assert enc.axis == 0 and enc.num_channels == 6
    assert np.array_equal(enc.tmin, w.reshape(6, -1).min(axis=1))
    assert np.array_equal(enc.tmax, w.reshape(6, -1).max(axis=1))
    last = encoding_from_tensor(w, "uint8", axis=-1)
    assert last.num_channels == 3 and last.axis == -1
    assert np.array_equal(quantize(w, last), _ort_quantize(w, last))
    per_tensor = encoding_from_tensor(w, QType.UINT16)
    assert per_tensor.tmin == w.min() and per_tensor.tmax == w.max()
    assert sqnr_db(w, fake_quant(w, per_tensor)) > 70
    with pytest.raises(QuadcError, match="NaN or inf"):
        encoding_from_tensor(np.array([1.0, np.nan]), QType.UINT8)
    with pytest.raises(QuadcError, match="empty"):
        encoding_from_tensor(np.zeros((0,)), QType.UINT8)
    with pytest.raises(QuadcError, match="channels along axis"):
        quantize(np.zeros((5, 4)), enc)


def test_negative_axis_matches_ort():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((2, 3, 4)).astype(np.float32)
    enc = encoding_from_tensor(w, QType.INT16, axis=-1)
    assert np.array_equal(quantize(w, enc), _ort_quantize(w, enc))


def test_encoding_validation_and_equality():
    a = compute_encoding(-1.0, 2.0, QType.UINT16)
    b = Encoding.from_dict(a.to_dict())
    assert a == b and np.array_equal(a.tmin, b.tmin)
    assert a != compute_encoding(-1.0, 2.0, QType.INT16)
    assert a != Encoding(scale=a.scale, zero_point=int(a.zero_point) + 1, qtype=QType.UINT16)
    same_grid = Encoding(scale=a.scale, zero_point=a.zero_point, qtype=QType.UINT16, tmin=-5.0, tmax=5.0)
    assert same_grid == a  # the recorded range is informational
    with pytest.raises(QuadcError, match="finite and positive"):
        Encoding(scale=0.0, zero_point=0, qtype=QType.UINT8)
    with pytest.raises(QuadcError, match="outside the uint8 range"):
        Encoding(scale=1.0, zero_point=256, qtype=QType.UINT8)
    with pytest.raises(QuadcError, match="symmetric int8 encoding needs zero point 0"):
        Encoding(scale=1.0, zero_point=3, qtype=QType.INT8, symmetric=True)
    with pytest.raises(QuadcError, match="per-tensor encoding needs one scale"):
        Encoding(scale=[1.0, 2.0], zero_point=[0, 0], qtype=QType.INT8)
    with pytest.raises(QuadcError, match="1-D scale"):
        Encoding(scale=[1.0, 2.0], zero_point=[0], qtype=QType.INT8, axis=0)
    with pytest.raises(QuadcError, match="dequantize needs integer"):
        dequantize(np.zeros(3, np.float32), a)


def test_qtype_properties():
    assert [(q.qmin, q.qmax, q.bits, q.signed) for q in QType] == [
        (-128, 127, 8, True),
        (0, 255, 8, False),
        (-32768, 32767, 16, True),
        (0, 65535, 16, False),
    ]
    assert QType.UINT16.onnx_type == TensorProto.UINT16 and QType.from_onnx(TensorProto.INT8) is QType.INT8
    assert QType.from_bits(16, signed=False) is QType.UINT16 and QType.parse("INT16") is QType.INT16
    assert QType.UINT8.midpoint == 128 and QType.INT16.midpoint == 0
    with pytest.raises(QuadcError):
        QType.from_onnx(TensorProto.FLOAT)


def test_merge_ranges_and_sqnr():
    a = compute_encoding(-1.0, 0.5, QType.UINT16)
    b = compute_encoding([-0.2, -3.0], [0.1, 0.2], QType.INT8, symmetric=True, axis=0)
    assert merge_ranges([a, b, (0.0, 7.5), (np.array([-2.0, 1.0]), np.array([3.0, 4.0]))]) == (-3.0, 7.5)
    with pytest.raises(QuadcError, match="at least one"):
        merge_ranges([])
    with pytest.raises(QuadcError, match="pairs"):
        merge_ranges([1.0])
    ref = np.array([1.0, -2.0, 3.0])
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(np.zeros(3), np.zeros(3)) == math.inf
    assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    assert sqnr_db(ref, ref + np.array([0.1, 0.0, 0.0])) == pytest.approx(10 * math.log10(14 / 0.01))
    with pytest.raises(QuadcError, match="one shape"):
        sqnr_db(ref, ref[:2])
