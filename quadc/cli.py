"""Command-line interface: argument parsing only; every command calls the library.

User mistakes (:class:`quadc.errors.QuadcError`) print one line and exit 2; ``--debug`` shows the
traceback. Internal bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quadc.context import silent_progress, stderr_progress
from quadc.errors import QuadcError
from quadc.paths import check_output_file


def _kv_pairs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in values or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise QuadcError(f"{flag} expects NAME=PATH, got '{item}'")
        if name in pairs:
            raise QuadcError(f"{flag} names task '{name}' twice; give each LoRA its own task name")
        pairs[name] = os.path.expanduser(path)  # the shell expands no ~ after NAME=
    return pairs


def cmd_compile(args: argparse.Namespace) -> int:
    from quadc.compiler import ALL_TARGETS, CompileOptions, compile_model

    pass_options, target_options = _split_options(args)
    options = CompileOptions(
        target=args.target,
        loras=_kv_pairs(args.lora, "--lora"),
        passes=args.passes,
        pass_options=pass_options,
        target_options=target_options,
        verify=args.verify,
        print_after=[p for item in args.print_after or [] for p in item.split(",") if p],
        force=args.force,
        max_saturation=args.max_saturation,
        components=_components(args),
    )
    progress = silent_progress if args.quiet else stderr_progress
    if args.align:
        from quadc.align.api import compile_aligned

        manifest = compile_aligned(args.model, args.output, options, _align_options(args, level=args.align),
                                   progress=progress)
        if not manifest:  # a data-parallel rank other than 0 writes nothing
            return 0
        print(f"wrote {args.output}.align (aligned LoRAs, encodings.json, report.json)")
    else:
        manifest = compile_model(args.model, args.output, options, progress=progress)
    if args.target == ALL_TARGETS:
        for name, entry in manifest["targets"].items():
            print(f"wrote {Path(args.output) / entry['dir']} (target {name})")
        for name, why in manifest.get("skipped", {}).items():
            print(f"skipped target {name}: {why}")
        print(f"{len(manifest['targets'])} target(s) from {manifest['calibrations']} calibration(s); "
              f"shared passes: {','.join(manifest['shared_passes']) or 'none'}")
        return 0
    tasks = ", ".join(manifest.get("tasks", {})) or "none"
    print(f"wrote {args.output} (target {manifest['target']}, tasks: {tasks})")
    return 0


def _components(args: argparse.Namespace) -> dict[str, str] | None:
    """``--vae-encoder``/``--vae-decoder``/``--no-vae`` as CompileOptions.components (None: the default)."""
    given = {k: v for k, v in (("vae-encoder", args.vae_encoder), ("vae-decoder", args.vae_decoder)) if v}
    if args.no_vae:
        if given:
            raise QuadcError("--no-vae contradicts --vae-encoder/--vae-decoder; give one or the other")
        return {}
    return given or None


def cmd_verify(args: argparse.Namespace) -> int:

    from quadc.eval.targets_summary import format_summary, verify_artifacts

    check_output_file(args.json)
    feeds = [_load_npz(p) for p in args.inputs] if args.inputs else None
    tasks = [t for item in args.task or [] for t in item.split(",") if t] or None
    report = verify_artifacts(args.artifact, feeds=feeds, n_inputs=args.random, seed=args.seed, tasks=tasks,
                              model=args.model, loras=_kv_pairs(args.lora, "--lora") or None)
    print(format_summary(report))
    if args.json:
        _write_report(args.json, report)
    return 0


def _write_report(path: str, report: object) -> None:
    """Write ``report`` as JSON at ``path`` in one step (a ``.partial`` file renamed), then say so."""
    from quadc.artifact import write_json
    from quadc.paths import replaced_atomically

    with replaced_atomically(path) as tmp:
        write_json(tmp, _strict_json(report))
    print(f"wrote {path}")


def _strict_json(value: object) -> object:
    """``value`` with every non-finite float as the string ``"inf"``, ``"-inf"`` or ``"nan"``: an exact
    match's SQNR is infinite, and JSON has no infinity (Python wrote ``Infinity``, which jq and
    JSON.parse refuse)."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    return value


def _align_options(args: argparse.Namespace, level: str) -> object:
    from quadc.align.api import AlignOptions

    values = {"level": level, "show_bar": not args.quiet}
    for name in ("steps", "batch", "lr", "patience", "eval_every", "feeds", "eval_feeds", "eval_dir", "rows", "data",
                 "data_weight", "loss", "warm_start", "equalize", "seed", "device", "threads"):
        value = getattr(args, f"align_{name}", None)
        if value is not None:
            values[name] = value
    return AlignOptions(**values)  # type: ignore[arg-type]


def cmd_align(args: argparse.Namespace) -> int:
    from quadc.errors import require_extra

    require_extra("torch", "align")
    from quadc.align.api import align

    progress = silent_progress if args.quiet else stderr_progress
    report = align(args.model, _kv_pairs(args.lora, "--lora"), args.output, _align_options(args, level=args.level),
                   target=args.target, passes=args.passes, pass_options=_pass_options(args), force=args.force,
                   progress=progress)
    if not report:  # a data-parallel rank other than 0 writes nothing
        return 0
    print(f"{'task':<20} {'role':<8} {'effect SQNR dB':>22} {'output SQNR dB':>22} {'float dB':>9}")
    def db(value: float | None, width: int) -> str:
        return f"{'exact':>{width}}" if value is None else f"{value:>{width}.2f}"

    for task, entry in report["tasks"].items():
        b, a = entry["before"], entry["after"]
        print(f"{task:<20} {entry['role']:<8} {db(b['effect_sqnr_db'], 10)} -> {db(a['effect_sqnr_db'], 7)} "
              f"{db(b['output_sqnr_db'], 12)} -> {db(a['output_sqnr_db'], 7)} {db(a['float_sqnr_db'], 9)}")
    print(f"wrote {args.output} (aligned LoRAs, encodings.json, report.json)")
    return 0


def _add_align_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Training flags of align (``prefix`` "align-" for compile, whose own flags they must not shadow)."""
    g = p.add_argument_group("alignment (QUAD distillation of the non-anchor LoRAs)")
    dest = prefix.replace("-", "_")

    def add(flag: str, **kw: object) -> None:
        g.add_argument(f"--{prefix}{flag}", dest=f"align_{flag.replace('-', '_')}", **kw)  # type: ignore[arg-type]

    add("steps", type=int, metavar="N", help="training steps per task (default 200)")
    add("data", metavar="DIR", help="task examples (DIR/<task>.npz or DIR/<task>/*.npz with latents, "
        "encoder_hidden_states[, source_latents]) for the diffusion loss (model level)")
    add("device", metavar="DEVICE", help="cpu (default) or cuda (cuda:LOCAL_RANK under torchrun / accelerate launch)")
    if dest:  # compile --align keeps the rest at their defaults; quadc align exposes them all
        return
    add("batch", type=int, metavar="N", help="samples per step (default: layer 256 rows, model 4 feeds)")
    add("lr", type=float, metavar="LR", help="Adam step in steps of the shared quantization grid (default 0.1; the model level takes a tenth of it)")
    add("patience", type=int, metavar="N", help="validation checks without improvement before stopping (default 5)")
    add("eval-every", type=int, metavar="N", help="steps between validation checks (default steps/20)")
    add("feeds", type=int, metavar="N", help="synthetic training feeds without --calib (default 32)")
    add("eval-feeds", type=int, metavar="N", help="synthetic evaluation feeds for the report (default 8)")
    add("eval-dir", metavar="DIR", help="folder of .npz evaluation feeds for the report (instead of synthetic)")
    add("rows", type=int, metavar="N", help="layer level: captured input rows per LoRA layer (default 512)")
    add("data-weight", type=float, metavar="W", help="weight of the diffusion loss (default 0.01)")
    add("loss", choices=["effect", "output"],
        help="model level: match the task's own effect out(task)-out(base) (default) or the whole output")
    g.add_argument("--no-equalize", dest="align_equalize", action="store_const", const=False,
                   help="do not rescale the LoRAs' rank components to the shared grids before training")
    g.add_argument("--no-warm-start", dest="align_warm_start", action="store_const", const=False,
                   help="model level: start from the original LoRA, not from the layer level's result")
    add("seed", type=int, metavar="SEED", help="seed of batches and validation split (default 0)")
    add("threads", type=int, metavar="N", help="torch CPU threads (default 1: the same bits on any machine)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from quadc import frontend

    _, info = frontend.load(args.model)
    print(frontend.format_inspect(info))
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from quadc.passes import PRESETS, registered_passes

    for name, cls in registered_passes().items():
        requires = f"  (after {', '.join(cls.requires)})" if cls.requires else ""
        print(f"{name:<18} {cls.summary()}{requires}")
        for option in cls.options:
            print(f"{'':<20}--set {name}.{option.describe()}")
    print("\npresets (usable in --passes):")
    for name, members in PRESETS.items():
        print(f"{name:<18} {','.join(members)}")
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from quadc.targets import discover_targets

    targets = discover_targets()
    if not targets:
        print("no targets installed")
    for name, cls in targets.items():
        ok, why = cls.available()
        print(f"{name:<12} {cls.description}" + ("" if ok else f"  [not available: {why}]"))
        print(f"{'':<12} passes: {','.join(cls.passes)} = {cls().pipeline()}")
        if cls.scheme:
            print(f"{'':<12} encoding scheme: {cls.scheme}")
        for option in cls.options:
            print(f"{'':<12} --set {name}.{option.describe()}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from quadc.errors import require_extra

    require_extra("torch", "export")
    require_extra("diffusers", "export")
    from quadc.export import export_unet

    progress = silent_progress if args.quiet else stderr_progress
    if args.component != "unet":
        from quadc.export.components import export_component

        unet_only = [flag for flag, value, default in (("--exporter", args.exporter or "torchscript", "torchscript"),
                                                       ("--dtype", args.dtype, "fp32"), ("--batch", args.batch, 1),
                                                       ("--opset", args.opset, None)) if value != default]
        if unet_only:
            raise QuadcError(f"{', '.join(unet_only)} apply to the U-Net only; the {args.component} is exported "
                             "in fp32 with the torchscript exporter at batch 1")
        path = export_component(args.component, config=args.config, weights=args.weights, out=Path(args.output),
                                seed=args.seed, progress=progress)
        print(f"wrote {path}")
        return 0
    exporter = args.exporter or ("dynamo" if args.dtype == "fp16" else "torchscript")
    path = export_unet(config=args.config, weights=args.weights, exporter=exporter, out=Path(args.output),
                       opset=args.opset, batch=args.batch, seed=args.seed, progress=progress, dtype=args.dtype)
    print(f"wrote {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from quadc.runtime.engine import Engine

    engine = Engine(args.artifact, executor=args.executor)
    feeds = _load_npz(args.inputs)
    task = None if args.task == "none" else args.task
    outputs = engine.run(feeds, task=task)
    from quadc.paths import replaced_atomically

    out = Path(args.output)
    with replaced_atomically(out, suffix=".npz") as tmp:
        np.savez(tmp, **outputs)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items())
    executor = getattr(engine, "executor", None) or engine.manifest.get("runtime", "cpu")
    print(f"wrote {out} ({shapes}; task {args.task}; executor {executor})")
    return 0


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise QuadcError(f"--ablation takes comma-separated fractions like 0,0.5,1, got '{text}'") from None


def cmd_report(args: argparse.Namespace) -> int:
    from quadc.context import stderr_progress
    from quadc.report import build_report, write_report

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise QuadcError(f"--seeds takes comma-separated integers like 0,1, got '{args.seeds}'") from None
    check_output_file(args.output)
    data = build_report(args.artifact, args.float_artifact, tasks=args.task or None, seeds=seeds,
                        sampler=args.sampler, steps=args.steps, model=args.model,
                        ablation=_float_list(args.ablation), prompt_embeds=args.prompt_embeds,
                        progress=stderr_progress)
    path = write_report(data, args.output)
    print(f"wrote {path} ({len(data.tasks)} task(s), seeds {args.seeds})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from quadc.pipeline.generate import format_timings, generate
    from quadc.pipeline.images import save_png

    check_output_file(args.output)
    result = generate(args.artifact, args.task, sampler=args.sampler, steps=args.steps, seed=args.seed,
                      image=args.image, mask=args.mask, prompt_embeds=args.prompt_embeds, strength=args.strength)
    out = save_png(result.image, args.output)
    print(format_timings(result))
    print(f"wrote {out} ({result.image.shape[1]}x{result.image.shape[0]}; task {result.task}, "
          f"{result.sampler} x {len(result.timesteps)} steps, seed {args.seed})")
    return 0


def _load_npz(path: str) -> dict:
    import zipfile

    import numpy as np

    if not Path(path).is_file():
        raise QuadcError(f"{path}: no such inputs file; save model inputs with numpy.savez")
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise QuadcError(f"{path}: not a readable .npz file ({exc.__class__.__name__})") from None


#: Convenience flags -> (pass, option). Every other declared option is set with --set PASS.OPTION=VALUE.
_FLAG_OPTIONS = {
    "lora_targets": ("lora-inputs", "targets"),
    "lora_rank": ("lora-inputs", "rank"),
    "precision": ("quant-plan", "precision"),
    "a8_fraction": ("quant-plan", "a8_fraction"),
    "per_channel": ("quant-plan", "per_channel"),
    "lora_float_inputs": ("quant-plan", "lora_float_inputs"),
    "encodings_file": ("quant-plan", "encodings_file"),
    "calib_dir": ("quant-plan", "calib_dir"),
    "calib_random": ("quant-plan", "calib_random"),
    "calib_seed": ("quant-plan", "calib_seed"),
    "lora_policy": ("quant-plan", "lora_policy"),
    "qss_tolerance": ("quant-plan", "qss_tolerance"),
    "activation_profile": ("quant-plan", "activation_profile"),
    "qdq_opset": ("qdq-insert", "opset"),
    "qdq_bias": ("qdq-insert", "bias"),
    "qdq_act_matmul_8bit": ("qdq-insert", "act_matmul_8bit"),
}


#: Convenience flags -> (target, option). Other target options: --set TARGET.OPTION=VALUE.
_TARGET_FLAG_OPTIONS = {
    "htp_arch": ("qnn", "htp_arch"),
    "soc_model": ("qnn", "soc_model"),
}


#: Flags whose False is a choice (given), not the flag's absence.
_CHOICE_FLAGS = {"per_channel"}


def _add_weight_flags(group: argparse._ArgumentGroup) -> None:
    """``--per-channel`` / ``--per-tensor``; neither: the target's encoding scheme's default."""
    w = group.add_mutually_exclusive_group()
    w.add_argument("--per-channel", dest="per_channel", action="store_const", const=True,
                   help="int8 symmetric per-channel weights")
    w.add_argument("--per-tensor", dest="per_channel", action="store_const", const=False,
                   help="8-bit per-tensor weights (default: the target scheme's, see `quadc targets`)")


def _pass_options(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """Pass options from the convenience flags given and from ``--set PASS.OPTION=VALUE``."""
    out: dict[str, dict[str, object]] = {}
    for flag, (pass_name, option) in _FLAG_OPTIONS.items():
        value = getattr(args, flag, None)
        if value is not None and (value is not False or flag in _CHOICE_FLAGS):
            out.setdefault(pass_name, {})[option] = value
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        pass_name, dot, option = key.rpartition(".")
        if not sep or not dot or not pass_name or not option:
            raise QuadcError(f"--set expects PASS.OPTION=VALUE (see `quadc passes`), got '{item}'")
        out.setdefault(pass_name, {})[option] = value
    return out


def _split_options(args: argparse.Namespace) -> tuple[dict[str, dict[str, object]], dict[str, dict[str, object]]]:
    """``(pass options, target options)``: ``--set NAME.OPTION`` goes to the target called NAME when no pass
    is (target names and pass names do not collide for the built-ins), and the target flags to theirs."""
    from quadc.passes import registered_passes
    from quadc.targets import discover_targets

    options = _pass_options(args)
    passes, targets = registered_passes(), discover_targets()
    target_options: dict[str, dict[str, object]] = {}
    for name in [n for n in options if n not in passes and n in targets]:
        target_options[name] = options.pop(name)
    for flag, (target, option) in _TARGET_FLAG_OPTIONS.items():
        value = getattr(args, flag, None)
        if value not in (None, False):
            target_options.setdefault(target, {})[option] = value
    return options, target_options


def _add_calibration_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration and shared LoRA encodings")
    g.add_argument("--calib", dest="calib_dir", metavar="DIR",
                   help="folder of .npz files with model inputs for calibration")
    g.add_argument("--calib-random", type=int, metavar="N",
                   help="N random calibration inputs over 4- and 8-step sampler schedules (default 4)")
    g.add_argument("--calib-seed", type=int, metavar="SEED", help="seed of the random calibration inputs (default 0)")
    g.add_argument("--lora-policy", choices=["auto", "anchor", "unified"],
                   help="shared LoRA encodings from the QSS anchor, the merged distribution, or auto (default): "
                        "anchor unless QSS values are within --qss-tolerance")
    g.add_argument("--qss-tolerance", type=float, metavar="REL",
                   help="relative QSS spread under which auto falls back to unified (default 0.05)")
    g.add_argument("--activation-profile", choices=["union", "anchor", "anchor-fit"],
                   help="activation ranges from the base model and every task (union: compile's default), the "
                        "base model and the anchor only (anchor: QUAD's shared profile), or the anchor's where every "
                        "task fits them and the union where one would clip (anchor-fit: align's default)")
    g.add_argument("--lora-targets", metavar="PATTERNS",
                   help="comma-separated fnmatch patterns of module paths that get LoRA slots "
                        "(default: the layers the given LoRAs use)")
    g.add_argument("--lora-rank", type=int, help="slot rank for --lora-targets layers no LoRA uses")


def cmd_analyze(args: argparse.Namespace) -> int:

    from quadc.analyze import analyze, format_analysis

    check_output_file(args.json)
    progress = silent_progress if args.quiet else stderr_progress
    report = analyze(args.model, _kv_pairs(args.lora, "--lora"), _pass_options(args), progress=progress)
    print(format_analysis(report))
    if args.json:
        _write_report(args.json, report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from quadc.eval.targets_summary import HELD_OUT_SEED

    parser = argparse.ArgumentParser(
        prog="quadc",
        description="QUAD compiler: one quantized SD1.5 U-Net graph per NPU, every LoRA a runtime input.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile an ONNX U-Net and LoRA files into an artifact directory")
    p.add_argument("model", nargs="?", help="ONNX U-Net (default: the bundled tiny U-Net, its VAE and demo LoRAs)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH",
                   help="a LoRA file (or peft directory) for task NAME; repeat for more tasks")
    p.add_argument("--target", default="onnx",
                   help="target backend (see `quadc targets`; default: onnx), or 'all': every available target "
                        "from one calibration into OUTPUT/<target>/")
    p.add_argument("-o", "--output", default="out/quadc", help="artifact directory (default: out/quadc)")
    p.add_argument("--passes", help="override the target's pipeline with pass and preset names, e.g. float,qdq "
                   "(see `quadc passes`)")
    p.add_argument("--set", action="append", metavar="PASS.OPTION=VALUE",
                   help="set a pass's declared option, e.g. --set dce.remove_unused_inputs=true; repeat")
    p.add_argument("--print-after", action="append", metavar="PASS",
                   help="print the graph in ONNX text after PASS (repeat or comma-separate)")
    p.add_argument("--verify", choices=["none", "check", "numeric"], default="none",
                   help="check each pass with onnx checker (check) and ORT outputs before/after (numeric)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    q = p.add_argument_group("quantization (quantized targets such as onnx-qdq)")
    q.add_argument("--precision", choices=["w8a16", "w8a8"], help="weights/activations bits (default w8a16)")
    q.add_argument("--a8-fraction", type=float, metavar="F",
                   help="fraction of activations made 8-bit, least output error first (the timestep path stays "
                        "16-bit; onnx-qdq only)")
    _add_weight_flags(q)
    q.add_argument("--lora-float", dest="lora_float_inputs", action="store_true",
                   help="keep LoRA inputs float (Q->DQ in the graph) instead of uint8 inputs")
    q.add_argument("--encodings", dest="encodings_file", metavar="FILE",
                   help="compile against fixed encodings from an AIMET-style encodings JSON")
    q.add_argument("--qdq-opset", choices=["21", "contrib"],
                   help="16-bit Q/DQ as standard ops at opset 21 (default; upgrades the graph) or in the "
                        "com.microsoft domain at the model's opset")
    q.add_argument("--bias", dest="qdq_bias", choices=["int32", "float"],
                   help="Conv/Gemm/norm biases as int32 (default, as QNN expects) or float")
    q.add_argument("--act-matmul-8bit", dest="qdq_act_matmul_8bit", action="store_true",
                   help="make the second input of activation x activation MatMuls 8-bit (what HTP does)")
    q.add_argument("--htp-arch", metavar="N", help="target qnn: HTP architecture of the context binary, e.g. 73")
    q.add_argument("--soc-model", metavar="N", help="target qnn: SoC model of the context binary, e.g. 57")
    q.add_argument("--max-saturation", type=float, metavar="F",
                   help="fail (writing nothing) when a task saturates more than fraction F of its LoRA values "
                        "under the shared encodings, e.g. 0.01; the manifest records every task's fraction")
    _add_calibration_flags(p)
    v = p.add_argument_group("pipeline components (compiled by the same target, no LoRA, into OUTPUT/vae_*)")
    v.add_argument("--vae-encoder", metavar="ONNX", help="VAE encoder (quadc export --component vae-encoder); "
                   "default: the bundled tiny VAE when MODEL is not given")
    v.add_argument("--vae-decoder", metavar="ONNX", help="VAE decoder (quadc export --component vae-decoder)")
    v.add_argument("--no-vae", action="store_true", help="compile the U-Net only")
    p.add_argument("--align", choices=["layer", "model"],
                   help="first align the non-anchor LoRAs (as quadc align, into OUTPUT.align), then compile the "
                        "aligned LoRAs against its encodings.json")
    _add_align_flags(p, prefix="align-")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("align", help="distill every non-anchor LoRA under the shared encodings (QUAD; extra: align)")
    p.add_argument("model", nargs="?", help="ONNX U-Net (default: the bundled tiny U-Net and its demo LoRAs)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH", help="a LoRA for task NAME; repeat")
    p.add_argument("--level", choices=["layer", "model"], default="model",
                   help="layer: reconstruct each LoRA layer's output from captured inputs (fast); model: distill "
                        "the whole quantized network against the float one (default)")
    p.add_argument("-o", "--output", required=True, help="output folder: <task>.safetensors, encodings.json, report.json")
    p.add_argument("--target", default="onnx-qdq", help="the quantized target whose graph is simulated (default onnx-qdq)")
    p.add_argument("--passes", help="the target's pipeline, overridden (as in compile)")
    p.add_argument("--set", action="append", metavar="PASS.OPTION=VALUE", help="a pass's declared option; repeat")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    q = p.add_argument_group("quantization (as in compile)")
    q.add_argument("--precision", choices=["w8a16", "w8a8"], help="weights/activations bits (default w8a16)")
    q.add_argument("--a8-fraction", type=float, metavar="F", help="fraction of activations made 8-bit")
    _add_weight_flags(q)
    q.add_argument("--encodings", dest="encodings_file", metavar="FILE", help="fixed encodings (AIMET JSON)")
    _add_calibration_flags(p)
    _add_align_flags(p)
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("analyze", help="QSS per LoRA, the anchor and why (the shared-encoding decision)")
    p.add_argument("model", nargs="?", help="ONNX U-Net (default: the bundled tiny U-Net and its demo LoRAs)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH", help="a LoRA for task NAME; repeat")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    _add_calibration_flags(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("run", help="run one U-Net forward of a compiled artifact with a task's LoRA bound")
    p.add_argument("artifact", help="artifact directory written by quadc compile")
    p.add_argument("--task", default="none", help="task name from the manifest, or 'none' for the base model")
    p.add_argument("--inputs", required=True, help=".npz with the model inputs (sample, timestep, ...)")
    p.add_argument("-o", "--output", required=True, help=".npz to write the outputs to")
    p.add_argument("--executor", choices=["auto", "cpu", "qnn-htp"], default="auto",
                   help="auto (default): a qnn artifact's QNN context on the HTP backend when onnxruntime-qnn is "
                        "installed, else the ONNX graph on the CPU; cpu; qnn-htp")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="quality (quantized vs float pipeline) and cost of an artifact as an HTML page")
    p.add_argument("artifact", help="the compiled (quantized) artifact directory")
    p.add_argument("--float", dest="float_artifact", help="the float artifact of the same model and tasks (target onnx)")
    p.add_argument("--task", action="append", help="a task to report (repeatable; default: every task)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds, the same for both pipelines (default 0,1)")
    p.add_argument("--sampler", default="lcm", help="sampler of the image pipeline (default lcm)")
    p.add_argument("--steps", type=int, default=4, help="sampler steps (default 4)")
    p.add_argument("--model", help="float source U-Net for the W8A8:W8A16 curve (default: the bundled one if the "
                                   "artifact came from it)")
    p.add_argument("--ablation", default="0,0.25,0.5,0.75,1",
                   help="fractions of activations at 8 bits for the W8A8:W8A16 curve ('' leaves it out)")
    p.add_argument("--prompt-embeds", help=".npy prompt embeddings [tokens, width] for every picture (default: the "
                                           "bundled ones; a U-Net of another text shape needs this)")
    p.add_argument("-o", "--output", required=True, help="the HTML file to write")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("generate", help="generate a PNG with a compiled artifact: VAE encoder, the U-Net loop with a "
                       "task's LoRA bound, VAE decoder; prints per-stage latency and peak RSS")
    p.add_argument("artifact", help="artifact directory written by quadc compile (with its VAE)")
    p.add_argument("--task", default="none", help="task name from the manifest, or 'none' for the base model")
    p.add_argument("--sampler", default="lcm", help="euler, lcm (default), ddim or dpmpp (stands in for OLSS)")
    p.add_argument("--steps", type=int, default=4, help="sampler steps (default 4)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--image", help="input image (default for a bundled task: its bundled example)")
    p.add_argument("--mask", help="inpainting mask, white = regenerate (default for a bundled task: its own)")
    p.add_argument("--prompt-embeds", help=".npy prompt embeddings [tokens, width] (default: the bundled null prompt)")
    p.add_argument("--strength", type=float, help="img2img strength in (0, 1] (default: the task's, else 0.75)")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("verify", help="run each target's verify for every task on held-out inputs; print a table")
    p.add_argument("artifact", help="an artifact directory, or a --target all output directory")
    p.add_argument("--task", action="append", metavar="NAME",
                   help="task(s) to verify ('none' = base model; default: the base model and every task)")
    p.add_argument("--inputs", action="append", metavar="NPZ", help=".npz model inputs (repeat); default: synthetic")
    p.add_argument("--random", type=int, default=2, metavar="N",
                   help="number of synthetic held-out inputs (default 2)")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED,
                   help="seed of the synthetic inputs (default: one calibration does not use)")
    p.add_argument("--model", help="source ONNX model, for targets that compare against it (default: bundled)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH", help="source LoRA of task NAME; repeat")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="ops, parameters, LoRA attachment points and attention blocks of a model")
    p.add_argument("model", help="ONNX U-Net")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list the registered passes")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("targets", help="list the installed target backends")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("export", help="build an SD1.5 pipeline component (U-Net, VAE encoder/decoder, CLIP text "
                       "encoder) with diffusers/transformers and export it to ONNX (extra: export)")
    p.add_argument("--component", choices=["unet", "vae-encoder", "vae-decoder", "text-encoder"], default="unet",
                   help="what to export (default: unet)")
    p.add_argument("--config", choices=["sd15", "tiny"], default="tiny", help="model size (default: tiny)")
    p.add_argument("--weights", default="random",
                   help="'random' or a local diffusers pipeline folder (its unet/, vae/ or text_encoder/) or the "
                        "component's own folder")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"],
                   help="torch.onnx exporter (default: torchscript; dynamo with --dtype fp16, since TorchScript "
                        "traces by running the model, and float16 on the CPU takes hours at full size)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="float type of the exported weights, inputs and output (default: fp32)")
    p.add_argument("--batch", type=int, default=1, help="static batch size (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (default: 0)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``quadc`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = _raise_on_sigterm()
    try:
        return int(args.func(args) or 0)
    except QuadcError as exc:
        if args.debug:
            raise
        print(f"quadc: error: {exc}", file=sys.stderr)
        return 2
    except _Terminated:
        print("quadc: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("quadc: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a half-written artifact is removed on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def _raise_on_sigterm() -> Any:
    """Turn SIGTERM into :class:`_Terminated` (main thread only); returns the handler it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
