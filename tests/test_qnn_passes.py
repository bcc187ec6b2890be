"""The qnn legalization passes on real graphs (their golden cases are in golden_graphs/qnn-*):

- ``qnn-gelu`` fuses the bundled U-Net's four Erf-GELUs, keeps the numbers (LoRA inputs non-zero) and
  the output names, and drops the plan entries of the tensors it removed;
- ``qnn-groupnorm``'s result runs on the HTP backend where GroupNormalization itself is refused;
- ``qnn-const-first`` keeps the numbers bit for bit, and without it the HTP backend cannot finalize a
  dynamo-exported U-Net that it compiles and runs with it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from quadc.compiler import CompileOptions, compile_model, prepare
from quadc.errors import QuadcError
from quadc.graph import to_model_bytes
from quadc.passes import PassPipeline, run_pipeline
from quadc.quant.affine import sqnr_db
from quadc.runtime.qnn_engine import qnn_available
from quadc.testing import apply_pass_and_basic_check, assert_op_count_match

needs_htp = pytest.mark.skipif(not qnn_available()[0], reason=f"QNN HTP backend: {qnn_available()[1]}")


@pytest.fixture(scope="module")
def bundled_float():
    graph, ctx, _ = prepare(None, {})
    graph, _ = run_pipeline(graph, PassPipeline("float"), ctx)
    return graph, ctx


def test_qnn_gelu_fuses_the_bundled_unet(bundled_float):
    graph, ctx = bundled_float
    assert sum(n.op == "Erf" for n in graph.nodes) == 4
    out, result = apply_pass_and_basic_check(graph, "qnn-gelu", ctx=ctx)
    assert result.counts == {"gelu": 4, "opset_upgraded": 1}
    assert_op_count_match(out, {"Erf": 0, "Gelu": 4})
    assert out.opset == 21


def test_qnn_gelu_drops_planned_tensors_it_removed(bundled_float):
    from quadc.passes import get_pass

    graph, ctx = bundled_float
    g = graph.copy()
    fork = type(ctx)(model_info=ctx.model_info, loras=ctx.loras, lora_slots=dict(ctx.lora_slots))
    get_pass("quant-plan", {"calib_random": 1}).run(g, fork)
    erf_outputs = {n.outputs[0].name for n in g.nodes if n.op == "Erf"}
    gelu_outputs = {n.outputs[0].name for n in g.nodes if n.op == "Mul" and n.outputs[0].name.endswith("Mul_3_output_0")}
    assert erf_outputs <= set(fork.plan.activations) and gelu_outputs <= set(fork.plan.activations)
    get_pass("qnn-gelu").run(g, fork)
    assert not erf_outputs & set(fork.plan.activations) and not erf_outputs & set(fork.plan.ranges)
    # The Gelu nodes write the tensors the pattern wrote: their calibrated encodings still apply.
    assert {n.outputs[0].name for n in g.nodes if n.op == "Gelu"} == gelu_outputs <= set(fork.plan.activations)
    assert set(fork.plan.weights) and set(fork.plan.lora)


def test_qnn_const_first_keeps_every_bit(bundled_float):
    graph, ctx = bundled_float
    out, result = apply_pass_and_basic_check(graph, "qnn-const-first", ctx=ctx, rtol=0.0)
    assert result.counts["swapped"] > 0
    assert not [n for n in out.nodes if n.op in ("Add", "Mul") and isinstance(n.inputs[1], gs.Constant)
                and not isinstance(n.inputs[0], gs.Constant)]


# ------------------------------------------------------------------------------------------- on HTP
def _group_norm_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c, g = 8, 2
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]),
             helper.make_node("GroupNormalization", ["h", "s", "b"], ["y"], num_groups=g, epsilon=1e-5)]
    inits = [numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "s"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b")]
    graph = helper.make_graph(nodes, "gn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _htp(model_bytes: bytes):
    import onnxruntime as ort

    from quadc.runtime.qnn_engine import htp_provider_options, htp_session_options

    return ort.InferenceSession(model_bytes, htp_session_options(htp_provider_options(), strict=True))


@needs_htp
def test_lowered_group_norm_runs_on_htp_where_group_norm_does_not():
    from test_qdq_insert import make_plan, qdq, run

    from quadc.context import CompileContext
    from quadc.passes import get_pass

    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 8, 4, 4)).astype(np.float32)} for _ in range(9)]
    model = _group_norm_model()
    plain = gs.import_onnx(model)
    qdq(plain, make_plan(plain, feeds[:8]))
    with pytest.raises(Exception, match="GroupNormalization|CPU|finalize"):
        _htp(to_model_bytes(plain))
    lowered = gs.import_onnx(model)
    get_pass("qnn-groupnorm").run(lowered, CompileContext())
    assert_op_count_match(lowered, {"GroupNormalization": 0, "InstanceNormalization": 1})
    qdq(lowered, make_plan(lowered, feeds[:8]))
    session = _htp(to_model_bytes(lowered))
    on_cpu = run(lowered, feeds[8])[0]  # the same QDQ graph on onnxruntime's CPU provider
    assert sqnr_db(on_cpu, session.run(None, feeds[8])[0]) > 35.0


@needs_htp
def test_dynamo_unet_needs_const_first_on_htp(tiny_dynamo_onnx, tmp_path):
    from quadc.compiler import bundled_loras
    from quadc.eval.targets_summary import held_out_feeds
    from quadc.runtime.engine import Engine

    loras = {"stickers": str(bundled_loras()["stickers"])}
    calib = {"quant-plan": {"calib_random": 2}}
    without = "float,qnn-groupnorm,quant-plan,qnn-gelu,qdq-insert"
    with pytest.raises(QuadcError, match="could not compile model.onnx: .*finalize"):
        compile_model(tiny_dynamo_onnx, tmp_path / "without", CompileOptions(
            target="qnn", loras=loras, passes=without,
            pass_options={**calib, "qdq-insert": {"act_matmul_8bit": True}}))
    manifest = compile_model(tiny_dynamo_onnx, tmp_path / "with", CompileOptions(target="qnn", loras=loras,
                                                                                pass_options=calib))
    assert next(p for p in manifest["passes"] if p["pass"] == "qnn-const-first")["counts"]["swapped"] > 0
    htp, cpu = Engine(tmp_path / "with"), Engine(tmp_path / "with", executor="cpu")
    assert htp.executor == "qnn-htp"
    feed = held_out_feeds(manifest, 1)[0]
    assert sqnr_db(cpu.run(feed, "stickers")["out_sample"], htp.run(feed, "stickers")["out_sample"]) > 30.0
