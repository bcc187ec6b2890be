"""The options of quantization planning: they are the ``quant-plan`` pass's declared options.

CLI flags map one to one, and strings such as ``"0.3"`` or ``"true"`` are accepted
(:mod:`quadc.options` parses them):

======================  ===========  ===================================================================
option                  default      meaning
======================  ===========  ===================================================================
``precision``           ``w8a16``    ``w8a16``: 16-bit activations; ``w8a8``: 8-bit activations
``a8_fraction``         ``0``        w8a16 only: this fraction of activations gets uint8 instead, least
                                     output error first (:mod:`quadc.quant.activations`); the timestep
                                     path, indices and shapes stay 16-bit (:mod:`quadc.quant.structural`)
``a8_runs``             ``0``        calibration runs each A8 measurement covers; 0: one per task plus the
                                     base model (:mod:`quadc.quant.sensitivity`)
``a8_groups``           ``0``        at most this many activation groups are measured for ``a8_fraction``
                                     (forwards = runs x (3 + groups)); 0: each movement unit alone when the
                                     graph has at most 1,000 candidates (tiny U-Net), else 24 (full U-Net)
``a8_range``            ``mse``      the 8-bit ranges ``a8_fraction`` picks: least quantization error over the
                                     calibration runs (:mod:`quadc.quant.a8_ranges`), or ``minmax``: calibrated
``a8_headroom``         ``1.25``     the 8-bit ranges ``a8_fraction`` picks are widened by this factor around
                                     zero (inputs unlike the calibration feeds clip less)
``headroom``            ``2``        16-bit activation ranges are widened by this factor around zero, so
                                     inputs unlike the calibration feeds do not clip
``calib_dir``           none         folder of ``.npz`` feeds (:func:`quadc.quant.feeds.npz_feeds`)
``calib_random``        ``4``        without ``calib_dir``: number of synthetic feeds
                                     (:func:`quadc.quant.feeds.random_feeds`)
``calib_seed``          ``0``        seed of the synthetic feeds and of QSS row sampling
``lora_policy``         ``auto``     ``auto``: anchor (highest QSS) unless all QSS are within
                                     ``qss_tolerance`` -> unified; ``anchor`` / ``unified`` force one
``activation_profile``  ``union``    which calibration runs the activation ranges come from: ``union``:
                                     the base model and every task (no task clips); ``anchor``: the base
                                     model and the anchor only (QUAD's shared profile: the anchor's graph
                                     is its own compile; tensors the anchor leaves constant, such as
                                     other tasks' LoRA branches, keep the union); ``anchor-fit``: the
                                     anchor's ranges where every task's calibrated values fit them after
                                     ``headroom``, the union where one would clip (``quadc align``'s
                                     default; :mod:`quadc.quant.activations`)
``qss_tolerance``       ``0.05``     relative QSS spread under which ``auto`` falls back to unified
``qss_rows``            ``256``      sampled rows per LoRA layer and task kept for QSS
``per_channel``         scheme's     weights int8 symmetric per output channel (true) or per-tensor (false)
                                     where the scheme leaves the choice; unset: the scheme's measured
                                     default (``EncodingScheme.per_channel_default``)
``lora_float_inputs``   ``false``    LoRA inputs stay float (Q/DQ inside the graph), recorded in the plan
``encodings_file``      none         AIMET 1.0.0 encodings JSON: take every encoding from it, no calibration
``scheme``              target's     encoding scheme the encodings are derived in
                                     (:mod:`quadc.quant.schemes`); default: the target's, else ``qnn-htp``
======================  ===========  ===================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from quadc.options import PassOption, parse_options
from quadc.quant.plan import PRECISIONS

__all__ = ["A8_RANGES", "ACTIVATION_PROFILES", "LORA_POLICY_OPTIONS", "PLAN_OPTIONS", "PlanOptions"]

LORA_POLICY_OPTIONS = ("auto", "anchor", "unified")
ACTIVATION_PROFILES = ("union", "anchor", "anchor-fit")
A8_RANGES = ("mse", "minmax")

#: The planner's options: they are the options of the ``quant-plan`` pass (see the table above).
PLAN_OPTIONS: tuple[PassOption, ...] = (
    PassOption("precision", str, "w8a16", "w8a16: 16-bit activations; w8a8: 8-bit activations",
               choices=PRECISIONS),
    PassOption("a8_fraction", float, 0.0, "w8a16 only: this fraction of activations becomes uint8",
               low=0.0, high=1.0),
    PassOption("a8_runs", int, 0, "calibration runs each A8 sensitivity measurement covers (0: one per task "
               "plus the base model)", low=0),
    PassOption("a8_groups", int, 0, "at most this many activation groups are measured for a8_fraction (0: every "
               "unit alone up to 1,000 candidate activations, else 24)", low=0),
    PassOption("a8_range", str, "mse", "8-bit ranges of a8_fraction: least quantization error over the "
               "calibration runs (mse) or the calibrated min/max (minmax)", choices=A8_RANGES),
    PassOption("a8_headroom", float, 1.25, "widen the ranges of a8_fraction's 8-bit activations by this factor "
               "around zero", low=1.0),
    PassOption("headroom", float, 2.0, "widen 16-bit activation ranges by this factor around zero so inputs "
               "unlike the calibration feeds do not clip", low=1.0),
    PassOption("calib_dir", str, None, "folder of .npz calibration feeds"),
    PassOption("calib_random", int, 4, "number of synthetic calibration feeds (without calib_dir)", low=1),
    PassOption("calib_seed", int, 0, "seed of the synthetic feeds and of QSS row sampling", low=0),
    PassOption("lora_policy", str, "auto", "shared LoRA encodings: anchor, unified, or auto",
               choices=LORA_POLICY_OPTIONS),
    PassOption("activation_profile", str, "union", "activation ranges from the base model and every task (union), "
               "the base model and the anchor only (anchor: QUAD's shared profile), or the anchor's where every "
               "task fits them after headroom and the union where one would clip (anchor-fit: quadc align's default)",
               choices=ACTIVATION_PROFILES),
    PassOption("qss_tolerance", float, 0.05, "relative QSS spread under which auto falls back to unified",
               low=0.0),
    PassOption("qss_rows", int, 256, "sampled rows per LoRA layer and task kept for QSS", low=1),
    PassOption("per_channel", bool, None, "int8 symmetric per-channel (true) or per-tensor (false) weights where the "
               "scheme leaves the choice; default: the scheme's"),
    PassOption("lora_float_inputs", bool, False, "keep LoRA inputs float (Q/DQ inside the graph)"),
    PassOption("encodings_file", str, None, "AIMET encodings JSON to take every encoding from"),
    PassOption("scheme", str, None, "encoding scheme (quadc.quant.schemes) the encodings are derived in; "
               "default: the target's, else qnn-htp"),
)


@dataclass(frozen=True)
class PlanOptions:
    """The planner's options, parsed and checked (see the module docstring for their meaning)."""

    precision: str = "w8a16"
    a8_fraction: float = 0.0
    a8_runs: int = 0
    a8_groups: int = 0
    a8_range: str = "mse"
    a8_headroom: float = 1.25
    headroom: float = 2.0
    calib_dir: str | None = None
    calib_random: int = 4
    calib_seed: int = 0
    lora_policy: str = "auto"
    activation_profile: str = "union"
    qss_tolerance: float = 0.05
    qss_rows: int = 256
    per_channel: bool | None = None
    lora_float_inputs: bool = False
    encodings_file: str | None = None
    scheme: str | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PlanOptions:
        """Parse option values (missing or None values take the defaults) with :data:`PLAN_OPTIONS`."""
        values = parse_options(PLAN_OPTIONS, {k: v for k, v in options.items() if v is not None}, "quant-plan")
        return cls(**values)
