"""What ``quadc align`` writes: aligned LoRAs as diffusers safetensors files, the shared encodings, a report.

``<task>.safetensors`` is what diffusers' ``save_lora_weights`` writes for a U-Net LoRA: keys
``unet.<module>.lora_A.weight`` (down) / ``unet.<module>.lora_B.weight`` (up), float32, with the peft
``LoraConfig`` in the header's ``lora_adapter_metadata`` (``unet.``-prefixed keys: ``r``, ``lora_alpha``,
``rank_pattern``/``alpha_pattern`` for layers that differ, ``use_rslora``). diffusers
(``load_lora_weights`` / ``load_lora_adapter``), peft and quadc's reader load it. Alpha, rank and rsLoRA
are the original LoRA's, so the LoRA scale, and quadc's packing of the file, are unchanged: compiled
against the aligned ``encodings.json`` the file gives the very integers alignment trained.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quadc.errors import QuadcError
from quadc.lora.model import LoRA
from quadc.lora.peft_format import METADATA_KEY, peft_key
from quadc.lora.safetensors_io import save_safetensors

__all__ = ["lora_config", "write_lora"]


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values: Sequence[Any]) -> Any:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def lora_config(lora: LoRA) -> dict[str, Any]:
    """The peft ``LoraConfig`` fields that describe ``lora``'s ranks, alphas and rsLoRA."""
    layers = list(lora.layers.values())
    if not layers:
        raise QuadcError(f"{lora.describe()} has no layers; nothing to write")
    rslora = {layer.rslora for layer in layers}
    if len(rslora) > 1:
        raise QuadcError(f"{lora.describe()} mixes rsLoRA and plain layers, which one peft config cannot say")
    r = _most_common([layer.rank for layer in layers])
    alpha = _most_common([layer.alpha for layer in layers])
    return {
        "r": int(r), "lora_alpha": _number(alpha), "use_rslora": rslora.pop(),
        "rank_pattern": {lay.module: lay.rank for lay in layers if lay.rank != r},
        "alpha_pattern": {lay.module: _number(lay.alpha) for lay in layers if lay.alpha != alpha},
        "target_modules": sorted(lora.layers), "peft_type": "LORA", "bias": "none", "lora_dropout": 0.0,
        "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False,
    }


def write_lora(lora: LoRA, path: str | Path) -> Path:
    """Write ``lora`` as one diffusers LoRA file (see the module docstring); deterministic bytes."""
    tensors = {}
    for module, layer in lora.layers.items():
        tensors[peft_key(module, "down", "unet.")] = layer.down
        tensors[peft_key(module, "up", "unet.")] = layer.up
    meta = {"format": "pt",
            METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in lora_config(lora).items()}, indent=2, sort_keys=True)}
    return save_safetensors(tensors, path, meta, dtype="float32")
