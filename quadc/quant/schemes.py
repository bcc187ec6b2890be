"""Encoding schemes: how one set of calibrated ranges becomes one target's integer encodings.

Calibration (:mod:`quadc.quant.task_calibration`) yields float ranges that do not depend on any target.
A scheme turns them into encodings the target's kernels take:

=============  =====================  ==========================  ======================  =================
scheme         activations (16 / 8)   weights                     LoRA inputs             MatMul inputs
=============  =====================  ==========================  ======================  =================
``qnn-htp``    uint16 / uint8 asym.   uint8 asym. per tensor, or  uint8 asymmetric        (u8,u8), (u8,u16),
                                      int8 symmetric per channel                          (u16,u8)
=============  =====================  ==========================  ======================  =================

A scheme is an :class:`EncodingScheme` (subclass it to change more than the table's fields): its
methods compute each kind of encoding, :meth:`EncodingScheme.adjust` may rewrite encodings that depend
on the graph (fixed output scales, equal scales into a concatenation) after the default derivation, and
:meth:`EncodingScheme.check` lists where a plan breaks the scheme (a plan read from an encodings file is
checked with it). QSS scores every LoRA under the scheme's LoRA type, so the anchor, the unified fallback
and the shared LoRA encodings are the scheme's own.

Schemes are found by name: the built-in ``qnn-htp``, those registered with :func:`register_scheme` and
those of the ``quadc.schemes`` entry-point group (an :class:`EncodingScheme` instance or a class that
builds one), which is how a target package adds its own::

    [project.entry-points."quadc.schemes"]
    tflite-16x8 = "mypkg.scheme:TFLITE_16X8"
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from quadc.errors import QuadcError
from quadc.quant.affine import Encoding, QType, compute_encoding, encoding_from_tensor

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from quadc.quant.plan import QuantPlan

__all__ = ["DEFAULT_SCHEME", "ENTRY_POINT_GROUP", "QNN_HTP", "EncodingScheme", "get_scheme", "register_scheme",
           "registered_schemes"]

ENTRY_POINT_GROUP = "quadc.schemes"
DEFAULT_SCHEME = "qnn-htp"


@dataclass(frozen=True)
class EncodingScheme:
    """The integer types one target takes, and how calibrated ranges become its encodings.

    ``activation16``/``activation8``: the 16- and 8-bit activation types (``w8a16`` uses the first, A8
    tensors and ``w8a8`` the second); ``activation_symmetric``: zero point at the type's midpoint (0 for
    signed types). ``weight``: per-tensor weight type; ``weight_channel``: the type of per-channel
    weights (always symmetric); ``per_channel``: ``None`` follows the ``per_channel`` option, True or
    False forces it; ``per_channel_default``: what an unset ``per_channel`` option means (chosen by
    measurement, ``benchmarks/bench_align.py``). ``lora``/``lora_symmetric``: the type of the LoRA slot inputs and their shared
    encodings. ``matmul_pairs``: the (input 0, input 1) types a MatMul of two activations may take
    (empty: any).
    """

    name: str
    description: str
    activation16: QType = QType.UINT16
    activation8: QType = QType.UINT8
    activation_symmetric: bool = False
    weight: QType = QType.UINT8
    weight_symmetric: bool = False
    weight_channel: QType = QType.INT8
    per_channel: bool | None = None
    per_channel_default: bool = False
    lora: QType = QType.UINT8
    lora_symmetric: bool = False
    matmul_pairs: frozenset[tuple[QType, QType]] = frozenset()

    # ------------------------------------------------------------------------------------ encodings
    def activation_qtype(self, bits: int) -> QType:
        """The activation type of ``bits`` (16 or 8) bits."""
        if bits not in (8, 16):
            raise QuadcError(f"scheme '{self.name}' has 8- and 16-bit activations, not {bits}-bit")
        return self.activation16 if bits == 16 else self.activation8

    def activation_encoding(self, lo: float, hi: float, bits: int = 16) -> Encoding:
        """The encoding of an activation calibrated to ``[lo, hi]``."""
        return compute_encoding(lo, hi, self.activation_qtype(bits), symmetric=self.activation_symmetric)

    def weights_per_channel(self, requested: bool | None) -> bool:
        """Whether weights are per channel, given the ``per_channel`` option (None: not set)."""
        if self.per_channel is not None:
            return self.per_channel
        return self.per_channel_default if requested is None else requested

    def weight_encoding(self, values: np.ndarray, axis: int, per_channel: bool) -> Encoding:
        """The encoding of a constant weight (``axis``: its output-channel axis); 1-D weights stay per
        tensor."""
        if per_channel and np.ndim(values) >= 2:
            return encoding_from_tensor(values, self.weight_channel, symmetric=True, axis=axis)
        return encoding_from_tensor(values, self.weight, symmetric=self.weight_symmetric)

    def lora_encoding(self, lo: float, hi: float) -> Encoding:
        """The shared encoding of a LoRA slot input whose chosen range is ``[lo, hi]``."""
        return compute_encoding(lo, hi, self.lora, symmetric=self.lora_symmetric)

    # ----------------------------------------------------------------------------------- graph hooks
    def adjust(self, graph: gs.Graph, plan: QuantPlan) -> None:
        """Rewrite encodings that the graph constrains (fixed output scales, equal concatenation scales),
        after the default derivation. The base scheme has none."""

    def check(self, plan: QuantPlan) -> list[str]:
        """Where ``plan`` breaks the scheme's types (empty: it keeps them)."""
        problems: list[str] = []
        allowed_acts = {self.activation16, self.activation8}
        for name, enc in plan.activations.items():
            if enc.qtype not in allowed_acts:
                problems.append(f"activation '{name}' is {enc.qtype}, the scheme takes "
                                f"{self.activation16}/{self.activation8}")
        for name, enc in plan.lora.items():
            if enc.qtype is not self.lora and not plan.lora_float_inputs:
                problems.append(f"LoRA input '{name}' is {enc.qtype}, the scheme takes {self.lora}")
        for name, enc in plan.weights.items():
            if enc.qtype not in (self.weight, self.weight_channel):
                problems.append(f"weight '{name}' is {enc.qtype}, the scheme takes {self.weight}/{self.weight_channel}")
        return problems

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for manifests and encodings files."""
        return {
            "name": self.name,
            "activations": f"{self.activation16}/{self.activation8}"
                           + (" symmetric" if self.activation_symmetric else " asymmetric"),
            "weights": f"{self.weight}" + (" symmetric" if self.weight_symmetric else " asymmetric")
                       + f" per tensor or {self.weight_channel} symmetric per channel",
            "lora_inputs": f"{self.lora}" + (" symmetric" if self.lora_symmetric else " asymmetric"),
            "matmul_pairs": sorted(f"{a},{b}" for a, b in self.matmul_pairs),
        }


def _pairs(items: Iterable[tuple[QType, QType]]) -> frozenset[tuple[QType, QType]]:
    return frozenset(items)


#: Qualcomm HTP: uint16/uint8 asymmetric activations, 8-bit weights, uint8 asymmetric LoRA inputs; a MatMul
#: of two activations takes (u8, u8), (u8, u16) or (u16, u8).
QNN_HTP = EncodingScheme(
    name="qnn-htp",
    description="Qualcomm HTP: uint16 asymmetric activations, 8-bit weights, uint8 asymmetric LoRA inputs",
    matmul_pairs=_pairs([(QType.UINT8, QType.UINT8), (QType.UINT8, QType.UINT16), (QType.UINT16, QType.UINT8)]),
)

_REGISTRY: dict[str, EncodingScheme] = {QNN_HTP.name: QNN_HTP}
_PLUGINS_LOADED = False


def register_scheme(scheme: EncodingScheme) -> EncodingScheme:
    """Register ``scheme`` under its name (the same object again is a no-op; another one is an error)."""
    if not isinstance(scheme, EncodingScheme):
        raise QuadcError(f"an encoding scheme must be an EncodingScheme, got {type(scheme).__name__}")
    known = _REGISTRY.get(scheme.name)
    if known is not None and known != scheme:
        raise QuadcError(f"encoding scheme '{scheme.name}' is registered twice with different definitions")
    _REGISTRY[scheme.name] = scheme
    return scheme


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from quadc.plugins import plugin_label, plugins

    for ep, obj in plugins(ENTRY_POINT_GROUP, "encoding scheme"):
        try:
            scheme = obj() if isinstance(obj, type) else obj
        except Exception as exc:  # a broken plugin says so in one line
            raise QuadcError(f"{plugin_label('encoding scheme', ep)} failed to load: {exc}") from None
        register_scheme(scheme)


def registered_schemes() -> dict[str, EncodingScheme]:
    """Every known scheme by name: the built-ins, registered ones and the entry points'."""
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_scheme(scheme: str | EncodingScheme | None) -> EncodingScheme:
    """The scheme called ``scheme`` (an :class:`EncodingScheme` is registered and returned; None is
    :data:`DEFAULT_SCHEME`)."""
    if isinstance(scheme, EncodingScheme):
        return register_scheme(scheme)
    name = scheme or DEFAULT_SCHEME
    schemes = registered_schemes()
    if name not in schemes:
        raise QuadcError(f"unknown encoding scheme '{name}'; known schemes: {', '.join(schemes)}")
    return schemes[name]
