"""Artifact directories: written into a temporary sibling and renamed into place when complete.

Nothing half-written is left behind on failure, and an existing directory is only replaced when the
caller asks for it. ``manifest.json`` is written with sorted keys and no timestamps, so the same inputs
and options give byte-identical artifacts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quadc.errors import QuadcError
from quadc.paths import resolve_inside

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


def check_output_dir(out_dir: str | os.PathLike[str], *, force: bool = False,
                     inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Path:
    """Fail early (before any long work) if ``out_dir`` cannot be written.

    With ``force`` an existing directory is replaced as a whole, so it must hold none of ``inputs`` (the
    model, LoRAs, ... being compiled) and must not be the working directory or one above it.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise QuadcError(f"{out}: exists and is not a directory; choose another output path")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise QuadcError(f"{out}: output directory exists and is not empty; pass --force to replace it")
        _refuse_replacing(out, inputs)
    return out


def _refuse_replacing(out: Path, inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    real = out.resolve()
    if Path.cwd().resolve().is_relative_to(real):
        raise QuadcError(f"{out}: --force would replace the working directory; choose a new output folder")
    for item in inputs:
        if item is not None and Path(item).resolve().is_relative_to(real):
            raise QuadcError(f"{out}: --force would replace the folder holding input {item}; "
                             "choose a new output folder")


@contextmanager
def staged_directory(out_dir: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` when the block finishes without error."""
    out = check_output_dir(out_dir, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out.exists():
            _swap_in(tmp, out)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace the directory ``out`` by ``tmp``; on failure ``out`` is back in place and nothing is left over."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, old / "x")
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / "x", out)
            raise
    except OSError as exc:
        raise QuadcError(f"{out}: could not replace it ({exc.strerror}); the previous contents are kept") from exc
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Deterministic JSON (sorted keys, 2-space indent, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def artifact_file(artifact_dir: str | os.PathLike[str], relative: object, *, what: str) -> Path:
    """The file ``relative`` of an artifact, refused in one line unless it lies inside ``artifact_dir``
    (symlinks resolved): a manifest from someone else must not make quadc read elsewhere."""
    return resolve_inside(artifact_dir, relative, what=what, label=str(Path(artifact_dir) / MANIFEST_NAME))


def manifest_files(manifest: Mapping[str, Any]) -> list[tuple[str, object]]:
    """Every (what, relative path) a manifest names: graph, graph files, encodings, each task's files."""
    found: list[tuple[str, object]] = []
    if "graph" in manifest:
        found.append(("graph", manifest["graph"]))
    for item in _list(manifest.get("graph_files", []), "graph_files"):
        found.append(("graph file", item))
    if "encodings" in manifest:
        found.append(("encodings", manifest["encodings"]))
    for task, entry in _dict(manifest.get("tasks", {}), "tasks").items():
        files = _dict(_dict(entry, f"tasks.{task}").get("files", {}), f"tasks.{task}.files")
        for kind, info in files.items():
            found.append((f"task '{task}' {kind} file", _dict(info, f"tasks.{task}.files.{kind}").get("path")))
    return found


def _dict(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise QuadcError(f"manifest entry '{where}' is not an object; the artifact is damaged, compile again")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise QuadcError(f"manifest entry '{where}' is not a list; the artifact is damaged, compile again")
    return value


def read_manifest(artifact_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a compiled artifact directory, with every file it names checked to lie inside
    ``artifact_dir`` (see :func:`artifact_file`)."""
    path = Path(artifact_dir) / MANIFEST_NAME
    if not path.is_file() and (Path(artifact_dir) / "targets.json").is_file():
        raise QuadcError(f"{artifact_dir}: a --target all folder; pass one target's artifact in it, "
                         f"e.g. {Path(artifact_dir) / 'onnx'}")
    if not path.is_file():
        raise QuadcError(f"{artifact_dir}: not a quadc artifact (no {MANIFEST_NAME}); run quadc compile first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise QuadcError(f"{path}: manifest is not valid JSON ({reason}); compile again") from None
    if not isinstance(manifest, dict):
        raise QuadcError(f"{path}: manifest is not a JSON object; compile again")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise QuadcError(f"{path}: manifest format {manifest.get('format_version')!r} is not {FORMAT_VERSION}; "
                         "compile again with this quadc")
    if "graph" not in manifest:
        raise QuadcError(f"{path}: manifest names no graph; the artifact is damaged, compile again")
    try:
        for what, relative in manifest_files(manifest):
            artifact_file(artifact_dir, relative, what=what)
    except QuadcError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise QuadcError(f"{path}: {exc}") from None
    return manifest
