"""QuantSim is the artifact: fake quantization bit-exact with onnxruntime's Q/DQ, the interpreter equal to
onnxruntime on the float and the QDQ graphs, packing equal to quadc's, gradients on the LoRA factors only.

The QDQ artifact is run on onnxruntime with ``session.qdq_matmulnbits_accuracy_level=1``: by default
onnxruntime's CPU provider turns ``DequantizeLinear(uint8 weight) -> MatMul`` into ``MatMulNBits`` at
accuracy level 4, which quantizes the activation to int8 inside the MatMul (not in the graph);
``test_default_ort_session_adds_int8_matmuls`` shows that gap, so it is the reason and not QuantSim.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from quadc.align.fakequant import fake_quantize  # noqa: E402
from quadc.align.interpreter import OnnxModule  # noqa: E402
from quadc.align.quantsim import QuantSim, pack_layer, slots_from_manifest  # noqa: E402
from quadc.compiler import CompileOptions, bundled_loras, compile_model  # noqa: E402
from quadc.graph import load_model  # noqa: E402
from quadc.lora import fit_lora, read_lora  # noqa: E402
from quadc.lora.pack import pack_task  # noqa: E402
from quadc.lora.slots import LoRASlot  # noqa: E402
from quadc.quant.affine import sqnr_db  # noqa: E402
from quadc.quant.feeds import random_feeds  # noqa: E402
from quadc.runtime.engine import Engine  # noqa: E402
from quadc.testing_lora import random_lora  # noqa: E402

torch.set_num_threads(1)


def _ort_qdq(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None = None) -> np.ndarray:
    """QuantizeLinear -> DequantizeLinear run by onnxruntime."""
    h = onnx.helper
    attrs = {"axis": axis} if axis is not None else {}
    graph = h.make_graph(
        [h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
         h.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)], "qdq",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(x.shape))],
        [onnx.numpy_helper.from_array(scale.astype(np.float32), "s"), onnx.numpy_helper.from_array(zp, "z")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("qtype,lo,hi", [(np.uint16, -0.7, 2.3), (np.uint8, -3.1, 0.4)])
def test_fake_quantize_is_onnxruntime_qdq_with_clipped_ste(qtype, lo, hi) -> None:
    rng = np.random.default_rng(1)
    info = np.iinfo(qtype)
    scale = np.float32((hi - lo) / (info.max - info.min))
    zp = np.array(round(info.min - lo / float(scale)), qtype)
    k = rng.integers(-200, 200, 4000)
    ties = ((k + 0.5) * scale).astype(np.float32)  # exact halves of the grid: round half to even
    x = np.concatenate([rng.uniform(lo * 1.3, hi * 1.3, 200_000).astype(np.float32), ties])
    want = _ort_qdq(x, np.asarray(scale), zp)
    xt = torch.from_numpy(x).requires_grad_(True)
    got = fake_quantize(xt, torch.tensor(scale), torch.tensor(float(zp)), int(info.min), int(info.max))
    assert np.array_equal(got.detach().numpy(), want)
    # torch's own fake quantizer multiplies by 1/scale and so is not the artifact
    theirs = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), float(scale), int(zp), int(info.min),
                                                   int(info.max)).numpy()
    assert not np.array_equal(theirs, want)
    got.sum().backward()
    v = np.rint(x / scale) + float(zp)
    inside = (v >= info.min) & (v <= info.max)
    assert 0 < inside.mean() < 1
    assert np.array_equal(xt.grad.numpy(), inside.astype(np.float32))


def test_fake_quantize_per_channel_int8() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 5, 3)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)[:, None, None]
    scale = (np.abs(x).reshape(6, -1).max(axis=1) / 100).astype(np.float32)
    zp = np.zeros(6, np.int8)
    want = _ort_qdq(x, scale, zp, axis=0)
    from quadc.align.fakequant import FakeQuant

    fq = FakeQuant(torch.from_numpy(scale), torch.zeros(6), -128, 127, axis=0)
    assert np.array_equal(fq(torch.from_numpy(x)).numpy(), want)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The bundled tiny U-Net and its LoRAs compiled to onnx-qdq and to the float onnx target."""
    root = tmp_path_factory.mktemp("quantsim")
    loras = {k: str(v) for k, v in bundled_loras().items()}
    compile_model(None, root / "qdq", CompileOptions(target="onnx-qdq", loras=loras))
    compile_model(None, root / "float", CompileOptions(target="onnx", loras=loras))
    return root


def _exact_engine(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return Engine(path, session_options=so)


def _task_lora(engine: Engine, task: str):
    from quadc import frontend
    from quadc.compiler import bundled_model

    _, info = frontend.load(bundled_model())
    return fit_lora(read_lora(bundled_loras()[task], name=task, info=info), info)


def test_interpreter_equals_onnxruntime_on_the_float_graph(artifacts) -> None:
    engine = Engine(artifacts / "float")
    graph = load_model(engine.graph_path)
    net = OnnxModule(graph)
    for i, feed in enumerate(random_feeds(graph, 2, seed=31)):
        task = None if i == 0 else "background_removal"
        want = engine.run(feed, task=task)["out_sample"]
        inputs = {k: torch.from_numpy(v) for k, v in {**feed, **engine.lora_inputs(task)}.items()}
        with torch.no_grad():
            got = net(inputs)["out_sample"].numpy()
        assert sqnr_db(want, got) > 100


def test_quantsim_equals_the_qdq_artifact(artifacts) -> None:
    engine = _exact_engine(artifacts / "qdq")
    floats = Engine(artifacts / "float")
    graph = load_model(engine.graph_path)
    slots = slots_from_manifest(engine.manifest)
    net = OnnxModule(graph, float_dq_inputs={n for s in slots.values() for n in (s.down_input, s.up_input)})
    feeds = random_feeds(graph, 2, seed=77)  # not the calibration feeds (seed 0)
    for task in engine.tasks:
        sim = QuantSim(graph, slots, _task_lora(engine, task), net=net)
        packed = {k: v.detach().numpy() for k, v in sim.packed().items()}
        assert all(np.array_equal(packed[k], v) for k, v in pack_task(sim.factors.lora, slots).items())
        for feed in feeds:
            want = engine.run(feed, task=task)["out_sample"]
            with torch.no_grad():
                got = sim({k: torch.from_numpy(v) for k, v in feed.items()})["out_sample"].numpy()
            assert sqnr_db(want, got) >= 40
            # and it is the quantized graph: far closer to the artifact than the float graph is
            assert sqnr_db(want, got) > sqnr_db(floats.run(feed, task=task)["out_sample"], got) + 20


def test_default_ort_session_adds_int8_matmuls(artifacts) -> None:
    """The default CPU session differs from the graph's own arithmetic (MatMulNBits, int8 activations)."""
    exact, default = _exact_engine(artifacts / "qdq"), Engine(artifacts / "qdq")
    feed = random_feeds(load_model(exact.graph_path), 1, seed=5)[0]
    task = "background_removal"
    a, b = exact.run(feed, task=task)["out_sample"], default.run(feed, task=task)["out_sample"]
    assert sqnr_db(a, b) < 60


def test_gradients_reach_the_lora_factors_and_nothing_else(artifacts) -> None:
    engine = Engine(artifacts / "qdq")
    graph = load_model(engine.graph_path)
    sim = QuantSim(graph, slots_from_manifest(engine.manifest), _task_lora(engine, "inpaint"))
    params = dict(sim.named_parameters())
    assert params and all(name.startswith("factors.") for name in params)
    assert len(params) == 2 * len(sim.factors.modules_) == 2 * len(sim.factors.lora.layers)
    assert list(sim.buffers()) == [] and list(sim.net.parameters()) == []
    feed = random_feeds(graph, 1, seed=3)[0]
    out = sim({k: torch.from_numpy(v) for k, v in feed.items()})["out_sample"]
    out.pow(2).sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params.values())
    assert all(not t.requires_grad for t in sim.net._consts.values())


def test_pack_layer_equals_pack_task_in_every_layout() -> None:
    shapes = {"a.to_q": ("linear", 12, 10), "a.conv1": ("conv", 6, 8, (3, 3)), "a.proj_in": ("conv", 6, 7, (1, 1))}
    lora = random_lora(shapes, rank=3, alpha=5.0, seed=4, name="t")
    lin = LoRASlot("a.to_q", "linear", 5, "a.to_q.lora_down", "a.to_q.lora_up", (12, 5), (5, 10), out_scale=0.125)
    slots = {
        "a.to_q": lin,
        "a.conv1": LoRASlot("a.conv1", "conv", 4, "a.conv1.lora_down", "a.conv1.lora_up", (4, 6, 3, 3), (8, 4, 1, 1)),
        "a.proj_in": LoRASlot("a.proj_in", "conv", 3, "a.proj_in.lora_down", "a.proj_in.lora_up", (3, 6, 1, 1),
                              (7, 3, 1, 1)),
    }
    for table in (slots, {**slots, "a.to_q": lin.in_channels_layout()}):
        want = pack_task(lora, table)
        for module, layer in lora.layers.items():
            slot = table[module]
            d, u = pack_layer(torch.from_numpy(layer.down), torch.from_numpy(layer.up),
                              np.float32(layer.scale * slot.out_scale), slot)
            assert np.array_equal(d.numpy(), want[slot.down_input]) and np.array_equal(u.numpy(), want[slot.up_input])


def test_quantsim_follows_the_npu_pipeline() -> None:
    """linear-to-conv (channels layout), mha-split, conv-act-fusion (local functions, unquantized Conv
    outputs), scale-fold: the student is built from whatever graph the pipeline makes."""
    from quadc.align.workspace import build_workspace, session
    from quadc.lora.pack import quantize_task

    ws = build_workspace(None, {}, passes="float,npu,qdq")
    assert {s.layout for s in ws.slots.values()} >= {"channels", "conv"}
    assert any(f.name == "SiLU" for f in ws.qdq_graph.functions)
    sess = session(ws.qdq_graph)
    names = {i.name for i in sess.get_inputs()}
    feed = random_feeds(ws.qdq_graph, 1, seed=41)[0]
    task, lora = next(iter(ws.loras.items()))
    packed = quantize_task(pack_task(lora, ws.slots), ws.plan)
    want = sess.run(None, {k: v for k, v in {**feed, **packed}.items() if k in names})[0]
    with torch.no_grad():
        got = QuantSim(ws.qdq_graph, ws.slots, lora)({k: torch.from_numpy(v) for k, v in feed.items()})
    assert sqnr_db(want, next(iter(got.values())).numpy()) >= 40
