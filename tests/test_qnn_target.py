"""Target qnn on the bundled tiny U-Net: the HTP-legal QDQ graph, the QNN context binary onnxruntime-qnn
writes, and that context run on the x86 HTP backend (every node on HTP, no CPU fallback).

The bundled model and LoRAs are compiled once with ``--target all`` (default calibration: 4 inputs, seed 0). The
float reference is the ``onnx`` target's artifact (the float LoRA-as-input graph) on onnxruntime's CPU
provider; quality is measured on synthetic inputs of another seed, never on calibration inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from quadc.compiler import CompileOptions, bundled_model, compile_model
from quadc.errors import QuadcError
from quadc.graph import load_model
from quadc.quant.affine import sqnr_db, sqnr_db_from_sums
from quadc.quant.encodings import read_encodings
from quadc.quant.feeds import random_feeds
from quadc.runtime.engine import Engine
from quadc.runtime.qnn_engine import EP_NAME, check_context_files, qnn_available
from quadc.targets import get_target

pytestmark = pytest.mark.skipif(not qnn_available()[0], reason=f"QNN HTP backend: {qnn_available()[1]}")

TASKS = (None, "background_removal", "edges_to_image", "sepia")
HELD_OUT_SEED = 4242  # calibration uses seed 0


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qnn_target")
    compile_model(None, root / "all", CompileOptions(target="all"))
    return root / "all"


@pytest.fixture(scope="module")
def feeds():
    return random_feeds(load_model(bundled_model()), 2, seed=HELD_OUT_SEED)


@pytest.fixture(scope="module")
def runs(out, feeds):
    """Outputs per (task, feed index): on one loaded QNN context (HTP), the float graph and onnx-qdq (CPU)."""
    htp = Engine(out / "qnn")
    assert htp.executor == "qnn-htp"
    flt, qdq = Engine(out / "onnx"), Engine(out / "onnx-qdq")
    result = {}
    for task in TASKS:
        for i, feed in enumerate(feeds):
            result[task, i] = {"htp": htp.run(feed, task)["out_sample"], "float": flt.run(feed, task)["out_sample"],
                               "qdq": qdq.run(feed, task)["out_sample"]}
    return result


def _sqnr(runs, task, ref: str, test: str) -> float:
    """SQNR over every held-out input together."""
    pairs = [(v[ref].astype(np.float64), v[test].astype(np.float64)) for (t, _), v in runs.items() if t == task]
    return sqnr_db_from_sums(sum(float(np.sum(r * r)) for r, _ in pairs), sum(float(np.sum((r - g) ** 2)) for r, g in pairs))


# --------------------------------------------------------------------------------------------- artifact
def test_artifact_holds_the_qdq_graph_encodings_and_the_context(out):
    art = out / "qnn"
    manifest = json.loads((art / "manifest.json").read_text())
    qnn = manifest["qnn"]
    assert manifest["target"] == "qnn" and manifest["opset"] == 21 and manifest["executor"] == "qnn-htp"
    assert qnn["context_model"] == "model_ctx.onnx" and qnn["context_binary"] == "model_ctx_qnn.bin"
    assert qnn["provider_options"]["backend_type"] == "htp"
    assert manifest["shared_rom_bytes"] == sum((art / f).stat().st_size for f in (qnn["context_model"], qnn["context_binary"]))
    assert manifest["qdq_graph_bytes"] == (art / "model.onnx").stat().st_size
    # The compatibility string onnxruntime stores in the context model is the one recorded.
    ctx_model = onnx.load(str(art / qnn["context_model"]))
    meta = {p.key: p.value for p in ctx_model.metadata_props}
    assert qnn["ep_compatibility_info"] == meta[f"ep_compatibility_info.{EP_NAME}"] and qnn["ep_compatibility_info"]
    # Everything runs inside the context: no node is left for another provider.
    assert {n.op_type for n in ctx_model.graph.node} == {"EPContext"}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in ctx_model.graph.node[0].attribute}
    assert attrs["embed_mode"] == 0 and attrs["ep_cache_context"] == b"model_ctx_qnn.bin"


def test_qdq_graph_is_htp_legal(out):
    art = out / "qnn"
    model = onnx.load(str(art / "model.onnx"))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {21}
    ops = [n.op_type for n in model.graph.node]
    assert "Erf" not in ops and ops.count("Gelu") == 4 and "GroupNormalization" not in ops
    inputs = {i.name: i for i in model.graph.input}
    assert all(d.HasField("dim_value") for i in inputs.values() for d in i.type.tensor_type.shape.dim)
    manifest = json.loads((art / "manifest.json").read_text())
    lora_inputs = [s[side]["name"] for s in manifest["lora_slots"] for side in ("down", "up")]
    assert lora_inputs and all(inputs[n].type.tensor_type.elem_type == onnx.TensorProto.UINT8 for n in lora_inputs)
    assert not set(lora_inputs) & {i.name for i in model.graph.initializer}  # no defaults
    # Each LoRA input is read by one DequantizeLinear with its shared encoding from encodings.json.
    enc = read_encodings(art / "encodings.json")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    readers = {n: [x for x in model.graph.node if n in x.input] for n in lora_inputs}
    for name, nodes in readers.items():
        assert [x.op_type for x in nodes] == ["DequantizeLinear"], name
        assert inits[nodes[0].input[1]].tobytes() == enc.activations[name].scale.tobytes()
        assert int(inits[nodes[0].input[2]]) == int(enc.activations[name].zero_point)
    # Weights are in the encodings file, and every MatMul of two dynamic tensors takes an HTP type pair.
    assert len(enc.params) > 100
    dq_type = {n.output[0]: inits[n.input[2]].dtype for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] not in inits}
    pairs = {(dq_type[n.input[0]].name, dq_type[n.input[1]].name) for n in model.graph.node
             if n.op_type == "MatMul" and n.input[0] in dq_type and n.input[1] in dq_type}
    assert pairs and pairs <= {("uint16", "uint8"), ("uint8", "uint16"), ("uint8", "uint8")}, pairs


def test_every_node_of_the_qdq_graph_is_placed_on_htp(out):
    import onnxruntime as ort

    from quadc.runtime.qnn_engine import htp_provider_options, htp_session_options

    so = htp_session_options(htp_provider_options(), strict=False,
                             config={"session.record_ep_graph_assignment_info": "1"})
    sess = ort.InferenceSession(str(out / "qnn" / "model.onnx"), so)
    placed = {sub.ep_name for sub in sess.get_provider_graph_assignment_info()}
    assert placed == {EP_NAME}


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("task", TASKS, ids=[t or "base" for t in TASKS])
def test_htp_reaches_30db_against_the_float_graph_on_held_out_inputs(runs, task):
    assert _sqnr(runs, task, "float", "htp") >= 30.0


@pytest.mark.parametrize("task", TASKS, ids=[t or "base" for t in TASKS])
def test_htp_agrees_with_onnx_qdq_on_cpu(runs, task):
    assert _sqnr(runs, task, "qdq", "htp") >= 30.0


def test_switching_tasks_on_one_context_gives_each_task_its_own_output(out, feeds, runs):
    engine = Engine(out / "qnn")
    feed = feeds[0]
    order = ["sepia", None, "background_removal", "sepia", "edges_to_image", None, "background_removal"]
    for task in order:
        got = engine.run(feed, task)["out_sample"]
        np.testing.assert_array_equal(got, runs[task, 0]["htp"])  # what a fresh context gave
        own = sqnr_db(runs[task, 0]["float"], got)
        others = [sqnr_db(runs[t, 0]["float"], got) for t in TASKS if t != task]
        assert own >= 28.0 and max(others) < own - 10.0, (task, own, others)


def test_verify_reports_sqnr_against_the_float_lora_as_input_graph(out, feeds, runs):
    report = get_target("qnn").verify(out / "qnn", feeds[1], "edges_to_image")
    assert report["executor"] == "qnn-htp" and report["reference"] == "float LoRA-as-input graph"
    want = sqnr_db(runs["edges_to_image", 1]["float"], runs["edges_to_image", 1]["htp"])
    assert report["outputs"]["out_sample"]["sqnr_db"] == pytest.approx(want, abs=0.01)


def test_quadc_run_executes_the_context(out, feeds, runs, tmp_path, capsys):
    from quadc.cli import main

    np.savez(tmp_path / "in.npz", **feeds[0])
    assert main(["run", str(out / "qnn"), "--task", "sepia", "--inputs", str(tmp_path / "in.npz"),
                 "-o", str(tmp_path / "y.npz")]) == 0
    assert "executor qnn-htp" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / "y.npz")["out_sample"], runs["sepia", 0]["htp"])
    assert main(["run", str(out / "qnn"), "--task", "sepia", "--inputs", str(tmp_path / "in.npz"),
                 "-o", str(tmp_path / "c.npz"), "--executor", "cpu"]) == 0
    cpu = np.load(tmp_path / "c.npz")["out_sample"]
    assert "executor cpu" in capsys.readouterr().out and sqnr_db(cpu, runs["sepia", 0]["htp"]) > 30.0


# ------------------------------------------------------------------------------------------------- errors
def test_a_context_binary_outside_the_artifact_is_refused(out, tmp_path):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(out / "qnn", art)
    ctx = onnx.load(str(art / "model_ctx.onnx"))
    for a in ctx.graph.node[0].attribute:
        if a.name == "ep_cache_context":
            a.s = b"../elsewhere/model_ctx_qnn.bin"
    onnx.save(ctx, str(art / "model_ctx.onnx"))
    with pytest.raises(QuadcError, match="leads outside"):
        check_context_files(art, art / "model_ctx.onnx")
    with pytest.raises(QuadcError, match="leads outside"):
        Engine(art)


def test_htp_refusal_names_the_ops(tmp_path):
    # Without qnn-gelu the Erf of GELU stays; HTP has no Erf.
    opts = CompileOptions(target="qnn", passes="float,quant-plan,qdq-insert",
                          pass_options={"quant-plan": {"calib_random": 1}, "qdq-insert": {"act_matmul_8bit": True}})
    with pytest.raises(QuadcError, match=r"does not run 4 node\(s\) of model.onnx \(Erf x4; e\.g\.") as err:
        compile_model(None, tmp_path / "out", opts)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_htp_matmul_pairs_are_checked_before_compiling(tmp_path):
    opts = CompileOptions(target="qnn", passes="float,quant-plan,qnn-gelu,qdq-insert",
                          pass_options={"quant-plan": {"calib_random": 1}})
    with pytest.raises(QuadcError, match=r"MatMul '.*' takes \(uint16, uint16\) \(\d+ more\), which HTP does not take; "
                                         "keep qdq-insert's act_matmul_8bit"):
        compile_model(None, tmp_path / "out", opts)


def test_target_flags_go_to_their_target(tmp_path):
    from quadc.cli import main

    assert main(["compile", "--target", "onnx-qdq", "--htp-arch", "73", "-o", str(tmp_path / "o")]) == 2
    assert main(["compile", "--target", "qnn", "--set", "qnn.htp_arch=73", "--set", "qnn.nope=1",
                 "-o", str(tmp_path / "o")]) == 2
    with pytest.raises(QuadcError, match="target 'qnn', which is not compiled here"):
        main(["--debug", "compile", "--target", "onnx-qdq", "--htp-arch", "73", "-o", str(tmp_path / "o")])
    with pytest.raises(QuadcError, match="'qnn' has no option 'nope'"):
        main(["--debug", "compile", "--target", "qnn", "--set", "qnn.nope=1", "-o", str(tmp_path / "o")])


def test_qnn_options_reach_the_context_binary(tmp_path):
    from test_qdq_insert import DOWN, UP, lora_linear_graph, lora_tasks, make_plan, qdq

    from quadc.graph import save_model
    from quadc.runtime.qnn_engine import compile_context, htp_provider_options

    graph, _ = lora_linear_graph()
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 3, 8)).astype(np.float32) for _ in range(4)]
    qdq(graph, make_plan(graph, [{"x": x, **t} for x in xs for t in lora_tasks(2)], lora_inputs=[DOWN, UP]))
    path = save_model(graph, tmp_path / "m.onnx")
    default = compile_context(path, tmp_path / "a_ctx.onnx", htp_provider_options())
    v75 = compile_context(path, tmp_path / "b_ctx.onnx", htp_provider_options(htp_arch="75"))
    assert default["ep_compatibility_info"].split(":")[4] != "75"
    assert v75["ep_compatibility_info"].split(":")[4] == "75" and v75["provider_options"]["htp_arch"] == "75"
    embedded = compile_context(path, tmp_path / "c_ctx.onnx", htp_provider_options(), embed=True)
    assert embedded["context_binary"] is None and not (tmp_path / "c_ctx_qnn.bin").exists()
