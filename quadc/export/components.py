"""Export the other Stable Diffusion 1.5 pipeline components: VAE encoder, VAE decoder, CLIP text encoder.

Each is built with its library (diffusers ``AutoencoderKL``, transformers ``CLIPTextModel``) from SD1.5's
config (``sd15``) or a tiny one of the same blocks (``tiny``: the trained VAE of ``quadc/data/tiny_sd/vae``
has this config), with deterministic random weights or from a local diffusers pipeline folder
(``--weights PATH``: PATH/vae or PATH/text_encoder, or the component folder itself), and exported with
the TorchScript exporter (opset 17) to a static-shape graph::

    vae-encoder    image float32 [1, 3, H, W] in [-1, 1]  -> latent float32 [1, 4, H/f, W/f]
                   (the posterior mean times the VAE's scaling_factor: what the U-Net samples)
    vae-decoder    latent float32 [1, 4, H/f, W/f]        -> image float32 [1, 3, H, W] (about [-1, 1])
                   (divides by scaling_factor first)
    text-encoder   input_ids int64 [1, T]                 -> last_hidden_state float32 [1, T, D]

so the runtime needs no scaling factor and no torch. Same config, weights and seed give the same bytes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from quadc.errors import QuadcError, require_extra
from quadc.graph import EMBED_MAX_BYTES, load_model, save_model

Progress = Callable[[str], None]

#: Component names of ``quadc export --component`` (``unet`` is :func:`quadc.export.export_unet`).
COMPONENTS = ("unet", "vae-encoder", "vae-decoder", "text-encoder")
OPSET = 17

#: Stable Diffusion 1.5's ``vae/config.json``.
VAE_SD15: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "sample_size": 512, "scaling_factor": 0.18215,
}
#: The tiny VAE (``scripts/train_fixtures.py``): SD1.5's blocks at 3 levels, 32x32 images <-> 8x8 latents.
VAE_TINY: dict[str, Any] = {
    **VAE_SD15, "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32,
    "scaling_factor": 1.0,
}
#: Stable Diffusion 1.5's ``text_encoder/config.json`` (CLIP ViT-L/14's text tower).
TEXT_SD15: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "projection_dim": 768, "layer_norm_eps": 1e-5,
}
#: A tiny CLIP text tower whose output fits the tiny U-Net (8 tokens x 32).
TEXT_TINY: dict[str, Any] = {
    **TEXT_SD15, "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 8, "projection_dim": 32,
    "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 1,
}
VAE_CONFIGS = {"sd15": VAE_SD15, "tiny": VAE_TINY}
TEXT_CONFIGS = {"sd15": TEXT_SD15, "tiny": TEXT_TINY}


def _config(table: dict[str, dict[str, Any]], name: str, what: str) -> dict[str, Any]:
    if name not in table:
        raise QuadcError(f"unknown {what} config '{name}'; use one of {', '.join(table)}")
    return dict(table[name])


def _component_dir(weights: str, sub: str) -> Path:
    root = Path(weights).expanduser()
    if not root.is_dir():
        raise QuadcError(f"{root}: no such folder; pass 'random' or a local diffusers pipeline folder")
    for candidate in (root / sub, root):
        if (candidate / "config.json").is_file():
            return candidate
    raise QuadcError(f"{root}: no config.json in {root / sub} or here; pass a diffusers pipeline folder "
                     f"(with {sub}/config.json and its weights)")


def _load_error(folder: Path, what: str, exc: Exception) -> QuadcError:
    first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
    return QuadcError(f"{folder}: not a loadable {what} ({first[:200]})")


def build_vae(config: str = "tiny", weights: str = "random", seed: int = 0) -> Any:
    """The diffusers ``AutoencoderKL`` in eval mode: random (seeded) or from a local folder."""
    require_extra("diffusers", "export")
    import torch
    from diffusers import AutoencoderKL

    from quadc.export.unet_export import _perturb_degenerate, _quiet

    if weights == "random":
        torch.manual_seed(seed)
        model = AutoencoderKL(**_config(VAE_CONFIGS, config, "VAE"))
        _perturb_degenerate(model, seed)
    else:
        folder = _component_dir(weights, "vae")
        try:
            with _quiet():
                model = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise _load_error(folder, "diffusers AutoencoderKL", exc) from None
    return model.eval()


def build_text_encoder(config: str = "tiny", weights: str = "random", seed: int = 0) -> Any:
    """The transformers ``CLIPTextModel`` in eval mode: random (seeded) or from a local folder."""
    require_extra("transformers", "export")
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    if weights == "random":
        torch.manual_seed(seed)
        model = CLIPTextModel(CLIPTextConfig(**_config(TEXT_CONFIGS, config, "text encoder")))
    else:
        folder = _component_dir(weights, "text_encoder")
        try:
            model = CLIPTextModel.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise _load_error(folder, "transformers CLIPTextModel", exc) from None
    return model.eval()


def _wrapper(component: str, model: Any) -> Any:
    """A module whose forward is the component's graph (see the module docstring)."""
    import torch

    class VaeEncoder(torch.nn.Module):
        def __init__(self, vae: Any):
            super().__init__()
            self.vae = vae

        def forward(self, image: Any) -> Any:
            return self.vae.encode(image).latent_dist.mean * self.vae.config.scaling_factor

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae: Any):
            super().__init__()
            self.vae = vae

        def forward(self, latent: Any) -> Any:
            return self.vae.decode(latent / self.vae.config.scaling_factor).sample

    class TextEncoder(torch.nn.Module):
        def __init__(self, clip: Any):
            super().__init__()
            self.clip = clip

        def forward(self, input_ids: Any) -> Any:
            return self.clip(input_ids=input_ids, return_dict=False)[0]

    return {"vae-encoder": VaeEncoder, "vae-decoder": VaeDecoder, "text-encoder": TextEncoder}[component](model)


def component_io(component: str, model: Any) -> tuple[str, str, Any]:
    """(input name, output name, example input tensor) of ``component`` built as ``model``."""
    import torch

    if component == "text-encoder":
        tokens = int(model.config.max_position_embeddings)
        ids = torch.arange(tokens, dtype=torch.int64).reshape(1, tokens) % int(model.config.vocab_size)
        return "input_ids", "last_hidden_state", ids
    size = int(model.config.sample_size)
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    if component == "vae-encoder":
        return "image", "latent", torch.zeros(1, int(model.config.in_channels), size, size)
    return "latent", "image", torch.zeros(1, int(model.config.latent_channels), size // factor, size // factor)


def export_component(component: str, config: str = "tiny", weights: str = "random",
                     out: str | os.PathLike[str] = "component.onnx", seed: int = 0,
                     progress: Progress | None = None) -> Path:
    """Export ``component`` (``vae-encoder``, ``vae-decoder`` or ``text-encoder``) to ``out``; returns it.

    Weights over :data:`quadc.graph.EMBED_MAX_BYTES` go to one ``<out>.data`` file. Written in a temporary
    folder beside ``out`` and moved into place when complete.
    """
    require_extra("torch", "export")
    import torch

    from quadc.export.unet_export import (
        _move_into_place,
        _normalize_proto,
        _param_bytes,
        _quiet,
        _unique_tmp_dir,
    )

    if component not in COMPONENTS or component == "unet":
        raise QuadcError(f"unknown component '{component}'; use one of {', '.join(COMPONENTS)}")
    out = Path(out)
    source = "random weights, seed " + str(seed) if weights == "random" else weights
    if progress:
        progress(f"building the {config} {component} ({source})")
    model = build_text_encoder(config, weights, seed) if component == "text-encoder" else build_vae(config, weights, seed)
    in_name, out_name, example = component_io(component, model)
    module = _wrapper(component, model).eval()
    large = _param_bytes(module) > EMBED_MAX_BYTES
    work = _unique_tmp_dir(out)
    try:
        raw = work / "raw.onnx"
        if progress:
            progress(f"exporting {component} with the torchscript exporter (opset {OPSET})")
        try:
            with torch.no_grad(), _quiet():
                torch.onnx.export(module, (example,), str(raw), dynamo=False, opset_version=OPSET,
                                  input_names=[in_name], output_names=[out_name], do_constant_folding=True)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
            raise QuadcError(f"the torchscript exporter failed on the {component} ({first[:300]})") from exc
        staged = work / out.name
        if large:
            save_model(load_model(raw), staged, external=True)
        else:
            proto = onnx.load(str(raw), load_external_data=True)
            _normalize_proto(proto)
            staged.write_bytes(proto.SerializeToString(deterministic=True))
        _move_into_place(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if progress:
        progress(f"wrote {out}")
    return out
