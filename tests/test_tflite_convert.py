"""The TFLite backend's pieces: the writer, the layout algebra, ``tflite::legalize``, the host timestep
embedding and the float translation (which must compute what the ONNX graph computes, for the bundled
model and both exporters' tiny U-Nets, LoRA branches included)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

pytest.importorskip("ai_edge_litert")

from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from quadc import frontend  # noqa: E402
from quadc.compiler import prepare  # noqa: E402
from quadc.errors import QuadcError  # noqa: E402
from quadc.graph import ort_session  # noqa: E402
from quadc.passes import PassPipeline, run_pipeline  # noqa: E402
from quadc.quant.calibrate import clone_graph  # noqa: E402
from quadc.targets.tflite import layout as L  # noqa: E402
from quadc.targets.tflite.convert import FloatPolicy, translate  # noqa: E402
from quadc.targets.tflite.host import HostEmbedding, host_graph, split_host  # noqa: E402
from quadc.targets.tflite.writer import BUFFER_ALIGNMENT, Quant, TfliteWriter, read_model  # noqa: E402
from quadc.testing_lora import random_lora, write_kohya  # noqa: E402

MODULES = ["attn1.to_q", "attn2.to_k", "ff.net.2", "resnets.0.conv1", "proj_in"]


def _feeds(graph: gs.Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {t.name: (rng.standard_normal(t.shape) * (0.2 if "lora" in t.name else 1.0)).astype(np.float32)
             for t in graph.inputs}
    feeds["timestep"] = np.array([321.0], np.float32)
    return feeds


# ----------------------------------------------------------------------------------------------- writer
def test_writer_bytes_are_deterministic_and_read_back():
    def build() -> bytes:
        w = TfliteWriter()
        x = w.tensor("x", [1, 3], "int16", quant=Quant.per_tensor(0.5))
        c = w.constant("c", np.arange(12, dtype=np.int32).reshape(3, 4))
        y = w.tensor("y", [1, 4], "int16", quant=Quant.per_tensor(0.25))
        w.op("ADD", [x, c], [y])
        w.set_io([x], [y])
        return w.to_bytes()

    a, b = build(), build()
    assert a == b and a[4:8] == b"TFL3"
    model = read_model(a)
    sub = model.subgraphs[0]
    assert [t.name for t in sub.tensors] == [b"x", b"c", b"y"] or [t.name for t in sub.tensors] == ["x", "c", "y"]
    buf = model.buffers[sub.tensors[1].buffer]
    assert np.frombuffer(bytes(buf.data), np.int32).tolist() == list(range(12))
    # the constant's bytes start at an aligned offset of the file
    assert a.find(np.arange(12, dtype=np.int32).tobytes()) % BUFFER_ALIGNMENT == 0


def test_read_model_refuses_other_files():
    with pytest.raises(QuadcError, match="TFLite"):
        read_model(b"not a model at all")


# ----------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("in_shape,in_perm,out_shape", [
    ([1, 32, 8, 8], L.NHWC, [1, 4, 8, 64]),
    ([1, 4, 8, 64], (0, 3, 1, 2), [1, 32, 8, 8]),
    ([1, 32, 8, 8], L.NHWC, [1, 32, 64]),
    ([1, 64, 32], (0, 1, 2), [1, 8, 8, 32]),
    ([1, 128], (0, 1), [1, 128, 1, 1]),
    ([1, 8, 64], (0, 1, 2), [1, 8, 4, 16]),
])
def test_reshape_perm_is_a_plain_reshape_of_the_buffer(in_shape, in_perm, out_shape):
    x = np.random.default_rng(0).standard_normal(in_shape)
    perm = L.reshape_perm(in_shape, in_perm, out_shape)
    assert perm is not None
    physical_in = x.transpose(in_perm)
    want = x.reshape(out_shape).transpose(perm)
    np.testing.assert_array_equal(physical_in.reshape(want.shape), want)


def test_reshape_perm_none_when_impossible():
    # NHWC [1, 32, 8, 8] -> [1, 32, 8, 8] grouped as [1, 4, 512]: the group's (C/G, H, W) are not contiguous
    assert L.reshape_perm([1, 32, 8, 8], L.NHWC, [1, 4, 512]) is None


def test_transpose_between_and_after_transpose():
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 5))
    src, dst = L.NHWC, (0, 1, 2, 3)
    tp = L.transpose_between(x.shape, src, dst)
    np.testing.assert_array_equal(x.transpose(src).transpose(tp), x.transpose(dst))
    onnx_perm = (0, 2, 1, 3)
    y = x.transpose(onnx_perm)
    np.testing.assert_array_equal(x.transpose(src), y.transpose(L.after_transpose(src, onnx_perm)))


# --------------------------------------------------------------------------------------------- legalize
def _float_graph(model, loras):
    graph, ctx, _ = prepare(model, loras)
    graph, _ = run_pipeline(graph, PassPipeline(["float"]).build(), ctx)
    return graph, ctx


def test_legalize_lowers_norms_and_keeps_numerics():
    graph, ctx = _float_graph(None, {})
    ref = clone_graph(graph)
    graph, records = run_pipeline(graph, PassPipeline(["tflite::legalize"]).build(), ctx, verify="check")
    assert records[-1].counts == {"layer_norm": 12, "instance_norm": 0, "group_norm": 21}
    ops = {n.op for n in graph.nodes}
    assert not ops & {"LayerNormalization", "InstanceNormalization", "Shape", "Gather"}
    feeds = _feeds(graph)
    a = ort_session(ref).run(None, feeds)[0]
    b = ort_session(graph).run(None, feeds)[0]
    np.testing.assert_allclose(b, a, atol=1e-5 * float(np.abs(a).max()))


# ------------------------------------------------------------------------------------------------ host
def test_host_part_is_the_sinusoidal_embedding():
    graph, ctx = _float_graph(None, {})
    run_pipeline(graph, PassPipeline(["tflite::legalize"]).build(), ctx)
    split = split_host(graph)
    ops = [n.op for n in split.nodes]
    assert "Sin" in ops and "Cos" in ops and not {"Gemm", "MatMul", "Conv"} & set(ops)
    assert [t.name for t in split.inputs] == ["timestep"] and len(split.outputs) == 1
    (emb,) = split.outputs
    assert all(c.op == "Gemm" for c in emb.outputs)
    model = host_graph(graph, split)
    onnx.checker.check_model(model)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, str(Path(tmp) / "h.onnx"))
        got = HostEmbedding(Path(tmp) / "h.onnx")({"timestep": np.array([321.0], np.float32)})[emb.name]
    t = 321.0 * np.exp(-np.log(10000) * np.arange(16) / 16)  # diffusers' get_timestep_embedding, dim 32
    want = np.concatenate([np.cos(t), np.sin(t)])  # flip_sin_to_cos=True
    np.testing.assert_allclose(got.reshape(-1), want, atol=1e-4)


# ------------------------------------------------------------------------------------------ translation
def _check_float_translation(model, loras):
    graph, ctx = _float_graph(model, loras)
    graph, _ = run_pipeline(graph, PassPipeline(["tflite::legalize"]).build(), ctx)
    host = split_host(graph)
    lora = [n for s in ctx.lora_slots.values() for n in (s.down_input, s.up_input)]
    tr = translate(graph, FloatPolicy(), lora_inputs=lora, host=host)
    feeds = _feeds(graph)
    want = ort_session(graph).run(None, feeds)[0]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(host_graph(graph, host), str(Path(tmp) / "h.onnx"))
        values = {**feeds, **HostEmbedding(Path(tmp) / "h.onnx")(feeds)}
    it = Interpreter(model_content=tr.data)
    it.allocate_tensors()
    details = {d["name"]: d for d in it.get_input_details()}
    for spec in tr.inputs:
        it.set_tensor(details[spec.name]["index"], np.ascontiguousarray(values[spec.name].transpose(spec.perm)))
    it.invoke()
    got = it.get_tensor(it.get_output_details()[0]["index"]).transpose(np.argsort(tr.outputs[0].perm))
    np.testing.assert_allclose(got, want, atol=1e-4 * float(np.abs(want).max()))
    return tr


def test_float_translation_bundled_model_with_loras():
    tr = _check_float_translation(None, {})
    assert {"CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "GELU", "RSQRT", "MEAN", "SOFTMAX", "LOGISTIC",
            "RESIZE_NEAREST_NEIGHBOR", "CONCATENATION"} <= set(tr.ops)
    assert "SIN" not in tr.ops and "COS" not in tr.ops
    kinds = {s.kind for s in tr.inputs}
    assert kinds == {"model", "lora", "host"}


@pytest.mark.parametrize("fixture", ["tiny_torchscript_onnx", "tiny_dynamo_onnx"])
def test_float_translation_both_exporters(request, tmp_path, fixture):
    path = request.getfixturevalue(fixture)
    _, info = frontend.load(path)
    lora = random_lora(info, modules=MODULES, rank=4, seed=3, scale_std=0.3, name="t")
    lpath = write_kohya(lora, tmp_path / "t.safetensors")
    _check_float_translation(path, {"t": str(lpath)})


def test_missing_kernel_is_one_clear_error():
    x = gs.Variable("x", np.float32, [1, 4])
    y = gs.Variable("y", np.float32, [1, 4])
    graph = gs.Graph(nodes=[gs.Node("HardSigmoid", "hs", {}, [x], [y])], inputs=[x], outputs=[y], opset=17)
    with pytest.raises(QuadcError, match="ONNX op HardSigmoid .*no TFLite 16x8 lowering"):
        translate(graph, FloatPolicy())
