"""Calibration with every task bound, and the LoRA decision made from it.

:func:`calibrate_tasks` picks the feeds the options ask for (:func:`calibration_feeds`) and runs
:func:`quadc.quant.calibrate.calibrate` once per feed with each task's packed LoRA bound (and once as the
base model when asked), capturing each LoRA layer's inputs for QSS (:func:`lora_captures`). The result, a
:class:`Calibration`, depends on no target: activation ranges (the union over all runs, so one graph's
encodings cover every task) and the QSS samples. Each encoding scheme then makes its own LoRA decision
from it (:func:`quadc.quant.lora_decision.decide_lora`); :func:`calibrate_and_decide` does both, which is
where ``quadc analyze`` stops (the planner goes on to encodings).

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
from quadc.quant.schemes import QNN_HTP, EncodingScheme

__all__ = ["Calibrated", "Calibration", "calibrate_and_decide", "calibrate_tasks", "calibration_feeds", "lora_captures"]


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
class Calibration:
    """What calibration with every task bound yields, for any target: ranges (with the QSS samples in
    ``ranges.samples``), the packed tasks and the feeds used."""

    ranges: Ranges
    tasks: Mapping[str, Mapping[str, np.ndarray]]
    feeds: list[dict[str, np.ndarray]]
    feed_desc: str
    #: What the calibration depends on (:func:`quadc.quant.calibration_cache.calibration_key`), when known.
    key: str = ""


@dataclass
class Calibrated(Calibration):
    """A :class:`Calibration` and the LoRA decision one scheme made from it."""

    decision: LoRADecision | None = None


def calibrate_tasks(graph: gs.Graph, slots: Mapping[str, Any], tasks: Mapping[str, Mapping[str, np.ndarray]],
                    opts: PlanOptions, progress: Callable[[str], None], *, include_base: bool) -> Calibration:
    """Calibrate with each packed task bound (and the base model if asked), capturing the LoRA layer
    inputs QSS needs."""
    feeds, feed_desc = calibration_feeds(graph, opts)
    capture, capture_tasks = lora_captures(graph, slots, tasks)
    progress(f"calibrating on {feed_desc}, {len(tasks)} task(s)" + (" + base model" if include_base else ""))
    ranges = calibrate(graph, feeds, tasks, progress, include_base=include_base, capture=capture,
                       capture_tasks=capture_tasks, max_rows=opts.qss_rows, seed=opts.calib_seed)
    return Calibration(ranges, tasks, feeds, feed_desc)


def calibrate_and_decide(graph: gs.Graph, slots: Mapping[str, Any], tasks: Mapping[str, Mapping[str, np.ndarray]],
                         opts: PlanOptions, progress: Callable[[str], None], *, include_base: bool,
                         scheme: EncodingScheme = QNN_HTP) -> Calibrated:
    """Calibrate with each packed task bound (and the base model if asked), then QSS and the anchor under
    ``scheme``."""
    cal = calibrate_tasks(graph, slots, tasks, opts, progress, include_base=include_base)
    decision = decide_lora(slots, tasks, cal.ranges.samples, opts.lora_policy, opts.qss_tolerance, scheme)
    return Calibrated(cal.ranges, cal.tasks, cal.feeds, cal.feed_desc, decision=decision)
