"""quadc align end to end on the bundled tiny U-Net with three LoRAs of different strengths (``small``,
``mid``, ``big``) under the QSS anchor's encodings, so that one task saturates and one rounds coarsely.

Checked against independent paths: the report's numbers against artifacts compiled by ``quadc compile``
and run by the runtime Engine; the aligned files against diffusers' own loader; the one-command
``compile --align`` against the two commands; two data-parallel processes (torchrun, gloo) against one.
Quality is measured on evaluation feeds (another seed) that neither calibration nor training used.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from quadc import frontend  # noqa: E402
from quadc.align.api import EVAL_SEED_OFFSET  # noqa: E402
from quadc.cli import main  # noqa: E402
from quadc.compiler import bundled_model  # noqa: E402
from quadc.graph import load_model  # noqa: E402
from quadc.lora import read_lora  # noqa: E402
from quadc.quant.affine import sqnr_db  # noqa: E402
from quadc.quant.feeds import random_feeds  # noqa: E402
from quadc.runtime.engine import Engine  # noqa: E402
from quadc.testing_lora import random_lora, write_diffusers, write_kohya  # noqa: E402

MODULES = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "ff.net.2"]
STEPS = "30"


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("align_loras")
    _, info = frontend.load(bundled_model())
    out = {}
    # seeds chosen so that QSS (scale-invariant: it ranks the seeds, not the strengths) makes "mid" the anchor
    for name, std, seed in (("small", 0.03, 2), ("mid", 0.1, 1), ("big", 0.3, 3)):
        lora = random_lora(info, MODULES, rank=4, seed=seed, scale_std=std, name=name)
        path = root / f"{name}.safetensors"
        (write_kohya if name == "small" else write_diffusers)(lora, path)
        out[name] = path
    return out


def _lora_args(loras: dict[str, Path]) -> list[str]:
    return [a for name, path in loras.items() for a in ("--lora", f"{name}={path}")] + ["--lora-policy", "anchor"]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, loras) -> Path:
    out = tmp_path_factory.mktemp("align") / "layer"
    assert main(["align", *_lora_args(loras), "--level", "layer", "--steps", STEPS, "-q", "-o", str(out)]) == 0
    return out


def _report(path: Path) -> dict:
    return json.loads((path / "report.json").read_text())


def _exact(path: Path) -> Engine:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return Engine(path, session_options=so)


def test_layer_alignment_report(aligned, loras) -> None:
    report = _report(aligned)
    assert report["lora_policy"] == "anchor" and report["anchor"] == "mid"
    assert sorted(p.name for p in aligned.iterdir()) == ["big.safetensors", "encodings.json", "mid.safetensors",
                                                         "report.json", "small.safetensors"]
    tasks = report["tasks"]
    assert tasks["mid"]["role"] == "anchor" and "training" not in tasks["mid"]
    assert tasks["mid"]["after"] == {**tasks["mid"]["before"], "float_sqnr_db": None}  # exact: the anchor
    # the saturating task and the coarsely rounded one both win effect back, and no output gets worse
    assert tasks["big"]["saturated"]["before"] > 0.01
    assert tasks["big"]["effect_gain_db"] > 2
    assert tasks["small"]["effect_gain_db"] > 3
    for task in ("small", "big"):
        t = tasks[task]
        assert list(t["training"]) == ["layer"] and t["training"]["layer"]["steps"] > 0
        # no output gets worse beyond noise: small's 42 dB output SQNR is the base model's quantization error,
        # which its 7 dB better effect moves by a few hundredths of a dB either way
        assert t["after"]["output_sqnr_db"] >= t["before"]["output_sqnr_db"] - 0.1
    big = tasks["big"]["training"]["layer"]["validation_loss"]
    assert big["best"] < big["initial"]
    # equalization moves no float output; training moves the unsaturated task's little
    assert tasks["small"]["after"]["float_sqnr_db"] >= 30


def test_anchor_file_keeps_the_lora_and_aligned_files_keep_alpha(aligned, loras) -> None:
    for task, src in loras.items():
        original, written = read_lora(src), read_lora(aligned / f"{task}.safetensors")
        assert written.layers.keys() == original.layers.keys()
        for module, layer in original.layers.items():
            new = written.layers[module]
            assert new.scale == layer.scale and new.rank == layer.rank
            if task == "mid":
                assert np.array_equal(new.down, layer.down) and np.array_equal(new.up, layer.up)
        if task != "mid":
            assert any(not np.array_equal(written.layers[m].up, original.layers[m].up) for m in original.layers)


def test_aligned_files_load_in_diffusers(aligned) -> None:
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    from quadc.export.configs import get_config

    unet = UNet2DConditionModel(**get_config("tiny"))
    unet.load_lora_adapter(str(aligned), weight_name="big.safetensors", prefix="unet", adapter_name="big")
    lora = read_lora(aligned / "big.safetensors")
    modules = dict(unet.named_modules())
    for module, layer in lora.layers.items():
        peft_layer = modules[module]
        down = peft_layer.lora_A["big"].weight.detach().numpy()
        up = peft_layer.lora_B["big"].weight.detach().numpy()
        assert np.array_equal(down.reshape(layer.down.shape), layer.down)
        assert np.array_equal(up.reshape(layer.up.shape), layer.up)
        assert peft_layer.scaling["big"] == pytest.approx(layer.scale)


@pytest.fixture(scope="module")
def recompiled(tmp_path_factory, aligned, loras) -> dict[str, Path]:
    """The aligned LoRAs compiled against the aligned encodings, and the original LoRAs as float graph."""
    root = tmp_path_factory.mktemp("recompiled")
    aligned_args = [a for t in loras for a in ("--lora", f"{t}={aligned / (t + '.safetensors')}")]
    assert main(["compile", "--target", "onnx-qdq", "--encodings", str(aligned / "encodings.json"), *aligned_args,
                 "-q", "-o", str(root / "qdq")]) == 0
    assert main(["compile", "--target", "onnx", *_lora_args(loras)[:-2], "-q", "-o", str(root / "float")]) == 0
    assert main(["compile", "--target", "onnx-qdq", *_lora_args(loras), "--activation-profile", "anchor-fit", "-q", "-o",
                 str(root / "original")]) == 0
    assert main(["compile", "--target", "onnx-qdq", *_lora_args(loras), "-q", "-o", str(root / "union")]) == 0
    return {"qdq": root / "qdq", "float": root / "float", "original": root / "original", "union": root / "union"}


def test_compile_with_aligned_encodings_reproduces_them_and_the_report(aligned, recompiled) -> None:
    # alignment never changes an encoding: the compile of the original LoRAs under align's activation profile
    # (anchor-fit) plans the very same ones; compile's default (union) plans wider ranges
    assert (recompiled["original"] / "encodings.json").read_bytes() == (aligned / "encodings.json").read_bytes()
    assert (recompiled["qdq"] / "encodings.json").read_bytes() == (aligned / "encodings.json").read_bytes()
    assert (recompiled["union"] / "encodings.json").read_bytes() != (aligned / "encodings.json").read_bytes()
    quant = {k: json.loads((recompiled[k] / "manifest.json").read_text())["quant"] for k in ("qdq", "original", "union")}
    assert [q["activation_profile"] for q in quant.values()] == ["anchor-fit", "anchor-fit", "union"]
    assert _report(aligned)["activation_profile"] == "anchor-fit"
    report = _report(aligned)
    quant, floats = _exact(recompiled["qdq"]), Engine(recompiled["float"])
    feeds = random_feeds(load_model(quant.graph_path), 8, seed=EVAL_SEED_OFFSET)  # the report's evaluation feeds
    f_base = np.concatenate([floats.run(f)["out_sample"].ravel() for f in feeds])
    q_base = np.concatenate([quant.run(f)["out_sample"].ravel() for f in feeds])
    for task, entry in report["tasks"].items():
        ref = np.concatenate([floats.run(f, task=task)["out_sample"].ravel() for f in feeds])
        got = np.concatenate([quant.run(f, task=task)["out_sample"].ravel() for f in feeds])
        assert sqnr_db(ref - f_base, got - q_base) == pytest.approx(entry["after"]["effect_sqnr_db"], abs=0.02)
        assert sqnr_db(ref, got) == pytest.approx(entry["after"]["output_sqnr_db"], abs=0.02)


def test_compile_align_is_align_then_compile(tmp_path, loras, aligned, recompiled) -> None:
    out = tmp_path / "art"
    assert main(["compile", "--target", "onnx-qdq", "--align", "layer", "--align-steps", STEPS, *_lora_args(loras),
                 "-q", "-o", str(out)]) == 0
    side = tmp_path / "art.align"
    # alignment is deterministic: the same files as the separate `quadc align` run
    for name in ("big.safetensors", "small.safetensors", "mid.safetensors", "encodings.json", "report.json"):
        assert (side / name).read_bytes() == (aligned / name).read_bytes(), name
    for rel in ("model.onnx", "encodings.json", "lora/big.onnx_adapter", "lora/small.safetensors"):
        assert (out / rel).read_bytes() == (recompiled["qdq"] / rel).read_bytes(), rel
    manifest = json.loads((out / "manifest.json").read_text())
    plan = next(p for p in manifest["passes"] if p["pass"] == "quant-plan")
    assert plan["options"]["encodings_file"] == str(side / "encodings.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_data_parallel_processes_give_the_one_process_result(tmp_path, loras, aligned) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "quadc.cli", "align", *_lora_args(loras), "--level", "layer",
           "--steps", STEPS, "-q", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _report(out)["world_size"] == 2
    for task in ("small", "big"):
        one, two = read_lora(aligned / f"{task}.safetensors"), read_lora(out / f"{task}.safetensors")
        for module, layer in one.layers.items():
            np.testing.assert_allclose(two.layers[module].down, layer.down, rtol=0, atol=1e-6)
            np.testing.assert_allclose(two.layers[module].up, layer.up, rtol=0, atol=1e-6)


def test_model_level_with_task_examples(tmp_path, loras) -> None:
    """Model level (QuantSim against the float teacher) plus the diffusion loss from task examples."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.savez(data / "big.npz", latents=rng.standard_normal((3, 4, 8, 8)).astype(np.float32),
             source_latents=rng.standard_normal((3, 4, 8, 8)).astype(np.float32),
             encoder_hidden_states=rng.standard_normal((8, 32)).astype(np.float32))
    out = tmp_path / "model"
    assert main(["align", *_lora_args(loras), "--level", "model", "--steps", "8", "--feeds", "6",
                 "--eval-feeds", "4", "--data", str(data), "--data-weight", "0.001", "-q", "-o", str(out)]) == 0
    tasks = _report(out)["tasks"]
    assert tasks["big"]["effect_gain_db"] > 0.3
    assert tasks["big"]["after"]["output_sqnr_db"] > tasks["big"]["before"]["output_sqnr_db"]
    assert list(tasks["big"]["training"]) == ["layer", "model"] and tasks["mid"]["role"] == "anchor"
    assert tasks["big"]["training"]["model"]["steps"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--level", "layer", "--data", "x"], "--data (the diffusion loss) needs --level model"),
    (["--target", "onnx"], "align needs a quantizing pipeline"),
    (["--steps", "-1"], "--steps must be 0 or more"),
])
def test_align_user_errors(tmp_path, loras, capsys, args, needle) -> None:
    lora_args = [a for name, path in loras.items() for a in ("--lora", f"{name}={path}")]
    assert main(["align", *lora_args, *args, "-q", "-o", str(tmp_path / "x")]) == 2
    assert needle in capsys.readouterr().err


def test_validation_check_keeps_only_a_better_lora(loras) -> None:
    """The last check puts the original back where the 'aligned' LoRA does worse on the validation feeds
    (here: ``big`` with its sign flipped) and keeps one that does better (``small`` equalized to the shared
    grids: the same float LoRA, 7 dB better quantized on the evaluation feeds)."""
    from quadc.align.api import AlignOptions, _keep_better
    from quadc.align.equalize import equalize
    from quadc.align.workspace import build_workspace
    from quadc.lora.model import LoRA, LoRALayer

    ws = build_workspace(None, {k: str(v) for k, v in loras.items()}, pass_options={"quant-plan": {"lora_policy": "anchor"}})
    big, small = ws.loras["big"], ws.loras["small"]
    flipped = LoRA(name="big", layers={m: LoRALayer(module=m, up=-layer.up, down=layer.down, alpha=layer.alpha,
                                                    rank=layer.rank) for m, layer in big.layers.items()})
    aligned = {"big": flipped, "small": equalize(small, ws.slots, ws.plan), "mid": ws.loras["mid"]}
    kept = _keep_better(ws, aligned, {"big": None, "small": None}, random_feeds(ws.float_graph, 10, seed=0),
                        AlignOptions(), lambda _msg: None)
    assert kept["big"]["which"] == "original" and aligned["big"] is big
    assert kept["small"]["which"] == "aligned" and aligned["small"] is not small
    scores = kept["small"]["validation_effect_sqnr_db"]
    assert scores["aligned"] > scores["original"]
