"""The graph layer: external weights stay lazy, save copies them exactly, errors are one line."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from quadc.errors import QuadcError
from quadc.graph import ExternalValues, infer_shapes, load_model, model_sha256, save_model


def _mlp(path, *, external: bool):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="/l1/MatMul"),
             helper.make_node("Relu", ["h"], ["r"], name="/act/Relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="/l2/MatMul")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".weights", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path, (w1, w2)


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_external_weights_stay_lazy_and_round_trip(tmp_path):
    (tmp_path / "src").mkdir()
    src, (w1, _) = _mlp(tmp_path / "src" / "m.onnx", external=True)
    graph = load_model(src)
    consts = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    assert all(isinstance(c._values, ExternalValues) for c in consts.values())
    assert tuple(consts["w1"].shape) == (16, 32)
    assert np.array_equal(consts["w1"].values, w1)  # memory-mapped on demand
    out = save_model(graph, tmp_path / "out" / "m.onnx")
    assert (tmp_path / "out" / "m.onnx.data").exists()
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    np.testing.assert_array_equal(_run(src, x), _run(out, x))
    # The saved proto references only its own data file.
    saved = onnx.load(str(out), load_external_data=False)
    locs = {e.value for i in saved.graph.initializer for e in i.external_data if e.key == "location"}
    assert locs == {"m.onnx.data"}


def test_save_is_deterministic_and_keeps_modified_constants(tmp_path):
    (tmp_path / "src").mkdir()
    src, (w1, _) = _mlp(tmp_path / "src" / "m.onnx", external=True)
    graph = load_model(src)
    w1_const = next(t for t in graph.tensors().values() if t.name == "w1")
    w1_const.values = np.asarray(w1_const.values) * 2.0
    a = save_model(graph, tmp_path / "a" / "m.onnx")
    b = save_model(graph, tmp_path / "b" / "m.onnx")
    assert model_sha256(a) == model_sha256(b)
    assert a.read_bytes() == b.read_bytes()
    reloaded = {t.name: t for t in load_model(a).tensors().values()}
    np.testing.assert_array_equal(reloaded["w1"].values, w1 * 2.0)


def test_small_model_embeds_weights(tmp_path):
    src, _ = _mlp(tmp_path / "m.onnx", external=False)
    out = save_model(load_model(src), tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx.data").exists()
    x = np.ones((2, 16), np.float32)
    np.testing.assert_array_equal(_run(src, x), _run(out, x))


def test_infer_shapes_fills_intermediates(tmp_path):
    src, _ = _mlp(tmp_path / "m.onnx", external=True)
    graph = infer_shapes(load_model(src))
    assert graph.tensors()["h"].shape == [2, 32]
    assert graph.tensors()["h"].dtype == np.float32


@pytest.mark.parametrize(("case", "reason"), [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("text", "not a readable ONNX model"),
    ("truncated", "not a readable ONNX model"),
    ("missing_data", "external data file 'm.onnx.weights' for initializer 'w1' is missing"),
    ("short_data", "external data file 'm.onnx.weights' is truncated"),
])
def test_bad_files_raise_one_line_errors(tmp_path, case, reason):
    src, _ = _mlp(tmp_path / "m.onnx", external=True)
    target = src
    if case == "missing":
        target = tmp_path / "nope.onnx"
    elif case == "directory":
        target = tmp_path
    elif case == "text":
        target = tmp_path / "notes.onnx"
        target.write_text("this is not a model\n" * 10)
    elif case == "truncated":
        target = tmp_path / "cut.onnx"
        data = src.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        (tmp_path / "cut.onnx.weights").write_bytes(b"")
    elif case == "missing_data":
        (tmp_path / "m.onnx.weights").unlink()
    elif case == "short_data":
        path = tmp_path / "m.onnx.weights"
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(QuadcError) as err:
        load_model(target)
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith(f"{target}: ") and reason in message, message
