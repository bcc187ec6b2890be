"""LoRA adapters: one normalized in-memory form, readers for diffusers/peft/kohya files, fit checks, fixtures.

>>> lora = read_lora("style.safetensors")          # doctest: +SKIP
>>> check_fits(lora, info)                         # doctest: +SKIP

See :mod:`quadc.lora.model` for the conventions (``down``/``up`` factors, ``scale``).
"""

from __future__ import annotations

from quadc.lora.make import (
    peft_config,
    random_lora,
    save_safetensors,
    write_diffusers,
    write_kohya,
    write_peft,
)
from quadc.lora.model import LoRA, LoRALayer, LoRASet
from quadc.lora.read import read_lora
from quadc.lora.validate import check_fits, fit_lora

__all__ = [
    "LoRA",
    "LoRALayer",
    "LoRASet",
    "check_fits",
    "fit_lora",
    "peft_config",
    "random_lora",
    "read_lora",
    "save_safetensors",
    "write_diffusers",
    "write_kohya",
    "write_peft",
]
