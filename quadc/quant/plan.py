"""The quantization plan: every encoding the quantized graph will use, decided before Q/DQ insertion.

The plan is what ties one static graph to every task: each LoRA slot input has exactly ONE encoding
(``lora``), shared by all tasks, chosen from the anchor LoRA (highest QSS) or, in the unified
fallback, from the merged distribution of all LoRAs. Activation encodings come from calibration with
every task bound, so they cover all tasks too.

The plan keeps what calibration found (``ranges``: each encoded activation's calibrated ``(min, max)``;
``lora_ranges``: the range the anchor or unified decision chose for each LoRA input) and the encodings
its ``scheme`` (:mod:`quadc.quant.schemes`) derived from them: ``activations`` maps a float tensor name of
the graph (graph inputs and node outputs) to its encoding (under ``qnn-htp``: uint16 for A16, uint8 for A8
layers); ``weights`` maps constant weight names to their encodings (uint8 per-tensor, or int8 symmetric
per-channel with ``per_channel``); ``lora`` maps LoRA slot input names (``<module>.lora_down`` /
``.lora_up``) to their shared encodings (uint8 under ``qnn-htp``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quadc.quant.affine import Encoding

PRECISIONS = ("w8a16", "w8a8")
LORA_POLICIES = ("anchor", "unified", "file")


@dataclass
class QuantPlan:
    """All encodings of one compile plus how they were chosen (for the manifest and `quadc analyze`)."""

    precision: str = "w8a16"
    scheme: str = "qnn-htp"
    #: The calibration the ranges come from (a key shared by every plan derived from it), when known.
    calibration: str | None = None
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    lora_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    activations: dict[str, Encoding] = field(default_factory=dict)
    weights: dict[str, Encoding] = field(default_factory=dict)
    lora: dict[str, Encoding] = field(default_factory=dict)
    per_channel: bool = False
    lora_float_inputs: bool = False
    lora_policy: str = "anchor"
    anchor: str | None = None
    qss: dict[str, float] = field(default_factory=dict)
    a8_tensors: list[str] = field(default_factory=list)
    #: Which calibration runs the activation ranges come from (``union``, ``anchor``; None: not known).
    activation_profile: str | None = "union"
    #: The anchor whose calibration the activation profile took (None: the union or not known).
    profile_anchor: str | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def restricted_to(self, names: set[str]) -> QuantPlan:
        """A copy keeping the ranges and encodings of the tensors in ``names`` only (e.g. those a graph
        still has after a fusion removed some)."""
        from dataclasses import replace

        def keep(d: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in d.items() if k in names}

        return replace(self, ranges=keep(self.ranges), lora_ranges=keep(self.lora_ranges),
                       activations=keep(self.activations), weights=keep(self.weights), lora=keep(self.lora),
                       a8_tensors=[n for n in self.a8_tensors if n in names])

    def summary(self) -> dict[str, Any]:
        """JSON-ready description for the manifest (no encodings; those go to the encodings file)."""
        lora_type = str(next(iter(self.lora.values())).qtype) if self.lora else "uint8"
        out = {
            "scheme": self.scheme,
            "precision": self.precision,
            "per_channel_weights": self.per_channel,
            "lora_inputs": "float" if self.lora_float_inputs else lora_type,
            "lora_policy": self.lora_policy,
            "anchor": self.anchor,
            "qss": {k: round(float(v), 8) for k, v in sorted(self.qss.items())},
            "activation_profile": self.activation_profile,
            "a8_tensors": len(self.a8_tensors),
            "activation_encodings": len(self.activations),
            "weight_encodings": len(self.weights),
            "lora_encodings": len(self.lora),
        }
        if self.calibration:
            out["calibration"] = self.calibration
        return out
