"""linear-to-conv: every constant-weight MatMul/Gemm becomes a 1x1 Conv on [B, C, 1, S], the layout changes once
per Transformer2D, LoRA slots move to the channels layout, numbers and bundled tasks are kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from golden import GOLDEN_DIR, parse_text

from quadc.compiler import CompileOptions, bundled_loras, compile_model, prepare
from quadc.context import CompileContext
from quadc.graph import ExternalValues, load_model, save_model
from quadc.graph_inputs import random_inputs
from quadc.lora.slots import LoRASlot, rebind_feeds, slot_inputs
from quadc.passes import PassPipeline, get_pass, run_pipeline
from quadc.passes.layout import LazyArray
from quadc.passes.pipeline import run_graph
from quadc.testing import apply_pass_and_basic_check, assert_same_outputs, lora_feeds

MODELS = ["tiny_torchscript_onnx", "tiny_dynamo_onnx", "bundled_unet"]


def _float_graph(path, *, loras: bool = True, targets: str | None = None) -> tuple[gs.Graph, CompileContext]:
    graph, ctx, _ = prepare(path, {k: str(v) for k, v in bundled_loras().items()} if loras else {})
    pipeline = PassPipeline("float")
    if targets:
        pipeline.set_options("lora-inputs", targets=targets)
    graph, _ = run_pipeline(graph, pipeline, ctx)
    return graph, ctx


def _constant_linears(graph: gs.Graph) -> list[gs.Node]:
    """MatMul/Gemm nodes whose second operand is a constant (directly or through a Transpose)."""
    out = []
    for n in graph.nodes:
        if n.op in ("MatMul", "Gemm") and len(n.inputs) > 1:
            w = n.inputs[1]
            src = w.inputs[0] if w.inputs and w.inputs[0].op == "Transpose" else None
            if isinstance(w, gs.Constant) or (src is not None and isinstance(src.inputs[0], gs.Constant)):
                out.append(n)
    return out


def _ops(graph: gs.Graph, op: str) -> list[gs.Node]:
    return [n for n in graph.nodes if n.op == op]


@pytest.mark.parametrize("model", MODELS)
def test_tiny_unet_converts_every_linear_layer_and_keeps_numbers(model, request):
    graph, ctx = _float_graph(request.getfixturevalue(model))
    linears = len(_constant_linears(graph))
    convs = len(_ops(graph, "Conv"))
    norms = len(_ops(graph, "LayerNormalization"))
    assert linears == sum(p.kind == "linear" for p in ctx.model_info.points.values()) > 0
    slots_before = dict(ctx.lora_slots)
    # Non-zero LoRA inputs; a moved slot's inputs change shape and are fed in the new layout.
    after, result = apply_pass_and_basic_check(graph, "linear-to-conv", ctx)
    assert result.counts["matmul_to_conv"] == linears
    assert not _constant_linears(after)
    assert len(_ops(after, "Conv")) == convs + linears
    # LoRA branches on converted layers moved to the channels layout; conv slots stayed.
    moved = [m for m, s in slots_before.items() if s.kind == "linear"]
    assert moved and result.counts["lora_to_channels"] == len(moved)
    inputs = {t.name: t for t in after.inputs}
    for module, old in slots_before.items():
        new = ctx.lora_slots[module]
        assert new.layout == ("channels" if old.kind == "linear" else old.layout)
        assert list(inputs[new.down_input].shape) == list(new.down_shape)
        assert list(inputs[new.up_input].shape) == list(new.up_shape)
        if old.kind == "linear":
            down = next(n for n in after.nodes if inputs[new.down_input] in n.inputs)
            assert down.op == "MatMul" and down.inputs[0].name == new.down_input  # a left, dynamic operand
    # LayerNorm became a channel-axis norm; the exporter's NCHW <-> tokens Transposes are gone: besides the
    # one converter of encoder_hidden_states, only each attention's query and probabilities stay transposed.
    assert not _ops(after, "LayerNormalization")
    channel_means = [n for n in _ops(after, "ReduceMean") if list(n.attrs.get("axes", [1])) == [1]]
    assert len(channel_means) == 2 * norms
    transposes = _ops(after, "Transpose")
    assert result.counts["transposes_left"] == len(transposes)
    ehs = [t for t in transposes if t.inputs[0].name == ctx.model_info.roles["encoder_hidden_states"]]
    in_attention = [t for t in transposes if list(t.attrs["perm"]) == [0, 1, 3, 2]]
    assert len(ehs) == 1 and len(in_attention) == 2 * len(ctx.model_info.attention)
    assert len(transposes) == len(ehs) + len(in_attention)


def test_without_lora_slots(tiny_torchscript_onnx):
    graph, ctx = _float_graph(tiny_torchscript_onnx, loras=False)
    assert not ctx.lora_slots
    after, result = apply_pass_and_basic_check(graph, "linear-to-conv", ctx)
    assert result.counts["lora_to_channels"] == 0 and result.counts["matmul_to_conv"] > 0
    assert not _constant_linears(after)


def test_time_embedding_lora_slots_move_too(tiny_dynamo_onnx):
    graph, ctx = _float_graph(tiny_dynamo_onnx, loras=False, targets="*time_emb*,*to_q")
    gemm_slots = [m for m in ctx.lora_slots if "time_emb" in m]
    assert gemm_slots
    after, result = apply_pass_and_basic_check(graph, "linear-to-conv", ctx)
    assert result.counts["lora_to_channels"] == len(ctx.lora_slots)
    assert {s.layout for s in ctx.lora_slots.values()} == {"channels"}
    assert not _constant_linears(after)


def test_second_run_changes_nothing(bundled_unet):
    graph, ctx = _float_graph(bundled_unet)
    p = get_pass("linear-to-conv")
    assert p.run(graph, ctx).changed
    slots = dict(ctx.lora_slots)
    second = p.run(graph, ctx)
    assert not second.changed and second.counts["matmul_to_conv"] == 0
    assert ctx.lora_slots == slots


def test_float_then_npu_passes_leave_no_constant_matmul(bundled_unet):
    graph, ctx, _ = prepare(bundled_unet, {})
    graph, records = run_pipeline(graph, "float,linear-to-conv,transpose-cancel", ctx, verify="check")
    assert _constant_linears(graph) == []
    assert not any(n.op in ("MatMul", "Gemm") and isinstance(n.inputs[1], gs.Constant) for n in graph.nodes)
    assert records[-1].counts["transposes_left"] == len(_ops(graph, "Transpose"))


def test_bundled_tasks_packed_in_the_new_layout_match_the_float_graph(tmp_path):
    from quadc.export.configs import TEXT_TOKENS, TINY
    from quadc.runtime.engine import Engine

    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
             "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, TEXT_TOKENS["tiny"], TINY["cross_attention_dim"])
                                                          ).astype(np.float32)}
    outs = {}
    for name, passes in (("float", "float"), ("npu", "float,linear-to-conv,transpose-cancel")):
        manifest = compile_model(None, tmp_path / name, CompileOptions(passes=passes))
        engine = Engine(tmp_path / name)
        outs[name] = {t: engine.run(feeds, task=t)["out_sample"] for t in [None, *bundled_loras()]}
        layouts = {s["layout"] for s in manifest["lora_slots"]}
        assert ("channels" in layouts) == (name == "npu")
    for task, ref in outs["float"].items():
        got = outs["npu"][task]
        assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref)), task
        if task is not None:  # the task's LoRA takes effect
            assert np.max(np.abs(ref - outs["float"][None])) > 1e-2 * np.max(np.abs(ref)), task


def test_cli_verify_numeric_and_print_after(tmp_path, capsys):
    from quadc.cli import main

    code = main(["compile", "-q", "--target", "onnx", "--passes", "lora-inputs,cleanup,linear-to-conv,transpose-cancel",
                 "--verify", "numeric", "--print-after", "linear-to-conv", "-o", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "// after linear-to-conv" in printed and "= Conv <" in printed
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert not any(n.op_type in ("MatMul", "Gemm") and n.input[1] in {i.name for i in model.graph.initializer}
                   for n in model.graph.node)


def test_weights_stay_lazy_until_saved_and_other_weights_are_not_decoded(tiny_torchscript_onnx, tmp_path):
    from quadc import frontend

    src = tmp_path / "ext" / "unet.onnx"
    save_model(load_model(tiny_torchscript_onnx), src, external=True)
    graph, info = frontend.load(src)
    ctx = CompileContext(model_info=info)
    graph, _ = run_pipeline(graph, "float", ctx)
    reference = graph.copy()
    external_before = {t.name for t in graph.tensors().values()
                       if isinstance(t, gs.Constant) and isinstance(t._values, ExternalValues)}
    get_pass("linear-to-conv").run(graph, ctx)
    weights = {n.inputs[1].name: n.inputs[1] for n in _ops(graph, "Conv") if list(n.inputs[1].shape[2:]) == [1, 1]}
    lazy = [w for w in weights.values() if isinstance(w._values, LazyArray)]
    reshaped = [w for w in weights.values() if isinstance(w._values, ExternalValues) and w.name in external_before
                and "time" in w.name]
    assert lazy, "transposed weights are computed only when read"
    assert reshaped, "Gemm weights are only reshaped: they stay references into the data file"
    untouched = [t for t in graph.tensors().values() if isinstance(t, gs.Constant) and t.name in external_before
                 and t not in lazy]
    assert untouched and all(isinstance(t._values, ExternalValues) for t in untouched), "a weight was decoded"
    # A later pass that leaves tensors without shapes makes transpose-cancel infer them: the converted
    # weights must not be computed for that.
    computed = []
    for w in lazy:
        w._values.fn = (lambda fn, name: lambda a: computed.append(name) or fn(a))(w._values.fn, w.name)
    for n in _ops(graph, "Softmax"):
        n.outputs[0].shape = None
    get_pass("transpose-cancel").run(graph, ctx)
    assert all(n.outputs[0].shape for n in _ops(graph, "Softmax")) and not computed
    out = save_model(graph, tmp_path / "out" / "unet.onnx")
    assert sorted(computed) == sorted(w.name for w in lazy)  # each computed once, when written
    feeds = random_inputs(reference, seed=3)
    assert_same_outputs(reference, load_model(out), feeds)


def test_shared_weight_and_gemm_alpha_beta():
    graph = gs.import_onnx(onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    shared (float[1, 3, 4] x, float[1, 4] t) => (float[1, 3, 4] y, float[1, 2] z)
    <float[4, 4] w = {0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.2, 0.1, -0.3, 0.4, 0.6, -0.5, -0.1, 0.3, 0.2, -0.2},
     float[4, 2] g = {0.3, 0.1, -0.2, 0.4, 0.5, -0.1, 0.2, 0.2}, float[2] c = {0.5, -0.5}>
    { h = MatMul (x, w)  y = MatMul (h, w)  z = Gemm <alpha = 0.5, beta = 2.0> (t, g, c) }"""))
    after, result = apply_pass_and_basic_check(graph, "linear-to-conv", CompileContext())
    assert result.counts["matmul_to_conv"] == 3 and not _constant_linears(after)


def test_lora_branch_without_a_slot_entry_stays_a_matmul_branch():
    path = GOLDEN_DIR / "linear-to-conv" / "lora_slot.in.onnxtxt"
    graph = parse_text(path)
    after, result = apply_pass_and_basic_check(graph, "linear-to-conv", CompileContext())
    assert result.counts == {**result.counts, "matmul_to_conv": 1, "lora_to_channels": 0}
    down = next(n for n in after.nodes if n.inputs and n.inputs[-1].name == "blk.attn1.to_q.lora_down")
    assert down.op == "MatMul" and len(down.inputs[0].shape) == 3  # still x @ down, in T layout


def test_postcondition_names_a_constant_matmul():
    graph = parse_text(GOLDEN_DIR / "linear-to-conv" / "linear_bias.in.onnxtxt")
    failed = get_pass("linear-to-conv").postcondition(graph, CompileContext())
    assert failed and "/blk/ff/MatMul" in failed[0]


def test_channels_layout_computes_the_same_branch():
    slot = LoRASlot("m", "linear", 2, "m.lora_down", "m.lora_up", (4, 2), (2, 6))
    moved = slot.in_channels_layout()
    rng = np.random.default_rng(0)
    feeds = {"m.lora_down": rng.standard_normal((4, 2)), "m.lora_up": rng.standard_normal((2, 6))}
    there = rebind_feeds(feeds, {"m": slot}, {"m": moved})
    assert there["m.lora_down"].shape == moved.down_shape and there["m.lora_up"].shape == moved.up_shape
    x = rng.standard_normal((3, 4))  # tokens x channels; the N form reads channels x tokens
    np.testing.assert_allclose((x @ feeds["m.lora_down"]) @ feeds["m.lora_up"],
                               (there["m.lora_up"] @ (there["m.lora_down"] @ x.T)).T)
    assert slot_inputs({"m": slot}) == {"m.lora_down", "m.lora_up"}


def test_pipeline_numeric_verify_feeds_moved_slots_in_their_new_layout(bundled_unet):
    graph, ctx = _float_graph(bundled_unet)
    before = graph.copy()
    slots = dict(ctx.lora_slots)
    graph, records = run_pipeline(graph, "linear-to-conv", ctx, verify="numeric")
    assert records[0].max_abs_diff is not None and records[0].max_abs_diff < 1e-5
    feeds = lora_feeds(before, slots, seed=1)
    ref, got = run_graph(before, feeds)[0], run_graph(graph, rebind_feeds(feeds, slots, ctx.lora_slots))[0]
    assert np.max(np.abs(ref - got)) <= 1e-5 * np.max(np.abs(ref))


def test_weight_stored_in_another_type_keeps_its_cast():
    x, y = gs.Variable("x", np.float32, [1, 3, 4]), gs.Variable("y", np.float32, [1, 3, 2])
    w = gs.Constant("w", np.array([[0.1, -0.2], [0.3, -0.4], [0.5, -0.6], [0.2, 0.1]], np.float16))
    wf, h = gs.Variable("wf", np.float32, [4, 2]), gs.Variable("h", np.float32, [1, 3, 2])
    graph = gs.Graph(nodes=[gs.Node("Cast", "cast", {"to": onnx.TensorProto.FLOAT}, [w], [wf]),
                            gs.Node("MatMul", "mm", inputs=[x, wf], outputs=[h]),
                            gs.Node("Add", "add", inputs=[h, gs.Constant("b", np.array([0.5, -0.5], np.float32))],
                                    outputs=[y])], inputs=[x], outputs=[y], opset=17)
    after, result = apply_pass_and_basic_check(graph, "linear-to-conv", CompileContext())
    conv = next(n for n in after.nodes if n.op == "Conv")
    cast = conv.inputs[1].inputs[0]
    assert result.counts["matmul_to_conv"] == 1 and cast.op == "Cast"
    assert cast.inputs[0].dtype == np.float16 and list(cast.inputs[0].shape) == [2, 4, 1, 1]


def test_fp16_model(tiny_fp16_onnx):
    graph, ctx = _float_graph(tiny_fp16_onnx)
    feeds = lora_feeds(graph, ctx.lora_slots)
    before = graph.copy()
    slots = dict(ctx.lora_slots)
    graph, _ = run_pipeline(graph, "linear-to-conv,transpose-cancel", ctx, verify="check")
    assert not _constant_linears(graph)
    ref = run_graph(before, feeds)[0].astype(np.float32)
    got = run_graph(graph, rebind_feeds(feeds, slots, ctx.lora_slots))[0].astype(np.float32)
    # fp16 rounds at 1e-3: a pass that reorders arithmetic keeps the numbers to about that.
    assert np.max(np.abs(got - ref)) <= 2e-3 * np.max(np.abs(ref))
