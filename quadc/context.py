"""The one object that passes and targets share while compiling: :class:`CompileContext`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quadc.frontend.model_info import ModelInfo
    from quadc.lora.model import LoRASet
    from quadc.lora.slots import LoRASlot
    from quadc.quant.calibration_cache import CalibrationCache
    from quadc.quant.plan import QuantPlan


def stderr_progress(message: str) -> None:
    """Default progress reporter: one line on stderr."""
    print(f"[quadc] {message}", file=sys.stderr, flush=True)


def silent_progress(message: str) -> None:
    """Progress reporter that prints nothing (library use, tests)."""


def _calibration_cache() -> CalibrationCache:
    from quadc.quant.calibration_cache import CalibrationCache

    return CalibrationCache()


@dataclass
class CompileContext:
    """What passes and targets share, declared here rather than set ad hoc on the object.

    - ``model_info``: the frontend's view of the input model (attach points, attention blocks);
    - ``loras``: the LoRA set being compiled (``None`` when no LoRA is given);
    - ``lora_slots``: the LoRA slot table (module path -> :class:`~quadc.lora.slots.LoRASlot`), written by
      ``lora-inputs`` and read by planning, packing and the targets;
    - ``plan``: the quantization plan, written by the ``quant-plan`` stage and read by ``qdq-insert``,
      packing and the quantized targets;
    - ``unquantized``: tensors that stay float inside a fused operation (``conv-act-fusion``: a Conv output
      read only by its fused activation); the planner gives them no encoding, so no Q/DQ splits the pair;
    - ``calibrations``: calibrations by graph and options (:class:`~quadc.quant.calibration_cache.CalibrationCache`);
      targets compiled from one source share it, so each distinct graph is calibrated once;
    - ``options``: target-wide settings (the target's name and encoding scheme); pass options live on the
      passes;
    - ``applied`` / ``stats``: the passes that ran, in order, and their counts and seconds.
    """

    model_info: ModelInfo | None = None
    loras: LoRASet | None = None
    lora_slots: dict[str, LoRASlot] = field(default_factory=dict)
    plan: QuantPlan | None = None
    unquantized: set[str] = field(default_factory=set)
    calibrations: CalibrationCache = field(default_factory=_calibration_cache)
    options: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[str], None] = silent_progress
    applied: list[str] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)
    dump_dir: Path | None = None
