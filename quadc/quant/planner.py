"""Build the :class:`~quadc.quant.plan.QuantPlan` of one compile: calibration, QSS, anchor, encodings.

:func:`build_plan` is the ``quant-plan`` stage of the pipeline: it runs after the float passes
(``lora-inputs``, ``const-fold``, ``dce``) and before ``qdq-insert``. Its options are the ``quant-plan``
pass's declared options (:data:`PLAN_OPTIONS`; CLI flags map one to one, and strings such as ``"0.3"``
or ``"true"`` are accepted):

=====================  ===========  ===================================================================
option                 default      meaning
=====================  ===========  ===================================================================
``precision``          ``w8a16``    ``w8a16``: uint16 activations; ``w8a8``: uint8 activations
``a8_fraction``        ``0``        w8a16 only: this fraction of activations gets uint8 instead, least
                                    sensitive first (below)
``calib_dir``          none         folder of ``.npz`` feeds (:func:`quadc.quant.feeds.npz_feeds`)
``calib_random``       ``4``        without ``calib_dir``: number of synthetic feeds
                                    (:func:`quadc.quant.feeds.random_feeds`)
``calib_seed``         ``0``        seed of the synthetic feeds and of QSS row sampling
``lora_policy``        ``auto``     ``auto``: anchor (highest QSS) unless all QSS are within
                                    ``qss_tolerance`` -> unified; ``anchor`` / ``unified`` force one
``qss_tolerance``      ``0.05``     relative QSS spread under which ``auto`` falls back to unified
``qss_rows``           ``256``      sampled rows per LoRA layer and task kept for QSS
``per_channel``        ``false``    weights int8 symmetric per output channel instead of uint8 per-tensor
``lora_float_inputs``  ``false``    LoRA inputs stay float (Q/DQ inside the graph), recorded in the plan
``encodings_file``     none         AIMET 1.0.0 encodings JSON: take every encoding from it, no calibration
=====================  ===========  ===================================================================

**Calibration** (:func:`quadc.quant.calibrate.calibrate`) runs every feed with each task's packed LoRA
bound and once as the base model; activation encodings come from the union of those ranges, so one
graph's encodings cover every task. Float tensors computed only from constants and shapes (e.g. an
attention's ``sqrt(head_dim)``) are not activations and get no encoding.

**Weights**: the constant weight inputs of MatMul, Gemm and Conv only (other constants are never
decoded): uint8 asymmetric per-tensor, or with ``per_channel`` int8 symmetric along the output-channel
axis (Conv ``[out, in, kh, kw]``: 0; MatMul ``x @ W`` with ``W [.., in, out]``: last; MatMul ``W @ x``:
second to last; Gemm ``B``: 0 with ``transB=1``, else 1; Gemm ``A``: 0, or 1 with ``transA=1``).

**A8 sensitivity** (``a8_fraction``): each activation is fake-quantized with its own uint8 encoding
over the whole calibration set (every feed x task) and its SQNR measured
(:func:`quadc.quant.calibrate.measure_sqnr`); the highest-SQNR tensors (least harmed by 8 bits) are the
``round(a8_fraction * N)`` that get uint8, ties broken by name.

**LoRA inputs**: :mod:`quadc.quant.qss` scores every task (QSS), picks the anchor or the unified
fallback, and gives each slot input ONE uint8 encoding shared by every task. ``plan.report`` holds the
QSS table (per task: QSS, mean and worst per-layer SQNR, SQNR under the shared encodings) and why the
policy and anchor were chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.errors import QuadcError
from quadc.graph import constant_values
from quadc.options import PassOption, parse_options
from quadc.quant.affine import Encoding, QType, compute_encoding, encoding_from_tensor
from quadc.quant.calibrate import Capture, calibrate, float_tensors, measure_sqnr, static_tensors
from quadc.quant.encodings import EncodingsFile, read_encodings
from quadc.quant.feeds import npz_feeds, random_feeds
from quadc.quant.plan import PRECISIONS, QuantPlan
from quadc.quant.qss import (
    LoRAEncodings,
    TaskScore,
    compute_qss,
    lora_layer_captures,
    select_anchor,
    shared_lora_encodings,
    shared_sqnr,
    touched_slots,
)

__all__ = [
    "LORA_POLICY_OPTIONS",
    "LoRADecision",
    "PlanOptions",
    "build_plan",
    "calibration_feeds",
    "decide_lora",
    "encodings_file_of",
    "lora_captures",
    "pack_tasks",
    "select_a8",
    "weight_axes",
    "weight_encodings",
]

LORA_POLICY_OPTIONS = ("auto", "anchor", "unified")
LORA_QTYPE = QType.UINT8
QSS_DEFINITION = (
    "QSS = mean over the task's LoRA layers of mean over sampled inputs x of JS_base2(softmax(f(x;w)/tau) || "
    "softmax(f(x;w~)/tau)), f = the LoRA branch x@down@up (packed, scale folded into up), w~ = its own "
    "uint8 per-tensor PTQ, softmax over output channels per token/pixel, tau = RMS of f(x;w) over channels"
)
_NORM_OPS = ("InstanceNormalization", "LayerNormalization")
_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
_LORA_SUFFIXES = (".lora_down", ".lora_up")


# ------------------------------------------------------------------------------------------------- options
#: The planner's options: they are the options of the ``quant-plan`` pass (see the table above).
PLAN_OPTIONS: tuple[PassOption, ...] = (
    PassOption("precision", str, "w8a16", "w8a16: uint16 activations; w8a8: uint8 activations",
               choices=PRECISIONS),
    PassOption("a8_fraction", float, 0.0, "w8a16 only: this fraction of activations becomes uint8",
               low=0.0, high=1.0),
    PassOption("calib_dir", str, None, "folder of .npz calibration feeds"),
    PassOption("calib_random", int, 4, "number of synthetic calibration feeds (without calib_dir)", low=1),
    PassOption("calib_seed", int, 0, "seed of the synthetic feeds and of QSS row sampling", low=0),
    PassOption("lora_policy", str, "auto", "shared LoRA encodings: anchor, unified, or auto",
               choices=LORA_POLICY_OPTIONS),
    PassOption("qss_tolerance", float, 0.05, "relative QSS spread under which auto falls back to unified",
               low=0.0),
    PassOption("qss_rows", int, 256, "sampled rows per LoRA layer and task kept for QSS", low=1),
    PassOption("per_channel", bool, False, "int8 symmetric per-channel weights instead of uint8 per-tensor"),
    PassOption("lora_float_inputs", bool, False, "keep LoRA inputs float (Q/DQ inside the graph)"),
    PassOption("encodings_file", str, None, "AIMET encodings JSON to take every encoding from"),
)


@dataclass(frozen=True)
class PlanOptions:
    """The planner's options, parsed and checked (see the module docstring for their meaning)."""

    precision: str = "w8a16"
    a8_fraction: float = 0.0
    calib_dir: str | None = None
    calib_random: int = 4
    calib_seed: int = 0
    lora_policy: str = "auto"
    qss_tolerance: float = 0.05
    qss_rows: int = 256
    per_channel: bool = False
    lora_float_inputs: bool = False
    encodings_file: str | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PlanOptions:
        """Parse option values (missing or None values take the defaults) with :data:`PLAN_OPTIONS`."""
        values = parse_options(PLAN_OPTIONS, {k: v for k, v in options.items() if v is not None}, "quant-plan")
        return cls(**values)


# ------------------------------------------------------------------------------------------------ pieces
def calibration_feeds(graph: gs.Graph, opts: PlanOptions) -> tuple[list[dict[str, np.ndarray]], str]:
    """The feeds ``opts`` asks for and a one-line description of them."""
    if opts.calib_dir:
        feeds = npz_feeds(opts.calib_dir, graph)
        return feeds, f"{len(feeds)} .npz feeds from {opts.calib_dir}"
    feeds = random_feeds(graph, opts.calib_random, seed=opts.calib_seed)
    return feeds, f"{len(feeds)} synthetic feeds (LCM/Euler/8-step schedules, seed {opts.calib_seed})"


def pack_tasks(loras: Any, slots: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Every task of a LoRASet packed for the graph's slots (:func:`quadc.lora.pack.pack_task`)."""
    from quadc.lora.pack import pack_task

    if loras is None or not slots:
        return {}
    return {name: pack_task(lora, slots) for name, lora in loras.items()}


def lora_captures(graph: gs.Graph, slots: Mapping[str, Any], tasks: Mapping[str, Mapping[str, np.ndarray]]
                  ) -> tuple[dict[str, tuple[str, Capture]], dict[str, list[str]]]:
    """``(capture, capture_tasks)`` arguments of :func:`calibrate` for QSS: every slot's layer input, and
    per task only the layers it adapts."""
    if not tasks:
        return {}, {}
    capture = lora_layer_captures(graph, slots)
    return capture, {task: touched_slots(packed, slots) for task, packed in tasks.items()}


def weight_axes(graph: gs.Graph) -> dict[str, int]:
    """Constant weight inputs of MatMul/Gemm/Conv, and the scales of InstanceNorm/LayerNorm, -> their
    output-channel axis (no weight is decoded). Qualcomm's HTP backend only finalizes normalizations
    whose scale is quantized (and bias int32), so their scales are planned like weights."""
    axes: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in _NORM_OPS:
            if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
                axes.setdefault(node.inputs[1].name, 0)
            continue
        if node.op not in _WEIGHT_OPS:
            continue
        positions = (1,) if node.op == "Conv" else (0, 1)
        for pos in positions:
            if pos >= len(node.inputs):
                continue
            t = node.inputs[pos]
            if not isinstance(t, gs.Constant) or t.name in axes:
                continue
            ndim = len(t.shape)
            if node.op == "Conv":
                axis = 0
            elif node.op == "Gemm":
                trans = int(node.attrs.get("transB" if pos == 1 else "transA", 0))
                axis = (0 if trans else 1) if pos == 1 else (1 if trans else 0)
            else:  # MatMul
                axis = ndim - 1 if pos == 1 else max(ndim - 2, 0)
            axes[t.name] = axis
    return axes


def weight_encodings(graph: gs.Graph, per_channel: bool = False) -> dict[str, Encoding]:
    """Encodings of the MatMul/Gemm/Conv constant weights: uint8 asymmetric per-tensor, or int8
    symmetric per output channel with ``per_channel`` (1-D weights stay per-tensor)."""
    consts = {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    out: dict[str, Encoding] = {}
    for name, axis in weight_axes(graph).items():
        values = constant_values(consts[name])  # not .values: that keeps every weight mapped
        if per_channel and np.ndim(values) >= 2:
            out[name] = encoding_from_tensor(values, QType.INT8, symmetric=True, axis=axis)
        else:
            out[name] = encoding_from_tensor(values, QType.UINT8)
    return out


def select_a8(sqnr: Mapping[str, float], fraction: float) -> list[str]:
    """The ``round(fraction * N)`` tensors with the highest SQNR (least sensitive), ties by name."""
    if not 0.0 <= fraction <= 1.0:
        raise QuadcError(f"a8_fraction must be in [0, 1], got {fraction}")
    k = int(math.floor(fraction * len(sqnr) + 0.5))
    ranked = sorted(sqnr, key=lambda n: (-sqnr[n], n))
    return sorted(ranked[:k])


@dataclass
class LoRADecision:
    """QSS scores, the chosen policy/anchor and why, and the ONE shared encoding per LoRA input."""

    scores: dict[str, TaskScore]
    requested: str
    policy: str
    anchor: str | None
    reason: str
    tolerance: float
    encodings: LoRAEncodings
    shared_sqnr: dict[str, float] = field(default_factory=dict)

    @property
    def qss(self) -> dict[str, float]:
        """Task -> QSS."""
        return {k: s.qss for k, s in self.scores.items()}

    def report(self) -> dict[str, Any]:
        """JSON-ready: the QSS table, the policy, anchor and reason (non-finite numbers become None)."""
        tasks = {}
        for name, score in self.scores.items():
            row = score.to_dict()
            shared = self.shared_sqnr.get(name)
            row["shared_sqnr_mean_db"] = float(shared) if shared is not None and math.isfinite(shared) else None
            tasks[name] = row
        return {
            "definition": QSS_DEFINITION,
            "tasks": tasks,
            "requested_policy": self.requested,
            "policy": self.policy,
            "anchor": self.anchor,
            "reason": self.reason,
            "tolerance": self.tolerance,
            "fallback_inputs": list(self.encodings.fallback),
            "inputs": len(self.encodings),
        }


def decide_lora(slots: Mapping[str, Any], tasks: Mapping[str, Mapping[str, np.ndarray]],
                samples: Mapping[str | None, Mapping[str, np.ndarray]], requested: str = "auto",
                tolerance: float = 0.05) -> LoRADecision:
    """Score every task (QSS), choose anchor or unified per ``requested`` and build the shared encodings."""
    if requested not in LORA_POLICY_OPTIONS:
        raise QuadcError(f"LoRA policy '{requested}' is not one of {', '.join(LORA_POLICY_OPTIONS)}")
    scores = compute_qss(slots, tasks, samples, LORA_QTYPE)
    qss = {k: s.qss for k, s in scores.items()}
    ranked = sorted(qss, key=lambda k: -qss[k])
    if not tasks:
        policy, anchor = "unified", None
        reason = "no LoRA given: every LoRA input gets the encoding of [0, 0] (the base model)"
    elif requested == "unified":
        policy, anchor = "unified", None
        reason = f"lora_policy=unified: the merged ranges of all {len(tasks)} LoRAs per input"
    elif requested == "anchor":
        policy, anchor = "anchor", ranked[0]
        reason = f"lora_policy=anchor: '{anchor}' has the highest QSS ({qss[anchor]:.4g}); its own PTQ encodings are shared"
    else:
        anchor = select_anchor(qss, tolerance)
        hi, lo = qss[ranked[0]], qss[ranked[-1]]
        spread = (hi - lo) / hi if hi > 0 else 0.0
        if len(tasks) == 1:
            policy = "anchor"
            reason = f"only one LoRA ('{anchor}'): its own PTQ encodings"
        elif anchor is not None:
            policy = "anchor"
            reason = (f"'{anchor}' has the highest QSS ({hi:.4g}; lowest '{ranked[-1]}' {lo:.4g}, spread "
                      f"{spread:.1%} > tolerance {tolerance:.1%}): the most quantization-sensitive LoRA's own PTQ "
                      "encodings become the shared ones")
        else:
            policy = "unified"
            reason = (f"QSS values are within {spread:.1%} of each other (tolerance {tolerance:.1%}): no LoRA is "
                      "distinctly most sensitive, so the merged ranges of all LoRAs are shared (unified fallback)")
    encodings = shared_lora_encodings(slots, tasks, policy, anchor, LORA_QTYPE)
    if encodings.fallback:
        reason += (f"; the anchor does not adapt {len(encodings.fallback)} LoRA input(s), which use the merged "
                   "range of all LoRAs")
    return LoRADecision(scores, requested, policy, anchor, reason, tolerance, encodings,
                        shared_sqnr(slots, tasks, samples, encodings) if tasks else {})


def encodings_file_of(plan: QuantPlan) -> EncodingsFile:
    """The plan's encodings as an AIMET file: activations and LoRA inputs as activation encodings,
    weights as parameter encodings (write with :func:`quadc.quant.encodings.write_encodings`)."""
    return EncodingsFile(activations={**plan.activations, **plan.lora}, params=dict(plan.weights),
                         quantizer_args={"activation_bitwidth": 8 if plan.precision == "w8a8" else 16,
                                         "param_bitwidth": 8, "per_channel_quantization": plan.per_channel,
                                         "dtype": "int", "quant_scheme": "post_training_tf"})


# ---------------------------------------------------------------------------------------------- build_plan
def _activation_names(graph: gs.Graph, names: list[str]) -> list[str]:
    static = static_tensors(graph)
    return [n for n in names if not n.endswith(_LORA_SUFFIXES) and n not in static]


def _plan_from_file(graph: gs.Graph, slots: Mapping[str, Any], opts: PlanOptions,
                    progress: Callable[[str], None]) -> QuantPlan:
    path = Path(str(opts.encodings_file))
    progress(f"reading encodings from {path}")
    ef = read_encodings(path)
    inputs, outputs = float_tensors(graph)
    acts = _activation_names(graph, inputs + outputs)
    weights = list(weight_axes(graph))
    lora_inputs = [n for s in slots.values() for n in (s.down_input, s.up_input)]
    missing = [n for n in [*acts, *weights, *lora_inputs] if ef.get(n) is None]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise QuadcError(
            f"encodings file '{path}' has no encoding for {len(missing)} tensor(s) of this graph: "
            f"{', '.join(repr(m) for m in missing[:8])}{more}; export encodings for the graph after "
            "lora-inputs,const-fold,dce, or calibrate instead (drop --encodings-file)"
        )
    activations = {n: ef.get(n) for n in acts}
    a8 = sorted(n for n, e in activations.items() if e.qtype.bits == 8)  # type: ignore[union-attr]
    # Precision: AIMET's quantizer_args.activation_bitwidth when the file has it, else the option; a file
    # with 16-bit activations is w8a16 whatever was asked.
    bw = ef.quantizer_args.get("activation_bitwidth")
    precision = {8: "w8a8", 16: "w8a16"}.get(bw, opts.precision) if isinstance(bw, int) else opts.precision
    if len(a8) < len(activations):
        precision = "w8a16"
    plan = QuantPlan(
        precision=precision,
        activations=activations,  # type: ignore[arg-type]
        weights={n: ef.get(n) for n in weights},  # type: ignore[misc]
        lora={n: ef.get(n) for n in lora_inputs},  # type: ignore[misc]
        per_channel=any(ef.get(n).per_channel for n in weights),  # type: ignore[union-attr]
        lora_float_inputs=opts.lora_float_inputs,
        lora_policy="file",
        anchor=None,
        a8_tensors=a8 if precision == "w8a16" else sorted(activations),
    )
    plan.report = {
        "source": f"encodings file {path}",
        "calibration": None,
        "qss": None,
        "lora": {"policy": "file", "anchor": None, "reason": "LoRA input encodings read from the encodings file",
                 "inputs": len(lora_inputs)},
        "a8": {"count": len(a8), "of": len(activations)},
        "weights": {"count": len(weights), "per_channel": plan.per_channel},
    }
    if precision != opts.precision:
        plan.report["note"] = f"precision {precision} follows the encodings file (the option said {opts.precision})"
    return plan


@dataclass
class Calibrated:
    """What calibration with every task bound yields: ranges, packed tasks and the LoRA decision."""

    ranges: Any
    tasks: dict[str, dict[str, np.ndarray]]
    decision: LoRADecision
    feeds: list[dict[str, np.ndarray]]
    feed_desc: str


def calibrate_and_decide(graph: gs.Graph, slots: Mapping[str, Any], loras: Any, opts: PlanOptions,
                         progress: Callable[[str], None], *, include_base: bool) -> Calibrated:
    """Pack the tasks, calibrate with each bound (and the base model if asked), then QSS and the anchor."""
    tasks = pack_tasks(loras, slots)
    feeds, feed_desc = calibration_feeds(graph, opts)
    capture, capture_tasks = lora_captures(graph, slots, tasks)
    progress(f"calibrating on {feed_desc}, {len(tasks)} task(s)" + (" + base model" if include_base else ""))
    ranges = calibrate(graph, feeds, tasks, progress, include_base=include_base, capture=capture,
                       capture_tasks=capture_tasks, max_rows=opts.qss_rows, seed=opts.calib_seed)
    decision = decide_lora(slots, tasks, ranges.samples, opts.lora_policy, opts.qss_tolerance)
    return Calibrated(ranges, tasks, decision, feeds, feed_desc)


def build_plan(graph: gs.Graph, ctx: CompileContext, opts: PlanOptions | None = None) -> QuantPlan:
    """Every encoding of the compile (see the module docstring); ``graph`` is not modified."""
    opts = opts or PlanOptions()
    progress: Callable[[str], None] = ctx.progress
    slots: Mapping[str, Any] = ctx.lora_slots
    if opts.encodings_file:
        return _plan_from_file(graph, slots, opts, progress)
    cal = calibrate_and_decide(graph, slots, ctx.loras, opts, progress, include_base=True)
    ranges, tasks, decision, feeds, feed_desc = cal.ranges, cal.tasks, cal.decision, cal.feeds, cal.feed_desc
    if tasks:
        progress(f"LoRA policy {decision.policy}" + (f", anchor '{decision.anchor}'" if decision.anchor else "")
                 + f": {decision.reason}")

    acts = _activation_names(graph, list(ranges))
    a16 = QType.UINT8 if opts.precision == "w8a8" else QType.UINT16
    activations = {n: compute_encoding(*ranges[n], a16) for n in acts}
    a8_report: dict[str, Any] = {"fraction": opts.a8_fraction, "of": len(acts)}
    if opts.precision == "w8a8":
        a8 = sorted(acts)
        a8_report["note"] = "w8a8: every activation is uint8 (a8_fraction ignored)"
    elif opts.a8_fraction <= 0.0 or not acts:
        a8 = []
    else:
        enc8 = {n: compute_encoding(*ranges[n], QType.UINT8) for n in acts}
        if opts.a8_fraction >= 1.0:
            a8 = sorted(acts)
        else:
            progress(f"measuring 8-bit SQNR of {len(acts)} activations for a8_fraction={opts.a8_fraction}")
            sqnr = measure_sqnr(graph, feeds, enc8, tasks, progress)
            a8 = select_a8(sqnr, opts.a8_fraction)
            chosen = [sqnr[n] for n in a8]
            a8_report["threshold_sqnr_db"] = float(min(chosen)) if chosen and math.isfinite(min(chosen)) else None
            a8_report["sensitivity"] = "SQNR of uint8 fake-quant over all calibration runs; highest = least sensitive"
        for n in a8:
            activations[n] = enc8[n]
    a8_report["count"] = len(a8)

    progress("computing weight encodings" + (" (per-channel)" if opts.per_channel else ""))
    weights = weight_encodings(graph, opts.per_channel)
    static = len(static_tensors(graph) & set(ranges))
    plan = QuantPlan(
        precision=opts.precision,
        activations=activations,
        weights=weights,
        lora=dict(decision.encodings),
        per_channel=opts.per_channel,
        lora_float_inputs=opts.lora_float_inputs,
        lora_policy=decision.policy,
        anchor=decision.anchor,
        qss=decision.qss,
        a8_tensors=a8,
    )
    lora_report = decision.report()
    plan.report = {
        "source": "calibration",
        "calibration": {"feeds": ranges.feeds, "description": feed_desc, "tasks": list(tasks), "runs": ranges.runs,
                        "tensors": len(ranges), "skipped": list(ranges.skipped),
                        "static_tensors_excluded": static},
        "qss": {"definition": lora_report.pop("definition"), "tolerance": opts.qss_tolerance,
                "tasks": lora_report.pop("tasks")},
        "lora": lora_report,
        "a8": a8_report,
        "weights": {"count": len(weights), "per_channel": opts.per_channel,
                    "scheme": "int8 symmetric per output channel" if opts.per_channel else "uint8 asymmetric per-tensor"},
    }
    return plan
