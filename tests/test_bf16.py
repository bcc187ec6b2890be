"""bfloat16 in safetensors files goes through ml_dtypes: checked against bit patterns worked out by hand."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from quadc.errors import QuadcError
from quadc.lora.read import TensorFile
from quadc.lora.safetensors_io import save_safetensors

# float32 bit pattern -> the bfloat16 bit pattern round-to-nearest-even gives (the upper 16 bits, plus one
# when the lower 16 are above 0x8000, or exactly 0x8000 with an odd upper half).
ROUNDING = [
    (0x3F800000, 0x3F80),  # 1.0
    (0xC0000000, 0xC000),  # -2.0
    (0x40490FDB, 0x4049),  # pi: lower half 0x0FDB < 0x8000, truncates to 3.140625
    (0x3F808000, 0x3F80),  # exactly half way, upper half even: stays
    (0x3F818000, 0x3F82),  # exactly half way, upper half odd: rounds up to even
    (0x3F80C000, 0x3F81),  # above half way: rounds up
    (0x80000000, 0x8000),  # -0.0
    (0x7F800000, 0x7F80),  # +inf
    (0x7F7FFFFF, 0x7F80),  # float32 max rounds up to +inf
    (0x00000001, 0x0000),  # the smallest float32 subnormal rounds to +0
]


def _f32(bits: int) -> np.float32:
    return np.frombuffer(struct.pack("<I", bits), dtype="<f4")[0]


def _raw_tensor(path: Path, name: str) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    start, end = header[name]["data_offsets"]
    return header[name], data[8 + n + start:8 + n + end]


def test_write_bf16_rounds_to_nearest_even(tmp_path):
    values = np.array([_f32(b) for b, _ in ROUNDING], dtype=np.float32)
    path = save_safetensors({"t": values}, tmp_path / "t.safetensors", dtype="bfloat16")
    entry, raw = _raw_tensor(path, "t")
    assert entry["dtype"] == "BF16" and entry["shape"] == [len(ROUNDING)]
    got = list(struct.unpack(f"<{len(ROUNDING)}H", raw))
    assert [hex(g) for g in got] == [hex(want) for _, want in ROUNDING]


def _bf16_file(path: Path, bits: list[int], shape: list[int]) -> Path:
    payload = struct.pack(f"<{len(bits)}H", *bits)
    head = json.dumps({"t": {"dtype": "BF16", "shape": shape, "data_offsets": [0, len(payload)]}}).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + payload)
    return path


def test_read_bf16_widens_exactly(tmp_path):
    # bf16 bits -> its float32 value, written out by hand.
    cases = [(0x3F80, 1.0), (0xC000, -2.0), (0x4049, 3.140625), (0x3E20, 0.15625),
             (0x0001, 2.0 ** -133), (0x7F7F, 255.0 * 2.0 ** 120), (0x8000, -0.0)]
    path = _bf16_file(tmp_path / "b.safetensors", [b for b, _ in cases], [len(cases) // 7, 7])
    with TensorFile(str(path)) as tf:
        got = tf.get("t")
    assert got.dtype == np.float32 and got.shape == (1, 7)
    assert got.reshape(-1).tolist() == [v for _, v in cases]
    assert np.signbit(got.reshape(-1)[-1])


def test_read_bf16_nan_is_refused(tmp_path):
    path = _bf16_file(tmp_path / "nan.safetensors", [0x3F80, 0x7FC0], [2])
    with TensorFile(str(path)) as tf, pytest.raises(QuadcError, match="NaN or Inf"):
        tf.get("t")


def test_bf16_round_trip_through_writer_and_reader(tmp_path):
    values = np.array([1.0, -2.0, 3.140625, 0.15625, 2.0 ** -133], dtype=np.float32)  # all exact in bf16
    path = save_safetensors({"t": values}, tmp_path / "rt.safetensors", dtype="bfloat16")
    with TensorFile(str(path)) as tf:
        assert tf.get("t").tolist() == values.tolist()
