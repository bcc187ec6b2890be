"""mha-split: per-head attention on the tiny U-Net from both exporters and the bundled model (numbers with
the bundled LoRA tasks bound, Softmax count, no 4-D head ops left, LoRA slots untouched), the forms it
must refuse, and the CLI with --verify numeric and --print-after."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from quadc.cli import main
from quadc.compiler import bundled_loras, prepare
from quadc.context import CompileContext
from quadc.frontend.model_info import AttentionBlock, ModelInfo
from quadc.graph import infer_shapes
from quadc.lora.pack import pack_task
from quadc.passes import get_pass, run_pipeline
from quadc.passes.mha_split import CORE, RULE_NAME, recognize
from quadc.passes.patterns import Rule, explain
from quadc.passes.pipeline import run_graph
from quadc.testing import apply_pass_and_basic_check, assert_same_outputs

GOLDEN = Path(__file__).resolve().parents[1] / "golden_graphs" / "mha-split"
#: The tiny config: 8 attention modules (2 down, 2 mid, 4 up) of 4 heads each.
TINY_ATTENTIONS, TINY_HEADS = 8, 4


def _float_graph(model: Path | None) -> tuple[gs.Graph, CompileContext]:
    graph, ctx, _ = prepare(model, {k: str(v) for k, v in bundled_loras().items()})
    graph, _ = run_pipeline(graph, "float", ctx)
    return graph, ctx


def _head_ops(graph: gs.Graph) -> set[str]:
    """Names of the Reshape/Transpose nodes with a 4-D input or output (shapes inferred on a copy)."""
    typed = infer_shapes(graph.copy())
    return {n.name for n in typed.nodes if n.op in ("Reshape", "Transpose")
            and any(t.shape is not None and len(t.shape) == 4 for t in (n.inputs[0], n.outputs[0]))}


@pytest.fixture(scope="module", params=["torchscript", "dynamo", "bundled"])
def float_unet(request) -> tuple[gs.Graph, CompileContext]:
    model = {"torchscript": "tiny_torchscript_onnx", "dynamo": "tiny_dynamo_onnx"}.get(request.param)
    return _float_graph(request.getfixturevalue(model) if model else None)


def test_splits_every_attention_and_keeps_numbers_with_each_task(float_unet):
    graph, ctx = float_unet
    slots_before = dict(ctx.lora_slots)
    for name, lora in ctx.loras.items():
        task = pack_task(lora, ctx.lora_slots)
        assert any(np.any(v) for v in task.values()), name
        after, result = apply_pass_and_basic_check(graph, "mha-split", ctx, new_input_values=task, rtol=1e-5)
    assert result.counts == {"attentions_split": TINY_ATTENTIONS, "heads": TINY_ATTENTIONS * TINY_HEADS,
                             "softmax": TINY_ATTENTIONS * TINY_HEADS}
    assert sum(b.heads for b in ctx.model_info.attention) == TINY_ATTENTIONS * TINY_HEADS
    assert ctx.lora_slots == slots_before
    # Every head is its own [B, S, Sk] Softmax over the keys.
    typed = infer_shapes(after.copy())
    softmaxes = [n for n in typed.nodes if n.op == "Softmax"]
    assert len(softmaxes) == TINY_ATTENTIONS * TINY_HEADS
    assert all(len(n.inputs[0].shape) == 3 and n.attrs["axis"] == -1 for n in softmaxes)
    # The 4-D Reshape/Transpose nodes left are exactly those outside the frontend's attention cores.
    core = {name for block in ctx.model_info.attention for name in block.nodes}
    before_ops = _head_ops(graph)
    assert before_ops & core, "the frontend's attention cores hold 4-D head reshapes before the pass"
    assert _head_ops(after) == before_ops - core
    # The projections (constant-weight MatMuls) are all still there.
    weights = lambda g: sorted(n.name for n in g.nodes if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant))  # noqa: E731
    assert weights(after) == weights(graph)


def test_second_run_changes_nothing(float_unet):
    graph, ctx = float_unet
    p = get_pass("mha-split")
    g = graph.copy()
    assert p.run(g, ctx).changed
    assert p.postcondition(g, ctx) == []
    again = p.run(g, ctx)
    assert not again.changed and again.counts["attentions_split"] == 0


def test_postcondition_names_unsplit_attention(float_unet):
    graph, ctx = float_unet
    problems = get_pass("mha-split").postcondition(graph.copy(), ctx)
    assert any("4-D" in p for p in problems)
    assert any("Softmax nodes" in p and "32 heads" in p for p in problems)


# ---------------------------------------------------------------------------------------------------
# Small graphs: what the pass splits and what it leaves alone
# ---------------------------------------------------------------------------------------------------

def _text(case: str, **replace: str) -> str:
    text = (GOLDEN / f"{case}.in.onnxtxt").read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def _graph(text: str) -> gs.Graph:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return gs.import_onnx(model)


def _feeds(graph: gs.Graph) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in graph.inputs}


def _reference_attention(x: np.ndarray, text: str, heads: int) -> np.ndarray:
    """The case's y computed in float64 numpy: softmax(q k^T / sqrt(d)) v, heads side by side."""
    model = onnx.parser.parse_model(text)
    w = {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    q, k, v = (x.astype(np.float64) @ w[n] for n in ("wq", "wk", "wv"))
    b, s, c = q.shape
    d = c // heads
    split = lambda t: t.reshape(b, -1, heads, d).transpose(0, 2, 1, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ split(v)).transpose(0, 2, 1, 3).reshape(b, s, c) @ w["wo"]


@pytest.mark.parametrize("case", ["torchscript_self_attention", "dynamo_self_attention"])
def test_batch_of_two_is_split_per_batch_and_head(case):
    """B = 2 exercises the batch axis through dynamo's [B*H, Sk, d] reshapes; checked against numpy."""
    text = _text(case, **{"float[1, 3, 4] x": "float[2, 3, 4] x", "float[1, 3, 4] y": "float[2, 3, 4] y",
                          "heads = {1, -1, 2, 2}": "heads = {2, -1, 2, 2}", "merged = {1, -1, 4}": "merged = {2, -1, 4}"},
                 **({"kt_shape = {1, 2, 2, 3}": "kt_shape = {2, 2, 2, 3}"} if case.startswith("dynamo") else {}))
    graph = _graph(text)
    after, result = apply_pass_and_basic_check(graph, "mha-split", CompileContext())
    assert result.counts["attentions_split"] == 1 and result.counts["softmax"] == 2
    feeds = _feeds(graph)
    np.testing.assert_allclose(run_graph(after, feeds)[0], _reference_attention(feeds["x"], text, 2), rtol=1e-5, atol=1e-6)


def test_channels_first_attention_with_two_exits_and_batch_of_two():
    """The form linear-to-conv leaves: heads split from [B, C, 1, S], v as the left operand, a Cast and
    two exits ([B, C, S] for a LoRA branch, [B, C, 1, S] for the out projection)."""
    text = _text("channels_first_attention", **{
        "float[1, 4, 1, 3] x": "float[2, 4, 1, 3] x", "float[1, 4, 1, 3] y": "float[2, 4, 1, 3] y",
        "float[1, 2, 3] y_lora": "float[2, 2, 3] y_lora", "heads = {1, 2, 2, 3}": "heads = {2, 2, 2, 3}",
        "merged = {1, 4, 3}": "merged = {2, 4, 3}", "n_shape = {1, 4, 1, 3}": "n_shape = {2, 4, 1, 3}"})
    after, result = apply_pass_and_basic_check(_graph(text), "mha-split", CompileContext())
    assert result.counts == {"attentions_split": 1, "heads": 2, "softmax": 2}
    ops = [n.op for n in after.nodes]
    assert ops.count("Split") == 3 and ops.count("Concat") == 1 and "Cast" not in ops
    splits = [n for n in after.nodes if n.op == "Split"]
    assert all(n.attrs["axis"] == 1 for n in splits)
    assert {t.name for t in after.tensors().values()} >= {"o3", "on"}  # both exits keep their names


def test_a_shape_left_unset_by_another_pass_is_inferred():
    graph = infer_shapes(_graph(_text("dynamo_self_attention")))
    graph.tensors()["q"].shape = None  # the Softmax has its shape, the head split's input not
    result = get_pass("mha-split").run(graph, CompileContext())
    assert result.counts["attentions_split"] == 1


def test_scores_divided_by_sqrt_d_fold_into_q():
    text = _text("converter_cross_attention", **{"scores = Mul (raw, scale)": "scores = Div (raw, sqrt_d)",
                                                  "float scale = {0.70710677}": "float sqrt_d = {1.4142135}"})
    after, result = apply_pass_and_basic_check(_graph(text), "mha-split", CompileContext())
    assert result.counts["attentions_split"] == 1
    muls = [n for n in after.nodes if n.op == "Mul"]
    assert len(muls) == 1 and abs(float(muls[0].inputs[1].values) - 2 ** -0.5) < 1e-7
    assert muls[0].outputs[0].outputs[0].op == "Split"


@pytest.mark.parametrize(("replace", "reason"), [
    ({"(float[1, 3, 4] y)": "(float[1, 3, 4] y, float[1, 2, 3, 2] qh)"}, "qh inside the attention is also read"),
    ({"probs = Softmax <axis = -1> (scores)": "probs = Softmax <axis = 2> (scores)"}, "axis 2"),
    ({"ks = Mul (kt, k_root)": "ks = Mul (kt, kt)"}, "static scalar"),
])
def test_leaves_attention_it_cannot_split_and_says_why(replace, reason):
    graph = _graph(_text("torchscript_self_attention", **replace))
    before = graph.copy()
    p = get_pass("mha-split")
    result = p.run(graph, CompileContext())
    assert not result.changed and result.counts["softmax"] == 1
    assert sorted(n.op for n in graph.nodes) == sorted(n.op for n in before.nodes)
    assert_same_outputs(before, graph, _feeds(before), rtol=1e-6)
    softmax = graph.tensors()["probs"].inputs[0]
    why = explain(graph, Rule(RULE_NAME, CORE, lambda g, m: None,
                              check=lambda g, m: (r if isinstance(r := recognize(g, m), str) else None)), [softmax])
    assert reason in why["<Softmax>"], why
    # In verify mode the postcondition names the attention left whole.
    assert "Softmax 'probs' still works on a 4-D [B, H, S, Sk] tensor" in p.postcondition(graph, CompileContext())


def test_head_count_cross_check_with_the_frontend():
    graph = _graph(_text("dynamo_self_attention"))
    ctx = CompileContext(model_info=ModelInfo(attention=[AttentionBlock("attn1", "self", 3, ())]))
    p = get_pass("mha-split")
    p.run(graph, ctx)
    assert p.postcondition(graph, ctx) == ["2 Softmax nodes, but the frontend's 1 attention blocks have 3 heads in all"]
    ctx.model_info.attention[0] = AttentionBlock("attn1", "self", 2, ())
    assert p.postcondition(graph, ctx) == []


def test_tensors_keep_their_names_for_encodings():
    """The merged output keeps its name (what to_out reads); q/k/v and the projections are untouched."""
    graph = _graph(_text("torchscript_self_attention"))
    before = graph.copy()
    get_pass("mha-split").run(graph, CompileContext())
    names = set(graph.tensors())
    assert {"q", "k", "v", "o", "oc", "y"} <= names
    assert not {"qh", "kt", "vh", "scores", "probs", "o4", "ot"} & names
    assert_same_outputs(before, graph, _feeds(before), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def test_cli_verify_numeric_and_print_after(tmp_path, capsys):
    argv = ["compile", "-q", "--target", "onnx", "--passes", "float,mha-split", "--verify", "numeric",
            "--print-after", "mha-split", "-o", str(tmp_path / "out")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "// after mha-split" in printed
    assert printed.count("= Softmax <axis: int = -1>") == TINY_ATTENTIONS * TINY_HEADS
    assert printed.count("= Split <axis: int = -1>") == 3 * TINY_ATTENTIONS
    saved = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert sum(n.op_type == "Softmax" for n in saved.graph.node) == TINY_ATTENTIONS * TINY_HEADS


# ---------------------------------------------------------------------------------------------------
# What this pass added to the pattern layer
# ---------------------------------------------------------------------------------------------------

def test_one_of_matches_either_form_and_explains_both():
    from quadc.passes.patterns import Const, OneOf, Op, Var, match

    mm = Op("MatMul", Var("a"), Var("b"), name="mm")
    scaled = Op("Softmax", OneOf(Op("Mul", mm, Const("c"), name="mul"), mm))
    plain = _graph("""<ir_version: 8, opset_import: ["" : 17]>
    m (float[2, 2] a, float[2, 2] b) => (float[2, 2] y) { s = MatMul(a, b)  y = Softmax(s) }""")
    with_mul = _graph("""<ir_version: 8, opset_import: ["" : 17]>
    m (float[2, 2] a, float[2, 2] b) => (float[2, 2] y) <float c = {0.5}> { s = MatMul(a, b)  t = Mul(s, c)  y = Softmax(t) }""")
    other = _graph("""<ir_version: 8, opset_import: ["" : 17]>
    m (float[2, 2] a, float[2, 2] b) => (float[2, 2] y) { s = Add(a, b)  y = Softmax(s) }""")
    softmax = lambda g: next(n for n in g.nodes if n.op == "Softmax")  # noqa: E731
    m1, m2 = match(softmax(plain), scaled), match(softmax(with_mul), scaled)
    assert m1 and "mul" not in m1.nodes and m1.tensors["a"].name == "a"
    assert m2 and m2.nodes["mul"].op == "Mul" and float(m2.value("c")) == 0.5
    miss = match(softmax(other), scaled)
    assert not miss and "wanted Mul" in miss.reason and "wanted MatMul" in miss.reason


def test_static_value_evaluates_shape_arithmetic():
    from quadc.passes.patterns import static_value

    text = """<ir_version: 8, opset_import: ["" : 17]>
    m (float[1, 2, 3, 16] x) => (float[1, 2, 3, 16] y) <int64[1] last = {-1}, int64[1] end = {9223372036854775807}, float one = {1.0}> {
      shape = Shape(x)  d = Slice(shape, last, end)  df = Cast<to = 1>(d)  r = Sqrt(df)  inv = Div(one, r)
      root = Sqrt(inv)  y = Mul(x, root) }"""
    graph = _graph(text)
    root = graph.tensors()["root"]
    value, nodes = static_value(root, 17)
    assert value.shape == (1,) and abs(float(value[0]) - 16 ** -0.25) < 1e-7
    assert [n.op for n in nodes] == ["Shape", "Slice", "Cast", "Sqrt", "Div", "Sqrt"]
    graph.tensors()["x"].shape = None  # not static any more
    assert static_value(root, 17) is None
    assert static_value(graph.tensors()["y"], 17) is None  # depends on x's values


def test_outside_uses_names_what_would_be_orphaned():
    from quadc.passes.patterns import outside_uses

    graph = _graph("""<ir_version: 8, opset_import: ["" : 17]>
    m (float[2] a) => (float[2] y, float[2] t) { s = Relu(a)  t = Neg(s)  u = Abs(s)  y = Exp(u) }""")
    by = {n.outputs[0].name: n for n in graph.nodes}
    assert outside_uses([by["s"], by["u"]], [graph.tensors()["u"]], graph) == ["s"]  # Neg reads s
    assert outside_uses([by["s"], by["t"], by["u"]], [graph.tensors()["u"]], graph) == ["t"]  # t is an output
    assert outside_uses([by["s"], by["t"], by["u"]], [graph.tensors()["u"], graph.tensors()["t"]], graph) == []
