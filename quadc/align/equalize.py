"""Range equalization of a LoRA under the shared encodings: rescale each rank component between its
``down`` row and ``up`` column so both use the same fraction of their fixed grids.

A LoRA's product is unchanged by ``down[k] *= s``, ``up[:, k] /= s`` for any ``s != 0`` (per rank component
``k``), so its float output stays the same, but its quantization does not: a task whose ``up`` is 3x
smaller than the anchor's uses a third of the shared ``up`` grid while its ``down`` may nearly fill the
``down`` grid. This is the cross-layer equalization of Nagel et al. (2019, "Data-free quantization
through weight equalization and bias correction") applied to the two LoRA factors with the *shared*
ranges as the target: with ``f_d`` and ``f_u`` the fractions of their grids that the row and the column
reach (the larger of ``max / grid_max`` and ``min / grid_min``, in the packed tensors' units),
``s = sqrt(f_u / f_d)`` makes both ``sqrt(f_d * f_u)``; a negative ``s`` (flipping both signs) is taken
when that fits an asymmetric grid better. Alignment starts from the equalized LoRA; the anchor is never
equalized (its own ranges are the grids).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from quadc.lora.model import LoRA, LoRALayer
from quadc.lora.slots import LoRASlot
from quadc.quant.plan import QuantPlan

__all__ = ["equalize"]


def _usage(x: np.ndarray, lo: float, hi: float) -> float:
    """The fraction of the grid ``[lo, hi]`` (``lo <= 0 <= hi``) that the values ``x`` reach."""
    top = float(x.max()) / hi if x.max() > 0 and hi > 0 else 0.0
    bottom = float(x.min()) / lo if x.min() < 0 and lo < 0 else (math.inf if x.min() < 0 else 0.0)
    return max(top, bottom)


def _grid(enc: object, mult: float = 1.0) -> tuple[float, float]:
    lo = float(np.min(enc.grid_min)) / mult  # type: ignore[attr-defined]
    hi = float(np.max(enc.grid_max)) / mult  # type: ignore[attr-defined]
    return (min(lo, hi), max(lo, hi))


def equalize(lora: LoRA, slots: Mapping[str, LoRASlot], plan: QuantPlan) -> LoRA:
    """``lora`` with every rank component rescaled to the shared grids (see the module docstring)."""
    layers: dict[str, LoRALayer] = {}
    for module, layer in lora.layers.items():
        slot = slots[module]
        mult = float(np.float32(layer.scale * slot.out_scale))
        d_lo, d_hi = _grid(plan.lora[slot.down_input])
        u_lo, u_hi = _grid(plan.lora[slot.up_input], mult)
        down = layer.down.reshape(layer.rank, -1).astype(np.float64)
        up = layer.up.reshape(layer.up.shape[0], layer.rank).astype(np.float64)
        for k in range(layer.rank):
            best: tuple[float, float] | None = None
            for sign in (1.0, -1.0):
                fd, fu = _usage(sign * down[k], d_lo, d_hi), _usage(sign * up[:, k], u_lo, u_hi)
                if fd == 0 or fu == 0 or not math.isfinite(fd * fu):
                    continue
                if best is None or math.sqrt(fd * fu) < best[0]:
                    best = (math.sqrt(fd * fu), sign * math.sqrt(fu / fd))
            if best is not None:
                down[k] *= best[1]
                up[:, k] /= best[1]
        layers[module] = LoRALayer(module=module, down=down.reshape(layer.down.shape).astype(np.float32),
                                   up=up.reshape(layer.up.shape).astype(np.float32), alpha=layer.alpha,
                                   rank=layer.rank, rslora=layer.rslora)
    return LoRA(name=lora.name, layers=layers, source=lora.source, format=lora.format, meta=dict(lora.meta))
