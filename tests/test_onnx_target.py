"""The float ``onnx`` target's verify compares the artifact with an independent reference (the source model
with the task's LoRA merged into its weights) and catches a wrong artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from quadc import frontend
from quadc.compiler import CompileOptions, bundled_loras, bundled_model, compile_model
from quadc.errors import QuadcError
from quadc.export import example_inputs
from quadc.lora.pack import read_packed, write_onnx_adapter
from quadc.targets import get_target
from quadc.testing_lora import random_lora, write_kohya

GOOD_DB = 90.0  # float32 vs float32: the artifact and the merged model agree to ~1e-6 relative
BAD_DB = 60.0


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx_target") / "out"
    compile_model(None, out, CompileOptions(target="onnx"))
    return out


@pytest.fixture()
def feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    inputs = example_inputs("tiny")
    return {"sample": rng.standard_normal(inputs["sample"].shape).astype(np.float32),
            "timestep": np.array([700.0], np.float32),
            "encoder_hidden_states": rng.standard_normal(inputs["encoder_hidden_states"].shape).astype(np.float32)}


def _tasks(art: Path) -> list[str]:
    return list(json.loads((art / "manifest.json").read_text())["tasks"])


@pytest.mark.parametrize("task", [*sorted(bundled_loras()), "none"])
def test_correct_artifact_matches_the_merged_model(artifact, feeds, task):
    report = get_target("onnx").verify(artifact, feeds, task=task)
    out = report["outputs"]["out_sample"]
    assert out["sqnr_db"] > GOOD_DB and out["max_abs_err"] < 1e-4 * out["max_abs"], report
    assert "merged" in report["reference"] if task != "none" else report["reference"] == "source model"


def _tamper(artifact: Path, tmp_path: Path, task: str, how: str) -> Path:
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    path = art / "lora" / f"{task}.onnx_adapter"
    params = read_packed(path)
    if how == "relabel":  # the manifest entries of two tasks swapped: each name binds the other's LoRA
        manifest = json.loads((art / "manifest.json").read_text())
        other = next(t for t in manifest["tasks"] if t != task)
        tasks = manifest["tasks"]
        tasks[task], tasks[other] = tasks[other], tasks[task]
        (art / "manifest.json").write_text(json.dumps(manifest))
        return art
    # the up tensor of the largest norm: a trained LoRA has layers whose effect alone is tiny
    name = max(sorted(n for n in params if n.endswith(".lora_up")), key=lambda n: float(np.linalg.norm(params[n])))
    if how == "negate":
        params[name] = -params[name]
    elif how == "noise":
        rng = np.random.default_rng(0)
        params[name] = rng.permutation(params[name].ravel()).reshape(params[name].shape)
    write_onnx_adapter(params, path)
    return art


@pytest.mark.parametrize("how", ["relabel", "negate", "noise"])
@pytest.mark.parametrize("task", sorted(bundled_loras()))
def test_wrong_task_file_gives_low_sqnr(artifact, tmp_path, feeds, task, how):
    art = _tamper(artifact, tmp_path, task, how)
    report = get_target("onnx").verify(art, feeds, task=task, model=bundled_model(), loras=bundled_loras())
    assert report["outputs"]["out_sample"]["sqnr_db"] < BAD_DB, report


def test_explicit_model_and_lora_paths(tmp_path, feeds):
    """A model and LoRA that are not bundled: verify needs them passed, and checks the model's sha256."""
    _, info = frontend.load(bundled_model())
    lora_path = write_kohya(random_lora(info, ["to_k", "ff.net.2"], rank=4, seed=5, scale_std=0.3),
                            tmp_path / "mine.safetensors")
    model = tmp_path / "unet.onnx"
    shutil.copy(bundled_model(), model)
    out = tmp_path / "out"
    compile_model(model, out, CompileOptions(target="onnx", loras={"mine": lora_path}))
    target = get_target("onnx")
    report = target.verify(out, feeds, task="mine", model=model, loras={"mine": lora_path})
    assert report["outputs"]["out_sample"]["sqnr_db"] > GOOD_DB
    with pytest.raises(QuadcError, match="loras="):
        target.verify(out, feeds, task="mine", model=model)
    other = write_kohya(random_lora(info, ["to_k", "ff.net.2"], rank=4, seed=6, scale_std=0.3),
                        tmp_path / "other.safetensors")
    wrong = target.verify(out, feeds, task="mine", model=model, loras={"mine": other})
    assert wrong["outputs"]["out_sample"]["sqnr_db"] < BAD_DB
    changed = tmp_path / "changed.onnx"
    proto = onnx.load(str(model))
    proto.graph.initializer[0].raw_data = bytes(len(proto.graph.initializer[0].raw_data))
    onnx.save_model(proto, str(changed))
    with pytest.raises(QuadcError, match="sha256"):
        target.verify(out, feeds, task="mine", model=changed, loras={"mine": lora_path})


def test_manifest_source_sha256_is_the_source_files_digest(artifact: Path) -> None:
    """The source digest (computed on a thread while the artifact is written) is sha256 over the sha256 of
    the model file and then of each external data file, worked out here with hashlib alone."""
    import hashlib

    model = bundled_model()
    parts = [model] + sorted(model.parent.glob(model.name + ".data"))
    expected = hashlib.sha256(b"".join(hashlib.sha256(p.read_bytes()).digest() for p in parts)).hexdigest()
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["source"] == {"model": model.name, "sha256": expected}


def test_cli_verify_writes_strict_json_for_an_exact_base_model(tmp_path, capsys):
    """Compiled with `dce` only and no LoRA, the float artifact computes exactly its source (SQNR inf): the
    table says inf for the mean too, and --json stays JSON that strict parsers read (no bare Infinity)."""
    from quadc.cli import main

    model, art, report = str(bundled_model()), tmp_path / "exact", tmp_path / "verify.json"
    assert main(["compile", model, "--passes", "dce", "-q", "-o", str(art)]) == 0
    assert main(["verify", str(art), "--model", model, "--random", "2", "--json", str(report)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if " none " in f" {line} ")
    assert "inf / inf" in row, row

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-JSON constant {constant}")

    entry = json.loads(report.read_text(), parse_constant=refuse)["targets"]["onnx"]["tasks"]["none"]
    assert entry["sqnr_db_min"] == entry["sqnr_db_mean"] == "inf"
