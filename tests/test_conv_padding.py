"""Convs the frontend and lora-inputs must read as ONNX defines them: auto_pad, dilations, groups.

The oracle for padding is ``auto_pad`` as ONNX's reference implementation (``onnx.reference``) runs it
(onnxruntime refuses dilated SAME convs); the oracle for a LoRA branch is the base conv with the merged
weight ``W + up @ down`` (computed here in numpy), run on onnxruntime.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from golden import GOLDEN_DIR, parse_text
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from quadc.context import CompileContext
from quadc.errors import QuadcError
from quadc.frontend.recognize import find_layers, recognize_unet
from quadc.graph import to_model_bytes
from quadc.passes import get_pass


def _run(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def _conv_model(attrs: dict, weight: np.ndarray, in_shape: tuple[int, ...]) -> onnx.ModelProto:
    """x -> Relu -> Conv(attrs) -> y; the conv input is a Relu output, so its size is not in the graph."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w"], ["y"], name="/blk/conv/Conv", **attrs)]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CASES = list(itertools.product(("SAME_UPPER", "SAME_LOWER", "VALID"), ((3, 3), (2, 3)), ((1, 1), (2, 2), (2, 1)),
                               ((1, 1), (2, 2))))


@pytest.mark.parametrize(("auto_pad", "kernel", "strides", "dilations"), CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_auto_pad_padding_matches_the_onnx_reference(auto_pad, kernel, strides, dilations):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3, 2, *kernel)).astype(np.float32)
    attrs = {"auto_pad": auto_pad, "kernel_shape": list(kernel), "strides": list(strides),
             "dilations": list(dilations)}
    model = _conv_model(attrs, weight, (1, 2, 7, 6))
    layers = find_layers(gs.import_onnx(model))
    assert len(layers) == 1
    explicit = {"kernel_shape": list(kernel), "strides": list(strides), "dilations": list(dilations),
                "pads": list(layers[0].padding)}
    x = {"x": rng.standard_normal((1, 2, 7, 6)).astype(np.float32)}
    want = ReferenceEvaluator(model).run(None, x)[0]
    got = _run(_conv_model(explicit, weight, (1, 2, 7, 6)), x)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_golden_auto_pad_case_has_the_frontend_padding():
    """The attach point in golden_graphs/lora-inputs/conv_auto_pad.ctx.json is what the frontend reads."""
    case = GOLDEN_DIR / "lora-inputs" / "conv_auto_pad"
    (layer,) = find_layers(parse_text(case.with_name(case.name + ".in.onnxtxt")))
    point = json.loads(case.with_name(case.name + ".ctx.json").read_text())["points"]["down.conv"]
    assert list(layer.padding) == point["padding"]
    assert list(layer.stride) == point["stride"]


# -------------------------------------------------------------------------------------- lora-inputs
def _unet_like(convs: list[tuple[str, np.ndarray, dict]]) -> onnx.ModelProto:
    """A graph with the U-Net inputs whose sample runs through ``convs`` ((module, weight, attrs) each)."""
    nodes, inits, x = [], [], "sample"
    for i, (module, weight, attrs) in enumerate(convs):
        scope = "/" + module.replace(".", "/", 1)
        out = f"h{i}"
        nodes.append(helper.make_node("Conv", [x, f"{module}.weight"], [out], name=f"{scope}/Conv", **attrs))
        inits.append(numpy_helper.from_array(weight, f"{module}.weight"))
        x = out
    nodes.append(helper.make_node("Identity", [x], ["out_sample"], name="out"))
    inputs = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, (1, 4, 8, 8)),
              helper.make_tensor_value_info("timestep", TensorProto.FLOAT, (1,)),
              helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, (1, 2, 4))]
    graph = helper.make_graph(nodes, "unet_like", inputs, [helper.make_tensor_value_info("out_sample",
                                                                                          TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _with_lora_inputs(model: onnx.ModelProto, rank: int) -> tuple[bytes, CompileContext]:
    graph = gs.import_onnx(model)
    ctx = CompileContext(model_info=recognize_unet(graph))
    get_pass("lora-inputs", {"targets": "down_blocks.*", "rank": rank}).run(graph, ctx)
    return to_model_bytes(graph), ctx


def test_lora_on_dilated_and_auto_pad_convs_equals_the_merged_weight():
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((6, 4, 3, 3)).astype(np.float32) * 0.2
    convs = [("down_blocks.0.dilated", w1, {"dilations": [2, 2], "pads": [2, 2, 2, 2], "kernel_shape": [3, 3]}),
             ("down_blocks.0.same", w2, {"auto_pad": "SAME_LOWER", "strides": [2, 2], "kernel_shape": [3, 3]})]
    model = _unet_like(convs)
    rank = 2
    lora_bytes, ctx = _with_lora_inputs(model, rank)
    assert set(ctx.lora_slots) == {"down_blocks.0.dilated", "down_blocks.0.same"}
    feeds = {"sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
             "timestep": np.array([10.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 2, 4)).astype(np.float32)}
    merged = onnx.ModelProto()
    merged.CopyFrom(model)
    weights = {t.name: t for t in merged.graph.initializer}
    for module, slot in ctx.lora_slots.items():
        down = rng.standard_normal(slot.down_shape).astype(np.float32) * 0.3
        up = rng.standard_normal(slot.up_shape).astype(np.float32) * 0.3
        feeds[slot.down_input], feeds[slot.up_input] = down, up
        base = numpy_helper.to_array(weights[f"{module}.weight"])
        delta = (up[:, :, 0, 0] @ down.reshape(rank, -1)).reshape(base.shape)
        weights[f"{module}.weight"].CopyFrom(numpy_helper.from_array(base + delta, f"{module}.weight"))
    want = _run(merged, feeds)[0]
    got = _run(lora_bytes, feeds)[0]
    assert got.shape == want.shape == (1, 6, 4, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lora_on_a_grouped_conv_is_refused():
    w = np.ones((4, 2, 3, 3), np.float32)
    model = _unet_like([("down_blocks.0.grouped", w, {"group": 2, "pads": [1, 1, 1, 1], "kernel_shape": [3, 3]})])
    with pytest.raises(QuadcError, match="grouped conv") as err:
        _with_lora_inputs(model, 2)
    assert "\n" not in str(err.value)
