"""End to end on the tiny trained pipeline: `quadc compile` (U-Net, VAE, LoRAs) float and W8A16, then
`quadc generate` for every bundled task and sampler.

The inputs are the bundled task examples (held-out photos); the VAE is calibrated on two other bundled
photos and the U-Net on synthetic feeds, so no picture here was seen by calibration.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from quadc.cli import main
from quadc.compiler import CompileOptions, compile_model
from quadc.errors import QuadcError
from quadc.pipeline import defaults
from quadc.pipeline.generate import LoadedPipeline, generate
from quadc.pipeline.images import psnr, save_png
from quadc.pipeline.samplers import SAMPLERS

TASKS = ("inpaint", "edges_to_image", "sepia", "background_removal")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generate")
    compile_model(None, root / "float")
    compile_model(None, root / "quant", CompileOptions(target="onnx-qdq"))
    return {"float": root / "float", "quant": root / "quant"}


@pytest.fixture(scope="module")
def pictures(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, np.ndarray]:
    """PNGs written and read back, per (artifact kind, task, sampler); 'none' runs the base model on each
    task's inputs, as ('none@<task>')."""
    out = tmp_path_factory.mktemp("png")
    found: dict[tuple, np.ndarray] = {}
    for kind, path in artifacts.items():
        pipe = LoadedPipeline(path)
        for sampler in SAMPLERS:
            for task in TASKS:
                d = defaults.task_defaults(task)
                for name, kwargs in ((task, {}), (f"none@{task}", {"image": d.image, "mask": d.mask})):
                    result = generate(path, "none" if name.startswith("none") else task, sampler=sampler,
                                      steps=4, seed=0, engine=pipe, strength=d.strength, **kwargs)
                    png = save_png(result.image, out / f"{kind}-{name}-{sampler}.png")
                    found[(kind, name, sampler)] = np.asarray(Image.open(png).convert("RGB"))
    return found


def test_manifest_lists_components_with_rom(artifacts: dict[str, Path]) -> None:
    for path in artifacts.values():
        comps = json.loads((path / "manifest.json").read_text())["components"]
        assert set(comps) == {"unet", "vae-encoder", "vae-decoder"}
        for name in ("vae-encoder", "vae-decoder"):
            sub = path / comps[name]["dir"]
            sub_manifest = json.loads((sub / "manifest.json").read_text())
            files = sum((sub / f).stat().st_size for f in sub_manifest["graph_files"])
            assert comps[name]["rom_bytes"] == files > 0
            assert not sub_manifest["tasks"] and not sub_manifest["lora_slots"]
        assert comps["unet"]["rom_bytes"] == (path / "model.onnx").stat().st_size
        assert comps["unet"]["lora_rom_bytes"] == sum(p.stat().st_size for p in (path / "lora").glob("*.onnx_adapter"))
    quant_dec = json.loads((artifacts["quant"] / "vae_decoder" / "manifest.json").read_text())
    assert quant_dec["precision"] == "w8a16" and quant_dec["target"] == "onnx-qdq"
    ops = {n.op_type for n in __import__("onnx").load(str(artifacts["quant"] / "vae_decoder" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("task", TASKS)
def test_quantized_pipeline_matches_float(pictures: dict[tuple, np.ndarray], task: str, sampler: str) -> None:
    for name in (task, f"none@{task}"):
        value = psnr(pictures[("float", name, sampler)], pictures[("quant", name, sampler)])
        assert value >= 30.0, f"{name} {sampler}: float vs W8A16 PSNR {value:.1f} dB"


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("task", [t for t in TASKS if t != "inpaint"])
def test_task_lora_visibly_changes_the_picture(pictures: dict[tuple, np.ndarray], task: str, sampler: str) -> None:
    for kind in ("float", "quant"):
        value = psnr(pictures[(kind, task, sampler)], pictures[(kind, f"none@{task}", sampler)])
        assert value < 25.0, f"{task} {sampler} ({kind}): task vs base model PSNR {value:.1f} dB"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpaint_lora_visibly_changes_the_hole(pictures: dict[tuple, np.ndarray], sampler: str) -> None:
    """Inside the mask's latent cells (outside them the runtime puts the source back, for both runs) the
    inpaint LoRA's picture differs from the base model's: the base model keeps the grey patch, the LoRA fills
    it (measured 18-24 dB)."""
    from quadc.pipeline.images import latent_mask, load_mask

    d = defaults.task_defaults("inpaint")
    hole = np.kron(latent_mask(load_mask(d.mask, (32, 32)), (8, 8))[0, 0], np.ones((4, 4))) > 0
    assert 0.1 < hole.mean() < 0.5
    for kind in ("float", "quant"):
        a = pictures[(kind, "inpaint", sampler)][hole]
        b = pictures[(kind, "none@inpaint", sampler)][hole]
        value = psnr(a[None], b[None])
        assert value < 25.0, f"inpaint {sampler} ({kind}): task vs base model PSNR in the hole {value:.1f} dB"


def test_inpainting_keeps_the_unmasked_region(artifacts: dict[str, Path]) -> None:
    """Outside the mask's latent cells the picture is the decoded source, whatever the sampler and task."""
    d = defaults.task_defaults("inpaint")
    pipe = LoadedPipeline(artifacts["float"])
    a = generate(artifacts["float"], "inpaint", sampler="euler", engine=pipe)
    b = generate(artifacts["float"], "sepia", sampler="lcm", seed=5, engine=pipe, image=d.image, mask=d.mask)
    from quadc.pipeline.images import latent_mask, load_mask

    keep = latent_mask(load_mask(d.mask, (32, 32)), (8, 8))[0, 0] == 0
    np.testing.assert_array_equal(a.latents[:, :, keep], b.latents[:, :, keep])
    assert not np.array_equal(a.latents[:, :, ~keep], b.latents[:, :, ~keep])


def test_generate_is_seeded(artifacts: dict[str, Path]) -> None:
    pipe = LoadedPipeline(artifacts["float"])
    a = generate(artifacts["float"], "none", sampler="ddim", steps=8, seed=3, engine=pipe)
    b = generate(artifacts["float"], "none", sampler="ddim", steps=8, seed=3, engine=pipe)
    c = generate(artifacts["float"], "none", sampler="ddim", steps=8, seed=4, engine=pipe)
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.uint8 and a.image.shape == (32, 32, 3) and a.latents.shape == (1, 4, 8, 8)
    assert len(a.timesteps) == 8 and "vae_encoder" not in a.timings  # text-to-image: no encoder
    assert a.peak_rss > 10 * 2**20
    assert a.timings["end_to_end"] >= a.timings["unet"] + a.timings["vae_decoder"]


def test_cli_generate_bundled_defaults(artifacts: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "sepia.png"
    assert main(["generate", str(artifacts["quant"]), "--task", "sepia", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    for stage in ("VAE encoder", "U-Net step 1", "U-Net per step", "VAE decoder", "end to end", "peak RSS"):
        assert stage in text
    assert Image.open(out).size == (32, 32)
    embeds = tmp_path / "e.npy"
    np.save(embeds, defaults.bundled_embeddings()[2])
    out2 = tmp_path / "none.png"
    assert main(["generate", str(artifacts["quant"]), "--task", "none", "--sampler", "dpmpp", "--steps", "8",
                 "--prompt-embeds", str(embeds), "--image", str(defaults.data_dir() / "demo" / "chelsea.png"),
                 "-o", str(out2)]) == 0
    assert "dpmpp x 6 steps" in capsys.readouterr().out  # strength 0.75 of 8 steps


def test_generate_refuses_user_mistakes(artifacts: dict[str, Path], tmp_path: Path, capsys) -> None:
    art = str(artifacts["float"])
    cases = [
        (["--task", "nosuch"], "not in"),
        (["--task", "sepia", "--sampler", "olss"], "dpmpp"),
        (["--task", "none", "--mask", str(defaults.task_defaults("inpaint").mask)], "needs the image"),
        (["--task", "sepia", "--image", str(tmp_path / "missing.png")], "no such image"),
        (["--task", "sepia", "--sampler", "ddim", "--strength", "0.1"], "no step"),
    ]
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 4), np.float32))
    cases.append((["--task", "none", "--prompt-embeds", str(bad)], "prompt embeddings have shape"))
    for args, message in cases:
        assert main(["generate", art, *args, "-o", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()


def test_artifact_without_vae(tmp_path: Path) -> None:
    compile_model(None, tmp_path / "unet_only", CompileOptions(components={}))
    assert "components" not in json.loads((tmp_path / "unet_only" / "manifest.json").read_text())
    with pytest.raises(QuadcError, match="no vae-encoder"):
        generate(tmp_path / "unet_only", "sepia")
    # Without an image the decoder is still needed: refused before the first U-Net step, not after the loop.
    pipe = LoadedPipeline(tmp_path / "unet_only")
    steps: list[str | None] = []
    run = pipe.unet.run
    pipe.unet.run = lambda feeds, task=None: steps.append(task) or run(feeds, task=task)  # type: ignore[method-assign]
    with pytest.raises(QuadcError, match="no vae-decoder"):
        generate(tmp_path / "unet_only", "none", engine=pipe)
    assert steps == []


def test_tflite_pipeline_matches_float(artifacts: dict[str, Path], tmp_path: Path) -> None:
    """The whole pipeline on a 16x8 TFLite target (U-Net and VAE in LiteRT) against the float artifact."""
    pytest.importorskip("ai_edge_litert")
    compile_model(None, tmp_path / "np", CompileOptions(target="neuropilot"))
    comps = json.loads((tmp_path / "np" / "manifest.json").read_text())["components"]
    assert (tmp_path / "np" / comps["vae-decoder"]["dir"] / "model.tflite").is_file()
    pipe = LoadedPipeline(tmp_path / "np")
    for task in ("sepia", "edges_to_image"):
        got = generate(tmp_path / "np", task, sampler="euler", engine=pipe).image
        want = generate(artifacts["float"], task, sampler="euler").image
        assert psnr(got, want) >= 30.0, task


def test_compile_refuses_bad_components_before_work(tmp_path: Path, capsys) -> None:
    enc = str(defaults.data_dir() / "tiny_vae_encoder.onnx")
    dec = str(defaults.data_dir() / "tiny_vae_decoder.onnx")
    cases = [(["--vae-decoder", dec], "give --vae-encoder too"),
             (["--vae-encoder", str(tmp_path / "none.onnx")], "no such vae-encoder file"),
             (["--vae-encoder", enc, "--no-vae"], "--no-vae contradicts")]
    for args, message in cases:
        assert main(["compile", "-q", *args, "-o", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_qnn_pipeline_runs_on_htp_and_matches_float(artifacts: dict[str, Path], tmp_path: Path, capsys) -> None:
    """The bundled default compiled for target qnn: U-Net, VAE encoder and decoder each a QNN context run
    on the HTP backend (no CPU fallback), `quadc generate` works, and every task and sampler agrees with
    the float pipeline. Before the qnn-div-const legalization the decoder did not compile."""
    from quadc.runtime.qnn_engine import qnn_available

    ok, why = qnn_available()
    if not ok:
        pytest.skip(f"QNN HTP backend: {why}")
    art = tmp_path / "qnn"
    compile_model(None, art, CompileOptions(target="qnn"))
    manifest = json.loads((art / "manifest.json").read_text())
    assert set(manifest["components"]) == {"unet", "vae-encoder", "vae-decoder"}, manifest.get("components_skipped")
    pipe = LoadedPipeline(art)
    assert [e.executor for e in (pipe.unet, pipe.vae_encoder, pipe.vae_decoder)] == ["qnn-htp"] * 3
    out = tmp_path / "inpaint.png"
    assert main(["generate", str(art), "--task", "inpaint", "-o", str(out)]) == 0
    assert "VAE decoder" in capsys.readouterr().out and Image.open(out).size == (32, 32)
    float_pipe = LoadedPipeline(artifacts["float"])
    for sampler in SAMPLERS:
        for task in TASKS:
            got = generate(art, task, sampler=sampler, engine=pipe).image
            want = generate(artifacts["float"], task, sampler=sampler, engine=float_pipe).image
            value = psnr(got, want)
            assert value >= 30.0, f"{task} {sampler}: float vs qnn (HTP) PSNR {value:.1f} dB"
