"""build_plan on the tiny U-Net: encodings of every kind, LoRA policy, a8 selection, encodings files; analyze."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from quadc import frontend
from quadc.analyze import analyze, format_analysis
from quadc.compiler import bundled_loras
from quadc.context import CompileContext
from quadc.errors import QuadcError
from quadc.lora import LoRA, LoRALayer, LoRASet
from quadc.lora.pack import pack_tasks
from quadc.passes import parse_pipeline, run_pipeline
from quadc.quant.activations import select_a8
from quadc.quant.affine import QType
from quadc.quant.calibrate import calibrate, float_tensors, measure_sqnr, static_tensors
from quadc.quant.encodings import read_encodings, write_encodings
from quadc.quant.feeds import random_feeds
from quadc.quant.plan import QuantPlan
from quadc.quant.plan_file import encodings_file_of
from quadc.quant.plan_options import PlanOptions
from quadc.quant.planner import build_plan
from quadc.quant.qss import shared_lora_encodings, task_encodings
from quadc.quant.weights import weight_axes
from quadc.testing_lora import random_lora

MODULES = ["attn1.to_q", "attn2.to_k", "ff.net.2", "resnets.0.conv1", "proj_out"]


def _heavy(lora: LoRA, name: str, seed: int = 9) -> LoRA:
    """``lora`` with 0.5% of every factor's entries made 40x larger (heavy tails)."""
    rng = np.random.default_rng(seed)
    layers = {}
    for module, layer in lora.layers.items():
        up, down = layer.up.copy(), layer.down.copy()
        for a in (up, down):
            idx = rng.choice(a.size, max(1, a.size // 200), replace=False)
            a.reshape(-1)[idx] *= 40
        layers[module] = LoRALayer(module, up, down, layer.alpha, layer.rank)
    return LoRA(name, layers, source="test", format="random")


@pytest.fixture(scope="module")
def setup(bundled_unet):
    """The tiny U-Net after the float passes with three LoRAs (two smooth, one heavy-tailed)."""
    graph, info = frontend.load(bundled_unet)
    loras = [random_lora(info, MODULES, rank=4, seed=1, name="smooth1"),
             _heavy(random_lora(info, MODULES, rank=4, seed=2), "heavy"),
             random_lora(info, MODULES, rank=8, seed=3, name="smooth2")]
    ctx = CompileContext(model_info=info)
    ctx.loras = LoRASet(loras)
    graph, _ = run_pipeline(graph, parse_pipeline("lora-inputs,const-fold,dce"), ctx)
    return graph, ctx


def _plan(setup, **options) -> QuantPlan:
    """The plan of the setup's graph with quant-plan ``options`` (parsed as the pass parses them)."""
    graph, base = setup
    return build_plan(graph, base.lora_slots, pack_tasks(base.loras, base.lora_slots), PlanOptions.from_options(options))


@pytest.fixture(scope="module")
def default_plan(setup) -> QuantPlan:
    return _plan(setup)


def test_default_plan(setup, default_plan):
    graph, base = setup
    plan = default_plan
    slots = base.lora_slots
    lora_inputs = [n for s in slots.values() for n in (s.down_input, s.up_input)]
    # LoRA inputs: ONE uint8 encoding each, shared by every task.
    assert list(plan.lora) == lora_inputs
    assert all(e.qtype is QType.UINT8 and not e.per_channel for e in plan.lora.values())
    # Activations: every float input / node output except LoRA inputs and shape-only constants; uint16.
    inputs, outputs = float_tensors(graph)
    expected = set(inputs + outputs) - set(lora_inputs) - static_tensors(graph)
    assert set(plan.activations) == expected
    assert all(e.qtype is QType.UINT16 for e in plan.activations.values()) and plan.a8_tensors == []
    assert not any("Sqrt" in n for n in plan.activations)  # sqrt(head_dim) from Shape is not an activation
    # Weights: the constant weights of MatMul/Gemm/Conv and normalization scales, uint8 per-tensor.
    consumers = {n: {(node.op, i) for node in graph.nodes for i, t in enumerate(node.inputs) if t.name == n}
                 for n in plan.weights}
    weight_uses = ("MatMul", "Gemm", "Conv")
    norm_scale = {("InstanceNormalization", 1), ("LayerNormalization", 1)}
    assert plan.weights and all(any(op in weight_uses for op, _ in c) or c & norm_scale for c in consumers.values())
    norms = {node.inputs[1].name for node in graph.nodes if node.op == "InstanceNormalization"}
    assert norms and norms <= set(plan.weights), "HTP needs quantized InstanceNorm scales"
    consts = {n for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    assert set(plan.weights) <= consts
    conv_biases = {node.inputs[2].name for node in graph.nodes if node.op == "Conv" and len(node.inputs) > 2}
    assert not conv_biases & set(plan.weights)
    assert all(e.qtype is QType.UINT8 and not e.symmetric and e.axis is None for e in plan.weights.values())
    # QSS: the heavy-tailed LoRA is the most sensitive and anchors the shared encodings.
    assert plan.lora_policy == "anchor" and plan.anchor == "heavy"
    assert plan.qss["heavy"] > 3 * max(plan.qss["smooth1"], plan.qss["smooth2"])
    tasks = pack_tasks(base.loras, slots)
    assert plan.lora == dict(shared_lora_encodings(slots, tasks, "anchor", "heavy"))
    own = task_encodings(tasks["heavy"], slots)
    assert all(plan.lora[n] == own[n] for n in lora_inputs)  # the anchor adapts every slot here
    # The report: QSS table and the reason.
    rep = plan.report
    assert set(rep["qss"]["tasks"]) == {"smooth1", "heavy", "smooth2"}
    row = rep["qss"]["tasks"]["heavy"]
    assert row["qss"] == pytest.approx(plan.qss["heavy"]) and row["layers"] == len(slots)
    assert row["worst_layer"]["module"] in slots and row["sqnr_mean_db"] < rep["qss"]["tasks"]["smooth1"]["sqnr_mean_db"]
    assert "'heavy' has the highest QSS" in rep["lora"]["reason"]
    assert rep["calibration"]["runs"] == 4 * 4 and rep["calibration"]["feeds"] == 4
    json.dumps(rep, allow_nan=False)
    assert plan.summary()["anchor"] == "heavy"


def test_policies(setup, default_plan):
    graph, base = setup
    tasks = pack_tasks(base.loras, base.lora_slots)
    unified = _plan(setup, lora_policy="unified")
    assert unified.lora_policy == "unified" and unified.anchor is None
    assert unified.lora == dict(shared_lora_encodings(base.lora_slots, tasks, "unified"))
    assert unified.activations == default_plan.activations  # activation ranges do not depend on the policy
    # auto with a huge tolerance: no LoRA is "distinctly" more sensitive -> unified fallback.
    tolerant = _plan(setup, qss_tolerance="1.0")
    assert tolerant.lora_policy == "unified" and "unified fallback" in tolerant.report["lora"]["reason"]
    forced = _plan(setup, lora_policy="anchor", qss_tolerance=1.0)
    assert forced.anchor == "heavy"


def test_per_channel_weights_and_w8a8(setup):
    graph, _ = setup
    plan = _plan(setup, per_channel=True, precision="w8a8")
    axes = weight_axes(graph)
    consts = graph.tensors()
    for name, enc in plan.weights.items():
        values = consts[name].values
        if values.ndim >= 2:
            assert enc.qtype is QType.INT8 and enc.symmetric and enc.axis == axes[name]
            assert enc.num_channels == values.shape[enc.axis]
    convs = [n.inputs[1].name for n in graph.nodes if n.op == "Conv" and isinstance(n.inputs[1], gs.Constant)]
    matmuls = [n.inputs[1].name for n in graph.nodes if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant)]
    gemms = [n for n in graph.nodes if n.op == "Gemm" and isinstance(n.inputs[1], gs.Constant)]
    assert convs and matmuls and gemms
    assert all(axes[w] == 0 for w in convs) and all(axes[w] == consts[w].values.ndim - 1 for w in matmuls)
    for node in gemms:
        assert axes[node.inputs[1].name] == (0 if node.attrs.get("transB", 0) else 1)
    assert plan.precision == "w8a8" and all(e.qtype is QType.UINT8 for e in plan.activations.values())
    assert sorted(plan.a8_tensors) == sorted(plan.activations)


def test_a8_fraction_picks_highest_sqnr(setup):
    graph, base = setup
    plan = _plan(setup, a8_fraction=0.25)
    acts = sorted(plan.activations)
    assert len(plan.a8_tensors) == math.floor(0.25 * len(acts) + 0.5)
    for name, enc in plan.activations.items():
        assert enc.qtype is (QType.UINT8 if name in plan.a8_tensors else QType.UINT16)
    # Recompute the sensitivity independently on the same calibration data.
    feeds = random_feeds(graph, 4, seed=0)
    tasks = pack_tasks(base.loras, base.lora_slots)
    ranges = calibrate(graph, feeds, tasks)
    from quadc.quant.affine import compute_encoding

    sqnr = measure_sqnr(graph, feeds, {n: compute_encoding(*ranges[n], QType.UINT8) for n in acts}, tasks)
    chosen = set(plan.a8_tensors)
    assert min(sqnr[n] for n in chosen) >= max(sqnr[n] for n in acts if n not in chosen)
    assert plan.a8_tensors == select_a8(sqnr, 0.25)
    assert plan.report["a8"]["count"] == len(chosen)


def test_select_a8():
    sq = {"a": 30.0, "b": math.inf, "c": 50.0, "d": 50.0, "e": 10.0}
    assert select_a8(sq, 0.0) == []
    assert select_a8(sq, 0.4) == ["b", "c"]
    assert select_a8(sq, 0.6) == ["b", "c", "d"]
    assert select_a8(sq, 1.0) == sorted(sq)


@pytest.mark.parametrize("per_channel", [False, True])
def test_encodings_file_round_trip(setup, default_plan, tmp_path, per_channel):
    graph, _ = setup
    plan = default_plan if not per_channel else _plan(setup, per_channel=True, a8_fraction=1.0)
    path = write_encodings(tmp_path / "plan.encodings", encodings_file_of(plan))
    again = _plan(setup, encodings_file=str(path), per_channel=per_channel)
    assert again.lora_policy == "file" and again.anchor is None
    assert again.activations == plan.activations
    assert again.weights == plan.weights
    assert again.lora == plan.lora
    assert again.per_channel == per_channel and again.precision == plan.precision
    assert sorted(again.a8_tensors) == sorted(plan.a8_tensors)


def test_encodings_file_missing_entries(setup, default_plan, tmp_path):
    graph, _ = setup
    file = encodings_file_of(default_plan)
    weight = sorted(default_plan.weights)[0]
    lora_input = sorted(default_plan.lora)[0]
    del file.params[weight]
    del file.activations[lora_input]
    path = write_encodings(tmp_path / "partial.encodings", file)
    with pytest.raises(QuadcError, match="no encoding for 2 tensor") as err:
        _plan(setup, encodings_file=str(path))
    assert weight in str(err.value) and lora_input in str(err.value)
    assert read_encodings(path).get(weight) is None


def test_option_errors(setup):
    graph, _ = setup
    for options, match in [({"precision": "w4a8"}, "precision"), ({"a8_fraction": 1.5}, "a8_fraction"),
                           ({"lora_policy": "best"}, "lora_policy"), ({"calib_random": 0}, "calib_random"),
                           ({"per_channel": "maybe"}, "per_channel"), ({"qss_tolerance": "x"}, "qss_tolerance")]:
        with pytest.raises(QuadcError, match=match):
            _plan(setup, **options)
    opts = PlanOptions.from_options({"a8_fraction": "0.5", "per_channel": "true", "calib_random": "2",
                                     "calib_dir": None})
    assert opts.a8_fraction == 0.5 and opts.per_channel and opts.calib_random == 2 and opts.calib_dir is None


def test_calib_dir_feeds(setup, tmp_path):
    graph, _ = setup
    for i, feed in enumerate(random_feeds(graph, 2, seed=5)):
        np.savez(tmp_path / f"f{i}.npz", **feed)
    plan = _plan(setup, calib_dir=str(tmp_path))
    assert plan.report["calibration"]["feeds"] == 2 and str(tmp_path) in plan.report["calibration"]["description"]


def test_analyze_bundled_model():
    report = analyze()
    assert set(report["tasks"]) == set(bundled_loras()) and len(report["tasks"]) == 4
    assert report["policy"] in ("anchor", "unified") and report["reason"]
    json.dumps(report, allow_nan=False)
    text = format_analysis(report)
    for name in report["tasks"]:
        assert name in text
    assert "policy:" in text and "why:" in text
    assert len(report["lora_encodings"]) == 2 * report["slots"]


def test_analyze_picks_heavy_lora(bundled_unet, tmp_path):
    from quadc.testing_lora import write_peft

    _, info = frontend.load(bundled_unet)
    smooth = random_lora(info, MODULES, rank=4, seed=1, name="smooth")
    heavy = _heavy(random_lora(info, MODULES, rank=4, seed=2), "heavy")
    paths = {"smooth": write_peft(smooth, tmp_path / "smooth"), "heavy": write_peft(heavy, tmp_path / "heavy")}
    report = analyze(bundled_unet, paths, {"quant-plan": {"calib_random": 2}})
    assert report["anchor"] == "heavy" and report["policy"] == "anchor"
    assert "<- anchor" in format_analysis(report).splitlines()[
        next(i for i, line in enumerate(format_analysis(report).splitlines()) if line.startswith("heavy"))]
    with pytest.raises(QuadcError, match="at least one LoRA"):
        analyze(bundled_unet, {})
