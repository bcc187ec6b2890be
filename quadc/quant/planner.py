"""Build the :class:`~quadc.quant.plan.QuantPlan` of one compile: calibration, QSS, anchor, encodings.

:func:`build_plan` is what the ``quant-plan`` stage of the pipeline runs, after the float passes
(``lora-inputs``, ``const-fold``, ``dce``) and before ``qdq-insert``. It puts together modules that each do
one job:

- :mod:`quadc.quant.plan_options`: the options (the ``quant-plan`` pass's), with their table;
- :mod:`quadc.quant.task_calibration`: calibration with every task bound, then the LoRA decision;
- :mod:`quadc.quant.lora_decision`: QSS, anchor or unified fallback, ONE shared encoding per LoRA input;
- :mod:`quadc.quant.activations`: activation encodings and the A8 selection (``a8_fraction``);
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
from quadc.quant.activations import activation_encodings
from quadc.quant.calibrate import static_tensors
from quadc.quant.plan import QuantPlan
from quadc.quant.plan_file import plan_from_encodings_file
from quadc.quant.plan_options import PlanOptions
from quadc.quant.task_calibration import calibrate_and_decide
from quadc.quant.weights import weight_encodings

__all__ = ["build_plan"]


def build_plan(graph: gs.Graph, slots: Mapping[str, Any], tasks: Mapping[str, Mapping[str, np.ndarray]],
               opts: PlanOptions | None = None, progress: Callable[[str], None] = silent_progress, *,
               unquantized: Collection[str] = ()) -> QuantPlan:
    """Every encoding of the compile; ``graph`` is not modified.

    ``slots`` is the LoRA slot table (``ctx.lora_slots``), ``tasks`` every task packed for those slots
    (:func:`quadc.lora.pack.pack_tasks`; empty without LoRAs).
    ``unquantized`` (``ctx.unquantized``) names tensors that get no activation encoding: they stay float
    inside a fused operation (``conv-act-fusion``).
    """
    opts = opts or PlanOptions()
    if opts.encodings_file:
        return plan_from_encodings_file(graph, slots, opts, progress, unquantized)
    cal = calibrate_and_decide(graph, slots, tasks, opts, progress, include_base=True)
    ranges, decision = cal.ranges, cal.decision
    if tasks:
        progress(f"LoRA policy {decision.policy}" + (f", anchor '{decision.anchor}'" if decision.anchor else "")
                 + f": {decision.reason}")
    activations, a8, a8_report = activation_encodings(graph, ranges, cal.feeds, tasks, opts.precision,
                                                      opts.a8_fraction, progress, unquantized,
                                                      headroom=opts.headroom)
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
        "calibration": {"feeds": ranges.feeds, "description": cal.feed_desc, "tasks": list(tasks), "runs": ranges.runs,
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
