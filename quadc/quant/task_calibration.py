"""Calibration with every task bound, and the LoRA decision made from it.

:func:`calibrate_and_decide` picks the feeds the options ask for (:func:`calibration_feeds`), runs
:func:`quadc.quant.calibrate.calibrate` once per feed with each task's packed LoRA bound (and once as the
base model when asked), capturing each LoRA layer's inputs for QSS (:func:`lora_captures`), then makes
the LoRA decision (:func:`quadc.quant.lora_decision.decide_lora`). Activation ranges are the union over
all those runs, so one graph's encodings cover every task. ``quadc analyze`` stops here; the planner
goes on to encodings.

Tasks come packed (``{task: {slot input name: float32 array}}``, :func:`quadc.lora.pack.pack_tasks`):
this package quantizes tensors and never reads LoRA files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.quant.calibrate import Capture, Ranges, calibrate
from quadc.quant.feeds import npz_feeds, random_feeds
from quadc.quant.lora_decision import LoRADecision, decide_lora
from quadc.quant.plan_options import PlanOptions
from quadc.quant.qss import lora_layer_captures, touched_slots

__all__ = ["Calibrated", "calibrate_and_decide", "calibration_feeds", "lora_captures"]


def calibration_feeds(graph: gs.Graph, opts: PlanOptions) -> tuple[list[dict[str, np.ndarray]], str]:
    """The feeds ``opts`` asks for and a one-line description of them."""
    if opts.calib_dir:
        feeds = npz_feeds(opts.calib_dir, graph)
        return feeds, f"{len(feeds)} .npz feeds from {opts.calib_dir}"
    feeds = random_feeds(graph, opts.calib_random, seed=opts.calib_seed)
    return feeds, f"{len(feeds)} synthetic feeds (LCM/Euler/8-step schedules, seed {opts.calib_seed})"


def lora_captures(graph: gs.Graph, slots: Mapping[str, Any], tasks: Mapping[str, Mapping[str, np.ndarray]]
                  ) -> tuple[dict[str, tuple[str, Capture]], dict[str, list[str]]]:
    """``(capture, capture_tasks)`` arguments of :func:`calibrate` for QSS: every slot's layer input, and
    per task only the layers it adapts."""
    if not tasks:
        return {}, {}
    capture = lora_layer_captures(graph, slots)
    return capture, {task: touched_slots(packed, slots) for task, packed in tasks.items()}


@dataclass
class Calibrated:
    """What calibration with every task bound yields: ranges, the LoRA decision, and the feeds used."""

    ranges: Ranges
    tasks: Mapping[str, Mapping[str, np.ndarray]]
    decision: LoRADecision
    feeds: list[dict[str, np.ndarray]]
    feed_desc: str


def calibrate_and_decide(graph: gs.Graph, slots: Mapping[str, Any], tasks: Mapping[str, Mapping[str, np.ndarray]],
                         opts: PlanOptions, progress: Callable[[str], None], *, include_base: bool) -> Calibrated:
    """Calibrate with each packed task bound (and the base model if asked), then QSS and the anchor."""
    feeds, feed_desc = calibration_feeds(graph, opts)
    capture, capture_tasks = lora_captures(graph, slots, tasks)
    progress(f"calibrating on {feed_desc}, {len(tasks)} task(s)" + (" + base model" if include_base else ""))
    ranges = calibrate(graph, feeds, tasks, progress, include_base=include_base, capture=capture,
                       capture_tasks=capture_tasks, max_rows=opts.qss_rows, seed=opts.calib_seed)
    decision = decide_lora(slots, tasks, ranges.samples, opts.lora_policy, opts.qss_tolerance)
    return Calibrated(ranges, tasks, decision, feeds, feed_desc)
