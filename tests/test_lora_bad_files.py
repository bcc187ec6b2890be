"""LoRA files a new user may bring that earlier tests did not cover (found by trying quadc as a user)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from quadc.errors import QuadcError
from quadc.lora import read_lora

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def test_rank_zero_factors_are_a_one_line_error(tmp_path: Path) -> None:
    """A file whose factors have rank 0 (an empty, broken export) is refused, not a ZeroDivisionError."""
    path = tmp_path / "rank0.safetensors"
    safetensors.numpy.save_file(
        {f"{Q}.lora_down.weight": np.zeros((0, 32), np.float32), f"{Q}.lora_up.weight": np.zeros((32, 0), np.float32)},
        str(path),
    )
    with pytest.raises(QuadcError, match=r"rank 0") as err:
        read_lora(path)
    assert "\n" not in str(err.value)


def test_file_mixing_kohya_and_diffusers_keys_names_both_styles(tmp_path: Path) -> None:
    """A file with kohya keys and diffusers ``lora_A``/``lora_B`` keys (two LoRAs pasted together) is refused
    as a mix of key styles, not by calling the valid diffusers factors 'not a LoRA factor'."""
    path = tmp_path / "mixed.safetensors"
    conv = "unet.down_blocks.1.resnets.0.conv1"
    safetensors.numpy.save_file(
        {
            f"{Q}.lora_down.weight": np.ones((4, 32), np.float32),
            f"{Q}.lora_up.weight": np.ones((32, 4), np.float32),
            f"{conv}.lora_A.weight": np.ones((4, 32, 3, 3), np.float32),
            f"{conv}.lora_B.weight": np.ones((64, 4, 1, 1), np.float32),
        },
        str(path),
    )
    with pytest.raises(QuadcError, match=r"mixes kohya .* and diffusers/peft") as err:
        read_lora(path)
    assert "not a LoRA factor" not in str(err.value)
    assert "\n" not in str(err.value)


def test_file_with_two_peft_adapters_says_so(tmp_path: Path) -> None:
    """A peft state dict saved with two adapter names on the same layers is refused as several adapters
    (the message used to blame mixed key styles)."""
    path = tmp_path / "two.safetensors"
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {}
    for adapter in ("style", "face"):
        tensors[f"{q}.lora_A.{adapter}.weight"] = np.ones((4, 32), np.float32)
        tensors[f"{q}.lora_B.{adapter}.weight"] = np.ones((32, 4), np.float32)
    safetensors.numpy.save_file(tensors, str(path))
    with pytest.raises(QuadcError, match=r"several peft adapters \(face, style\)") as err:
        read_lora(path)
    assert "\n" not in str(err.value)


def test_rank_zero_layer_built_in_python_is_refused() -> None:
    """LoRALayer with rank 0 (an empty LoRA made in code) is refused at construction, before its scale
    divides by the rank."""
    from quadc.lora import LoRALayer

    with pytest.raises(QuadcError, match=r"rank 0"):
        LoRALayer(module="m", up=np.zeros((32, 0)), down=np.zeros((0, 32)), alpha=1.0, rank=0)
