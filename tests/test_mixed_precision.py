"""Issue 12: A8 chosen by output error, structural 16-bit rules, the held-out curve (the targets: test_a8_targets.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from quadc.compiler import CompileOptions, bundled_loras, bundled_model, compile_model
from quadc.eval.footprint import peak_activation_bytes
from quadc.graph import load_model
from quadc.quant.affine import QType, compute_encoding, sqnr_db
from quadc.quant.feeds import random_feeds
from quadc.quant.sensitivity import choose_a8
from quadc.runtime.engine import Engine


# ------------------------------------------------------------------------------------------- sensitivity
def _amplifier_graph() -> gs.Graph:
    """x -> a = x*1, b = x*1; out = 1000 * a + b: a's 8-bit error reaches the output 1000x, b's 1x."""
    x = gs.Variable("x", np.float32, (1, 64))
    a, b, a2, out = (gs.Variable(n, np.float32, (1, 64)) for n in ("a", "b", "a2", "out"))
    one = gs.Constant("one", np.array(1.0, np.float32))
    gain = gs.Constant("gain", np.array(1000.0, np.float32))
    nodes = [gs.Node("Mul", "/left/Mul", inputs=[x, one], outputs=[a]),
             gs.Node("Mul", "/right/Mul", inputs=[x, one], outputs=[b]),
             gs.Node("Mul", "/amp/Mul", inputs=[a, gain], outputs=[a2]),
             gs.Node("Add", "/sum/Add", inputs=[a2, b], outputs=[out])]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[out], opset=17)


def test_choose_a8_follows_output_error_not_tensor_sqnr():
    graph = _amplifier_graph()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(2)]
    # a and b hold the same values, so their own 8-bit SQNR is identical; only the output tells them apart.
    enc16 = {n: compute_encoding(-4.0, 4.0, QType.UINT16) for n in ("a", "b")}
    enc8 = {n: compute_encoding(-4.0, 4.0, QType.UINT8) for n in ("a", "b")}
    choice = choose_a8(graph, ["a", "b"], 1, enc16, enc8, feeds, {})
    assert choice.tensors == ["b"]
    assert choose_a8(graph, ["a", "b"], 2, enc16, enc8, feeds, {}).tensors == ["a", "b"]
    assert choose_a8(graph, ["a", "b"], 0, enc16, enc8, feeds, {}).tensors == []


# ------------------------------------------------------------------------------------------- footprint
def test_peak_activation_bytes_by_hand():
    """Two uint8 Q/DQ activations of 100 bytes alive together, then a uint16 one of 200 bytes alone."""
    def qdq(src, name, elem, zp_val):
        return [helper.make_node("QuantizeLinear", [src, "s", f"{name}_zp"], [f"{name}_q"]),
                helper.make_node("DequantizeLinear", [f"{name}_q", "s", f"{name}_zp"], [f"{name}_dq"])], \
            helper.make_tensor(f"{name}_zp", elem, [], [zp_val])

    n1, z1 = qdq("x", "a", TensorProto.UINT8, 0)
    n2, z2 = qdq("a_dq", "b", TensorProto.UINT8, 0)
    add = helper.make_node("Add", ["a_dq", "b_dq"], ["c"])
    n3, z3 = qdq("c", "c", TensorProto.UINT16, 0)
    graph = helper.make_graph([*n1, *n2, add, *n3], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [100])],
                              [helper.make_tensor_value_info("c_dq", TensorProto.FLOAT, [100])],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), z1, z2, z3])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert peak_activation_bytes(model) == 200  # a_q + b_q (100 + 100) before Add; then c_q alone (200)
    assert peak_activation_bytes(model, {"a_q": 100, "b_q": 100, "c_q": 300}) == 300


# ------------------------------------------------------------------------------------- the fixtures
FRACTIONS = (0.0, 0.2, 0.4, 0.6)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The trained tiny U-Net and its four task LoRAs: the float graph and onnx-qdq at each fraction."""
    work = tmp_path_factory.mktemp("mixed")
    loras = {k: str(v) for k, v in bundled_loras().items()}
    compile_model(None, work / "float", CompileOptions(target="onnx", loras=loras))
    manifests = {}
    for f in FRACTIONS:
        manifests[f] = compile_model(None, work / f"a8-{f}", CompileOptions(
            target="onnx-qdq", loras=loras, pass_options={"quant-plan": {"a8_fraction": f}}))
    return work, loras, manifests


def test_timestep_path_never_goes_8bit(compiled):
    from quadc.quant.encodings import read_encodings

    work, _, _ = compiled
    for f in FRACTIONS[1:]:
        bits = {n: e.qtype.bits for n, e in read_encodings(work / f"a8-{f}" / "encodings.json").activations.items()}
        assert any(b == 8 for b in bits.values())
        # The sinusoidal embedding's arguments (what feeds Sin/Cos), the timestep itself and the time MLP,
        # read off the source graph by op type: every one of them is 16-bit whatever F says.
        source = load_model(bundled_model())
        sincos_args = {n.inputs[0].name for n in source.nodes if n.op in ("Sin", "Cos")}
        time_mlp = {t.name for n in source.nodes if n.name.startswith(("/time_proj/", "/time_embedding/"))
                    for t in n.outputs}
        path = (sincos_args | time_mlp | {"timestep"}) & set(bits)
        assert len(path) >= 8
        assert {n: bits[n] for n in path} == dict.fromkeys(path, 16), f"F={f}"


def _held_out_means(compiled) -> dict[float, float]:
    """Mean output SQNR over tasks against the float graph on inputs calibration never saw (seed 123)."""
    work, loras, _ = compiled
    ref = Engine(work / "float")
    feeds = random_feeds(load_model(bundled_model()), 4, seed=123)
    mean = {}
    for f in FRACTIONS:
        eng = Engine(work / f"a8-{f}")
        mean[f] = float(np.mean([sqnr_db(ref.run(x, task=t)["out_sample"], eng.run(x, task=t)["out_sample"])
                                 for x in feeds for t in loras]))
    return mean


@pytest.fixture(scope="module")
def held_out(compiled) -> dict[float, float]:
    return _held_out_means(compiled)


def test_held_out_curve_follows_the_paper(held_out):
    """Issue 12's bar on inputs calibration and the sensitivity never saw: F = 0.2 within 0.5 dB of F = 0,
    F = 0.4 within 1 dB, F = 0.6 within 2 dB (bench, 8 held-out inputs: -0.1 / -0.5 / -1.2 dB; before the
    8-bit ranges by least error and the per-unit measurement: -0.6 / -1.6 / -3.6)."""
    mean = held_out
    assert mean[0.0] > 35, mean
    assert mean[0.2] >= mean[0.0] - 0.5, mean
    assert mean[0.4] >= mean[0.0] - 1.0, mean
    assert mean[0.6] >= mean[0.0] - 2.0, mean


def test_onnx_qdq_a8_graph_is_smaller_in_working_memory(compiled):
    work, _, manifests = compiled
    peak = {f: peak_activation_bytes(onnx.load(str(work / f"a8-{f}" / "model.onnx"), load_external_data=False),
                                     _sizes(work / f"a8-{f}")) for f in (0.0, 0.6)}
    assert manifests[0.6]["quant"]["a8_tensors"] > 0
    assert peak[0.6] < peak[0.0]


def _sizes(out):
    from quadc.eval.footprint import observed_sizes

    model = onnx.load(str(out / "model.onnx"))
    return observed_sizes(model, random_feeds(load_model(bundled_model()), 1, seed=5)[0])
