"""The LoRA slot table: which layers of the compiled graph take LoRA inputs, and their names and shapes.

A slot is one LoRA-augmented layer. Its two graph inputs are named from the module path
(``<module>.lora_down`` / ``<module>.lora_up``) and laid out as the ops consume them (``layout``):

- ``"matmul"`` (linear layers after ``lora-inputs``): ``x @ down @ up`` with ``down [d_in, r]``,
  ``up [r, d_out]``;
- ``"channels"`` (linear layers after ``linear-to-conv``, activations ``[B, C, S]``):
  ``up @ (down @ x)`` with ``down [r, d_in]``, ``up [d_out, r]`` as the left MatMul operands;
- ``"conv"``: ``Conv(Conv(x, down), up)`` with ``down [r, d_in, kh, kw]``, ``up [d_out, r, 1, 1]``.

``out_scale`` is a constant a later pass folded out of the layer's output (e.g. ``scale-fold`` moving the
attention's ``1/sqrt(d)`` into the q projection): packing multiplies ``up`` by it, so no constant
multiply stays on the LoRA path. A pass that changes what a slot's inputs feed records it here with
:func:`dataclasses.replace`; task files are then written in the final layout and bind without
conversion. The pass ``lora-inputs`` builds the table with :func:`plan_slots` and stores it as
``ctx.lora_slots``; planning, packing and the targets read it from there.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from quadc.errors import QuadcError
from quadc.unet_inputs import LORA_DOWN_SUFFIX, LORA_UP_SUFFIX

if TYPE_CHECKING:
    from quadc.frontend.model_info import ModelInfo
    from quadc.lora.model import LoRASet

DOWN_SUFFIX = LORA_DOWN_SUFFIX
UP_SUFFIX = LORA_UP_SUFFIX
LAYOUTS = ("matmul", "channels", "conv")
#: Random LoRA inputs of the pass test helper (quadc.testing) are drawn at this scale: standard-normal
#: factors blow the tiny U-Net's activations up until float32 rounding alone moves outputs by percents
#: (ORT with and without graph optimizations: 4% at scale 1, 1e-6 at 0.1).
VERIFY_SCALE = 0.1


@dataclass(frozen=True)
class LoRASlot:
    """One LoRA-augmented layer of the compiled graph and the names/shapes of its two inputs."""

    module: str
    kind: str  # "linear" or "conv"
    rank: int
    down_input: str
    up_input: str
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]
    layout: str = ""  # "matmul" | "channels" | "conv"; empty means the kind's default
    out_scale: float = 1.0
    #: Float type of both inputs: the layer's activation type (``float32`` or ``float16``), set by lora-inputs.
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.layout:
            object.__setattr__(self, "layout", "conv" if self.kind == "conv" else "matmul")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown LoRA slot layout {self.layout!r}")

    def in_channels_layout(self) -> LoRASlot:
        """This linear slot with its inputs as left MatMul operands: down ``[r, d_in]``, up ``[d_out, r]``."""
        if self.layout == "channels":
            return self
        if self.layout != "matmul":
            raise ValueError(f"slot {self.module} has layout {self.layout}; only a linear slot moves to channels")
        return replace(self, layout="channels", down_shape=tuple(reversed(self.down_shape)),
                       up_shape=tuple(reversed(self.up_shape)))

    def scaled(self, factor: float) -> LoRASlot:
        """This slot with ``factor`` more folded into ``up`` at packing."""
        return replace(self, out_scale=float(self.out_scale) * float(factor))

    def to_dict(self) -> dict[str, object]:
        return {"module": self.module, "kind": self.kind, "rank": self.rank, "layout": self.layout,
                "out_scale": self.out_scale,
                "down": {"name": self.down_input, "shape": list(self.down_shape), "dtype": self.dtype},
                "up": {"name": self.up_input, "shape": list(self.up_shape), "dtype": self.dtype}}


def plan_slots(info: ModelInfo | None, loras: LoRASet | None, targets: str | None = None,
               rank: int | None = None) -> dict[str, LoRASlot]:
    """The slots a compile needs (module path -> LoRASlot, ordered by module path): the union of the
    LoRAs' layers, or the modules matching ``targets`` (comma-separated fnmatch patterns) with rank
    ``rank`` where no LoRA sets a larger one."""
    if info is None:
        raise QuadcError("lora-inputs needs the frontend's ModelInfo; load the model with quadc.frontend.load")
    ranks: dict[str, int] = {}
    if loras is not None:
        for lora in loras.values():
            for module, layer in lora.layers.items():
                ranks[module] = max(ranks.get(module, 0), int(layer.rank))
    patterns = targets
    if patterns:
        pats = [p.strip() for p in str(patterns).split(",") if p.strip()]
        matched = [m for m in info.points if any(fnmatch.fnmatchcase(m, p) for p in pats)]
        if not matched:
            raise QuadcError(f"--lora-targets '{patterns}' matches no attach point; see `quadc inspect MODEL`")
        default_rank = int(rank or max(ranks.values(), default=0) or 16)
        outside = sorted(set(ranks) - set(matched))
        if outside:
            raise QuadcError(f"LoRA layer '{outside[0]}' is outside --lora-targets '{patterns}'; widen the pattern")
        ranks = {m: max(ranks.get(m, 0), default_rank) for m in matched}
    slots: dict[str, LoRASlot] = {}
    for module in sorted(ranks):
        point = info.points.get(module)
        if point is None:
            near = ", ".join(info.nearest_modules(module))
            raise QuadcError(f"LoRA layer '{module}' is not a layer of this model; nearest: {near}")
        r = ranks[module]
        if point.kind == "conv":
            kh, kw = point.kernel
            down_shape: tuple[int, ...] = (r, point.d_in, kh, kw)
            up_shape: tuple[int, ...] = (point.d_out, r, 1, 1)
        else:
            down_shape, up_shape = (point.d_in, r), (r, point.d_out)
        slots[module] = LoRASlot(module, point.kind, r, module + DOWN_SUFFIX, module + UP_SUFFIX,
                                 down_shape, up_shape)
    return slots


def slot_inputs(slots: Mapping[str, LoRASlot]) -> set[str]:
    """The graph input names of all slots (their ``down`` and ``up``)."""
    return {name for slot in slots.values() for name in (slot.down_input, slot.up_input)}


def rebind_feeds(feeds: Mapping[str, np.ndarray], before: Mapping[str, LoRASlot],
                 after: Mapping[str, LoRASlot]) -> dict[str, np.ndarray]:
    """The LoRA inputs that make a graph whose slot table went from ``before`` to ``after`` (a pass ran)
    compute what it computed with ``feeds``, as packing does for real tasks: each ``up`` times the change
    of ``out_scale``, both inputs transposed where a slot moved from the ``matmul`` to the ``channels``
    layout. Used by the numeric verify mode; other feeds are returned as they are."""
    out = dict(feeds)
    for module, new in after.items():
        old = before.get(module)
        if old is None or old == new:
            continue
        down, up = out.get(old.down_input), out.get(old.up_input)
        if down is None or up is None:
            continue
        if (old.layout, new.layout) == ("matmul", "channels"):
            down, up = down.T, up.T
        elif old.layout != new.layout:
            raise ValueError(f"slot {module}: no conversion from layout {old.layout} to {new.layout}")
        ratio = float(new.out_scale) / float(old.out_scale)
        out[new.down_input] = np.ascontiguousarray(down)
        out[new.up_input] = np.ascontiguousarray(up * np.asarray(ratio, dtype=up.dtype)) if ratio != 1.0 else \
            np.ascontiguousarray(up)
    return out
