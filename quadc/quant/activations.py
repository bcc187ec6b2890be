"""Activation encodings: which float tensors are activations, their encodings, and which get 8 bits.

Activations are the graph's float inputs and node outputs except LoRA slot inputs (encoded by the LoRA
decision), tensors computed only from constants and shapes (an attention's ``sqrt(head_dim)``:
:func:`quadc.quant.calibrate.static_tensors`) and tensors kept float inside a fused operation
(``ctx.unquantized``: a Conv output read only by its fused activation, from ``conv-act-fusion``). Each gets
the scheme's 16-bit type (``w8a16``) or its 8-bit type (``w8a8``) from its calibrated range
(:meth:`quadc.quant.schemes.EncodingScheme.activation_encoding`; uint16/uint8 asymmetric under ``qnn-htp``).

**A8 sensitivity** (``a8_fraction``, w8a16 only): each activation is fake-quantized with its own 8-bit
encoding over the whole calibration set (every feed x task) and its SQNR measured
(:func:`quadc.quant.calibrate.measure_sqnr`); the highest-SQNR tensors (least harmed by 8 bits) are the
``round(a8_fraction * N)`` that get uint8 (:func:`select_a8`), ties broken by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.quant.affine import Encoding
from quadc.quant.calibrate import measure_sqnr, static_tensors
from quadc.quant.schemes import QNN_HTP, EncodingScheme
from quadc.unet_inputs import is_lora_input

__all__ = ["activation_encodings", "activation_names", "select_a8"]


def activation_names(graph: gs.Graph, names: Iterable[str], unquantized: Collection[str] = ()) -> list[str]:
    """``names`` less LoRA slot inputs, static tensors and ``unquantized`` ones, in order."""
    static = static_tensors(graph)
    return [n for n in names if not is_lora_input(n) and n not in static and n not in unquantized]


def select_a8(sqnr: Mapping[str, float], fraction: float) -> list[str]:
    """The ``round(fraction * N)`` tensors with the highest SQNR (least sensitive), ties by name."""
    if not 0.0 <= fraction <= 1.0:
        raise QuadcError(f"a8_fraction must be in [0, 1], got {fraction}")
    k = int(math.floor(fraction * len(sqnr) + 0.5))
    ranked = sorted(sqnr, key=lambda n: (-sqnr[n], n))
    return sorted(ranked[:k])


def activation_encodings(graph: gs.Graph, ranges: Mapping[str, tuple[float, float]],
                         feeds: Sequence[Mapping[str, np.ndarray]], tasks: Mapping[str, Mapping[str, np.ndarray]],
                         precision: str, a8_fraction: float, progress: Callable[[str], None],
                         unquantized: Collection[str] = (), headroom: float = 1.0,
                         scheme: EncodingScheme = QNN_HTP) -> tuple[dict[str, Encoding], list[str], dict[str, Any]]:
    """``(encodings, a8 tensors, report)`` of the activations among the calibrated ``ranges``, in the
    ``scheme``'s types; SQNR is measured (on ``feeds`` x ``tasks``) only when ``0 < a8_fraction < 1``
    under w8a16.

    16-bit ranges are widened by ``headroom`` around zero: a few calibration feeds never show the extremes
    of every input, and clipping an unseen input costs far more than the resolution given up (on the
    bundled model, held-out SQNR went from 24-30 dB to 33-37 dB at 2x; a 2x wider uint16 grid still has
    about 90 dB of resolution). 8-bit ranges are kept as calibrated: there every bit counts.
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
        enc8 = {n: scheme.activation_encoding(*ranges[n], 8) for n in acts}
        if a8_fraction >= 1.0:
            a8 = sorted(acts)
        else:
            progress(f"measuring 8-bit SQNR of {len(acts)} activations for a8_fraction={a8_fraction}")
            sqnr = measure_sqnr(graph, feeds, enc8, tasks, progress)
            a8 = select_a8(sqnr, a8_fraction)
            chosen = [sqnr[n] for n in a8]
            report["threshold_sqnr_db"] = float(min(chosen)) if chosen and math.isfinite(min(chosen)) else None
            report["sensitivity"] = (f"SQNR of {scheme.activation8} fake-quant over all calibration runs; "
                                     "highest = least sensitive")
        for n in a8:
            activations[n] = enc8[n]
    report["count"] = len(a8)
    return activations, a8, report
