"""Saturation is visible: per task the saturated fraction of its LoRA values under the shared encodings and
the worst slot, printed while compiling, kept in the manifest, and an error above ``--max-saturation``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quadc.cli import main
from quadc.compiler import CompileOptions, compile_model
from quadc.errors import QuadcError
from quadc.lora.pack import read_packed, saturation
from quadc.quant.affine import Encoding
from quadc.quant.plan import QuantPlan

NARROW_SCALE = 1e-12  # a shared encoding whose range holds (almost) nothing but zero


def _enc(scale: float = 0.01) -> Encoding:
    # uint8, zero point 128: grid [-128 s, 127 s]; values beyond half a step outside saturate.
    return Encoding(scale=scale, zero_point=128, qtype="uint8")


def test_saturation_counts_per_slot_by_hand():
    plan = QuantPlan(lora={n: _enc() for n in ("a.lora_down", "a.lora_up", "b.lora_down", "b.lora_up")})
    params = {  # grid [-1.28, 1.27]; saturated beyond [-1.285, 1.275]
        "a.lora_down": np.array([0.0, 2.0, -2.0, 0.5], np.float32),       # 2 of 4
        "a.lora_up": np.zeros(4, np.float32),                             # 0 of 4
        "b.lora_down": np.array([1.2, 1.3], np.float32),                  # 1 of 2
        "b.lora_up": np.array([5.0, -5.0, 5.0, 5.0, 0.0, 1.0], np.float32),  # 4 of 6
    }
    slot_of = {n: n.split(".")[0] for n in params}
    sat = saturation(params, plan, slot_of)
    assert (sat.saturated, sat.total) == (7, 16)
    assert sat.per_slot == {"a": (2, 8), "b": (5, 8)}
    assert sat.worst_slot == "b" and sat.slot_fraction("b") == 0.625
    assert sat.manifest_entry() == {"saturated": 0.4375,
                                    "saturated_worst_slot": {"module": "b", "fraction": 0.625}}
    per_input = saturation(params, plan)
    assert per_input.worst_slot == "b.lora_up" and per_input.slot_fraction("b.lora_up") == pytest.approx(4 / 6)
    clean = saturation({"a.lora_down": params["a.lora_up"]}, plan)
    assert clean.fraction == 0.0 and clean.worst_slot is None
    assert clean.manifest_entry() == {"saturated": 0.0, "saturated_worst_slot": None}


# --------------------------------------------------------------------------------------------------
# Through the compiler, with one slot's shared encoding made narrow on purpose
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A quantized compile (its encodings), the float packed tensors of every task from the float target
    (the independent source of the expected counts), and a slot only one task adapts."""
    root = tmp_path_factory.mktemp("sat")
    assert main(["compile", "-q", "--target", "onnx-qdq", "--calib-random", "1", "-o", str(root / "base")]) == 0
    assert main(["compile", "-q", "--target", "onnx", "-o", str(root / "float")]) == 0
    manifest = json.loads((root / "float" / "manifest.json").read_text())
    owners: dict[str, list[str]] = {}
    for task, entry in manifest["tasks"].items():
        for module in entry["modules"]:
            owners.setdefault(module, []).append(task)
    module = sorted(m for m, t in owners.items() if len(t) == 1)[0]
    floats = {t: read_packed(root / "float" / e["files"]["safetensors"]["path"]) for t, e in manifest["tasks"].items()}
    encodings = json.loads((root / "base" / "encodings.json").read_text())
    for entry in encodings["activation_encodings"]:
        if entry["name"] in (f"{module}.lora_down", f"{module}.lora_up"):
            entry["scale"] = [NARROW_SCALE] * len(entry["scale"])
    narrow = root / "narrow.json"
    narrow.write_text(json.dumps(encodings))
    return {"root": root, "module": module, "task": owners[module][0], "floats": floats, "narrow": narrow,
            "base": json.loads((root / "base" / "manifest.json").read_text())}


def test_manifest_and_progress_name_the_worst_slot(setup, tmp_path, capsys):
    module, task = setup["module"], setup["task"]
    out = tmp_path / "o"
    assert main(["compile", "--target", "onnx-qdq", "--encodings", str(setup["narrow"]), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    stored = setup["floats"][task]
    slot = np.concatenate([stored[f"{module}.lora_down"].ravel(), stored[f"{module}.lora_up"].ravel()])
    total = sum(v.size for v in stored.values())
    # Every non-zero value of the narrowed slot saturates (the rank padding is zero and does not).
    expected_slot = np.count_nonzero(np.abs(slot) > 1e-9) / slot.size
    entry = manifest["tasks"][task]
    assert entry["saturated_worst_slot"]["module"] == module
    assert entry["saturated_worst_slot"]["fraction"] == pytest.approx(expected_slot, abs=1e-6)
    assert expected_slot > 0.5
    assert entry["saturated"] >= np.count_nonzero(np.abs(slot) > 1e-9) / total - 1e-6
    line = next(x for x in err.splitlines() if f"task '{task}' saturates" in x)
    assert module in line and f"{expected_slot:.2%}" in line
    # The other tasks do not use that slot: their numbers are those of the compile with the original
    # encodings.
    for other, base_entry in setup["base"]["tasks"].items():
        if other != task:
            assert manifest["tasks"][other]["saturated"] == base_entry["saturated"], other
            assert manifest["tasks"][other]["saturated_worst_slot"] == base_entry["saturated_worst_slot"], other


def test_max_saturation_refuses_and_writes_nothing(setup, tmp_path, capsys):
    out = tmp_path / "o"
    # half of the task's values that the narrowed slot holds (from the float packed tensors)
    stored, module = setup["floats"][setup["task"]], setup["module"]
    in_slot = sum(np.count_nonzero(np.abs(stored[f"{module}.lora_{s}"]) > 1e-9) for s in ("down", "up"))
    limit = 0.5 * in_slot / sum(v.size for v in stored.values())
    assert main(["compile", "-q", "--target", "onnx-qdq", "--encodings", str(setup["narrow"]),
                 "--max-saturation", f"{limit:.6g}", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("quadc: error: ") and "Traceback" not in err, err
    assert f"task '{setup['task']}'" in lines[0] and setup["module"] in lines[0] and "--max-saturation" in lines[0]
    assert list(tmp_path.iterdir()) == []
    options = CompileOptions(target="onnx-qdq", max_saturation=limit,
                             pass_options={"quant-plan": {"encodings_file": str(setup["narrow"])}})
    with pytest.raises(QuadcError, match=setup["module"]):
        compile_model(None, out, options)
    assert list(tmp_path.iterdir()) == []


def test_max_saturation_above_the_worst_task_compiles(setup, tmp_path):
    worst = max(e["saturated"] for e in setup["base"]["tasks"].values())
    assert worst > 0, "the bundled tasks saturate a little under the anchor's encodings"
    options = CompileOptions(target="onnx-qdq", max_saturation=min(1.0, worst * 1.01),
                             pass_options={"quant-plan": {"encodings_file": str(setup["root"] / "base" / "encodings.json")}})
    manifest = compile_model(None, tmp_path / "ok", options)
    assert {t: e["saturated"] for t, e in manifest["tasks"].items()} == \
        {t: e["saturated"] for t, e in setup["base"]["tasks"].items()}
    with pytest.raises(QuadcError, match="max-saturation"):
        compile_model(None, tmp_path / "no", CompileOptions(
            target="onnx-qdq", max_saturation=worst * 0.99,
            pass_options={"quant-plan": {"encodings_file": str(setup["root"] / "base" / "encodings.json")}}))
    assert not (tmp_path / "no").exists()


def test_float_lora_inputs_report_saturation_too(setup, tmp_path):
    """With --lora-float the graph's own Q->DQ clips the LoRA values to the same shared encodings."""
    out = tmp_path / "o"
    assert main(["compile", "-q", "--target", "onnx-qdq", "--lora-float", "--encodings", str(setup["narrow"]),
                 "-o", str(out)]) == 0
    entry = json.loads((out / "manifest.json").read_text())["tasks"][setup["task"]]
    assert entry["saturated_worst_slot"]["module"] == setup["module"]


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_max_saturation_must_be_a_fraction(tmp_path, capsys, value):
    assert main(["compile", "-q", "--target", "onnx-qdq", f"--max-saturation={value}", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quadc: error: ") and "max_saturation" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_float_target_has_nothing_to_saturate(tmp_path):
    manifest = compile_model(None, tmp_path / "o", CompileOptions(target="onnx", max_saturation=0.0))
    assert manifest["tasks"] and all("saturated" not in e for e in manifest["tasks"].values())
    assert Path(tmp_path / "o" / "manifest.json").is_file()
