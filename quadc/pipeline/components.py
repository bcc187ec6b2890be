"""Compile the VAE encoder and decoder beside the U-Net: the same target, no LoRA, their own calibration.

A component graph (``quadc export --component vae-encoder|vae-decoder``) goes through the target's own
pipeline (for ``onnx-qdq``: ``float,qdq``, W8A16 as the U-Net) with an empty LoRA set, and is written as
a sub-artifact ``OUT/vae_encoder/`` / ``OUT/vae_decoder/`` (its own ``manifest.json`` and graph, which
:class:`quadc.runtime.engine.Engine` runs). The U-Net's ``manifest.json`` lists every component with its
folder and ROM bytes (:func:`components_entry`).

Calibration (:func:`calibration_images`): the encoder sees the two held-out photographs bundled in
``quadc/data/demo`` (``chelsea.png``, ``motorcycle.png``) resized to its input, each as is, mirrored,
upside down, in grey, colour-inverted and contrast-stretched (12 images, none of them a task's demo
source); the decoder sees what the float encoder makes of them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from quadc.artifact import MANIFEST_NAME, read_manifest
from quadc.errors import QuadcError
from quadc.graph import model_sha256

#: Component name -> sub-folder of the artifact.
COMPONENT_DIRS = {"vae-encoder": "vae_encoder", "vae-decoder": "vae_decoder"}
#: Photos the VAE is calibrated on (bundled, held out from training, not a demo task's source).
CALIBRATION_PHOTOS = ("chelsea.png", "motorcycle.png")


def bundled_components() -> dict[str, Path]:
    """The bundled tiny VAE encoder and decoder (component name -> ONNX file)."""
    data = Path(str(resources.files("quadc") / "data"))
    return {"vae-encoder": data / "tiny_vae_encoder.onnx", "vae-decoder": data / "tiny_vae_decoder.onnx"}


def calibration_images(size: tuple[int, int]) -> list[np.ndarray]:
    """Calibration images ``[1, 3, H, W]`` in [-1, 1] (see the module docstring), ``size`` = (H, W)."""
    from PIL import Image

    demo = Path(str(resources.files("quadc") / "data" / "demo"))
    images = []
    for name in CALIBRATION_PHOTOS:
        with Image.open(demo / name) as img:
            rgb = np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC),
                             dtype=np.float32) / 255.0
        grey = np.repeat(rgb.mean(axis=2, keepdims=True), 3, axis=2)
        lo, hi = np.percentile(rgb, 2), np.percentile(rgb, 98)
        stretched = np.clip((rgb - lo) / max(hi - lo, 1e-3), 0.0, 1.0)
        for variant in (rgb, rgb[:, ::-1], rgb[::-1], grey, 1.0 - rgb, stretched):
            images.append(np.ascontiguousarray(variant.transpose(2, 0, 1)[None] * 2.0 - 1.0, dtype=np.float32))
    return images


def _single_input(path: Path) -> tuple[str, list[int], str]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inputs = sess.get_inputs()
    if len(inputs) != 1 or not all(isinstance(d, int) for d in inputs[0].shape):
        raise QuadcError(f"{path}: a VAE component must have one input of static shape (export it with "
                         "quadc export --component)")
    return inputs[0].name, list(inputs[0].shape), sess.get_outputs()[0].name


def component_feeds(components: Mapping[str, Path]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Calibration feeds per component: images for the encoder, their float latents for the decoder."""
    import onnxruntime as ort

    enc = components.get("vae-encoder")
    dec = components.get("vae-decoder")
    if dec is not None and enc is None:
        raise QuadcError("the VAE decoder is calibrated on the encoder's latents; give the VAE encoder too")
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    if enc is None:
        return feeds
    name, shape, _ = _single_input(enc)
    if len(shape) != 4 or shape[1] != 3:
        raise QuadcError(f"{enc}: the VAE encoder's input must be an image [1, 3, H, W], got {shape}")
    images = calibration_images((shape[2], shape[3]))
    feeds["vae-encoder"] = [{name: img} for img in images]
    if dec is not None:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(enc), so, providers=["CPUExecutionProvider"])
        dname, dshape, _ = _single_input(dec)
        latents = [sess.run(None, {name: img})[0] for img in images]
        if list(latents[0].shape) != dshape:
            raise QuadcError(f"{dec}: the decoder takes {dshape} but the encoder makes {list(latents[0].shape)}; "
                             "give the encoder and decoder of one VAE")
        feeds["vae-decoder"] = [{dname: z} for z in latents]
    return feeds


def compile_component(component: str, model: Path, feeds: list[dict[str, np.ndarray]], target_name: str,
                      target_options: Mapping[str, Any], out: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """Compile one component graph through ``target_name``'s pipeline into ``out`` (no LoRA); returns its
    manifest."""
    from quadc.compiler import _target_context, _write_artifact, build_pipeline
    from quadc.context import CompileContext
    from quadc.frontend.model_info import ModelInfo
    from quadc.graph import load_model
    from quadc.passes import run_pipeline
    from quadc.targets import get_target

    target = get_target(target_name, dict(target_options))
    with tempfile.TemporaryDirectory(prefix="quadc-calib-") as calib:
        for i, feed in enumerate(feeds):
            np.savez(Path(calib) / f"{i:03d}.npz", **feed)
        pipeline = build_pipeline(target, None, {})
        if "quant-plan" in pipeline.names:
            pipeline.set_options("quant-plan", calib_dir=calib)
        progress(f"{component}: loading {model}")
        graph = load_model(model)
        ctx = CompileContext(model_info=ModelInfo(), progress=progress)
        _target_context(ctx, target)
        try:
            graph, records = run_pipeline(graph, pipeline.build(), ctx)
            out.mkdir()
            return _write_artifact(target, graph, ctx, out, model, records)
        except QuadcError as exc:
            raise QuadcError(f"{component}: {exc}") from None


def check_components(components: Mapping[str, str | os.PathLike[str]]) -> dict[str, Path]:
    """The component files, refused in one line (before any long work) when a name is unknown, a file is
    missing or the decoder comes without the encoder it is calibrated from."""
    unknown = [c for c in components if c not in COMPONENT_DIRS]
    if unknown:
        raise QuadcError(f"unknown component '{unknown[0]}'; compile takes {', '.join(COMPONENT_DIRS)}")
    paths = {c: Path(p) for c, p in components.items()}
    for name, path in paths.items():
        if not path.is_file():
            raise QuadcError(f"{path}: no such {name} file; export it with quadc export --component {name}")
    if "vae-decoder" in paths and "vae-encoder" not in paths:
        raise QuadcError("the VAE decoder is calibrated on the encoder's latents; give --vae-encoder too")
    return paths


def compile_components(components: Mapping[str, str | os.PathLike[str]], target_name: str,
                       target_options: Mapping[str, Any], out_dir: Path, progress: Callable[[str], None], *,
                       required: bool = True) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Compile each VAE component into ``out_dir/<folder>``; returns the manifest entries per component and,
    unless ``required`` (then any failure is raised), the components the target refused and why."""
    paths = check_components(components)
    feeds = component_feeds(paths)
    entries: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name, path in paths.items():
        folder = COMPONENT_DIRS[name]
        try:
            manifest = compile_component(name, path, feeds[name], target_name, target_options, out_dir / folder,
                                         progress)
        except QuadcError as exc:
            if required:
                raise
            shutil.rmtree(out_dir / folder, ignore_errors=True)
            skipped[name] = str(exc)
            progress(f"skipping the {name} for target {target_name}: {exc}")
            continue
        entries[name] = {"dir": folder, "manifest": f"{folder}/{MANIFEST_NAME}",
                         "rom_bytes": int(manifest["shared_rom_bytes"]),
                         "source": {"model": path.name, "sha256": model_sha256(path)}}
    return entries, skipped


def components_entry(unet_manifest: Mapping[str, Any], others: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``components`` entry of the U-Net's manifest: the U-Net (shared graph, all tasks' LoRA bytes) and
    the others."""
    lora = sum(int(t.get("lora_rom_bytes", 0)) for t in unet_manifest.get("tasks", {}).values())
    unet = {"dir": ".", "rom_bytes": int(unet_manifest.get("shared_rom_bytes", 0)), "lora_rom_bytes": lora}
    return {"unet": unet, **{k: dict(v) for k, v in others.items()}}


def component_dir(artifact_dir: str | os.PathLike[str], component: str,
                  manifest: Mapping[str, Any] | None = None) -> Path:
    """The folder of ``component`` inside a compiled artifact (its manifest checked to lie inside it)."""
    from quadc.artifact import artifact_file

    manifest = manifest if manifest is not None else read_manifest(artifact_dir)
    entry = manifest.get("components", {}).get(component)
    if entry is None:
        raise QuadcError(f"{artifact_dir}: the artifact has no {component}; compile it with the VAE "
                         "(quadc compile without MODEL, or --vae-encoder/--vae-decoder)")
    path = artifact_file(artifact_dir, entry.get("manifest"), what=f"{component} manifest")
    return path.parent
