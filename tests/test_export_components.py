"""quadc export --component: VAE encoder/decoder and CLIP text encoder against their torch modules, the bundled
VAE files against a fresh export, the trained VAE's reconstruction, and the CLI's refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from quadc.cli import main
from quadc.errors import QuadcError
from quadc.pipeline import defaults
from quadc.pipeline.images import load_image, psnr, to_uint8

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from quadc.export.components import VAE_SD15, VAE_TINY, build_text_encoder, build_vae, export_component  # noqa: E402


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_vae_components_compute_the_diffusers_vae(tmp_path: Path) -> None:
    enc = export_component("vae-encoder", "tiny", "random", out=tmp_path / "enc.onnx", seed=3)
    dec = export_component("vae-decoder", "tiny", "random", out=tmp_path / "dec.onnx", seed=3)
    vae = build_vae("tiny", "random", seed=3)
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        z = posterior.mean * vae.config.scaling_factor
        image = vae.decode(z / vae.config.scaling_factor).sample
    s_enc, s_dec = _session(enc), _session(dec)
    assert [(i.name, i.shape) for i in s_enc.get_inputs()] == [("image", [1, 3, 32, 32])]
    assert [(o.name, o.shape) for o in s_dec.get_outputs()] == [("image", [1, 3, 32, 32])]
    got_z = s_enc.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got_z, z.numpy(), rtol=1e-4, atol=1e-5)
    got = s_dec.run(None, {"latent": z.numpy()})[0]
    np.testing.assert_allclose(got, image.numpy(), rtol=1e-4, atol=1e-5)


def test_text_encoder_computes_clip(tmp_path: Path) -> None:
    path = export_component("text-encoder", "tiny", "random", out=tmp_path / "te.onnx", seed=1)
    clip = build_text_encoder("tiny", "random", seed=1)
    ids = np.array([[998, 5, 17, 400, 999, 1, 1, 1]], dtype=np.int64)
    with torch.no_grad():
        want = clip(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    sess = _session(path)
    assert sess.get_outputs()[0].shape == [1, 8, 32]  # the tiny U-Net's encoder_hidden_states
    np.testing.assert_allclose(sess.run(None, {"input_ids": ids})[0], want, rtol=1e-4, atol=1e-5)


def test_weights_from_a_local_pipeline_folder(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipe"
    vae = build_vae("tiny", "random", seed=9)
    vae.save_pretrained(pipeline / "vae")
    clip = build_text_encoder("tiny", "random", seed=9)
    clip.save_pretrained(pipeline / "text_encoder")
    from_folder = export_component("vae-decoder", "tiny", str(pipeline), out=tmp_path / "a.onnx")
    from_seed = export_component("vae-decoder", "tiny", "random", out=tmp_path / "b.onnx", seed=9)
    z = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_session(from_folder).run(None, {"latent": z})[0],
                               _session(from_seed).run(None, {"latent": z})[0], rtol=1e-5, atol=1e-6)
    te = export_component("text-encoder", "tiny", str(pipeline), out=tmp_path / "te.onnx")
    assert _session(te).get_outputs()[0].shape == [1, 8, 32]


def test_bundled_vae_is_a_fresh_export_of_the_trained_weights(tmp_path: Path) -> None:
    sd = defaults.data_dir() / "tiny_sd"
    for name, component in (("tiny_vae_encoder.onnx", "vae-encoder"), ("tiny_vae_decoder.onnx", "vae-decoder")):
        fresh = export_component(component, "tiny", str(sd), out=tmp_path / name)
        assert hashlib.sha256(fresh.read_bytes()).digest() == hashlib.sha256(
            (defaults.data_dir() / name).read_bytes()).digest(), f"{name} differs; run scripts/make_bundled_model.py"


def test_bundled_vae_reconstructs_a_held_out_photo() -> None:
    """The trained tiny VAE: 18 dB on held-out photos (quadc/data/README.md), 11.7 dB untrained."""
    enc = _session(defaults.data_dir() / "tiny_vae_encoder.onnx")
    dec = _session(defaults.data_dir() / "tiny_vae_decoder.onnx")
    photo = load_image(defaults.data_dir() / "demo" / "motorcycle.png", (32, 32))
    z = enc.run(None, {"image": photo})[0]
    assert 0.5 < float(z.std()) < 2.0  # scaled latents: about unit variance, as the U-Net was trained on
    assert psnr(to_uint8(dec.run(None, {"latent": z})[0]), to_uint8(photo)) > 15.0


def test_cli_export_component(tmp_path: Path, capsys) -> None:
    out = tmp_path / "dec.onnx"
    assert main(["export", "--component", "vae-decoder", "-q", "-o", str(out)]) == 0
    assert _session(out).get_inputs()[0].shape == [1, 4, 8, 8]
    assert main(["export", "--component", "vae-encoder", "--dtype", "fp16", "-o", str(out)]) == 2
    assert "--dtype apply to the U-Net only" in capsys.readouterr().err
    assert main(["export", "--component", "text-encoder", "--weights", str(tmp_path / "nope"), "-o", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(QuadcError, match="no config.json"):
        build_vae("tiny", str(tmp_path))


def test_sd15_vae_config_is_stable_diffusions() -> None:
    assert VAE_SD15["block_out_channels"] == [128, 256, 512, 512] and VAE_SD15["scaling_factor"] == 0.18215
    config = json.loads((defaults.data_dir() / "tiny_sd" / "vae" / "config.json").read_text())
    for key in ("block_out_channels", "layers_per_block", "norm_num_groups", "latent_channels", "down_block_types"):
        assert config[key] == VAE_TINY[key]


@pytest.mark.slow
def test_sd15_components_export(tmp_path: Path) -> None:
    """Full size: the SD1.5 VAE (512x512 <-> 64x64x4) and CLIP ViT-L/14 text tower (77 x 768)."""
    dec = export_component("vae-decoder", "sd15", "random", out=tmp_path / "dec.onnx")
    assert _session(dec).get_inputs()[0].shape == [1, 4, 64, 64]
    te = export_component("text-encoder", "sd15", "random", out=tmp_path / "te.onnx")
    assert _session(te).get_outputs()[0].shape == [1, 77, 768]
