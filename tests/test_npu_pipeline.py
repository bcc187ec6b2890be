"""The whole NPU preset on the tiny U-Net from both exporters and the bundled model: what the graph looks
like after it, that every bundled task computes what the float LoRA-as-input graph computes, and that the
quantized graph built on it keeps every task above 30 dB SQNR on inputs not used for calibration."""

from __future__ import annotations

import json

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from quadc import frontend
from quadc.cli import main
from quadc.compiler import CompileOptions, bundled_loras, compile_model
from quadc.graph import load_model
from quadc.passes import PassPipeline
from quadc.quant.affine import sqnr_db
from quadc.quant.feeds import random_feeds
from quadc.runtime.engine import Engine

MODELS = ["bundled_unet", "tiny_torchscript_onnx", "tiny_dynamo_onnx"]


def test_npu_preset_names_the_issue_passes():
    assert PassPipeline("npu").names == ["linear-to-conv", "mha-split", "conv-act-fusion", "scale-fold",
                                         "transpose-cancel", "const-fold", "dce"]


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory):
    """model fixture name -> (float artifact, float+npu artifact, model path)."""
    out = {}
    loras = {k: str(v) for k, v in bundled_loras().items()}
    for name in MODELS:
        model = request.getfixturevalue(name)
        root = tmp_path_factory.mktemp(name)
        compile_model(model, root / "f", CompileOptions(target="onnx", loras=loras))
        compile_model(model, root / "n", CompileOptions(target="onnx", loras=loras, passes="float,npu"))
        out[name] = (root / "f", root / "n", model)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_npu_graph_shape(compiled, name):
    _, npu, model = compiled[name]
    graph = load_model(npu / "model.onnx")
    const_linear = [n.name for n in graph.nodes if n.op in ("MatMul", "Gemm")
                    and any(isinstance(t, gs.Constant) for t in n.inputs[:2])]
    assert const_linear == []
    _, info = frontend.load(model)
    heads = sum(block.heads for block in info.attention)
    assert heads > 0 and sum(n.op == "Softmax" for n in graph.nodes) == heads
    # No 4-D head reshape/transpose is left: every remaining Transpose is a 3-D per-head one.
    transposes = [n for n in graph.nodes if n.op == "Transpose"]
    assert all(len(n.attrs["perm"]) == 3 for n in transposes), [n.attrs["perm"] for n in transposes]


@pytest.mark.parametrize("name", MODELS)
def test_npu_graph_keeps_every_task(compiled, name):
    flt, npu, _ = compiled[name]
    ref, got = Engine(flt), Engine(npu)
    feeds = random_feeds(load_model(flt / "model.onnx"), 2, seed=99)
    for task in [None, *ref.tasks]:
        for feed in feeds:
            want = ref.run(feed, task)["out_sample"]
            diff = float(np.max(np.abs(want - got.run(feed, task)["out_sample"])))
            assert diff <= 1e-5 * float(np.max(np.abs(want))), (name, task, diff)


def test_quantized_npu_graph_keeps_every_task_above_30_db(compiled, tmp_path):
    flt, _, model = compiled["bundled_unet"]
    out = tmp_path / "q"
    compile_model(model, out, CompileOptions(target="onnx-qdq", loras={k: str(v) for k, v in bundled_loras().items()},
                                             passes="float,npu,qdq"))
    ref, q = Engine(flt), Engine(out)
    # Calibration uses random_feeds(seed 0); these held-out feeds use another seed.
    feeds = random_feeds(load_model(flt / "model.onnx"), 3, seed=4321)
    for task in [None, *ref.tasks]:
        for feed in feeds:
            assert sqnr_db(ref.run(feed, task)["out_sample"], q.run(feed, task)["out_sample"]) >= 30.0, task
    # Calibration saw the final graph: encodings.json names tensors of the rewritten graph, among them the
    # outputs of the 1x1 convs that replaced the linear layers, and no linear layer is left.
    graph = load_model(out / "model.onnx")
    names = set(graph.tensors())
    activations = [e["name"] for e in json.loads((out / "encodings.json").read_text())["activation_encodings"]]
    assert all(n in names or f"{n}_QuantizeLinear_Input" in names for n in activations)
    conv_outputs = {n.outputs[0].name for n in graph.nodes if n.op == "Conv"}
    assert len(conv_outputs & set(activations)) > 50
    assert not [n for n in graph.nodes if n.op in ("MatMul", "Gemm") and n.inputs[1].inputs
                and n.inputs[1].inputs[0].op == "DequantizeLinear" and isinstance(n.inputs[1].inputs[0].inputs[0], gs.Constant)]


def test_issue_pipeline_with_verify_numeric(tmp_path):
    code = main(["compile", "-q", "--target", "onnx", "--passes",
                 "lora-inputs,linear-to-conv,mha-split,conv-act-fusion,scale-fold,const-fold,dce",
                 "--verify", "numeric", "-o", str(tmp_path / "o")])
    assert code == 0
