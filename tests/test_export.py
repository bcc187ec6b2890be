"""quadc.export: static-shape ONNX from both torch exporters, numerics, determinism, opsets, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from quadc.errors import QuadcError
from quadc.export import (
    DEFAULT_OPSET,
    TEXT_TOKENS,
    build_unet,
    example_inputs,
    export_unet,
    get_config,
    module_paths,
    unet_export,
)

pytest.importorskip("torch")
pytest.importorskip("diffusers")

EXPORTERS = ("torchscript", "dynamo")


def _run(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(["out_sample"], inputs)[0]


def _opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.fixture(params=EXPORTERS)
def exported(request, tiny_torchscript_onnx, tiny_dynamo_onnx) -> tuple[str, Path]:
    return request.param, {"torchscript": tiny_torchscript_onnx, "dynamo": tiny_dynamo_onnx}[request.param]


def test_module_paths_cover_every_sd15_layer_type():
    paths = module_paths("tiny")
    assert paths["conv_in"] == ("conv", (32, 4, 3, 3))
    assert paths["time_embedding.linear_1"] == ("linear", (128, 32))
    attn = "down_blocks.0.attentions.0.transformer_blocks.0"
    for proj in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"):
        assert paths[f"{attn}.{proj}"][0] == "linear"
    assert paths["down_blocks.0.attentions.0.proj_in"][0] == "conv"  # SD1.5: use_linear_projection=False
    assert paths["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"] == ("linear", (64, 32))
    assert any(".downsamplers.0.conv" in p for p in paths) and any(".upsamplers.0.conv" in p for p in paths)
    assert any(p.endswith("conv_shortcut") for p in paths)


def test_static_signature(exported):
    _, path = exported
    model = onnx.load(str(path))
    cfg = get_config("tiny")

    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]

    inputs = {vi.name: (vi.type.tensor_type.elem_type, dims(vi)) for vi in model.graph.input}
    f32 = onnx.TensorProto.FLOAT
    assert inputs == {
        "sample": (f32, [1, 4, cfg["sample_size"], cfg["sample_size"]]),
        "timestep": (f32, [1]),
        "encoder_hidden_states": (f32, [1, TEXT_TOKENS["tiny"], cfg["cross_attention_dim"]]),
    }
    (out,) = model.graph.output
    assert out.name == "out_sample" and dims(out) == [1, 4, 8, 8]
    onnx.checker.check_model(model)


def test_matches_torch(exported, tiny_torch_reference):
    _, path = exported
    inputs, ref = tiny_torch_reference
    out = _run(path, inputs)
    assert ref.std() > 0.05, "the random model's output should not be degenerate"
    assert np.abs(out - ref).max() < 1e-4


def test_random_weights_have_no_constant_tensors():
    model = build_unet("tiny", "random", seed=0)
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        assert flat.numel() == 1 or not bool((flat == flat[0]).all()), name


def test_deterministic(exported, tmp_path):
    exporter, path = exported
    again = export_unet("tiny", exporter=exporter, out=tmp_path / "again.onnx")
    assert again.read_bytes() == path.read_bytes()
    if exporter == "torchscript":  # the seed matters (one exporter is enough to show it)
        other_seed = export_unet("tiny", exporter=exporter, out=tmp_path / "seed1.onnx", seed=1)
        assert other_seed.read_bytes() != path.read_bytes()


def test_dynamo_initializers_keep_parameter_names(tiny_dynamo_onnx):
    model = onnx.load(str(tiny_dynamo_onnx))
    names = {init.name for init in model.graph.initializer}
    for module in module_paths("tiny"):
        assert f"{module}.weight" in names, module
    for node in model.graph.node:
        for prop in node.metadata_props:
            assert prop.key != "pkg.torch.onnx.stack_trace"


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_opset_21(exporter, tmp_path, tiny_torch_reference):
    path = export_unet("tiny", exporter=exporter, out=tmp_path / "unet.onnx", opset=21)
    assert _opset(path) == 21
    inputs, ref = tiny_torch_reference
    assert np.abs(_run(path, inputs) - ref).max() < 1e-4


def test_default_opsets(tiny_torchscript_onnx, tiny_dynamo_onnx):
    assert _opset(tiny_torchscript_onnx) == 17
    assert _opset(tiny_dynamo_onnx) == 18


def test_batch_2(tmp_path):
    path = export_unet("tiny", out=tmp_path / "b2.onnx", batch=2)
    inputs = example_inputs("tiny", batch=2)
    assert _run(path, inputs).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_large_model_path_writes_one_data_file(exporter, tmp_path, monkeypatch, tiny_torch_reference):
    # Pretend the tiny model is over the embedding limit: the sd15 code path, in seconds.
    monkeypatch.setattr(unet_export, "EMBED_MAX_BYTES", 0)
    out = export_unet("tiny", exporter=exporter, out=tmp_path / "big" / "unet.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    model = onnx.load(str(out), load_external_data=False)
    locations = {e.value for init in model.graph.initializer for e in init.external_data if e.key == "location"}
    assert locations == {"unet.onnx.data"}
    if exporter == "dynamo":  # node metadata survives the onnx-graphsurgeon round trip
        assert any(p.key == "pkg.torch.onnx.name_scopes" for n in model.graph.node for p in n.metadata_props)
    inputs, ref = tiny_torch_reference
    assert np.abs(_run(out, inputs) - ref).max() < 1e-4
    if exporter == "torchscript":  # same bytes on this path too (one exporter keeps the suite fast)
        again = export_unet("tiny", exporter=exporter, out=tmp_path / "big2" / "unet.onnx")
        assert again.read_bytes() == out.read_bytes()
        assert (again.parent / "unet.onnx.data").read_bytes() == (out.parent / "unet.onnx.data").read_bytes()


def test_pretrained_folder(tmp_path):
    model = build_unet("tiny", "random", seed=3)
    model.save_pretrained(tmp_path / "pipe" / "unet")
    inputs = example_inputs("tiny")
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        ref = model(*(torch.from_numpy(inputs[k]) for k in ("sample", "timestep", "encoder_hidden_states")),
                    return_dict=False)[0].numpy()
    # Both the U-Net folder and the pipeline folder above it are accepted.
    path = export_unet("tiny", weights=str(tmp_path / "pipe"), out=tmp_path / "pre.onnx")
    assert np.abs(_run(path, inputs) - ref).max() < 1e-4


def test_pretrained_folder_errors(tmp_path):
    with pytest.raises(QuadcError, match="no such folder"):
        export_unet("tiny", weights=str(tmp_path / "nope"), out=tmp_path / "x.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuadcError, match="no config.json"):
        export_unet("tiny", weights=str(tmp_path / "empty"), out=tmp_path / "x.onnx")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(QuadcError, match="not a loadable diffusers U-Net"):
        export_unet("tiny", weights=str(broken), out=tmp_path / "x.onnx")
    build_unet("tiny").save_pretrained(tmp_path / "tiny_unet")
    with pytest.raises(QuadcError, match="cross_attention_dim 32 but config 'sd15'"):
        export_unet("sd15", weights=str(tmp_path / "tiny_unet"), out=tmp_path / "x.onnx")
    # An SD2-style U-Net (1024-wide text embeddings) matches no config: the error says what to do instead.
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(**{**get_config("tiny"), "cross_attention_dim": 1024}).save_pretrained(tmp_path / "sd2")
    with pytest.raises(QuadcError, match="1024 but config 'sd15' expects 768; no config here has it.*torch.onnx.export"):
        export_unet("sd15", weights=str(tmp_path / "sd2"), out=tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(QuadcError, match="unknown exporter"):
        export_unet("tiny", exporter="tf", out=tmp_path / "x.onnx")
    with pytest.raises(QuadcError, match="unknown U-Net config"):
        export_unet("huge", out=tmp_path / "x.onnx")
    with pytest.raises(QuadcError, match="must end in .onnx"):
        export_unet("tiny", out=tmp_path / "x.bin")
    with pytest.raises(QuadcError, match="batch"):
        export_unet("tiny", out=tmp_path / "x.onnx", batch=0)
    with pytest.raises(QuadcError, match="opset 9"):
        export_unet("tiny", out=tmp_path / "x.onnx", opset=9)


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    out = tmp_path / "out" / "unet.onnx"

    def boom(*args, **kwargs):
        Path(args[2]).write_bytes(b"half a model")
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(unet_export, "_export_torchscript", boom)
    with pytest.raises(QuadcError, match="exporter exploded"):
        export_unet("tiny", out=out)
    assert os.listdir(out.parent) == []


def test_progress_messages(tmp_path):
    messages: list[str] = []
    export_unet("tiny", out=tmp_path / "p.onnx", progress=messages.append)
    assert any("building" in m for m in messages) and any("exporting" in m for m in messages)
    assert messages[-1].startswith("wrote")


def test_torchscript_large_model_cannot_use_version_converter(monkeypatch, tmp_path):
    monkeypatch.setattr(unet_export, "_PROTO_LIMIT", 0)
    with pytest.raises(QuadcError, match="use exporter 'dynamo' for opset 21"):
        export_unet("tiny", out=tmp_path / "x.onnx", opset=21)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_sd15_export(exporter, tmp_path):
    from quadc.frontend import load

    out = export_unet("sd15", exporter=exporter, out=tmp_path / "unet.onnx")
    assert (tmp_path / "unet.onnx.data").stat().st_size > 3_000_000_000
    assert out.stat().st_size < 200_000_000
    _, info = load(out)
    expected = module_paths("sd15")
    assert set(info.points) == set(expected)
    assert len(info.attention) == 32 and {b.heads for b in info.attention} == {8}


def test_cli_fp16_defaults_to_the_dynamo_exporter(tmp_path, capsys):
    """TorchScript traces by running the model, and torch's float16 CPU kernels make that take hours at full
    size: `quadc export --dtype fp16` without --exporter uses dynamo (opset 18), and the Python API warns
    when a large model is traced in float16."""
    from quadc.cli import main

    out = tmp_path / "fp16.onnx"
    assert main(["export", "--dtype", "fp16", "-q", "-o", str(out)]) == 0
    model = onnx.load(str(out), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == DEFAULT_OPSET["dynamo"] != DEFAULT_OPSET["torchscript"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    notes: list[str] = []
    unet_export.SLOW_FP16_TRACE_BYTES, saved = 0, unet_export.SLOW_FP16_TRACE_BYTES
    try:
        export_unet("tiny", out=tmp_path / "ts.onnx", dtype="fp16", progress=notes.append)
    finally:
        unet_export.SLOW_FP16_TRACE_BYTES = saved
    assert any("take hours" in n and "dynamo" in n for n in notes)
