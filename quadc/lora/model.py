"""The normalized in-memory form of LoRA adapters, whatever file format they came from.

A LoRA layer adds ``scale * up @ (down @ x)`` to a layer ``y = W x``::

    y = W x + scale * A (B x)        A = up   [d_out, r]      B = down   [r, d_in]

For conv layers (LoCon) ``down`` is a conv ``[r, d_in, kh, kw]`` with the base layer's kernel, stride and
padding, and ``up`` a 1x1 conv ``[d_out, r, 1, 1]``; conv factors stay 4-D.

Naming pitfall: peft calls the *down* factor ``lora_A`` (``[r, d_in]``) and the *up* factor ``lora_B``
(``[d_out, r]``); kohya calls them ``lora_down``/``lora_up``. Here they are always ``down``/``up``.

``scale`` is ``alpha / rank`` (kohya; peft ``lora_alpha / r``), or ``alpha / sqrt(rank)`` for peft's
rank-stabilized LoRA (``use_rslora``). A missing alpha means ``alpha = rank`` (scale 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quadc.errors import QuadcError


@dataclass
class LoRALayer:
    """One LoRA-adapted layer: factors ``up``/``down`` (float32), ``alpha`` and ``rank``.

    Linear: ``down`` ``[r, d_in]``, ``up`` ``[d_out, r]``. Conv (LoCon): ``down`` ``[r, d_in, kh, kw]``,
    ``up`` ``[d_out, r, 1, 1]``.
    """

    module: str
    up: np.ndarray
    down: np.ndarray
    alpha: float
    rank: int
    rslora: bool = False

    def __post_init__(self) -> None:
        self.up = np.ascontiguousarray(self.up, dtype=np.float32)
        self.down = np.ascontiguousarray(self.down, dtype=np.float32)
        self.alpha = float(self.alpha)
        self.rank = int(self.rank)
        if self.down.ndim not in (2, 4) or self.up.ndim != self.down.ndim:
            raise QuadcError(
                f"LoRA layer '{self.module}' has down {tuple(self.down.shape)} and up {tuple(self.up.shape)}; "
                "expected 2-D factors (linear) or 4-D factors (conv)"
            )
        if self.rank < 1:
            raise QuadcError(f"LoRA layer '{self.module}' has rank {self.rank}; a LoRA layer needs rank 1 or more")
        if self.down.shape[0] != self.rank or self.up.shape[1] != self.rank:
            raise QuadcError(
                f"LoRA layer '{self.module}' has rank {self.rank} but down {tuple(self.down.shape)} and "
                f"up {tuple(self.up.shape)}; the down factor's first and the up factor's second dimension "
                "must both equal the rank"
            )
        if self.up.ndim == 4 and tuple(self.up.shape[2:]) != (1, 1):
            raise QuadcError(
                f"LoRA layer '{self.module}' has a conv up factor {tuple(self.up.shape)}; only 1x1 up convs "
                "(LoCon) are supported"
            )

    @property
    def scale(self) -> float:
        """The factor multiplying ``up @ down @ x``: ``alpha/rank``, or ``alpha/sqrt(rank)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def kind(self) -> str:
        """``"linear"`` for 2-D factors, ``"conv"`` for 4-D ones."""
        return "linear" if self.down.ndim == 2 else "conv"

    @property
    def d_in(self) -> int:
        """Input features (channels) of the adapted layer."""
        return int(self.down.shape[1])

    @property
    def d_out(self) -> int:
        """Output features (channels) of the adapted layer."""
        return int(self.up.shape[0])

    @property
    def kernel(self) -> tuple[int, int]:
        """The down factor's kernel ``(kh, kw)``; ``(1, 1)`` for linear layers."""
        if self.down.ndim == 2:
            return (1, 1)
        return (int(self.down.shape[2]), int(self.down.shape[3]))

    def delta(self) -> np.ndarray:
        """The dense weight update ``scale * up @ down``: ``[d_out, d_in]`` or ``[d_out, d_in, kh, kw]``."""
        if self.down.ndim == 2:
            return (self.scale * (self.up @ self.down)).astype(np.float32)
        up = self.up[:, :, 0, 0]
        return (self.scale * np.einsum("or,rikl->oikl", up, self.down)).astype(np.float32)


@dataclass
class LoRA:
    """One adapter: ``name`` (the runtime input name stem), its layers by module path, where it came from.

    ``source`` is the path it was read from (or a description); ``format`` is ``"peft"``, ``"diffusers"``,
    ``"kohya"`` or ``"random"``; ``meta`` holds notes such as ``ignored_text_encoder_keys``.
    """

    name: str
    layers: dict[str, LoRALayer]
    source: str = ""
    format: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        """The adapted module paths, in file order."""
        return list(self.layers)

    @property
    def max_rank(self) -> int:
        """The largest rank over all layers (0 for an empty LoRA)."""
        return max((layer.rank for layer in self.layers.values()), default=0)

    def describe(self) -> str:
        """``name`` plus source, for messages."""
        return f"LoRA '{self.name}'" + (f" ({self.source})" if self.source else "")


class LoRASet(Mapping[str, LoRA]):
    """An ordered mapping name -> :class:`LoRA`; names must be unique."""

    def __init__(self, loras: Iterable[LoRA] = ()) -> None:
        self._loras: dict[str, LoRA] = {}
        for lora in loras:
            self.add(lora)

    def add(self, lora: LoRA) -> None:
        """Append ``lora``; a QuadcError if its name is taken."""
        if lora.name in self._loras:
            raise QuadcError(
                f"two LoRAs are named '{lora.name}' ({self._loras[lora.name].source or '?'} and "
                f"{lora.source or '?'}); give each a unique name"
            )
        self._loras[lora.name] = lora

    def __getitem__(self, name: str) -> LoRA:
        return self._loras[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loras)

    def __len__(self) -> int:
        return len(self._loras)

    def __repr__(self) -> str:
        return f"LoRASet({list(self._loras)})"

    def union_modules(self) -> list[str]:
        """Every module adapted by at least one LoRA, in order of first appearance."""
        seen: dict[str, None] = {}
        for lora in self._loras.values():
            for module in lora.layers:
                seen.setdefault(module, None)
        return list(seen)

    def max_rank(self, module: str) -> int:
        """The largest rank any LoRA uses on ``module`` (0 if none adapts it)."""
        return max(
            (lora.layers[module].rank for lora in self._loras.values() if module in lora.layers), default=0
        )


@dataclass
class KeyMap:
    """What a format's key parser found in a file (internal to the readers).

    ``layers`` maps module path -> role -> tensor key, roles ``"down"``, ``"up"`` and optionally ``"alpha"``;
    ``ignored`` are keys deliberately skipped (text encoder); ``unknown`` are keys no rule matched;
    ``unsupported`` maps a key to the feature it needs that quadc does not support (DoRA, LoHa, ...).
    """

    layers: dict[str, dict[str, str]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)
    style: str = ""

    def put(self, module: str, role: str, key: str) -> None:
        """Record ``key`` as ``role`` of ``module``; a QuadcError if the role is already taken."""
        roles = self.layers.setdefault(module, {})
        if role in roles:
            raise QuadcError(
                f"LoRA layer '{module}' has two '{role}' tensors ('{roles[role]}' and '{key}'); "
                "the file mixes key styles — keep one of them"
            )
        roles[role] = key
