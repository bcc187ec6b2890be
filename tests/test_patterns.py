"""The shared pattern layer: matching, binding, why a match failed, and rules applied to a fixed point."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from quadc.passes.patterns import Const, Op, Rule, Var, apply_rules, explain, match


def _graph(text: str) -> gs.Graph:
    return gs.import_onnx(onnx.parser.parse_model(text))


SILU = Op("Mul", Var("x"), Op("Sigmoid", Var("x"), name="sig"), name="mul", commutative=True)


def test_match_binds_nodes_and_tensors_and_commutes():
    g = _graph("""<ir_version: 8, opset_import: ["" : 17]>
    m (float[4] a) => (float[4] y) { s = Sigmoid(a)  y = Mul(s, a) }""")
    mul = next(n for n in g.nodes if n.op == "Mul")
    m = match(mul, SILU)
    assert m and m.tensors["x"].name == "a" and m.nodes["sig"].op == "Sigmoid" and m.nodes["mul"] is mul


def test_no_match_says_why():
    g = _graph("""<ir_version: 8, opset_import: ["" : 17]>
    m (float[4] a, float[4] b) => (float[4] y) { s = Sigmoid(b)  y = Mul(a, s) }""")
    m = match(next(n for n in g.nodes if n.op == "Mul"), SILU)
    assert not m and "bound to another tensor" in m.reason
    g2 = _graph("""<ir_version: 8, opset_import: ["" : 17]>
    m (float[4] a) => (float[4] y, float[4] s) { s = Sigmoid(a)  y = Mul(a, s) }""")
    assert match(next(n for n in g2.nodes if n.op == "Mul"), SILU)  # without the graph, outputs are unseen
    m2 = match(next(n for n in g2.nodes if n.op == "Mul"), SILU, g2)
    assert not m2 and "has 2 uses" in m2.reason


def test_const_with_check_and_attrs():
    g = _graph("""<ir_version: 8, opset_import: ["" : 17]>
    m (float[2, 4] a) => (float[2, 4] y) <float two = {2.0}> { t = Transpose<perm = [1, 0]>(a)  u = Transpose<perm = [1, 0]>(t)  y = Mul(u, two) }""")
    mul = next(n for n in g.nodes if n.op == "Mul")
    pat = Op("Mul", Op("Transpose", Op("Transpose", Var("x"), attrs={"perm": [1, 0]})), Const("c", lambda v: v.size == 1))
    assert match(mul, pat)
    bad = Op("Mul", None, Const("c", lambda v: float(v) == 3.0))
    assert "fails the check" in match(mul, bad).reason
    wrong_perm = Op("Mul", Op("Transpose", None, attrs={"perm": [0, 1]}), None)
    assert "perm" in match(mul, wrong_perm).reason


def test_apply_rules_to_a_fixed_point_and_explain():
    g = _graph("""<ir_version: 8, opset_import: ["" : 17]>
    m (float[2, 4] a) => (float[2, 4] y) {
      t1 = Transpose<perm = [1, 0]>(a)  t2 = Transpose<perm = [1, 0]>(t1)
      t3 = Transpose<perm = [1, 0]>(t2)  t4 = Transpose<perm = [1, 0]>(t3)  y = Relu(t4) }""")

    def cancel(graph, m):
        inner, outer = m.nodes["inner"], m.nodes["outer"]
        src, dst = inner.inputs[0], outer.outputs[0]
        for consumer in list(dst.outputs):
            consumer.inputs[consumer.inputs.index(dst)] = src
        outer.outputs.clear()

    rule = Rule("cancel-transpose-pair", Op("Transpose", Op("Transpose", Var("x"), name="inner"), name="outer"), cancel,
                check=lambda graph, m: None if list(m.nodes["inner"].attrs["perm"]) == [1, 0] else "not an inverse")
    before = gs.export_onnx(g.copy())
    counts = apply_rules(g, [rule])
    assert counts == {"cancel-transpose-pair": 2}
    assert [n.op for n in g.nodes] == ["Relu"]
    assert explain(g, rule) == {}
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    ref = ort.InferenceSession(before.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": x})[0]
    got = ort.InferenceSession(gs.export_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": x})[0]
    np.testing.assert_array_equal(ref, got)
