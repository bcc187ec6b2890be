"""scale-fold on the tiny U-Net from both exporters and the bundled model: the attention scales go into the
q/k weights and the LoRA slot table, Div-by-1 disappears, every bundled task gives the same output (graph
level and through compile_model + Engine), idempotence, why a scale stays, and the numeric verify mode."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from quadc.compiler import CompileOptions, bundled_loras, compile_model, prepare
from quadc.graph import infer_shapes
from quadc.graph_inputs import random_inputs
from quadc.lora.pack import pack_task
from quadc.passes import get_pass, run_pipeline
from quadc.passes.patterns import explain
from quadc.passes.pipeline import run_graph, task_feeds
from quadc.passes.scale_fold import scale_rule
from quadc.quant.calibrate import clone_graph
from quadc.runtime.engine import Engine
from quadc.testing import apply_pass_and_basic_check

MODELS = ("tiny_torchscript_onnx", "tiny_dynamo_onnx", "bundled_unet")


def loras() -> dict[str, str]:
    return {k: str(v) for k, v in bundled_loras().items()}


@pytest.fixture(scope="module", params=MODELS)
def float_unet(request):
    """(float graph with the bundled LoRAs as inputs, context). The TorchScript exports compute the
    attention scale from Shape nodes, which const-fold folds only once shapes are inferred."""
    graph, ctx, _ = prepare(request.getfixturevalue(request.param), loras())
    graph, _ = run_pipeline(graph, "float", ctx)
    graph, _ = run_pipeline(infer_shapes(graph), "const-fold", ctx)
    return graph, ctx


def fresh(ctx):
    return replace(ctx, lora_slots=dict(ctx.lora_slots), unquantized=set(), applied=list(ctx.applied), stats=[])


def scalar_scales(graph) -> list[gs.Node]:
    """``Mul(x, c)``, ``Mul(c, x)`` and ``Div(x, c)`` nodes with a one-element float constant ``c``."""
    found = []
    for node in graph.nodes:
        if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
            continue
        consts = [t for t in node.inputs if isinstance(t, gs.Constant)]
        if node.op == "Div" and not isinstance(node.inputs[1], gs.Constant):
            continue  # c / x is no scale
        if len(consts) == 1 and consts[0].values.size == 1 and consts[0].values.dtype.kind == "f":
            found.append(node)
    return found


def attention_scales(graph) -> list[gs.Node]:
    """Scalar Mul/Div nodes on the operands of the attention scores (the MatMul before each Softmax),
    looking back through Reshape/Transpose."""
    ids = {id(n) for n in scalar_scales(graph)}
    found = []
    for softmax in (n for n in graph.nodes if n.op == "Softmax"):
        scores = softmax.inputs[0].inputs[0]
        for t in scores.inputs:
            while t.inputs and t.inputs[0].op in ("Reshape", "Transpose"):
                t = t.inputs[0].inputs[0]
            if t.inputs and id(t.inputs[0]) in ids:
                found.append(t.inputs[0])
    return found


def divisions_by_one(graph) -> list[gs.Node]:
    return [n for n in scalar_scales(graph) if float(next(t for t in n.inputs if isinstance(t, gs.Constant)).values.reshape(-1)[0]) == 1.0]


def outputs_per_task(graph, slots, ctx, feeds):
    return {t: run_graph(graph, {**feeds, **pack_task(lora, slots)})[0]
            for t, lora in [(None, None), *ctx.loras.items()]}


def test_attention_scales_fold_into_q_k_and_the_slots(float_unet):
    graph, ctx0 = float_unet
    ctx = fresh(ctx0)
    assert len(attention_scales(graph)) == 16  # q and k of the 8 attentions
    # Slot inputs carry the bundled tasks' tensors (N(0, 1) noise makes the U-Net chaotic, see task_feeds).
    after, result = apply_pass_and_basic_check(graph, "scale-fold", ctx, new_input_values=task_feeds(graph, ctx),
                                               rtol=1e-5)
    assert attention_scales(after) == [] and divisions_by_one(after) == []
    attentions = ctx.model_info.attention
    assert len(attentions) == 8
    for att in attentions:
        q, k = (ctx.lora_slots[f"{att.module}.{p}"] for p in ("to_q", "to_k"))
        head_dim = q.up_shape[-1] // att.heads
        # The exporters split 1/sqrt(d) between q and k; together the slots carry all of it.
        assert q.out_scale * k.out_scale == pytest.approx(head_dim ** -0.5, rel=1e-6), att.module
        assert ctx.lora_slots[f"{att.module}.to_v"].out_scale == 1.0
    unscaled = {m for m, s in ctx.lora_slots.items() if s.out_scale == 1.0}
    assert len(unscaled) == len(ctx.lora_slots) - 16
    # Each bundled task, packed for the new slot table, gives what it gave before.
    feeds = random_inputs(graph, seed=5)
    ref = outputs_per_task(graph, ctx0.lora_slots, ctx0, feeds)
    got = outputs_per_task(after, ctx.lora_slots, ctx0, feeds)
    for task, r in ref.items():
        assert np.max(np.abs(got[task] - r)) <= 1e-5 * np.max(np.abs(r)), task
    # The LoRA path really carries the factor: packed for the old table, a q/k-adapting task differs.
    stale = outputs_per_task(after, ctx0.lora_slots, ctx0, feeds)["background_removal"]  # adapts to_q, to_k
    assert np.max(np.abs(stale - ref["background_removal"])) > 1e-3 * np.max(np.abs(ref["background_removal"]))
    again = get_pass("scale-fold").run(after, ctx)
    assert not again.changed and again.counts["folded"] == 0


def test_div_by_one_goes_without_shape_inference(bundled_unet):
    graph, ctx, _ = prepare(bundled_unet, loras())
    graph, _ = run_pipeline(graph, "float", ctx)
    assert len(divisions_by_one(graph)) == 16  # resnets' output_scale_factor and attentions' rescale_output_factor
    after, result = apply_pass_and_basic_check(graph, "scale-fold", ctx)
    assert result.counts["identity"] == 16 and all(s.out_scale == 1.0 for s in ctx.lora_slots.values())
    assert len(after.nodes) == len(graph.nodes) - 16


def test_compiled_tasks_match_through_the_engine(tiny_dynamo_onnx, tmp_path):
    rng = np.random.default_rng(11)
    feeds = {"sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32), "timestep": np.array([640], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 8, 32)).astype(np.float32)}
    manifests = {}
    for name, passes in (("before", "float"), ("after", "float,scale-fold")):
        manifests[name] = compile_model(tiny_dynamo_onnx, tmp_path / name, CompileOptions(loras=loras(), passes=passes))
    assert manifests["after"]["passes"][-1]["counts"]["lora_slots"] == 16
    ref, got = Engine(tmp_path / "before"), Engine(tmp_path / "after")
    assert ref.tasks == got.tasks and len(ref.tasks) == 4
    for task in [None, *ref.tasks]:
        want = ref.run(feeds, task=task)["out_sample"]
        out = got.run(feeds, task=task)["out_sample"]
        assert np.max(np.abs(out - want)) <= 1e-5 * np.max(np.abs(want)), task


@pytest.mark.parametrize("passes", ["lora-inputs,conv-act-fusion,scale-fold,const-fold,dce",
                                    "lora-inputs,scale-fold,const-fold,conv-act-fusion,dce"])
def test_issue_pipeline_verifies_numerically_and_prints(tiny_dynamo_onnx, tmp_path, capsys, passes):
    manifest = compile_model(tiny_dynamo_onnx, tmp_path / "out",
                             CompileOptions(loras=loras(), passes=passes, verify="numeric",
                                            print_after=("conv-act-fusion", "scale-fold")))
    counts = {p["pass"]: p["counts"] for p in manifest["passes"]}
    assert counts["scale-fold"]["folded"] == 16 and counts["conv-act-fusion"]["gelu"] == 4
    printed = capsys.readouterr().out
    assert "// after conv-act-fusion" in printed and "// after scale-fold" in printed
    assert "quadc.SiLU" in printed and "Gelu (" in printed


def test_scale_left_on_a_shared_output_says_why(float_unet):
    graph, ctx0 = float_unet
    g = clone_graph(graph)
    ctx = fresh(ctx0)
    # A second reader of one attention's q: its scale can no longer go into the projection.
    scale = next(n for n in scalar_scales(g) if n.op == "Mul")
    src = next(t for t in scale.inputs if not isinstance(t, gs.Constant))
    tap = gs.Variable("tap", dtype=np.float32)
    g.nodes.append(gs.Node("Relu", "tap", inputs=[src], outputs=[tap]))
    g.outputs.append(tap)
    result = get_pass("scale-fold").run(g, ctx)
    assert result.counts["kept"] >= 1
    why = explain(g, scale_rule(ctx), [scale])
    assert "also read by Relu tap" in why[scale.name]
