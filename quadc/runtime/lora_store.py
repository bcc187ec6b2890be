"""LoRA store: loads a task's packed LoRA file once, keeps recent tasks cached, preloads in the background.

Tasks are loaded as ``onnxruntime.LoraAdapter`` objects (bound per run with
``RunOptions.add_active_adapter``) from the artifact's ``.onnx_adapter`` files. The cache is an LRU of
``capacity`` tasks; :meth:`LoRAStore.preload` loads tasks on a worker thread into that cache (as the most
recently used, so preloading more than ``capacity`` tasks keeps the last ones) and a later switch finds
them ready.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from quadc.errors import QuadcError


class LoRAStore:
    """Task name -> loaded adapter, with an LRU cache and background preloading."""

    def __init__(self, files: Mapping[str, Path], capacity: int = 4):
        if capacity < 1:
            raise QuadcError("the LoRA cache needs room for at least one task")
        self._files = {task: Path(path) for task, path in files.items()}
        self._capacity = capacity
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quadc-lora-preload")
        self.loads = 0  # how many times a file was read (tests and benchmarks look at this)

    @property
    def tasks(self) -> list[str]:
        return list(self._files)

    def _load(self, task: str) -> Any:
        import onnxruntime as ort

        path = self._files[task]
        if not path.is_file():
            raise QuadcError(f"task '{task}': LoRA file {path} is missing; compile the artifact again")
        adapter = ort.LoraAdapter()
        try:
            adapter.Load(str(path))
        except RuntimeError:
            raise QuadcError(f"task '{task}': LoRA file {path} cannot be read as an onnxruntime adapter file; "
                             "compile the artifact again") from None
        with self._lock:
            self.loads += 1
        return adapter

    def _insert(self, task: str, adapter: Any) -> None:
        """Put ``adapter`` in the cache as the most recently used; evict beyond capacity (lock held)."""
        self._cache[task] = adapter
        self._cache.move_to_end(task)
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)

    def _preload_one(self, task: str) -> Any:
        """Worker-thread body of :meth:`preload`: load ``task`` into the cache."""
        try:
            adapter = self._load(task)
            with self._lock:
                self._insert(task, adapter)
            return adapter
        finally:
            with self._lock:
                self._pending.pop(task, None)

    def check(self, task: str) -> None:
        """A QuadcError naming the known tasks if ``task`` is not one of them."""
        if task not in self._files:
            raise QuadcError(f"unknown task '{task}'; this artifact has: {', '.join(self._files) or 'no tasks'}")

    def get(self, task: str) -> Any:
        """The loaded adapter of ``task`` (from cache, a finished preload, or loaded now)."""
        self.check(task)
        with self._lock:
            if task in self._cache:
                self._cache.move_to_end(task)
                return self._cache[task]
            pending = self._pending.get(task)
        adapter = pending.result() if pending is not None else self._load(task)
        with self._lock:
            self._insert(task, adapter)
        return adapter

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
