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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quadc.errors import QuadcError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


def check_output_dir(out_dir: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Fail early (before any long work) if ``out_dir`` cannot be written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise QuadcError(f"{out}: exists and is not a directory; choose another output path")
    if out.exists() and any(out.iterdir()) and not force:
        raise QuadcError(f"{out}: output directory exists and is not empty; pass --force to replace it")
    return out


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
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Deterministic JSON (sorted keys, 2-space indent, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_manifest(artifact_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a compiled artifact directory."""
    path = Path(artifact_dir) / MANIFEST_NAME
    if not path.is_file():
        raise QuadcError(f"{artifact_dir}: not a quadc artifact (no {MANIFEST_NAME}); run quadc compile first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QuadcError(f"{path}: manifest is not valid JSON ({exc.msg}); compile again") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise QuadcError(f"{path}: manifest format {manifest.get('format_version')} is not {FORMAT_VERSION}; "
                         "compile again with this quadc")
    return manifest
