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

**Spare rank.** A slot's rank is the largest rank of any task there, so a task of smaller rank has
zero-padded components it does not use. A component that still overflows its grids after equalization
(``sqrt(f_d * f_u) > 1``: it saturates) is split into ``c`` copies of ``down[k] / sqrt(c)`` and
``up[:, k] / sqrt(c)`` (the same product, each copy reaching ``1/sqrt(c)`` of the fraction), one spare
component per extra copy, always to the component that overflows most; the layer's ``alpha`` grows with
its rank so that its scale, and so its float output, stays the same. Components that fit are never split
(their copies would round alike and add up their errors).
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


def _split_counts(usage: list[float], spare: int) -> list[int]:
    """How many copies of each component (``usage``: its equalized fraction of the grids) the ``spare``
    components buy: one at a time to the component whose copies overflow most, while any overflows."""
    counts = [1] * len(usage)
    for _ in range(spare):
        k = max(range(len(usage)), key=lambda i: usage[i] / math.sqrt(counts[i]), default=None)
        if k is None or usage[k] / math.sqrt(counts[k]) <= 1.0:
            break
        counts[k] += 1
    return counts


def _with_rank(layer: LoRALayer, down: np.ndarray, up: np.ndarray, rank: int) -> LoRALayer:
    """A layer of ``rank`` components with ``layer``'s scale (``alpha`` follows the rank)."""
    alpha = layer.scale * (math.sqrt(rank) if layer.rslora else rank)
    return LoRALayer(module=layer.module, down=down.astype(np.float32), up=up.astype(np.float32), alpha=alpha,
                     rank=rank, rslora=layer.rslora)


def equalize(lora: LoRA, slots: Mapping[str, LoRASlot], plan: QuantPlan, *, split: bool = True) -> LoRA:
    """``lora`` with every rank component rescaled to the shared grids and, with ``split``, overflowing
    components split over the slot's spare rank (see the module docstring)."""
    layers: dict[str, LoRALayer] = {}
    for module, layer in lora.layers.items():
        slot = slots[module]
        mult = float(np.float32(layer.scale * slot.out_scale))
        d_lo, d_hi = _grid(plan.lora[slot.down_input])
        u_lo, u_hi = _grid(plan.lora[slot.up_input], mult)
        down = layer.down.reshape(layer.rank, -1).astype(np.float64)
        up = layer.up.reshape(layer.up.shape[0], layer.rank).astype(np.float64)
        usage = [0.0] * layer.rank
        for k in range(layer.rank):
            best: tuple[float, float] | None = None
            for sign in (1.0, -1.0):
                fd, fu = _usage(sign * down[k], d_lo, d_hi), _usage(sign * up[:, k], u_lo, u_hi)
                if fd == 0 or fu == 0 or not math.isfinite(fd * fu):
                    continue
                if best is None or math.sqrt(fd * fu) < best[0]:
                    best = (math.sqrt(fd * fu), sign * math.sqrt(fu / fd))
            if best is not None:
                usage[k] = best[0]
                down[k] *= best[1]
                up[:, k] /= best[1]
        counts = _split_counts(usage, slot.rank - layer.rank) if split else [1] * layer.rank
        picks = [k for k in range(layer.rank) for _ in range(counts[k])]
        shrink = np.array([1.0 / math.sqrt(counts[k]) for k in picks])
        down, up = down[picks] * shrink[:, None], up[:, picks] * shrink[None, :]
        rank = len(picks)
        layers[module] = _with_rank(layer, down.reshape((rank, *layer.down.shape[1:])),
                                    up.reshape((layer.up.shape[0], rank, *layer.up.shape[2:])), rank)
    return LoRA(name=lora.name, layers=layers, source=lora.source, format=lora.format, meta=dict(lora.meta))
