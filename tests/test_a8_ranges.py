"""Issue 12: the 8-bit range of least quantization error (quadc/quant/a8_ranges.py) against brute force."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from quadc.quant.a8_ranges import mse_range, sample_values


def _uint8_mse(x: np.ndarray, lo: float, hi: float) -> float:
    """Mean squared error of ``x`` on the asymmetric uint8 grid of ``[lo, hi]``, written out by hand."""
    scale = (hi - lo) / 255.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    q = np.clip(np.round(x / scale) + zero, 0, 255)
    return float(np.mean(np.square(x - (q - zero) * scale)))


def _brute_force(x: np.ndarray, steps: int = 121) -> tuple[float, float, float]:
    """The least-error range over a fine grid of every ``(lo, hi)`` with ``lo <= 0 <= hi``."""
    best = (np.inf, 0.0, 0.0)
    for lo in np.linspace(min(x.min(), 0.0), 0.0, steps)[:-1]:
        for hi in np.linspace(0.0, max(x.max(), 0.0), steps)[1:]:
            err = _uint8_mse(x, lo, hi)
            if err < best[0]:
                best = (err, lo, hi)
    return best


def test_outliers_are_clipped_to_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    # A normal bulk with three outliers: min/max spends the grid on [-6, 9]; the optimum clips them.
    x = np.concatenate([rng.standard_normal(50000), [9.0, 7.0, -6.0]])
    best_err, best_lo, best_hi = _brute_force(x, 61)
    lo, hi = mse_range(x, float(x.min()), float(x.max()))
    chosen = _uint8_mse(x, lo, hi)
    assert chosen <= 1.02 * best_err, (chosen, best_err, lo, hi, best_lo, best_hi)
    assert _uint8_mse(x, float(x.min()), float(x.max())) > 1.1 * best_err  # min/max fails the bound above


def test_uniform_values_keep_their_range():
    x = np.random.default_rng(1).uniform(-1.0, 3.0, 50000)
    lo, hi = mse_range(x, -1.0, 3.0)
    assert lo <= -0.95 and hi >= 2.85, (lo, hi)
    assert _uint8_mse(x, lo, hi) <= 1.02 * _brute_force(x, 41)[0]


def test_no_values_keep_the_calibrated_range():
    assert mse_range(np.zeros(0), -1.0, 2.0) == (-1.0, 2.0)
    assert mse_range(np.ones(10), 0.0, 0.0) == (0.0, 0.0)


def test_sample_values_reads_graph_tensors_and_inputs():
    x = gs.Variable("x", np.float32, (1, 8))
    y = gs.Variable("y", np.float32, (1, 8))
    graph = gs.Graph(nodes=[gs.Node("Relu", "/r/Relu", inputs=[x], outputs=[y])], inputs=[x], outputs=[y], opset=17)
    feeds = [{"x": np.arange(-4, 4, dtype=np.float32).reshape(1, 8)}, {"x": np.full((1, 8), 2.0, np.float32)}]
    values = sample_values(graph, ["x", "y"], feeds, chunk=1)
    assert sorted(values["y"].tolist()) == sorted([0, 0, 0, 0, 0, 1, 2, 3] + [2.0] * 8)
    assert sorted(values["x"].tolist()) == sorted(list(range(-4, 4)) + [2.0] * 8)
