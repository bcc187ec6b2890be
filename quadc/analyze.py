"""``quadc analyze``: score every LoRA's quantization sensitivity (QSS) and say which one anchors the
shared LoRA encodings, or why the unified fallback is used, without compiling.

The model goes through the same float stages as ``quadc compile`` (frontend, LoRA reading, then the
``lora-inputs,const-fold,dce`` passes), is calibrated with every task bound (capturing each LoRA layer's
inputs), and :func:`quadc.quant.lora_decision.decide_lora` computes the QSS table, policy, anchor and the ONE
shared encoding per LoRA input, exactly as the compile's planner would with the same options
(the ``quant-plan`` options ``calib_dir`` / ``calib_random`` / ``calib_seed``, ``lora_policy``,
``qss_tolerance``, ``qss_rows``, and the ``lora-inputs`` options ``targets`` / ``rank``).

Example::

    report = analyze("unet.onnx", {"removal": "removal.safetensors", "sketch": "sketch_lora/"})
    print(format_analysis(report))
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from quadc.context import CompileContext, silent_progress
from quadc.errors import QuadcError

__all__ = ["FLOAT_PIPELINE", "analyze", "format_analysis"]

#: The float passes ``quadc compile`` runs before planning quantization (a preset).
FLOAT_PIPELINE = "float"


def _prepare(model_path: Path, loras: Mapping[str, str | os.PathLike[str]],
             pass_options: Mapping[str, Mapping[str, Any]],
             progress: Callable[[str], None]) -> tuple[Any, CompileContext]:
    """Load the model and LoRAs and run the float passes, as :func:`quadc.compiler.compile_model` does."""
    from quadc.compiler import prepare
    from quadc.passes import PassPipeline, run_pipeline

    pipeline = PassPipeline.parse(FLOAT_PIPELINE)
    if pass_options.get("lora-inputs"):
        pipeline.set_options("lora-inputs", **pass_options["lora-inputs"])
    passes = pipeline.build()
    graph, ctx, _ = prepare(model_path, loras, progress)
    graph, _ = run_pipeline(graph, passes, ctx)
    return graph, ctx


def analyze(model_path: str | os.PathLike[str] | None = None,
            loras: Mapping[str, str | os.PathLike[str]] | None = None,
            pass_options: Mapping[str, Mapping[str, Any]] | None = None,
            progress: Callable[[str], None] = silent_progress) -> dict[str, Any]:
    """QSS of every LoRA, the chosen policy and anchor, the reason, and the shared LoRA encodings.

    ``model_path`` None means the bundled tiny U-Net, and then ``loras`` defaults to the bundled demo
    LoRAs; ``pass_options`` holds the ``lora-inputs`` and ``quant-plan`` options by pass name. Returns a JSON-ready dict (non-finite numbers are None); :func:`format_analysis` prints it.
    """
    from quadc.compiler import bundled_loras, bundled_model
    from quadc.lora.pack import pack_tasks
    from quadc.quant.plan_options import PlanOptions
    from quadc.quant.task_calibration import calibrate_and_decide

    pass_options = dict(pass_options or {})
    unknown = sorted(set(pass_options) - {"lora-inputs", "quant-plan"})
    if unknown:
        raise QuadcError(f"quadc analyze takes options of lora-inputs and quant-plan only, not of '{unknown[0]}'")
    opts = PlanOptions.from_options(pass_options.get("quant-plan", {}))
    path = Path(model_path) if model_path is not None else bundled_model()
    lora_paths = dict(loras or {})
    if model_path is None and not lora_paths:
        lora_paths = {k: str(v) for k, v in bundled_loras().items()}
    if not lora_paths:
        raise QuadcError("quadc analyze needs at least one LoRA; pass --lora NAME=PATH")
    graph, ctx = _prepare(path, lora_paths, pass_options, progress)
    slots = ctx.lora_slots
    cal = calibrate_and_decide(graph, slots, pack_tasks(ctx.loras, slots), opts, progress, include_base=False)
    ranges, decision, feed_desc = cal.ranges, cal.decision, cal.feed_desc
    lora_report = decision.report()
    table = lora_report.pop("tasks")
    for name, lora in ctx.loras.items():
        table[name] = {"source": str(lora.source), "format": lora.format, "layers_in_file": len(lora.layers),
                       "max_rank": lora.max_rank, **table[name]}
    return {
        "model": str(path),
        "slots": len(slots),
        "calibration": {"description": feed_desc, "feeds": ranges.feeds, "runs": ranges.runs},
        **lora_report,
        "tasks": table,
        "per_layer": {task: {m: {"js": _num(s.js), "sqnr_db": _num(s.sqnr_db), "rows": s.rows}
                             for m, s in score.layers.items()} for task, score in decision.scores.items()},
        "lora_encodings": {name: {"qtype": enc.qtype.value, "scale": float(enc.scale),
                                  "zero_point": int(enc.zero_point)} for name, enc in decision.encodings.items()},
    }


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _fmt(x: Any, unit: str = "", spec: str = ".1f") -> str:
    if x is None:
        return "exact" if unit else "-"
    return f"{x:{spec}}{unit}"


def format_analysis(report: Mapping[str, Any]) -> str:
    """The QSS table, the policy and anchor, and the reason, as plain text."""
    tasks: Mapping[str, Any] = report.get("tasks", {})
    lines = [
        f"model: {report.get('model', '?')} ({report.get('slots', 0)} LoRA slots)",
        f"calibration: {report.get('calibration', {}).get('description', '?')}",
        "",
        "QSS = mean JS divergence (base 2) between the channel distributions of each LoRA layer's output",
        "in float and under the LoRA's own uint8 PTQ (higher = more sensitive to quantization)",
        "",
    ]
    name_w = max([len("task"), *(len(n) for n in tasks)])
    worst_w = max([len("worst layer"), *(len((t.get("worst_layer") or {}).get("module", "-")) for t in tasks.values())])
    header = (f"{'task':<{name_w}}  {'QSS':>10}  {'SQNR mean':>9}  {'worst layer':<{worst_w}}  {'SQNR':>8}  "
              f"{'shared SQNR':>11}  {'layers':>6}")
    lines += [header, "-" * len(header)]
    anchor = report.get("anchor")
    for name, row in tasks.items():
        worst = row.get("worst_layer") or {}
        mark = "  <- anchor" if name == anchor else ""
        lines.append(
            f"{name:<{name_w}}  {_fmt(row.get('qss'), spec='.4g'):>10}  {_fmt(row.get('sqnr_mean_db'), ' dB'):>9}  "
            f"{worst.get('module', '-'):<{worst_w}}  {_fmt(worst.get('sqnr_db'), ' dB'):>8}  "
            f"{_fmt(row.get('shared_sqnr_mean_db'), ' dB'):>11}  {row.get('layers', 0):>6}{mark}"
        )
    lines += [
        "",
        "shared SQNR: mean layer SQNR when the task uses the shared encodings instead of its own",
        f"policy: {report.get('policy')} (requested {report.get('requested_policy')}, "
        f"tolerance {float(report.get('tolerance', 0.0)):.1%})",
        f"anchor: {anchor if anchor is not None else 'none (unified: merged ranges of all LoRAs)'}",
        f"why: {report.get('reason', '')}",
    ]
    return "\n".join(lines)
