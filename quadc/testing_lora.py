"""LoRA fixtures for tests, scripts and benchmarks: random adapters and writers for the peft, diffusers and
kohya formats. No library module imports this one (``tests/test_layering.py`` checks it).

These build the bundled demo LoRAs and the test fixtures, with numpy only (no torch). Writers are
byte-for-byte deterministic (:func:`quadc.lora.safetensors_io.save_safetensors`); the files are standard
safetensors that the library, peft and diffusers read.

* :func:`write_peft` — a peft adapter directory: ``adapter_model.safetensors`` with
  ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` and ``adapter_config.json``.
* :func:`write_diffusers` — one file with ``unet.<module>.lora_A.weight`` keys and the peft config in the
  header's ``lora_adapter_metadata`` (``unet.``-prefixed keys), as diffusers' ``save_lora_weights`` writes.
* :func:`write_kohya` — one file with ``lora_unet_<module_with_underscores>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha``, float32, float16 or bfloat16.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quadc.errors import QuadcError
from quadc.frontend.model_info import AttachPoint, ModelInfo
from quadc.lora import peft_format
from quadc.lora.kohya_format import module_to_kohya
from quadc.lora.model import LoRA, LoRALayer
from quadc.lora.safetensors_io import save_safetensors

Shape = tuple[str, int, int] | tuple[str, int, int, tuple[int, int]]


# ------------------------------------------------------------------------------------------------ random LoRA
def _shape_table(info_or_shapes: ModelInfo | Mapping[str, AttachPoint | Shape]) -> dict[str, Shape]:
    points = info_or_shapes.points if isinstance(info_or_shapes, ModelInfo) else info_or_shapes
    table: dict[str, Shape] = {}
    for module, spec in points.items():
        if isinstance(spec, AttachPoint):
            table[module] = (spec.kind, spec.d_in, spec.d_out, tuple(spec.kernel))  # type: ignore[assignment]
        else:
            kind, d_in, d_out, *rest = spec
            kernel = tuple(rest[0]) if rest else (1, 1)
            table[module] = (kind, int(d_in), int(d_out), kernel)  # type: ignore[assignment]
    return table


def _select(table: Mapping[str, Shape], modules: Sequence[str] | None) -> list[str]:
    if modules is None:
        return list(table)
    chosen: dict[str, None] = {}
    for wanted in modules:
        hits = [m for m in table if m == wanted or m.endswith("." + wanted)]
        if not hits:
            raise QuadcError(
                f"module '{wanted}' matches no attach point; give full module paths or suffixes such as "
                "'to_q', 'attn2.to_k' or 'resnets.0.conv1'"
            )
        for hit in hits:
            chosen.setdefault(hit, None)
    return [m for m in table if m in chosen]


def random_lora(
    info_or_shapes: ModelInfo | Mapping[str, AttachPoint | Shape],
    modules: Sequence[str] | None = None,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    scale_std: float = 0.05,
    *,
    name: str = "random",
    rslora: bool = False,
) -> LoRA:
    """A random LoRA on ``modules`` (full paths or suffixes like ``"to_q"``; None = every point).

    ``info_or_shapes`` is a :class:`ModelInfo`, its ``points``, or ``{module: (kind, d_in, d_out[, (kh, kw)])}``.
    Conv points get LoCon factors (down with the point's kernel, 1x1 up). ``alpha`` defaults to ``rank``.
    Factors are drawn so that for unit-variance inputs the LoRA's output ``scale * up(down x)`` has a
    standard deviation of about ``scale_std``.
    """
    if rank < 1:
        raise QuadcError(f"LoRA rank must be at least 1, got {rank}")
    table = _shape_table(info_or_shapes)
    alpha = float(rank if alpha is None else alpha)
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    if scale == 0:
        raise QuadcError("LoRA alpha must be non-zero")
    rng = np.random.default_rng(seed)
    layers: dict[str, LoRALayer] = {}
    for module in _select(table, modules):
        kind, d_in, d_out, kernel = table[module]  # type: ignore[misc]
        conv = kind == "conv"
        down_shape = (rank, d_in, *kernel) if conv else (rank, d_in)
        up_shape = (d_out, rank, 1, 1) if conv else (d_out, rank)
        fan_in = d_in * kernel[0] * kernel[1]
        down = rng.standard_normal(down_shape) / math.sqrt(fan_in)
        up = rng.standard_normal(up_shape) * (scale_std / math.sqrt(rank) / scale)
        layers[module] = LoRALayer(module=module, up=up, down=down, alpha=alpha, rank=rank, rslora=rslora)
    return LoRA(name=name, layers=layers, source=f"random(seed={seed})", format="random")


# ----------------------------------------------------------------------------------------------------- writers
def _plain_alpha(layer: LoRALayer) -> float:
    """The alpha that gives ``layer.scale`` with scale = alpha / rank."""
    return layer.scale * layer.rank


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values: Sequence[Any]) -> Any:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def peft_config(lora: LoRA) -> dict[str, Any]:
    """The peft ``LoraConfig`` dict (``adapter_config.json``) describing ``lora``'s ranks and alphas."""
    if not lora.layers:
        raise QuadcError(f"{lora.describe()} has no layers; nothing to write")
    layers = list(lora.layers.values())
    rslora = all(layer.rslora for layer in layers)
    alphas = [layer.alpha if rslora else _plain_alpha(layer) for layer in layers]
    ranks = [layer.rank for layer in layers]
    r = _most_common(ranks)
    lora_alpha = _most_common(alphas)
    return {
        "alpha_pattern": {
            lay.module: _number(a) for lay, a in zip(layers, alphas, strict=True) if a != lora_alpha
        },
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": _number(lora_alpha),
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": int(r),
        "rank_pattern": {lay.module: lay.rank for lay in layers if lay.rank != r},
        "revision": None,
        "target_modules": sorted(lora.layers),
        "task_type": None,
        "use_dora": False,
        "use_rslora": rslora,
    }


def _peft_tensors(lora: LoRA, prefix: str) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for module, layer in lora.layers.items():
        tensors[peft_format.peft_key(module, "down", prefix)] = layer.down
        tensors[peft_format.peft_key(module, "up", prefix)] = layer.up
    return tensors


def write_peft(lora: LoRA, directory: str | os.PathLike[str], *, dtype: str = "float32") -> Path:
    """Write a peft adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``); returns it."""
    config = peft_config(lora)
    out = Path(os.fspath(directory))
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(
        _peft_tensors(lora, "base_model.model."),
        out / peft_format.WEIGHT_FILES[0],
        {"format": "pt"},
        dtype=dtype,
    )
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (out / peft_format.CONFIG_FILE).write_text(text, encoding="utf-8")
    return out


def write_diffusers(lora: LoRA, path: str | os.PathLike[str], *, dtype: str = "float32") -> Path:
    """Write one diffusers LoRA file (``unet.<module>.lora_A.weight`` keys, config in the header); returns it."""
    config = peft_config(lora)
    meta = {
        "format": "pt",
        peft_format.METADATA_KEY: json.dumps(
            {f"unet.{k}": v for k, v in config.items()}, indent=2, sort_keys=True
        ),
    }
    return save_safetensors(_peft_tensors(lora, "unet."), path, meta, dtype=dtype)


def write_kohya(lora: LoRA, path: str | os.PathLike[str], *, dtype: str = "float32") -> Path:
    """Write one kohya/A1111 LoRA file (``lora_unet_*`` keys with ``.alpha``); ``dtype`` e.g. ``float16``.

    rsLoRA layers get the plain alpha (``scale * rank``) that gives the same scale.
    """
    if not lora.layers:
        raise QuadcError(f"{lora.describe()} has no layers; nothing to write")
    tensors: dict[str, np.ndarray] = {}
    for module, layer in lora.layers.items():
        name = module_to_kohya(module)
        tensors[f"{name}.lora_down.weight"] = layer.down
        tensors[f"{name}.lora_up.weight"] = layer.up
        tensors[f"{name}.alpha"] = np.asarray(_plain_alpha(layer), dtype=np.float32)
    layers = list(lora.layers.values())
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(_most_common([layer.rank for layer in layers])),
        "ss_network_alpha": str(_number(_most_common([_plain_alpha(layer) for layer in layers]))),
    }
    return save_safetensors(tensors, path, meta, dtype=dtype)
