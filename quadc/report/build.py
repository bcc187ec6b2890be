"""What ``quadc report`` measures: per task the quantized image pipeline against the float one on the same
seeds (PSNR/SSIM of decoded images, SQNR of the final latents), ROM, peak RAM, per-stage latency; the
per-layer SQNR of each task's LoRA under the shared encodings; the W8A8:W8A16 ablation curve.

The image pipeline is ``quadc.pipeline.generate.generate`` unless another callable with its signature
is given (``generate(artifact_dir, task, *, sampler, steps, seed)`` returning an object with ``image``
(uint8 HxWx3), ``latents``, ``timings`` (stage -> seconds) and ``peak_rss`` (bytes)).
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quadc.artifact import artifact_file, read_manifest
from quadc.errors import QuadcError
from quadc.report.metrics import latent_sqnr_db, psnr_db, ssim

DEFAULT_ABLATION = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class TaskResult:
    """One task's runs, one entry per seed; the float fields are empty without a float artifact."""

    task: str
    seeds: list[int]
    images: list[np.ndarray]
    float_images: list[np.ndarray] = field(default_factory=list)
    psnr_db: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    latent_sqnr_db: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> median seconds (quantized)


@dataclass
class ReportData:
    """Everything the page shows."""

    artifact: Path
    float_artifact: Path | None
    manifest: dict[str, Any]
    sampler: str
    steps: int
    tasks: list[TaskResult]
    peak_rss_bytes: int
    lora_layer_sqnr: dict[str, dict[str, float]]  # task -> LoRA module -> dB
    ablation: list[tuple[float, float]]  # (fraction of activations at 8 bits, U-Net output SQNR dB)
    notes: list[str] = field(default_factory=list)

    @property
    def shared_rom_bytes(self) -> int:
        return int(self.manifest.get("shared_rom_bytes", 0))

    def task_rom_bytes(self, task: str) -> int:
        return int(self.manifest.get("tasks", {}).get(task, {}).get("lora_rom_bytes", 0))


def _default_generate() -> Callable[..., Any]:
    try:
        from quadc.pipeline.generate import generate
    except ImportError:
        raise QuadcError("quadc report needs the image pipeline (quadc.pipeline.generate), which this "
                         "installation lacks") from None
    return generate


def _pipeline_runner(generate: Callable[..., Any] | None, artifact: Path) -> Callable[..., Any]:
    """``run(task, seed, sampler, steps)`` for one artifact: the real pipeline keeps its sessions loaded
    across calls (one U-Net engine, tasks switched by binding); an injected ``generate`` is called as is."""
    if generate is not None:
        return lambda task, **kw: generate(artifact, task, **kw)
    real = _default_generate()
    from quadc.pipeline.generate import LoadedPipeline

    pipe = LoadedPipeline(artifact)
    return lambda task, **kw: real(artifact, task, engine=pipe, **kw)


#: Per-stage timing keys left out of the latency table (each step's own time; the per-step mean stays).
_STEP_KEY = re.compile(r"unet_step_\d+$")


def _run_pipeline(run: Callable[..., Any], tasks: Sequence[str], seeds: Sequence[int], sampler: str,
                  steps: int, prompt_embeds: Any = None) -> tuple[dict[str, list[Any]], int]:
    """Every (task, seed) through one pipeline; results per task and the largest peak RSS seen."""
    out: dict[str, list[Any]] = {}
    peak = 0
    extra = {"prompt_embeds": prompt_embeds} if prompt_embeds is not None else {}
    for task in tasks:
        for seed in seeds:
            res = run(task, sampler=sampler, steps=steps, seed=seed, **extra)
            out.setdefault(task, []).append(res)
            peak = max(peak, int(getattr(res, "peak_rss", 0) or 0))
    return out, peak


def _task_result(task: str, seeds: Sequence[int], quant: list[Any], flt: list[Any] | None) -> TaskResult:
    result = TaskResult(task, list(seeds), [np.asarray(q.image) for q in quant])
    stages: dict[str, list[float]] = {}
    for q in quant:
        for stage, seconds in dict(q.timings).items():
            if not _STEP_KEY.match(stage):
                stages.setdefault(stage, []).append(float(seconds))
    result.timings = {stage: statistics.median(v) for stage, v in stages.items()}
    for q, f in zip(quant, flt or [], strict=False):
        result.float_images.append(np.asarray(f.image))
        result.psnr_db.append(psnr_db(f.image, q.image))
        result.ssim.append(ssim(f.image, q.image))
        result.latent_sqnr_db.append(latent_sqnr_db(f.latents, q.latents))
    return result


def lora_layer_sqnr(artifact: Path, float_artifact: Path, tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per task and LoRA module: SQNR (dB) of the task's float LoRA tensors (the float artifact's task file)
    against the quantized artifact's stored integers dequantized with the shared slot encodings (A and B
    of the module together)."""
    from quadc.lora.pack import read_packed
    from quadc.quant.affine import dequantize, sqnr_db_from_sums
    from quadc.quant.encodings import read_encodings

    manifest, fmanifest = read_manifest(artifact), read_manifest(float_artifact)
    if "encodings" not in manifest:
        return {}
    encodings = read_encodings(artifact_file(artifact, manifest["encodings"], what="encodings"))
    modules = {side["name"]: slot["module"] for slot in manifest.get("lora_slots", [])
               for side in (slot["down"], slot["up"])}
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        files = manifest["tasks"][task]["files"], fmanifest["tasks"][task]["files"]
        quant = read_packed(artifact_file(artifact, files[0]["safetensors"]["path"], what="task file"))
        ref = read_packed(artifact_file(float_artifact, files[1]["safetensors"]["path"], what="task file"))
        sums: dict[str, list[float]] = {}
        for name, q in quant.items():
            enc = encodings.get(name)
            if enc is None or name not in ref or np.asarray(q).dtype.kind not in "iu":
                continue
            r = np.asarray(ref[name], np.float64)
            d = dequantize(q, enc).astype(np.float64)
            acc = sums.setdefault(modules.get(name, name), [0.0, 0.0])
            acc[0] += float(np.sum(r * r))
            acc[1] += float(np.sum((r - d) ** 2))
        out[task] = {m: sqnr_db_from_sums(s, n) for m, (s, n) in sorted(sums.items())}
    return out


def a8_ablation(model: Path, manifest: Mapping[str, Any], fractions: Sequence[float], *, n_feeds: int = 4,
                progress: Callable[[str], None] | None = None) -> list[tuple[float, float]]:
    """The W8A8:W8A16 curve: ``model`` (no LoRA) compiled for ``onnx-qdq`` with each fraction of its
    activations at 8 bits (``quant-plan.a8_fraction``), and the SQNR (dB) of its output against the float
    model on held-out inputs."""
    import onnxruntime as ort

    from quadc.compiler import CompileOptions, compile_model
    from quadc.eval.targets_summary import held_out_feeds
    from quadc.quant.affine import sqnr_db_from_sums
    from quadc.runtime.engine import Engine

    feeds = held_out_feeds(manifest, n_feeds)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref_session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in ref_session.get_inputs()}
    refs = [ref_session.run(None, {k: v for k, v in f.items() if k in names})[0] for f in feeds]
    curve = []
    with tempfile.TemporaryDirectory(prefix="quadc-report-") as tmp:
        for fraction in fractions:
            if progress:
                progress(f"a8 ablation: compiling with a8_fraction={fraction}")
            out = Path(tmp) / f"a8-{fraction}"
            compile_model(str(model), out, CompileOptions(target="onnx-qdq",
                                                          pass_options={"quant-plan": {"a8_fraction": float(fraction)}}))
            engine = Engine(out)
            signal = noise = 0.0
            for feed, ref in zip(feeds, refs, strict=True):
                got = engine.run(feed, task=None)[engine.output_names[0]].astype(np.float64)
                signal += float(np.sum(ref.astype(np.float64) ** 2))
                noise += float(np.sum((ref - got) ** 2))
            curve.append((float(fraction), sqnr_db_from_sums(signal, noise)))
            engine.close()
    return curve


def _source_model(manifest: Mapping[str, Any], model: str | os.PathLike[str] | None) -> Path | None:
    """The float source model for the ablation: ``model``, or the bundled U-Net when the artifact was
    compiled from it (same sha256), else None."""
    if model is not None:
        path = Path(model)
        if not path.is_file():
            raise QuadcError(f"source model {path} does not exist")
        return path
    from quadc.compiler import bundled_model
    from quadc.graph import model_sha256

    bundled = bundled_model()
    if bundled.is_file() and manifest.get("source", {}).get("sha256") == model_sha256(bundled):
        return bundled
    return None


def build_report(artifact: str | os.PathLike[str], float_artifact: str | os.PathLike[str] | None = None, *,
                 tasks: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1), sampler: str = "lcm",
                 steps: int = 4, model: str | os.PathLike[str] | None = None,
                 ablation: Sequence[float] = DEFAULT_ABLATION, generate: Callable[..., Any] | None = None,
                 prompt_embeds: Any = None, progress: Callable[[str], None] | None = None) -> ReportData:
    """Measure everything the report shows (see the module docstring). ``tasks``: default every task of
    the artifact; ``model``: the float source for the ablation (default: the bundled U-Net if the
    artifact came from it; without one the curve is left out and a note says why); ``prompt_embeds``: a
    ``.npy`` path or array every picture is conditioned on (default: the bundled prompts, which fit only
    U-Nets of the bundled text shape)."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    fart = Path(float_artifact) if float_artifact is not None else None
    known = list(manifest.get("tasks", {}))
    if fart is not None:
        missing = [t for t in known if t not in read_manifest(fart).get("tasks", {})]
        if missing:
            raise QuadcError(f"the float artifact {fart} lacks task(s) {', '.join(missing)} of {artifact}")
    names = list(tasks) if tasks is not None else known
    for t in names:
        if t not in known and t != "none":
            raise QuadcError(f"unknown task '{t}'; this artifact has: {', '.join(known) or 'no tasks'}")
    if not seeds:
        raise QuadcError("the report needs at least one seed")
    if generate is None:
        _default_generate()  # a missing pipeline is refused before any work
    # The quantized pipeline runs alone first, so the peak RSS it reports is its own.
    if progress:
        progress(f"report: quantized pipeline, {len(names)} task(s) x {len(seeds)} seed(s)")
    quant, peak = _run_pipeline(_pipeline_runner(generate, artifact), names, seeds, sampler, steps, prompt_embeds)
    flt: dict[str, list[Any]] = {}
    if fart is not None:
        if progress:
            progress("report: float pipeline on the same seeds")
        flt, _ = _run_pipeline(_pipeline_runner(generate, fart), names, seeds, sampler, steps, prompt_embeds)
    results = [_task_result(t, seeds, quant[t], flt.get(t)) for t in names]
    notes: list[str] = []
    layers = lora_layer_sqnr(artifact, fart, [t for t in names if t != "none"]) if fart is not None else {}
    if fart is None:
        notes.append("no float artifact given (--float): quality columns and LoRA layer SQNR are left out")
    curve: list[tuple[float, float]] = []
    source = _source_model(manifest, model) if ablation else None
    if ablation and source is None:
        notes.append("the W8A8:W8A16 curve needs the float source model (--model): left out")
    elif source is not None:
        curve = a8_ablation(source, manifest, ablation, progress=progress)
    return ReportData(artifact, fart, manifest, sampler, steps, results, peak, layers, curve, notes)
