"""The trained fixtures of quadc/data (scripts/train_fixtures.py): reproducible training steps, and committed
files that load, run and mean something.

Oracles: diffusers/peft themselves (the committed U-Net and VAE folders, each LoRA loaded by peft or
diffusers' own loaders); the untrained U-Net of the same config; held-out photographs (``chelsea`` and the
motorcycle of ``skimage.data``) that no training phase saw.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from quadc.compiler import CompileOptions, bundled_loras, bundled_model, compile_model

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "quadc" / "data"
FIXTURES = json.loads((DATA / "fixtures.json").read_text())
INPUTS = ("sample", "timestep", "encoder_hidden_states")


@pytest.fixture(scope="module")
def tf():
    """scripts/train_fixtures.py as a module."""
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("train_fixtures", ROOT / "scripts" / "train_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_fixtures", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return sys.modules["train_fixtures"]


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(DATA / FIXTURES["unet"]), local_files_only=True).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(DATA / FIXTURES["vae"]), local_files_only=True).eval()


@pytest.fixture(scope="module")
def heldout(tf):
    """Held-out 32x32 crops ``[n, 3, 32, 32]`` in [-1, 1] (photos no training phase used)."""
    pytest.importorskip("skimage")
    crops = tf.crop_set(tf.HELD_OUT_PHOTOS, 16, seed=77)
    return tf.to_tensor(crops.images)


@pytest.fixture(scope="module")
def feeds(heldout):
    """U-Net feeds from held-out photos: their VAE latents noised at several timesteps, null prompt."""
    from quadc.quant.feeds import alphas_cumprod

    with torch.no_grad():
        z = _vae().encode(heldout).latent_dist.mean * FIXTURES["vae_scaling_factor"]
    embeds = np.load(DATA / FIXTURES["embeddings"])
    rng = np.random.default_rng(5)
    ts = np.array([100, 300, 500, 700, 900] * 2)
    abar = alphas_cumprod()[ts].astype(np.float32)[:, None, None, None]
    z = z.numpy()[: len(ts)]
    x = np.sqrt(abar) * z + np.sqrt(1 - abar) * rng.standard_normal(z.shape).astype(np.float32)
    return [{"sample": x[i:i + 1].astype(np.float32), "timestep": ts[i:i + 1].astype(np.float32),
             "encoder_hidden_states": embeds[:1]} for i in range(len(ts))]


# --------------------------------------------------------------------------------------------- determinism
def _state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_training_steps_are_deterministic(tf):
    tf.setup_torch(1)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(-1, 1, (8, 3, 32, 32)).astype(np.float32))
    phase = tf.Phase(steps=2, batch=4, lr=1e-3)
    embeds = torch.from_numpy(tf.prompt_embeddings(3))
    classes = torch.tensor([1, 2, 3, 1, 2, 3, 1, 2])

    def once():
        vae = tf.make_vae()
        start = _state(vae)
        tf.train_vae(vae, images, phase)
        mean, std = tf.encode(vae, images)
        unet = tf.make_unet()
        tf.train_unet(unet, mean, std, classes, embeds, 1.0, phase)
        spec = tf.TASKS[0]
        tf.add_lora(unet, spec)
        tf.train_lora(unet, (mean, std), (mean.flip(0), std.flip(0)), classes, embeds, 1.0, phase, spec.seed)
        lora = tf.lora_from_peft(unet, spec)
        return start, _state(vae), _state(unet), {k: v.up for k, v in lora.layers.items()}

    start, vae1, unet1, lora1 = once()
    _, vae2, unet2, lora2 = once()
    assert not _same(start, vae1), "the VAE step changed nothing"
    assert any(np.abs(up).max() > 0 for up in lora1.values()), "the LoRA step left B at its zero init"
    assert _same(vae1, vae2) and _same(unet1, unet2) and _same(lora1, lora2)


def test_crops_and_task_pairs_are_deterministic(tf):
    pytest.importorskip("skimage")
    a, b = (tf.crop_set(("coins", "moon"), 4, seed=3) for _ in range(2))
    assert np.array_equal(a.images, b.images) and a.images.shape == (8, 32, 32, 3)
    for task in ("inpaint", "edges_to_image", "sepia", "background_removal"):
        p, q = (tf.task_pairs(task, a, b.images, seed=9) for _ in range(2))
        assert np.array_equal(p.source, q.source) and np.array_equal(p.target, q.target), task
        assert not np.array_equal(p.source, p.target), task


# ------------------------------------------------------------------------------------------ committed files
def test_fixture_files_are_consistent():
    assert set(FIXTURES["tasks"]) == set(bundled_loras()) and len(bundled_loras()) == 4
    formats = {e["format"] for e in FIXTURES["tasks"].values()}
    assert len(formats) >= 2
    for task, entry in FIXTURES["tasks"].items():
        assert (DATA / entry["lora"]) == bundled_loras()[task]
        for key in ("image", "mask"):
            if key in entry:
                assert (DATA / entry[key]).is_file(), (task, key)
    embeds = np.load(DATA / FIXTURES["embeddings"])
    assert embeds.shape == (len(FIXTURES["prompts"]), 8, 32) and embeds.dtype == np.float32
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 12_000_000, f"quadc/data holds {total} bytes"


def test_bundled_onnx_is_the_committed_unet(feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundled_model()), providers=["CPUExecutionProvider"])
    unet = _unet()
    for feed in feeds[:3]:
        got = sess.run(None, feed)[0]
        with torch.no_grad():
            want = unet(*(torch.from_numpy(feed[k]) for k in INPUTS)).sample.numpy()
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_trained_unet_denoises_heldout_photos_far_better_than_untrained(tf, heldout):
    with torch.no_grad():
        z = _vae().encode(heldout).latent_dist.mean * FIXTURES["vae_scaling_factor"]
    null = torch.from_numpy(np.load(DATA / FIXTURES["embeddings"])[[0] * len(z)])
    trained = tf.denoising_loss(_unet(), z, null)
    untrained = tf.denoising_loss(tf.make_unet(seed=0), z, null)
    # predicting zero noise scores 1.0; the untrained U-Net about that
    assert trained < 0.5 * untrained and trained < 0.5, (trained, untrained)


def test_vae_reconstructs_heldout_photos(tf, heldout):
    # measured: 17.9 dB (the untrained VAE: 11.7 dB; crops of the training photos: 22-24 dB)
    trained, untrained = tf.vae_psnr(_vae(), heldout), tf.vae_psnr(tf.make_vae(), heldout)
    assert trained >= 16.5 and trained >= untrained + 5.0, (trained, untrained)


def _torch_with_lora(task: str):
    from diffusers import StableDiffusionPipeline

    path = bundled_loras()[task]
    fmt = FIXTURES["tasks"][task]["format"]
    unet = _unet()
    if fmt == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(unet, str(path)).merge_and_unload()
    if fmt == "diffusers":
        unet.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="unet", adapter_name=task)
    else:  # kohya: diffusers' own converter
        state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name=task)
    unet.fuse_lora(lora_scale=1.0)
    return unet


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("fixtures") / "out"
    compile_model(bundled_model(), out, CompileOptions(target="onnx", loras=dict(bundled_loras())))
    from quadc.runtime.engine import Engine

    return Engine(out)


@pytest.mark.parametrize("task", sorted(FIXTURES["tasks"]))
def test_lora_reads_the_same_in_quadc_and_diffusers_or_peft(task, artifact, feeds):
    model = _torch_with_lora(task)
    for feed in feeds[:2]:
        got = artifact.run(feed, task)["out_sample"]
        with torch.no_grad():
            want = model(*(torch.from_numpy(feed[k]) for k in INPUTS), return_dict=False)[0].numpy()
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), task


def test_loras_change_the_output_clearly_and_differently(artifact, feeds):
    base = np.concatenate([artifact.run(f, None)["out_sample"].ravel() for f in feeds])
    effects = {t: np.concatenate([artifact.run(f, t)["out_sample"].ravel() for f in feeds]) - base
               for t in artifact.tasks}
    rms = float(np.sqrt(np.mean(base ** 2)))
    for task, e in effects.items():
        assert float(np.sqrt(np.mean(e ** 2))) > 0.05 * rms, task
    names = sorted(effects)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            cos = float(effects[a] @ effects[b] / np.linalg.norm(effects[a]) / np.linalg.norm(effects[b]))
            assert cos < 0.9, (a, b, cos)
