"""The graph layer: external weights stay lazy, save copies them exactly, errors are one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from quadc.errors import QuadcError
from quadc.graph import ExternalValues, infer_shapes, load_model, model_sha256, ort_session, save_model


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


# ------------------------------------------------------------------------------------------ ORT sessions
def _wide(path):
    """x[2, 512] @ w1[512, 1024] (2 MiB) -> Relu -> @ w2[1024, 256] (1 MiB) + b[256], weights in one file."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((512, 1024)).astype(np.float32)
    w2 = rng.standard_normal((1024, 256)).astype(np.float32)
    b = rng.standard_normal(256).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 256])],
                              [onnx.numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (b, "b"))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    return w1, w2, b


def test_session_over_file_weights_and_changed_weights(tmp_path):
    """File-backed, large in-memory and small in-memory weights all reach ORT with their current values."""
    w1, w2, b = _wide(tmp_path / "m.onnx")
    graph = load_model(tmp_path / "m.onnx")
    consts = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    consts["w2"].values = np.asarray(consts["w2"].values) * -0.5  # 1 MiB, changed in memory
    consts["b"].values = np.asarray(consts["b"].values) + 1.0  # small, changed in memory
    x = np.random.default_rng(4).standard_normal((2, 512)).astype(np.float32)
    want = np.maximum(x.astype(np.float64) @ w1, 0) @ (w2 * -0.5) + (b + 1.0)
    got = ort_session(graph).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert np.array_equal(np.asarray(consts["w1"].values), w1)  # the graph itself is unchanged


def test_session_writes_no_copy_of_the_weights(tmp_path):
    """Measured in a fresh process with /proc/self/io: building the session writes no weight bytes, even with
    the embed limit at 0 (every model counts as large)."""
    if not Path("/proc/self/io").exists():
        pytest.skip("needs /proc/self/io")
    _wide(tmp_path / "m.onnx")
    code = (
        "import sys, numpy as np, quadc.graph as g\n"
        "g.EMBED_MAX_BYTES = 0\n"
        "graph = g.load_model(sys.argv[1])\n"
        "def written():\n"
        "    return int(dict(l.split(': ') for l in open('/proc/self/io').read().splitlines())['write_bytes'])\n"
        "before = written()\n"
        "y = g.ort_session(graph).run(None, {'x': np.ones((2, 512), np.float32)})[0]\n"
        "print(written() - before, y.shape)\n"
    )
    # No .pyc writes: a fresh clone compiles the modules ort_session imports lazily, which /proc/self/io counts.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.onnx")], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    assert out[1:] == ["(2,", "256)"]
    assert int(out[0]) < 512 * 1024, f"{out[0]} bytes written for 3 MiB of weights"


def test_save_streams_lazily_computed_weights(tmp_path):
    """A weight a pass computes lazily is computed once, written straight to the data file (or inlined for
    small models), and reads back exactly; an opset conversion never computes it."""
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from quadc.graph import computed_weights_as_dims, export_proto, load_model, save_model

    class Counting(LazyValues):
        def __init__(self, arr):
            self.arr, self.shape, self.dtype, self.nbytes, self.loads = arr, arr.shape, arr.dtype, arr.nbytes, 0

        def load(self):
            self.loads += 1
            return self.arr

        @property
        def tensor(self):
            return onnx.numpy_helper.from_array(self.load())

    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 7
    lazy = Counting(w)
    x, y = gs.Variable("x", np.float32, [1, 64]), gs.Variable("y", np.float32, [1, 32])
    graph = gs.Graph(nodes=[gs.Node("MatMul", inputs=[x, gs.Constant("w", lazy)], outputs=[y])], inputs=[x],
                     outputs=[y], opset=17)
    with computed_weights_as_dims(graph) as computed:
        export_proto(graph)
    assert set(computed) == {"w"} and lazy.loads == 0
    for external in (True, False):
        path = save_model(graph, tmp_path / f"m{external}.onnx", external=external)
        back = load_model(path)
        got = next(t for t in back.tensors().values() if t.name == "w")
        np.testing.assert_array_equal(np.asarray(got.values), w)
    assert lazy.loads == 2  # once per save


def test_session_takes_lazily_computed_weights_and_keeps_them_lazy():
    """A large weight a pass computes lazily (linear-to-conv's transposes) reaches ORT with its values, and the
    graph keeps the lazy values (nothing computed stays cached in it)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    class Computed(LazyValues):
        def __init__(self, arr):
            self.arr, self.shape, self.dtype, self.nbytes = arr, arr.shape, arr.dtype, arr.nbytes

        def load(self):
            return self.arr.T.copy()

        @property
        def tensor(self):
            return onnx.numpy_helper.from_array(self.load())

    stored = np.random.default_rng(5).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB, stored transposed
    lazy = Computed(stored)
    lazy.shape = (1024, 512)
    x, y = gs.Variable("x", np.float32, [2, 1024]), gs.Variable("y", np.float32, [2, 512])
    const = gs.Constant("w", lazy)
    graph = gs.Graph(nodes=[gs.Node("MatMul", inputs=[x, const], outputs=[y])], inputs=[x], outputs=[y], opset=17)
    feed = np.random.default_rng(6).standard_normal((2, 1024)).astype(np.float32)
    got = ort_session(graph).run(None, {"x": feed})[0]
    np.testing.assert_allclose(got, feed.astype(np.float64) @ stored.T.astype(np.float64), rtol=1e-4, atol=1e-3)
    assert const._values is lazy
