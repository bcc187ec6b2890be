"""LoRA adapters: one normalized in-memory form, readers for diffusers/peft/kohya files, fit checks.

>>> lora = read_lora("style.safetensors")          # doctest: +SKIP
>>> check_fits(lora, info)                         # doctest: +SKIP

See :mod:`quadc.lora.model` for the conventions (``down``/``up`` factors, ``scale``). Random LoRAs and
writers of LoRA files (test fixtures) are in :mod:`quadc.testing_lora`.
"""

from __future__ import annotations

from quadc.lora.model import LoRA, LoRALayer, LoRASet
from quadc.lora.read import read_lora
from quadc.lora.safetensors_io import save_safetensors
from quadc.lora.validate import check_fits, fit_lora

__all__ = [
    "LoRA",
    "LoRALayer",
    "LoRASet",
    "check_fits",
    "fit_lora",
    "read_lora",
    "save_safetensors",
]
