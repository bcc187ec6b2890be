"""One calibration, several encoding schemes, every target: ``quadc compile --target all``.

- compile_all calibrates once (calibrate calls counted) where separate compiles calibrate once each, and
  every target's folder holds the bytes a separate compile of that target writes;
- a target whose passes change the graph before planning gets its own calibration (the cache is keyed
  by the graph, not shared blindly);
- a second encoding scheme (int16 symmetric, TFLite-style) derives its own encodings, QSS and anchor from
  the same calibration: same ranges, other types.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from quadc.compiler import CompileOptions, compile_model, prepare
from quadc.errors import QuadcError
from quadc.lora.pack import pack_task
from quadc.passes import PassPipeline, run_pipeline
from quadc.quant import task_calibration
from quadc.quant.affine import QType
from quadc.quant.calibration_cache import graph_fingerprint
from quadc.quant.schemes import QNN_HTP, EncodingScheme, get_scheme, register_scheme
from quadc.targets import discover_targets, get_target
from quadc.targets.onnx_qdq import OnnxQdqTarget

CALIB = {"calib_random": 2}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def count_calibrations(monkeypatch):
    """A list that gets one entry per calibration run (quadc.quant.calibrate.calibrate call)."""
    calls: list[int] = []
    real = task_calibration.calibrate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(task_calibration, "calibrate", counting)
    return calls


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """compile_all once, then each target separately: (root, index, calls, seconds) with calibrate counted."""
    root = tmp_path_factory.mktemp("target_all")
    calls: dict[str, int] = {}
    seconds: dict[str, float] = {}
    real = task_calibration.calibrate
    count = [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(task_calibration, "calibrate", counting)
        start = time.perf_counter()
        index = compile_model(None, root / "all", CompileOptions(target="all", pass_options={"quant-plan": CALIB}))
        seconds["all"], calls["all"] = time.perf_counter() - start, count[0]
        for name in index["targets"]:
            count[0] = 0
            opts = {"quant-plan": CALIB} if "quant-plan" in get_target(name).pipeline().names else {}
            start = time.perf_counter()
            compile_model(None, root / name, CompileOptions(target=name, pass_options=opts))
            seconds[name], calls[name] = time.perf_counter() - start, count[0]
    return root, index, calls, seconds


def test_targets_share_one_calibration_per_distinct_graph(built):
    root, index, calls, seconds = built
    available = [n for n, cls in discover_targets().items() if cls.available()[0]]
    assert sorted(index["targets"]) == sorted(available) and {"onnx", "onnx-qdq"} <= set(available)
    # Separately, every quantized target calibrates once; together, once per calibration key (what a
    # calibration depends on, recorded in each manifest), which the QDQ targets share.
    quantized = [n for n in index["targets"] if calls[n] == 1]
    assert all(calls[n] == 0 for n in index["targets"] if n not in quantized)
    manifests = {n: json.loads((root / "all" / index["targets"][n]["manifest"]).read_text()) for n in quantized}
    keys = {n: m["quant"]["calibration"] for n, m in manifests.items()}
    assert calls["all"] == index["calibrations"] == len(set(keys.values())) < len(quantized)
    if "qnn" in keys:
        assert keys["qnn"] == keys["onnx-qdq"]
    assert index["shared_passes"] == ["lora-inputs", "const-fold", "dce"]
    for name, entry in index["targets"].items():
        manifest = json.loads((root / "all" / entry["manifest"]).read_text())
        assert manifest["target"] == name
        assert [p["pass"] for p in manifest["passes"]][:3] == index["shared_passes"]
    sep = sum(seconds[n] for n in index["targets"])
    print(f"\n--target all {seconds['all']:.1f} s vs separate compiles {sep:.1f} s "
          f"({', '.join(f'{n} {seconds[n]:.1f}' for n in index['targets'])})")


def test_each_target_folder_equals_its_separate_compile(built):
    root, index, _, _ = built
    for name in index["targets"]:
        together, alone = _files(root / "all" / name), _files(root / name)
        assert sorted(together) == sorted(alone), name
        different = [f for f in together if together[f] != alone[f]]
        assert not different, f"{name}: {different}"


def test_all_refuses_a_single_pipeline_and_unknown_options(tmp_path):
    with pytest.raises(QuadcError, match="--target all every target uses its own"):
        compile_model(None, tmp_path / "a", CompileOptions(target="all", passes="float"))
    with pytest.raises(QuadcError, match="pass 'nope', which no target's pipeline has"):
        compile_model(None, tmp_path / "b", CompileOptions(target="all", pass_options={"nope": {"x": 1}}))
    with pytest.raises(QuadcError, match="target 'mynpu', which is not compiled here"):
        compile_model(None, tmp_path / "c", CompileOptions(target="all", target_options={"mynpu": {"x": 1}}))
    assert not any(tmp_path.iterdir())


class _EarlyGelu(OnnxQdqTarget):
    """A quantized target whose pipeline changes the graph before planning (Erf-GELU fused first)."""

    name = "early-gelu"
    passes = ("float", "qnn-gelu", "qdq")


def test_a_graph_changed_before_planning_gets_its_own_calibration(tmp_path, monkeypatch, count_calibrations):
    targets = {"onnx-qdq": discover_targets()["onnx-qdq"], "early-gelu": _EarlyGelu}
    monkeypatch.setattr("quadc.compiler.discover_targets", lambda: targets)
    index = compile_model(None, tmp_path / "out", CompileOptions(target="all", pass_options={"quant-plan": {"calib_random": 1}}))
    assert sorted(index["targets"]) == ["early-gelu", "onnx-qdq"]
    assert index["calibrations"] == 2 and len(count_calibrations) == 2


def test_unavailable_targets_are_skipped_with_the_reason(tmp_path, monkeypatch):
    targets = {"onnx": discover_targets()["onnx"], "onnx-qdq": discover_targets()["onnx-qdq"]}

    class Missing(targets["onnx"]):
        name = "missing"

        @classmethod
        def available(cls):
            return False, "its SDK is not installed"

    monkeypatch.setattr("quadc.compiler.discover_targets", lambda: {**targets, "missing": Missing})
    index = compile_model(None, tmp_path / "out", CompileOptions(target="all", pass_options={"quant-plan": {"calib_random": 1}}))
    assert index["skipped"] == {"missing": "its SDK is not installed"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["onnx", "onnx-qdq", "targets.json"]


def test_an_unavailable_target_is_refused_before_any_work(tmp_path, monkeypatch, count_calibrations):
    from quadc.targets.qnn import QnnTarget

    monkeypatch.setattr(QnnTarget, "available", classmethod(lambda cls: (False, "onnxruntime-qnn is not installed")))
    with pytest.raises(QuadcError, match="target 'qnn' is not available here: onnxruntime-qnn is not installed"):
        compile_model(None, tmp_path / "o", CompileOptions(target="qnn"))
    assert not (tmp_path / "o").exists() and not count_calibrations


# ------------------------------------------------------------------------------------------ fingerprints
def _tiny_graph(value: float = 2.0) -> gs.Graph:
    x = gs.Variable("x", np.float32, [2])
    y = gs.Variable("y", np.float32, [2])
    w = gs.Constant("w", np.array([value, 1.0], np.float32))
    return gs.Graph(nodes=[gs.Node("Mul", "m", inputs=[x, w], outputs=[y])], inputs=[x], outputs=[y], opset=17)


def test_graph_fingerprint_follows_what_the_graph_computes():
    assert graph_fingerprint(_tiny_graph()) == graph_fingerprint(_tiny_graph())
    assert graph_fingerprint(_tiny_graph()) != graph_fingerprint(_tiny_graph(3.0))  # a weight value
    renamed = _tiny_graph()
    renamed.outputs[0].name = "z"
    assert graph_fingerprint(renamed) != graph_fingerprint(_tiny_graph())
    other_op = _tiny_graph()
    other_op.nodes[0].op = "Add"
    assert graph_fingerprint(other_op) != graph_fingerprint(_tiny_graph())


# --------------------------------------------------------------------------- one calibration, two schemes
#: A TFLite-16x8-like scheme: int16 symmetric activations, int8 symmetric per-channel weights, int8 zero-point-0
#: LoRA inputs (the tflite worker registers the real one; this is what the hook must carry).
SYM16 = EncodingScheme(name="test-sym16x8", description="test: int16 symmetric", activation16=QType.INT16,
                       activation8=QType.INT8, activation_symmetric=True, weight=QType.INT8, weight_symmetric=True,
                       per_channel=True, lora=QType.INT8, lora_symmetric=True)


@pytest.fixture(scope="module")
def float_graph():
    graph, ctx, _ = prepare(None, {})
    graph, _ = run_pipeline(graph, PassPipeline("float"), ctx)
    return graph, ctx


def _plan(graph, ctx, scheme: str, **opts):
    from quadc.passes import get_pass

    ctx.options["scheme"] = scheme
    get_pass("quant-plan", {"calib_random": 1, **opts}).run(graph, ctx)
    return ctx.plan


def test_second_scheme_derives_from_the_same_calibration(float_graph, count_calibrations):
    register_scheme(SYM16)
    graph, ctx = float_graph
    htp = _plan(graph, ctx, "qnn-htp", lora_policy="anchor")
    sym = _plan(graph, ctx, "test-sym16x8", lora_policy="anchor")
    assert len(count_calibrations) == 1  # the second plan reused the first calibration
    assert htp.scheme == "qnn-htp" and sym.scheme == "test-sym16x8"
    assert htp.ranges == sym.ranges and len(htp.ranges) > 100
    assert {e.qtype for e in htp.activations.values()} == {QType.UINT16}
    assert {e.qtype for e in sym.activations.values()} == {QType.INT16}
    assert all(int(e.zero_point) == 0 for e in sym.activations.values())
    assert all(e.per_channel or e.scale.ndim == 0 for e in sym.weights.values())
    assert {e.qtype for e in sym.weights.values()} == {QType.INT8}
    assert all(np.all(e.zero_point == 0) for e in sym.weights.values())
    assert {e.qtype for e in sym.lora.values()} == {QType.INT8} and {e.qtype for e in htp.lora.values()} == {QType.UINT8}
    # QSS is scored under each scheme's LoRA type, so the scores differ; the anchor is the top one of each.
    assert htp.qss.keys() == sym.qss.keys() and htp.qss != sym.qss
    assert sym.anchor == max(sym.qss, key=sym.qss.get) and htp.anchor == max(htp.qss, key=htp.qss.get)
    # The anchor's shared int8 encoding is symmetric over its own packed tensor: scale = max|t| / 127.5.
    packed = pack_task(ctx.loras[sym.anchor], ctx.lora_slots)
    for name, enc in sym.lora.items():
        if np.any(packed[name]):
            assert int(enc.zero_point) == 0
            assert np.isclose(float(enc.scale), np.abs(packed[name]).max() / 127.5, rtol=1e-6), name
            assert sym.lora_ranges[name] == (float(packed[name].min()), float(packed[name].max()))


def test_unified_fallback_under_a_second_scheme(float_graph):
    register_scheme(SYM16)
    graph, ctx = float_graph
    plan = _plan(graph, ctx, "test-sym16x8", lora_policy="unified")
    assert plan.lora_policy == "unified" and plan.anchor is None
    tasks = [pack_task(lora, ctx.lora_slots) for lora in ctx.loras.values()]
    for name, enc in plan.lora.items():
        biggest = max(float(np.abs(t[name]).max()) for t in tasks)
        if biggest:
            assert np.isclose(float(enc.scale), biggest / 127.5, rtol=1e-6) and int(enc.zero_point) == 0


def test_unknown_scheme_is_one_line(float_graph):
    graph, ctx = float_graph
    with pytest.raises(QuadcError, match="unknown encoding scheme 'nope'; known schemes: .*qnn-htp"):
        _plan(graph, ctx, "nope")
    assert get_scheme(None) is QNN_HTP
