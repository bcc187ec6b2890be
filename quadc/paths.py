"""Path safety: task names that are safe file names, and relative paths that must stay in their folder.

A task name becomes the file name ``lora/<task>.*`` in an artifact, and a manifest or an ONNX file
names other files by relative path. Both come from users or from files made by someone else, so every
such name goes through this module before quadc reads or writes anything:

- :func:`check_task_names` — ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``, no ``..``, not ``none`` (the base
  model's name in ``quadc run --task none``), and no two names that differ only in case;
- :func:`resolve_inside` — a relative path joined to its folder, symlinks resolved, that must end up
  strictly inside the (resolved) folder.

Example::

    check_task_names(["stickers", "sketch_v2"])          # ok
    check_task_names(["../../evil"])                     # QuadcError
    resolve_inside(artifact, "lora/stickers.onnx_adapter", what="task file")   # absolute Path
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from quadc.errors import QuadcError

#: What a task name may look like: it is used as a file name on every platform.
TASK_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Names with a meaning of their own (``quadc run --task none`` runs the base model).
RESERVED_TASK_NAMES = frozenset({"none"})


def check_task_name(name: object) -> str:
    """``name`` if it is a safe task name, else a QuadcError saying what a task name may be."""
    text = name if isinstance(name, str) else repr(name)
    if not isinstance(name, str) or not TASK_NAME_PATTERN.fullmatch(name) or ".." in name:
        raise QuadcError(f"task name {text[:80]!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
                         "starting with a letter or digit and without '..'")
    if name.lower() in RESERVED_TASK_NAMES:
        raise QuadcError(f"task name '{name}' is reserved for the base model; choose another name")
    return name


def check_task_names(names: Iterable[object]) -> list[str]:
    """Every name checked with :func:`check_task_name`; names equal up to case are refused too (their
    files would collide on case-insensitive file systems)."""
    seen: dict[str, str] = {}
    for name in names:
        checked = check_task_name(name)
        other = seen.setdefault(checked.lower(), checked)
        if other != checked:
            raise QuadcError(f"task names '{other}' and '{checked}' differ only in case; their files would "
                             "collide on some file systems, rename one")
    return list(seen.values())


def resolve_inside(base_dir: str | os.PathLike[str], relative: object, *, what: str,
                   label: str | None = None) -> Path:
    """``base_dir / relative`` with symlinks resolved, refused unless it lies strictly inside ``base_dir``.

    ``relative`` must be a non-empty relative path string; absolute paths, ``..`` that climbs out and
    symlinks that point out of ``base_dir`` are refused with one line naming ``what`` and the path.
    The file need not exist (callers say what is missing in their own words). ``label`` starts the
    message (default: ``base_dir``), e.g. the manifest or model file that holds the path.
    """
    base = Path(base_dir).resolve()
    label = label if label is not None else str(base_dir)
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise QuadcError(f"{label}: {what} path {relative!r} is not a file name; the file is damaged")
    if os.path.isabs(relative) or Path(relative).is_absolute():
        raise QuadcError(f"{label}: {what} path {relative!r} is absolute; only files inside {base_dir} "
                         "are read, refusing it")
    target = (base / relative).resolve()
    if base not in target.parents:
        raise QuadcError(f"{label}: {what} path {relative!r} leads outside {base_dir} (to {str(target)!r}); "
                         "only files inside it are read, refusing it")
    return target


def check_output_file(path: str | os.PathLike[str] | None) -> Path:
    """``path`` as a Path, refused in one line when it is an existing directory (checked before long work)."""
    out = Path(path if path is not None else "")
    if path is not None and out.is_dir():
        raise QuadcError(f"{out}: is a directory; pass the path of the file to write")
    return out


@contextmanager
def replaced_atomically(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` (``<name>.partial<suffix>``; ``suffix`` for writers that append
    one, like ``numpy.savez``) to write into: it replaces ``path`` when the block ends and is removed if the
    block fails, so a reader never sees half a file. The parent folder is created; an existing directory at
    ``path`` is refused in one line."""
    out = check_output_file(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial" + suffix)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
