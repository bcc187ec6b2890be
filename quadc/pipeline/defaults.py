"""The bundled demo's defaults (``quadc/data/fixtures.json``): per task its example image, mask, prompt and
img2img strength, and the bundled prompt embeddings, so ``quadc generate ART --task T`` needs no inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np


def data_dir() -> Path:
    """quadc's bundled data folder."""
    return Path(str(resources.files("quadc") / "data"))


@lru_cache(maxsize=1)
def fixtures() -> dict[str, Any]:
    """The bundled ``fixtures.json`` (empty when absent)."""
    path = data_dir() / "fixtures.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass(frozen=True)
class TaskDefaults:
    """What a bundled task runs on when the user gives nothing: image, mask, prompt row, strength."""

    image: Path | None
    mask: Path | None
    prompt_index: int
    strength: float


def task_defaults(task: str | None) -> TaskDefaults | None:
    """The bundled defaults of ``task`` (None for a task the bundle does not know; the base model gets none)."""
    entry = fixtures().get("tasks", {}).get(task or "")
    if not entry:
        return None
    root = data_dir()
    return TaskDefaults(image=root / entry["image"] if entry.get("image") else None,
                        mask=root / entry["mask"] if entry.get("mask") else None,
                        prompt_index=int(entry.get("prompt_index", 0)),
                        strength=float(entry.get("strength", 1.0)))


def bundled_embeddings() -> np.ndarray | None:
    """The bundled prompt embeddings ``[prompts, tokens, width]`` (row 0: the null prompt), if present."""
    name = fixtures().get("embeddings")
    path = data_dir() / name if name else None
    return np.load(path) if path is not None and path.is_file() else None
