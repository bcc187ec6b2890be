"""U-Net configurations quadc builds with diffusers: the full SD1.5 U-Net and a tiny one of the same blocks.

``sd15`` is Stable Diffusion 1.5's ``unet/config.json`` (859.5M parameters, 64x64 latents). ``tiny`` keeps
every block type of SD1.5 (CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D,
CrossAttnUpBlock2D; self- and cross-attention, GEGLU feed-forward, proj_in/proj_out as 1x1 Conv as in SD1.5) at a few
MB, for tests and the bundled default model.
"""

from __future__ import annotations

from typing import Any

from quadc.errors import QuadcError

SD15: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
}

TINY: dict[str, Any] = {
    **SD15,
    "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}

CONFIGS: dict[str, dict[str, Any]] = {"sd15": SD15, "tiny": TINY}

#: Text-conditioning sequence length of SD1.5 (CLIP ViT-L/14 tokens).
TEXT_TOKENS = {"sd15": 77, "tiny": 8}


def get_config(name: str) -> dict[str, Any]:
    """A copy of the named U-Net config (``sd15`` or ``tiny``)."""
    if name not in CONFIGS:
        raise QuadcError(f"unknown U-Net config '{name}'; use one of {', '.join(CONFIGS)}")
    return dict(CONFIGS[name])
