"""transpose-cancel and the layout engine: the reshape/transpose algebra against numpy, the per-head attention
form of mha-split (NPU.md) before and after linear-to-conv, exporter graphs, idempotence."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from quadc.compiler import bundled_loras, prepare
from quadc.context import CompileContext
from quadc.lora.slots import rebind_feeds
from quadc.passes import get_pass, run_pipeline
from quadc.passes.layout import (
    ensure_static_shapes,
    transpose_2d,
    transpose_after_reshape,
    transpose_before_reshape,
    unit_axis_map,
)
from quadc.passes.patterns import producer
from quadc.passes.pipeline import run_graph
from quadc.testing import apply_pass_and_basic_check, lora_feeds

# ------------------------------------------------------------------------------------ algebra vs numpy
SHAPES = [(1, 6, 4), (2, 3, 4), (1, 4, 1, 6), (2, 3, 2, 2), (1, 8, 8, 3), (6, 1, 4)]


def _reshapes_of(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Targets that split or merge neighbouring axes, or add/remove unit axes (plus one that mixes axes)."""
    out = {tuple(d for d in shape if d != 1), (1, *shape), (*shape, 1), (int(np.prod(shape)),)}
    for i in range(len(shape) - 1):
        out.add((*shape[:i], shape[i] * shape[i + 1], *shape[i + 2:]))
    for i, d in enumerate(shape):
        for f in (2, 3):
            if d % f == 0 and d > f:
                out.add((*shape[:i], f, d // f, *shape[i + 1:]))
    return sorted(out)


@pytest.mark.parametrize("shape", SHAPES)
def test_transpose_before_reshape_matches_numpy(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    moved = 0
    for perm in itertools.permutations(range(len(shape))):
        y = np.transpose(x, perm)
        for out in _reshapes_of(y.shape):
            found = transpose_before_reshape(shape, perm, out)
            if found is None:
                continue
            mid, new_perm = found
            np.testing.assert_array_equal(np.transpose(x.reshape(mid), new_perm), y.reshape(out))
            moved += 1
    assert moved > 10


@pytest.mark.parametrize("shape", SHAPES)
def test_transpose_after_reshape_matches_numpy(shape):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape)
    moved = 0
    for out in _reshapes_of(shape):
        r = w.reshape(out)
        for perm in itertools.permutations(range(len(out))):
            found = transpose_after_reshape(shape, out, perm)
            if found is None:
                continue
            w_perm, final = found
            np.testing.assert_array_equal(np.transpose(w, w_perm).reshape(final), np.transpose(r, perm))
            moved += 1
    assert moved > 10


def test_the_converters_and_attention_reshapes_are_movable():
    # toN after toT: the inner Transpose moves below the [B, C, S] -> [B, C, 1, S] reshape.
    assert transpose_before_reshape([1, 6, 4], [0, 2, 1], [1, 4, 1, 6]) is not None
    # the exporter's entry [B, C, H, W] -> [B, H, W, C] -> [B, HW, C] is a token-layout view of a Reshape.
    assert transpose_before_reshape([1, 4, 2, 3], [0, 2, 3, 1], [1, 6, 4]) == ([1, 4, 6], [0, 2, 1])
    # the head split [B, S, C] -> [B, S, H, d] of a token-layout view of [B, C, S].
    assert transpose_before_reshape([1, 8, 6], [0, 2, 1], [1, 6, 2, 4]) == ([1, 2, 4, 6], [0, 3, 1, 2])
    # but a reshape that mixes axes the transpose separates is refused.
    assert transpose_before_reshape([2, 3], [1, 0], [2, 3]) is None


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (64, 7), (130, 129)])
def test_blocked_transpose(shape):
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    t = transpose_2d(w, rows=64)
    assert t.flags.c_contiguous
    np.testing.assert_array_equal(t, w.T)


def test_unit_axis_map():
    assert unit_axis_map([1, 8, 1, 6], [1, 8, 6]) == [0, 1, 3]
    assert unit_axis_map([1, 8], [1, 8, 1, 1]) == [0, 1, None, None]
    assert unit_axis_map([2, 3], [3, 2]) is None


# ------------------------------------------------------------------------- mha-split's per-head form
def _scalar(t: gs.Tensor) -> float | None:
    if isinstance(t, gs.Constant) and t.values.size == 1:
        return float(np.asarray(t.values).reshape(-1)[0])
    return None


def _source(t: gs.Tensor) -> tuple[gs.Tensor, float]:
    """Up from an attention operand through layout ops and constant scales to the projection's output."""
    scale = 1.0
    while (p := producer(t)) is not None:
        if p.op in ("Transpose", "Reshape", "Cast"):
            t = p.inputs[0]
        elif p.op in ("Mul", "Div") and _scalar(p.inputs[1]) is not None:
            c = _scalar(p.inputs[1]) or 1.0
            scale, t = (scale * c if p.op == "Mul" else scale / c), p.inputs[0]
        elif p.op == "Mul" and _scalar(p.inputs[0]) is not None:
            scale, t = scale * (_scalar(p.inputs[0]) or 1.0), p.inputs[1]
        else:
            break
    return t, scale


def _sink(t: gs.Tensor) -> gs.Tensor:
    while len(t.outputs) == 1 and t.outputs[0].op in ("Transpose", "Reshape", "Cast"):
        t = t.outputs[0].outputs[0]
    return t


def split_heads(graph: gs.Graph, slices: bool = False) -> int:
    """What mha-split produces (NPU.md), built around each Softmax of the graph: the q/k/v projection outputs
    (token layout, or channels first behind a converter when linear-to-conv ran first) split per head on the
    channel axis (one Split, or one Slice per head), per-head scores/softmax/value products, one Concat;
    returns the number of heads."""
    made = itertools.count()

    def var(shape):
        return gs.Variable(f"mha/t{next(made)}", np.float32, list(shape))

    def node(op, inputs, outputs, attrs=None):
        graph.nodes.append(gs.Node(op, f"mha/n{next(made)}", attrs=attrs or {}, inputs=inputs, outputs=outputs))
        return outputs[0] if len(outputs) == 1 else outputs

    def ints(values):
        return gs.Constant(f"mha/c{next(made)}", np.array(values, np.int64))

    def tokens(t):
        if len(t.shape) == 3:
            return t
        b, c, _, s = t.shape
        return node("Transpose", [node("Reshape", [t, ints([b, c, s])], [var([b, c, s])])], [var([b, s, c])],
                    {"perm": [0, 2, 1]})

    heads = 0
    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        scores = producer(softmax.inputs[0])
        user = softmax.outputs[0].outputs[0]
        value_mm, v_in = ((user.outputs[0].outputs[0], None) if user.op == "Transpose" else (user, user.inputs[1]))
        v_in = v_in if v_in is not None else value_mm.inputs[0]  # N form: MatMul(v, Transpose(p))
        d = scores.inputs[0].shape[-1]
        (q, sq), (k, sk), (v, _) = _source(scores.inputs[0]), _source(scores.inputs[1]), _source(v_in)
        out = _sink(value_mm.outputs[0])
        q, k, v = tokens(q), tokens(k), tokens(v)
        (b, s, c), sk_len = q.shape, k.shape[1]
        h = c // d
        qs = node("Mul", [q, gs.Constant(f"mha/scale{next(made)}", np.array(sq * sk, np.float32))], [var([b, s, c])])
        qh, kh, vh = ([node("Slice", [t, ints([i * d]), ints([i * d + d]), ints([-1])], [var([b, n, d])])
                       for i in range(h)] if slices else
                      node("Split", [t, ints([d] * h)], [var([b, n, d]) for _ in range(h)], {"axis": -1})
                      for t, n in ((qs, s), (k, sk_len), (v, sk_len)))
        outs = []
        for i in range(h):
            kt = node("Transpose", [kh[i]], [var([b, d, sk_len])], {"perm": [0, 2, 1]})
            p = node("Softmax", [node("MatMul", [qh[i], kt], [var([b, s, sk_len])])], [var([b, s, sk_len])],
                     {"axis": -1})
            outs.append(node("MatMul", [p, vh[i]], [var([b, s, d])]))
        o = node("Concat", outs, [var([b, s, c])], {"axis": -1})
        if len(out.shape) == 4:
            t = node("Transpose", [o], [var([b, c, s])], {"perm": [0, 2, 1]})
            o = node("Reshape", [t, ints(list(out.shape))], [var(out.shape)])
        for consumer in list(out.outputs):
            consumer.inputs[consumer.inputs.index(out)] = o
        heads += h
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return heads


def _lora_graph(path):
    graph, ctx, _ = prepare(path, {k: str(v) for k, v in bundled_loras().items()})
    graph, _ = run_pipeline(graph, "float", ctx)
    ensure_static_shapes(graph, fold=lambda g: get_pass("const-fold").run(g, ctx))
    return graph, ctx


CASES = [("tiny_torchscript_onnx", "pass"), ("tiny_dynamo_onnx", "pass"), ("tiny_torchscript_onnx", "emulated")]


def _split(graph: gs.Graph, ctx: CompileContext, how: str) -> int:
    """Run the mha-split pass, or the emulation of its output form above; returns the heads made."""
    if how == "emulated":
        return split_heads(graph)
    _, records = run_pipeline(graph, "mha-split", ctx, verify="numeric")
    return records[0].counts["heads"]


@pytest.mark.parametrize(("model", "how"), CASES, ids=[f"{m.split('_')[1]}-{h}" for m, h in CASES])
@pytest.mark.parametrize("mha_first", [True, False], ids=["mha-split-first", "linear-to-conv-first"])
def test_per_head_attention_ends_with_3d_per_head_transposes_only(model, how, mha_first, request):
    graph, ctx = _lora_graph(request.getfixturevalue(model))
    feeds = lora_feeds(graph, ctx.lora_slots)
    reference = run_graph(graph, feeds)[0]
    slots = dict(ctx.lora_slots)
    expected_heads = sum(a.heads for a in ctx.model_info.attention)
    if mha_first:
        heads = _split(graph, ctx, how)
        graph, records = run_pipeline(graph, "linear-to-conv,transpose-cancel", ctx, verify="numeric")
    else:
        graph, records = run_pipeline(graph, "linear-to-conv", ctx, verify="numeric")
        heads = _split(graph, ctx, how)
        graph, more = run_pipeline(graph, "transpose-cancel", ctx, verify="numeric")
        records += more
    assert heads == expected_heads
    got = run_graph(graph, rebind_feeds(feeds, slots, ctx.lora_slots))[0]
    assert np.max(np.abs(got - reference)) <= 1e-5 * np.max(np.abs(reference))
    # Softmax count = sum of heads; per-head Split/Concat on the channel axis.
    assert sum(n.op == "Softmax" for n in graph.nodes) == expected_heads
    splits = [n for n in graph.nodes if n.op == "Split"]
    assert len(splits) >= 3 * len(ctx.model_info.attention) and {n.attrs["axis"] for n in splits} == {1}
    head_concats = [n for n in graph.nodes if n.op == "Concat"
                    and all(producer(t) is not None and producer(t).op == "MatMul" for t in n.inputs)]
    assert len(head_concats) == len(ctx.model_info.attention) and {n.attrs["axis"] for n in head_concats} == {1}
    # The only Transposes: per head one 3-D on the query and one on the probabilities, plus the converter of
    # encoder_hidden_states (a graph input in token layout).
    transposes = [n for n in graph.nodes if n.op == "Transpose"]
    assert all(len(n.attrs["perm"]) == 3 for n in transposes)
    assert len(transposes) == 2 * expected_heads + 1
    def reads_transposed_softmax(n: gs.Node) -> bool:
        t = producer(n.inputs[1])
        p = producer(t.inputs[0]) if t is not None and t.op == "Transpose" else None
        return p is not None and p.op == "Softmax"

    value_products = [n for n in graph.nodes if n.op == "MatMul" and reads_transposed_softmax(n)]
    assert len(value_products) == expected_heads  # o_h = MatMul(v_h [B, d, S], Transpose(p_h))
    assert records[-1].counts["transposes_left"] == len(transposes)


@pytest.mark.parametrize("model", ["tiny_torchscript_onnx", "tiny_dynamo_onnx"])
def test_exporter_graph_keeps_numbers_and_gains_no_transposes(model, request):
    graph, ctx = _lora_graph(request.getfixturevalue(model))
    before = sum(n.op == "Transpose" for n in graph.nodes)
    after, result = apply_pass_and_basic_check(graph, "transpose-cancel", ctx)
    assert result.counts["transposes_left"] == sum(n.op == "Transpose" for n in after.nodes) <= before
    assert not get_pass("transpose-cancel").run(after, ctx).changed


def test_linear_to_conv_output_is_a_fixed_point(bundled_unet):
    graph, ctx, _ = prepare(bundled_unet, {k: str(v) for k, v in bundled_loras().items()})
    graph, _ = run_pipeline(graph, "float,linear-to-conv", ctx)
    result = get_pass("transpose-cancel").run(graph, ctx)
    assert not result.changed and result.counts["rewrites"] == 0


def test_graph_outputs_keep_their_names_and_shapes():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    outs (float[1, 4, 1, 3] a) => (float[1, 3, 4] t, float[1, 4, 1, 3] z)
    <int64[3] cs = {1, 4, 3}, int64[4] nchw = {1, 4, 1, 3}>
    { r = Reshape (a, cs)  t = Transpose <perm = [0, 2, 1]> (r)  u = Transpose <perm = [0, 2, 1]> (t)
      z = Reshape (u, nchw) }"""
    import onnx

    graph = gs.import_onnx(onnx.parser.parse_model(text))
    after, _ = apply_pass_and_basic_check(graph, "transpose-cancel", CompileContext())
    assert [o.name for o in after.outputs] == ["t", "z"]


def test_per_head_slices_move_to_the_channel_axis(tiny_dynamo_onnx):
    graph, ctx = _lora_graph(tiny_dynamo_onnx)
    graph, _ = run_pipeline(graph, "linear-to-conv", ctx)
    heads = split_heads(graph, slices=True)
    graph, records = run_pipeline(graph, "transpose-cancel", ctx, verify="numeric")
    head_slices = [n for n in graph.nodes if n.op == "Slice" and n.inputs[0].shape and len(n.inputs[0].shape) == 4]
    assert len(head_slices) == 3 * heads
    assert all(list(np.asarray(n.inputs[3].values)) == [1] for n in head_slices)
    transposes = [n for n in graph.nodes if n.op == "Transpose"]
    assert all(len(n.attrs["perm"]) == 3 for n in transposes) and len(transposes) == 2 * heads + 1
