"""The LiteRT int8 kernel facts the TFLite targets' 8-bit activations rely on (``a8_fraction``, w8a8).

Each case is a one-op model written with quadc's TFLite writer, run in LiteRT's interpreter and compared
with numpy. 8-bit activations are int8 **asymmetric** (a non-zero zero point) between int8x8 kernels; a
QUANTIZE op converts int16 <-> int8 at the boundary to a 16x8 kernel. What the converter relies on:

- every op the 16x8 path uses has an int8 kernel that takes non-zero activation zero points, with int8
  symmetric per-channel weights, int32 biases and int8 zero-point-0 LoRA factors (runtime weights);
- SOFTMAX's int8 output needs scale 1/256 and zero point -128 (anything else fails to load); LOGISTIC and
  TANH take any int8 output encoding (unlike their int16 kernels);
- QUANTIZE converts int16 -> int8 and int8 -> int16 (requantizing, any zero point on the int8 side);
- CONCATENATION int8 with one scale and zero point for every input and the output (quadc shares them).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from ai_edge_litert import schema_py_generated as S  # noqa: E402
from test_tflite_kernels import _gelu, _run, _sigmoid, _softmax, _sqnr  # noqa: E402  (the same numpy references as the 16x8 kernels)

from quadc.targets.tflite.writer import Quant, TfliteWriter  # noqa: E402

RNG = np.random.default_rng(8)
X4 = (RNG.standard_normal((1, 4, 4, 8)) * 2 + 1).astype(np.float32)  # off-centre: a non-zero zero point


def _enc8(x: np.ndarray) -> tuple[float, int]:
    """int8 asymmetric (scale, zero point) of x's range (zero included)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255
    return scale, int(np.clip(np.rint(-128 - lo / scale), -128, 127))


def _q8(x: np.ndarray, enc: tuple[float, int]) -> np.ndarray:
    return np.clip(np.rint(x / enc[0]) + enc[1], -128, 127).astype(np.int8)


def _dq(q: np.ndarray, enc: tuple[float, int]) -> np.ndarray:
    return (q.astype(np.float64) - enc[1]) * enc[0]


def _op8(op: str, xs: list[np.ndarray], y: np.ndarray, options=None, extra=(), out_enc=None) -> float:
    """SQNR of int8 ``op`` on the activations ``xs`` (then the constants ``extra``) against ``y``."""
    w = TfliteWriter()
    encs = [_enc8(x) for x in xs]
    ins = [w.tensor(f"x{i}", x.shape, "int8", quant=Quant.per_tensor(*e)) for i, (x, e) in enumerate(zip(xs, encs, strict=True))]
    consts = [w.constant(f"c{i}", c) for i, c in enumerate(extra)]
    ye = out_enc or _enc8(y)
    out = w.tensor("y", y.shape, "int8", quant=Quant.per_tensor(*ye))
    w.op(op, ins + consts if op != "SPLIT" else consts + ins, [out], options)
    w.set_io(ins, [out])
    got = _run(w, {f"x{i}": _q8(x, e) for i, (x, e) in enumerate(zip(xs, encs, strict=True))})[0]
    return _sqnr(y, _dq(got, ye))


def _opts(cls, **fields):
    o = cls()
    for k, v in fields.items():
        setattr(o, k, v)
    return o


# ------------------------------------------------------------------------------------- int8 kernels
@pytest.mark.parametrize("op,fn,out_enc,options", [
    ("LOGISTIC", _sigmoid, None, None),
    ("SOFTMAX", _softmax, (1 / 256, -128), "softmax"),
    ("TANH", np.tanh, None, None),
    ("GELU", _gelu, None, "gelu"),
    ("RELU", lambda x: np.maximum(x, 0), None, None),
])
def test_int8_activation_kernels_take_a_zero_point(op, fn, out_enc, options):
    opts = {"softmax": _opts(S.SoftmaxOptionsT, beta=1.0), "gelu": S.GeluOptionsT(), None: None}[options]
    assert _op8(op, [X4], fn(X4), opts, out_enc=out_enc) > 30


def test_int8_rsqrt():
    x = RNG.uniform(0.1, 4, (1, 4, 4, 8)).astype(np.float32)
    assert _op8("RSQRT", [x], 1 / np.sqrt(x)) > 25


@pytest.mark.parametrize("op,fn,shape_b,options", [
    ("ADD", np.add, (1, 1, 1, 8), "add"),
    ("SUB", np.subtract, (1, 4, 4, 1), "sub"),
    ("MUL", np.multiply, (1, 4, 4, 1), "mul"),
    ("BATCH_MATMUL", lambda a, b: a @ b, (1, 4, 8, 6), "bmm"),
    ("DIV", np.divide, (1, 4, 4, 8), "div"),
])
def test_int8_binary_kernels_take_zero_points(op, fn, shape_b, options):
    b = (RNG.uniform(1, 3, shape_b) if op == "DIV" else RNG.standard_normal(shape_b) + 0.5).astype(np.float32)
    opts = {"add": S.AddOptionsT(), "sub": S.SubOptionsT(), "mul": S.MulOptionsT(),
            "bmm": S.BatchMatMulOptionsT(), "div": S.DivOptionsT()}[options]
    assert _op8(op, [X4, b], fn(X4, b), opts) > 30


def test_int8_data_kernels():
    i32 = lambda v: np.array(v, np.int32)  # noqa: E731
    assert _op8("MEAN", [X4], X4.mean(axis=(1, 2), keepdims=True), _opts(S.ReducerOptionsT, keepDims=True),
                [i32([1, 2])]) > 30
    enc = _enc8(X4)
    same = {"out_enc": enc}
    assert _op8("TRANSPOSE", [X4], X4.transpose(0, 3, 1, 2), S.TransposeOptionsT(), [i32([0, 3, 1, 2])], **same) > 30
    assert _op8("RESHAPE", [X4], X4.reshape(1, 16, 8), _opts(S.ReshapeOptionsT, newShape=[1, 16, 8]),
                [i32([1, 16, 8])], **same) > 30
    assert _op8("PAD", [X4], np.pad(X4, [(0, 0), (1, 0), (1, 1), (0, 0)]), S.PadOptionsT(),
                [i32([[0, 0], [1, 0], [1, 1], [0, 0]])], **same) > 30  # pads with the zero point: real 0
    assert _op8("STRIDED_SLICE", [X4], X4[:, :, :, 4:8], S.StridedSliceOptionsT(),
                [i32([0, 0, 0, 4]), i32([1, 4, 4, 8]), i32([1, 1, 1, 1])], **same) > 30
    assert _op8("RESIZE_NEAREST_NEIGHBOR", [X4], X4.repeat(2, 1).repeat(2, 2), S.ResizeNearestNeighborOptionsT(),
                [i32([8, 8])], **same) > 30


def test_int8_split_and_transposed_batch_matmul():
    enc = _enc8(X4)
    w = TfliteWriter()
    a = w.tensor("x", X4.shape, "int8", quant=Quant.per_tensor(*enc))
    outs = [w.tensor(f"y{i}", (1, 4, 4, 4), "int8", quant=Quant.per_tensor(*enc)) for i in range(2)]
    w.op("SPLIT", [w.constant("axis", np.array(3, np.int32)), a], outs, _opts(S.SplitOptionsT, numSplits=2))
    w.set_io([a], outs)
    got = _run(w, {"x": _q8(X4, enc)})
    for want, g in zip(np.split(X4, 2, axis=3), got, strict=True):
        assert _sqnr(want, _dq(g, enc)) > 30
    # BATCH_MATMUL with adjY (the right operand stored transposed), both int8 with zero points
    b = (RNG.standard_normal((1, 4, 6, 8)) + 0.5).astype(np.float32)
    assert _op8("BATCH_MATMUL", [X4, b], X4 @ b.transpose(0, 1, 3, 2), _opts(S.BatchMatMulOptionsT, adjY=True)) > 30


def test_int8_concatenation_with_one_encoding():
    z = (RNG.standard_normal((1, 4, 4, 8)) * 3).astype(np.float32)
    y = np.concatenate([X4, z], -1)
    enc = _enc8(y)
    w = TfliteWriter()
    a = w.tensor("a", X4.shape, "int8", quant=Quant.per_tensor(*enc))
    b = w.tensor("b", z.shape, "int8", quant=Quant.per_tensor(*enc))
    c = w.tensor("y", y.shape, "int8", quant=Quant.per_tensor(*enc))
    w.op("CONCATENATION", [a, b], [c], _opts(S.ConcatenationOptionsT, axis=3))
    w.set_io([a, b], [c])
    got = _run(w, {"a": _q8(X4, enc), "b": _q8(z, enc)})[0]
    assert _sqnr(y, _dq(got, enc)) > 30


def _weighted(op: str, runtime: bool, bias_type: int | None = S.TensorType.INT32) -> float:
    """CONV_2D (3x3 SAME) or FULLY_CONNECTED on an int8 zp != 0 input, int8 symmetric weights (per channel as
    constants, per tensor as a runtime LoRA-like input), int32 bias."""
    x = X4
    if op == "CONV_2D":
        wt = (RNG.standard_normal((5, 3, 3, 8)) * 0.3).astype(np.float32)
        xp = np.pad(x.astype(np.float64), [(0, 0), (1, 1), (1, 1), (0, 0)])
        y = np.zeros((1, 4, 4, 5))
        for i in range(4):
            for j in range(4):
                y[0, i, j] = np.tensordot(wt, xp[0, i:i + 3, j:j + 3], axes=([1, 2, 3], [0, 1, 2]))
        axes = (1, 2, 3)
    else:
        wt = (RNG.standard_normal((5, 8)) * 0.3).astype(np.float32)
        y = x.astype(np.float64) @ wt.T
        axes = (1,)
    bv = (RNG.standard_normal(5) * 0.5).astype(np.float32)
    y = y + bv
    xe, ye = _enc8(x), _enc8(y)
    sw = np.full(5, np.abs(wt).max() / 127) if runtime else np.abs(wt).max(axes) / 127
    wq = np.clip(np.rint(wt / sw.reshape((-1,) + (1,) * len(axes))), -127, 127).astype(np.int8)
    w = TfliteWriter()
    a = w.tensor("x", x.shape, "int8", quant=Quant.per_tensor(*xe))
    if runtime:
        b = w.tensor("w", wt.shape, "int8", quant=Quant.per_tensor(float(sw[0])))
    else:
        b = w.constant("w", wq, quant=Quant.per_channel(sw, 0))
    bs = xe[0] * sw
    bias = w.constant("b", np.rint(bv / bs).astype(np.int32), quant=Quant.per_channel(bs, 0))
    c = w.tensor("y", y.shape, "int8", quant=Quant.per_tensor(*ye))
    if op == "CONV_2D":
        o = _opts(S.Conv2DOptionsT, padding=S.Padding.SAME, strideH=1, strideW=1)
    else:
        o = _opts(S.FullyConnectedOptionsT, keepNumDims=True)
    if bias_type is not None:
        o.quantizedBiasType = bias_type
    w.op(op, [a, b, bias], [c], o)
    w.set_io([a, b] if runtime else [a], [c])
    return _sqnr(y, _dq(_run(w, {"x": _q8(x, xe), "w": wq})[0], ye))


@pytest.mark.parametrize("op", ["CONV_2D", "FULLY_CONNECTED"])
@pytest.mark.parametrize("runtime", [False, True], ids=["constant-per-channel", "runtime-int8-zp0"])
def test_int8_weighted_kernels(op, runtime):
    assert _weighted(op, runtime) > 30
    assert _weighted(op, runtime, bias_type=None) > 30  # the int8 kernels read int32 biases either way


def _quantize(src: str, dst: str) -> float:
    """QUANTIZE from ``src`` to ``dst`` (int16 symmetric, int8 asymmetric) on X4."""
    e16 = (float(np.abs(X4).max()) / 32767, 0)
    e8 = _enc8(X4)
    encs = {"int16": e16, "int8": e8}
    w = TfliteWriter()
    a = w.tensor("x", X4.shape, src, quant=Quant.per_tensor(*encs[src]))
    b = w.tensor("y", X4.shape, dst, quant=Quant.per_tensor(*encs[dst]))
    w.op("QUANTIZE", [a], [b])
    w.set_io([a], [b])
    q = np.clip(np.rint(X4 / e16[0]), -32768, 32767).astype(np.int16) if src == "int16" else _q8(X4, e8)
    return _sqnr(X4, _dq(_run(w, {"x": q})[0], encs[dst]))


@pytest.mark.parametrize("src,dst", [("int16", "int8"), ("int8", "int16")])
def test_quantize_converts_between_int16_and_int8(src, dst):
    assert _quantize(src, dst) > 35


@pytest.mark.parametrize("out_enc", [(1 / 200, -128), (1 / 256, 0)])
def test_int8_softmax_output_encoding_is_fixed(out_enc):
    """SOFTMAX refuses (at load, never silently) an int8 output other than scale 1/256, zero point -128."""
    with pytest.raises(RuntimeError, match="SOFTMAX"):
        _op8("SOFTMAX", [X4], _softmax(X4), _opts(S.SoftmaxOptionsT, beta=1.0), out_enc=out_enc)
