"""conv-act-fusion on the tiny U-Net from both exporters and the bundled model: SiLU and Erf-GELU collapse
to one node, layer+activation pairs are recorded as unquantized, numbers stay (with every bundled task
bound), options, and the quantized path (no Q/DQ between a fused pair, Q/DQ around Gelu/SiLU)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from quadc.compiler import CompileOptions, bundled_loras, compile_model, prepare
from quadc.errors import QuadcError
from quadc.graph import load_model
from quadc.graph_inputs import random_inputs
from quadc.lora.pack import pack_task
from quadc.passes import PassPipeline, get_pass, run_pipeline
from quadc.passes.pipeline import run_graph, task_feeds
from quadc.quant.calibrate import clone_graph
from quadc.runtime.engine import Engine
from quadc.testing import apply_pass_and_basic_check

MODELS = ("tiny_torchscript_onnx", "tiny_dynamo_onnx", "bundled_unet")


@pytest.fixture(scope="module", params=MODELS)
def float_unet(request):
    """(float graph with the bundled LoRAs as inputs, its context, model name)."""
    path = request.getfixturevalue(request.param)
    graph, ctx, _ = prepare(path, {k: str(v) for k, v in bundled_loras().items()})
    graph, _ = run_pipeline(graph, "float", ctx)
    return graph, ctx, request.param


def fresh(ctx):
    return replace(ctx, lora_slots=dict(ctx.lora_slots), unquantized=set(), applied=list(ctx.applied), stats=[])


def ops(graph) -> Counter:
    return Counter((n.domain or "", n.op) for n in graph.nodes)


def silu_producers(graph) -> set[str]:
    """Outputs of Conv/Gemm/constant-weight MatMul read only by a Sigmoid and the Mul of x * sigmoid(x)."""
    found = set()
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or (node.op == "MatMul" and
                                                          not any(isinstance(t, gs.Constant) for t in node.inputs)):
            continue
        out = node.outputs[0]
        readers = list(out.outputs)
        sig = [r for r in readers if r.op == "Sigmoid"]
        if len(readers) == 2 and len(sig) == 1 and any(r.op == "Mul" and sig[0].outputs[0] in r.inputs
                                                       for r in readers):
            found.add(out.name)
    return found


def task_outputs(graph, slots, loras, feeds):
    return {t: run_graph(graph, {**feeds, **pack_task(lora, slots)})[0] for t, lora in [(None, None), *loras.items()]}


def test_collapses_fuses_and_keeps_numbers(float_unet):
    graph, ctx0, _ = float_unet
    ctx = fresh(ctx0)
    before = ops(graph)
    expected_fused = silu_producers(graph)
    assert before[("", "Sigmoid")] > 0 and before[("", "Erf")] > 0
    # Slot inputs carry the bundled tasks' tensors (N(0, 1) noise makes the U-Net chaotic, see task_feeds).
    after, result = apply_pass_and_basic_check(graph, "conv-act-fusion", ctx, new_input_values=task_feeds(graph, ctx),
                                               rtol=1e-5)
    got = ops(after)
    assert got[("", "Sigmoid")] == 0 and got[("", "Erf")] == 0
    assert got[("quadc", "SiLU")] == before[("", "Sigmoid")]
    assert got[("", "Gelu")] == before[("", "Erf")]
    assert after.opset >= 20
    # The time embedding's two linears feed SiLU; after the pass their outputs stay float.
    assert len(expected_fused) == 2 and ctx.unquantized == expected_fused
    assert result.counts["fused"] == 2
    # Every bundled task (packed LoRA bound) computes what it did.
    feeds = random_inputs(graph, seed=3)
    ref = task_outputs(graph, ctx0.lora_slots, ctx0.loras, feeds)
    out = task_outputs(after, ctx.lora_slots, ctx0.loras, feeds)
    for task, r in ref.items():
        assert np.max(np.abs(out[task] - r)) <= 1e-5 * np.max(np.abs(r)), task
    again = get_pass("conv-act-fusion").run(after, ctx)
    assert not again.changed, again.counts


def test_gelu_function_and_keep_options(tiny_dynamo_onnx):
    graph, ctx, _ = prepare(tiny_dynamo_onnx, {k: str(v) for k, v in bundled_loras().items()})
    graph, _ = run_pipeline(graph, "float", ctx)
    before = ops(graph)
    tasks = task_feeds(graph, ctx)
    fn, _ = apply_pass_and_basic_check(graph, "conv-act-fusion", fresh(ctx), options={"gelu": "function"},
                                       new_input_values=tasks)
    assert fn.opset == graph.opset == 18
    assert ops(fn)[("quadc", "Gelu")] == before[("", "Erf")] and ops(fn)[("", "Erf")] == 0
    assert {(f.domain, f.name) for f in fn.functions} == {("quadc", "Gelu"), ("quadc", "SiLU")}
    keep_ctx = fresh(ctx)
    kept, result = apply_pass_and_basic_check(graph, "conv-act-fusion", keep_ctx, new_input_values=tasks,
                                              options={"gelu": "keep", "silu": "keep"})
    assert ops(kept) == before and kept.opset == 18
    # Without the SiLU collapse the linears feed Sigmoid and Mul: nothing is a fused pair.
    assert keep_ctx.unquantized == set() and not result.changed


def test_silu_as_swish_op(bundled_unet):
    graph, ctx, _ = prepare(bundled_unet, {})
    graph, _ = run_pipeline(graph, "float", ctx)
    n = ops(graph)[("", "Sigmoid")]
    after, _ = apply_pass_and_basic_check(graph, "conv-act-fusion", fresh(ctx), options={"silu": "op"})
    assert after.opset == 24 and ops(after)[("", "Swish")] == n


def test_bad_option_is_one_line_error():
    with pytest.raises(QuadcError, match="conv-act-fusion.gelu='sometimes' is not one of op, function, keep"):
        PassPipeline("float,conv-act-fusion").set_options("conv-act-fusion", gelu="sometimes")


@pytest.fixture(scope="module")
def qdq_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion_qdq")
    for name, passes in (("fused", "float,conv-act-fusion,qdq"), ("plain", "float,qdq")):
        compile_model(None, root / name, CompileOptions(target="onnx-qdq", passes=passes))
    compile_model(None, root / "float", CompileOptions(target="onnx", passes="float"))
    return root


def test_quantized_path_has_no_qdq_inside_a_fused_pair(qdq_artifacts):
    graph = load_model(qdq_artifacts / "fused" / "model.onnx")
    assert graph.opset == 21 and {(f.domain, f.name) for f in graph.functions} == {("quadc", "SiLU")}
    pairs = []
    for node in graph.nodes:
        if (node.domain or "", node.op) in {("quadc", "SiLU"), ("", "Gelu")}:
            src = node.inputs[0].inputs[0]
            if src.op in ("Conv", "Gemm", "MatMul"):
                pairs.append(src.outputs[0].name)
            else:
                assert src.op == "DequantizeLinear", (node.name, src.op)
            assert [r.op for r in node.outputs[0].outputs] == ["QuantizeLinear"], node.name
    assert len(pairs) == 2 and all("time_embedding" in p for p in pairs)
    encoded = {e["name"] for e in json.loads((qdq_artifacts / "fused" / "encodings.json").read_text())
               ["activation_encodings"]}
    assert not set(pairs) & encoded
    plain = {e["name"] for e in json.loads((qdq_artifacts / "plain" / "encodings.json").read_text())
             ["activation_encodings"]}
    assert set(pairs) <= plain


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2)))


def test_quantized_fused_graph_runs_and_matches_the_unfused_one(qdq_artifacts):
    rng = np.random.default_rng(7)
    feeds = {"sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32), "timestep": np.array([321], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 8, 32)).astype(np.float32)}
    fused, plain, ref = (Engine(qdq_artifacts / n) for n in ("fused", "plain", "float"))
    assert fused.tasks == ref.tasks and len(fused.tasks) == 4
    for task in [None, *fused.tasks]:
        want = ref.run(feeds, task=task)["out_sample"]
        got = fused.run(feeds, task=task)["out_sample"]
        base = plain.run(feeds, task=task)["out_sample"]
        assert _sqnr(want, got) >= _sqnr(want, base) - 1.0 and _sqnr(want, got) > 15.0, task


def test_function_nodes_survive_graph_copies(float_unet):
    graph, ctx, _ = float_unet
    after = clone_graph(graph)
    get_pass("conv-act-fusion").run(after, fresh(ctx))
    copied = clone_graph(after)
    feeds = random_inputs(graph)
    np.testing.assert_array_equal(run_graph(after, feeds)[0], run_graph(copied, feeds)[0])
