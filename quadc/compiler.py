"""The compile driver: frontend -> LoRA set -> target pipeline -> target.emit -> artifact directory.

Every stage reads and returns plain objects; this module only wires them together and writes the
manifest. The artifact is staged in a temporary directory and renamed into place when complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import quadc
from quadc.artifact import FORMAT_VERSION, MANIFEST_NAME, check_output_dir, staged_directory, write_json
from quadc.context import CompileContext, silent_progress
from quadc.errors import QuadcError
from quadc.graph import model_sha256
from quadc.passes import parse_pipeline, run_pipeline
from quadc.targets import get_target


def bundled_model() -> Path:
    """Path of the bundled tiny SD1.5-architecture U-Net (the default model of ``quadc compile``)."""
    return Path(str(resources.files("quadc") / "data" / "tiny_unet.onnx"))


def bundled_loras() -> dict[str, Path]:
    """The bundled demo LoRAs (task name -> file or peft directory), in a fixed order."""
    root = Path(str(resources.files("quadc") / "data" / "loras"))
    if not root.is_dir():
        return {}
    return {p.name.split(".")[0]: p for p in sorted(root.iterdir()) if not p.name.startswith(("_", "."))}


@dataclass
class CompileOptions:
    """Options of one compile; the CLI maps its flags onto these one to one."""

    target: str = "onnx"
    loras: Mapping[str, str | os.PathLike[str]] = field(default_factory=dict)
    passes: str | Sequence[str] | None = None
    verify: str = "none"
    print_after: Sequence[str] = ()
    force: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def compile_model(model: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str],
                  options: CompileOptions | None = None,
                  progress: Callable[[str], None] = silent_progress) -> dict[str, Any]:
    """Compile ``model`` (default: the bundled tiny U-Net) into ``out_dir``; returns the manifest."""
    options = options or CompileOptions()
    check_output_dir(out_dir, force=options.force)
    target = get_target(options.target)
    # A user pipeline is parsed before loading, so unknown pass names fail before any long work.
    passes = parse_pipeline(options.passes) if options.passes is not None else None
    graph, ctx, model_path = prepare(model, options.loras, options.extra, progress)
    ctx.options.setdefault("target", target.name)
    if passes is None:
        passes = parse_pipeline(target.pipeline(ctx))
    unknown = set(options.print_after) - {p.name for p in passes}
    if unknown:
        raise QuadcError(f"--print-after names {', '.join(sorted(unknown))}, which is not in the pipeline")
    split = plan_point(passes)
    graph, records = run_pipeline(graph, passes[:split], ctx, verify=options.verify,
                                  print_after=[p for p in options.print_after if p in {q.name for q in passes[:split]}])
    if split < len(passes):
        from quadc.quant.planner import build_plan

        progress("planning quantization (calibration, QSS, shared LoRA encodings)")
        ctx.encodings = build_plan(graph, ctx)
        graph, more = run_pipeline(graph, passes[split:], ctx, verify=options.verify,
                                   print_after=[p for p in options.print_after
                                                if p in {q.name for q in passes[split:]}])
        records += more
    progress(f"writing {out_dir}")
    with staged_directory(out_dir, force=options.force) as tmp:
        entries = target.emit(graph, ctx, tmp)
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "quadc_version": quadc.__version__,
            "target": target.name,
            "source": {"model": model_path.name, "sha256": model_sha256(model_path)},
            "passes": [{"pass": r.name, "changed": r.changed, "counts": r.counts} for r in records],
            "inputs": {t.name: {"dtype": str(t.dtype), "shape": list(t.shape or [])} for t in graph.inputs},
            "outputs": {t.name: {"dtype": str(t.dtype), "shape": list(t.shape or [])} for t in graph.outputs},
        }
        manifest.update(entries)
        write_json(tmp / MANIFEST_NAME, manifest)
    for r in records:
        progress(f"  {r.name:<16} {r.seconds * 1000:9.1f} ms  {r.counts}")
    return manifest


def prepare(model: str | os.PathLike[str] | None, loras: Mapping[str, str | os.PathLike[str]],
            options: Mapping[str, Any], progress: Callable[[str], None] = silent_progress,
            ) -> tuple[Any, CompileContext, Path]:
    """Load the model (default: bundled) and its LoRAs (default with the bundled model: the bundled
    LoRAs) into a graph and a :class:`CompileContext`; returns (graph, ctx, model path)."""
    from quadc import frontend

    model_path = Path(model) if model is not None else bundled_model()
    paths = dict(loras) if (model is not None or loras) else {k: str(v) for k, v in bundled_loras().items()}
    progress(f"loading {model_path}")
    graph, info = frontend.load(model_path)
    ctx = CompileContext(model_info=info, options=dict(options), progress=progress)
    if paths:
        ctx.loras = _read_loras(paths, info, progress)
    return graph, ctx, model_path


def plan_point(passes: Sequence[Any]) -> int:
    """Index of the first pass that needs the quantization plan (len(passes) if none does)."""
    return next((i for i, p in enumerate(passes) if p.needs_encodings), len(passes))


def _read_loras(paths: Mapping[str, str | os.PathLike[str]], info: Any, progress: Callable[[str], None]) -> Any:
    from quadc.lora import LoRASet, fit_lora, read_lora

    loras = LoRASet()
    for name, path in paths.items():
        progress(f"reading LoRA '{name}' from {path}")
        loras.add(fit_lora(read_lora(path, name=name, info=info), info))
    return loras
