"""Generate an image with a compiled artifact: VAE encoder, the U-Net loop with a task bound, VAE decoder.

Image tasks (img2img, as the bundled task LoRAs are trained): the image (inpainting: its masked region
filled with grey, as the task was trained) is encoded by the VAE encoder, noised to the sampler's first
timestep at ``strength`` and denoised by the U-Net loop on ONE loaded U-Net session with the task's LoRA
bound (``task=None``/"none": the base model); with a mask, the region outside it is put back to the
noised source latent after every step (diffusers' legacy inpainting), so only the masked region is
regenerated. Without an image the loop starts from noise (text-to-image). The VAE decoder makes the
picture. Noise comes from ``numpy.random.default_rng(seed)``; no torch.

Defaults (:mod:`quadc.pipeline.defaults`): a bundled task without ``image`` uses its bundled example image,
mask, prompt and strength; without ``prompt_embeds`` the bundled null prompt is used when it fits the
U-Net. :func:`generate` returns the picture, the final latents, per-stage seconds and the peak RSS.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quadc.artifact import read_manifest
from quadc.errors import QuadcError
from quadc.pipeline import defaults, images
from quadc.pipeline.components import component_dir
from quadc.pipeline.samplers import make_sampler
from quadc.runtime.engine import BASE_TASKS, Engine

#: Grey (0.5 in [0, 1]) in the VAE's [-1, 1] pixels: what the inpainting task was trained to fill.
MASK_FILL = 0.0


@dataclass
class GenerateResult:
    """One generated picture: ``image`` uint8 H x W x 3, the final ``latents``, ``timings`` (stage ->
    seconds: ``load``, ``vae_encoder``, ``unet_step_<i>``, ``unet_per_step``, ``unet``, ``vae_decoder``,
    ``end_to_end``; ``load`` is not part of ``end_to_end``) and ``peak_rss`` (bytes, this process)."""

    image: np.ndarray
    latents: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss: int = 0
    task: str = "none"
    sampler: str = ""
    timesteps: list[float] = field(default_factory=list)


class LoadedPipeline:
    """The sessions of an artifact's components: the U-Net :class:`Engine` (tasks switch by binding, never
    reloading) and the VAE encoder/decoder engines (loaded when the artifact has them)."""

    def __init__(self, artifact_dir: str | os.PathLike[str], unet: Engine | None = None):
        self.dir = Path(artifact_dir)
        self.manifest = read_manifest(self.dir)
        self.unet = unet if unet is not None else Engine(self.dir)
        comps = self.manifest.get("components", {})
        self.vae_encoder = Engine(component_dir(self.dir, "vae-encoder", self.manifest)) if "vae-encoder" in comps else None
        self.vae_decoder = Engine(component_dir(self.dir, "vae-decoder", self.manifest)) if "vae-decoder" in comps else None

    def require(self, name: str) -> Engine:
        """The engine of component ``name`` ("vae-encoder" / "vae-decoder"), or a one-line error."""
        engine = self.vae_encoder if name == "vae-encoder" else self.vae_decoder
        if engine is None:
            raise QuadcError(f"{self.dir}: the artifact has no {name}; compile it with the VAE (quadc compile "
                             "without MODEL, or --vae-encoder/--vae-decoder)")
        return engine


def _input_shapes(engine: Engine) -> dict[str, list[Any]]:
    """Shapes of the engine's model inputs (not LoRA inputs) as its manifest records them (any executor)."""
    recorded = engine.manifest.get("inputs", {})
    missing = [n for n in engine.model_inputs if n not in recorded]
    if missing:
        raise QuadcError(f"{engine.dir}: the manifest does not record input '{missing[0]}'; compile again")
    return {n: list(recorded[n]["shape"]) for n in engine.model_inputs}


def _single(engine: Engine, what: str) -> tuple[str, list[int], str]:
    shapes = _input_shapes(engine)
    if len(shapes) != 1:
        raise QuadcError(f"the {what} must take one input, it takes {', '.join(shapes)}")
    name, shape = next(iter(shapes.items()))
    return name, [int(d) for d in shape], engine.output_names[0]


def _unet_io(engine: Engine) -> dict[str, tuple[str, list[Any]]]:
    from quadc.unet_inputs import unet_input_roles

    shapes = _input_shapes(engine)
    roles = unet_input_roles({k: (v, np.float32) for k, v in shapes.items()}, "the artifact's U-Net")
    return {role: (name, shapes[name]) for role, name in roles.items()}


def _embeddings(prompt_embeds: Any, shape: list[Any], prompt_index: int) -> np.ndarray:
    want = [int(d) if isinstance(d, int) else 1 for d in shape]
    if prompt_embeds is None:
        table = defaults.bundled_embeddings()
        if table is None or list(table.shape[1:]) != want[1:]:
            raise QuadcError(f"no bundled prompt embeddings fit this U-Net's encoder_hidden_states {want}; pass "
                             "--prompt-embeds (a .npy of that shape)")
        return np.ascontiguousarray(table[prompt_index][None], dtype=np.float32)
    arr = np.load(prompt_embeds) if isinstance(prompt_embeds, str | os.PathLike) else np.asarray(prompt_embeds)
    if arr.ndim == len(want) - 1:
        arr = arr[None]
    if list(arr.shape) != want:
        raise QuadcError(f"prompt embeddings have shape {list(arr.shape)}, the U-Net takes {want}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def generate(artifact_dir: str | os.PathLike[str], task: str | None, *, sampler: str = "lcm", steps: int = 4,
             seed: int = 0, image: Any = None, mask: Any = None, prompt_embeds: Any = None,
             engine: Engine | LoadedPipeline | None = None, strength: float | None = None) -> GenerateResult:
    """Generate one picture with ``task`` bound (see the module docstring).

    ``image``/``mask``: paths (PNG etc.) or arrays (``[1, 3, H, W]`` in [-1, 1]; mask ``[H, W]``, 1 = fill);
    ``prompt_embeds``: a ``.npy`` path or an array ``[tokens, width]`` / ``[1, tokens, width]``; ``engine``:
    a loaded U-Net :class:`Engine` of this artifact, or a :class:`LoadedPipeline`, to reuse sessions;
    ``strength``: img2img strength (default: the bundled task's, else 0.75 with an image).
    """
    t_load = time.perf_counter()
    if isinstance(engine, LoadedPipeline):
        pipe = engine
    else:
        pipe = LoadedPipeline(artifact_dir, unet=engine)
    task = None if task in BASE_TASKS else task
    if task is not None and task not in pipe.unet.tasks:
        raise QuadcError(f"task '{task}' is not in {artifact_dir} (tasks: {', '.join(pipe.unet.tasks) or 'none'}; "
                         "'none' runs the base model)")
    bundled = defaults.task_defaults(task) if image is None else None
    if bundled is not None:
        image, mask = bundled.image, bundled.mask if mask is None else mask
    prompt_index = bundled.prompt_index if bundled is not None else 0
    if strength is None:
        strength = bundled.strength if bundled is not None else (0.75 if image is not None else 1.0)
    if image is None and mask is not None:
        raise QuadcError("a mask needs the image it masks; pass --image too")
    # Both VAE ends are checked before the first U-Net step, not after the loop: at full size a missing
    # decoder was found only after minutes of sampling.
    enc = pipe.require("vae-encoder") if image is not None else None
    dec = pipe.require("vae-decoder")
    io = _unet_io(pipe.unet)
    sample_name, sample_shape = io["sample"]
    cond = _embeddings(prompt_embeds, io["encoder_hidden_states"][1], prompt_index)
    steps_run = make_sampler(sampler, steps, strength if image is not None else 1.0)
    timings: dict[str, float] = {"load": time.perf_counter() - t_load}

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    latent_shape = [int(d) for d in sample_shape]
    noise = rng.standard_normal(latent_shape).astype(np.float32)
    source = keep = None
    if image is not None and enc is not None:
        enc_in, enc_shape, _ = _single(enc, "VAE encoder")
        size = (enc_shape[2], enc_shape[3])
        pixels = images.load_image(image, size) if not isinstance(image, np.ndarray) else image.astype(np.float32)
        if mask is not None:
            m = images.load_mask(mask, size) if not isinstance(mask, np.ndarray) else mask.astype(np.float32)
            pixels = pixels * (1.0 - m) + MASK_FILL * m
            keep = 1.0 - images.latent_mask(m, (latent_shape[2], latent_shape[3]))
        t = time.perf_counter()
        source = next(iter(enc.run({enc_in: pixels}).values()))
        timings["vae_encoder"] = time.perf_counter() - t
        if list(source.shape) != latent_shape:
            raise QuadcError(f"the VAE encoder makes latents {list(source.shape)}, the U-Net takes {latent_shape}")
        x = steps_run.noised(source, noise)
    else:
        x = steps_run.initial(noise)
    feeds: dict[str, np.ndarray] = {io["encoder_hidden_states"][0]: cond}
    unet_total = 0.0
    for i, t_step in enumerate(steps_run.timesteps):
        t = time.perf_counter()
        feeds[sample_name] = steps_run.model_input(x, i)
        feeds[io["timestep"][0]] = np.full([int(d) for d in io["timestep"][1]] or [], t_step, dtype=np.float32)
        eps = pipe.unet.run(feeds, task=task)
        eps = next(iter(eps.values()))
        fresh = rng.standard_normal(latent_shape).astype(np.float32) if steps_run.needs_noise(i) else None
        x = steps_run.step(x, eps.astype(np.float32), i, noise=fresh)
        if keep is not None and source is not None:  # inpainting: keep the unmasked region on the source
            x = (keep * steps_run.noised(source, noise, i + 1) + (1.0 - keep) * x).astype(np.float32)
        timings[f"unet_step_{i + 1}"] = time.perf_counter() - t
        unet_total += timings[f"unet_step_{i + 1}"]
    timings["unet"] = unet_total
    timings["unet_per_step"] = unet_total / max(1, len(steps_run.timesteps))
    dec_in, _, _ = _single(dec, "VAE decoder")
    t = time.perf_counter()
    decoded = next(iter(dec.run({dec_in: x}).values()))
    timings["vae_decoder"] = time.perf_counter() - t
    picture = images.to_uint8(decoded)
    timings["end_to_end"] = time.perf_counter() - t0
    return GenerateResult(image=picture, latents=x, timings=timings, peak_rss=peak_rss_bytes(),
                          task=task or "none", sampler=steps_run.name,
                          timesteps=[float(v) for v in steps_run.timesteps])


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports kilobytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def format_timings(result: GenerateResult) -> str:
    """The per-stage latency table (as the paper's Tables 2/3) and the peak RSS."""
    rows: list[tuple[str, float]] = []
    t: Mapping[str, float] = result.timings
    if "vae_encoder" in t:
        rows.append(("VAE encoder", t["vae_encoder"]))
    steps = len(result.timesteps)
    for i in range(steps):
        rows.append((f"U-Net step {i + 1} (t={result.timesteps[i]:g})", t[f"unet_step_{i + 1}"]))
    rows += [(f"U-Net per step (mean of {steps})", t["unet_per_step"]), (f"U-Net x {steps}", t["unet"]),
             ("VAE decoder", t["vae_decoder"]), ("end to end", t["end_to_end"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'stage':<{width}}  {'ms':>9}"]
    lines += [f"{name:<{width}}  {sec * 1e3:9.2f}" for name, sec in rows]
    lines.append(f"{'(session load, not above)':<{width}}  {t.get('load', 0.0) * 1e3:9.2f}")
    lines.append(f"peak RSS {result.peak_rss / 2**20:.1f} MiB; task {result.task}, sampler {result.sampler}")
    return "\n".join(lines)
