"""Issue 12 point 3: ``a8_fraction`` on every quantized target — qnn (HTP) and the TFLite targets (LiteRT).

qnn: ``qnn::requantize`` gives each op one activation type (checked on a small QDQ graph on ORT CPU: the
uint8 -> uint16 converts are lossless), and the tiny U-Net at a8_fraction 0.6 compiles into a QNN context
with every node on HTP. TFLite: 8-bit activations are int8 asymmetric with QUANTIZE ops at every width
change, each op's I/O of one type, every int8 kernel constraint of ``test_tflite_int8_kernels.py`` kept.
Quality is measured on inputs calibration never used (seed 4242), against the float graph and against
``onnx-qdq`` at the same fraction on ORT CPU.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from quadc.compiler import CompileOptions, bundled_loras, bundled_model, compile_model
from quadc.graph import load_model
from quadc.quant.affine import QType, sqnr_db
from quadc.quant.encodings import read_encodings
from quadc.quant.feeds import random_feeds
from quadc.runtime.engine import Engine
from quadc.runtime.qnn_engine import qnn_available
from quadc.targets.qnn.requantize import QnnRequantize, mixed_units

FRACTION = 0.6
HELD_OUT_SEED = 4242
TASKS = (None, *bundled_loras())


# ------------------------------------------------------------------------------- qnn::requantize alone
def _qdq(name: str, x: gs.Tensor, scale: float, zp: int, dtype) -> gs.Variable:
    """``DQ(Q(x))`` nodes appended to the module's node list."""
    s = gs.Constant(f"{name}_s", np.array(scale, np.float32))
    z = gs.Constant(f"{name}_z", np.array(zp, dtype))
    q = gs.Variable(f"{name}_q", dtype, x.shape)
    out = gs.Variable(f"{name}_dq", np.float32, x.shape)
    _NODES.extend([gs.Node("QuantizeLinear", f"{name}_Q", inputs=[x, s, z], outputs=[q]),
                   gs.Node("DequantizeLinear", f"{name}_DQ", inputs=[q, s, z], outputs=[out])])
    return out


_NODES: list[gs.Node] = []


def _mixed_graph() -> gs.Graph:
    """a (uint8) + b (uint16) -> s (uint8); m = MatMul(s as [8,8], b as [8,8]) (u8 x u16) -> uint16;
    r = Reshape(a) -> uint16 with its own encoding."""
    _NODES.clear()
    x = gs.Variable("x", np.float32, (8, 8))
    y = gs.Variable("y", np.float32, (8, 8))
    a = _qdq("a", x, 0.02, 100, np.uint8)
    b = _qdq("b", y, 3e-5, 30000, np.uint16)
    s = gs.Variable("s", np.float32, (8, 8))
    _NODES.append(gs.Node("Add", "add", inputs=[a, b], outputs=[s]))
    s_dq = _qdq("s_enc", s, 0.03, 120, np.uint8)
    m = gs.Variable("m", np.float32, (8, 8))
    _NODES.append(gs.Node("MatMul", "mm", inputs=[s_dq, b], outputs=[m]))
    m_dq = _qdq("m_enc", m, 4e-4, 32000, np.uint16)
    r = gs.Variable("r", np.float32, (64,))
    shape = gs.Constant("shape", np.array([64], np.int64))
    _NODES.append(gs.Node("Reshape", "reshape", inputs=[a, shape], outputs=[r]))
    r_dq = _qdq("r_enc", r, 8e-5, 32700, np.uint16)
    return gs.Graph(nodes=list(_NODES), inputs=[x, y], outputs=[s_dq, m_dq, r_dq], opset=21)


def _run_cpu(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    model = gs.export_onnx(graph.copy())
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_requantize_gives_every_op_one_type_and_keeps_the_values():
    graph = _mixed_graph()
    # Add (u8, u16 -> u8), MatMul (u8 -> u16, and a u16 second input), Reshape (u8 -> u16)
    assert len(mixed_units(graph)) == 4
    rng = np.random.default_rng(0)
    feeds = {"x": rng.uniform(-2, 3, (8, 8)).astype(np.float32), "y": rng.uniform(-0.9, 0.9, (8, 8)).astype(np.float32)}
    before = _run_cpu(graph, feeds)
    result = QnnRequantize().run(graph, None)
    assert result.changed and mixed_units(graph) == []
    # The Add and the MatMul run uint16: a and s are converted up, the Add's uint8 output s goes out via uint16.
    assert result.counts["inputs_up"] == 2 and result.counts["outputs_up"] == 1
    assert result.counts["inputs_down"] == 1 and result.counts["movement_converts"] == 1
    after = _run_cpu(graph, feeds)
    # The Add's uint8 input and uint8 output pass through uint16 without losing a step: identical values.
    np.testing.assert_array_equal(after[0], before[0])
    # The Reshape writes its input's encoding and converts: the value on the uint16 grid is unchanged.
    np.testing.assert_allclose(after[2], before[2], atol=8e-5 / 2 + 1e-7)
    # The MatMul's second input is now uint8 (HTP's pair): close, not equal.
    assert sqnr_db(before[1], after[1]) > 30
    again = QnnRequantize().run(graph, None)
    assert not again.changed


def test_requantize_leaves_w8a16_graphs_alone():
    _NODES.clear()
    x = gs.Variable("x", np.float32, (4, 4))
    a = _qdq("a", x, 1e-4, 32768, np.uint16)
    out = gs.Variable("o", np.float32, (4, 4))
    _NODES.append(gs.Node("Relu", "relu", inputs=[a], outputs=[out]))
    o_dq = _qdq("o_enc", out, 1e-4, 0, np.uint16)
    graph = gs.Graph(nodes=list(_NODES), inputs=[x], outputs=[o_dq], opset=21)
    assert not QnnRequantize().run(graph, None).changed


# --------------------------------------------------------------------------------------- on the model
@pytest.fixture(scope="module")
def feeds():
    return random_feeds(load_model(bundled_model()), 2, seed=HELD_OUT_SEED)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("a8_targets")
    compile_model(None, root / "float", CompileOptions(target="onnx"))
    compile_model(None, root / "onnx-qdq", CompileOptions(target="onnx-qdq", pass_options={
        "quant-plan": {"a8_fraction": FRACTION}}))
    return root


def _outputs(art, feeds) -> dict:
    eng = Engine(art)
    return {(t, i): eng.run(f, t)["out_sample"] for t in TASKS for i, f in enumerate(feeds)}


def _agreement(ref: dict, got: dict) -> dict[str | None, float]:
    return {t: min(sqnr_db(ref[t, i], got[t, i]) for (tt, i) in ref if tt == t) for t in TASKS}


@pytest.fixture(scope="module")
def references(built, feeds):
    return {"float": _outputs(built / "float", feeds), "onnx-qdq": _outputs(built / "onnx-qdq", feeds)}


@pytest.mark.skipif(not qnn_available()[0], reason=f"QNN HTP backend: {qnn_available()[1]}")
def test_qnn_a8_fraction_runs_entirely_on_htp(built, feeds, references):
    art = built / "qnn"
    manifest = compile_model(None, art, CompileOptions(target="qnn", pass_options={
        "quant-plan": {"a8_fraction": FRACTION}}))
    assert manifest["quant"]["a8_tensors"] > 100
    ctx_model = onnx.load(str(art / manifest["qnn"]["context_model"]))
    assert {n.op_type for n in ctx_model.graph.node} == {"EPContext"}  # nothing left for the CPU
    assert mixed_units(load_model(art / "model.onnx")) == []
    eng = Engine(art)
    assert eng.executor == "qnn-htp"
    got = _outputs(art, feeds)
    assert min(_agreement(references["float"], got).values()) >= 30
    assert min(_agreement(references["onnx-qdq"], got).values()) >= 30


# ------------------------------------------------------------------------------------------- TFLite
def _tensor_q(t) -> tuple[tuple[float, ...], tuple[int, ...]] | None:
    q = t.quantization
    return (tuple(q.scale), tuple(q.zeroPoint)) if q is not None and q.scale is not None else None


def _check_mixed_tflite(model, lora: set[str]) -> dict[str, int]:
    """Every kernel constraint the int8/int16 mix relies on; returns ops per kernel width."""
    from ai_edge_litert import schema_py_generated as S

    from quadc.targets.tflite.writer import builtin_name

    sub = model.subgraphs[0]
    tensors = sub.tensors
    act = (S.TensorType.INT8, S.TensorType.INT16)
    widths = {"int8": 0, "int16": 0, "QUANTIZE": 0}
    dynamic = set(sub.inputs) | {i for o in sub.operators for i in o.outputs}  # not constants
    for t in tensors:
        if t.type == S.TensorType.INT16:
            assert all(z == 0 for z in t.quantization.zeroPoint), t.name  # int16: zero point 0
    for o in sub.operators:
        op = builtin_name(model.operatorCodes[o.opcodeIndex].builtinCode)
        ins = [tensors[i] for i in o.inputs if i >= 0 and i in dynamic]
        outs = [tensors[i] for i in o.outputs]
        if op == "QUANTIZE":
            widths["QUANTIZE"] += 1
            assert {ins[0].type, outs[0].type} <= set(act)
            continue
        data = [t for t in ins if t.type in act and t.name.decode() not in lora]
        kinds = {t.type for t in data + outs if t.type in act}
        assert len(kinds) == 1, (op, [t.name for t in data + outs])  # one width per op
        width = "int8" if kinds == {S.TensorType.INT8} else "int16"
        widths[width] += 1
        if op == "CONCATENATION":
            assert len({_tensor_q(t) for t in data + outs}) == 1
        if op == "SOFTMAX" and width == "int8":
            assert _tensor_q(outs[0]) == ((pytest.approx(1 / 256),), (-128,))
        if op in ("LOGISTIC", "SOFTMAX", "TANH") and width == "int16":
            assert outs[0].quantization.scale == [pytest.approx(1 / 32768)]
    return widths


@pytest.mark.parametrize("target", ["neuropilot", "enn"])
def test_tflite_a8_fraction_runs_int8_kernels_in_litert(built, feeds, references, target):
    pytest.importorskip("ai_edge_litert")
    from quadc.targets.tflite.writer import read_model

    art = built / target
    manifest = compile_model(None, art, CompileOptions(target=target, pass_options={
        "quant-plan": {"a8_fraction": FRACTION}}))
    quant = manifest["quant"]
    assert quant["int8_activations"] > 100 and manifest["precision"] == "a16w8+a8w8"
    lora = {s[side]["name"] for s in manifest["lora_slots"] for side in ("down", "up")}
    widths = _check_mixed_tflite(read_model((art / "model.tflite").read_bytes()), lora)
    assert widths["int8"] > 50 and widths["int16"] > 50 and widths["QUANTIZE"] > 0, widths
    # Some 8-bit activations are asymmetric: the int8 kernels take their zero points.
    acts = read_encodings(art / "encodings.json").activations
    assert any(e.qtype is QType.INT8 and int(e.zero_point) != 0 for n, e in acts.items() if n not in lora)
    got = _outputs(art, feeds)
    assert min(_agreement(references["float"], got).values()) >= 30
    assert min(_agreement(references["onnx-qdq"], got).values()) >= 30
