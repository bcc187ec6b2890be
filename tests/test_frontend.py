"""quadc.frontend: attach points and attention blocks of both exporters' graphs, validation errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from quadc.errors import QuadcError
from quadc.frontend import AttachPoint, ModelInfo, format_inspect, load, recognize_unet
from quadc.graph import load_model

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
MUST_HAVE = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
             "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


@pytest.fixture(scope="module")
def torch_paths() -> dict[str, tuple[str, tuple[int, ...]]]:
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from quadc.export import module_paths

    return module_paths("tiny")


@pytest.fixture(params=["torchscript", "dynamo"])
def info(request, tiny_torchscript_onnx, tiny_dynamo_onnx) -> ModelInfo:
    path = {"torchscript": tiny_torchscript_onnx, "dynamo": tiny_dynamo_onnx}[request.param]
    _, result = load(path)
    assert result.exporter == request.param
    return result


def _check_against_torch(info: ModelInfo, torch_paths) -> None:
    assert set(info.points) == set(torch_paths)
    for module, (kind, shape) in torch_paths.items():
        point = info.points[module]
        assert point.module == module and point.kind == kind, module
        assert (point.d_out, point.d_in) == shape[:2], module
        assert point.kernel == (shape[2:] if kind == "conv" else (1, 1)), module


def test_points_match_torch_modules(info, torch_paths):
    _check_against_torch(info, torch_paths)
    assert info.unnamed_points == 0
    blocks = [k.split(".transformer_blocks")[0] for k in torch_paths if ".attn1.to_q" in k]
    assert len(blocks) == 4
    for block in blocks:
        for proj in MUST_HAVE:
            assert f"{block}.transformer_blocks.0.{proj}" in info.points
        assert f"{block}.proj_in" in info.points and f"{block}.proj_out" in info.points


def test_both_exporters_agree(tiny_torchscript_onnx, tiny_dynamo_onnx):
    _, ts = load(tiny_torchscript_onnx)
    _, dy = load(tiny_dynamo_onnx)
    assert list(ts.points) == list(dy.points)  # same keys, same graph order
    for key, a in ts.points.items():
        b = dy.points[key]
        assert (a.kind, a.d_in, a.d_out, a.kernel, a.stride, a.padding, a.weight_layout, a.bias is None) == \
               (b.kind, b.d_in, b.d_out, b.kernel, b.stride, b.padding, b.weight_layout, b.bias is None), key
    assert [(x.module, x.kind, x.heads, x.projections) for x in ts.attention] == \
           [(x.module, x.kind, x.heads, x.projections) for x in dy.attention]


def test_point_details(info, tiny_torchscript_onnx, tiny_dynamo_onnx):
    graph_path = tiny_torchscript_onnx if info.exporter == "torchscript" else tiny_dynamo_onnx
    graph = load_model(graph_path)
    tensors = graph.tensors()
    nodes = {n.name: n for n in graph.nodes}
    for point in info.points.values():
        node = nodes[point.node]
        weight = tensors[point.weight]
        assert node.op in ({"Conv"} if point.kind == "conv" else {"MatMul", "Gemm"}), (point, node.op)
        expected = {"in_out": (point.d_in, point.d_out), "out_in": (point.d_out, point.d_in),
                    "conv": (point.d_out, point.d_in, *point.kernel)}[point.weight_layout]
        assert tuple(weight.shape) == expected, point
        if point.bias is not None:
            assert tuple(tensors[point.bias].shape) == (point.d_out,)
    q = info.points[f"{ATTN}.attn1.to_q"]
    assert (q.weight_layout, q.bias) == ("in_out", None)  # SD1.5 q/k/v have no bias
    out = info.points[f"{ATTN}.attn1.to_out.0"]
    assert out.bias is not None and out.bias.endswith("to_out.0.bias")
    ff = info.points[f"{ATTN}.ff.net.0.proj"]
    assert (ff.d_in, ff.d_out) == (32, 256) and ff.bias is not None
    temb = info.points["time_embedding.linear_1"]
    assert (temb.weight_layout, temb.d_in, temb.d_out) == ("out_in", 32, 128)
    assert temb.weight == "time_embedding.linear_1.weight" and temb.bias == "time_embedding.linear_1.bias"
    down = info.points["down_blocks.0.downsamplers.0.conv"]
    assert (down.stride, down.padding, down.kernel) == ((2, 2), (1, 1, 1, 1), (3, 3))
    conv_in = info.points["conv_in"]
    assert (conv_in.d_in, conv_in.d_out, conv_in.bias) == (4, 32, "conv_in.bias")
    if info.exporter == "dynamo":
        assert q.weight == f"{ATTN}.attn1.to_q.weight"
    else:
        assert q.weight.startswith("onnx::MatMul") and q.node.endswith("/attn1/to_q/MatMul")


def test_attention_blocks(info):
    assert len(info.attention) == 8
    assert [b.kind for b in info.attention] == ["self", "cross"] * 4
    for block in info.attention:
        assert block.heads == 4  # tiny: attention_head_dim=4 (diffusers' name for the head count)
        assert block.projections == tuple(f"{block.module}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0"))
        assert block.module.endswith("attn1" if block.kind == "self" else "attn2")
        assert block.nodes  # the attention core between the projections
    first = info.attention[0]
    assert first.module == f"{ATTN}.attn1"


def test_io_and_statistics(info, tiny_torch_reference):
    assert info.roles == {"sample": "sample", "timestep": "timestep", "encoder_hidden_states": "encoder_hidden_states"}
    assert info.inputs["sample"] == ("float32", (1, 4, 8, 8))
    assert info.inputs["encoder_hidden_states"] == ("float32", (1, 8, 32))
    assert info.outputs == {"out_sample": ("float32", (1, 4, 8, 8))}
    assert info.opset == (17 if info.exporter == "torchscript" else 18)
    from quadc.export import build_unet

    n_params = sum(p.numel() for p in build_unet("tiny").parameters())
    assert n_params <= info.parameters < n_params + 2000  # plus small shape/scale constants
    assert info.op_histogram["Conv"] == 33 and sum(1 for p in info.points.values() if p.kind == "conv") == 33
    assert list(info.op_histogram.values()) == sorted(info.op_histogram.values(), reverse=True)


def test_format_inspect(info):
    text = format_inspect(info)
    assert f"exporter: {info.exporter}" in text
    assert f"parameters: {info.parameters:,}" in text
    assert "attachment points: 83 (33 conv, 50 linear)" in text
    assert "  down_blocks.0:\n" in text and f"{ATTN}.ff.net.0.proj" in text
    assert "attention blocks: 8" in text and "4 heads" in text
    assert "MatMul" in text and "encoder_hidden_states" in text


def test_bundled_model(bundled_unet, bundled_unet_export, torch_paths):
    # The bundled file must be a fresh export of the committed trained weights (quadc/data/tiny_sd/unet).
    assert bundled_unet.read_bytes() == bundled_unet_export.read_bytes(), \
        "quadc/data/tiny_unet.onnx is stale: run scripts/make_bundled_model.py"
    assert bundled_unet.stat().st_size < 4_000_000
    _, info = load(bundled_unet)
    _check_against_torch(info, torch_paths)


# ---------------------------------------------------------------------------------------------------
# Graphs exported other ways (rewritten from the fixtures, so no extra export is needed)
# ---------------------------------------------------------------------------------------------------

def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_anonymous_dynamo_weights_named_from_metadata(tiny_dynamo_onnx, tmp_path, torch_paths):
    """torch's default dynamo export: folded Linear weights are ``val_<n>``; name_scopes has the path."""
    model = onnx.load(str(tiny_dynamo_onnx))
    renames = {}
    for i, init in enumerate(model.graph.initializer):
        if init.name.endswith(".weight") and len(init.dims) == 2:
            renames[init.name] = f"val_{90000 + i}"
            init.name = renames[init.name]
    for node in model.graph.node:
        node.input[:] = [renames.get(x, x) for x in node.input]
    _, info = load(_save(model, tmp_path / "anon.onnx"))
    _check_against_torch(info, torch_paths)
    assert info.points[f"{ATTN}.attn1.to_q"].weight.startswith("val_")

    for node in model.graph.node:  # without metadata the layers keep their node names
        del node.metadata_props[:]
    _, bare = load(_save(model, tmp_path / "bare.onnx"))
    assert bare.unnamed_points == len(renames) and len(bare.points) == len(torch_paths)
    assert "no recoverable module path" in format_inspect(bare)


def test_transposed_weight_and_wrapper_prefix(tiny_torchscript_onnx, tmp_path, torch_paths):
    """``MatMul(x, Transpose(W))`` (unoptimized dynamo), Identity-shared weights, ``unet.`` wrapper prefix."""
    model = onnx.load(str(tiny_torchscript_onnx))
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            w = inits[node.input[1]]
            arr = numpy_helper.to_array(w)
            w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr.T), w.name))
            tr = helper.make_node("Transpose", [w.name], [w.name + "_t"], perm=[1, 0], name=node.name + "_T")
            new_nodes.append(tr)
            node.input[1] = tr.output[0]
        if node.op_type == "Conv":
            ident = helper.make_node("Identity", [node.input[1]], [node.input[1] + "_id"], name=node.name + "_I")
            new_nodes.append(ident)
            node.input[1] = ident.output[0]
        if node.name.startswith("/"):
            node.name = "/unet" + node.name
        new_nodes.append(node)
    renames = {i.name: "unet." + i.name for i in model.graph.initializer if not i.name.startswith("onnx::")}
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in new_nodes:
        node.input[:] = [renames.get(x, x) for x in node.input]
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    path = _save(model, tmp_path / "variant.onnx")
    graph, info = load(path)
    _check_against_torch(info, torch_paths)
    q = info.points[f"{ATTN}.attn1.to_q"]
    assert q.weight_layout == "out_in" and q.node.endswith("/to_q/MatMul")
    assert info.points["conv_in"].weight == "unet.conv_in.weight"
    assert recognize_unet(graph).points.keys() == info.points.keys()


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------

def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    with pytest.raises(QuadcError) as exc:
        load(tmp_path / "nope.onnx")
    assert "no such file" in _one_line(exc)


def test_directory(tmp_path):
    with pytest.raises(QuadcError, match="directory"):
        load(tmp_path)


def test_text_file_renamed(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("These are my notes, not a model.\nSecond line.\n")
    with pytest.raises(QuadcError) as exc:
        load(path)
    message = _one_line(exc)
    assert str(path) in message and "ONNX" in message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(QuadcError, match="empty"):
        load(path)


def test_truncated_file(tiny_torchscript_onnx, tmp_path):
    data = tiny_torchscript_onnx.read_bytes()
    for fraction in (0.5, 0.99):
        path = tmp_path / f"cut{fraction}.onnx"
        path.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(QuadcError) as exc:
            load(path)
        assert "truncated" in _one_line(exc)


def test_graph_without_unet_inputs(tmp_path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 16, 16])
    w = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")
    model = helper.make_model(helper.make_graph([node], "classifier", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = _save(model, tmp_path / "classifier.onnx")
    with pytest.raises(QuadcError) as exc:
        load(path)
    message = _one_line(exc)
    assert "not a U-Net" in message and "timestep" in message and "encoder_hidden_states" in message
    assert "x float32[1, 3, 16, 16]" in message  # says what it found


def test_unet_inputs_without_layers(tmp_path):
    inputs = [helper.make_tensor_value_info("sample", onnx.TensorProto.FLOAT, [1, 4, 8, 8]),
              helper.make_tensor_value_info("timestep", onnx.TensorProto.FLOAT, [1]),
              helper.make_tensor_value_info("encoder_hidden_states", onnx.TensorProto.FLOAT, [1, 8, 32])]
    out = helper.make_tensor_value_info("out_sample", onnx.TensorProto.FLOAT, [1, 4, 8, 8])
    node = helper.make_node("Identity", ["sample"], ["out_sample"], name="id")
    model = helper.make_model(helper.make_graph([node], "g", inputs, [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(QuadcError, match="no Linear or Conv layer"):
        load(_save(model, tmp_path / "empty_unet.onnx"))


def test_attach_point_is_frozen():
    point = AttachPoint(module="m", kind="linear", node="n", weight="w", d_in=1, d_out=2)
    with pytest.raises(AttributeError):
        point.d_in = 3  # type: ignore[misc]


def test_analyze_does_not_decode_external_weights(tiny_dynamo_onnx, tmp_path, torch_paths):
    from quadc.graph import save_model

    path = save_model(load_model(tiny_dynamo_onnx), tmp_path / "ext.onnx", external=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    graph, info = load(path)
    _check_against_torch(info, torch_paths)
    assert graph._quadc_registry == {}  # no ExternalValues.load() happened


def test_graph_fused_by_onnxruntime_optimizer_is_refused(bundled_unet, tmp_path, capsys):
    """A U-Net that onnxruntime's transformer optimizer fused (what Olive ships): its contrib ops hide the
    layers and NhwcConv has no CPU kernel; the one-line refusal comes at load, for every target."""
    from onnxruntime.transformers.optimizer import optimize_model

    from quadc.cli import main

    fused = tmp_path / "fused.onnx"
    optimize_model(str(bundled_unet), model_type="unet", num_heads=0, hidden_size=0, opt_level=0,
                   use_gpu=False).save_model_to_file(str(fused))
    with pytest.raises(QuadcError, match=r"contrib ops \(NhwcConv x\d+.*before those fusions"):
        load(fused)
    capsys.readouterr()  # the optimizer's progress bar
    assert main(["compile", str(fused), "--target", "onnx-qdq", "-q", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "contrib ops" in err and not (tmp_path / "out").exists()
