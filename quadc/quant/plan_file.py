"""A plan as an AIMET encodings file and back: the one builder of the file artifacts ship
(:func:`encodings_file_of`) and the plan a compile takes from such a file (:func:`plan_from_encodings_file`).

Activations and LoRA slot inputs (graph inputs, so activation entries named by input name, one shared
encoding each) are activation encodings; weights are param encodings. ``quantizer_args`` records the
activation bit width (8 for ``w8a8``, else 16), which is how a plan read back knows its precision, and
lists the LoRA inputs and the activation profile (``activation_profile``, and its anchor), which the
plan read back reports. Writing a plan's file and compiling against it gives the same encodings.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.quant.activations import activation_names
from quadc.quant.calibrate import float_tensors
from quadc.quant.encodings import EncodingsFile, read_encodings
from quadc.quant.plan import QuantPlan
from quadc.quant.plan_options import PlanOptions
from quadc.quant.schemes import EncodingScheme, get_scheme
from quadc.quant.weights import weight_axes

__all__ = ["encodings_file_of", "plan_from_encodings_file"]

_BITS_TO_PRECISION = {8: "w8a8", 16: "w8a16"}


def encodings_file_of(plan: QuantPlan) -> EncodingsFile:
    """The plan's encodings as an AIMET 1.0.0 file (write it with :func:`quadc.quant.encodings.write_encodings`)."""
    activations = {k: v for k, v in plan.activations.items() if k not in plan.lora and k not in plan.weights}
    activations.update(plan.lora)
    weights = list(plan.weights.values())
    args = {
        "activation_bitwidth": 8 if plan.precision == "w8a8" else 16,
        "param_bitwidth": max((e.qtype.bits for e in weights), default=8),
        "dtype": "int",
        "per_channel_quantization": bool(plan.per_channel),
        "quant_scheme": "post_training_tf",
        "quadc_scheme": plan.scheme,
        "lora_inputs": sorted(plan.lora),
        "lora_encodings": "shared by every task",
        "activation_profile": plan.activation_profile,
    }
    if plan.profile_anchor is not None:
        args["activation_profile_anchor"] = plan.profile_anchor
    return EncodingsFile(activations=activations, params=dict(plan.weights), quantizer_args=args)


def plan_from_encodings_file(graph: gs.Graph, slots: Mapping[str, Any], opts: PlanOptions,
                             progress: Callable[[str], None], unquantized: Collection[str] = (),
                             scheme: EncodingScheme | None = None) -> QuantPlan:
    """The plan of ``opts.encodings_file``: every activation, weight and LoRA input of ``graph`` must have
    an encoding there (a one-line QuadcError names the missing ones) in the types of ``scheme`` (default:
    ``opts.scheme``, else ``qnn-htp``); no calibration runs."""
    scheme = scheme or get_scheme(opts.scheme)
    path = Path(str(opts.encodings_file))
    progress(f"reading encodings from {path}")
    ef = read_encodings(path)
    inputs, outputs = float_tensors(graph)
    acts = activation_names(graph, inputs + outputs, unquantized)
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
    # Precision: quantizer_args.activation_bitwidth when the file has it, else the option; a file with
    # 16-bit activations is w8a16 whatever was asked.
    bw = ef.quantizer_args.get("activation_bitwidth")
    precision = _BITS_TO_PRECISION.get(bw, opts.precision) if isinstance(bw, int) else opts.precision
    if len(a8) < len(activations):
        precision = "w8a16"
    lora = {n: ef.get(n) for n in lora_inputs}
    plan = QuantPlan(
        precision=precision,
        scheme=scheme.name,
        ranges={n: (float(np.min(e.tmin)), float(np.max(e.tmax))) for n, e in activations.items()},  # type: ignore[union-attr]
        lora_ranges={n: (float(np.min(e.tmin)), float(np.max(e.tmax))) for n, e in lora.items()},  # type: ignore[union-attr]
        activations=activations,  # type: ignore[arg-type]
        weights={n: ef.get(n) for n in weights},  # type: ignore[misc]
        lora=lora,  # type: ignore[arg-type]
        per_channel=any(ef.get(n).per_channel for n in weights),  # type: ignore[union-attr]
        lora_float_inputs=opts.lora_float_inputs,
        lora_policy="file",
        anchor=None,
        a8_tensors=a8 if precision == "w8a16" else sorted(activations),
        activation_profile=_text(ef.quantizer_args.get("activation_profile")),
        profile_anchor=_text(ef.quantizer_args.get("activation_profile_anchor")),
    )
    plan.report = {
        "source": f"encodings file {path}",
        "calibration": None,
        "qss": None,
        "lora": {"policy": "file", "anchor": None, "reason": "LoRA input encodings read from the encodings file",
                 "inputs": len(lora_inputs)},
        "activation_profile": {"profile": plan.activation_profile,
                               "anchor": plan.profile_anchor,
                               "runs": "as recorded in the encodings file (None: not recorded)"},
        "a8": {"count": len(a8), "of": len(activations)},
        "weights": {"count": len(weights), "per_channel": plan.per_channel},
    }
    if precision != opts.precision:
        plan.report["note"] = f"precision {precision} follows the encodings file (the option said {opts.precision})"
    problems = scheme.check(plan)
    if problems:
        more = f" ({len(problems) - 1} more)" if len(problems) > 1 else ""
        raise QuadcError(f"encodings file '{path}' does not fit encoding scheme '{scheme.name}': {problems[0]}{more}; "
                         "export the file for this target or calibrate instead")
    return plan


def _text(value: Any) -> str | None:
    """A string field of the file's ``quantizer_args``, None when absent or not a string."""
    return value if isinstance(value, str) else None
