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
from quadc.lora.pack import check_max_saturation, task_saturations
from quadc.passes import PassPipeline, run_pipeline
from quadc.passes.pipeline import check_prerequisites
from quadc.paths import check_task_names
from quadc.targets import Target, get_target


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
    """Options of one compile; the CLI maps its flags onto these one to one.

    ``passes`` replaces the target's pipeline (pass and preset names); ``pass_options`` sets declared
    options per pass name (``{"quant-plan": {"precision": "w8a8"}}``), checked against each pass's
    declaration; a pass named there must be in the pipeline.
    """

    target: str = "onnx"
    loras: Mapping[str, str | os.PathLike[str]] = field(default_factory=dict)
    passes: str | Sequence[str] | None = None
    pass_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    verify: str = "none"
    print_after: Sequence[str] = ()
    force: bool = False
    #: Refuse the compile (nothing written) when a task saturates more than this fraction of its LoRA
    #: values under the shared encodings; None = only report it.
    max_saturation: float | None = None


def _check_saturation_limit(value: float | None) -> None:
    """A QuadcError unless ``value`` is None or a fraction in [0, 1]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise QuadcError(f"max_saturation must be a fraction between 0 and 1, got {value!r}")


def build_pipeline(target: Target, passes: str | Sequence[str] | None,
                   pass_options: Mapping[str, Mapping[str, Any]]) -> PassPipeline:
    """The target's pipeline (or the user's ``passes``) with ``pass_options`` set and checked."""
    pipeline = PassPipeline.parse(passes) if passes is not None else target.pipeline()
    for name, values in pass_options.items():
        if values:
            pipeline.set_options(name, **values)
    return pipeline


def compile_model(model: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str],
                  options: CompileOptions | None = None,
                  progress: Callable[[str], None] = silent_progress) -> dict[str, Any]:
    """Compile ``model`` (default: the bundled tiny U-Net) into ``out_dir``; returns the manifest."""
    options = options or CompileOptions()
    check_output_dir(out_dir, force=options.force)
    _check_saturation_limit(options.max_saturation)
    target = get_target(options.target)
    # The pipeline is built and its options checked before loading, so mistakes fail before long work.
    pipeline = build_pipeline(target, options.passes, options.pass_options)
    unknown = set(options.print_after) - set(pipeline.names)
    if unknown:
        raise QuadcError(f"--print-after names {', '.join(sorted(unknown))}, which is not in the pipeline")
    target.check_pipeline(pipeline.names, with_loras=bool(options.loras) or model is None)
    passes = pipeline.build()
    check_prerequisites(passes)
    graph, ctx, model_path = prepare(model, options.loras, progress)
    ctx.options.setdefault("target", target.name)
    graph, records = run_pipeline(graph, passes, ctx, verify=options.verify, print_after=options.print_after)
    if options.max_saturation is not None:
        # Checked before anything is written (a quantizing pipeline has planned the shared encodings).
        check_max_saturation(task_saturations(ctx), options.max_saturation)
    progress(f"writing {out_dir}")
    with staged_directory(out_dir, force=options.force) as tmp:
        entries = target.emit(graph, ctx, tmp)
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "quadc_version": quadc.__version__,
            "target": target.name,
            "source": {"model": model_path.name, "sha256": model_sha256(model_path)},
            "passes": [{"pass": r.name, "changed": r.changed, "counts": r.counts, "options": r.options}
                       for r in records],
            "inputs": {t.name: {"dtype": str(t.dtype), "shape": list(t.shape or [])} for t in graph.inputs},
            "outputs": {t.name: {"dtype": str(t.dtype), "shape": list(t.shape or [])} for t in graph.outputs},
        }
        manifest.update(entries)
        write_json(tmp / MANIFEST_NAME, manifest)
    for r in records:
        progress(f"  {r.name:<16} {r.seconds * 1000:9.1f} ms  {r.counts}")
    return manifest


def prepare(model: str | os.PathLike[str] | None, loras: Mapping[str, str | os.PathLike[str]],
            progress: Callable[[str], None] = silent_progress) -> tuple[Any, CompileContext, Path]:
    """Load the model (default: bundled) and its LoRAs (default with the bundled model: the bundled
    LoRAs) into a graph and a :class:`CompileContext`; returns (graph, ctx, model path)."""
    from quadc import frontend

    model_path = Path(model) if model is not None else bundled_model()
    paths = dict(loras) if (model is not None or loras) else {k: str(v) for k, v in bundled_loras().items()}
    check_task_names(paths)  # task names become file names: refuse unsafe ones before any work
    progress(f"loading {model_path}")
    graph, info = frontend.load(model_path)
    ctx = CompileContext(model_info=info, progress=progress)
    if paths:
        ctx.loras = _read_loras(paths, info, progress)
    return graph, ctx, model_path


def _read_loras(paths: Mapping[str, str | os.PathLike[str]], info: Any, progress: Callable[[str], None]) -> Any:
    from quadc.lora import LoRASet, fit_lora, read_lora

    loras = LoRASet()
    for name, path in paths.items():
        progress(f"reading LoRA '{name}' from {path}")
        loras.add(fit_lora(read_lora(path, name=name, info=info), info))
    return loras
