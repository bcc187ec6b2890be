"""Targets ``neuropilot`` and ``enn`` on the bundled tiny U-Net and its bundled LoRAs (default pipeline:
one calibration on 4 synthetic feeds, seed 0).

Quality is measured on synthetic feeds with another seed (not used for calibration) against the float
LoRA-as-input graph of the source model with each task's float LoRA bound, on ORT CPU. The written
model is read back through the TFLite schema and checked against every 16x8 kernel constraint measured
in ``test_tflite_kernels.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from ai_edge_litert import schema_py_generated as S  # noqa: E402

from quadc.compiler import CompileOptions, bundled_loras, bundled_model, compile_model  # noqa: E402
from quadc.graph import load_model  # noqa: E402
from quadc.quant.affine import sqnr_db  # noqa: E402
from quadc.quant.feeds import random_feeds  # noqa: E402
from quadc.runtime.engine import Engine  # noqa: E402
from quadc.runtime.tflite_engine import TfliteEngine  # noqa: E402
from quadc.targets import get_target  # noqa: E402
from quadc.targets.enn import ENN_OPS  # noqa: E402
from quadc.targets.float_reference import float_reference  # noqa: E402
from quadc.targets.neuropilot import NEUROPILOT_OPS  # noqa: E402
from quadc.targets.tflite.writer import builtin_name, read_model  # noqa: E402

TASKS = tuple(bundled_loras())
TARGETS = ("neuropilot", "enn")
NO_INT16_KERNEL = {"SQUARED_DIFFERENCE", "HARD_SWISH", "COS", "SIN", "POW", "EXP"}
MOVEMENT = {"RESHAPE", "TRANSPOSE", "STRIDED_SLICE", "SPLIT", "PAD", "RESIZE_NEAREST_NEIGHBOR"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tflite_targets")
    for name in TARGETS:
        compile_model(None, root / name, CompileOptions(target=name))
    return root


@pytest.fixture(scope="module")
def test_feeds():
    """Two feeds from the synthetic distribution with a seed calibration did not use."""
    return random_feeds(load_model(bundled_model()), 2, seed=1234)


@pytest.fixture(scope="module")
def references(artifacts, test_feeds):
    manifest = json.loads((artifacts / "enn" / "manifest.json").read_text())
    return {task: [float_reference(manifest, f, task)["out_sample"] for f in test_feeds] for task in (None, *TASKS)}


def _model(art):
    return read_model((art / "model.tflite").read_bytes())


def _ops(model):
    codes = model.operatorCodes
    sub = model.subgraphs[0]
    return [(builtin_name(codes[o.opcodeIndex].builtinCode), o) for o in sub.operators]


def _q(t):
    q = t.quantization
    return (tuple(q.scale), tuple(q.zeroPoint)) if q is not None and q.scale is not None else None


def test_pipelines_and_registration():
    for name in TARGETS:
        assert get_target(name).pipeline().names == ["lora-inputs", "const-fold", "dce", "tflite::legalize",
                                                     "quant-plan"]


@pytest.mark.parametrize("name", TARGETS)
def test_artifact_files_and_manifest(artifacts, name):
    art = artifacts / name
    m = json.loads((art / "manifest.json").read_text())
    assert m["target"] == name and m["runtime"] == "litert" and m["graph"] == "model.tflite"
    assert m["shared_rom_bytes"] == sum((art / f).stat().st_size for f in m["graph_files"])
    assert set(m["tasks"]) == set(TASKS)
    kinds = {s["kind"] for s in m["tflite"]["inputs"]}
    assert kinds == {"model", "lora", "host"}
    assert [s["name"] for s in m["tflite"]["inputs"] if s["kind"] == "model"] == ["sample", "encoder_hidden_states"]
    for entry in m["tasks"].values():
        f = entry["files"]["safetensors"]
        assert (art / f["path"]).stat().st_size == f["bytes"] == entry["lora_rom_bytes"]
    if name == "enn":
        qm = json.loads((art / "qdq" / "manifest.json").read_text())
        assert qm["target"] == "onnx-qdq" and qm["form_of"] == "enn" and set(qm["tasks"]) == set(TASKS)


@pytest.mark.parametrize("name", TARGETS)
def test_written_graph_keeps_every_16x8_constraint(artifacts, name):
    """int16 activations with zero point 0 (no uint16), int8 symmetric weights, no kernel-less op, equal
    scales into CONCATENATION and through data movement, 1/32768 after LOGISTIC/SOFTMAX/TANH, CONV_2D's
    int32 bias flagged, FULLY_CONNECTED 2-D weights, ops inside the vendor plugin's list."""
    model = _model(artifacts / name)
    tensors = model.subgraphs[0].tensors
    types = {t.type for t in tensors}
    assert S.TensorType.UINT16 not in types and S.TensorType.UINT8 not in types
    for t in tensors:
        if t.type in (S.TensorType.INT16, S.TensorType.INT8):
            assert t.quantization is not None and all(z == 0 for z in t.quantization.zeroPoint), t.name
    allowed = set(NEUROPILOT_OPS if name == "neuropilot" else ENN_OPS)
    for op, o in _ops(model):
        assert op in allowed and op not in NO_INT16_KERNEL, op
        ins = [tensors[i] for i in o.inputs if i >= 0]
        outs = [tensors[i] for i in o.outputs]
        if op == "CONCATENATION":
            assert len({_q(t) for t in ins + outs}) == 1
        if op in MOVEMENT:
            data = ins[1] if op == "SPLIT" else ins[0]
            assert all(_q(t) == _q(data) for t in outs), op
        if op in ("LOGISTIC", "SOFTMAX", "TANH"):
            assert outs[0].quantization.scale == [pytest.approx(1 / 32768)]
        if op == "CONV_2D":
            assert tensors[o.inputs[2]].type == S.TensorType.INT32
            assert o.builtinOptions.quantizedBiasType == S.TensorType.INT32
        if op == "FULLY_CONNECTED":
            assert len(ins[1].shape) == 2 and ins[1].type == S.TensorType.INT8
        if op in ("ADD", "SUB"):
            assert o.builtinOptions.potScaleInt16 is False
        if op in ("CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL"):
            assert ins[0].type == S.TensorType.INT16


@pytest.mark.parametrize("name", TARGETS)
def test_lora_inputs_int8_one_shared_encoding(artifacts, name):
    art = artifacts / name
    m = json.loads((art / "manifest.json").read_text())
    model = _model(art)
    sub = model.subgraphs[0]
    by_name = {sub.tensors[i].name.decode() if isinstance(sub.tensors[i].name, bytes) else sub.tensors[i].name:
               sub.tensors[i] for i in sub.inputs}
    from safetensors.numpy import load_file

    files = {t: load_file(str(art / e["files"]["safetensors"]["path"])) for t, e in m["tasks"].items()}
    for slot in m["lora_slots"]:
        for side in ("down", "up"):
            spec = slot[side]
            t = by_name[spec["name"]]
            assert t.type == S.TensorType.INT8 and list(t.quantization.zeroPoint) == [0]
            assert t.quantization.scale == [pytest.approx(spec["scale"], rel=1e-6)]
            for arrays in files.values():
                if spec["name"] in arrays:
                    assert arrays[spec["name"]].dtype == np.int8 and list(arrays[spec["name"]].shape) == list(t.shape)


@pytest.mark.parametrize("name", TARGETS)
def test_sqnr_against_float_lora_graph_on_unseen_inputs(artifacts, test_feeds, references, name):
    engine = TfliteEngine(artifacts / name)
    for task in (None, *TASKS):
        for feed, ref in zip(test_feeds, references[task], strict=True):
            got = engine.run(feed, task)["out_sample"]
            assert sqnr_db(ref, got) >= 30.0, (name, task)


def test_enn_qdq_form_runs_and_agrees_with_tflite(artifacts, test_feeds, references):
    art = artifacts / "enn"
    qdq, tfl = Engine(art / "qdq"), Engine(art)
    assert isinstance(tfl, TfliteEngine)
    for task in (None, *TASKS):
        for feed, ref in zip(test_feeds, references[task], strict=True):
            a, b = qdq.run(feed, task)["out_sample"], tfl.run(feed, task)["out_sample"]
            assert sqnr_db(ref, a) >= 30.0
            assert sqnr_db(a, b) >= 30.0  # the two forms of one scheme agree


def test_tflite_agrees_with_onnx_qdq_target(artifacts, tmp_path, test_feeds):
    """The separate onnx-qdq artifact (W8A16, uint8 LoRA) and the TFLite one compute the same function."""
    compile_model(None, tmp_path / "q", CompileOptions(target="onnx-qdq"))
    qdq, tfl = Engine(tmp_path / "q"), Engine(artifacts / "neuropilot")
    for task in TASKS:
        a, b = qdq.run(test_feeds[0], task)["out_sample"], tfl.run(test_feeds[0], task)["out_sample"]
        assert sqnr_db(a, b) >= 20.0


def test_task_switch_on_one_interpreter(artifacts, test_feeds, references):
    """Switching back and forth on one loaded interpreter gives each task its own output."""
    engine = TfliteEngine(artifacts / "neuropilot")
    interpreter = engine.interpreter
    feed = test_feeds[0]
    order = [TASKS[0], TASKS[1], None, TASKS[2], TASKS[0], TASKS[2], TASKS[1]]
    outs = [(task, engine.run(feed, task)["out_sample"]) for task in order]
    assert engine.interpreter is interpreter
    for task, out in outs:
        own = sqnr_db(references[task][0], out)
        others = [sqnr_db(references[t][0], out) for t in (None, *TASKS) if t != task]
        assert own >= 30.0 and own > max(others) + 3, task
    first = dict(outs[:4])
    for task, out in outs[4:]:
        np.testing.assert_array_equal(out, first[task])


def test_threads_on_one_interpreter_and_byte_bounded_cache(artifacts, test_feeds):
    """Several threads with interleaved tasks on one TfliteEngine get their single-threaded outputs; the
    task cache keeps at most ``cache_bytes`` of int8 tensors."""
    import threading

    one_task = max(sum(np.prod(s) for s in _task_shapes(artifacts / "neuropilot", t)) for t in TASKS)
    engine = TfliteEngine(artifacts / "neuropilot", cache_size=None, cache_bytes=int(one_task))
    jobs = [(f, t) for f in test_feeds for t in (None, *TASKS)]
    want = [engine.run(f, t)["out_sample"] for f, t in jobs]
    got: dict[tuple[int, int], np.ndarray] = {}

    def work(i: int) -> None:
        for k in range(len(jobs)):
            j = (k + i) % len(jobs)
            got[i, j] = engine.run(*jobs[j])["out_sample"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 * len(jobs)
    for (i, j), out in got.items():
        np.testing.assert_array_equal(out, want[j], err_msg=f"thread {i} job {j}")
    assert len(engine.store.cached()) <= 1 and engine.store.cached_bytes <= one_task


def _task_shapes(art, task):
    manifest = json.loads((art / "manifest.json").read_text())
    modules = set(manifest["tasks"][task]["modules"])
    return [side["shape"] for slot in manifest["lora_slots"] if slot["module"] in modules
            for side in (slot["down"], slot["up"])]


def test_verify_reports(artifacts, test_feeds):
    report = get_target("enn").verify(artifacts / "enn", test_feeds[0], TASKS[0])
    assert report["outputs"]["out_sample"]["sqnr_db"] >= 30.0
    assert report["qdq"]["out_sample"]["sqnr_db"] >= 30.0
    assert report["qdq"]["out_sample"]["agreement_sqnr_db"] >= 30.0


def test_compile_is_deterministic(artifacts, tmp_path):
    compile_model(None, tmp_path / "again", CompileOptions(target="neuropilot"))
    for f in ("model.tflite", "host.onnx", "manifest.json", f"lora/{TASKS[0]}.safetensors"):
        assert (tmp_path / "again" / f).read_bytes() == (artifacts / "neuropilot" / f).read_bytes(), f


def test_quadc_run_cli(artifacts, test_feeds, tmp_path):
    np.savez(tmp_path / "in.npz", **test_feeds[0])
    cmd = [sys.executable, "-m", "quadc.cli", "run", str(artifacts / "neuropilot"), "--task", TASKS[1],
           "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")]
    subprocess.run(cmd, check=True, capture_output=True)
    got = np.load(tmp_path / "out.npz")["out_sample"]
    want = TfliteEngine(artifacts / "neuropilot").run(test_feeds[0], TASKS[1])["out_sample"]
    np.testing.assert_array_equal(got, want)


def test_unknown_task_and_missing_input(artifacts, test_feeds):
    from quadc.errors import QuadcError

    engine = TfliteEngine(artifacts / "neuropilot")
    with pytest.raises(QuadcError, match="unknown task"):
        engine.run(test_feeds[0], "nope")
    with pytest.raises(QuadcError, match="timestep"):
        engine.run({k: v for k, v in test_feeds[0].items() if k != "timestep"})
