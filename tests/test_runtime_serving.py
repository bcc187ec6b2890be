"""One loaded engine under load: many threads with interleaved tasks, the IOBinding runner, the scheduler.

The reference for every request is the same engine run single-threaded on that request's own feeds and
task before any concurrency starts; each request has different feeds, and the four bundled tasks (and the
base model) give clearly different outputs, so a LoRA or buffer mixed up between threads shows as a
mismatch. The artifact is the bundled model compiled for ``onnx-qdq`` (uint8 LoRA inputs).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from quadc.compiler import CompileOptions, compile_model
from quadc.errors import QuadcError
from quadc.runtime.engine import Engine
from quadc.runtime.lora_store import LoRAStore
from quadc.runtime.scheduler import Scheduler

THREADS, PER_THREAD = 4, 10


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serving") / "qdq"
    compile_model(None, out, CompileOptions(target="onnx-qdq"))  # the bundled U-Net and its LoRAs
    return out


def _requests(engine: Engine, n: int, seed: int) -> list[tuple[dict[str, np.ndarray], str | None]]:
    """``n`` (feeds, task) pairs, tasks cycling through the base model and every task."""
    rng = np.random.default_rng(seed)
    shapes = {i.name: [d if isinstance(d, int) else 1 for d in i.shape]
              for i in engine.session.get_inputs() if i.name in engine.model_inputs}
    tasks = [None, *engine.tasks]
    out = []
    for k in range(n):
        feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        feeds["timestep"] = np.array([rng.uniform(1, 999)], np.float32)
        out.append((feeds, tasks[k % len(tasks)]))
    return out


def _reference(engine: Engine, requests) -> list[np.ndarray]:
    return [engine.run(feeds, task=task)["out_sample"] for feeds, task in requests]


def test_tasks_differ_enough_to_show_a_mix_up(artifact):
    engine = Engine(artifact)
    feeds, _ = _requests(engine, 1, 0)[0]
    outs = [engine.run(feeds, task=t)["out_sample"] for t in [None, *engine.tasks]]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert np.abs(outs[i] - outs[j]).max() > 1e-3, (i, j)


@pytest.mark.parametrize("mode", ["run", "runner"])
def test_threads_with_interleaved_tasks_match_single_threaded(artifact, mode):
    engine = Engine(artifact, cache_size=2)  # smaller than the task count: loads and evictions race too
    per_thread = [_requests(engine, PER_THREAD, seed) for seed in range(THREADS)]
    want = [_reference(engine, reqs) for reqs in per_thread]
    got: list[list[np.ndarray]] = [[] for _ in range(THREADS)]
    barrier = threading.Barrier(THREADS)

    def work(i: int) -> None:
        runner = engine.runner() if mode == "runner" else engine
        barrier.wait()
        for k in range(PER_THREAD):
            # Each thread walks its requests from its own offset, so at any moment threads run different tasks.
            j = (k + i) % PER_THREAD
            feeds, task = per_thread[i][j]
            got[i].append((j, runner.run(feeds, task=task)["out_sample"]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(THREADS):
        assert len(got[i]) == PER_THREAD
        for k, out in got[i]:
            np.testing.assert_array_equal(out, want[i][k], err_msg=f"thread {i} request {k}")
    engine.close()


def test_runner_reuses_buffers_and_rebinds_only_on_a_switch(artifact):
    engine = Engine(artifact)
    runner = engine.runner()
    reqs = _requests(engine, 6, 7)
    task = engine.tasks[1]
    outs = [runner.run(feeds, task=task)["out_sample"] for feeds, _ in reqs[:3]]
    assert runner.switches == 0
    # Results are the caller's own copies: later runs into the same output buffer leave them alone.
    for (feeds, _), out in zip(reqs[:3], outs, strict=True):
        np.testing.assert_array_equal(out, engine.run(feeds, task=task)["out_sample"])
    runner.run(reqs[3][0], task=None)
    runner.run(reqs[4][0], task="none")  # the same base model
    runner.run(reqs[5][0], task=engine.tasks[0])
    assert runner.switches == 2


def test_runner_keeps_a_binding_per_cached_task_only(artifact):
    engine = Engine(artifact, cache_size=2)
    runner = engine.runner()
    feeds = _requests(engine, 1, 11)[0][0]
    a, b, c = engine.tasks[:3]
    for task in (a, b, a):
        runner.run(feeds, task=task)
    first = runner._bindings[a][0]
    runner.run(feeds, task=b)
    assert runner._bindings[a][0] is first and set(runner._bindings) == {None, a, b}  # warm: no new binding
    runner.run(feeds, task=c)  # the cache (2 tasks) drops a: so does the runner
    assert set(runner._bindings) == {None, b, c} and engine.store.cached() == [b, c]
    # a comes back through a fresh load and a fresh binding, with its own output.
    np.testing.assert_array_equal(runner.run(feeds, task=a)["out_sample"], engine.run(feeds, task=a)["out_sample"])
    assert runner._bindings[a][0] is not first and runner.switches == 5


def _hold(sched: Scheduler) -> threading.Event:
    """Make the scheduler's first worker wait, inside its first run, until the returned event is set (the
    real run follows), so that requests submitted meanwhile queue up deterministically."""
    gate, runner = threading.Event(), sched._runners[0]
    real_run = runner.run

    def gated(feeds, task=None):
        gate.wait(60)
        return real_run(feeds, task)

    runner.run = gated
    return gate


def test_scheduler_groups_by_task_and_matches_single_threaded(artifact):
    engine = Engine(artifact)
    reqs = _requests(engine, 20, 3)  # tasks interleaved: none, t0, t1, t2, t3, none, ...
    want = _reference(engine, reqs)
    sched = Scheduler(engine, workers=1)
    gate = _hold(sched)
    first = sched.submit(*reqs[0])
    while not sched.groups:  # the worker has taken the first request and waits in its run
        time.sleep(0.005)
    futures = [first] + [sched.submit(feeds, task=task) for feeds, task in reqs[1:]]
    gate.set()
    results = [f.result(60) for f in futures]
    sched.close()
    for k, res in enumerate(results):
        np.testing.assert_array_equal(res["out_sample"], want[k], err_msg=f"request {k}")
    t0, t1, t2, t3 = engine.tasks
    # The 19 queued requests ran as one group per task, oldest task first: five switches, not nineteen.
    assert sched.groups == [(None, 1), (t0, 4), (t1, 4), (t2, 4), (t3, 4), (None, 3)]
    assert sched.switches == 5


def test_scheduler_with_threads_submitting(artifact):
    bound = 2 * max(e["lora_rom_bytes"] for e in engine_tasks(artifact))
    engine = Engine(artifact, cache_bytes=bound)
    per_thread = [_requests(engine, 8, 100 + s) for s in range(3)]
    want = [_reference(engine, reqs) for reqs in per_thread]
    got: dict[tuple[int, int], np.ndarray] = {}
    with Scheduler(engine, workers=2, max_group=3) as sched:
        def client(i: int) -> None:
            futures = [(k, sched.submit(feeds, task=task)) for k, (feeds, task) in enumerate(per_thread[i])]
            for k, f in futures:
                got[i, k] = f.result(60)["out_sample"]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(got) == 24
    for (i, k), out in got.items():
        np.testing.assert_array_equal(out, want[i][k], err_msg=f"client {i} request {k}")
    assert 0 < engine.store.cached_bytes <= bound and engine.store.loads > len(engine.tasks)


def engine_tasks(artifact: Path) -> list[dict]:
    from quadc.artifact import read_manifest

    return list(read_manifest(artifact)["tasks"].values())


def test_preloading_hides_the_load(artifact):
    """A task file that takes 0.5 s to read: with preloading, the scheduler reads the next task while the
    current group runs, so its switch waits for (almost) nothing; without, each switch waits the load."""
    delay = 0.5

    def slow_engine() -> Engine:
        engine = Engine(artifact)
        real = engine._load_task

        def slow(task, path):
            time.sleep(delay)
            return real(task, path)

        engine.store = LoRAStore({t: engine.task_file(t) for t in engine.tasks}, loader=slow)
        # Each base-model run takes at least 40 ms, so the 25 queued before the task's request (>= 1 s) outlast
        # the load on any machine: on a fast one the tiny U-Net's runs alone took less than the 0.5 s load.
        make_runner = engine.runner

        def slow_runner() -> object:
            inner = make_runner()

            class Runner:
                def run(self, feeds, task=None):
                    if task is None:
                        time.sleep(0.04)
                    return inner.run(feeds, task)

            return Runner()

        engine.runner = slow_runner
        return engine

    waits = {}
    for preload in (True, False):
        engine = slow_engine()
        feeds = _requests(engine, 1, 0)[0][0]
        sched = Scheduler(engine, workers=1, max_group=64, preload=preload)
        gate = _hold(sched)
        # 25 base-model requests (no LoRA to load; together longer than one load), then one of a task.
        futures = [sched.submit(feeds, task=None) for _ in range(25)] + [sched.submit(feeds, task=engine.tasks[0])]
        gate.set()
        for f in futures:
            f.result(60)
        sched.close()
        assert sched.groups[-1] == (engine.tasks[0], 1) and engine.store.loads == 1
        waits[preload] = engine.store.wait_seconds
    assert waits[False] >= 0.9 * delay, waits
    assert waits[True] < waits[False] / 2, waits


def test_scheduler_errors(artifact):
    engine = Engine(artifact)
    sched = Scheduler(engine)
    with pytest.raises(QuadcError, match="unknown task 'nope'"):
        sched.submit({}, task="nope")
    bad = sched.submit({"sample": np.zeros((1, 4, 8, 8), np.float32)}, task=None)
    with pytest.raises(QuadcError, match="missing model input"):
        bad.result(60)
    sched.close()
    with pytest.raises(QuadcError, match="closed"):
        sched.submit({}, task=None)
    with pytest.raises(QuadcError, match="at least one worker"):
        Scheduler(engine, workers=0)
