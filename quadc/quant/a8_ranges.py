"""8-bit activation ranges chosen by quantization error, not by min/max (issue 12).

An 8-bit grid over a tensor's whole calibrated range spends its 255 steps on a few outliers: a post-GELU
tensor whose values sit in ``[-0.2, 3]`` with one ``40`` gets steps of 0.16. Clipping the range trades the
outliers' error for a finer grid everywhere else. :func:`mse_range` picks the range ``[l, h]`` (``l`` from
a grid of fractions of the calibrated minimum, ``h`` of the maximum) that minimises the expected squared
error over the tensor's values:

    E(l, h) = sum over x > h of (x - h)^2  +  sum over x < l of (l - x)^2  +  n_in(l, h) * s(l, h)^2 / 12

with ``s = (h - l) / levels`` the step and ``n_in`` the values inside the range that are not exactly 0 (0
is always on the grid: uniform rounding noise of a step ``s`` has energy ``s^2 / 12``). The clipping sums
are exact over the values given, from their sorted order and prefix sums, so every candidate costs
``O(log n)``.

The values come from forwards over the calibration runs (:func:`sample_values`): a uniform random subsample
of each tensor, spread over the runs (at most 131,072 values a tensor), fetched a chunk of tensors at a time so the full
U-Net never holds every activation at once. A subsample keeps the error estimate unbiased; only its
variance grows as tails get rarer.

The caller widens the chosen range by ``a8_headroom`` (default 1.25): a range fit this closely to four
calibration feeds clips new inputs somewhat more often.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import silent_progress
from quadc.graph import ort_session
from quadc.quant.calibrate import clone_graph

__all__ = ["FRACTIONS", "mse_range", "mse_ranges", "sample_values"]

#: Fractions of the calibrated minimum / maximum tried as the 8-bit range's ends.
FRACTIONS: np.ndarray = np.linspace(0.1, 1.0, 37)


def mse_range(values: np.ndarray, lo: float, hi: float, levels: int = 255,
              fractions: np.ndarray = FRACTIONS) -> tuple[float, float]:
    """The range ``(l, h)``, ``l = a * min(lo, 0)`` and ``h = b * max(hi, 0)`` for ``a, b`` in ``fractions``,
    with the least expected squared quantization error over ``values`` on a grid of ``levels`` steps (see
    the module docstring); ``(lo, hi)`` itself when ``values`` is empty or the range is one point."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    x = np.sort(np.asarray(values, np.float64).ravel())
    if x.size == 0 or hi - lo <= 0:
        return lo, hi
    zeros = int(np.count_nonzero(x == 0.0))
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])
    n = x.size
    hs = hi * np.asarray(fractions, np.float64)
    ls = lo * np.asarray(fractions, np.float64)
    # Above h: sum (x - h)^2 over x > h = S2 - 2 h S1 + h^2 m over that tail.
    up = np.searchsorted(x, hs, side="right")
    m_hi = n - up
    e_hi = (s2[n] - s2[up]) - 2 * hs * (s1[n] - s1[up]) + hs * hs * m_hi
    # Below l: sum (l - x)^2 over x < l.
    down = np.searchsorted(x, ls, side="left")
    e_lo = s2[down] - 2 * ls * s1[down] + ls * ls * down
    inside = n - zeros - m_hi[None, :] - down[:, None]
    step = (hs[None, :] - ls[:, None]) / levels
    total = e_lo[:, None] + e_hi[None, :] + np.maximum(inside, 0) * step * step / 12.0
    i, j = np.unravel_index(int(np.argmin(total)), total.shape)
    return float(ls[i]), float(hs[j])


def sample_values(graph: gs.Graph, names: Sequence[str], bound_runs: Sequence[Mapping[str, np.ndarray]],
                  per_tensor: int = 1 << 17, chunk: int = 256, seed: int = 0,
                  progress: Callable[[str], None] = silent_progress) -> dict[str, np.ndarray]:
    """Up to ``per_tensor`` values of each tensor of ``names``, as many from each run (uniform, with
    replacement; all of a run's values when it has fewer), float32; ``chunk`` tensors are fetched per
    forward."""
    per_run = max(1, per_tensor // max(1, len(bound_runs)))
    inputs = {t.name for t in graph.inputs}
    inner = [n for n in names if n not in inputs]
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}

    def keep(name: str, value: np.ndarray) -> None:
        flat = np.asarray(value).ravel()
        if flat.size > per_run:
            flat = flat[rng.integers(0, flat.size, per_run)]
        parts[name].append(flat.astype(np.float32))

    for start in range(0, len(inner), chunk):
        names_here = inner[start:start + chunk]
        aug = clone_graph(graph)
        tensors = aug.tensors()
        aug.outputs = [tensors[n] for n in names_here]
        session = ort_session(aug)
        progress(f"A8 ranges: tensors {start + 1}-{start + len(names_here)} of {len(inner)}, "
                 f"{len(bound_runs)} run(s)")
        for bound in bound_runs:
            for name, value in zip(names_here, session.run(names_here, dict(bound)), strict=True):
                keep(name, value)
    for bound in bound_runs:
        for name in names:
            if name in inputs:
                keep(name, bound[name])
    return {n: np.concatenate(v) if v else np.zeros(0, np.float32) for n, v in parts.items()}


def mse_ranges(graph: gs.Graph, ranges: Mapping[str, tuple[float, float]],
               bound_runs: Sequence[Mapping[str, np.ndarray]], levels: int = 255,
               progress: Callable[[str], None] = silent_progress) -> dict[str, tuple[float, float]]:
    """:func:`mse_range` of each tensor of ``ranges`` (its calibrated range) over its values in
    ``bound_runs``."""
    values = sample_values(graph, list(ranges), bound_runs, progress=progress)
    return {n: mse_range(values[n], lo, hi, levels) for n, (lo, hi) in ranges.items()}
