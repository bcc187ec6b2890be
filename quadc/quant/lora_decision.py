"""The LoRA decision: QSS per task, anchor or unified fallback, and ONE shared encoding per LoRA input.

:mod:`quadc.quant.qss` scores every task (QSS); :func:`decide_lora` picks the policy (the anchor, the
most quantization-sensitive LoRA, whose own PTQ encodings become the shared ones, or the unified
fallback, the merged ranges of all LoRAs, when no LoRA stands out) and gives each slot input one
encoding shared by every task. Everything is evaluated in the encoding scheme's LoRA type
(:class:`quadc.quant.schemes.EncodingScheme`: uint8 asymmetric under ``qnn-htp``), so each scheme makes
its own decision from the same calibration samples. :meth:`LoRADecision.report` is the QSS table (per task: QSS, mean and
worst per-layer SQNR, SQNR under the shared encodings) and why the policy and anchor were chosen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quadc.errors import QuadcError
from quadc.quant.plan_options import LORA_POLICY_OPTIONS
from quadc.quant.qss import (
    LoRAEncodings,
    TaskScore,
    compute_qss,
    select_anchor,
    shared_lora_encodings,
    shared_sqnr,
)
from quadc.quant.schemes import QNN_HTP, EncodingScheme

__all__ = ["LoRADecision", "decide_lora", "qss_definition"]


def qss_definition(scheme: EncodingScheme = QNN_HTP) -> str:
    """How QSS is computed, naming the scheme's LoRA type."""
    kind = f"{scheme.lora} {'symmetric' if scheme.lora_symmetric else 'asymmetric'}"
    return ("QSS = mean over the task's LoRA layers of mean over sampled inputs x of JS_base2(softmax(f(x;w)/tau) || "
            "softmax(f(x;w~)/tau)), f = the LoRA branch x@down@up (packed, scale folded into up), w~ = its own "
            f"{kind} per-tensor PTQ (scheme {scheme.name}), softmax over output channels per token/pixel, "
            "tau = RMS of f(x;w) over channels")


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
    scheme: EncodingScheme = QNN_HTP

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
            "definition": qss_definition(self.scheme),
            "scheme": self.scheme.name,
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
                tolerance: float = 0.05, scheme: EncodingScheme = QNN_HTP) -> LoRADecision:
    """Score every task (QSS), choose anchor or unified per ``requested`` and build the shared encodings,
    all in the ``scheme``'s LoRA type."""
    if requested not in LORA_POLICY_OPTIONS:
        raise QuadcError(f"LoRA policy '{requested}' is not one of {', '.join(LORA_POLICY_OPTIONS)}")
    scores = compute_qss(slots, tasks, samples, scheme.lora, scheme.lora_symmetric)
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
    encodings = shared_lora_encodings(slots, tasks, policy, anchor, scheme.lora, scheme.lora_symmetric)
    for name, enc in encodings.items():  # the scheme has the last word on the shared range's encoding
        encodings[name] = scheme.lora_encoding(float(enc.tmin), float(enc.tmax))
    if encodings.fallback:
        reason += (f"; the anchor does not adapt {len(encodings.fallback)} LoRA input(s), which use the merged "
                   "range of all LoRAs")
    return LoRADecision(scores, requested, policy, anchor, reason, tolerance, encodings,
                        shared_sqnr(slots, tasks, samples, encodings, scores) if tasks else {}, scheme)
