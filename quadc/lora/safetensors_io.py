"""Write safetensors files deterministically (the packed task files and, through the fixtures, LoRA files).

The ``safetensors`` library writes multi-key metadata in hash order, so two runs give different bytes;
quadc serializes the header itself (sorted metadata and tensor names, compact JSON, padded to 8 bytes)
and lays tensors out by (itemsize descending, name) so every tensor is aligned. The files are standard
safetensors that the library, peft and diffusers read. bfloat16 goes through ``ml_dtypes`` (numpy has no
bfloat16; onnx depends on ml_dtypes already), rounding to nearest even.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from quadc.errors import QuadcError
from quadc.paths import replaced_atomically

__all__ = ["FLOAT_DTYPES", "save_safetensors"]

#: numpy dtype name -> safetensors dtype code, for the float dtypes ``save_safetensors(dtype=...)`` casts to.
FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "float64": "F64", "bfloat16": "BF16"}
#: Integer dtypes are written as they are (quantized LoRA files); ``dtype=`` casts only to floats.
_INT_DTYPES = {"uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "int32": "I32", "int64": "I64"}


def _little_endian(arr: np.ndarray, kind: str) -> np.ndarray:
    """``arr`` cast to ``kind`` as a contiguous little-endian array (bfloat16 through ml_dtypes)."""
    if kind == "bfloat16":
        bf16 = np.ascontiguousarray(np.asarray(arr, dtype=np.float32).astype(ml_dtypes.bfloat16))
        return bf16.view(np.uint16).astype("<u2", copy=False)
    return np.ascontiguousarray(arr, dtype=np.dtype(kind).newbyteorder("<"))


def save_safetensors(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: str | None = None,
) -> Path:
    """Write ``tensors`` as a safetensors file, deterministically; ``dtype`` casts every tensor.

    ``dtype`` is ``float32``, ``float16``, ``float64`` or ``bfloat16`` (None keeps each array's float
    dtype, bfloat16 arrays included; integer arrays are written as they are). The file is written next
    to ``path`` and renamed into place.
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise QuadcError(f"unknown tensor dtype '{dtype}'; use one of {', '.join(FLOAT_DTYPES)}")
    prepared: list[tuple[str, str, list[int], bytes, int]] = []
    for name, value in tensors.items():
        arr = np.asarray(value)
        kind = dtype or arr.dtype.name
        if dtype is None and kind in _INT_DTYPES:
            code = _INT_DTYPES[kind]
        elif kind in FLOAT_DTYPES:
            code = FLOAT_DTYPES[kind]
        else:
            raise QuadcError(f"tensor '{name}' has dtype {arr.dtype}; only float and integer tensors can be written")
        cast = _little_endian(arr, kind)
        prepared.append((name, code, [int(d) for d in arr.shape], cast.tobytes(), cast.itemsize))
    prepared.sort(key=lambda t: (-t[4], t[0]))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for name, code, shape, raw, _ in prepared:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    head += b" " * (-len(head) % 8)
    path = Path(os.fspath(path))
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for *_, raw, _ in prepared:
            f.write(raw)
    return path
