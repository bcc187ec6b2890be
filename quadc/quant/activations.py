"""Activation encodings: which float tensors are activations, their encodings, and which get 8 bits.

Activations are the graph's float inputs and node outputs except LoRA slot inputs (encoded by the LoRA
decision), tensors computed only from constants and shapes (an attention's ``sqrt(head_dim)``:
:func:`quadc.quant.calibrate.static_tensors`) and tensors kept float inside a fused operation
(``ctx.unquantized``: a Conv output read only by its fused activation, from ``conv-act-fusion``). Each gets
the scheme's 16-bit type (``w8a16``) or its 8-bit type (``w8a8``) from its calibrated range
(:meth:`quadc.quant.schemes.EncodingScheme.activation_encoding`; uint16/uint8 asymmetric under ``qnn-htp``).

**Activation profile** (:func:`profile_ranges`, option ``activation_profile``): the ranges the encodings
come from. ``union`` (default): the base model and every task, so no task's activations clip. ``anchor``:
the base model and the anchor task only, QUAD's shared profile ("the anchor's PTQ encodings serve as the
shared profile; the non-anchor LoRAs are fine-tuned under the anchor's profile"): the anchor's graph then
has the encodings of the anchor compiled alone, and ``quadc align`` trains the other LoRAs to work under
them. A tensor that the anchor's runs leave at one value (the LoRA branch of a layer only other tasks
adapt: zero there) carries no anchor range and keeps the union; for the anchor it stays exact either way.
``anchor-fit``: the anchor's ranges where they serve every task, the union where another task's calibrated
values fall outside the anchor's range even after the 16-bit ``headroom`` (that task would clip there,
and the layer level of alignment cannot undo clipping downstream of a LoRA branch): the anchor is then
exact except on those tensors. Under the unified fallback there is no anchor and the profile is the union.

**A8 selection** (``a8_fraction`` F, w8a16 only): ``k = round(F * N)`` of the ``N`` activations get the
8-bit type, chosen by what 8 bits do to the model's output over calibration runs of the base model and
every task (:func:`quadc.quant.sensitivity.choose_a8`: module groups ranked by relative output error per
tensor, greedy, refined where the choice is made). Tensors the structural rules protect (the timestep
embedding's path, indices and shapes: :func:`quadc.quant.structural.protected_activations`) stay 16-bit
whatever F says, so F = 1 leaves them 16-bit too; ``precision=w8a8`` makes every activation 8-bit.
The candidates' 8-bit ranges (``a8_range``) are those of least quantization error over the calibration runs
(``mse``: :mod:`quadc.quant.a8_ranges`) or the calibrated min/max (``minmax``), widened by ``a8_headroom``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import silent_progress
from quadc.errors import QuadcError
from quadc.quant.a8_ranges import mse_ranges
from quadc.quant.affine import Encoding
from quadc.quant.calibrate import BASE, Ranges, _runs, static_tensors
from quadc.quant.plan_options import A8_RANGES, ACTIVATION_PROFILES
from quadc.quant.schemes import QNN_HTP, EncodingScheme
from quadc.quant.sensitivity import choose_a8
from quadc.quant.structural import protected_activations
from quadc.unet_inputs import is_lora_input

__all__ = ["a8_count", "activation_encodings", "activation_names", "profile_ranges"]


def activation_names(graph: gs.Graph, names: Iterable[str], unquantized: Collection[str] = ()) -> list[str]:
    """``names`` less LoRA slot inputs, static tensors and ``unquantized`` ones, in order."""
    static = static_tensors(graph)
    return [n for n in names if not is_lora_input(n) and n not in static and n not in unquantized]


def profile_ranges(ranges: Ranges, profile: str, anchor: str | None, headroom: float = 1.0
                   ) -> tuple[Mapping[str, tuple[float, float]], dict[str, Any]]:
    """``(ranges, report)``: the calibrated ranges of activation profile ``profile`` (see the module
    docstring): ``ranges`` itself for ``union`` or without an anchor, else the base model's and the
    ``anchor``'s runs, with the union where those runs leave a tensor at one value and, for
    ``anchor-fit``, where another task's calibrated values fall outside the anchor's range widened by
    ``headroom`` (the 16-bit grids' headroom)."""
    if profile not in ACTIVATION_PROFILES:
        raise QuadcError(f"activation_profile must be one of {', '.join(ACTIVATION_PROFILES)}, got '{profile}'")
    if profile == "union" or anchor is None:
        runs = "the base model and every task" if ranges.tasks else "the base model"
        note = f" (no anchor under the unified fallback: {profile} is the union)" if profile != "union" else ""
        return ranges, {"profile": "union", "requested": profile, "runs": runs + note}
    own = ranges.of_runs([BASE, anchor])
    out: dict[str, tuple[float, float]] = {}
    constant = clipping = 0
    for name, union in ranges.items():
        mine = own.get(name)
        if is_lora_input(name):  # encoded by the LoRA decision, not from these ranges
            out[name] = union
        elif mine is None or mine[0] == mine[1]:
            out[name] = union
            constant += mine != union
        elif profile == "anchor-fit" and (union[0] < min(mine[0] * headroom, 0.0)
                                          or union[1] > max(mine[1] * headroom, 0.0)):
            out[name] = union
            clipping += 1
        else:
            out[name] = mine
    report: dict[str, Any] = {"profile": profile, "requested": profile, "anchor": anchor,
                              "runs": f"the base model and the anchor '{anchor}'",
                              "union_where_anchor_constant": constant,
                              "narrower": sum(1 for n, r in out.items() if r != ranges[n])}
    if profile == "anchor-fit":
        report["union_where_a_task_clips"] = clipping
        report["headroom"] = headroom
    return out, report


def a8_count(fraction: float, total: int) -> int:
    """How many of ``total`` activations ``a8_fraction=fraction`` asks for: ``round(fraction * total)``."""
    if not 0.0 <= fraction <= 1.0:
        raise QuadcError(f"a8_fraction must be in [0, 1], got {fraction}")
    return int(math.floor(fraction * total + 0.5))


def activation_encodings(graph: gs.Graph, ranges: Mapping[str, tuple[float, float]],
                         feeds: Sequence[Mapping[str, np.ndarray]], tasks: Mapping[str, Mapping[str, np.ndarray]],
                         precision: str, a8_fraction: float, progress: Callable[[str], None],
                         unquantized: Collection[str] = (), headroom: float = 1.0,
                         scheme: EncodingScheme = QNN_HTP, a8_runs: int = 0,
                         a8_groups: int = 0, a8_headroom: float = 1.0, a8_range: str = "mse",
                         calib_feeds: Sequence[Mapping[str, np.ndarray]] = ()
                         ) -> tuple[dict[str, Encoding], list[str], dict[str, Any]]:
    """``(encodings, a8 tensors, report)`` of the activations among the calibrated ``ranges``, in the
    ``scheme``'s types; the output sensitivity is measured (on ``feeds`` x ``tasks``, ``a8_runs`` runs and
    at most ``a8_groups`` groups: :func:`~quadc.quant.sensitivity.choose_a8`) only when
    ``0 < a8_fraction < 1`` under w8a16.

    16-bit ranges are widened by ``headroom`` around zero: a few calibration feeds never show the extremes
    of every input, and clipping an unseen input costs far more than the resolution given up (on the
    bundled model, held-out SQNR went from 24-30 dB to 33-37 dB at 2x; a 2x wider uint16 grid still has
    about 90 dB of resolution). ``w8a8`` ranges are kept as calibrated: there every bit counts. The 8-bit
    ranges of ``a8_fraction`` are those of least quantization error over ``calib_feeds`` (``a8_range="mse"``,
    :func:`~quadc.quant.a8_ranges.mse_ranges`; ``feeds`` when none are given) or the calibrated ones
    (``"minmax"``), widened by ``a8_headroom`` (1.25 in the plan options): ranges fit to 4 feeds clip new
    inputs more often.
    """
    acts = activation_names(graph, ranges, unquantized)
    bits = 8 if precision == "w8a8" else 16
    h = headroom if bits == 16 else 1.0
    activations = {n: scheme.activation_encoding(ranges[n][0] * h, ranges[n][1] * h, bits) for n in acts}
    report: dict[str, Any] = {"fraction": a8_fraction, "of": len(acts)}
    if precision == "w8a8":
        a8 = sorted(acts)
        report["note"] = f"w8a8: every activation is {scheme.activation8} (a8_fraction ignored)"
    elif a8_fraction <= 0.0 or not acts:
        a8 = []
    else:
        protected = protected_activations(graph, acts)
        candidates = [n for n in acts if n not in protected]
        ranges8 = _a8_ranges(graph, {n: ranges[n] for n in candidates}, a8_range, calib_feeds or feeds, tasks,
                             progress)
        enc8 = {n: scheme.activation_encoding(ranges8[n][0] * a8_headroom, ranges8[n][1] * a8_headroom, 8)
                for n in candidates}
        report["range"] = {"method": a8_range, "headroom": a8_headroom}
        k = min(a8_count(a8_fraction, len(acts)), len(candidates))
        if k < len(candidates):
            progress(f"choosing {k} of {len(candidates)} activations for {scheme.activation8} "
                     f"(a8_fraction={a8_fraction}) by output error")
        choice = choose_a8(graph, candidates, k, activations, enc8, feeds, tasks, runs=a8_runs,
                           max_groups=a8_groups, progress=progress)
        a8 = choice.tensors
        report["protected"] = {rule: sum(1 for r in protected.values() if r == rule)
                               for rule in sorted(set(protected.values()))}
        if choice.costs:
            report["sensitivity"] = ("relative output error energy with the group at "
                                     f"{scheme.activation8}, mean over {choice.runs} calibration run(s); "
                                     "lowest per tensor first")
            report["forwards"] = choice.forwards
            report["groups"] = {g: {"tensors": n, "output_sqnr_db": _db(c)} for g, (n, c) in choice.costs.items()}
            report["chosen_groups"] = choice.chosen_groups
            report["output_sqnr_db"] = {"predicted": _db(choice.predicted), "measured": _db(choice.measured)}
            report["method"] = choice.method
        for n in a8:
            activations[n] = enc8[n]
    report["count"] = len(a8)
    return activations, a8, report


def _a8_ranges(graph: gs.Graph, ranges: Mapping[str, tuple[float, float]], method: str,
               feeds: Sequence[Mapping[str, np.ndarray]], tasks: Mapping[str, Mapping[str, np.ndarray]],
               progress: Callable[[str], None]) -> Mapping[str, tuple[float, float]]:
    """The candidates' 8-bit ranges before headroom: the calibrated ones (``minmax``) or those of least
    quantization error over the calibration runs of the base model and every task (``mse``,
    :func:`quadc.quant.a8_ranges.mse_ranges`)."""
    if method not in A8_RANGES:
        raise QuadcError(f"a8_range must be one of {', '.join(A8_RANGES)}, got '{method}'")
    if method == "minmax" or not feeds:
        return ranges
    runs = [b for _, _, b in _runs(graph, feeds, tasks, True, silent_progress, "A8 ranges")]
    return mse_ranges(graph, ranges, runs, progress=progress)


def _db(noise_ratio: float) -> float | None:
    return round(-10 * math.log10(noise_ratio), 2) if noise_ratio > 0 else None
