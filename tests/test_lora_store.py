"""LoRAStore: each task's adapter file is read once, an LRU of ``capacity`` tasks, background preloading,
and one-line errors for unknown tasks and unreadable files.

Adapter files are written here with distinct values per task; which file an adapter came from is read back
by binding it to a one-node ONNX graph (``y = Identity(w)``) the way the Engine binds LoRA inputs.
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
from quadc.runtime.lora_store import LoRAStore

TASKS = ("a", "b", "c", "d")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """One adapter file per task; task i stores w = [i, i, i]."""
    return {t: write_onnx_adapter({"w": np.full(3, i, np.float32)}, tmp_path / f"{t}.onnx_adapter")
            for i, t in enumerate(TASKS)}


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    """``y = Identity(w)``: running it with an adapter active returns the adapter's ``w``."""
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g",
                              [helper.make_tensor_value_info("w", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def value_of(session: ort.InferenceSession, adapter) -> float:
    """The ``w`` the adapter binds (the C++ session applies active adapters before it checks inputs)."""
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    (y,) = session._sess.run(["y"], {}, options)
    assert np.all(y == y[0])
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


def test_preload_loads_in_the_background_before_get(files, session, monkeypatch):
    threads: list[str] = []
    real_load = LoRAStore._load

    def spy(self, task):  # records where the real load runs, then does it
        threads.append(threading.current_thread().name)
        return real_load(self, task)

    monkeypatch.setattr(LoRAStore, "_load", spy)
    store = LoRAStore(files, capacity=4)
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
