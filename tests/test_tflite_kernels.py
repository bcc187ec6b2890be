"""The LiteRT 16x8 kernel facts the TFLite targets rely on, each measured on a tiny model written with
quadc's TFLite writer and run in LiteRT's interpreter (numpy computes the expected values).

The graphs quadc writes must avoid every silently wrong case shown here; ``test_tflite_targets.py``
checks that they do.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from ai_edge_litert import schema_py_generated as S  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from quadc.targets.tflite.writer import Quant, TfliteWriter  # noqa: E402

RNG = np.random.default_rng(0)


def _scale(x: np.ndarray) -> float:
    return float(np.abs(x).max()) / 32767


def _q16(x: np.ndarray, s: float, zp: int = 0) -> np.ndarray:
    return np.clip(np.rint(x / s) + zp, -32768, 32767).astype(np.int16)


def _run(w: TfliteWriter, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    it = Interpreter(model_content=w.to_bytes())
    it.allocate_tensors()
    for d in it.get_input_details():
        it.set_tensor(d["index"], feeds[d["name"]])
    it.invoke()
    return [it.get_tensor(d["index"]) for d in it.get_output_details()]


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / max(((ref - got) ** 2).sum(), 1e-30)))


def _unary(op: str, fn, x: np.ndarray, out_scale: float | None = None, options=None, dtype: str = "int16"):
    y = fn(x)
    sx, sy = _scale(x), out_scale or _scale(y)
    w = TfliteWriter()
    a = w.tensor("x", x.shape, dtype, quant=Quant.per_tensor(sx))
    b = w.tensor("y", y.shape, dtype, quant=Quant.per_tensor(sy))
    w.op(op, [a], [b], options)
    w.set_io([a], [b])
    return _sqnr(y, _run(w, {"x": _q16(x, sx)})[0].astype(np.float64) * sy)


def _binary(op: str, fn, shapes=((1, 4, 4, 8), (1, 4, 4, 8)), options=None, shift: float = 0.0):
    x = RNG.standard_normal(shapes[0]).astype(np.float32)
    z = RNG.standard_normal(shapes[1]).astype(np.float32) + shift
    y = fn(x, z)
    w = TfliteWriter()
    a = w.tensor("x", x.shape, "int16", quant=Quant.per_tensor(_scale(x)))
    b = w.tensor("z", z.shape, "int16", quant=Quant.per_tensor(_scale(z)))
    c = w.tensor("y", y.shape, "int16", quant=Quant.per_tensor(_scale(y)))
    w.op(op, [a, b], [c], options)
    w.set_io([a, b], [c])
    got = _run(w, {"x": _q16(x, _scale(x)), "z": _q16(z, _scale(z))})[0]
    return _sqnr(y, got.astype(np.float64) * _scale(y))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _softmax_opts():
    o = S.SoftmaxOptionsT()
    o.beta = 1.0
    return o


def _add_opts():
    o = S.AddOptionsT()
    o.potScaleInt16 = False
    return o


def _sub_opts():
    o = S.SubOptionsT()
    o.potScaleInt16 = False
    return o


X4 = RNG.standard_normal((1, 4, 4, 8)).astype(np.float32) * 2


# ------------------------------------------------------------------------------------ kernels that work
@pytest.mark.parametrize("op,fn,scale,opts", [
    ("LOGISTIC", _sigmoid, 1 / 32768, None),
    ("TANH", np.tanh, 1 / 32768, None),
    ("SOFTMAX", _softmax, 1 / 32768, "softmax"),
    ("GELU", _gelu, None, "gelu"),
])
def test_int16_activation_kernels(op, fn, scale, opts):
    options = {"softmax": _softmax_opts(), "gelu": S.GeluOptionsT(), None: None}[opts]
    assert _unary(op, fn, X4, scale, options) > 60


def test_int16_rsqrt():
    x = RNG.uniform(0.1, 4, (1, 4, 4, 8)).astype(np.float32)
    assert _unary("RSQRT", lambda v: 1 / np.sqrt(v), x) > 50


@pytest.mark.parametrize("op,fn,shapes,opts,shift", [
    ("ADD", np.add, ((1, 4, 4, 8), (1, 1, 1, 8)), "add", 0.0),
    ("SUB", np.subtract, ((1, 4, 4, 8), (1, 4, 4, 1)), "sub", 0.0),
    ("MUL", np.multiply, ((1, 4, 4, 8), (1, 4, 4, 1)), "mul", 0.0),
    ("DIV", np.divide, ((1, 4, 4, 8), (1, 4, 4, 8)), "div", 3.0),
    ("BATCH_MATMUL", np.matmul, ((1, 2, 8, 16), (1, 2, 16, 8)), "bmm", 0.0),
])
def test_int16_binary_kernels(op, fn, shapes, opts, shift):
    options = {"add": _add_opts(), "sub": _sub_opts(), "mul": S.MulOptionsT(), "div": S.DivOptionsT(),
               "bmm": S.BatchMatMulOptionsT()}[opts]
    assert _binary(op, fn, shapes, options, shift) > 60


def _shape_op(op, fn, extra, options=None):
    ys = fn(X4)
    ys = ys if isinstance(ys, list) else [ys]
    s = _scale(X4)
    w = TfliteWriter()
    a = w.tensor("x", X4.shape, "int16", quant=Quant.per_tensor(s))
    ins = [a if isinstance(e, str) else w.constant(f"c{i}", e) for i, e in enumerate(extra)]
    outs = [w.tensor(f"y{i}", y.shape, "int16", quant=Quant.per_tensor(s)) for i, y in enumerate(ys)]
    w.op(op, ins, outs, options)
    w.set_io([a], outs)
    got = _run(w, {"x": _q16(X4, s)})
    return min(_sqnr(y, g.astype(np.float64) * s) for y, g in zip(ys, got, strict=True))


def _mean_opts():
    o = S.ReducerOptionsT()
    o.keepDims = True
    return o


def _split_opts():
    o = S.SplitOptionsT()
    o.numSplits = 2
    return o


def _reshape_opts():
    o = S.ReshapeOptionsT()
    o.newShape = [1, 16, 8]
    return o


@pytest.mark.parametrize("case", ["MEAN", "RESHAPE", "TRANSPOSE", "PAD", "STRIDED_SLICE", "SPLIT",
                                  "RESIZE_NEAREST_NEIGHBOR"])
def test_int16_shape_and_data_kernels(case):
    i32 = lambda v: np.array(v, np.int32)  # noqa: E731
    table = {
        "MEAN": (lambda x: x.mean(axis=(1, 2), keepdims=True), ["x", i32([1, 2])], _mean_opts()),
        "RESHAPE": (lambda x: x.reshape(1, 16, 8), ["x", i32([1, 16, 8])], _reshape_opts()),
        "TRANSPOSE": (lambda x: x.transpose(0, 3, 1, 2), ["x", i32([0, 3, 1, 2])], S.TransposeOptionsT()),
        "PAD": (lambda x: np.pad(x, [(0, 0), (1, 0), (1, 1), (0, 0)]), ["x", i32([[0, 0], [1, 0], [1, 1], [0, 0]])],
                S.PadOptionsT()),
        "STRIDED_SLICE": (lambda x: x[:, :, :, 4:8], ["x", i32([0, 0, 0, 4]), i32([1, 4, 4, 8]), i32([1, 1, 1, 1])],
                          S.StridedSliceOptionsT()),
        "SPLIT": (lambda x: np.split(x, 2, axis=3), [i32(3), "x"], _split_opts()),
        "RESIZE_NEAREST_NEIGHBOR": (lambda x: x.repeat(2, 1).repeat(2, 2), ["x", i32([8, 8])],
                                    S.ResizeNearestNeighborOptionsT()),
    }
    fn, extra, options = table[case]
    assert _shape_op(case, fn, extra, options) > 60


# ------------------------------------------------------------------------- refused: a clear load error
@pytest.mark.parametrize("op,fn", [
    ("COS", np.cos), ("SIN", np.sin), ("HARD_SWISH", lambda x: x * np.clip(x + 3, 0, 6) / 6),
])
def test_no_int16_kernel_unary(op, fn):
    with pytest.raises((RuntimeError, ValueError)):
        _unary(op, fn, X4)


@pytest.mark.parametrize("op,fn", [("SQUARED_DIFFERENCE", lambda a, b: (a - b) ** 2),
                                   ("POW", lambda a, b: np.abs(a) ** b)])
def test_no_int16_kernel_binary(op, fn):
    with pytest.raises((RuntimeError, ValueError)):
        _binary(op, fn)


@pytest.mark.parametrize("op,fn,opts", [("LOGISTIC", _sigmoid, None), ("TANH", np.tanh, None),
                                        ("SOFTMAX", _softmax, "softmax")])
def test_fixed_output_scale_is_required(op, fn, opts):
    """LOGISTIC/TANH/SOFTMAX refuse an int16 output scale other than 1/32768."""
    options = _softmax_opts() if opts else None
    with pytest.raises(RuntimeError):
        _unary(op, fn, X4, 1 / 20000, options)


def test_int16_zero_point_must_be_zero():
    w = TfliteWriter()
    a = w.tensor("x", [1, 8], "int16", quant=Quant.per_tensor(1e-3, -100))
    b = w.tensor("z", [1, 8], "int16", quant=Quant.per_tensor(1e-3, -100))
    c = w.tensor("y", [1, 8], "int16", quant=Quant.per_tensor(2e-3, -100))
    w.op("ADD", [a, b], [c], _add_opts())
    w.set_io([a, b], [c])
    with pytest.raises(RuntimeError, match="zero_point"):
        _run(w, {"x": np.zeros((1, 8), np.int16), "z": np.zeros((1, 8), np.int16)})


def test_uint16_activations_are_not_a_16x8_type():
    with pytest.raises((RuntimeError, ValueError)):
        _unary("LOGISTIC", _sigmoid, X4, 1 / 32768, dtype="uint16")


# ---------------------------------------------------------------------------------- silently wrong
def _concat(same_scales: bool) -> float:
    x = RNG.standard_normal((1, 4, 4, 8)).astype(np.float32)
    z = RNG.standard_normal((1, 4, 4, 8)).astype(np.float32) * 5
    y = np.concatenate([x, z], -1)
    sx = sz = sy = _scale(y)
    if not same_scales:
        sx, sz = _scale(x), _scale(z)
    w = TfliteWriter()
    a = w.tensor("x", x.shape, "int16", quant=Quant.per_tensor(sx))
    b = w.tensor("z", z.shape, "int16", quant=Quant.per_tensor(sz))
    c = w.tensor("y", y.shape, "int16", quant=Quant.per_tensor(sy))
    o = S.ConcatenationOptionsT()
    o.axis = 3
    w.op("CONCATENATION", [a, b], [c], o)
    w.set_io([a, b], [c])
    return _sqnr(y, _run(w, {"x": _q16(x, sx), "z": _q16(z, sz)})[0].astype(np.float64) * sy)


def test_concatenation_needs_equal_input_scales():
    assert _concat(True) > 60
    assert _concat(False) < 10  # no error, wrong values


def _fc_runtime_weights(dtype: str, zero_point: int) -> float:
    """FULLY_CONNECTED whose weights are a subgraph input (a LoRA factor)."""
    x = RNG.standard_normal((1, 6, 16)).astype(np.float32)
    wt = RNG.standard_normal((8, 16)).astype(np.float32) * 0.3
    y = x @ wt.T
    sx, sy = _scale(x), _scale(y)
    if dtype == "int8":
        sw = float(np.abs(wt).max()) / 127
        wq = np.clip(np.rint(wt / sw), -127, 127).astype(np.int8)
    else:
        sw = float(wt.max() - wt.min()) / 255
        wq = np.clip(np.rint(wt / sw) + zero_point, 0, 255).astype(np.uint8)
    w = TfliteWriter()
    a = w.tensor("x", x.shape, "int16", quant=Quant.per_tensor(sx))
    b = w.tensor("w", wt.shape, dtype, quant=Quant.per_tensor(sw, zero_point))
    c = w.tensor("y", y.shape, "int16", quant=Quant.per_tensor(sy))
    o = S.FullyConnectedOptionsT()
    o.keepNumDims = True
    w.op("FULLY_CONNECTED", [a, b, -1], [c], o)
    w.set_io([a, b], [c])
    return _sqnr(y, _run(w, {"x": _q16(x, sx), "w": wq})[0].astype(np.float64) * sy)


def test_fully_connected_runtime_weights_int8_zero_point_0_only():
    assert _fc_runtime_weights("int8", 0) > 35
    assert _fc_runtime_weights("uint8", 128) < 10  # no error, wrong values


def _bmm_runtime_rhs(dtype: str, zero_point: int) -> float:
    x = RNG.standard_normal((1, 6, 16)).astype(np.float32)
    wt = RNG.standard_normal((16, 4)).astype(np.float32) * 0.3
    y = x @ wt
    sx, sy = _scale(x), _scale(y)
    sw = float(np.abs(wt).max()) / 127
    q = np.clip(np.rint(wt / sw) + zero_point, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
    w = TfliteWriter()
    a = w.tensor("x", x.shape, "int16", quant=Quant.per_tensor(sx))
    b = w.tensor("w", wt.shape, dtype, quant=Quant.per_tensor(sw, zero_point))
    c = w.tensor("y", y.shape, "int16", quant=Quant.per_tensor(sy))
    w.op("BATCH_MATMUL", [a, b], [c], S.BatchMatMulOptionsT())
    w.set_io([a, b], [c])
    return _sqnr(y, _run(w, {"x": _q16(x, sx), "w": q})[0].astype(np.float64) * sy)


def test_batch_matmul_runtime_int8_rhs():
    assert _bmm_runtime_rhs("int8", 0) > 35
    with pytest.raises(RuntimeError, match="zero_point"):
        _bmm_runtime_rhs("uint8", 128)


def _conv(bias_dtype: str, bias_type_option: int | None, runtime_filter: bool = False) -> float:
    torch = pytest.importorskip("torch")
    x = RNG.standard_normal((1, 8, 8, 6)).astype(np.float32)
    wt = RNG.standard_normal((5, 3, 3, 6)).astype(np.float32) * 0.3
    bv = RNG.standard_normal(5).astype(np.float32) * 0.5
    y = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(wt).permute(0, 3, 1, 2),
                                   torch.from_numpy(bv), padding=1).permute(0, 2, 3, 1).numpy()
    sx, sy = _scale(x), _scale(y)
    w = TfliteWriter()
    a = w.tensor("x", x.shape, "int16", quant=Quant.per_tensor(sx))
    if runtime_filter:
        sw = np.full(5, np.abs(wt).max() / 127)
        wq = np.clip(np.rint(wt / sw[0]), -127, 127).astype(np.int8)
        b = w.tensor("w", wt.shape, "int8", quant=Quant.per_tensor(sw[0]))
    else:
        sw = np.abs(wt).max((1, 2, 3)) / 127
        wq = np.clip(np.rint(wt / sw[:, None, None, None]), -127, 127).astype(np.int8)
        b = w.constant("w", wq, quant=Quant.per_channel(sw, 0))
    bs = sx * sw
    bias = w.constant("b", np.rint(bv / bs).astype(bias_dtype), quant=Quant.per_channel(bs, 0))
    c = w.tensor("y", y.shape, "int16", quant=Quant.per_tensor(sy))
    o = S.Conv2DOptionsT()
    o.padding, o.strideH, o.strideW = S.Padding.SAME, 1, 1
    if bias_type_option is not None:
        o.quantizedBiasType = bias_type_option
    w.op("CONV_2D", [a, b, bias], [c], o)
    w.set_io([a, b] if runtime_filter else [a], [c])
    feeds = {"x": _q16(x, sx), "w": wq}
    return _sqnr(y, _run(w, feeds)[0].astype(np.float64) * sy)


def test_conv_int32_bias_needs_quantized_bias_type():
    assert _conv("int32", S.TensorType.INT32) > 35
    assert _conv("int64", None) > 35
    assert _conv("int32", None) < 10  # no error, wrong values


def test_conv_runtime_int8_filter():
    """A conv LoRA factor as the CONV_2D filter input (int8, zero point 0)."""
    assert _conv("int32", S.TensorType.INT32, runtime_filter=True) > 35
