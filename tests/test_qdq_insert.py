"""qdq-insert: Q/DQ graphs run on ORT CPU close to float, uint8 LoRA inputs under shared encodings,
the opset-21 upgrade (external data too) and the com.microsoft variant, idempotency, determinism.

Plans are built here from ranges calibrated on ORT (:func:`make_plan`), not by the planner, so these tests
depend only on the pass and the affine math.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from golden import GOLDEN_DIR, case_context, case_pass, parse_text
from onnx import TensorProto, helper

from quadc.context import CompileContext
from quadc.errors import QuadcError
from quadc.graph import ExternalValues, load_model, save_model, to_model_bytes
from quadc.lora.pack import dequantize_task, quantize_task, saturated_fraction
from quadc.passes import get_pass
from quadc.passes.qdq_insert import upgrade_opset
from quadc.quant.affine import QType, compute_encoding, encoding_from_tensor, sqnr_db
from quadc.quant.plan import QuantPlan

# ------------------------------------------------------------------------------------------- plan helpers


def _session(model_bytes: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def calibrate_ranges(graph: gs.Graph, feeds: Iterable[Mapping[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """min/max of every float graph input and node output over ``feeds`` (ORT CPU, all tensors as outputs)."""
    model = onnx.load_from_string(to_model_bytes(graph))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    produced = [o for n in model.graph.node if n.op_type != "Constant" for o in n.output]
    names = [n for n in produced if types.get(n) == TensorProto.FLOAT]
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    sess = _session(model.SerializeToString())
    outs = [o.name for o in sess.get_outputs()]
    float_inputs = [i.name for i in model.graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT]
    ranges: dict[str, tuple[float, float]] = {}

    def add(name: str, arr: np.ndarray) -> None:
        lo, hi = float(np.min(arr)), float(np.max(arr))
        old = ranges.get(name, (lo, hi))
        ranges[name] = (min(old[0], lo), max(old[1], hi))

    for feed in feeds:
        for name in float_inputs:
            add(name, feed[name])
        for name, value in zip(outs, sess.run(None, dict(feed)), strict=True):
            if name in names:
                add(name, value)
    return ranges


#: Ops whose constant input 1 is quantized as a weight, as onnxruntime's QDQ quantizer does (norm scales too).
_WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "InstanceNormalization", "LayerNormalization")


def _weight_axis(node: gs.Node, ndim: int) -> int:
    if node.op == "Conv" or ndim == 1:
        return 0
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return ndim - 1


def make_plan(graph: gs.Graph, feeds: Sequence[Mapping[str, np.ndarray]], *, lora_inputs: Iterable[str] = (),
              per_channel: bool = False, act: str = "uint16", a8: Iterable[str] = (),
              lora_float_inputs: bool = False) -> QuantPlan:
    """A QuantPlan from ORT ranges: every float tensor ``act`` (``a8`` ones uint8), MatMul/Gemm/Conv
    weights and Instance-/LayerNorm scales uint8 per-tensor (or int8 symmetric per-channel), LoRA inputs one uint8 encoding each from the
    union of all feeds (every task's values)."""
    lora_inputs = set(lora_inputs)
    a8 = set(a8)
    ranges = calibrate_ranges(graph, feeds)
    plan = QuantPlan(precision="w8a16" if act == "uint16" else "w8a8", per_channel=per_channel,
                     lora_float_inputs=lora_float_inputs, a8_tensors=sorted(a8), lora_policy="unified")
    for name, (lo, hi) in sorted(ranges.items()):
        if name in lora_inputs:
            plan.lora[name] = compute_encoding(lo, hi, QType.UINT8)
        else:
            plan.activations[name] = compute_encoding(lo, hi, QType.UINT8 if name in a8 else act)
    for node in graph.nodes:
        if node.op in _WEIGHT_OPS and isinstance(node.inputs[1], gs.Constant):
            w = node.inputs[1]
            values = np.asarray(w.values, np.float32)
            if per_channel:
                plan.weights[w.name] = encoding_from_tensor(values, QType.INT8, symmetric=True,
                                                            axis=_weight_axis(node, values.ndim))
            else:
                plan.weights[w.name] = encoding_from_tensor(values, QType.UINT8)
    return plan


def qdq(graph: gs.Graph, plan: QuantPlan, **options) -> CompileContext:
    """Run qdq-insert on ``graph`` with ``plan``; returns the context."""
    ctx = CompileContext(plan=plan)
    get_pass("qdq-insert", options).run(graph, ctx)
    return ctx


def run(graph_or_bytes, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    data = graph_or_bytes if isinstance(graph_or_bytes, bytes) else to_model_bytes(graph_or_bytes)
    sess = _session(data)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


# ------------------------------------------------------------------------------------------------ graphs


def _const(name: str, arr: np.ndarray) -> TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(arr), name)


def conv_mlp_model(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Conv(+bias) -> Relu -> Conv(+bias) -> Reshape -> MatMul -> Add(bias) -> LayerNorm -> ReduceMean."""
    rng = np.random.default_rng(seed)
    inits = [
        _const("c1.w", rng.standard_normal((16, 4, 3, 3)).astype(np.float32) * 0.2),
        _const("c1.b", rng.standard_normal(16).astype(np.float32) * 0.1),
        _const("c2.w", rng.standard_normal((8, 16, 3, 3)).astype(np.float32) * 0.1),
        _const("c2.b", rng.standard_normal(8).astype(np.float32) * 0.1),
        _const("shape", np.array([1, 8, 64], np.int64)),
        _const("fc.w", rng.standard_normal((64, 32)).astype(np.float32) * 0.15),
        _const("fc.b", rng.standard_normal(32).astype(np.float32) * 0.1),
        _const("ln.g", (1 + 0.1 * rng.standard_normal(32)).astype(np.float32)),
        _const("ln.b", (0.1 * rng.standard_normal(32)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="/c1/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="/r1/Relu"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], name="/c2/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c2", "shape"], ["flat"], name="/flat/Reshape"),
        helper.make_node("MatMul", ["flat", "fc.w"], ["fc"], name="/fc/MatMul"),
        helper.make_node("Add", ["fc", "fc.b"], ["fcb"], name="/fc/Add"),
        helper.make_node("LayerNormalization", ["fcb", "ln.g", "ln.b"], ["ln"], name="/ln/LayerNorm", axis=-1),
        helper.make_node("ReduceMean", ["ln"], ["mean"], name="/mean/ReduceMean", axes=[2], keepdims=1),
        helper.make_node("Sub", ["ln", "mean"], ["y"], name="/out/Sub"),
    ]
    graph = helper.make_graph(nodes, "conv_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def gs_graph(model: onnx.ModelProto) -> gs.Graph:
    graph = gs.import_onnx(model)
    graph._quadc_registry = {}
    graph.opset_imports = {d.domain: d.version for d in model.opset_import}
    graph.ir_version = model.ir_version
    return graph


def x_feeds(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(n)]


def lora_linear_graph() -> tuple[gs.Graph, CompileContext]:
    """The lora-inputs golden linear case after lora-inputs (rank 2 slot on an 8->6 MatMul + bias)."""
    in_path = GOLDEN_DIR / "lora-inputs" / "linear_bias.in.onnxtxt"
    graph = parse_text(in_path)
    ctx = case_context(in_path)
    case_pass("lora-inputs", ctx).run(graph, ctx)
    return graph, ctx


DOWN, UP = "blk.attn1.to_q.lora_down", "blk.attn1.to_q.lora_up"


def lora_tasks(n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{DOWN: (rng.standard_normal((8, 2)) * (0.5 + 0.3 * i)).astype(np.float32),
             UP: (rng.standard_normal((2, 6)) * 0.8).astype(np.float32)} for i in range(n)]


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_w8a16_graph_is_close_to_float(per_channel):
    model = conv_mlp_model()
    graph = gs_graph(model)
    plan = make_plan(graph, x_feeds(8), per_channel=per_channel)
    qdq(graph, plan)
    assert graph.opset == 21
    ops = [n.op for n in graph.nodes]
    assert ops.count("QuantizeLinear") == len(plan.activations)
    feed = x_feeds(1, seed=99)[0]
    ref = run(model.SerializeToString(), feed)[0]
    got = run(graph, feed)[0]
    assert sqnr_db(ref, got) > 30.0
    # int32 biases for both convs and the LayerNorm; the Add constant fc.b stays float: not in the plan.
    biases = {n.outputs[0].name for n in graph.nodes if n.op == "DequantizeLinear" and n.inputs[0].dtype == np.int32}
    assert biases == {"c1.b_DequantizeLinear_Output", "c2.b_DequantizeLinear_Output", "ln.b_DequantizeLinear_Output"}


def test_bias_float_option_and_int32_precision():
    model = conv_mlp_model()
    feeds = x_feeds(4)
    plan = make_plan(gs_graph(model), feeds)
    g32, gf = gs_graph(model), gs_graph(model)
    qdq(g32, plan)
    qdq(gf, plan, bias="float")
    assert not any(n.op == "DequantizeLinear" and n.inputs[0].dtype == np.int32 for n in gf.nodes)
    feed = x_feeds(1, seed=5)[0]
    a, b = run(g32, feed)[0], run(gf, feed)[0]
    assert sqnr_db(b, a) > 50.0  # int32 bias rounding is far below activation quantization noise
    with pytest.raises(QuadcError, match="bias"):
        qdq(gs_graph(model), plan, bias="int8")


def test_pass_is_idempotent_and_deterministic():
    model = conv_mlp_model()
    plan = make_plan(gs_graph(model), x_feeds(2))
    g1, g2 = gs_graph(model), gs_graph(model)
    first = get_pass("qdq-insert").run(g1, CompileContext(plan=plan))
    assert first.changed and first.counts["opset_upgraded"] == 1 and first.counts["weights"] == 4
    assert first.counts["biases"] == 3 and first.counts["missing"] == 0
    again = get_pass("qdq-insert").run(g1, CompileContext(plan=plan))
    assert not again.changed
    qdq(g2, plan)
    assert to_model_bytes(g1) == to_model_bytes(g2)


def test_needs_a_plan():
    with pytest.raises(QuadcError, match="quantization plan"):
        get_pass("qdq-insert").run(gs_graph(conv_mlp_model()), CompileContext())


def test_uint8_lora_inputs_bind_stored_bytes_of_every_task():
    graph, _ = lora_linear_graph()
    float_model = to_model_bytes(graph)
    tasks = lora_tasks(3)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 3, 8)).astype(np.float32) for _ in range(64)]
    plan = make_plan(graph, [{"x": x, **t} for x in xs for t in tasks], lora_inputs=[DOWN, UP])
    qdq(graph, plan)
    inputs = {t.name: t for t in graph.inputs}
    assert inputs[DOWN].dtype == np.uint8 and inputs[UP].dtype == np.uint8
    # The graph's DQ of each LoRA input carries exactly the plan's one encoding.
    for name in (DOWN, UP):
        dq = next(n for n in graph.nodes if n.op == "DequantizeLinear" and n.inputs[0].name == name)
        assert np.asarray(dq.inputs[1].values).tobytes() == plan.lora[name].scale.tobytes()
        assert np.asarray(dq.inputs[2].values) == plan.lora[name].zero_point
    x = np.random.default_rng(99).standard_normal((1, 3, 8)).astype(np.float32)  # not a calibration input
    outs = []
    for task in tasks:
        stored = quantize_task(task, plan)
        assert all(v.dtype == np.uint8 for v in stored.values())
        want = run(float_model, {"x": x, **task})[0]
        got = run(graph, {"x": x, **stored})[0]
        assert sqnr_db(want, got) > 30.0
        outs.append(got)
        # The bytes dequantize with the shared encoding to the task's values (within half a step).
        back = dequantize_task(stored, plan)
        for name in (DOWN, UP):
            assert np.max(np.abs(back[name] - task[name])) <= plan.lora[name].scale * 0.5 + 1e-7
    assert sqnr_db(outs[0], outs[1]) < 25.0 and sqnr_db(outs[1], outs[2]) < 25.0
    # Base model: zero LoRA is the zero point, and it is exactly the zero-LoRA graph.
    zeros = quantize_task({DOWN: np.zeros((8, 2), np.float32), UP: np.zeros((2, 6), np.float32)}, plan)
    assert np.all(zeros[DOWN] == plan.lora[DOWN].zero_point)
    base = run(graph, {"x": x, **zeros})[0]
    base_float = run(float_model, {"x": x, DOWN: np.zeros((8, 2), np.float32), UP: np.zeros((2, 6), np.float32)})[0]
    assert sqnr_db(base_float, base) > 30.0


def test_shared_encoding_saturates_out_of_range_tasks():
    tasks = lora_tasks(2)
    anchor = {n: compute_encoding(v.min(), v.max(), QType.UINT8) for n, v in tasks[0].items()}
    plan = QuantPlan(lora=anchor)
    loud = {n: v * 4 for n, v in tasks[1].items()}
    assert saturated_fraction(tasks[0], plan) == 0.0
    assert saturated_fraction(loud, plan) > 0.3
    stored = quantize_task(loud, plan)
    assert stored[DOWN].max() == 255 and stored[DOWN].min() == 0
    with pytest.raises(QuadcError, match="no shared encoding"):
        quantize_task({"other.lora_down": np.zeros(2, np.float32)}, plan)


def test_float_lora_inputs_variant():
    graph, _ = lora_linear_graph()
    float_model = to_model_bytes(graph)
    tasks = lora_tasks(2)
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((1, 3, 8)).astype(np.float32) for _ in range(64)]
    plan = make_plan(graph, [{"x": x, **t} for x in xs for t in tasks], lora_inputs=[DOWN, UP],
                     lora_float_inputs=True)
    x = np.random.default_rng(99).standard_normal((1, 3, 8)).astype(np.float32)  # not a calibration input
    qdq(graph, plan)
    inputs = {t.name: t for t in graph.inputs}
    assert inputs[DOWN].dtype == np.float32
    q_inputs = {n.inputs[0].name for n in graph.nodes if n.op == "QuantizeLinear"}
    assert {DOWN, UP} <= q_inputs
    for task in tasks:
        # Float inputs are quantized in the graph with the same shared encoding the uint8 files use.
        got = run(graph, {"x": x, **task})[0]
        fq = dequantize_task(quantize_task(task, plan), plan)
        assert sqnr_db(run(float_model, {"x": x, **task})[0], got) > 30.0
        assert np.array_equal(got, run(graph, {"x": x, **fq})[0])


def test_opset_upgrade_keeps_external_weights_lazy(tmp_path: Path):
    model = conv_mlp_model()
    src = tmp_path / "src" / "model.onnx"
    save_model(gs_graph(model), src, external=True)
    graph = load_model(src)
    plan = make_plan(gs_graph(model), x_feeds(4))
    before = {n: t for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    assert isinstance(before["fc.w"]._values, ExternalValues)
    upgrade_opset(graph)
    assert graph.opset == 21
    reduce = next(n for n in graph.nodes if n.op == "ReduceMean")
    assert len(reduce.inputs) == 2 and "axes" not in reduce.attrs  # converted: axes became an input
    after = {n: t for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    # The very same constants come back, external weights still undecoded references into the source file.
    assert all(after[n] is t for n, t in before.items())
    assert isinstance(after["fc.w"]._values, ExternalValues)
    qdq(graph, plan)  # already at 21: no second upgrade
    out = save_model(graph, tmp_path / "out" / "model.onnx", external=True)
    assert (tmp_path / "out" / "model.onnx.data").exists()
    assert onnx.load(str(out), load_external_data=False).opset_import[0].version == 21
    in_memory = gs_graph(model)
    qdq(in_memory, plan)
    feed = x_feeds(1, seed=11)[0]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, feed)[0], run(in_memory, feed)[0])


def test_contrib_qdq_keeps_opset():
    model = conv_mlp_model()
    plan = make_plan(gs_graph(model), x_feeds(4))
    contrib, std = gs_graph(model), gs_graph(model)
    qdq(contrib, plan, opset="contrib")
    qdq(std, plan)
    assert contrib.opset == 17
    assert {n.domain for n in contrib.nodes if "quantize" in n.op.lower()} == {"com.microsoft"}
    exported = onnx.load_from_string(to_model_bytes(contrib))
    assert {(o.domain, o.version) for o in exported.opset_import} == {("", 17), ("com.microsoft", 1)}
    feed = x_feeds(1, seed=12)[0]
    np.testing.assert_allclose(run(contrib, feed)[0], run(std, feed)[0], rtol=0, atol=1e-5)


def test_a8_tensors_and_activation_matmul_8bit():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"], name="/attn/MatMul"),
             helper.make_node("Softmax", ["s"], ["p"], name="/attn/Softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"], name="/attn/MatMul_1")]
    g = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 2, 16, 8]),
                                          helper.make_tensor_value_info("kt", TensorProto.FLOAT, [1, 2, 8, 16]),
                                          helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2, 16, 8])],
                          [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 2, 16, 8])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    feeds = [{k: rng.standard_normal(s).astype(np.float32) for k, s in
              (("q", (1, 2, 16, 8)), ("kt", (1, 2, 8, 16)), ("v", (1, 2, 16, 8)))} for _ in range(9)]
    held_out = feeds.pop()
    plan = make_plan(gs_graph(model), feeds, a8=["p"])
    assert plan.activations["p"].qtype is QType.UINT8
    graph = gs_graph(model)
    qdq(graph, plan, act_matmul_8bit=True)
    zp_types = {}
    for n in graph.nodes:
        if n.op == "MatMul":
            zp_types[n.name] = tuple(np.dtype(i.inputs[0].inputs[2].dtype).name for i in n.inputs)
    assert zp_types == {"/attn/MatMul": ("uint16", "uint8"), "/attn/MatMul_1": ("uint8", "uint16")}
    ref = run(model.SerializeToString(), held_out)[0]
    assert sqnr_db(ref, run(graph, held_out)[0]) > 25.0
