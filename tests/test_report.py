"""quadc report: quality numbers, LoRA layer SQNR, the W8A8:W8A16 curve, and the page rendered in headless
Chromium.

The image pipeline is ``quadc.pipeline.generate.generate`` when it is installed; until then a stand-in
built on the real Engine (a few denoising steps of the U-Net, latents projected to RGB) takes its place,
so the quantized-vs-float comparison still runs two real artifacts on the same seeds.
"""

from __future__ import annotations

import importlib.util
import resource
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from quadc.cli import main
from quadc.compiler import CompileOptions, compile_model
from quadc.errors import QuadcError
from quadc.report import build_report, write_report
from quadc.report.build import lora_layer_sqnr
from quadc.runtime.engine import Engine


def _have_pipeline() -> bool:
    try:
        return importlib.util.find_spec("quadc.pipeline.generate") is not None
    except ModuleNotFoundError:
        return False


HAVE_PIPELINE = _have_pipeline()
_PROJECT = np.array([[0.9, 0.2, -0.4], [0.1, 0.8, 0.3], [-0.3, 0.2, 0.9], [0.2, -0.5, 0.1]], np.float32)


def unet_generate(artifact, task, *, sampler="lcm", steps=4, seed=0, **_):
    """Stand-in for the image pipeline: ``steps`` Euler-like steps on the artifact's U-Net from seeded noise,
    latents projected to RGB and upscaled 4x."""
    engine = Engine(artifact)
    spec = engine.manifest["inputs"]
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(spec["sample"]["shape"]).astype(np.float32)
    cond = rng.standard_normal(spec["encoder_hidden_states"]["shape"]).astype(np.float32)
    t0 = time.perf_counter()
    for t in np.linspace(900, 100, steps):
        eps = engine.run({"sample": latents, "timestep": np.array([t], np.float32), "encoder_hidden_states": cond},
                         task=None if task == "none" else task)["out_sample"]
        latents = latents - 0.2 * eps
    unet = time.perf_counter() - t0
    rgb = np.einsum("chw,cd->hwd", latents[0], _PROJECT)
    image = np.clip(127.5 + 60 * rgb, 0, 255).astype(np.uint8).repeat(4, 0).repeat(4, 1)
    return SimpleNamespace(image=image, latents=latents, timings={"unet_step": unet / steps, "total": unet},
                           peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


GENERATE = None if HAVE_PIPELINE else unet_generate


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    out = {}
    for name, target in (("qdq", "onnx-qdq"), ("float", "onnx")):
        compile_model(None, root / name, CompileOptions(target=target))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def report(artifacts, tmp_path_factory):
    data = build_report(artifacts["qdq"], artifacts["float"], seeds=(0, 1), ablation=(0.0, 1.0), generate=GENERATE)
    page = write_report(data, tmp_path_factory.mktemp("page") / "report.html")
    return data, page


def test_quantized_pipeline_is_close_to_float_and_tasks_differ(report):
    data, _ = report
    assert [t.task for t in data.tasks] == list(data.manifest["tasks"])
    for t in data.tasks:
        assert len(t.psnr_db) == len(t.ssim) == len(t.latent_sqnr_db) == 2
        assert min(t.latent_sqnr_db) > 20 and min(t.psnr_db) > 25 and min(t.ssim) > 0.8, t
        assert t.timings and all(v > 0 for v in t.timings.values())
    # The same seed under two tasks gives images far apart: PSNR well below the quantization's.
    a, b = data.tasks[0], data.tasks[-1]
    from quadc.report.metrics import psnr_db

    assert psnr_db(a.images[0], b.images[0]) < min(a.psnr_db) - 5
    assert data.peak_rss_bytes > 10 * 2**20


def test_float_against_itself_is_exact(artifacts):
    data = build_report(artifacts["float"], artifacts["float"], tasks=["sepia"], seeds=(3,), ablation=(),
                        generate=GENERATE)
    (t,) = data.tasks
    assert t.psnr_db == [float("inf")] and t.ssim == [1.0] and t.latent_sqnr_db == [float("inf")]


def test_lora_layer_sqnr_pairs_each_task_with_its_own_float_lora(artifacts, tmp_path):
    layers = lora_layer_sqnr(artifacts["qdq"], artifacts["float"], ["sepia", "inpaint"])
    modules = read_modules(artifacts["qdq"], "sepia")
    assert sorted(layers["sepia"]) == sorted(modules)
    assert all(15 < v < 80 for v in layers["sepia"].values()), layers["sepia"]
    # A quantized artifact whose sepia file holds inpaint's integers: sepia's layers no longer match.
    swapped = tmp_path / "swapped"
    shutil.copytree(artifacts["qdq"], swapped)
    for suffix in ("safetensors", "onnx_adapter"):
        shutil.copy(swapped / "lora" / f"inpaint.{suffix}", swapped / "lora" / f"sepia.{suffix}")
    bad = lora_layer_sqnr(swapped, artifacts["float"], ["sepia"])["sepia"]
    shared = set(bad) & set(layers["sepia"])
    assert shared and np.median([layers["sepia"][m] - bad[m] for m in shared]) > 10


def read_modules(artifact: Path, task: str) -> list[str]:
    from quadc.artifact import read_manifest

    return read_manifest(artifact)["tasks"][task]["modules"]


def test_w8a16_beats_w8a8_on_the_ablation_curve(report):
    data, _ = report
    (f0, s0), (f1, s1) = data.ablation
    assert (f0, f1) == (0.0, 1.0) and np.isfinite(s0) and np.isfinite(s1)
    assert s0 > s1 + 3, data.ablation


def test_user_mistakes_are_one_line(artifacts, tmp_path):
    with pytest.raises(QuadcError, match="unknown task 'nope'"):
        build_report(artifacts["qdq"], tasks=["nope"], generate=GENERATE)
    with pytest.raises(QuadcError, match="at least one seed"):
        build_report(artifacts["qdq"], seeds=(), generate=GENERATE)
    with pytest.raises(QuadcError, match="does not exist"):
        build_report(artifacts["qdq"], tasks=["sepia"], seeds=(0,), model=tmp_path / "x.onnx", generate=GENERATE)


def test_cli_report(artifacts, tmp_path, capsys):
    out = tmp_path / "r.html"
    code = main(["report", str(artifacts["qdq"]), "--float", str(artifacts["float"]), "--task", "sepia",
                 "--seeds", "0", "--ablation", "", "-o", str(out)])
    if HAVE_PIPELINE:
        assert code == 0 and out.is_file() and "sepia" in out.read_text()
    else:  # the image pipeline is not installed: one line, exit 2
        err = capsys.readouterr().err
        assert code == 2 and "image pipeline" in err and len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.skipif(not HAVE_PIPELINE, reason="needs the image pipeline")
def test_cli_report_takes_prompt_embeddings(artifacts, tmp_path, capsys):
    """A U-Net whose text shape the bundled prompts do not fit needs the user's embeddings; the report
    passes them to every picture (a wrong shape reaches generate's check)."""
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    np.save(good, np.random.default_rng(3).standard_normal((8, 32)).astype(np.float32))
    np.save(bad, np.zeros((5, 32), np.float32))
    common = [str(artifacts["qdq"]), "--task", "sepia", "--seeds", "0", "--ablation", ""]
    assert main(["report", *common, "--prompt-embeds", str(bad), "-o", str(tmp_path / "bad.html")]) == 2
    assert "prompt embeddings have shape [1, 5, 32]" in capsys.readouterr().err
    assert main(["report", *common, "--prompt-embeds", str(good), "-o", str(tmp_path / "good.html")]) == 0
    assert (tmp_path / "good.html").is_file()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_page_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    data, page = report
    shot = tmp_path / "shot.png"
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for t in data.tasks:
        assert f"<h3>{t.task}</h3>" in html
    n_images = sum(2 * len(t.seeds) for t in data.tasks)
    assert html.count('class="sample"') == n_images and html.count('class="plot"') == 2
    assert "<table class=\"quality\">" in html and "<table class=\"cost\">" in html
    run = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1400,6000", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # The sample images are mid-grey-centred colour noise and the plots draw matplotlib's blue (#1f77b4):
    # both must show up as pixels, i.e. the embedded PNGs were decoded and laid out.
    colourful = (np.ptp(pixels, axis=2) > 40).mean()
    blue = (np.abs(pixels - np.array([31, 119, 180])).sum(axis=2) < 30).sum()
    assert colourful > 0.01 and blue > 200, (colourful, blue)
