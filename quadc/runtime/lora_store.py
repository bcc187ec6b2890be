"""LoRA store: reads a task's packed LoRA file once, keeps recent tasks in a cache bounded in bytes (and
optionally in tasks), preloads in the background.

A loaded task is a :class:`LoadedTask`: its tensors as ``onnxruntime.OrtValue`` objects, ready to feed
as ordinary graph inputs (no copy per run), and how many bytes it holds. The cache is an LRU: a
get or a finished preload puts the task last, and the least recently used tasks are evicted until the
cached bytes are at most ``max_bytes`` and the tasks at most ``capacity``. A task larger than
``max_bytes`` on its own is returned but not kept. :meth:`LoRAStore.preload` loads tasks on a worker
thread; a later switch finds them ready.

Example::

    store = LoRAStore({"sepia": Path("out/lora/sepia.onnx_adapter")}, max_bytes=64 * 2**20)
    store.preload(["sepia"])
    values = store.get("sepia").values        # input name -> OrtValue
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quadc.errors import QuadcError


@dataclass(frozen=True)
class LoadedTask:
    """One task's LoRA tensors ready to feed: ``values`` (input name -> OrtValue) hold ``nbytes`` bytes;
    ``owner`` keeps alive whatever owns the memory the OrtValues view (numpy arrays, an adapter file)."""

    task: str
    values: Mapping[str, Any]
    nbytes: int
    owner: Any = field(default=None, repr=False)


_ITEMSIZE = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2, "tensor(uint8)": 1,
             "tensor(int8)": 1, "tensor(uint16)": 2, "tensor(int16)": 2}


def load_packed_task(task: str, path: Path) -> LoadedTask:
    """Read a packed task file into OrtValues: an ``.onnx_adapter`` file's own OrtValues (onnxruntime's
    ``AdapterFormat``, no copy), a ``.safetensors`` file's arrays wrapped as OrtValues."""
    import numpy as np
    import onnxruntime as ort

    from quadc.lora.pack import read_packed

    if not path.is_file():
        raise QuadcError(f"task '{task}': LoRA file {path} is missing; compile the artifact again")
    try:
        if path.suffix == ".onnx_adapter":
            fmt = ort.AdapterFormat.read_adapter(str(path))
            values = dict(sorted(fmt.get_parameters().items()))
            nbytes = sum(int(np.prod(v.shape())) * _ITEMSIZE.get(v.data_type(), 4) for v in values.values())
            return LoadedTask(task, values, nbytes, fmt)
        arrays = {k: np.ascontiguousarray(v) for k, v in read_packed(path).items()}
    except (RuntimeError, OSError, ValueError):
        raise QuadcError(f"task '{task}': LoRA file {path} cannot be read as a packed LoRA file; "
                         "compile the artifact again") from None
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}
    return LoadedTask(task, values, sum(v.nbytes for v in arrays.values()), arrays)


class LoRAStore:
    """Task name -> :class:`LoadedTask`, with an LRU cache bounded in bytes and background preloading.

    ``loader(task, path)`` reads one task (default :func:`load_packed_task`); ``max_bytes`` bounds the
    bytes of the cached tasks, ``capacity`` their number (``None``: no bound of that kind).
    """

    def __init__(self, files: Mapping[str, Path], capacity: int | None = 4, *, max_bytes: int | None = None,
                 loader: Callable[[str, Path], LoadedTask] = load_packed_task):
        if capacity is not None and capacity < 1:
            raise QuadcError("the LoRA cache needs room for at least one task")
        if max_bytes is not None and max_bytes < 0:
            raise QuadcError("the LoRA cache's byte bound must be zero or more")
        self._files = {task: Path(path) for task, path in files.items()}
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._loader = loader
        self._cache: OrderedDict[str, LoadedTask] = OrderedDict()
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quadc-lora-preload")
        self.loads = 0  # how many times a file was read (tests and benchmarks look at this)
        self.load_threads: list[str] = []  # the thread that read each file, in order
        self.wait_seconds = 0.0  # total time get() spent waiting for a file to be read

    @property
    def tasks(self) -> list[str]:
        return list(self._files)

    @property
    def cached_bytes(self) -> int:
        """Bytes held by the cached tasks."""
        with self._lock:
            return sum(t.nbytes for t in self._cache.values())

    def _load(self, task: str) -> LoadedTask:
        loaded = self._loader(task, self._files[task])
        with self._lock:
            self.loads += 1
            self.load_threads.append(threading.current_thread().name)
        return loaded

    def _insert(self, loaded: LoadedTask) -> None:
        """Put ``loaded`` in the cache as the most recently used, then evict least recently used tasks
        beyond the bounds (lock held). A task over ``max_bytes`` by itself is not kept."""
        if self._max_bytes is not None and loaded.nbytes > self._max_bytes:
            return
        self._cache[loaded.task] = loaded
        self._cache.move_to_end(loaded.task)
        total = sum(t.nbytes for t in self._cache.values())
        while ((self._capacity is not None and len(self._cache) > self._capacity)
               or (self._max_bytes is not None and total > self._max_bytes)):
            _, evicted = self._cache.popitem(last=False)
            total -= evicted.nbytes

    def _preload_one(self, task: str) -> LoadedTask:
        """Worker-thread body of :meth:`preload`: load ``task`` into the cache."""
        try:
            loaded = self._load(task)
            with self._lock:
                self._insert(loaded)
            return loaded
        finally:
            with self._lock:
                self._pending.pop(task, None)

    def check(self, task: str) -> None:
        """A QuadcError naming the known tasks if ``task`` is not one of them."""
        if task not in self._files:
            raise QuadcError(f"unknown task '{task}'; this artifact has: {', '.join(self._files) or 'no tasks'}")

    def get(self, task: str) -> LoadedTask:
        """The loaded task (from the cache, a finished or running preload, or read now)."""
        self.check(task)
        with self._lock:
            if task in self._cache:
                self._cache.move_to_end(task)
                return self._cache[task]
            pending = self._pending.get(task)
        start = time.perf_counter()
        loaded = pending.result() if pending is not None else self._load(task)
        with self._lock:
            self.wait_seconds += time.perf_counter() - start
            self._insert(loaded)
        return loaded

    def preload(self, tasks: Iterable[str]) -> None:
        """Start loading ``tasks`` into the cache in the background (no-op for cached or pending ones).

        Every name is checked before any load starts; a load's error is raised by the next :meth:`get`.
        """
        names = list(tasks)
        for task in names:
            self.check(task)
        for task in names:
            with self._lock:
                if task in self._cache or task in self._pending:
                    continue
                self._pending[task] = self._pool.submit(self._preload_one, task)

    def cached(self) -> list[str]:
        """Tasks in the cache, least recently used first."""
        with self._lock:
            return list(self._cache)

    def close(self) -> None:
        """Wait for background loads to finish and stop the worker thread."""
        self._pool.shutdown(wait=True)
