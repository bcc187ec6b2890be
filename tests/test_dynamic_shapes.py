"""A U-Net exported with dynamic axes (symbolic batch, height, width and token count), as users export
with torch.onnx or optimum: onnx-qdq keeps the symbolic dimensions and is accurate at more than one size,
and the targets that compile for one shape refuse it in one line (``--target all`` skips them).

Oracle: the float ``onnx`` artifact of the same model, at the same size, on feeds not used for calibration.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from quadc.cli import main
from quadc.compiler import CompileOptions, bundled_loras, compile_model
from quadc.errors import QuadcError
from quadc.quant.affine import sqnr_db
from quadc.quant.feeds import random_feeds
from quadc.runtime.engine import Engine
from quadc.targets import get_target

LORAS = {k: str(v) for k, v in bundled_loras().items() if k in ("sepia", "inpaint")}


def _export_tiny(out: Path, *, dynamic: bool, int64_timestep: bool = False) -> Path:
    """The tiny U-Net (random weights, seed 0) exported by torch.onnx (TorchScript), with dynamic axes
    (symbolic batch, height, width, tokens) or static, its timestep float32 or int64 (as optimum writes it)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from quadc.export.unet_export import build_unet, example_inputs

    class Wrapper(torch.nn.Module):
        def __init__(self, unet: torch.nn.Module) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):  # noqa: ANN001, ANN201
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    ex = example_inputs("tiny")
    timestep = torch.tensor([500], dtype=torch.int64) if int64_timestep else torch.from_numpy(ex["timestep"])
    args = (torch.from_numpy(ex["sample"]), timestep, torch.from_numpy(ex["encoder_hidden_states"]))
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "encoder_hidden_states": {0: "batch", 1: "tokens"},
            "out_sample": {0: "batch", 2: "height", 3: "width"}}
    torch.onnx.export(Wrapper(build_unet("tiny").eval()), args, str(out), dynamo=False, opset_version=17,
                      input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out_sample"],
                      dynamic_axes=axes if dynamic else None)
    return out


@pytest.fixture(scope="module")
def dynamic_unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny U-Net exported with dynamic axes."""
    return _export_tiny(tmp_path_factory.mktemp("dynamic") / "unet.onnx", dynamic=True)


def _feeds(size: int, tokens: int, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    specs = {"sample": ([1, 4, size, size], np.float32), "timestep": ([1], np.float32),
             "encoder_hidden_states": ([1, tokens, 32], np.float32)}
    return random_feeds(specs, n, seed=seed)


def test_onnx_qdq_of_a_dynamic_unet_is_accurate_at_two_sizes(dynamic_unet: Path, tmp_path: Path) -> None:
    flt = tmp_path / "float"
    qdq = tmp_path / "qdq"
    compile_model(dynamic_unet, flt, CompileOptions(target="onnx", loras=LORAS))
    # Calibrated at the feeds' default size for symbolic dims (64x64 latents, 77 tokens); unified LoRA
    # encodings, since this random U-Net is not the one the LoRAs were trained on (see test_fp16).
    compile_model(dynamic_unet, qdq, CompileOptions(
        target="onnx-qdq", loras=LORAS, pass_options={"quant-plan": {"calib_random": 8, "lora_policy": "unified"}}))
    graph = onnx.load(str(qdq / "model.onnx"), load_external_data=False)
    sample = next(i for i in graph.graph.input if i.name == "sample")
    assert [d.dim_param or d.dim_value for d in sample.type.tensor_type.shape.dim] == ["batch", 4, "height", "width"]
    want_engine, got_engine = Engine(flt), Engine(qdq)
    for size, tokens in ((64, 77), (32, 16)):
        for task in [None, *LORAS]:
            feeds = _feeds(size, tokens, 2, seed=1)
            want = np.concatenate([want_engine.run(f, task)["out_sample"] for f in feeds])
            got = np.concatenate([got_engine.run(f, task)["out_sample"] for f in feeds])
            assert got.shape == (2, 4, size, size)
            db = sqnr_db(want, got)
            assert db >= 30.0, f"{size}x{size}, task {task}: {db:.1f} dB"


@pytest.mark.parametrize("target", ["qnn", "neuropilot", "enn"])
def test_single_shape_targets_refuse_a_dynamic_unet_in_one_line(dynamic_unet: Path, tmp_path: Path, target: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["compile", str(dynamic_unet), "--target", target, "--lora", f"sepia={LORAS['sepia']}",
                 "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "compiles for one input shape" in err and "'sample'" in err, err
    assert not out.exists()
    with pytest.raises(QuadcError, match="one input shape"):
        compile_model(dynamic_unet, out, CompileOptions(target=target))


def test_target_all_skips_the_single_shape_targets(dynamic_unet: Path, tmp_path: Path) -> None:
    out = tmp_path / "all"
    index = compile_model(dynamic_unet, out, CompileOptions(target="all", loras={"sepia": LORAS["sepia"]},
                                                            pass_options={"quant-plan": {"calib_random": 2}}))
    assert {"onnx", "onnx-qdq"} <= set(index["targets"])
    written = json.loads((out / "targets.json").read_text())
    for name in ("qnn", "neuropilot", "enn"):
        assert name not in written["targets"] and not (out / name).exists()
        if get_target(name).available()[0]:  # else skipped as not installed
            assert "one input shape" in written["skipped"][name], written["skipped"]


def test_run_casts_feeds_to_the_graph_types_and_refuses_what_it_cannot(tmp_path: Path, capsys) -> None:
    """optimum exports the timestep as int64; numpy writes float64. `quadc run` casts float64 to float32 and
    a whole-valued float timestep to int64 (the same output as int64 feeds), and refuses in one line a
    fractional timestep for an int64 input and a sample of the wrong size (onnxruntime tracebacks before)."""
    from quadc.export.unet_export import example_inputs

    model = _export_tiny(tmp_path / "unet.onnx", dynamic=False, int64_timestep=True)
    ex = example_inputs("tiny")
    art = tmp_path / "art"
    compile_model(model, art, CompileOptions(target="onnx-qdq", loras=LORAS))
    rng = np.random.default_rng(5)
    sample, cond = rng.standard_normal(ex["sample"].shape), rng.standard_normal(ex["encoder_hidden_states"].shape)
    want = Engine(art).run({"sample": sample.astype(np.float32), "timestep": np.array([300], np.int64),
                            "encoder_hidden_states": cond.astype(np.float32)}, task="sepia")["out_sample"]

    def run(name: str, **feeds: np.ndarray) -> int:
        np.savez(tmp_path / f"{name}.npz", **{"sample": sample, "timestep": np.array([300.0]),
                                             "encoder_hidden_states": cond, **feeds})
        return main(["run", str(art), "--task", "sepia", "--inputs", str(tmp_path / f"{name}.npz"),
                     "-o", str(tmp_path / f"{name}-out.npz")])

    assert run("float64") == 0
    assert np.array_equal(np.load(tmp_path / "float64-out.npz")["out_sample"], want)
    capsys.readouterr()
    for name, feeds, message in (("fraction", {"timestep": np.array([300.5])}, "input 'timestep' has non-integer"),
                                 ("size", {"sample": np.zeros((1, 4, 16, 16))}, "input 'sample' has shape [1, 4, 16, 16]; "
                                                                               "the graph takes [1, 4, 8, 8]")):
        assert run(name, **feeds) == 2, name
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
