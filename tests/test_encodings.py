"""quadc.quant.encodings: AIMET 1.0.0 JSON round trip, deterministic bytes, offset convention, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quadc.errors import QuadcError
from quadc.quant import (
    ENCODINGS_VERSION,
    Encoding,
    EncodingsFile,
    QType,
    compute_encoding,
    encodings_to_dict,
    read_encodings,
    write_encodings,
)


def _sample() -> EncodingsFile:
    rng = np.random.default_rng(3)
    acts = {
        "/down/conv/Conv_output_0": compute_encoding(-1.3371, 4.2, QType.UINT16),
        "input": compute_encoding(-1.0, 1.0, QType.UINT8),
        "lora_A_0": compute_encoding(-0.02, 0.03, QType.INT16, symmetric=True),  # canonical symmetric signed
        "odd_int8_asym": compute_encoding(-0.5, 2.0, QType.INT8),  # not canonical: needs the qtype note
        "odd_uint8_sym": compute_encoding(-0.5, 2.0, QType.UINT8, symmetric=True),  # not canonical either
    }
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * np.float32(0.1)
    params = {
        "conv.weight": compute_encoding(
            w.reshape(4, -1).min(1), w.reshape(4, -1).max(1), QType.INT8, symmetric=True, axis=0
        ),
        "linear.weight": compute_encoding([-1e-3, -2.0, 0.0], [5e-4, 1.0, 0.0], QType.UINT8, axis=1),
        "bias": compute_encoding(-7.0, 3.0, QType.INT16),
    }
    return EncodingsFile(
        activations=acts, params=params, quantizer_args={"activation_bitwidth": 16, "quant_scheme": "minmax"}
    )


def _assert_same(a: EncodingsFile, b: EncodingsFile) -> None:
    assert a.activations.keys() == b.activations.keys() and a.params.keys() == b.params.keys()
    for name in list(a.activations) + list(a.params):
        x, y = a.get(name), b.get(name)
        assert x == y, name
        assert x.scale.dtype == y.scale.dtype == np.float32
        assert np.array_equal(x.scale.view(np.uint32), y.scale.view(np.uint32)), name
        assert x.zero_point.dtype == y.zero_point.dtype and np.array_equal(x.zero_point, y.zero_point), name
        assert (x.qtype, x.axis, x.symmetric) == (y.qtype, y.axis, y.symmetric), name
    assert a.quantizer_args == b.quantizer_args


def test_round_trip_exact(tmp_path):
    original = _sample()
    path = write_encodings(tmp_path / "enc.json", original)
    back = read_encodings(path)
    _assert_same(original, back)
    assert back == original
    assert [p.name for p in tmp_path.iterdir()] == ["enc.json"]  # no temporary file left behind


def test_round_trip_random_scales_bit_exact(tmp_path):
    rng = np.random.default_rng(11)
    scales = (rng.uniform(1, 10, 500) * 10.0 ** rng.integers(-38, 30, 500)).astype(np.float32)
    scales = np.concatenate(
        [scales, np.array([np.finfo(np.float32).tiny, np.finfo(np.float32).max], np.float32)]
    )
    acts = {
        f"t{i}": Encoding(scale=s, zero_point=int(rng.integers(0, 65536)), qtype=QType.UINT16)
        for i, s in enumerate(scales)
    }
    params = {
        "w": Encoding(
            scale=scales, zero_point=np.zeros(scales.size, np.int64), qtype=QType.INT8, axis=0, symmetric=True
        )
    }
    original = EncodingsFile(activations=acts, params=params)
    _assert_same(original, read_encodings(write_encodings(tmp_path / "e.json", original)))


def test_deterministic_bytes(tmp_path):
    first = write_encodings(tmp_path / "a.json", _sample()).read_bytes()
    shuffled = _sample()
    shuffled.activations = dict(reversed(list(shuffled.activations.items())))
    shuffled.params = dict(reversed(list(shuffled.params.items())))
    second = write_encodings(tmp_path / "b.json", shuffled).read_bytes()
    assert first == second
    # Rewriting what was read gives the same bytes again.
    third = write_encodings(tmp_path / "c.json", read_encodings(tmp_path / "a.json")).read_bytes()
    assert third == first
    assert first.endswith(b"\n") and b"NaN" not in first


def test_aimet_layout_and_offset_convention():
    doc = encodings_to_dict(_sample())
    assert doc["version"] == ENCODINGS_VERSION == "1.0.0"
    acts = {e["name"]: e for e in doc["activation_encodings"]}
    params = {e["name"]: e for e in doc["param_encodings"]}
    assert [e["name"] for e in doc["activation_encodings"]] == sorted(acts)
    u16 = acts["/down/conv/Conv_output_0"]
    assert set(u16) == {"name", "dtype", "bw", "enc_type", "is_sym", "scale", "offset"}
    assert (u16["dtype"], u16["bw"], u16["enc_type"], u16["is_sym"]) == ("INT", 16, "PER_TENSOR", False)
    # By hand for [-1.3371, 4.2] on uint16: scale 5.5371 / 65535, real zero at q = round(1.3371 / scale) = 15825.
    scale, offset = u16["scale"][0], u16["offset"][0]
    assert scale == pytest.approx(5.5371 / 65535, rel=1e-6) and u16["offset"] == [-15825]
    # AIMET reads real = scale * (q_unsigned + offset): the grid's ends land on the calibrated range.
    assert scale * (0 + offset) == pytest.approx(-1.3371, abs=scale)
    assert scale * (65535 + offset) == pytest.approx(4.2, abs=scale)
    # Signed types are written on the unsigned grid: symmetric int8/int16 -> offset -2^(bw-1).
    w = params["conv.weight"]
    assert (w["enc_type"], w["bw"], w["is_sym"], w["offset"]) == ("PER_CHANNEL", 8, True, [-128] * 4)
    assert "axis" not in w and params["linear.weight"]["axis"] == 1
    assert acts["lora_A_0"]["offset"] == [-32768]
    bias = _sample().params["bias"]
    assert params["bias"]["offset"] == [-(int(bias.zero_point) + 32768)]
    assert acts["odd_uint8_sym"]["offset"] == [-128] and acts["odd_uint8_sym"]["is_sym"] is True
    assert doc["quantizer_args"]["quadc_qtypes"] == {
        "bias": "int16",
        "odd_int8_asym": "int8",
        "odd_uint8_sym": "uint8",
    }


def test_reads_aimet_written_file(tmp_path):
    """A file in the shape AIMET's sim.export(encoding_version='1.0.0') writes, float offsets included."""
    doc = {
        "version": "1.0.0",
        "activation_encodings": [
            {"name": "act", "bw": 16, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False, "offset": [-35799], "scale": [6.05e-05]},
            {"name": "relu", "bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": True, "offset": [0], "scale": [0.01]},
        ],
        "param_encodings": [
            {"name": "fc.weight", "bw": 8, "dtype": "INT", "enc_type": "PER_CHANNEL", "is_sym": True, "offset": [-128.0, -128.0], "scale": [0.04, 0.05]},
        ],
        "excluded_layers": [],
        "quantizer_args": {"activation_bitwidth": 16, "param_bitwidth": 8},
    }  # fmt: skip
    path = tmp_path / "aimet.json"
    path.write_text(json.dumps(doc))
    got = read_encodings(path)
    act = got.activations["act"]
    assert act.qtype is QType.UINT16 and int(act.zero_point) == 35799 and act.scale == np.float32(6.05e-05)
    relu = got.activations["relu"]  # AIMET "unsigned symmetric": same grid as uint8 with zero point 0
    assert relu.qtype is QType.UINT8 and int(relu.zero_point) == 0 and not relu.symmetric
    w = got.params["fc.weight"]
    assert w.qtype is QType.INT8 and w.axis == 0 and w.symmetric and w.zero_point.tolist() == [0, 0]
    assert got.quantizer_args == {"activation_bitwidth": 16, "param_bitwidth": 8}


def _write(tmp_path, doc) -> str:
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def _good_entry(**changes):
    entry = {
        "name": "t",
        "dtype": "INT",
        "bw": 8,
        "enc_type": "PER_TENSOR",
        "is_sym": False,
        "scale": [0.1],
        "offset": [-3],
    }
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


def _doc(*entries, **top):
    doc = {"version": "1.0.0", "activation_encodings": list(entries), "param_encodings": []}
    doc.update(top)
    return {k: v for k, v in doc.items() if v is not None}


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("{not json", r"is not valid JSON \(line 1, column 2"),
        (
            '{"version": "1.0.0", "activation_encodings": [], "param_encodings": [], "x": NaN}',
            "non-JSON number NaN",
        ),
        ("[]", "must hold a JSON object"),
        (_doc(version=None), 'has no "version"'),
        (_doc(version="0.6.1"), "has version '0.6.1' but quadc reads only '1.0.0'"),
        ({"version": "1.0.0", "activation_encodings": []}, 'lacks the field "param_encodings"'),
        (_doc(activation_encodings={"t": []}), "pre-1.0.0 layout"),
        (_doc("x"), 'entry 0 of "activation_encodings" .* must be a JSON object'),
        (_doc(_good_entry(offset=None)), 'lacks the field "offset"'),
        (_doc(_good_entry(name="")), "has name ''"),
        (_doc(_good_entry(dtype="FLOAT")), "dtype 'FLOAT'; quadc supports only integer"),
        (_doc(_good_entry(bw=4)), "bw 4; quadc supports bit widths 8 and 16"),
        (_doc(_good_entry(bw="8")), "bw '8'"),
        (_doc(_good_entry(enc_type="PER_BLOCK")), "enc_type 'PER_BLOCK'"),
        (_doc(_good_entry(is_sym="False")), "is_sym 'False'; use true or false"),
        (_doc(_good_entry(scale=[])), "scale \\[\\]; use a non-empty list"),
        (_doc(_good_entry(scale=[0.0])), "finite and positive"),
        (_doc(_good_entry(scale=[-1.0])), "finite and positive"),
        (_doc(_good_entry(offset=[-1, -2])), "1 scales but offset"),
        (_doc(_good_entry(offset=[-1.5])), "only integer offsets"),
        (_doc(_good_entry(offset=[1])), "offsets must lie in \\[-255, 0\\]"),
        (_doc(_good_entry(offset=[-256])), "offsets must lie in \\[-255, 0\\]"),
        (_doc(_good_entry(scale=[0.1, 0.2], offset=[0, 0])), "PER_TENSOR but has 2 scales"),
        (_doc(_good_entry(enc_type="PER_CHANNEL", axis="0")), "axis '0'"),
        (_doc(_good_entry(scale=[1e39])), "does not fit float32"),
        (_doc(_good_entry(), _good_entry()), "tensor 't' has two encodings"),
        (_doc(_good_entry(), quantizer_args=[]), "must be a JSON object"),
        (_doc(_good_entry(), quantizer_args={"quadc_qtypes": {"t": "int16"}}), "says int16"),
        (
            _doc(_good_entry(), quantizer_args={"quadc_qtypes": {"zz": "int8"}}),
            "names 'zz', which has no encoding",
        ),
        (
            _doc(_good_entry(), quantizer_args={"quadc_qtypes": {"t": "int4"}}),
            "unknown quantized type 'int4'",
        ),
    ],
)
def test_read_errors(tmp_path, doc, match):
    with pytest.raises(QuadcError, match=match) as info:
        read_encodings(_write(tmp_path, doc))
    assert "bad.json" in str(info.value)


def test_read_missing_file(tmp_path):
    with pytest.raises(QuadcError, match="does not exist"):
        read_encodings(tmp_path / "nope.json")


def test_write_errors(tmp_path):
    enc = compute_encoding(-1.0, 1.0, QType.UINT8)
    with pytest.raises(QuadcError, match="both an activation and a parameter"):
        write_encodings(tmp_path / "x.json", EncodingsFile(activations={"t": enc}, params={"t": enc}))
    with pytest.raises(QuadcError, match="reserved"):
        write_encodings(
            tmp_path / "x.json", EncodingsFile(activations={"t": enc}, quantizer_args={"quadc_qtypes": {}})
        )
    with pytest.raises(QuadcError, match="cannot be written as JSON"):
        write_encodings(
            tmp_path / "x.json", EncodingsFile(activations={"t": enc}, quantizer_args={"x": object()})
        )
    with pytest.raises(QuadcError, match="not an Encoding"):
        write_encodings(tmp_path / "x.json", EncodingsFile(activations={"t": (0.1, 3)}))
    assert list(tmp_path.iterdir()) == []  # failed writes leave nothing behind


def test_write_replaces_atomically(tmp_path):
    path = tmp_path / "sub" / "enc.json"
    write_encodings(path, _sample())
    small = EncodingsFile(activations={"only": compute_encoding(0.0, 1.0, QType.UINT8)})
    write_encodings(path, small)
    assert read_encodings(path) == small
    assert sorted(p.name for p in path.parent.iterdir()) == ["enc.json"]
