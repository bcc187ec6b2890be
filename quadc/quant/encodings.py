"""AIMET encodings JSON, format version 1.0.0: what Qualcomm's converter reads via ``--quantization_overrides``.

File layout (keys written sorted, entries sorted by name)::

    {
      "version": "1.0.0",
      "activation_encodings": [
        {"name": "x", "dtype": "INT", "bw": 16, "enc_type": "PER_TENSOR", "is_sym": false,
         "scale": [0.0001], "offset": [-35799]}
      ],
      "param_encodings": [
        {"name": "w", "dtype": "INT", "bw": 8, "enc_type": "PER_CHANNEL", "is_sym": true,
         "scale": [0.01, 0.02], "offset": [-128, -128]}
      ],
      "quantizer_args": {...}
    }

**Offset convention** (AIMET's, from ``AffineEncoding.to_qnn_encoding_dict`` in aimet_torch v2, which
exports ``offset - 2**(bw-1)`` for signed encodings, and AIMET's ``min = (offset + qmin) * scale``):
``offset`` is the negated zero point on the *unsigned* grid ``[0, 2**bw - 1]``, so
``real = scale * (q_u + offset)``. For a :class:`~quadc.quant.affine.Encoding` with zero point ``zp``::

    offset = -zp                      unsigned qtype (uint8, uint16)
    offset = -(zp + 2**(bw - 1))      signed qtype (int8, int16), where q_u = q + 2**(bw - 1)

so a symmetric int8 encoding (zp 0) and a symmetric uint8 one (zp 128) both write ``offset -128``, and an
asymmetric uint16 with zp 35799 writes ``offset -35799``.

**Reading back the qtype.** The format stores only ``bw``, ``is_sym`` and ``offset``; quadc reads
``is_sym: true`` as the signed type and ``is_sym: false`` as the unsigned type (QNN's usual int8 symmetric
weights and uint8/uint16 asymmetric activations). An encoding of the other signedness is written with the
same numbers plus a note in ``quantizer_args["quadc_qtypes"]`` (``{name: "int8", ...}``), which the
converter ignores, so :func:`read_encodings` returns exactly the encodings written: bit-identical float32
scales, identical zero points, qtypes, axes and symmetric flags. Scales are written as the shortest decimal
of their float64 value, which reads back to the same float32.

AIMET's "unsigned symmetric" entries (``is_sym: true`` with an offset other than ``-2**(bw-1)``, e.g. 0
after a ReLU) are read as asymmetric unsigned encodings with the same grid.

**Axis.** 1.0.0 per-channel entries carry no axis (AIMET exports axis 0); quadc writes an ``"axis"`` key
only for a per-channel encoding whose axis is not 0, and reads a missing one as 0.

The recorded float range (``Encoding.tmin``/``tmax``) is not part of the format; read encodings get the
representable range instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quadc.errors import QuadcError
from quadc.paths import replaced_atomically
from quadc.quant.affine import Encoding, QType

__all__ = [
    "ENCODINGS_VERSION",
    "EncodingsFile",
    "encodings_from_dict",
    "encodings_to_dict",
    "read_encodings",
    "write_encodings",
]

#: The AIMET encodings format version quadc reads and writes.
ENCODINGS_VERSION = "1.0.0"
#: Key of ``quantizer_args`` that records qtypes other than the one ``is_sym`` implies.
QTYPES_KEY = "quadc_qtypes"

_SECTIONS = (("activation_encodings", "activations"), ("param_encodings", "params"))
_REQUIRED = ("name", "dtype", "bw", "enc_type", "is_sym", "scale", "offset")


@dataclass
class EncodingsFile:
    """The contents of an encodings file: activation and parameter encodings by tensor name.

    ``quantizer_args`` is AIMET's free-form record of how the encodings were made (bit widths, scheme);
    quadc keeps whatever is there and adds nothing but its reserved ``quadc_qtypes`` key on write.
    """

    activations: dict[str, Encoding] = field(default_factory=dict)
    params: dict[str, Encoding] = field(default_factory=dict)
    quantizer_args: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Encoding | None:
        """The encoding of tensor ``name`` (activation or parameter), or None."""
        if name in self.activations:
            return self.activations[name]
        return self.params.get(name)


def _canonical_qtype(bits: int, is_sym: bool) -> QType:
    return QType.from_bits(bits, signed=is_sym)


def _offsets(enc: Encoding) -> list[int]:
    shift = 1 << (enc.qtype.bits - 1) if enc.qtype.signed else 0
    return [-(int(z) + shift) for z in enc.zero_point.reshape(-1)]


def _entry(name: str, enc: Encoding) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "dtype": "INT",
        "bw": enc.qtype.bits,
        "enc_type": "PER_CHANNEL" if enc.per_channel else "PER_TENSOR",
        "is_sym": enc.symmetric,
        "scale": [float(s) for s in enc.scale.reshape(-1)],
        "offset": _offsets(enc),
    }
    if enc.axis not in (None, 0):
        entry["axis"] = enc.axis
    return entry


def encodings_to_dict(file: EncodingsFile) -> dict[str, Any]:
    """The JSON document of ``file`` (entries sorted by name); see the module docstring for the layout."""
    if not isinstance(file, EncodingsFile):
        raise QuadcError(f"write_encodings needs an EncodingsFile, got {type(file).__name__}")
    both = sorted(set(file.activations) & set(file.params))
    if both:
        raise QuadcError(
            f"tensor '{both[0]}' has both an activation and a parameter encoding; keep it in only one of them"
        )
    args = dict(file.quantizer_args)
    if QTYPES_KEY in args:
        raise QuadcError(
            f"quantizer_args key '{QTYPES_KEY}' is reserved for quadc; remove it (quadc rebuilds it on write)"
        )
    doc: dict[str, Any] = {"version": ENCODINGS_VERSION}
    qtypes: dict[str, str] = {}
    for key, attr in _SECTIONS:
        entries = []
        mapping: Mapping[str, Encoding] = getattr(file, attr)
        for name in sorted(mapping):
            enc = mapping[name]
            if not isinstance(name, str) or not name:
                raise QuadcError(f"encoding names must be non-empty strings, got {name!r} in {attr}")
            if not isinstance(enc, Encoding):
                raise QuadcError(f"the {attr} entry '{name}' is a {type(enc).__name__}, not an Encoding")
            entries.append(_entry(name, enc))
            if enc.qtype is not _canonical_qtype(enc.qtype.bits, enc.symmetric):
                qtypes[name] = enc.qtype.value
        doc[key] = entries
    if qtypes:
        args[QTYPES_KEY] = qtypes
    doc["quantizer_args"] = args
    return doc


def write_encodings(path: str | os.PathLike[str], file: EncodingsFile) -> Path:
    """Write ``file`` to ``path`` as AIMET 1.0.0 JSON, atomically, and return the path.

    The bytes depend only on the encodings: sorted keys and names, two-space indent, shortest-repr floats,
    trailing newline. The text goes to a temporary file in the same folder which then replaces ``path``.
    """
    out = Path(path)
    doc = encodings_to_dict(file)
    try:
        text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise QuadcError(
            f"quantizer_args cannot be written as JSON ({exc}); keep only strings, numbers, bools, lists and dicts"
        ) from None
    with replaced_atomically(out) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return out


def read_encodings(path: str | os.PathLike[str]) -> EncodingsFile:
    """Read an AIMET 1.0.0 encodings file; every problem is a QuadcError naming the file and the entry."""
    src = Path(path)
    if not src.is_file():
        raise QuadcError(
            f"encodings file '{src}' does not exist; pass the path of an AIMET 1.0.0 encodings JSON"
        )
    try:
        text = src.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QuadcError(
            f"cannot read encodings file '{src}' ({exc}); check its permissions and that it is UTF-8 JSON"
        ) from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise QuadcError(
            f"encodings file '{src}' is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "fix it or export the encodings again"
        ) from None
    except ValueError as exc:
        raise QuadcError(f"encodings file '{src}' {exc}; export the encodings again") from None
    return encodings_from_dict(doc, source=str(src))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"holds the non-JSON number {name}")


def encodings_from_dict(doc: Any, source: str = "<dict>") -> EncodingsFile:
    """Parse an AIMET 1.0.0 JSON document (already decoded); ``source`` names it in error messages."""
    if not isinstance(doc, dict):
        raise QuadcError(f"encodings file '{source}' must hold a JSON object, not a {type(doc).__name__}")
    version = doc.get("version")
    if version is None:
        raise QuadcError(
            f"encodings file '{source}' has no \"version\"; quadc reads AIMET version {ENCODINGS_VERSION}"
        )
    if version != ENCODINGS_VERSION:
        raise QuadcError(
            f"encodings file '{source}' has version {version!r} but quadc reads only {ENCODINGS_VERSION!r}; "
            f"export with AIMET's encoding_version='{ENCODINGS_VERSION}'"
        )
    args = doc.get("quantizer_args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise QuadcError(
            f"\"quantizer_args\" in '{source}' must be a JSON object, not a {type(args).__name__}"
        )
    args = dict(args)
    qtypes = args.pop(QTYPES_KEY, {})
    if not isinstance(qtypes, dict) or not all(isinstance(v, str) for v in qtypes.values()):
        raise QuadcError(
            f"quantizer_args.{QTYPES_KEY} in '{source}' must map tensor names to type names like \"int8\""
        )
    result = EncodingsFile(quantizer_args=args)
    seen: dict[str, str] = {}
    for key, attr in _SECTIONS:
        if key not in doc:
            raise QuadcError(
                f"encodings file '{source}' lacks the field \"{key}\"; add it (an empty list is fine)"
            )
        entries = doc[key]
        if not isinstance(entries, list):
            hint = " (a name-keyed object is the pre-1.0.0 layout)" if isinstance(entries, dict) else ""
            raise QuadcError(
                f"\"{key}\" in '{source}' must be a list of entries{hint}; export in version {ENCODINGS_VERSION}"
            )
        target: dict[str, Encoding] = getattr(result, attr)
        for index, entry in enumerate(entries):
            where = f"entry {index} of \"{key}\" in '{source}'"
            name, enc = _parse_entry(entry, where, qtypes)
            if name in seen:
                raise QuadcError(
                    f"tensor '{name}' has two encodings ({seen[name]} and {key}) in '{source}'; keep one"
                )
            seen[name] = key
            target[name] = enc
    unknown = sorted(set(qtypes) - set(seen))
    if unknown:
        raise QuadcError(
            f"quantizer_args.{QTYPES_KEY} in '{source}' names '{unknown[0]}', which has no encoding; remove it"
        )
    return result


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(entry: Any, where: str, qtypes: Mapping[str, str]) -> tuple[str, Encoding]:
    if not isinstance(entry, dict):
        raise QuadcError(f"{where} must be a JSON object, not a {type(entry).__name__}")
    name = entry.get("name")
    if isinstance(name, str) and name:
        where = f"{where} ('{name}')"
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise QuadcError(f'{where} lacks the field "{missing[0]}"; every entry needs {", ".join(_REQUIRED)}')
    if not isinstance(name, str) or not name:
        raise QuadcError(f"{where} has name {name!r}; use the tensor's name as a non-empty string")
    if entry["dtype"] != "INT":
        raise QuadcError(
            f'{where} has dtype {entry["dtype"]!r}; quadc supports only integer ("INT") encodings'
        )
    bw = entry["bw"]
    if not _is_int(bw) or bw not in (8, 16):
        raise QuadcError(f"{where} has bw {bw!r}; quadc supports bit widths 8 and 16")
    enc_type = entry["enc_type"]
    if enc_type not in ("PER_TENSOR", "PER_CHANNEL"):
        raise QuadcError(f"{where} has enc_type {enc_type!r}; quadc supports PER_TENSOR and PER_CHANNEL")
    is_sym = entry["is_sym"]
    if not isinstance(is_sym, bool):
        raise QuadcError(f"{where} has is_sym {is_sym!r}; use true or false")
    scale, offset = entry["scale"], entry["offset"]
    if not isinstance(scale, list) or not scale or not all(_is_number(s) for s in scale):
        raise QuadcError(f"{where} has scale {scale!r}; use a non-empty list of numbers")
    if not isinstance(offset, list) or len(offset) != len(scale):
        raise QuadcError(
            f"{where} has {len(scale)} scales but offset {offset!r}; give one integer offset per scale"
        )
    if not all(_is_number(o) and float(o).is_integer() for o in offset):
        raise QuadcError(f"{where} has offset {offset!r}; quadc supports only integer offsets")
    if enc_type == "PER_TENSOR" and len(scale) != 1:
        raise QuadcError(f"{where} is PER_TENSOR but has {len(scale)} scales; use PER_CHANNEL or one scale")
    if any(not math.isfinite(s) or s <= 0 for s in scale):
        raise QuadcError(f"{where} has scale {scale!r}; scales must be finite and positive")
    axis = entry.get("axis", 0) if enc_type == "PER_CHANNEL" else None
    if axis is not None and not _is_int(axis):
        raise QuadcError(f"{where} has axis {axis!r}; use an integer")
    symmetric = is_sym
    if is_sym and any(int(o) != -(1 << (bw - 1)) for o in offset):
        # AIMET's "unsigned symmetric" (is_sym with offset 0, e.g. after a ReLU): an unsigned grid whose zero
        # point is not the midpoint, which quadc represents as an asymmetric unsigned encoding.
        symmetric = False
    if name in qtypes:
        try:
            qtype = QType.parse(qtypes[name])
        except QuadcError as exc:
            raise QuadcError(f"quantizer_args.{QTYPES_KEY} entry of {where}: {exc}") from None
        if qtype.bits != bw:
            raise QuadcError(
                f"{where} has bw {bw} but quantizer_args.{QTYPES_KEY} says {qtype}; make them agree"
            )
    else:
        qtype = _canonical_qtype(bw, symmetric)
    shift = 1 << (bw - 1) if qtype.signed else 0
    zp_unsigned = [-int(o) for o in offset]
    if any(not 0 <= z < (1 << bw) for z in zp_unsigned):
        raise QuadcError(f"{where} has offset {offset!r}; {bw}-bit offsets must lie in [{-(1 << bw) + 1}, 0]")
    zero_point = np.array([z - shift for z in zp_unsigned], dtype=np.int64)
    scales = np.array(scale, dtype=np.float64)
    if axis is None:
        scales, zero_point = scales.reshape(()), zero_point.reshape(())
    try:
        enc = Encoding(scale=scales, zero_point=zero_point, qtype=qtype, axis=axis, symmetric=symmetric)
    except QuadcError as exc:
        raise QuadcError(f"{where} is not a valid encoding: {exc}") from None
    return name, enc


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float)) and not isinstance(value, bool)
