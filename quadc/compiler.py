"""The compile driver: frontend -> LoRA set -> target pipeline -> target.emit -> artifact directory.

Every stage reads and returns plain objects; this module only wires them together and writes the
manifest. The artifact is staged in a temporary directory and renamed into place when complete.
:func:`compile_all` (``--target all``) builds every available target from one load, one run of the
passes they share and one calibration per distinct graph.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
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
from quadc.quant.calibrate import clone_graph
from quadc.targets import Target, discover_targets, get_target


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
    #: Declared options per target name (``{"qnn": {"htp_arch": "73"}}``), checked against the target's.
    target_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    verify: str = "none"
    print_after: Sequence[str] = ()
    force: bool = False
    #: Refuse the compile (nothing written) when a task saturates more than this fraction of its LoRA
    #: values under the shared encodings; None = only report it.
    max_saturation: float | None = None
    #: Pipeline components compiled beside the U-Net (``{"vae-encoder": path, "vae-decoder": path}``,
    #: :mod:`quadc.pipeline.components`); None = the bundled VAE when compiling the bundled U-Net, else none.
    components: Mapping[str, str | os.PathLike[str]] | None = None


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
        if values and name not in pipeline.names and passes is None:
            # The usual cause: a quantization flag (--calib-random, --precision, ...) on the float target.
            raise QuadcError(f"option(s) {', '.join(sorted(values))} of pass '{name}' were given, but target "
                             f"'{target.name}' does not run that pass ({pipeline}); use a target that does "
                             "(`quadc targets`), e.g. onnx-qdq for the quantization options")
        if values:
            pipeline.set_options(name, **values)
    return pipeline


def _input_paths(model: str | os.PathLike[str] | None, options: CompileOptions) -> list[str | os.PathLike[str]]:
    """The files a compile reads, which ``--force`` must never replace."""
    return [p for p in (model, *options.loras.values(), *(options.components or {}).values()) if p is not None]


def compile_model(model: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str],
                  options: CompileOptions | None = None,
                  progress: Callable[[str], None] = silent_progress) -> dict[str, Any]:
    """Compile ``model`` (default: the bundled tiny U-Net) into ``out_dir``; returns the manifest.

    ``options.target == "all"`` compiles every available target instead (:func:`compile_all`) and
    returns the index it writes.
    """
    options = options or CompileOptions()
    if options.target == ALL_TARGETS:
        return compile_all(model, out_dir, options, progress)
    check_output_dir(out_dir, force=options.force, inputs=_input_paths(model, options))
    _check_saturation_limit(options.max_saturation)
    if options.components:
        from quadc.pipeline.components import check_components

        check_components(options.components)
    target = get_target(options.target, dict(options.target_options.get(options.target, {})))
    ok, why = target.available()
    if not ok:
        raise QuadcError(f"target '{target.name}' is not available here: {why}")
    _check_target_options(options, [target.name])
    # The pipeline is built and its options checked before loading, so mistakes fail before long work.
    pipeline = build_pipeline(target, options.passes, options.pass_options)
    unknown = set(options.print_after) - set(pipeline.names)
    if unknown:
        raise QuadcError(f"--print-after names {', '.join(sorted(unknown))}, which is not in the pipeline")
    target.check_pipeline(pipeline.names, with_loras=bool(options.loras) or model is None)
    target.check_plan_options(_plan_options(pipeline))
    passes = pipeline.build()
    check_prerequisites(passes)
    graph, ctx, model_path = prepare(model, options.loras, progress)
    target.check_model(graph)
    _target_context(ctx, target)
    graph, records = run_pipeline(graph, passes, ctx, verify=options.verify, print_after=options.print_after)
    if options.max_saturation is not None:
        # Checked before anything is written (a quantizing pipeline has planned the shared encodings).
        check_max_saturation(task_saturations(ctx), options.max_saturation)
    progress(f"writing {out_dir}")
    with staged_directory(out_dir, force=options.force) as tmp:
        manifest = _write_artifact(target, graph, ctx, tmp, model_path, records)
        _add_components(model, options, target, tmp, manifest, progress)
    _report_records(records, progress)
    return manifest


#: ``--target all``: every available target from one source, calibration and shared passes.
ALL_TARGETS = "all"
#: Passes whose result depends on the target (the encoding scheme it derives in): they never join the
#: prefix that ``compile_all`` runs once; their calibration is shared through ``ctx.calibrations``.
TARGET_DEPENDENT_PASSES = ("quant-plan",)
INDEX_NAME = "targets.json"


def compile_all(model: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str],
                options: CompileOptions | None = None,
                progress: Callable[[str], None] = silent_progress) -> dict[str, Any]:
    """Compile every available target into ``out_dir/<target>/`` from one load and one calibration.

    Each target's pipeline is built as for a single compile (``pass_options`` apply to the targets whose
    pipeline has that pass; ``target_options`` per target name). The longest prefix of steps (pass and
    options) that every pipeline shares, up to the first target-dependent pass (``quant-plan``), runs
    once; then each target runs the rest of its pipeline on its own copy of the graph and context. All
    copies share one :class:`~quadc.quant.calibration_cache.CalibrationCache`, so a graph is calibrated
    once however many targets derive encodings from it. Each ``out_dir/<target>`` holds exactly the bytes
    a separate ``compile_model`` of that target writes. ``out_dir/targets.json`` lists the targets, the
    shared passes, the skipped targets (not installed) and how many calibrations ran; it is returned.
    """
    options = options or CompileOptions()
    if options.passes is not None:
        raise QuadcError("--passes sets one pipeline; with --target all every target uses its own (compile one "
                         "target to change its pipeline)")
    check_output_dir(out_dir, force=options.force, inputs=_input_paths(model, options))
    _check_saturation_limit(options.max_saturation)
    if options.components:
        from quadc.pipeline.components import check_components

        check_components(options.components)
    targets, skipped = _available_targets(options, progress)
    _check_target_options(options, list(targets))
    pipelines = {name: _target_pipeline(t, options) for name, t in targets.items()}
    _check_all_options(options, pipelines)
    with_loras = bool(options.loras) or model is None
    for name, target in targets.items():
        target.check_pipeline(pipelines[name].names, with_loras=with_loras)
        target.check_plan_options(_plan_options(pipelines[name]))
    passes = {name: p.build() for name, p in pipelines.items()}
    for built in passes.values():
        check_prerequisites(built)
    shared = _shared_prefix(pipelines)
    graph, ctx, model_path = prepare(model, options.loras, progress)
    for name, target in list(targets.items()):
        try:
            target.check_model(graph)
        except QuadcError as exc:  # e.g. an NPU target and a model with symbolic shapes: the others still compile
            progress(f"skipping target {name}: {exc}")
            skipped[name] = str(exc)
            del targets[name]
    progress(f"shared passes: {','.join(pipelines[next(iter(pipelines))].names[:shared]) or 'none'}")
    first = next(iter(passes.values()))
    graph, shared_records = run_pipeline(graph, first[:shared], ctx, verify=options.verify,
                                         print_after=[p for p in options.print_after
                                                      if p in {q.name for q in first[:shared]}])
    source_sha256 = model_sha256(model_path)  # once: every target's manifest records the same source
    index: dict[str, Any] = {"format_version": FORMAT_VERSION, "quadc_version": quadc.__version__,
                             "source": {"model": model_path.name, "sha256": source_sha256},
                             "shared_passes": [r.name for r in shared_records], "targets": {}, "skipped": skipped}
    with staged_directory(out_dir, force=options.force) as tmp:
        for name, target in targets.items():
            progress(f"target {name}")
            tgraph, tctx = _fork_graph(graph), _fork_context(ctx)
            _target_context(tctx, target)
            tgraph, records = run_pipeline(tgraph, passes[name][shared:], tctx, verify=options.verify,
                                           print_after=[p for p in options.print_after
                                                        if p in {q.name for q in passes[name][shared:]}])
            if options.max_saturation is not None:
                check_max_saturation(task_saturations(tctx), options.max_saturation)
            (tmp / name).mkdir()
            manifest = _write_artifact(target, tgraph, tctx, tmp / name, model_path, [*shared_records, *records],
                                       source_sha256=source_sha256)
            _add_components(model, options, target, tmp / name, manifest, progress)
            index["targets"][name] = {"dir": name, "manifest": f"{name}/{MANIFEST_NAME}",
                                      "shared_rom_bytes": manifest.get("shared_rom_bytes"),
                                      "passes": [r.name for r in records]}
            _report_records(records, progress, prefix=f"{name}: ")
            del tgraph, tctx
        index["calibrations"] = ctx.calibrations.runs
        write_json(tmp / INDEX_NAME, index)
    _report_records(shared_records, progress, prefix="shared: ")
    progress(f"{len(targets)} target(s) from {ctx.calibrations.runs} calibration(s)")
    return index


def _available_targets(options: CompileOptions,
                       progress: Callable[[str], None]) -> tuple[dict[str, Target], dict[str, str]]:
    """Instances of every installed target whose requirements are met, and why the others are skipped."""
    targets: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    for name, cls in discover_targets().items():
        ok, why = cls.available()
        if not ok:
            skipped[name] = why
            progress(f"skipping target {name}: {why}")
            continue
        targets[name] = cls(**dict(options.target_options.get(name, {})))
    if not targets:
        raise QuadcError("no target is available; install quadc with its target extras")
    return targets, skipped


def _target_pipeline(target: Target, options: CompileOptions) -> PassPipeline:
    """``target``'s pipeline with the ``pass_options`` of the passes it has."""
    pipeline = target.pipeline()
    for name, values in options.pass_options.items():
        if values and name in pipeline.names:
            pipeline.set_options(name, **values)
    return pipeline


def _check_all_options(options: CompileOptions, pipelines: Mapping[str, PassPipeline]) -> None:
    names = {n for p in pipelines.values() for n in p.names}
    unknown = [n for n, v in options.pass_options.items() if v and n not in names]
    if unknown:
        raise QuadcError(f"options are set for pass '{unknown[0]}', which no target's pipeline has")
    missing = set(options.print_after) - names
    if missing:
        raise QuadcError(f"--print-after names {', '.join(sorted(missing))}, which no target's pipeline has")


def _check_target_options(options: CompileOptions, targets: Sequence[str]) -> None:
    unknown = [n for n, v in options.target_options.items() if v and n not in targets]
    if unknown:
        raise QuadcError(f"options are set for target '{unknown[0]}', which is not compiled here "
                         f"({', '.join(targets)})")


def _plan_options(pipeline: PassPipeline) -> dict[str, Any]:
    """The options set on the pipeline's ``quant-plan`` step (empty without one)."""
    return next((dict(s.options) for s in pipeline.steps if s.name == "quant-plan"), {})


def _shared_prefix(pipelines: Mapping[str, PassPipeline]) -> int:
    """How many leading steps (pass name and options) every pipeline shares, stopping before the first
    target-dependent pass."""
    steps = [p.steps for p in pipelines.values()]
    n = 0
    while all(len(s) > n for s in steps):
        head = steps[0][n]
        if head.name in TARGET_DEPENDENT_PASSES or any(
                s[n].name != head.name or s[n].options != head.options for s in steps[1:]):
            break
        n += 1
    return n


def _fork_graph(graph: Any) -> Any:
    """A copy of ``graph`` sharing its weights (:func:`quadc.quant.calibrate.clone_graph`) that also keeps
    what ``gs.Graph.copy`` drops (producer name and version), so it saves to the same bytes."""
    clone = clone_graph(graph)
    clone.producer_name = graph.producer_name
    clone.producer_version = graph.producer_version
    return clone


def _fork_context(ctx: CompileContext) -> CompileContext:
    """A copy of ``ctx`` a target may change without touching the others' (the model info, the LoRA set
    and the calibration cache stay shared)."""
    return replace(ctx, lora_slots=dict(ctx.lora_slots), plan=copy.deepcopy(ctx.plan),
                   unquantized=set(ctx.unquantized), options=dict(ctx.options), applied=list(ctx.applied),
                   stats=list(ctx.stats))


def _target_context(ctx: CompileContext, target: Target) -> None:
    """What the target tells the passes: its name and its encoding scheme."""
    ctx.options["target"] = target.name
    ctx.options["scheme"] = target.scheme


def _write_artifact(target: Target, graph: Any, ctx: CompileContext, out: Path, model_path: Path,
                    records: Sequence[Any], source_sha256: str | None = None) -> dict[str, Any]:
    """``target.emit`` into ``out`` and the manifest beside it; returns the manifest.

    The source's sha256 is computed on a second thread while ``emit`` writes (hashing and file reads
    release the GIL; the write mostly waits on the disk), so a full-size compile does not read the
    source's weights once more after writing; ``source_sha256``, when the caller has it (``--target all``:
    one digest for every target), is used as it is."""
    if source_sha256 is not None:
        entries, digest = target.emit(graph, ctx, out), source_sha256
    else:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(model_sha256, model_path)
            entries = target.emit(graph, ctx, out)
            digest = pending.result()
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "quadc_version": quadc.__version__,
        "target": target.name,
        "source": {"model": model_path.name, "sha256": digest},
        "passes": [{"pass": r.name, "changed": r.changed, "counts": r.counts, "options": r.options}
                   for r in records],
        "inputs": {t.name: {"dtype": str(t.dtype), "shape": list(t.shape or [])} for t in graph.inputs},
        "outputs": {t.name: {"dtype": str(t.dtype), "shape": list(t.shape or [])} for t in graph.outputs},
    }
    manifest.update(entries)
    write_json(out / MANIFEST_NAME, manifest)
    return manifest


def _add_components(model: str | os.PathLike[str] | None, options: CompileOptions, target: Target, out: Path,
                    manifest: dict[str, Any], progress: Callable[[str], None]) -> None:
    """Compile the pipeline components into ``out`` beside the U-Net and list them in its manifest.

    Components the user named must compile; the bundled VAE (the default with the bundled U-Net) is
    skipped with a progress line, and listed under ``components_skipped``, where the target refuses it."""
    from quadc.pipeline.components import bundled_components, compile_components, components_entry

    if options.components is not None:
        components, required = dict(options.components), True
    elif model is None:
        components, required = {k: v for k, v in bundled_components().items() if v.is_file()}, False
    else:
        return
    if not components:
        return
    target_options = options.target_options.get(target.name, {})
    entries, skipped = compile_components(components, target.name, target_options, out, progress, required=required)
    manifest["components"] = components_entry(manifest, entries)
    if skipped:
        manifest["components_skipped"] = skipped
    write_json(out / MANIFEST_NAME, manifest)


def _report_records(records: Sequence[Any], progress: Callable[[str], None], prefix: str = "") -> None:
    for r in records:
        progress(f"  {prefix}{r.name:<16} {r.seconds * 1000:9.1f} ms  {r.counts}")


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
        lora = read_lora(path, name=name, info=info)
        ignored = int(lora.meta.get("ignored_text_encoder_keys", 0))
        if ignored:
            progress(f"LoRA '{name}': {ignored} text-encoder tensor(s) left out: quadc compiles the U-Net part; the "
                     "text-encoder part belongs where the prompt embeddings are made")
        loras.add(fit_lora(lora, info))
    return loras
