"""Oracle test: LoRA-as-input graph on onnxruntime vs the LoRA fused into the diffusers U-Net by
peft/diffusers' own loaders (code we did not write), for every LoRA format and both torch exporters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from quadc import frontend  # noqa: E402
from quadc.compiler import CompileOptions, compile_model  # noqa: E402
from quadc.export import build_unet, example_inputs  # noqa: E402
from quadc.runtime.engine import Engine  # noqa: E402
from quadc.testing_lora import random_lora, write_kohya  # noqa: E402

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
FF_PROJ = ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]


def _peft_dir(root: Path) -> Path:
    """A peft adapter directory written by peft itself (PeftModel.save_pretrained)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(11)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, init_lora_weights=False)
    model = get_peft_model(build_unet("tiny", seed=0), cfg)
    out = root / "attn_peft"
    model.save_pretrained(str(out))
    return out


def _diffusers_file(root: Path) -> Path:
    """A diffusers LoRA file (``unet.`` prefix) written by StableDiffusionPipeline.save_lora_weights."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(12)
    unet = build_unet("tiny", seed=0)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=4, target_modules=FF_PROJ, init_lora_weights=False))
    out = root / "ff_diffusers"
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


def _kohya_file(root: Path, info) -> Path:
    """A kohya file with LoCon on resnet convs, attention LoRA and Gemm layers (time_emb_proj), fp16."""
    lora = random_lora(info, modules=["resnets.0.conv1", "resnets.0.conv2", "attn2.to_k", "attn2.to_v",
                                      "resnets.0.time_emb_proj"],
                       rank=2, alpha=1.0, seed=13, scale_std=0.2, name="locon_kohya")
    return write_kohya(lora, root / "locon_kohya.safetensors", dtype="float16")


def _oracle(kind: str, path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Output of the torch U-Net with the LoRA loaded by peft/diffusers and fused."""
    from diffusers import StableDiffusionPipeline

    unet = build_unet("tiny", seed=0)
    if kind == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(unet, str(path)).merge_and_unload()
    else:
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=unet, adapter_name="t")
        unet.fuse_lora(lora_scale=1.0)
        model = unet
    with torch.no_grad():
        args = [torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states")]
        return model(*args, return_dict=False)[0].numpy()


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_torchscript_onnx):
    root = tmp_path_factory.mktemp("loras")
    _, info = frontend.load(tiny_torchscript_onnx)
    files = {
        "attn_peft": ("peft", _peft_dir(root)),
        "ff_diffusers": ("diffusers", _diffusers_file(root)),
        "locon_kohya": ("diffusers", _kohya_file(root, info)),
    }
    feeds = example_inputs("tiny", seed=3)
    oracles = {task: _oracle(kind, path, feeds) for task, (kind, path) in files.items()}
    with torch.no_grad():
        args = [torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states")]
        oracles["none"] = build_unet("tiny", seed=0)(*args, return_dict=False)[0].numpy()
    return {t: p for t, (_, p) in files.items()}, feeds, oracles


def _assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    scale = float(np.max(np.abs(want)))
    err = float(np.max(np.abs(got - want)))
    assert err <= 1e-4 * scale, f"{what}: max abs error {err:.3g} > 1e-4 x output scale {scale:.3g}"


@pytest.mark.parametrize("passes", ["float", "float,npu"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_compiled_graph_matches_fused_lora_oracle(exporter, passes, lora_files, tmp_path, request):
    """The LoRA-as-input graph (after the float passes, and after the whole NPU preset, which moves linear
    slots to the channels layout and folds scales into them) equals peft/diffusers' fused models."""
    model = request.getfixturevalue(f"tiny_{exporter}_onnx")
    paths, feeds, oracles = lora_files
    compile_model(model, tmp_path / "out", CompileOptions(loras={t: str(p) for t, p in paths.items()}, passes=passes))
    engine = Engine(tmp_path / "out")
    assert sorted(engine.tasks) == sorted(paths)
    # The LoRAs must matter, or this test could not fail.
    for task in paths:
        assert np.max(np.abs(oracles[task] - oracles["none"])) > 1e-2 * np.max(np.abs(oracles["none"])), task
    # Switch tasks on the one session in an order that revisits each, including the base model.
    order = ["locon_kohya", "attn_peft", "none", "ff_diffusers", "attn_peft", "locon_kohya", "none"]
    for task in order:
        got = engine.run(feeds, task=task)["out_sample"]
        _assert_close(got, oracles[task], f"{exporter}/{passes}/{task}")


def test_manifest_lists_each_task_file(lora_files, tiny_torchscript_onnx, tmp_path):
    from quadc.graph import file_sha256

    paths, _, _ = lora_files
    manifest = compile_model(tiny_torchscript_onnx, tmp_path / "out",
                             CompileOptions(loras={t: str(p) for t, p in paths.items()}))
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    for task, entry in manifest["tasks"].items():
        for kind, f in entry["files"].items():
            path = tmp_path / "out" / f["path"]
            assert path.stat().st_size == f["bytes"] and file_sha256(path) == f["sha256"], (task, kind)
    assert {e["format"] for e in manifest["tasks"].values()} == {"peft", "diffusers", "kohya"}
    kinds = {s["kind"] for s in manifest["lora_slots"]}
    assert kinds == {"linear", "conv"}


def test_lora_reaches_every_layer_kind(lora_files, tiny_torchscript_onnx):
    """MatMul, Gemm and Conv attach points all get slots (the oracle test then covers each kind)."""
    from quadc.lora import LoRASet, fit_lora, read_lora
    from quadc.lora.slots import plan_slots

    paths, _, _ = lora_files
    graph, info = frontend.load(tiny_torchscript_onnx)
    loras = LoRASet()
    for task, path in paths.items():
        loras.add(fit_lora(read_lora(path, name=task, info=info), info))
    slots = plan_slots(info, loras)
    ops = {n.name: n.op for n in graph.nodes}
    assert {ops[info.points[m].node] for m in slots} == {"MatMul", "Gemm", "Conv"}


def test_zero_lora_is_the_base_model_exactly(tiny_torchscript_onnx, tmp_path):
    import onnxruntime as ort

    compile_model(tiny_torchscript_onnx, tmp_path / "out", CompileOptions(pass_options={"lora-inputs": {"targets": "*", "rank": 4}}))
    feeds = example_inputs("tiny", seed=5)
    # ORT fuses MatMul+bias differently once a LoRA Add sits between them (1e-7 reassociation), so
    # compare with graph optimizations off on both sides: then W x + 0 must be bit-identical.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    base = ort.InferenceSession(str(tiny_torchscript_onnx), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    so2 = ort.SessionOptions()
    so2.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = Engine(tmp_path / "out", session_options=so2).run(feeds, task=None)["out_sample"]
    assert np.array_equal(got, base)
