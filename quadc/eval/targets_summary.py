"""Verify compiled artifacts task by task and summarize them: what ``quadc verify`` prints.

:func:`verify_artifacts` takes one artifact directory or a ``--target all`` directory (its
``targets.json``), runs each target's own ``verify`` for the base model and every task on held-out
inputs (synthetic U-Net feeds with a seed calibration does not use, or given ones), and returns per
target: the shared ROM, each task's LoRA ROM, the LoRA policy and anchor, the executor, and each task's
SQNR (mean and minimum over the inputs, worst output) against the target's reference.
:func:`format_summary` prints it as one table.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quadc.artifact import MANIFEST_NAME, artifact_file, read_manifest
from quadc.errors import QuadcError

__all__ = ["HELD_OUT_SEED", "artifact_dirs", "held_out_feeds", "format_summary", "verify_artifacts"]

#: Seed of the synthetic inputs verify uses: calibration's default seed is 0, so these are not seen by it.
HELD_OUT_SEED = 20_240_601
INDEX_NAME = "targets.json"


def artifact_dirs(path: str | os.PathLike[str]) -> dict[str, Path]:
    """``target -> artifact directory`` of an artifact (``manifest.json``) or of a ``--target all``
    directory (``targets.json``)."""
    root = Path(path)
    if (root / MANIFEST_NAME).is_file():
        return {read_manifest(root)["target"]: root}
    index = root / INDEX_NAME
    if not index.is_file():
        raise QuadcError(f"{root}: neither an artifact ({MANIFEST_NAME}) nor a --target all folder ({INDEX_NAME})")
    try:
        entries = json.loads(index.read_text()).get("targets", {})
    except (json.JSONDecodeError, AttributeError):
        raise QuadcError(f"{index}: not a valid targets index; compile again") from None
    return {str(name): artifact_file(root, str(entry.get("dir", name)), what=f"target '{name}' folder")
            for name, entry in entries.items()}


def held_out_feeds(manifest: Mapping[str, Any], n: int, seed: int = HELD_OUT_SEED) -> list[dict[str, np.ndarray]]:
    """``n`` synthetic U-Net feeds for the artifact's model inputs (:func:`quadc.quant.feeds.random_feeds`)
    with a seed calibration does not use."""
    from quadc.quant.feeds import random_feeds
    from quadc.unet_inputs import is_lora_input

    specs = {name: (spec["shape"], spec["dtype"]) for name, spec in manifest.get("inputs", {}).items()
             if not is_lora_input(name)}
    return random_feeds(specs, n, seed=seed)


def _verify_kwargs(verify: Any, model: str | None, loras: Mapping[str, str] | None) -> dict[str, Any]:
    """The source model and LoRA paths, for the targets whose verify takes them."""
    params = inspect.signature(verify).parameters
    out: dict[str, Any] = {}
    if "model" in params:
        out["model"] = model
    if "loras" in params:
        out["loras"] = loras
    return out


def verify_artifacts(path: str | os.PathLike[str], *, feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
                     n_inputs: int = 2, seed: int = HELD_OUT_SEED, tasks: Sequence[str] | None = None,
                     model: str | None = None, loras: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Per target of ``path``: ROM, LoRA policy and anchor, and each task's SQNR from the target's verify
    (see the module docstring). ``tasks`` limits the tasks (``none`` is the base model; default: the base
    model and every task)."""
    from quadc.targets import get_target

    report: dict[str, Any] = {"targets": {}}
    for name, directory in artifact_dirs(path).items():
        manifest = read_manifest(directory)
        target = get_target(manifest["target"])
        inputs = list(feeds) if feeds is not None else held_out_feeds(manifest, n_inputs, seed)
        chosen = list(tasks) if tasks is not None else ["none", *manifest.get("tasks", {})]
        unknown = [t for t in chosen if t != "none" and t not in manifest.get("tasks", {})]
        if unknown:
            raise QuadcError(f"target {name} has no task '{unknown[0]}'; it has: "
                             f"{', '.join(manifest.get('tasks', {})) or 'none'}")
        kwargs = _verify_kwargs(target.verify, model, loras)
        quant = manifest.get("quant", {})
        entry: dict[str, Any] = {
            "dir": str(directory),
            "shared_rom_bytes": manifest.get("shared_rom_bytes"),
            "lora_policy": quant.get("lora_policy", "-"),
            "anchor": quant.get("anchor"),
            "scheme": quant.get("scheme", "-"),
            "tasks": {},
        }
        for task in chosen:
            values, executor, reference = [], None, None
            for feed in inputs:
                rep = target.verify(directory, dict(feed), None if task == "none" else task, **kwargs)
                outs = rep.get("outputs", {})
                values.append(min((o["sqnr_db"] for o in outs.values()), default=math.nan))
                executor = rep.get("executor", executor)
                reference = rep.get("reference", reference)
            measured = [v for v in values if not math.isnan(v)]  # inf (exact) stays: the mean of exact runs is inf
            rom = manifest.get("tasks", {}).get(task, {}).get("lora_rom_bytes") if task != "none" else 0
            entry["tasks"][task] = {"lora_rom_bytes": rom, "sqnr_db_mean": float(np.mean(measured)) if measured else None,
                                    "sqnr_db_min": float(min(values)) if values else None, "inputs": len(values),
                                    "executor": executor or manifest.get("runtime") or "cpu",
                                    "reference": reference}
        report["targets"][name] = entry
    return report


def _fmt_db(value: float | None) -> str:
    return "-" if value is None else ("inf" if value == math.inf else f"{value:.1f}")


def format_summary(report: Mapping[str, Any]) -> str:
    """The report as one table: a row per target and task."""
    header = ("target", "shared ROM", "task", "LoRA ROM", "policy", "anchor", "SQNR dB (mean/min)", "executor",
              "reference")
    rows = [header]
    for name, entry in report["targets"].items():
        first = True
        for task, t in entry["tasks"].items():
            rows.append((
                name if first else "",
                f"{entry['shared_rom_bytes']:,} B" if first and entry.get("shared_rom_bytes") is not None else "",
                task,
                f"{t['lora_rom_bytes']:,} B" if t.get("lora_rom_bytes") is not None else "-",
                entry["lora_policy"] if first else "",
                (entry["anchor"] or "-") if first else "",
                f"{_fmt_db(t['sqnr_db_mean'])} / {_fmt_db(t['sqnr_db_min'])}",
                t["executor"],
                t.get("reference") or "-",
            ))
            first = False
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
