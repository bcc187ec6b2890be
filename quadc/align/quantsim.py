"""QuantSim: the compiled quantized graph as a torch model whose only trainable parameters are one task's
LoRA factors.

:class:`QuantSim` is built from the QDQ graph itself (the ``onnx-qdq`` artifact's ``model.onnx``, or the
graph the compile pipeline produced) with :class:`~quadc.align.interpreter.OnnxModule`, so it has exactly
the artifact's encodings: activations, weights, and the ONE shared encoding of every LoRA slot input.
The task's factors (``down``/``up`` as the LoRA file has them) are parameters; every forward packs them
for the slots exactly as :func:`quadc.lora.pack.pack_task` does (scale times the slot's ``out_scale``
folded into ``up`` in float32, the slot layout, the rank zero-padded) and feeds the packed float tensors
where the graph dequantizes the uint8 LoRA inputs, fake-quantized with the shared encoding. So the forward
is the artifact with ``quantize_task(pack_task(lora))`` bound, and gradients reach the factors through the
clipped straight-through estimator. Slots the task does not adapt get zeros (the base model there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import torch

from quadc.align.interpreter import OnnxModule
from quadc.errors import QuadcError
from quadc.lora.model import LoRA, LoRALayer
from quadc.lora.slots import LoRASlot

__all__ = ["LoRAFactors", "QuantSim", "pack_layer", "slots_from_manifest"]


def pack_layer(down: torch.Tensor, up: torch.Tensor, multiplier: np.float32, slot: LoRASlot
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's factors packed for ``slot`` in torch, as :func:`quadc.lora.pack.pack_task` packs them:
    ``up * multiplier`` (float32), the slot's layout, the rank zero-padded to the slot's rank."""
    up = up * torch.tensor(multiplier, dtype=torch.float32, device=up.device)
    rank = down.shape[0]
    pad = slot.rank - rank
    if slot.layout == "conv":
        d = down.reshape(down.shape[0], down.shape[1], *(tuple(down.shape[2:]) or (1, 1)))
        u = up.reshape(up.shape[0], up.shape[1], 1, 1)
        return (torch.nn.functional.pad(d, (0, 0, 0, 0, 0, 0, 0, pad)) if pad else d,
                torch.nn.functional.pad(u, (0, 0, 0, 0, 0, pad)) if pad else u)
    if slot.layout == "channels":
        d = down.reshape(rank, -1)
        u = up.reshape(up.shape[0], -1)
        return (torch.nn.functional.pad(d, (0, 0, 0, pad)) if pad else d,
                torch.nn.functional.pad(u, (0, pad)) if pad else u)
    d = down.reshape(rank, -1).T
    u = up.reshape(up.shape[0], -1).T
    return (torch.nn.functional.pad(d, (0, pad)) if pad else d,
            torch.nn.functional.pad(u, (0, 0, 0, pad)) if pad else u)


def slots_from_manifest(manifest: Mapping[str, Any]) -> dict[str, LoRASlot]:
    """The LoRA slot table of an artifact's manifest (``lora_slots``), by module path."""
    slots: dict[str, LoRASlot] = {}
    for entry in manifest.get("lora_slots", []):
        dtype = entry["down"].get("dtype", "float32")  # a quantized slot lists its integer type here
        float_type = dtype if np.dtype(dtype).kind == "f" else "float32"
        slots[entry["module"]] = LoRASlot(
            module=entry["module"], kind=entry["kind"], rank=int(entry["rank"]),
            down_input=entry["down"]["name"], up_input=entry["up"]["name"],
            down_shape=tuple(entry["down"]["shape"]), up_shape=tuple(entry["up"]["shape"]),
            layout=entry.get("layout", ""), out_scale=float(entry.get("out_scale", 1.0)),
            dtype=float_type)
    return slots


class LoRAFactors(torch.nn.Module):
    """One task's LoRA factors as parameters (``down``/``up`` in the file's shapes), packed for ``slots``
    in torch by :meth:`packed`. Layers are kept in slot order; alpha, rank and rsLoRA never change."""

    def __init__(self, slots: Mapping[str, LoRASlot], lora: LoRA, *, trainable: bool = True) -> None:
        super().__init__()
        self.lora = lora
        self.slots = dict(slots)
        unknown = sorted(set(lora.layers) - set(self.slots))
        if unknown:
            raise QuadcError(f"{lora.describe()} adapts '{unknown[0]}', which has no LoRA slot in this graph")
        self.modules_: list[str] = []
        self.down = torch.nn.ParameterList()
        self.up = torch.nn.ParameterList()
        self.multipliers: list[np.float32] = []
        for module, slot in self.slots.items():
            layer = lora.layers.get(module)
            if layer is None:
                continue
            if layer.rank > slot.rank:
                raise QuadcError(f"task '{lora.name}' has rank {layer.rank} at '{module}', above the slot rank "
                                 f"{slot.rank}")
            self.modules_.append(module)
            self.down.append(torch.nn.Parameter(torch.from_numpy(layer.down.copy()), requires_grad=trainable))
            self.up.append(torch.nn.Parameter(torch.from_numpy(layer.up.copy()), requires_grad=trainable))
            self.multipliers.append(np.float32(layer.scale * slot.out_scale))

    def packed(self) -> dict[str, torch.Tensor]:
        """The packed float tensors of the adapted slots' inputs (input name -> tensor)."""
        out: dict[str, torch.Tensor] = {}
        for i, module in enumerate(self.modules_):
            slot = self.slots[module]
            out[slot.down_input], out[slot.up_input] = pack_layer(self.down[i], self.up[i], self.multipliers[i], slot)
        return out

    def named_factors(self) -> list[tuple[str, str, torch.nn.Parameter, np.float32]]:
        """``(module, "down"|"up", parameter, multiplier into the packed tensor)`` per factor."""
        out = []
        for i, module in enumerate(self.modules_):
            out += [(module, "down", self.down[i], np.float32(1.0)), (module, "up", self.up[i], self.multipliers[i])]
        return out

    def load(self, lora: LoRA) -> None:
        """Set the factors to ``lora``'s (the same layers; a layer of smaller rank, such as the original of
        a LoRA split over its spare rank, fills the first components and zeros the rest)."""
        with torch.no_grad():
            for i, module in enumerate(self.modules_):
                layer = lora.layers[module]
                if layer.rank > self.down[i].shape[0]:
                    raise QuadcError(f"cannot load rank {layer.rank} into the {self.down[i].shape[0]} components "
                                     f"of '{module}'")
                ratio = layer.scale / self.lora.layers[module].scale
                self.down[i].zero_()
                self.up[i].zero_()
                self.down[i][: layer.rank].copy_(torch.from_numpy(layer.down))
                self.up[i][:, : layer.rank].copy_(torch.from_numpy(layer.up) * ratio)

    def to_lora(self, name: str | None = None) -> LoRA:
        """The current factors as a :class:`~quadc.lora.model.LoRA` (alpha, rank and rsLoRA kept)."""
        layers = {}
        for i, module in enumerate(self.modules_):
            old = self.lora.layers[module]
            layers[module] = LoRALayer(module=module, up=self.up[i].detach().cpu().numpy().copy(),
                                       down=self.down[i].detach().cpu().numpy().copy(), alpha=old.alpha,
                                       rank=old.rank, rslora=old.rslora)
        return LoRA(name=name or self.lora.name, layers=layers, source=self.lora.source, format="aligned",
                    meta=dict(self.lora.meta))


class QuantSim(torch.nn.Module):
    """The quantized graph ``graph`` (QDQ, uint8 LoRA inputs) with ``lora``'s factors as its only
    parameters (see the module docstring); ``net`` reuses an :class:`OnnxModule` built from the same graph
    with ``float_dq_inputs`` = every LoRA input. ``forward(feeds)`` takes the model inputs (``sample``,
    ``timestep``, ``encoder_hidden_states``) as tensors and returns ``{output name: tensor}``."""

    def __init__(self, graph: gs.Graph, slots: Mapping[str, LoRASlot], lora: LoRA | None = None, *,
                 trainable: bool = True, net: OnnxModule | None = None) -> None:
        super().__init__()
        bad = [m for m, s in slots.items() if np.dtype(s.dtype) != np.float32]
        if bad:
            raise QuadcError(f"align simulates float32 graphs; slot '{bad[0]}' is {slots[bad[0]].dtype} "
                             "(export the U-Net in fp32)")
        self.slots = dict(slots)
        names = {n for s in self.slots.values() for n in (s.down_input, s.up_input)}
        missing = sorted(names - {t.name for t in graph.inputs})
        if missing:
            raise QuadcError(f"the graph has no LoRA input '{missing[0]}'; build QuantSim from the graph these "
                             "slots were compiled into")
        # ``net``: an OnnxModule of the same graph built with these LoRA inputs as float inputs (reused
        # across tasks: building folds every weight once).
        self.net = net if net is not None else OnnxModule(graph, float_dq_inputs=names)
        self.model_inputs = [n for n in self.net.input_names if n not in names]
        self.factors = LoRAFactors(self.slots, lora, trainable=trainable) if lora is not None else None
        adapted = set(self.factors.modules_) if self.factors is not None else set()
        self._zeros = {n: torch.zeros(shape, dtype=torch.float32) for m, s in self.slots.items() if m not in adapted
                       for n, shape in ((s.down_input, s.down_shape), (s.up_input, s.up_shape))}

    def _apply(self, fn: Any, recurse: bool = True) -> QuantSim:
        self._zeros = {k: fn(v) for k, v in self._zeros.items()}
        return super()._apply(fn, recurse)

    def packed(self) -> dict[str, torch.Tensor]:
        """Every LoRA input's float tensor (before the shared fake quantization), packed from the factors."""
        out = dict(self._zeros)
        if self.factors is not None:
            out.update(self.factors.packed())
        return out

    def forward(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n in self.model_inputs if n not in feeds]
        if missing:
            raise QuadcError(f"missing model input(s) {', '.join(missing)}")
        return self.net({**{n: feeds[n] for n in self.model_inputs}, **self.packed()})

    def to_lora(self, name: str | None = None) -> LoRA:
        """The current factors as a :class:`~quadc.lora.model.LoRA`."""
        if self.factors is None:
            raise QuadcError("this QuantSim has no LoRA")
        return self.factors.to_lora(name)
