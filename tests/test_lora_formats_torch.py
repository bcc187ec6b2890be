"""LoRA readers and writers checked against files written by peft and diffusers themselves.

The oracles are the real libraries: peft's ``get_peft_model_state_dict`` / ``PeftModel.save_pretrained``,
diffusers' ``save_lora_adapter`` / ``save_lora_weights`` / ``convert_state_dict_to_diffusers`` write the
files; the torch modules' ``lora_A``/``lora_B`` weights and ``scaling`` are the expected values. For kohya,
diffusers' own kohya loader (``lora_state_dict`` + ``load_lora_into_unet``) is the oracle. Every test here
needs torch, diffusers and peft; the format tests that need only numpy are in test_lora_formats.py.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from quadc.frontend.model_info import AttachPoint, ModelInfo
from quadc.lora import LoRA, LoRALayer, check_fits, read_lora
from quadc.lora.kohya_format import module_to_kohya
from quadc.testing_lora import random_lora, write_diffusers, write_kohya, write_peft

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from quadc.export.configs import TINY  # noqa: E402

TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
]
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.1.resnets.0.conv1"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def make_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY).eval()


def fake_info(model: torch.nn.Module) -> ModelInfo:
    """A ModelInfo from the torch model's Linear/Conv2d layers (no ONNX frontend needed)."""
    points: dict[str, AttachPoint] = {}
    for name, m in model.named_modules():
        common = {"module": name, "node": name, "weight": f"{name}.weight"}
        if isinstance(m, torch.nn.Linear):
            points[name] = AttachPoint(**common, kind="linear", d_in=m.in_features, d_out=m.out_features)
        elif isinstance(m, torch.nn.Conv2d):
            points[name] = AttachPoint(
                **common,
                kind="conv",
                d_in=m.in_channels,
                d_out=m.out_channels,
                kernel=tuple(m.kernel_size),
                weight_layout="conv",
            )
    return ModelInfo(points=points)


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    return fake_info(make_unet())


def randomize_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """peft zero-inits lora_B; give every LoRA factor random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def peft_unet(config: LoraConfig, seed: int = 1) -> UNet2DConditionModel:
    unet = make_unet()
    unet.add_adapter(config)
    randomize_lora(unet, seed)
    return unet


def torch_lora(model: torch.nn.Module, adapter: str = "default", strip: str = "") -> dict[str, tuple]:
    """module -> (lora_A weight, lora_B weight, scaling) from the peft-wrapped torch modules."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and adapter in m.lora_A:
            out[name.removeprefix(strip)] = (
                m.lora_A[adapter].weight.detach().float().numpy(),
                m.lora_B[adapter].weight.detach().float().numpy(),
                float(m.scaling[adapter]),
            )
    return out


def assert_same(lora: LoRA, expected: dict[str, tuple], exact: bool = True) -> None:
    assert set(lora.layers) == set(expected)
    for module, (a, b, scaling) in expected.items():
        layer = lora.layers[module]
        assert layer.down.dtype == np.float32 and layer.up.dtype == np.float32
        assert layer.down.shape == a.shape, module
        assert layer.up.shape == b.shape, module
        if exact:
            np.testing.assert_array_equal(layer.down, a, err_msg=module)
            np.testing.assert_array_equal(layer.up, b, err_msg=module)
        else:
            np.testing.assert_allclose(layer.down, a, rtol=1e-2, atol=1e-3, err_msg=module)
            np.testing.assert_allclose(layer.up, b, rtol=1e-2, atol=1e-3, err_msg=module)
        assert layer.scale == pytest.approx(scaling, rel=1e-6), module


MIXED = LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=TARGETS,
    rank_pattern={"attn2.to_k": 2, "conv_shortcut": 3},
    alpha_pattern={"conv1": 3, "ff.net.2": 16},
)


# ----------------------------------------------------------------------------------- diffusers / peft files
def test_peft_adapter_dir_matches_peft(tmp_path: Path, info: ModelInfo) -> None:
    model = get_peft_model(make_unet(), MIXED)
    randomize_lora(model)
    model.save_pretrained(tmp_path / "adapter")
    expected = torch_lora(model, strip="base_model.model.")
    assert {len(v[0].shape) for v in expected.values()} == {2, 4}  # linear and conv (LoCon) layers
    assert any(s != 2.0 for *_, s in expected.values())  # the patterns change some scales
    lora = read_lora(tmp_path / "adapter")
    assert lora.format == "peft" and lora.name == "adapter"
    assert lora.meta["config"]["r"] == 4
    assert_same(lora, expected)
    check_fits(lora, info)


def test_peft_rslora_and_explicit_config(tmp_path: Path) -> None:
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "conv1"], use_rslora=True)
    model = get_peft_model(make_unet(), cfg)
    randomize_lora(model)
    model.save_pretrained(tmp_path / "a")
    expected = torch_lora(model, strip="base_model.model.")
    assert all(s == pytest.approx(6 / math.sqrt(4)) for *_, s in expected.values())
    assert_same(read_lora(tmp_path / "a"), expected)
    # a bare weights file with its config passed explicitly
    weights = tmp_path / "a" / "adapter_model.safetensors"
    lora = read_lora(weights, "x", config_path=tmp_path / "a" / "adapter_config.json")
    assert lora.name == "x"
    assert_same(lora, expected)
    # without any config alpha defaults to the rank (scale 1)
    assert {layer.scale for layer in read_lora(weights).layers.values()} == {1.0}


def test_diffusers_save_lora_adapter(tmp_path: Path) -> None:
    """``unet.save_lora_adapter``: plain module keys, peft config in the safetensors header."""
    unet = peft_unet(MIXED)
    unet.save_lora_adapter(tmp_path)
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert lora.format == "diffusers" and lora.meta["config_source"] == "safetensors metadata"
    assert_same(lora, torch_lora(unet))
    assert_same(read_lora(tmp_path), torch_lora(unet))  # the directory works too


def test_diffusers_save_lora_weights_with_text_encoder(tmp_path: Path) -> None:
    """``StableDiffusionPipeline.save_lora_weights``: ``unet.`` keys, ``unet.``-prefixed metadata, TE ignored."""
    unet = peft_unet(MIXED)
    te = {"text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 8)}
    te["text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.ones(8, 4)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=te,
        unet_lora_adapter_metadata=MIXED.to_dict(),
    )
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors", "style")
    assert '"unet.lora_alpha": 8' in lora.meta["file_metadata"]["lora_adapter_metadata"]
    assert lora.meta["ignored_text_encoder_keys"] == 2
    assert_same(lora, torch_lora(unet))


def test_diffusers_old_lora_down_up_keys(tmp_path: Path) -> None:
    """``convert_state_dict_to_diffusers`` gives ``<module>.lora.down.weight``; no alpha -> alpha = rank."""
    from diffusers.utils import convert_state_dict_to_diffusers

    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS)
    unet = peft_unet(cfg)
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    assert any(".lora.down.weight" in k for k in sd)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=sd)
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert "lora.down/lora.up" in lora.meta["key_style"]  # diffusers converts only some keys
    assert_same(lora, torch_lora(unet))


def test_attn_processor_keys_match_diffusers_conversion(tmp_path: Path) -> None:
    """The attn-processor form; diffusers' ``convert_unet_state_dict_to_peft`` is the name oracle."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    attn = "mid_block.attentions.0.transformer_blocks.0.attn2"
    rng = np.random.default_rng(0)
    sd = {}
    for proj, d_in in (("to_q", 64), ("to_k", 32), ("to_out", 64)):
        sd[f"unet.{attn}.processor.{proj}_lora.down.weight"] = rng.standard_normal((2, d_in)).astype(
            np.float32
        )
        sd[f"unet.{attn}.processor.{proj}_lora.up.weight"] = rng.standard_normal((64, 2)).astype(np.float32)
    safetensors.numpy.save_file(sd, str(tmp_path / "proc.safetensors"))
    lora = read_lora(tmp_path / "proc.safetensors", info=fake_info(make_unet()))
    oracle = convert_unet_state_dict_to_peft(
        {k.removeprefix("unet."): torch.from_numpy(v) for k, v in sd.items()}
    )
    expected = {k.removesuffix(".lora_A.weight") for k in oracle if k.endswith(".lora_A.weight")}
    assert set(lora.layers) == expected == {f"{attn}.to_q", f"{attn}.to_k", f"{attn}.to_out.0"}
    for key, value in oracle.items():
        module, _, rest = key.partition(".lora_")
        layer = lora.layers[module]
        np.testing.assert_array_equal(layer.down if rest.startswith("A") else layer.up, value.numpy())


def test_bf16_and_fp16_peft_files(tmp_path: Path) -> None:
    import safetensors.torch

    unet = peft_unet(LoraConfig(r=2, lora_alpha=2, target_modules=["to_v", "conv2"]))
    sd = get_peft_model_state_dict(unet)
    for dtype in (torch.bfloat16, torch.float16):
        path = tmp_path / f"{dtype}.safetensors".replace("torch.", "")
        safetensors.torch.save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path))
        lora = read_lora(path)
        for module, layer in lora.layers.items():
            np.testing.assert_array_equal(layer.down, sd[f"{module}.lora_A.weight"].to(dtype).float().numpy())
            np.testing.assert_array_equal(layer.up, sd[f"{module}.lora_B.weight"].to(dtype).float().numpy())
        assert len(lora.layers) == len(sd) // 2


def test_scale_semantics_match_peft_forward() -> None:
    """y = W x + scale * up(down x) reproduces peft's forward for a linear and a (strided, padded) conv layer."""
    import torch.nn.functional as F

    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["to_q", "conv1", "downsamplers.0.conv"])
    unet = peft_unet(cfg)
    tmp = {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        import safetensors.torch

        safetensors.torch.save_file(tmp, f"{d}/l.safetensors")
        lora = read_lora(f"{d}/l.safetensors", config_path=_write_json(d, cfg.to_dict()))
    modules = dict(unet.named_modules())
    with torch.no_grad():
        x = torch.randn(2, 5, 32)
        layer = lora.layers[Q]
        got = modules[Q](x) - modules[Q].base_layer(x)
        ref = layer.scale * (x @ torch.from_numpy(layer.down).T) @ torch.from_numpy(layer.up).T
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        for name in (CONV, "down_blocks.0.downsamplers.0.conv"):
            base = modules[name].base_layer
            x = torch.randn(1, base.in_channels, 8, 8)
            layer = lora.layers[name]
            got = modules[name](x) - base(x)
            mid = F.conv2d(x, torch.from_numpy(layer.down), stride=base.stride, padding=base.padding)
            ref = layer.scale * F.conv2d(mid, torch.from_numpy(layer.up))
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(
                layer.delta(),
                layer.scale * np.einsum("or,rikl->oikl", layer.up[:, :, 0, 0], layer.down),
                rtol=1e-6,
            )


def _write_json(directory: str, data: dict) -> str:
    path = f"{directory}/adapter_config.json"
    with open(path, "w") as f:
        json.dump({k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}, f)
    return path


# ------------------------------------------------------------------------------------------------------- kohya
def test_kohya_names_match_diffusers(info: ModelInfo) -> None:
    """diffusers' own kohya key conversion turns quadc's kohya name of every layer back into its module."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key
    from diffusers.utils import convert_unet_state_dict_to_peft

    for module in info.points:
        converted = _convert_unet_lora_key(f"{module_to_kohya(module)}.lora_down.weight")
        peft_key = next(iter(convert_unet_state_dict_to_peft({converted: torch.zeros(1)})))
        assert peft_key == f"{module}.lora_A.weight"


def test_ldm_names_match_diffusers_sgm_mapping(info: ModelInfo) -> None:
    """diffusers' loader maps kohya keys in the original SD U-Net's names (input_blocks, middle_block,
    output_blocks) to its modules; quadc's LDM name of every layer maps back to that layer. The one
    exception is diffusers' own: it sends the upsampler of an up level without attention
    (output_blocks.N.1.conv) to 'attentions', where the original U-Net has its Upsample."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    from quadc.lora.kohya_format import ldm_names

    names = ldm_names(info.points)
    assert len(names) == len(info.points)
    sd = {f"lora_unet_{ldm.replace('.', '_')}.{suffix}": torch.zeros(2, 2)
          for ldm in names.values() for suffix in ("lora_down.weight", "lora_up.weight")}
    converted, _ = StableDiffusionPipeline.lora_state_dict(sd, unet_config=make_unet().config)
    back = {k.removeprefix("unet.").removesuffix(".lora_A.weight")
            for k in convert_unet_state_dict_to_peft({k: v for k, v in converted.items() if "down" in k or "lora_A" in k})}
    plain = {m for m in names if not (m.startswith("up_blocks.") and ".upsamplers." in m
                                      and f"up_blocks.{m.split('.')[1]}.attentions.0.proj_in" not in names)}
    assert plain < set(names) and plain <= back, sorted(plain - back)[:5]


def test_kohya_writer_loads_in_diffusers(tmp_path: Path, info: ModelInfo) -> None:
    """write_kohya (fp16 and fp32) -> diffusers' kohya loader -> same factors and scaling as read_lora."""
    lora = random_lora(
        info,
        ["to_q", "to_out.0", "ff.net.0.proj", "proj_in", "conv1", "conv_shortcut", "time_emb_proj",
         "time_embedding.linear_1", "downsamplers.0.conv", "conv_in"],
        rank=4, alpha=2, seed=3,
    )  # fmt: skip
    # a different rank on an attention layer, a different alpha on a conv layer (diffusers 0.42 drops
    # per-layer alphas of attention layers that differ from the most common one: its alpha_pattern keys
    # keep the ".processor.to_q_lora.down.weight" spelling, so those are not exercised here)
    lora.layers[Q] = LoRALayer(Q, lora.layers[Q].up[:, :2], lora.layers[Q].down[:2], alpha=2.0, rank=2)
    old = lora.layers[CONV]
    lora.layers[CONV] = LoRALayer(CONV, old.up, old.down, alpha=6.0, rank=4)
    for dtype in ("float32", "float16"):
        path = write_kohya(lora, tmp_path / f"k_{dtype}.safetensors", dtype=dtype)
        unet = make_unet()
        sd, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
        StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet, adapter_name="k")
        expected = torch_lora(unet, "k")
        read = read_lora(path, info=info)
        assert_same(read, expected)
        assert read.layers[Q].scale == 1.0 and read.layers[CONV].scale == 1.5
        assert_same(lora, expected, exact=dtype == "float32")


# ------------------------------------------------------------------------------------------------ writers
def test_writers_load_in_peft_and_diffusers(tmp_path: Path, info: ModelInfo) -> None:
    lora = random_lora(info, ["attn1.to_q", "attn2.to_v", "conv2", "proj_out"], rank=3, alpha=1.5, seed=7)
    lora.layers[CONV] = random_lora(info, [CONV], rank=5, alpha=10, seed=8).layers[CONV]
    write_peft(lora, tmp_path / "peft")
    model = PeftModel.from_pretrained(make_unet(), str(tmp_path / "peft"))
    assert_same(lora, torch_lora(model, strip="base_model.model."))
    write_diffusers(lora, tmp_path / "d.safetensors")
    unet = make_unet()
    unet.load_lora_adapter(str(tmp_path), weight_name="d.safetensors", prefix="unet", adapter_name="d")
    assert_same(lora, torch_lora(unet, "d"))
    for path in (tmp_path / "peft", tmp_path / "d.safetensors"):
        assert_same(read_lora(path), torch_lora(unet, "d"))
