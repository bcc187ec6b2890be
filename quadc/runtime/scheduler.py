"""Scheduler: queue U-Net requests for many tasks on one loaded :class:`~quadc.runtime.engine.Engine`.

Callers on any thread :meth:`Scheduler.submit` feeds and a task and get a ``concurrent.futures.Future``.
Worker threads (``workers``, each with its own :class:`~quadc.runtime.engine.BoundRunner`, i.e. its
own IOBinding and reused buffers) take the task whose request has waited longest and run that task's
queued requests together (up to ``max_group``), so requests for one task do not pay a switch each. When
a group starts, the task that would come next is preloaded in the background, so its LoRA file is read
while this group runs.

Example::

    with Scheduler(Engine("out/quadc"), workers=2) as sched:
        futures = [sched.submit(feeds, task=t) for t in ("sepia", "inpaint", "sepia")]
        outputs = [f.result()["out_sample"] for f in futures]
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quadc.errors import QuadcError
from quadc.runtime.engine import BASE_TASKS, Engine


@dataclass
class _Request:
    seq: int
    feeds: Mapping[str, np.ndarray]
    future: Future = field(default_factory=Future)


class Scheduler:
    """Request queue grouped by task, served by ``workers`` threads over one engine."""

    def __init__(self, engine: Engine, *, workers: int = 1, max_group: int = 16, preload: bool = True):
        if workers < 1 or max_group < 1:
            raise QuadcError("the scheduler needs at least one worker and groups of at least one request")
        self.engine = engine
        self.max_group = max_group
        self.preload = preload
        self.groups: list[tuple[str | None, int]] = []  # (task, requests) of each group, in start order
        self._queues: OrderedDict[str | None, deque[_Request]] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        self._seq = itertools.count()
        self._runners = [engine.runner() for _ in range(workers)]
        self._threads = [threading.Thread(target=self._work, args=(r,), name=f"quadc-sched-{i}", daemon=True)
                         for i, r in enumerate(self._runners)]
        for thread in self._threads:
            thread.start()

    @property
    def switches(self) -> int:
        """Task switches made by all workers (binding another task's LoRA inputs)."""
        return sum(r.switches for r in self._runners)

    def submit(self, feeds: Mapping[str, np.ndarray], task: str | None = None) -> Future:
        """Queue one forward pass of ``task`` (``None``/"none": the base model); the future's result is
        the output dict. The task name is checked now."""
        key = None if task in BASE_TASKS else task
        if key is not None:
            self.engine.store.check(key)
        request = _Request(next(self._seq), dict(feeds))
        with self._cond:
            if self._closed:
                raise QuadcError("the scheduler is closed; submit before close()")
            self._queues.setdefault(key, deque()).append(request)
            self._cond.notify()
        return request.future

    def _take_group(self) -> tuple[str | None, list[_Request], str | None] | None:
        """The oldest waiting task's queued requests (up to ``max_group``) and the task to preload next
        (lock held); ``None`` once closed and empty."""
        while not self._queues and not self._closed:
            self._cond.wait()
        if not self._queues:
            return None
        task = min(self._queues, key=lambda t: self._queues[t][0].seq)
        queue = self._queues[task]
        group = [queue.popleft() for _ in range(min(self.max_group, len(queue)))]
        if not queue:
            del self._queues[task]
        waiting = [t for t in self._queues if t != task]
        upcoming = min(waiting, key=lambda t: self._queues[t][0].seq) if waiting else None
        self.groups.append((task, len(group)))
        return task, group, upcoming

    def _work(self, runner: Any) -> None:
        while True:
            with self._cond:
                taken = self._take_group()
            if taken is None:
                return
            task, group, upcoming = taken
            if self.preload and upcoming is not None:
                self.engine.preload([upcoming])
            for request in group:
                if not request.future.set_running_or_notify_cancel():
                    continue
                try:
                    request.future.set_result(runner.run(request.feeds, task))
                except BaseException as exc:  # handed to the caller through its future
                    request.future.set_exception(exc)

    def close(self) -> None:
        """Finish every queued request, then stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
