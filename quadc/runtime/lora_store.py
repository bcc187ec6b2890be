"""LoRA store: loads a task's packed LoRA file once, keeps recent tasks cached, preloads in the background.

Tasks are loaded as ``onnxruntime.LoraAdapter`` objects (bound per run with
``RunOptions.add_active_adapter``) from the artifact's ``.onnx_adapter`` files. The cache is an LRU of
``capacity`` tasks; :meth:`LoRAStore.preload` starts loading tasks on a worker thread so a later switch
finds them ready.
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
        adapter.Load(str(path))
        with self._lock:
            self.loads += 1
        return adapter

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
            pending = self._pending.pop(task, None)
        adapter = pending.result() if pending is not None else self._load(task)
        with self._lock:
            self._cache[task] = adapter
            self._cache.move_to_end(task)
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return adapter

    def preload(self, tasks: Iterable[str]) -> None:
        """Start loading ``tasks`` in the background (no-op for cached or already pending ones)."""
        for task in tasks:
            self.check(task)
            with self._lock:
                if task in self._cache or task in self._pending:
                    continue
                self._pending[task] = self._pool.submit(self._load, task)

    def cached(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
