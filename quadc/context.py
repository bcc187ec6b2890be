"""The one object that passes and targets share while compiling: :class:`CompileContext`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def stderr_progress(message: str) -> None:
    """Default progress reporter: one line on stderr."""
    print(f"[quadc] {message}", file=sys.stderr, flush=True)


def silent_progress(message: str) -> None:
    """Progress reporter that prints nothing (library use, tests)."""


@dataclass
class CompileContext:
    """What passes share: the LoRA set, the encodings plan, target options, statistics, progress.

    ``applied`` records the passes that have run on the graph, in order, so prerequisites can be
    checked; ``stats`` collects each pass's counts and seconds for the manifest.
    """

    loras: Any = None  # quadc.lora.LoRASet, once the LoRA stage has run
    model_info: Any = None  # quadc.frontend.ModelInfo
    encodings: Any = None  # quadc.quant plan, once calibrated
    options: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[str], None] = silent_progress
    applied: list[str] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)
    dump_dir: Path | None = None
