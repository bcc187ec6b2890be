"""Shared fixtures: the tiny U-Net exported once per session with each exporter (and in fp16), and the bundled
model."""

from __future__ import annotations

from pathlib import Path

import pytest

BUNDLED_UNET = Path(__file__).resolve().parents[1] / "quadc" / "data" / "tiny_unet.onnx"


def _export(tmp_path_factory: pytest.TempPathFactory, exporter: str, dtype: str = "fp32") -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from quadc.export import export_unet

    out = tmp_path_factory.mktemp(f"tiny_{exporter}_{dtype}") / "unet.onnx"
    return export_unet(config="tiny", weights="random", exporter=exporter, out=out, seed=0, dtype=dtype)


@pytest.fixture(scope="session")
def tiny_torchscript_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny U-Net (random weights, seed 0) exported with the TorchScript exporter, opset 17."""
    return _export(tmp_path_factory, "torchscript")


@pytest.fixture(scope="session")
def tiny_dynamo_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny U-Net (random weights, seed 0) exported with the dynamo exporter, opset 18."""
    return _export(tmp_path_factory, "dynamo")


@pytest.fixture(scope="session")
def tiny_fp16_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny U-Net (random weights, seed 0: the weights of ``tiny_torchscript_onnx`` and of the bundled
    model, rounded) exported in fp16 with the TorchScript exporter, opset 17."""
    return _export(tmp_path_factory, "torchscript", dtype="fp16")


@pytest.fixture(scope="session")
def bundled_unet() -> Path:
    """Path of the bundled default model, quadc/data/tiny_unet.onnx."""
    assert BUNDLED_UNET.is_file(), "quadc/data/tiny_unet.onnx is missing; run scripts/train_fixtures.py"
    return BUNDLED_UNET


@pytest.fixture(scope="session")
def bundled_unet_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh export of the committed trained U-Net weights (quadc/data/tiny_sd/unet) with the bundled
    model's recipe (scripts/make_bundled_model.py, which scripts/train_fixtures.py calls)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import importlib.util

    script = BUNDLED_UNET.parents[2] / "scripts" / "make_bundled_model.py"
    spec = importlib.util.spec_from_file_location("make_bundled_model", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make(tmp_path_factory.mktemp("bundled_export") / "tiny_unet.onnx")


@pytest.fixture(scope="session")
def tiny_torch_reference():
    """(inputs, output) of the tiny torch U-Net (seed 0) on :func:`quadc.export.example_inputs`."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from quadc.export import build_unet, example_inputs

    model = build_unet("tiny", "random", seed=0)
    inputs = example_inputs("tiny")
    with torch.no_grad():
        out = model(*(torch.from_numpy(inputs[k]) for k in ("sample", "timestep", "encoder_hidden_states")),
                    return_dict=False)[0]
    return inputs, out.numpy()
