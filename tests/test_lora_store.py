"""LoRAStore: each task's adapter file is read once, an LRU bounded in tasks and in bytes, background
preloading, and one-line errors for unknown tasks and unreadable files.

Adapter files are written here with distinct values and sizes per task (task i stores ``w``: 2**(i+2)
float32 values, all equal to i); which file a loaded task came from is read back by feeding its OrtValues
to a one-node ONNX graph (``y = Identity(w)``) the way the Engine feeds LoRA inputs.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from quadc.errors import QuadcError
from quadc.lora.pack import write_onnx_adapter
from quadc.runtime.lora_store import LoRAStore, load_packed_task

TASKS = ("a", "b", "c", "d")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """One adapter file per task; task i stores w = [i] * 2**(i+2) (16, 32, 64, 128 bytes)."""
    return {t: write_onnx_adapter({"w": np.full(2 ** (i + 2), i, np.float32)}, tmp_path / f"{t}.onnx_adapter")
            for i, t in enumerate(TASKS)}


NBYTES = {t: 4 * 2 ** (i + 2) for i, t in enumerate(TASKS)}


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    """``y = Identity(w)``: running it with an adapter active returns the adapter's ``w``."""
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g",
                              [helper.make_tensor_value_info("w", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def value_of(session: ort.InferenceSession, loaded) -> float:
    """The ``w`` the loaded task feeds, checked against the size its file was written with."""
    (y,) = session.run(["y"], dict(loaded.values))
    assert np.all(y == y[0]) and y.nbytes == NBYTES[loaded.task] == loaded.nbytes
    return float(y[0])


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_get_reads_each_file_once(files, session):
    store = LoRAStore(files)
    assert store.tasks == list(TASKS) and store.cached() == [] and store.loads == 0
    first = store.get("b")
    assert value_of(session, first) == 1.0 and store.loads == 1
    assert store.get("b") is first and store.loads == 1  # from the cache
    assert value_of(session, store.get("d")) == 3.0 and store.loads == 2
    store.close()


def test_lru_evicts_the_least_recently_used_task(files, session):
    store = LoRAStore(files, capacity=2)
    store.get("a")
    store.get("b")
    store.get("a")  # a is now more recent than b
    store.get("c")  # over capacity: b goes
    assert store.cached() == ["a", "c"] and store.loads == 3
    assert value_of(session, store.get("b")) == 1.0 and store.loads == 4  # read again
    assert store.cached() == ["c", "b"]  # a was least recently used
    store.close()


def test_capacity(files):
    store = LoRAStore(files, capacity=1)
    for task in TASKS:
        store.get(task)
        assert store.cached() == [task]
    assert store.loads == 4
    store.close()
    with pytest.raises(QuadcError, match="at least one task"):
        LoRAStore(files, capacity=0)


def test_preload_loads_in_the_background_before_get(files, session):
    threads: list[str] = []
    real_load = load_packed_task

    def spy(task, path):  # records where the real load runs, then does it
        threads.append(threading.current_thread().name)
        return real_load(task, path)

    store = LoRAStore(files, capacity=4, loader=spy)
    store.preload(["c", "a"])
    # Both files are read without any get: they show up in the cache.
    assert wait_until(lambda: sorted(store.cached()) == ["a", "c"]), store.cached()
    assert store.loads == 2 and threads and all(t.startswith("quadc-lora-preload") for t in threads), threads
    # get finds them ready: with the files gone from disk it still returns each task's own values.
    files["a"].unlink()
    files["c"].unlink()
    assert value_of(session, store.get("a")) == 0.0 and value_of(session, store.get("c")) == 2.0
    assert store.loads == 2
    store.preload(["a"])  # cached already: nothing to do
    store.close()
    assert store.loads == 2


def test_preload_respects_capacity(files):
    store = LoRAStore(files, capacity=2)
    store.preload(["a", "b", "c"])
    store.close()  # waits for the background loads
    assert store.loads == 3 and store.cached() == ["b", "c"]  # a was preloaded first and evicted


def test_get_while_a_preload_runs_loads_once(files, session):
    store = LoRAStore(files)
    store.preload(["d"])
    assert value_of(session, store.get("d")) == 3.0  # waits for the pending load or finds it cached
    store.close()
    assert store.loads == 1 and store.cached() == ["d"]


def test_unknown_task_is_one_line_naming_the_tasks(files):
    store = LoRAStore(files)
    for call in (lambda: store.get("zzz"), lambda: store.preload(["a", "zzz"])):
        with pytest.raises(QuadcError) as err:
            call()
        assert str(err.value) == "unknown task 'zzz'; this artifact has: a, b, c, d"
    store.close()
    assert store.loads == 0  # preload checks every name before it loads any
    with pytest.raises(QuadcError, match="unknown task 'a'; this artifact has: no tasks"):
        LoRAStore({}).get("a")


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_unreadable_file_is_one_line(files, damage):
    if damage == "missing":
        files["b"].unlink()
    else:
        files["b"].write_bytes(b"not an adapter")
    store = LoRAStore(files)
    with pytest.raises(QuadcError) as err:
        store.get("b")
    message = str(err.value)
    assert "\n" not in message and "'b'" in message and str(files["b"]) in message, message
    assert store.cached() == []
    store.preload(["b"])
    with pytest.raises(QuadcError, match="'b'"):
        store.get("b")  # the background load's error comes out of get
    store.close()


def test_cache_is_bounded_in_bytes(files, session):
    store = LoRAStore(files, capacity=None, max_bytes=100)
    store.get("a")
    store.get("b")
    assert store.cached() == ["a", "b"] and store.cached_bytes == NBYTES["a"] + NBYTES["b"] == 48
    store.get("c")  # 16 + 32 + 64 > 100: the least recently used task (a) goes
    assert store.cached() == ["b", "c"] and store.cached_bytes == 96
    store.get("b")
    assert store.cached() == ["c", "b"]
    # d alone (128 bytes) is over the bound: served, not kept, and nothing else is evicted for it.
    assert value_of(session, store.get("d")) == 3.0
    assert store.cached() == ["c", "b"] and store.cached_bytes == 96
    assert value_of(session, store.get("d")) == 3.0 and store.loads == 5  # read again each time
    store.close()


def test_byte_bound_holds_under_preloading_and_both_bounds(files):
    store = LoRAStore(files, capacity=None, max_bytes=NBYTES["c"] + NBYTES["b"])
    store.preload(list(TASKS))
    store.close()
    # a + b + c = 112 > 96: c evicts a; d (128 B) never fits and evicts nothing.
    assert store.cached() == ["b", "c"] and store.cached_bytes == 96 and store.loads == 4
    both = LoRAStore(files, capacity=1, max_bytes=1000)
    both.get("a")
    both.get("b")
    assert both.cached() == ["b"]
    both.close()
    with pytest.raises(QuadcError, match="byte bound"):
        LoRAStore(files, max_bytes=-1)
