"""Build the :class:`~quadc.quant.plan.QuantPlan` of one compile: calibration, QSS, anchor, encodings.

:func:`build_plan` is what the ``quant-plan`` stage of the pipeline runs, after the float passes
(``lora-inputs``, ``const-fold``, ``dce``) and before ``qdq-insert``: it calibrates
(:func:`quadc.quant.task_calibration.calibrate_tasks`, or takes a calibration already made for this graph)
and :func:`derive_plan` turns the target-independent ranges into one encoding scheme's encodings. It puts
together modules that each do one job:

- :mod:`quadc.quant.plan_options`: the options (the ``quant-plan`` pass's), with their table;
- :mod:`quadc.quant.schemes`: the encoding schemes (``qnn-htp``, and those targets register);
- :mod:`quadc.quant.task_calibration`: calibration with every task bound, then the LoRA decision;
- :mod:`quadc.quant.lora_decision`: QSS, anchor or unified fallback, ONE shared encoding per LoRA input;
- :mod:`quadc.quant.activations`: the activation profile (``activation_profile``: ranges of every task or
  of the anchor), activation encodings and the A8 selection (``a8_fraction``), with
  :mod:`quadc.quant.structural` (what stays 16-bit) and :mod:`quadc.quant.sensitivity` (output error);
- :mod:`quadc.quant.weights`: weight encodings;
- :mod:`quadc.quant.plan_file`: the plan as an AIMET encodings file and back (``encodings_file``).

``plan.report`` holds how each part was chosen (calibration, QSS table, policy and reason, A8, weights).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import silent_progress
from quadc.quant.activations import activation_encodings, profile_ranges
from quadc.quant.calibrate import static_tensors
from quadc.quant.feeds import random_feeds
from quadc.quant.lora_decision import decide_lora
from quadc.quant.plan import QuantPlan
from quadc.quant.plan_file import plan_from_encodings_file
from quadc.quant.plan_options import PlanOptions
from quadc.quant.schemes import EncodingScheme, get_scheme
from quadc.quant.task_calibration import Calibration, calibrate_tasks
from quadc.quant.weights import weight_encodings

__all__ = ["build_plan", "derive_plan"]


def build_plan(graph: gs.Graph, slots: Mapping[str, Any], tasks: Mapping[str, Mapping[str, np.ndarray]],
               opts: PlanOptions | None = None, progress: Callable[[str], None] = silent_progress, *,
               scheme: str | EncodingScheme | None = None, calibration: Calibration | None = None,
               unquantized: Collection[str] = ()) -> QuantPlan:
    """Every encoding of the compile in ``scheme`` (default: ``opts.scheme``, else ``qnn-htp``);
    ``graph`` is not modified.

    ``slots`` is the LoRA slot table (``ctx.lora_slots``), ``tasks`` every task packed for those slots
    (:func:`quadc.lora.pack.pack_tasks`; empty without LoRAs). ``calibration``, when given, is this
    graph's calibration with these tasks and options (made once and shared by several schemes); without
    it the graph is calibrated here. ``unquantized`` (``ctx.unquantized``) names tensors that get no
    activation encoding: they stay float inside a fused operation (``conv-act-fusion``).
    """
    opts = opts or PlanOptions()
    chosen = get_scheme(scheme if scheme is not None else opts.scheme)
    if opts.encodings_file:
        return plan_from_encodings_file(graph, slots, opts, progress, unquantized, chosen)
    cal = calibration or calibrate_tasks(graph, slots, tasks, opts, progress, include_base=True)
    return derive_plan(graph, slots, cal, chosen, opts, progress, unquantized)


def sensitivity_feeds(graph: gs.Graph, cal: Calibration, opts: PlanOptions) -> list[dict[str, np.ndarray]]:
    """The feeds the A8 sensitivity is measured on: with synthetic calibration, as many fresh synthetic
    feeds (seed ``calib_seed + 1``), so that the error counts what 8-bit ranges fit to the calibration feeds
    clip on inputs they never saw (on the trained fixtures the chosen 40 % lost 5 dB more on held-out inputs
    than on the calibration feeds); with ``calib_dir``, the calibration feeds themselves."""
    if opts.calib_dir or not cal.feeds:
        return list(cal.feeds)
    return random_feeds(graph, len(cal.feeds), seed=opts.calib_seed + 1)


def derive_plan(graph: gs.Graph, slots: Mapping[str, Any], cal: Calibration, scheme: EncodingScheme,
                opts: PlanOptions, progress: Callable[[str], None] = silent_progress,
                unquantized: Collection[str] = ()) -> QuantPlan:
    """The plan of ``scheme`` from a calibration: the LoRA decision in the scheme's LoRA type (QSS, anchor
    or unified fallback), then activation (less ``unquantized``), weight and LoRA encodings in its types,
    then the scheme's graph adjustments (:meth:`~quadc.quant.schemes.EncodingScheme.adjust`)."""
    ranges, tasks = cal.ranges, cal.tasks
    decision = decide_lora(slots, tasks, ranges.samples, opts.lora_policy, opts.qss_tolerance, scheme)
    if tasks:
        progress(f"[{scheme.name}] LoRA policy {decision.policy}"
                 + (f", anchor '{decision.anchor}'" if decision.anchor else "") + f": {decision.reason}")
    # Fresh feeds only where an A8 choice is measured: they are U-Net feeds, and components (the VAE) never mix.
    a8_feeds = sensitivity_feeds(graph, cal, opts) if opts.a8_fraction else list(cal.feeds)
    act_ranges, profile = profile_ranges(ranges, opts.activation_profile, decision.anchor,
                                         opts.headroom if opts.precision != "w8a8" else 1.0)
    if profile["profile"] != "union":
        progress(f"activation ranges from {profile['runs']} ({profile['narrower']} narrower than the union)")
    activations, a8, a8_report = activation_encodings(graph, act_ranges, a8_feeds, tasks,
                                                      opts.precision,
                                                      opts.a8_fraction, progress, unquantized,
                                                      headroom=opts.headroom, scheme=scheme,
                                                      a8_runs=opts.a8_runs, a8_groups=opts.a8_groups,
                                                      a8_headroom=opts.a8_headroom, a8_range=opts.a8_range,
                                                      calib_feeds=cal.feeds)
    per_channel = scheme.weights_per_channel(opts.per_channel)
    progress("computing weight encodings" + (" (per-channel)" if per_channel else ""))
    weights = weight_encodings(graph, opts.per_channel, scheme)
    static = len(static_tensors(graph) & set(ranges))
    plan = QuantPlan(
        precision=opts.precision,
        scheme=scheme.name,
        calibration=cal.key[:16] or None,
        ranges={n: act_ranges[n] for n in activations},
        lora_ranges={n: (float(e.tmin), float(e.tmax)) for n, e in decision.encodings.items()},
        activations=activations,
        weights=weights,
        lora=dict(decision.encodings),
        per_channel=per_channel,
        lora_float_inputs=opts.lora_float_inputs,
        lora_policy=decision.policy,
        anchor=decision.anchor,
        qss=decision.qss,
        a8_tensors=a8,
        activation_profile=profile["profile"],
        profile_anchor=profile.get("anchor"),
    )
    lora_report = decision.report()
    plan.report = {
        "source": "calibration",
        "scheme": scheme.describe(),
        "calibration": {"feeds": ranges.feeds, "description": cal.feed_desc, "tasks": list(tasks), "runs": ranges.runs,
                        "tensors": len(ranges), "skipped": list(ranges.skipped),
                        "static_tensors_excluded": static},
        "qss": {"definition": lora_report.pop("definition"), "tolerance": opts.qss_tolerance,
                "tasks": lora_report.pop("tasks")},
        "lora": lora_report,
        "activation_profile": profile,
        "a8": a8_report,
        "weights": {"count": len(weights), "per_channel": per_channel,
                    "scheme": f"{scheme.weight_channel} symmetric per output channel" if per_channel else
                    f"{scheme.weight} {'symmetric' if scheme.weight_symmetric else 'asymmetric'} per-tensor"},
    }
    scheme.adjust(graph, plan)
    return plan
