"""Memory, measured as the resident set size of a separate process (onnxruntime's buffers are native memory,
invisible to Python-heap tools such as tracemalloc).

Calibration streams its feeds: one feed and one run's tensors at a time, so peak RSS does not grow with
the number of feeds. Each measurement runs in its own Python process: the child reports its peak RSS
(``ru_maxrss``) and the parent polls the child's RSS with psutil.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

psutil = pytest.importorskip("psutil")

MIB = 2**20
#: One feed of the test graph: float32 [1, 64, 256, 256], 16 MiB, and every activation is as large.
FEED_MIB = 16

CHILD = textwrap.dedent("""
    import json, resource, sys, tempfile
    from pathlib import Path

    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from quadc.graph import load_model
    from quadc.quant.calibrate import calibrate

    n_feeds = int(sys.argv[1])
    shape = [1, 64, 256, 256]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "c"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "x"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              [onnx.numpy_helper.from_array(np.array(0.5, np.float32), "c")])
    path = Path(tempfile.mkdtemp()) / "wide.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    g = load_model(path)

    def feeds():
        rng = np.random.default_rng(0)
        for _ in range(n_feeds):
            yield {"x": rng.standard_normal(shape, dtype=np.float32)}

    ranges = calibrate(g, feeds())
    assert ranges.feeds == n_feeds and set(ranges) >= {"x", "r", "m", "y"}
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")


def peak_rss(n_feeds: int) -> int:
    """Peak RSS in bytes of a fresh process that calibrates the test graph on ``n_feeds`` feeds."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(n_feeds)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    child = psutil.Process(proc.pid)
    polled = 0
    while proc.poll() is None:
        try:
            polled = max(polled, child.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return max(polled, json.loads(out.strip().splitlines()[-1])["peak_rss"])


def test_calibration_memory_does_not_grow_with_feeds():
    # onnxruntime's arena settles after the first few runs (measured here: 166, 210, 242, 242, 243, 243 MiB
    # for 1, 2, 4, 8, 16, 40 feeds), so the baseline is 4 feeds.
    few, many = peak_rss(4), peak_rss(20)
    # Holding the 16 extra feeds (or any one tensor per run) would add at least 16 x 16 MiB = 256 MiB.
    assert many - few < 3 * FEED_MIB * MIB, f"peak RSS {few / MIB:.0f} MiB with 4 feeds, {many / MIB:.0f} MiB with 20"
