"""LoRA reading, writing, fitting and error messages that need only numpy and safetensors (no torch).

Layer shapes come from the bundled tiny U-Net through the ONNX frontend. The checks against files that
peft and diffusers write themselves are in test_lora_formats_torch.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from quadc import frontend
from quadc.errors import QuadcError
from quadc.frontend.model_info import ModelInfo
from quadc.lora import LoRA, LoRALayer, LoRASet, check_fits, fit_lora, read_lora
from quadc.lora.kohya_format import kohya_to_module, module_to_kohya
from quadc.testing_lora import random_lora, write_diffusers, write_kohya, write_peft

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.1.resnets.0.conv1"


@pytest.fixture(scope="module")
def info(bundled_unet) -> ModelInfo:
    """Attach points of the bundled tiny U-Net (the SD1.5 layer set at small widths)."""
    return frontend.load(bundled_unet)[1]


# ------------------------------------------------------------------------------------------------------- kohya
def test_kohya_names_round_trip(info: ModelInfo) -> None:
    """Every Linear/Conv path survives module -> kohya -> module, with and without the known paths."""
    from quadc.lora.kohya_format import known_names

    known = known_names(info.points)
    for module in info.points:
        name = module_to_kohya(module)
        assert name == "lora_unet_" + module.replace(".", "_")
        assert kohya_to_module(name) == module
        assert kohya_to_module(name, known) == module


def _sd15_layout() -> list[str]:
    """Module paths of SD1.5's block layout (2 layers per block; attention in down levels 0-2, up 1-3)."""
    attn = ["proj_in", "proj_out", "transformer_blocks.0.attn2.to_k", "transformer_blocks.0.ff.net.2"]
    res = ["conv1", "conv2", "time_emb_proj", "conv_shortcut"]
    mods = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
    for level in range(4):
        for j in range(2):
            mods += [f"down_blocks.{level}.resnets.{j}.{r}" for r in res]
            mods += [f"down_blocks.{level}.attentions.{j}.{a}" for a in attn if level < 3]
        mods += [f"down_blocks.{level}.downsamplers.0.conv"] if level < 3 else []
        for j in range(3):
            mods += [f"up_blocks.{level}.resnets.{j}.{r}" for r in res]
            mods += [f"up_blocks.{level}.attentions.{j}.{a}" for a in attn if level > 0]
        mods += [f"up_blocks.{level}.upsamplers.0.conv"] if level < 3 else []
    mods += [f"mid_block.resnets.{j}.{r}" for j in range(2) for r in res]
    return mods + [f"mid_block.attentions.0.{a}" for a in attn]


def test_ldm_names_of_sd15_layers() -> None:
    """The original SD1.5 checkpoint's names (model.diffusion_model.<name>.weight), written out by hand."""
    from quadc.lora.kohya_format import ldm_names

    names = ldm_names(_sd15_layout())
    assert {k: names[k] for k in (
        "conv_in", "time_embedding.linear_2", "down_blocks.1.attentions.1.proj_in", "down_blocks.2.downsamplers.0.conv",
        "down_blocks.3.resnets.1.conv2", "up_blocks.0.upsamplers.0.conv", "up_blocks.1.upsamplers.0.conv",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k", "up_blocks.2.resnets.0.conv_shortcut",
        "mid_block.attentions.0.proj_out", "mid_block.resnets.1.time_emb_proj", "conv_out")} == {
        "conv_in": "input_blocks.0.0", "time_embedding.linear_2": "time_embed.2",
        "down_blocks.1.attentions.1.proj_in": "input_blocks.5.1.proj_in",
        "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
        "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k": "output_blocks.11.1.transformer_blocks.0.attn2.to_k",
        "up_blocks.2.resnets.0.conv_shortcut": "output_blocks.6.0.skip_connection",
        "mid_block.attentions.0.proj_out": "middle_block.1.proj_out",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "conv_out": "out.2"}
    assert len(set(names.values())) == len(names) == len(_sd15_layout())


def test_kohya_file_with_ldm_names_reads_as_its_diffusers_twin(tmp_path: Path, info: ModelInfo) -> None:
    """A kohya file named after the original SD U-Net (lora_unet_input_blocks_1_1_proj_in, as diffusers'
    loader accepts) reads to the same layers and tensors as the file with diffusers names."""
    from quadc.lora.kohya_format import ldm_names

    lora = random_lora(info, rank=2, seed=4, name="ldm")
    twin = write_kohya(lora, tmp_path / "diffusers_names.safetensors")
    ldm = {module_to_kohya(m): "lora_unet_" + n.replace(".", "_") for m, n in ldm_names(info.points).items()}
    renamed = {}
    for key, value in safetensors.numpy.load_file(str(twin)).items():
        name, _, suffix = key.partition(".")
        renamed[f"{ldm[name]}.{suffix}"] = value
    assert any("input_blocks" in k for k in renamed) and not any("down_blocks" in k for k in renamed)
    safetensors.numpy.save_file(renamed, str(tmp_path / "ldm_names.safetensors"))
    want = read_lora(twin, info=info)
    got = read_lora(tmp_path / "ldm_names.safetensors", info=info)
    assert set(got.layers) == set(want.layers) == set(info.points)
    for module, layer in want.layers.items():
        assert np.array_equal(got.layers[module].down, layer.down) and np.array_equal(got.layers[module].up, layer.up)
        assert got.layers[module].scale == layer.scale


def test_kohya_handmade_file(tmp_path: Path, info: ModelInfo) -> None:
    """A kohya file built by hand: fp16 factors, 4-D 1x1 linear factors, missing alphas, text-encoder keys."""
    rng = np.random.default_rng(0)
    targets = ("to_k", "conv1", "proj_in", "time_emb_proj")
    modules = [m for m in info.points if m.endswith(targets)]
    assert {m.rsplit(".", 1)[-1] for m in modules} == set(targets)
    sd: dict[str, np.ndarray] = {}
    expected: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for i, module in enumerate(modules):
        p = info.points[module]
        kernel = p.kernel if p.kind == "conv" else ()
        a = rng.standard_normal((4, p.d_in, *kernel)).astype(np.float16)
        b = rng.standard_normal((p.d_out, 4, *((1, 1) if kernel else ()))).astype(np.float16)
        name = "lora_unet_" + module.replace(".", "_")
        stored_a, stored_b = (a[:, :, None, None], b[:, :, None, None]) if module.endswith("to_k") else (a, b)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = stored_a, stored_b
        alpha = 4.0  # kohya without an alpha key: alpha = rank, scale 1
        if i % 2 == 0:
            alpha = float(i + 1)
            sd[f"{name}.alpha"] = np.array(i + 1, dtype=np.float16)
        expected[module] = (a.astype(np.float32), b.astype(np.float32), alpha / 4)
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = np.ones((4, 8), np.float16)
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = np.ones((8, 4), np.float16)
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = np.array(4, np.float16)
    safetensors.numpy.save_file(sd, str(tmp_path / "k.safetensors"))
    for kwargs in ({}, {"info": info}, {"info": list(info.points)}):
        lora = read_lora(tmp_path / "k.safetensors", **kwargs)
        assert lora.format == "kohya" and lora.meta["ignored_text_encoder_keys"] == 3
        assert set(lora.layers) == set(expected)
        for module, (a, b, scale) in expected.items():
            layer = lora.layers[module]
            assert layer.down.dtype == np.float32 and layer.up.dtype == np.float32
            np.testing.assert_array_equal(layer.down, a, err_msg=module)  # fp16 values are exact in fp32
            np.testing.assert_array_equal(layer.up, b, err_msg=module)
            assert layer.scale == scale, module
        assert lora.layers["down_blocks.0.attentions.0.proj_in"].down.shape == (4, 32, 1, 1)
        check_fits(lora, info)


def test_compile_says_when_it_leaves_out_text_encoder_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A kohya file from a trainer carries text-encoder tensors too; compile keeps the U-Net part and says so
    (a user must not think the whole LoRA is in the artifact)."""
    from quadc.cli import main

    rng = np.random.default_rng(0)
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd = {f"{module}.lora_down.weight": rng.standard_normal((4, 32)).astype(np.float16),
          f"{module}.lora_up.weight": rng.standard_normal((32, 4)).astype(np.float16),
          f"{te}.lora_down.weight": np.ones((4, 8), np.float16), f"{te}.lora_up.weight": np.ones((8, 4), np.float16),
          f"{te}.alpha": np.array(4, np.float16)}
    safetensors.numpy.save_file(sd, str(tmp_path / "k.safetensors"))
    assert main(["compile", "--lora", f"k={tmp_path / 'k.safetensors'}", "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "LoRA 'k': 3 text-encoder tensor(s) left out" in err, err


def test_writers_are_deterministic(tmp_path: Path, info: ModelInfo) -> None:
    def files(tag: str) -> list[bytes]:
        lora = random_lora(info, ["to_q", "conv1"], rank=2, alpha=3, seed=11)
        write_peft(lora, tmp_path / tag / "p")
        write_diffusers(lora, tmp_path / tag / "d.safetensors")
        write_kohya(lora, tmp_path / tag / "k.safetensors", dtype="float16")
        write_kohya(lora, tmp_path / tag / "b.safetensors", dtype="bfloat16")
        return [p.read_bytes() for p in sorted((tmp_path / tag).rglob("*")) if p.is_file()]

    first, second = files("a"), files("b")
    assert len(first) == 5 and first == second
    bf = read_lora(tmp_path / "a" / "b.safetensors", info=info)
    ref = random_lora(info, ["to_q", "conv1"], rank=2, alpha=3, seed=11)
    for module, layer in bf.layers.items():
        np.testing.assert_allclose(layer.down, ref.layers[module].down, rtol=1e-2, atol=1e-3)
        assert layer.scale == pytest.approx(1.5)


def test_random_lora_shapes_and_scale(info: ModelInfo) -> None:
    lora = random_lora(info, ["to_q", "conv1", "proj_in"], rank=4, alpha=8, seed=0, scale_std=0.1)
    assert lora.layers[Q].down.shape == (4, 32) and lora.layers[Q].up.shape == (32, 4)
    assert lora.layers[CONV].down.shape == (4, 32, 3, 3) and lora.layers[CONV].up.shape == (64, 4, 1, 1)
    assert lora.layers["down_blocks.0.attentions.0.proj_in"].down.shape == (4, 32, 1, 1)
    x = np.random.default_rng(0).standard_normal((32, 4096))
    out = lora.layers[Q].scale * lora.layers[Q].up @ (lora.layers[Q].down @ x)
    assert 0.05 < out.std() < 0.2
    check_fits(lora, info)
    with pytest.raises(QuadcError, match="'to_z'"):
        random_lora(info, ["to_z"])


def test_lora_set() -> None:
    shapes = {"a.to_q": ("linear", 8, 8), "b.to_k": ("linear", 8, 8)}
    one = random_lora(shapes, ["a.to_q"], rank=2, name="one")
    two = random_lora(shapes, rank=6, name="two")
    loras = LoRASet([one, two])
    assert list(loras) == ["one", "two"] and loras["two"] is two and len(loras) == 2
    assert loras.union_modules() == ["a.to_q", "b.to_k"]
    assert loras.max_rank("a.to_q") == 6 and loras.max_rank("nope") == 0
    with pytest.raises(QuadcError, match="'one'"):
        loras.add(random_lora(shapes, name="one"))


# ----------------------------------------------------------------------------------------------- fit checks
def test_fit_reshapes_linear_lora_for_1x1_conv(info: ModelInfo) -> None:
    module = "down_blocks.0.attentions.0.proj_in"  # Conv2d 1x1 in SD1.5
    layer = LoRALayer(module, np.ones((32, 2)), np.ones((2, 32)), alpha=2, rank=2)
    fitted = fit_lora(LoRA("x", {module: layer}), info)
    assert fitted.layers[module].down.shape == (2, 32, 1, 1) and fitted.layers[module].up.shape == (
        32,
        2,
        1,
        1,
    )
    square = LoRALayer(Q, np.ones((32, 2, 1, 1)), np.ones((2, 32, 1, 1)), alpha=2, rank=2)
    assert fit_lora(LoRA("x", {Q: square}), info).layers[Q].down.shape == (2, 32)


@pytest.mark.parametrize(
    ("module", "up", "down", "needles"),
    [
        (Q.replace("to_q", "to_z"), (32, 2), (2, 32), ["to_z", "not a LoRA attach point", Q]),
        (Q, (32, 2), (2, 48), [Q, "down [r, 32] and up [32, r]", "(2, 48)"]),
        (Q, (64, 2), (2, 32), [Q, "(64, 2)"]),
        (Q, (32, 2, 1, 1), (2, 32, 3, 3), [Q, "3x3 conv LoRA", "linear"]),
        (CONV, (64, 2), (2, 32), [CONV, "linear LoRA", "3x3", "[r, 32, 3, 3]"]),
        (CONV, (64, 2, 1, 1), (2, 32, 1, 1), [CONV, "[r, 32, 3, 3]", "(2, 32, 1, 1)"]),
        (CONV, (64, 2, 1, 1), (2, 16, 3, 3), [CONV, "(2, 16, 3, 3)"]),
    ],
)
def test_check_fits_errors(info: ModelInfo, module: str, up: tuple, down: tuple, needles: list[str]) -> None:
    layer = LoRALayer(module, np.zeros(up), np.zeros(down), alpha=1, rank=2)
    lora = LoRA("bad", {module: layer}, source="/loras/bad.safetensors")
    with pytest.raises(QuadcError) as err:
        check_fits(lora, info)
    message = str(err.value)
    for needle in ["/loras/bad.safetensors", *needles]:
        assert needle in message


# ---------------------------------------------------------------------------------------------- read errors
def _save(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    safetensors.numpy.save_file(tensors, str(path))
    return path


A = f"{Q}.lora_A.weight"
B = f"{Q}.lora_B.weight"


def test_read_errors_for_bad_files(tmp_path: Path) -> None:
    with pytest.raises(QuadcError, match="does not exist") as err:
        read_lora(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(err.value)

    good = _save(
        tmp_path / "good.safetensors", {A: np.ones((2, 32), np.float32), B: np.ones((32, 2), np.float32)}
    )
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 20])
    with pytest.raises(QuadcError, match="not a readable safetensors file") as err:
        read_lora(tmp_path / "cut.safetensors")
    assert "cut.safetensors" in str(err.value)

    (tmp_path / "text.safetensors").write_text("this is not a tensor file at all")
    with pytest.raises(QuadcError, match="text.safetensors.*not a readable safetensors"):
        read_lora(tmp_path / "text.safetensors")

    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(QuadcError, match="pickled"):
        read_lora(tmp_path / "model.ckpt")

    (tmp_path / "empty").mkdir()
    with pytest.raises(QuadcError, match="adapter_model.safetensors"):
        read_lora(tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.safetensors", "empty", "good.safetensors",
                                                          "model.ckpt", "text.safetensors"]  # fmt: skip


@pytest.mark.parametrize(
    ("tensors", "needles"),
    [
        ({"conv_in.weight": np.ones((4, 4), np.float32)}, ["no LoRA tensors", "conv_in.weight"]),
        ({A: np.ones((2, 32), np.float32), B: np.ones((32, 3), np.float32)}, [Q, "rank 2", "3", "A/B"]),
        ({B: np.ones((32, 2), np.float32)}, [Q, "only its up factor", "no down factor"]),
        ({A: np.ones((2, 32), np.float32)}, [Q, "only its down factor", "no up factor"]),
        ({A: np.full((2, 32), np.nan, np.float32), B: np.ones((32, 2), np.float32)}, [A, "NaN or Inf"]),
        ({A: np.ones((2, 32), np.float32), B: np.full((32, 2), np.inf, np.float16)}, [B, "NaN or Inf"]),
        ({A: np.ones((2, 32), np.int8), B: np.ones((32, 2), np.float32)}, [A, "dtype I8", "float"]),
        (
            {"lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": np.ones((32, 2, 1, 1), np.float32)},
            ["down_blocks.0.resnets.0.conv1", "only its up factor"],
        ),
        (
            {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.ones((2, 8), np.float32)},
            ["only has text-encoder", "lora_te_text_model_encoder_layers_0_mlp_fc1"],
        ),
        (
            {
                A: np.ones((2, 32), np.float32),
                B: np.ones((32, 2), np.float32),
                f"{Q}.lora_magnitude_vector": np.ones(32, np.float32),
            },
            ["DoRA", "lora_magnitude_vector"],
        ),
        (
            {"lora_unet_mid_block_resnets_0_conv1.hada_w1_a": np.ones((2, 8), np.float32)},
            ["LoHa", "hada_w1_a"],
        ),
        (
            {
                A: np.ones((2, 32), np.float32),
                B: np.ones((32, 2), np.float32),
                "extra.bias": np.ones(3, np.float32),
            },
            ["extra.bias", "not a LoRA factor"],
        ),
        (
            {A: np.ones((2, 32), np.float32), B: np.ones((32, 2, 3, 3), np.float32)},
            [Q, "(32, 2, 3, 3)", "1x1"],
        ),
    ],
)
def test_read_errors_name_the_offender(
    tmp_path: Path, tensors: dict[str, np.ndarray], needles: list[str]
) -> None:
    path = _save(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(QuadcError) as err:
        read_lora(path)
    message = str(err.value)
    for needle in ["bad.safetensors", *needles]:
        assert needle in message
    assert [p.name for p in tmp_path.iterdir()] == ["bad.safetensors"]


def test_config_rank_mismatch_and_dora_config(tmp_path: Path) -> None:
    path = _save(
        tmp_path / "w.safetensors", {A: np.ones((2, 32), np.float32), B: np.ones((32, 2), np.float32)}
    )
    (tmp_path / "c.json").write_text(json.dumps({"r": 8, "lora_alpha": 8, "peft_type": "LORA"}))
    with pytest.raises(QuadcError, match=rf"{Q}.*rank 2.*r=8"):
        read_lora(path, config_path=tmp_path / "c.json")
    (tmp_path / "c.json").write_text(json.dumps({"r": 2, "lora_alpha": 8, "use_dora": True}))
    with pytest.raises(QuadcError, match="DoRA"):
        read_lora(path, config_path=tmp_path / "c.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(QuadcError, match="c.json.*not valid JSON"):
        read_lora(path, config_path=tmp_path / "c.json")
    (tmp_path / "c.json").write_text(
        json.dumps({"r": 2, "lora_alpha": 1, "alpha_pattern": {"attn1.to_q": 6}})
    )
    assert read_lora(path, config_path=tmp_path / "c.json").layers[Q].scale == 3.0
