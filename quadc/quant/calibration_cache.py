"""One calibration for several targets: calibrations kept by what they depend on.

A calibration (:class:`quadc.quant.task_calibration.Calibration`) depends on the graph it runs, the LoRA
slot table, the tasks and the calibration options (feeds, seed, QSS rows) — never on a target or an
encoding scheme. :class:`CalibrationCache` keeps calibrations under that key, so that when several
targets are compiled from one source (``quadc compile --target all``) each distinct graph is calibrated
once and every scheme derives its encodings from the same ranges.

The graph part of the key is :func:`graph_fingerprint`: the structure (nodes, attributes, tensor names,
types and shapes) and every constant's content. A constant still lazily backed by the source model's
external data file is identified by its place in that file (file name, offset, length), which does not
change while the model is compiled; other constants are hashed. The key is recorded in the plan
(``calibration`` in the manifest's ``quant``), so artifacts show which targets share a calibration. Two graphs with one fingerprint compute
the same numbers, so sharing their calibration gives the bytes a separate compile gives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.quant.plan_options import PlanOptions
from quadc.quant.task_calibration import Calibration, calibrate_tasks

__all__ = ["CalibrationCache", "calibration_key", "graph_fingerprint"]

#: The options a calibration depends on (the others only shape what is derived from it).
CALIBRATION_OPTIONS = ("calib_dir", "calib_random", "calib_seed", "qss_rows")


def _constant_identity(const: gs.Constant, registry: Mapping[int, Any], h: Any) -> None:
    """Feed ``const``'s content, or its place in the source model's (read-only) data file, to hash ``h``."""
    from quadc.graph import _external_value_of, constant_values

    h.update(f"{const.name}|{const.dtype}|{tuple(const.shape)}".encode())
    external = _external_value_of(const, registry)
    if external is not None:
        src = external.source
        # The data file's name, not its path: within one compile every external constant comes from the
        # one source model, and the key (recorded in manifests) must not depend on where it is stored.
        h.update(f"ext|{Path(src.path).name}|{src.offset}|{src.length}".encode())
        return
    arr = np.ascontiguousarray(np.asarray(constant_values(const)))  # .values would keep a computed weight
    h.update(arr.view(np.uint8).reshape(-1).tobytes() if arr.size else b"")


def _attr_text(value: Any) -> str:
    if isinstance(value, gs.Constant):
        return f"const:{value.dtype}:{tuple(value.shape)}:{hashlib.sha256(np.ascontiguousarray(value.values).tobytes()).hexdigest()}"
    if isinstance(value, gs.Graph):
        return "graph:" + graph_fingerprint(value)
    return repr(value)


def graph_fingerprint(graph: gs.Graph) -> str:
    """A hex digest that changes whenever the graph's computation could: its nodes in order (op, domain,
    attributes, input and output names), inputs and outputs (name, dtype, shape), opset and constants."""
    h = hashlib.sha256()
    h.update(f"opset {graph.opset}\n".encode())
    for t in graph.inputs:
        h.update(f"in {t.name}|{t.dtype}|{t.shape}\n".encode())
    for t in graph.outputs:
        h.update(f"out {t.name}|{t.dtype}|{t.shape}\n".encode())
    constants: dict[str, gs.Constant] = {}
    for node in graph.nodes:
        attrs = ",".join(f"{k}={_attr_text(v)}" for k, v in sorted(node.attrs.items()))
        ins = ",".join(t.name for t in node.inputs)
        outs = ",".join(t.name for t in node.outputs)
        h.update(f"node {node.op}|{node.domain}|{attrs}|{ins}|{outs}\n".encode())
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                constants[t.name] = t
    registry = vars(graph).get("_quadc_registry") or {}  # vars(): gs.Graph logs unknown attributes
    for name in sorted(constants):
        _constant_identity(constants[name], registry, h)
    return h.hexdigest()


def calibration_key(graph: gs.Graph, slots: Mapping[str, Any], task_names: list[str], opts: PlanOptions) -> str:
    """What a calibration of ``graph`` depends on, as one string."""
    parts = [graph_fingerprint(graph), repr(sorted((m, repr(s)) for m, s in slots.items())), repr(task_names),
             repr({k: getattr(opts, k) for k in CALIBRATION_OPTIONS})]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass
class CalibrationCache:
    """Calibrations by :func:`calibration_key`; ``runs`` counts the calibrations actually made."""

    entries: dict[str, Calibration] = field(default_factory=dict)
    runs: int = 0

    def get(self, graph: gs.Graph, slots: Mapping[str, Any], tasks: Callable[[], Mapping[str, Mapping[str, np.ndarray]]],
            task_names: list[str], opts: PlanOptions, progress: Callable[[str], None]) -> Calibration:
        """The calibration of ``graph`` with these slots, tasks (packed on demand by ``tasks()``) and
        options: the kept one when there is one, else a new one (kept)."""
        key = calibration_key(graph, slots, task_names, opts)
        cal = self.entries.get(key)
        if cal is not None:
            progress(f"reusing the calibration of this graph ({cal.feed_desc}, {cal.ranges.runs} runs)")
            return cal
        cal = calibrate_tasks(graph, slots, tasks(), opts, progress, include_base=True)
        cal.key = key
        self.entries[key] = cal
        self.runs += 1
        return cal
