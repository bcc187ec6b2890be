"""Any graph's inputs as ``{name: (shape, dtype)}`` specs, and random values for them.

:func:`random_inputs` is the one maker of random inputs: verify mode and the pass test helpers feed it
to any graph, and the U-Net calibration feeds (:func:`quadc.quant.feeds.random_feeds`) build on it, drawing
the U-Net's own inputs from sampler-like distributions and leaving the rest to it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from quadc.errors import QuadcError

__all__ = ["InputSpec", "concrete_shape", "dynamic_inputs", "input_specs", "random_inputs"]

#: ``(shape, dtype)``; a shape entry may be an int, a symbolic name or None.
InputSpec = tuple[Sequence[int | str | None], Any]


def dynamic_inputs(graph: Any) -> list[str]:
    """One phrase per input of the gs.Graph ``graph`` whose shape is not all positive integers."""
    bad = []
    for t in graph.inputs:
        shape = t.shape
        if shape is None or not all(isinstance(d, int | np.integer) and d > 0 for d in shape):
            bad.append(f"input '{t.name}' has shape {shape}")
    return bad


def input_specs(graph_or_specs: Any) -> dict[str, tuple[list[int | str | None], np.dtype]]:
    """``name -> (shape, dtype)`` of every input of a gs.Graph, a sequence of gs tensors, or a mapping
    ``{name: (shape, dtype)}``. An input without shape or dtype is a QuadcError."""
    specs: dict[str, tuple[list[int | str | None], np.dtype]] = {}
    if isinstance(graph_or_specs, Mapping):
        for name, spec in graph_or_specs.items():
            try:
                shape, dtype = spec
            except (TypeError, ValueError):
                raise QuadcError(f"input spec of '{name}' must be (shape, dtype), got {spec!r}") from None
            specs[str(name)] = (list(shape), np.dtype(dtype))
        return specs
    tensors = getattr(graph_or_specs, "inputs", graph_or_specs)
    for t in tensors:
        if t.shape is None or t.dtype is None:
            raise QuadcError(f"graph input '{t.name}' has no shape or dtype; re-export the model with static shapes")
        specs[t.name] = (list(t.shape), np.dtype(t.dtype))
    return specs


def concrete_shape(shape: Sequence[Any], defaults: Sequence[int] | int = 1) -> tuple[int, ...]:
    """``shape`` with every symbolic or unknown dim replaced: by ``defaults[i]``, or by ``defaults`` itself
    when it is one int."""
    out = []
    for i, d in enumerate(shape):
        if isinstance(d, int | np.integer) and d >= 0:
            out.append(int(d))
        else:
            out.append(int(defaults if isinstance(defaults, int) else defaults[i]))
    return tuple(out)


def random_inputs(graph_or_specs: Any, seed: int = 0, dim_value: int = 1, zero_inputs: Iterable[str] = (),
                  names: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """Random values for the inputs of any graph (or specs, as :func:`input_specs` takes them).

    Float inputs are standard normal, integer inputs uniform in ``[max(0, min), min(1000, max))``, bool
    inputs fair coin flips; symbolic dims become ``dim_value``. Inputs in ``zero_inputs`` get zeros;
    ``names`` limits the result to those inputs. Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    zeros = set(zero_inputs)
    feeds: dict[str, np.ndarray] = {}
    for name, (shape_spec, dtype) in input_specs(graph_or_specs).items():
        if names is not None and name not in names:
            continue
        shape = concrete_shape(shape_spec, dim_value)
        if name in zeros:
            feeds[name] = np.zeros(shape, dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            feeds[name] = rng.integers(max(info.min, 0), min(info.max, 1000), shape, endpoint=False).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = rng.random(shape) < 0.5
        else:
            raise QuadcError(f"graph input '{name}' has dtype {dtype}, for which no random values can be made")
    return feeds
