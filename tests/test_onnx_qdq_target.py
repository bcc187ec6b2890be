"""Target onnx-qdq on the bundled tiny U-Net: one QDQ graph, every task's uint8 LoRA under one shared
encoding per slot, the base model, determinism, verify, the float-input variant and QNN HTP (when the
onnxruntime-qnn HTP backend runs here).

The artifacts are compiled by the real pipeline, the ``quant-plan`` pass included, calibrated on feeds this
module writes (``CALIB``); every quality number is measured on other feeds (``EVAL``).
"""

from __future__ import annotations

import json
import types

import numpy as np
import onnx
import pytest
from test_qdq_insert import make_plan

from quadc import frontend
from quadc.compiler import CompileOptions, compile_model
from quadc.errors import QuadcError
from quadc.lora.pack import quantize_task, read_packed
from quadc.quant.affine import sqnr_db
from quadc.quant.encodings import read_encodings
from quadc.runtime.engine import Engine
from quadc.targets import get_target
from quadc.testing_lora import random_lora, write_kohya

TASKS = ("alpha", "beta", "gamma")
MODULES = ["attn1.to_q", "attn2.to_v", "ff.net.2", "resnets.0.conv1", "proj_in"]


def unet_feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
             "timestep": np.array([rng.integers(0, 1000)], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 8, 32)).astype(np.float32)} for _ in range(n)]


#: Calibration feeds (given to the planner as a calib_dir) and the held-out feeds quality is measured on.
CALIB = unet_feeds(8, seed=0)
EVAL = unet_feeds(2, seed=1)


def test_eval_feeds_are_not_calibration_feeds():
    for feed in EVAL:
        assert not any(np.array_equal(feed["sample"], c["sample"]) for c in CALIB)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, bundled_unet):
    """(root, lora paths): onnx-qdq artifacts (twice, and the float-input variant) and the float one."""
    root = tmp_path_factory.mktemp("onnx_qdq")
    _, info = frontend.load(bundled_unet)
    paths = {}
    for i, name in enumerate(TASKS):
        lora = random_lora(info, modules=MODULES, rank=4, seed=i, scale_std=0.3, name=name)
        paths[name] = str(write_kohya(lora, root / f"{name}.safetensors"))
    calib = root / "calib"
    calib.mkdir()
    for i, feed in enumerate(CALIB):
        np.savez(calib / f"feed{i}.npz", **feed)
    plan = {"calib_dir": str(calib)}
    for out in ("q", "q2"):
        compile_model(bundled_unet, root / out, CompileOptions(target="onnx-qdq", loras=paths,
                                                               pass_options={"quant-plan": plan}))
    compile_model(bundled_unet, root / "qf", CompileOptions(target="onnx-qdq", loras=paths, pass_options={
        "quant-plan": {**plan, "lora_float_inputs": True}}))
    compile_model(bundled_unet, root / "f", CompileOptions(target="onnx", loras=paths))
    return root, paths


@pytest.fixture(scope="module")
def outputs(compiled):
    """Per task (None = base): (float output, quantized output) on one held-out input."""
    root, _ = compiled
    feed = EVAL[0]
    qe, fe = Engine(root / "q"), Engine(root / "f")
    return {task: (fe.run(feed, task)["out_sample"], qe.run(feed, task)["out_sample"]) for task in (None, *TASKS)}


def test_target_is_registered():
    target = get_target("onnx-qdq")
    assert target.pipeline().names == ["lora-inputs", "const-fold", "dce", "quant-plan", "qdq-insert"]


def test_artifact_layout_and_manifest(compiled):
    root, _ = compiled
    art = root / "q"
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["target"] == "onnx-qdq" and manifest["precision"] == "w8a16" and manifest["opset"] == 21
    assert manifest["encodings"] == "encodings.json" and manifest["quant"]["lora_inputs"] == "uint8"
    assert manifest["quant"]["lora_policy"] in ("anchor", "unified")  # chosen by the planner's QSS
    assert manifest["shared_rom_bytes"] == sum((art / f).stat().st_size for f in manifest["graph_files"])
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    types_ = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    slot_inputs = [s[side]["name"] for s in manifest["lora_slots"] for side in ("down", "up")]
    assert len(slot_inputs) == 2 * len(manifest["lora_slots"]) > 0
    assert all(types_[n] == onnx.TensorProto.UINT8 for n in slot_inputs)
    assert all(s[side]["dtype"] == "uint8" for s in manifest["lora_slots"] for side in ("down", "up"))
    for task in TASKS:
        entry = manifest["tasks"][task]
        assert entry["dtype"] == "uint8" and 0.0 <= entry["saturated"] < 0.01
        if manifest["quant"]["lora_policy"] == "unified" or task == manifest["quant"]["anchor"]:
            assert entry["saturated"] == 0.0  # the shared ranges hold all of the anchor's (or every) task
        assert entry["lora_rom_bytes"] == entry["files"]["onnx_adapter"]["bytes"]
        for f in entry["files"].values():
            assert (art / f["path"]).stat().st_size == f["bytes"]
        # uint8 LoRA: a quarter of the float file's tensor bytes (plus headers).
        float_entry = json.loads((root / "f" / "manifest.json").read_text())["tasks"][task]
        assert entry["files"]["safetensors"]["bytes"] < float_entry["files"]["safetensors"]["bytes"] / 3


def test_one_encoding_per_slot_shared_by_every_task(compiled):
    root, _ = compiled
    art = root / "q"
    encodings = read_encodings(art / "encodings.json")
    manifest = json.loads((art / "manifest.json").read_text())
    slot_inputs = sorted(s[side]["name"] for s in manifest["lora_slots"] for side in ("down", "up"))
    # LoRA slot inputs are activation entries named by input name; nothing in the file names a task.
    assert sorted(n for n in encodings.activations if n.endswith((".lora_down", ".lora_up"))) == slot_inputs
    text = (art / "encodings.json").read_text()
    assert not any(task in text for task in TASKS)
    assert not any("encoding" in k for e in manifest["tasks"].values() for k in e)
    # The graph dequantizes each slot input with exactly that encoding...
    model = onnx.load(str(art / "model.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in slot_inputs:
            enc = encodings.activations[node.input[0]]
            assert inits[node.input[1]].tobytes() == enc.scale.tobytes()
            assert inits[node.input[2]] == enc.zero_point
    # ... and every task's stored bytes dequantize with it to that task's packed LoRA: within half a step
    # inside the grid, the grid's end beyond it; the manifest's saturated fraction counts the latter.
    slots = {s["module"]: s for s in manifest["lora_slots"]}
    assert slots
    for task in TASKS:
        stored = read_packed(art / manifest["tasks"][task]["files"]["safetensors"]["path"])
        adapter = read_packed(art / manifest["tasks"][task]["files"]["onnx_adapter"]["path"])
        assert sorted(stored) == slot_inputs
        outside = total = 0
        for name in slot_inputs:
            assert stored[name].dtype == np.uint8 and np.array_equal(stored[name], adapter[name])
            want = read_packed(root / "f" / "lora" / f"{task}.safetensors")[name]
            enc = encodings.activations[name]
            step, zp = float(enc.scale), int(enc.zero_point)
            lo, hi = (0 - zp) * step - step / 2, (255 - zp) * step + step / 2
            inside = (want >= lo) & (want <= hi)
            got = (stored[name].astype(np.float64) - zp) * step
            assert np.all(np.abs(got - want)[inside] <= step * 0.5 + 1e-7), (task, name)
            assert np.all(stored[name][want < lo] == 0) and np.all(stored[name][want > hi] == 255), (task, name)
            outside += int(np.count_nonzero(~inside))
            total += want.size
        assert manifest["tasks"][task]["saturated"] == pytest.approx(outside / total, abs=1e-8), task


def test_each_task_gets_its_own_output(outputs):
    # On a held-out feed (8 calibration feeds: some activations of a fresh feed leave their ranges) and with
    # the anchor policy saturating a few values of the other tasks, 28-38 dB were measured here.
    for task, (want, got) in outputs.items():
        assert sqnr_db(want, got) > (33.0 if task is None else 26.0), task  # beta saturates under the anchor gamma
    # Tasks differ from each other and from the base far more (15 dB, 30x in power) than quantization moves
    # either of them (on the trained bundled U-Net: quantization 40-43 dB, pairs 16.4-18.4 dB).
    for a, b in [("alpha", "beta"), ("beta", "gamma"), ("alpha", None)]:
        quant = min(sqnr_db(*outputs[a]), sqnr_db(*outputs[b]))
        assert sqnr_db(outputs[a][1], outputs[b][1]) < quant - 15.0, (a, b)


def test_base_model_binds_the_zero_point(compiled, outputs):
    root, _ = compiled
    art = root / "q"
    engine = Engine(art)
    manifest = engine.manifest
    zero_task = {s[side]["name"]: np.full(s[side]["shape"], s[side]["zero_point"], np.uint8)
                 for s in manifest["lora_slots"] for side in ("down", "up")}
    assert all(np.array_equal(engine._zeros[k], v) for k, v in zero_task.items())
    # quantize_task of an all-zero LoRA is exactly those zero points.
    plan_like = types.SimpleNamespace(lora=read_encodings(art / "encodings.json").activations)
    zeros = {k: np.zeros(v.shape, np.float32) for k, v in zero_task.items()}
    assert all(np.array_equal(v, zero_task[k]) for k, v in quantize_task(zeros, plan_like).items())
    import onnxruntime as ort

    sess = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = EVAL[0]
    np.testing.assert_array_equal(sess.run(None, {**feed, **zero_task})[0], outputs[None][1])


def test_compile_is_deterministic(compiled):
    root, _ = compiled
    files = sorted(p.relative_to(root / "q") for p in (root / "q").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(root / "q2") for p in (root / "q2").rglob("*") if p.is_file())
    for rel in files:
        assert (root / "q" / rel).read_bytes() == (root / "q2" / rel).read_bytes(), rel


def test_verify_measures_against_the_float_lora_as_input_graph(compiled):
    root, paths = compiled
    report = get_target("onnx-qdq").verify(root / "q", EVAL[1], "beta", loras=paths)
    out = report["outputs"]["out_sample"]
    assert report["reference"] == "float LoRA-as-input graph"
    # Independent reference: the float `onnx` artifact with the same task bound, and the quantized run.
    want = Engine(root / "f").run(EVAL[1], "beta")["out_sample"].astype(np.float64)
    got = Engine(root / "q").run(EVAL[1], "beta")["out_sample"].astype(np.float64)
    assert abs(out["sqnr_db"] - 10 * np.log10(np.sum(want**2) / np.sum((want - got) ** 2))) < 0.01
    assert out["sqnr_db"] > 30.0 and out["max_abs_err"] == pytest.approx(np.max(np.abs(want - got)), rel=1e-4)


def test_verify_refuses_a_missing_lora_before_any_work(compiled, bundled_unet, monkeypatch):
    """The float reference needs every task's LoRA: without one, verify says so before the artifact runs
    and before the source model is hashed (minutes and seconds at full size)."""
    from quadc.runtime import engine as engine_module
    from quadc.targets.float_reference import _CACHE

    root, paths = compiled
    work: list[str] = []
    run = engine_module.Engine.run
    monkeypatch.setattr(engine_module.Engine, "run", lambda self, *a, **k: work.append("run") or run(self, *a, **k))
    monkeypatch.setattr("quadc.graph.model_sha256", lambda *a, **k: work.append("sha256") or "")
    _CACHE.clear()
    with pytest.raises(QuadcError, match=f"verify needs the LoRA compiled as task '{TASKS[1]}'"):
        get_target("onnx-qdq").verify(root / "q", EVAL[1], TASKS[0], model=bundled_unet,
                                      loras={TASKS[0]: paths[TASKS[0]]})
    assert work == []


def test_float_lora_inputs_variant(compiled, outputs):
    root, _ = compiled
    art = root / "qf"
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["quant"]["lora_inputs"] == "float"
    assert all(e["dtype"] == "float32" for e in manifest["tasks"].values())
    engine = Engine(art)
    feed = EVAL[0]
    for task in ("alpha", None):
        got = engine.run(feed, task)["out_sample"]
        assert sqnr_db(outputs[task][0], got) > 30.0
        # Same shared encodings, quantized in the graph instead of in the file: the same numbers.
        np.testing.assert_allclose(got, outputs[task][1], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ QNN HTP


def _htp_session_options(strict: bool):
    ort = pytest.importorskip("onnxruntime")
    qnn = pytest.importorskip("onnxruntime_qnn")
    if "QNNExecutionProvider" not in [d.ep_name for d in ort.get_ep_devices()]:
        try:
            ort.register_execution_provider_library("QNNExecutionProvider", qnn.get_library_path())
        except Exception as exc:  # pragma: no cover - depends on the machine
            pytest.skip(f"QNN execution provider does not load here: {exc}")
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    if not devices:  # pragma: no cover
        pytest.skip("no QNN device")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if strict:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_provider_for_devices(devices[:1], {"backend_type": "htp"})
    return so


def test_htp_runs_uint8_lora_graph_like_cpu():
    """A QDQ linear layer with a uint8 LoRA slot and an attention-style u16 x u8 MatMul, all on HTP."""
    import onnxruntime as ort
    from test_qdq_insert import DOWN, UP, lora_linear_graph, lora_tasks, qdq, run

    from quadc.graph import to_model_bytes

    graph, _ = lora_linear_graph()
    tasks = lora_tasks(2)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 3, 8)).astype(np.float32) for _ in range(16)]
    plan = make_plan(graph, [{"x": x, **t} for x in xs for t in tasks], lora_inputs=[DOWN, UP])
    qdq(graph, plan, act_matmul_8bit=True)
    so = _htp_session_options(strict=True)
    try:
        sess = ort.InferenceSession(to_model_bytes(graph), so)
    except Exception as exc:  # pragma: no cover - HTP backend not usable on this machine
        pytest.skip(f"QNN HTP backend cannot run here: {exc}")
    for task in tasks:
        feed = {"x": xs[0], **quantize_task(task, plan)}
        cpu = run(graph, feed)[0]
        htp = sess.run(None, feed)[0]
        assert sqnr_db(cpu, htp) > 35.0


def test_htp_runs_the_tiny_unet_artifact(compiled, outputs):
    """The whole artifact through the Engine on HTP (4 Erf nodes of GELU fall back to CPU: QNN has no Erf)."""
    root, _ = compiled
    so = _htp_session_options(strict=False)
    try:
        engine = Engine(root / "q", providers=[], session_options=so)
    except Exception as exc:  # pragma: no cover - HTP backend not usable on this machine
        pytest.skip(f"QNN HTP backend cannot run here: {exc}")
    assert engine.session.get_providers()[0] == "QNNExecutionProvider"
    feed = EVAL[0]
    for task in ("beta", None):
        got = engine.run(feed, task)["out_sample"]
        assert sqnr_db(outputs[task][1], got) > 27.0, task  # 30-37 dB measured on this held-out feed
        assert sqnr_db(outputs[task][0], got) > 27.0, task
