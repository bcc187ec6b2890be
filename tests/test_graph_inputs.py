"""The one random-input maker (quadc.graph_inputs.random_inputs) for any graph's inputs."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from quadc.errors import QuadcError
from quadc.graph_inputs import concrete_shape, random_inputs

SPECS = {"f": (["B", 3], np.float16), "i": ([2, "N"], np.int64), "u": ([4], np.uint8), "b": ([5], np.bool_),
         "z": ([2, 2], np.float32)}


def test_values_by_dtype_and_symbolic_dims():
    feeds = random_inputs(SPECS, seed=1, dim_value=2, zero_inputs=["z"])
    assert feeds["f"].shape == (2, 3) and feeds["f"].dtype == np.float16 and feeds["f"].std() > 0
    assert feeds["i"].shape == (2, 2) and feeds["i"].dtype == np.int64 and ((feeds["i"] >= 0) & (feeds["i"] < 1000)).all()
    assert feeds["u"].dtype == np.uint8 and feeds["b"].dtype == np.bool_
    assert not feeds["z"].any()
    again = random_inputs(SPECS, seed=1, dim_value=2, zero_inputs=["z"])
    assert all(np.array_equal(feeds[k], again[k]) for k in SPECS)
    assert not np.array_equal(random_inputs(SPECS, seed=2)["f"], random_inputs(SPECS, seed=1)["f"])
    assert set(random_inputs(SPECS, names=["u", "b"])) == {"u", "b"}


def test_graph_inputs_and_errors():
    graph = gs.Graph(inputs=[gs.Variable("x", np.float32, ["batch", 4]), gs.Variable("t", np.int32, [])])
    feeds = random_inputs(graph)
    assert feeds["x"].shape == (1, 4) and feeds["t"].shape == () and feeds["t"].dtype == np.int32
    with pytest.raises(QuadcError, match="'y' has no shape or dtype"):
        random_inputs(gs.Graph(inputs=[gs.Variable("y", np.float32, None)]))
    with pytest.raises(QuadcError, match="'s' has dtype"):
        random_inputs({"s": ([1], np.str_)})


def test_concrete_shape():
    assert concrete_shape(["B", 4, None, -1, 0], (7, 0, 5, 6, 9)) == (7, 4, 5, 6, 0)
    assert concrete_shape(["B", 3], 2) == (2, 3)
