"""quadc.graph.tidy (the passes' cleanup + sort) against onnx-graphsurgeon's own cleanup + toposort, and
save_model's kernel copies of kept weights against their source bytes, including the fallbacks."""

from __future__ import annotations

import os
import random

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from quadc.compiler import prepare
from quadc.graph import load_model, save_model, tidy
from quadc.passes import PassPipeline, run_pipeline


def _messy_npu_graph() -> gs.Graph:
    """The bundled U-Net after ``float,npu`` (LoRA inputs, local functions), its nodes shuffled, with a
    dead chain, a dead reader of a live tensor and an unused graph input added."""
    graph, ctx, _ = prepare(None, {})
    graph, _ = run_pipeline(graph, PassPipeline("float,npu").build(), ctx)
    live = graph.nodes[len(graph.nodes) // 2].outputs[0]
    dead1 = gs.Variable("dead1", np.float32)
    dead2 = gs.Variable("dead2", np.float32)
    graph.nodes.append(gs.Node("Relu", "dead_relu", inputs=[live], outputs=[dead1]))
    graph.nodes.append(gs.Node("Sigmoid", "dead_sigmoid", inputs=[dead1], outputs=[dead2]))
    graph.inputs.append(gs.Variable("unused_input", np.float32, [1]))
    random.Random(0).shuffle(graph.nodes)
    return graph


def test_tidy_gives_gs_cleanup_and_toposort_order():
    graph = _messy_npu_graph()
    assert graph.functions, "the npu preset's fused activations are local functions"
    reference = graph.copy()
    reference.cleanup(remove_unused_graph_inputs=False).toposort()
    inputs = [t.name for t in graph.inputs]
    tidy(graph)
    assert [n.name for n in graph.nodes] == [n.name for n in reference.nodes]
    assert not {"dead_relu", "dead_sigmoid"} & {n.name for n in graph.nodes}
    assert [t.name for t in graph.inputs] == inputs  # kept, the unused one too
    assert [f.name for f in graph.functions] == [f.name for f in reference.functions]
    tidy(graph, remove_unused_inputs=True)
    assert "unused_input" not in {t.name for t in graph.inputs}


def test_tidy_refuses_a_cycle():
    x = gs.Variable("x", np.float32, [1])
    a, b, y = (gs.Variable(n, np.float32, [1]) for n in ("a", "b", "y"))
    nodes = [gs.Node("Add", "n1", inputs=[x, b], outputs=[a]), gs.Node("Relu", "n2", inputs=[a], outputs=[b]),
             gs.Node("Relu", "n3", inputs=[b], outputs=[y])]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=17)
    with pytest.raises(Exception, match="[Cc]ycle"):
        tidy(graph)


def _external_model(path):
    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.standard_normal((64, 64 + 8 * i)).astype(np.float32) for i in range(3)}
    nodes, last = [], "x"
    for i, name in enumerate(weights):
        nodes.append(helper.make_node("MatMul", [last, name], [f"h{i}"]))
        last = f"h{i}"
        if i + 1 < len(weights):
            nodes.append(helper.make_node("Slice", [last, "starts", "ends", "axes"], [f"s{i}"]))
            last = f"s{i}"
    inits = [onnx.numpy_helper.from_array(w, n) for n, w in weights.items()]
    inits += [onnx.numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("starts", [0]), ("ends", [64]), ("axes", [1]))]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, all_tensors_to_one_file=True, location="src.bin", size_threshold=0)
    return weights


@pytest.mark.parametrize("broken", [(), ("copy_file_range",)])
def test_saved_weights_equal_their_source_with_each_copy_method(tmp_path, monkeypatch, broken):
    """Kept weights are copied by copy_file_range, else by pread/pwrite: each gives the source's bytes."""
    def refuse(*args, **kwargs):
        raise OSError(95, "not supported here")

    for name in broken:
        monkeypatch.setattr(os, name, refuse)
    (tmp_path / "src").mkdir()
    weights = _external_model(tmp_path / "src" / "m.onnx")
    out = save_model(load_model(tmp_path / "src" / "m.onnx"), tmp_path / "out" / "m.onnx")
    back = onnx.load(str(out))  # onnx's own reader of the external data
    got = {i.name: onnx.numpy_helper.to_array(i) for i in back.graph.initializer}
    for name, w in weights.items():
        np.testing.assert_array_equal(got[name], w)
