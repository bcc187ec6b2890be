"""build_plan on the tiny U-Net: encodings of every kind, LoRA policy, a8 selection, encodings files; analyze."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import helper

from quadc import frontend
from quadc.analyze import analyze, format_analysis
from quadc.compiler import bundled_loras
from quadc.context import CompileContext
from quadc.errors import QuadcError
from quadc.graph import to_model_bytes
from quadc.lora import LoRA, LoRALayer, LoRASet
from quadc.lora.pack import pack_tasks
from quadc.passes import parse_pipeline, run_pipeline
from quadc.quant.activations import a8_count
from quadc.quant.affine import QType
from quadc.quant.encodings import read_encodings, write_encodings
from quadc.quant.feeds import random_feeds
from quadc.quant.plan import QuantPlan
from quadc.quant.plan_file import encodings_file_of
from quadc.quant.plan_options import PlanOptions
from quadc.quant.planner import build_plan
from quadc.quant.weights import weight_axes
from quadc.testing_lora import random_lora

REL = 1e-5  # onnxruntime sums in another order than the planner's session: ranges agree to ~1e-6
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


# ------------------------------------------------------------------------------ independent expectations
# The planner is checked against numbers computed here without its helpers: feeds written by this test,
# every tensor of every run read from onnxruntime, LoRA inputs packed from the slot layout, encodings and
# fake quantization by their textbook formulas.


@pytest.fixture(scope="module")
def feeds(tmp_path_factory) -> tuple[list[dict[str, np.ndarray]], str]:
    """Four U-Net feeds made here (not by quadc.quant.feeds), and the folder holding them as .npz."""
    rng = np.random.default_rng(123)
    folder = tmp_path_factory.mktemp("planner_feeds")
    out = []
    for i, t in enumerate((999.0, 700.0, 300.0, 20.0)):
        feed = {"sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
                "timestep": np.array([t], np.float32),
                "encoder_hidden_states": rng.standard_normal((1, 8, 32)).astype(np.float32)}
        np.savez(folder / f"f{i}.npz", **feed)
        out.append(feed)
    return out, str(folder)


def _lora_inputs(lora: LoRA | None, slots) -> dict[str, np.ndarray]:
    """A task's LoRA input tensors from the slot layout: linear down [d_in, r] and up [r, d_out], conv down
    [r, c, kh, kw] and up [d_out, r, 1, 1]; the LoRA scale multiplies up; the rank is zero-padded."""
    out = {}
    for module, s in slots.items():
        down, up = np.zeros(s.down_shape, np.float32), np.zeros(s.up_shape, np.float32)
        layer = None if lora is None else lora.layers.get(module)
        if layer is not None:
            r = layer.rank
            a = np.asarray(layer.down, np.float32)
            b = np.asarray(layer.up, np.float32) * np.float32(layer.scale)
            if s.kind == "conv":
                down[:r], up[:, :r] = a.reshape(down[:r].shape), b.reshape(up[:, :r].shape)
            else:
                down[:, :r], up[:r] = a.reshape(r, -1).T, b.reshape(-1, r).T
        out[s.down_input], out[s.up_input] = down, up
    return out


def _ort_runs(graph, feeds, loras, slots):
    """For every feed x (base model + each LoRA): every float32 graph input and node output, by onnxruntime."""
    model = onnx.load_from_string(to_model_bytes(graph))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(o) for n in model.graph.node for o in n.output
                              if o and o not in known)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    bound = [_lora_inputs(None, slots)] + [_lora_inputs(lora, slots) for lora in loras.values()]
    for feed in feeds:
        for task in bound:
            full = {**feed, **task}
            values = {**full, **dict(zip(names, sess.run(None, full), strict=True))}
            yield {k: v for k, v in values.items() if isinstance(v, np.ndarray) and v.dtype == np.float32}


def _encoding(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """(scale, zero point) of unsigned asymmetric ``bits``-bit quantization of [lo, hi] widened to hold 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / (2**bits - 1)) if hi > lo else np.float32(1.0)
    return float(scale), int(np.clip(np.rint(-lo / float(scale)), 0, 2**bits - 1))


def _assert_encoding(enc, lo: float, hi: float, bits: int, what: str) -> None:
    scale, zp = _encoding(lo, hi, bits)
    assert enc.qtype.bits == bits and not enc.qtype.signed and not enc.per_channel, what
    assert float(enc.scale) == pytest.approx(scale, rel=REL), what
    assert abs(int(enc.zero_point) - zp) <= 1, what  # float32 rounding of a range end may move a tie


@pytest.fixture(scope="module")
def observed(setup, feeds):
    """From onnxruntime over the feeds x tasks: per float tensor its (min, max), and the tensors whose
    values change between runs (the activations: everything else is a constant computed at run time)."""
    graph, base = setup
    ranges, first, varies = {}, {}, set()
    for values in _ort_runs(graph, feeds[0], base.loras, base.lora_slots):
        for name, v in values.items():
            lo, hi = float(v.min()), float(v.max())
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(old[0], lo), max(old[1], hi))
            if name not in first:
                first[name] = v
            elif name not in varies and not np.array_equal(first[name], v):
                varies.add(name)
    return ranges, varies


@pytest.fixture(scope="module")
def default_plan(setup, feeds) -> QuantPlan:
    """The default plan, calibrated on this test's feeds."""
    return _plan(setup, calib_dir=feeds[1])


def test_headroom_widens_16bit_ranges_only(setup, feeds, observed):
    ranges, _ = observed
    exact = _plan(setup, headroom=1.0, calib_dir=feeds[1])
    for name, enc in exact.activations.items():
        _assert_encoding(enc, *ranges[name], bits=16, what=name)
    w8a8 = _plan(setup, precision="w8a8", calib_dir=feeds[1])  # the default headroom leaves 8-bit ranges as calibrated
    for name, enc in w8a8.activations.items():
        _assert_encoding(enc, *ranges[name], bits=8, what=name)


def test_default_plan(setup, default_plan, observed):
    graph, base = setup
    plan = default_plan
    slots = base.lora_slots
    lora_inputs = [n for s in slots.values() for n in (s.down_input, s.up_input)]
    ranges, varies = observed
    # LoRA inputs: ONE uint8 encoding each, shared by every task.
    assert list(plan.lora) == lora_inputs
    # Activations: every float tensor whose values change with the inputs, except LoRA inputs; uint16
    # from the min/max over every feed x (base + every task) as onnxruntime computes them, widened by the
    # default headroom of 2 around zero.
    assert set(plan.activations) == varies - set(lora_inputs)
    assert plan.a8_tensors == []
    for name, enc in plan.activations.items():
        lo, hi = ranges[name]
        _assert_encoding(enc, 2 * lo, 2 * hi, bits=16, what=name)
    assert not any("Sqrt" in n for n in plan.activations)  # sqrt(head_dim) from Shape is not an activation
    # Weights: the constant weights of MatMul/Gemm/Conv and normalization scales, uint8 per-tensor.
    consumers = {n: {(node.op, i) for node in graph.nodes for i, t in enumerate(node.inputs) if t.name == n}
                 for n in plan.weights}
    weight_uses = ("MatMul", "Gemm", "Conv")
    norm_scale = {("InstanceNormalization", 1), ("LayerNormalization", 1)}
    assert plan.weights and all(any(op in weight_uses for op, _ in c) or c & norm_scale for c in consumers.values())
    norms = {node.inputs[1].name for node in graph.nodes if node.op == "InstanceNormalization"}
    assert norms and norms <= set(plan.weights), "HTP needs quantized InstanceNorm scales"
    consts = {n: t for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    assert set(plan.weights) <= set(consts)
    conv_biases = {node.inputs[2].name for node in graph.nodes if node.op == "Conv" and len(node.inputs) > 2}
    assert not conv_biases & set(plan.weights)
    for name, enc in plan.weights.items():
        values = np.asarray(consts[name].values)
        _assert_encoding(enc, float(values.min()), float(values.max()), bits=8, what=name)
        assert enc.axis is None and not enc.symmetric
    # QSS: the heavy-tailed LoRA is the most sensitive and anchors the shared encodings: every LoRA input's
    # encoding is the uint8 range of the anchor's own tensor (the anchor adapts every slot here).
    assert plan.lora_policy == "anchor" and plan.anchor == "heavy"
    assert plan.qss["heavy"] > 3 * max(plan.qss["smooth1"], plan.qss["smooth2"])
    heavy = _lora_inputs(base.loras["heavy"], slots)
    for name in lora_inputs:
        assert np.any(heavy[name] != 0), name
        _assert_encoding(plan.lora[name], float(heavy[name].min()), float(heavy[name].max()), bits=8, what=name)
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


def test_policies(setup, default_plan, feeds):
    graph, base = setup
    slots = base.lora_slots
    unified = _plan(setup, lora_policy="unified", calib_dir=feeds[1])
    assert unified.lora_policy == "unified" and unified.anchor is None
    # unified: each LoRA input's range is the union over every task's tensor.
    packed = [_lora_inputs(lora, slots) for lora in base.loras.values()]
    for name, enc in unified.lora.items():
        lo, hi = min(float(p[name].min()) for p in packed), max(float(p[name].max()) for p in packed)
        _assert_encoding(enc, lo, hi, bits=8, what=name)
    assert unified.lora != default_plan.lora
    assert unified.activations == default_plan.activations  # activation ranges do not depend on the policy
    # auto with a huge tolerance: no LoRA is "distinctly" more sensitive -> unified fallback.
    tolerant = _plan(setup, qss_tolerance="1.0")
    assert tolerant.lora_policy == "unified" and "unified fallback" in tolerant.report["lora"]["reason"]
    forced = _plan(setup, lora_policy="anchor", qss_tolerance=1.0)
    assert forced.anchor == "heavy"


def test_per_channel_weights_and_w8a8(setup):
    graph, _ = setup
    plan = _plan(setup, per_channel=True, precision="w8a8")
    consts = graph.tensors()
    # The output-channel axis of each weight, from its consumer: Conv [out, in, kh, kw] -> 0, MatMul x @ W
    # [.., in, out] -> last, Gemm B -> 0 with transB else 1.
    expected_axis = {}
    for node in graph.nodes:
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if not isinstance(w, gs.Constant) or np.ndim(w.values) < 2:
            continue
        if node.op == "Conv":
            expected_axis[w.name] = 0
        elif node.op == "MatMul":
            expected_axis[w.name] = np.ndim(w.values) - 1
        elif node.op == "Gemm":
            expected_axis[w.name] = 0 if node.attrs.get("transB", 0) else 1
    ops = {n.op for n in graph.nodes if n.inputs[1:2] and n.inputs[1].name in expected_axis}
    assert ops == {"Conv", "MatMul", "Gemm"}
    assert {n for n, e in plan.weights.items() if np.ndim(consts[n].values) >= 2} == set(expected_axis)
    for name, axis in expected_axis.items():
        enc, values = plan.weights[name], np.asarray(consts[name].values, np.float64)
        assert enc.qtype is QType.INT8 and enc.symmetric and enc.axis == axis, name
        # int8 symmetric: scale = 2 max|w| / 255 per output channel, zero point 0.
        maxabs = np.max(np.abs(np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)), axis=1)
        np.testing.assert_allclose(enc.scale, np.where(maxabs > 0, 2 * maxabs / 255, 1.0), rtol=1e-6, err_msg=name)
        assert not np.any(enc.zero_point), name
    assert plan.precision == "w8a8" and all(e.qtype is QType.UINT8 for e in plan.activations.values())
    assert sorted(plan.a8_tensors) == sorted(plan.activations)


def test_weight_axes_of_each_layout():
    """Output-channel axes by hand for every weight position the module docstring lists."""
    x = gs.Variable("x", np.float32, (2, 4))

    def const(name, shape):
        return gs.Constant(name, np.ones(shape, np.float32))

    nodes = [
        gs.Node("MatMul", inputs=[x, const("w_right", (4, 5))], outputs=[gs.Variable("a")]),       # x @ W: last
        gs.Node("MatMul", inputs=[const("w_left", (3, 2, 2)), x], outputs=[gs.Variable("b")]),    # W @ x: -2
        gs.Node("Gemm", inputs=[x, const("b_t", (6, 4))], outputs=[gs.Variable("c")], attrs={"transB": 1}),
        gs.Node("Gemm", inputs=[x, const("b_n", (4, 6))], outputs=[gs.Variable("d")]),
        gs.Node("Gemm", inputs=[const("a_t", (4, 2)), x], outputs=[gs.Variable("e")], attrs={"transA": 1}),
        gs.Node("Conv", inputs=[x, const("k", (8, 4, 3, 3)), const("k_bias", (8,))], outputs=[gs.Variable("f")]),
        gs.Node("LayerNormalization", inputs=[x, const("ln_scale", (4,)), const("ln_bias", (4,))],
                outputs=[gs.Variable("g")]),
        gs.Node("Add", inputs=[x, const("added", (4,))], outputs=[gs.Variable("h")]),
    ]
    graph = gs.Graph(nodes=nodes, inputs=[x])
    assert weight_axes(graph) == {"w_right": 1, "w_left": 1, "b_t": 0, "b_n": 1, "a_t": 1, "k": 0, "ln_scale": 0}


def test_a8_fraction_types_and_count(setup, feeds):
    """a8_fraction=0.25: the 8-bit tensors have the scheme's uint8 type, the rest uint16, the count is at
    most round(0.25 N) and within a few tensors of it (units are chosen whole), and the timestep never
    goes 8-bit. Which tensors is issue 12's end-to-end choice (tests/test_mixed_precision.py)."""
    plan = _plan(setup, a8_fraction=0.25, calib_dir=feeds[1])
    acts = sorted(plan.activations)
    k = math.floor(0.25 * len(acts) + 0.5)
    assert k - 8 <= len(plan.a8_tensors) <= k
    for name, enc in plan.activations.items():
        assert enc.qtype is (QType.UINT8 if name in plan.a8_tensors else QType.UINT16)
    assert "timestep" in acts and "timestep" not in plan.a8_tensors
    assert plan.report["a8"]["count"] == len(plan.a8_tensors)
    assert plan.report["a8"]["protected"]["timestep"] >= 1


def test_a8_count():
    assert [a8_count(f, 5) for f in (0.0, 0.4, 0.5, 0.6, 1.0)] == [0, 2, 3, 3, 5]
    with pytest.raises(QuadcError, match="a8_fraction"):
        a8_count(1.5, 5)


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


def test_unset_per_channel_follows_the_scheme_default(setup, default_plan):
    """Weight granularity: an unset ``per_channel`` is the scheme's measured default (qnn-htp: uint8 per
    tensor, README "Weights"), a given value overrides it, a scheme that forces one ignores it."""
    from quadc.quant.schemes import EncodingScheme, register_scheme

    assert not default_plan.per_channel
    assert all(e.qtype is QType.UINT8 and not e.per_channel for e in default_plan.weights.values())
    register_scheme(EncodingScheme(name="test-per-channel-default", description="t", per_channel_default=True))
    by_default = _plan(setup, scheme="test-per-channel-default")
    assert by_default.per_channel and any(e.per_channel and e.qtype is QType.INT8 for e in by_default.weights.values())
    assert not _plan(setup, scheme="test-per-channel-default", per_channel="false").per_channel
    assert EncodingScheme(name="x", description="x", per_channel=False, per_channel_default=True).weights_per_channel(True) is False
