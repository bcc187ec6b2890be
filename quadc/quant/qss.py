"""Quantization Sensitivity Score (QSS), anchor selection and the ONE shared encoding per LoRA input.

**QSS of a task** (QUAD's ``E_x[ D( f(x; w) || f(x; w~) ) ]``), as implemented here:

1. *Weights.* The task's PACKED tensors are used, exactly what the graph's LoRA inputs receive:
   ``down`` and ``up`` in the slot layout, LoRA scale folded into ``up``, rank zero-padded
   (:func:`quadc.lora.pack.pack_task`). ``w~`` fake-quantizes each of them on its own with a PTQ
   per-tensor encoding from its own min/max (uint8 asymmetric by default; zero stays exact).
2. *Inputs.* ``x`` are rows sampled by calibration at the input of each LoRA layer *with that task
   bound* (:func:`quadc.quant.calibrate.calibrate` captures): token vectors for linear layers, im2col
   patches (one output pixel's receptive field) for conv layers. Activations are not quantized: QSS
   isolates the LoRA weights' sensitivity.
3. *Branch output.* ``f(x; w) = x @ down @ up``, the LoRA branch ``scale * A (B x)`` at that layer for
   each token/pixel (``[rows, d_out]``), computed in float64 for ``w`` and ``w~``.
4. *Distributions.* Per row, ``p = softmax(f(x; w) / tau)`` and ``q = softmax(f(x; w~) / tau)`` over the
   output-channel axis, with one temperature per row ``tau = RMS(f(x; w))`` (the float output's root
   mean square over channels; 1 if that is 0). The temperature makes the logits unit-scale, so the
   divergence measures the *relative* distortion of the branch output, independent of how strong the
   LoRA is (without it, softmax of the tiny raw LoRA outputs is nearly uniform and the score mostly
   measures output magnitude).
5. *Divergence.* Jensen-Shannon, log base 2 (so ``0 <= JS <= 1``):
   ``JS(p||q) = 1/2 KL(p||m) + 1/2 KL(q||m)``, ``m = (p + q) / 2`` — the square of
   ``scipy.spatial.distance.jensenshannon(p, q, base=2)``.
6. *Averages.* Mean over rows gives a layer's score; the task's QSS is the unweighted mean over the
   layers the task adapts (slots where its packed tensors are not all zero).

Alongside, each layer's SQNR ``10 log10(sum f^2 / sum (f - f~)^2)`` (dB) of the branch output.

**Anchor.** :func:`select_anchor` returns the task with the highest QSS (most sensitive: its own PTQ
encodings become everyone's), or None — the *unified* fallback — when all QSS values lie within a relative
tolerance of the largest (``max - min <= tolerance * max``): then no task is distinctly more sensitive and
:func:`shared_lora_encodings` uses the merged range of all tasks per input instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.quant.affine import (
    Encoding,
    QType,
    compute_encoding,
    encoding_from_tensor,
    fake_quant,
    merge_ranges,
    sqnr_db_from_sums,
)
from quadc.quant.calibrate import Capture

__all__ = [
    "LayerScore",
    "LoRAEncodings",
    "TaskScore",
    "branch_difference",
    "branch_output",
    "compute_qss",
    "js_divergence",
    "lora_layer_captures",
    "select_anchor",
    "shared_lora_encodings",
    "shared_sqnr",
    "task_encodings",
    "touched_slots",
]

POLICIES = ("anchor", "unified")


# ----------------------------------------------------------------------------------------------- divergence
def js_divergence(p: Any, q: Any, axis: int = -1, base: float = 2.0) -> np.ndarray:
    """Jensen-Shannon divergence between distributions along ``axis`` (inputs are normalized first).

    ``JS = 1/2 sum p log(p/m) + 1/2 sum q log(q/m)`` with ``m = (p+q)/2`` and ``0 log 0 = 0``, in log
    ``base`` (2 by default: ``0 <= JS <= 1``). Equals ``scipy.spatial.distance.jensenshannon(p, q, base)**2``.
    """
    pa = np.asarray(p, dtype=np.float64)
    qa = np.asarray(q, dtype=np.float64)
    if pa.shape != qa.shape:
        raise QuadcError(f"js_divergence needs distributions of one shape, got {pa.shape} and {qa.shape}")
    if np.any(pa < 0) or np.any(qa < 0):
        raise QuadcError("js_divergence needs non-negative distributions")
    pa = pa / np.sum(pa, axis=axis, keepdims=True)
    qa = qa / np.sum(qa, axis=axis, keepdims=True)
    return _js_of_distributions(pa, qa, axis, base)


def _js_of_distributions(pa: np.ndarray, qa: np.ndarray, axis: int = -1, base: float = 2.0) -> np.ndarray:
    """JS of float64 distributions already normalized along ``axis`` (``0 log 0 = 0``)."""
    m = 0.5 * (pa + qa)
    total = np.zeros(np.delete(pa.shape, axis % pa.ndim))
    for dist in (pa, qa):
        log_ratio = np.zeros_like(dist)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.log(dist / m, out=log_ratio, where=dist > 0)
        total += np.sum(dist * log_ratio, axis=axis)
    return np.maximum(0.5 * total / math.log(base), 0.0)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (a new array; ``logits`` is not changed)."""
    e = logits - np.max(logits, axis=-1, keepdims=True)
    np.exp(e, out=e)
    e /= np.sum(e, axis=-1, keepdims=True)
    return e


def output_js(f_ref: np.ndarray, f_test: np.ndarray) -> np.ndarray:
    """Per-row JS (base 2) between the channel distributions of two branch outputs ``[rows, d_out]``:
    ``softmax(f / tau)`` with ``tau`` the RMS over channels of ``f_ref``'s row (1 where that is 0)."""
    ref = np.asarray(f_ref, dtype=np.float64)
    test = np.asarray(f_test, dtype=np.float64)
    tau = np.sqrt(np.mean(np.square(ref), axis=-1, keepdims=True))
    tau = np.where(tau > 0, tau, 1.0)
    return _js_of_distributions(_softmax(ref / tau), _softmax(test / tau), axis=-1, base=2.0)


# -------------------------------------------------------------------------------------------- LoRA branch
def _as_matrices(down: np.ndarray, up: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Packed slot tensors as ``(D [features, r], U [r, d_out])`` so that ``f = rows @ D @ U``;
    ``kind`` is the slot's layout (``conv``, ``channels`` or ``matmul``/``linear``)."""
    if kind == "conv":
        d = np.asarray(down).reshape(down.shape[0], -1).T
        u = np.asarray(up)[:, :, 0, 0].T
        return d, u
    if kind == "channels":
        return np.asarray(down).T, np.asarray(up).T
    return np.asarray(down), np.asarray(up)


def branch_output(rows: np.ndarray, down: np.ndarray, up: np.ndarray, kind: str) -> np.ndarray:
    """The LoRA branch ``x @ down @ up`` (scale already in ``up``) for sampled rows, in float64."""
    d, u = _as_matrices(np.asarray(down, np.float64), np.asarray(up, np.float64), kind)
    x = np.asarray(rows, dtype=np.float64)
    if x.shape[-1] != d.shape[0]:
        raise QuadcError(f"captured rows have {x.shape[-1]} features but the LoRA down factor takes {d.shape[0]}")
    return (x @ d) @ u


def branch_difference(rows: np.ndarray, down: np.ndarray, up: np.ndarray, down_q: np.ndarray, up_q: np.ndarray,
                      kind: str) -> np.ndarray:
    """``branch_output(rows, down, up) - branch_output(rows, down_q, up_q)`` (float64) in one product:
    ``[x D, x D~] @ [U; -U~]``, about half the work of the two branch outputs (``d_out`` is the large side)."""
    d, u = _as_matrices(np.asarray(down, np.float64), np.asarray(up, np.float64), kind)
    dq, uq = _as_matrices(np.asarray(down_q, np.float64), np.asarray(up_q, np.float64), kind)
    x = np.asarray(rows, dtype=np.float64)
    if x.shape[-1] != d.shape[0]:
        raise QuadcError(f"captured rows have {x.shape[-1]} features but the LoRA down factor takes {d.shape[0]}")
    return (x @ np.concatenate([d, dq], axis=1)) @ np.concatenate([u, -uq], axis=0)


def touched_slots(packed: Mapping[str, np.ndarray], slots: Mapping[str, Any]) -> list[str]:
    """Modules where a task's packed tensors are not all zero (the layers it adapts)."""
    return [m for m, s in slots.items()
            if np.any(packed[s.down_input] != 0) or np.any(packed[s.up_input] != 0)]


def task_encodings(packed: Mapping[str, np.ndarray], slots: Mapping[str, Any],
                   qtype: QType | str = QType.UINT8, symmetric: bool = False) -> dict[str, Encoding]:
    """A task's own PTQ encodings: one per-tensor encoding from each packed tensor's own min/max."""
    out: dict[str, Encoding] = {}
    for slot in slots.values():
        for name in (slot.down_input, slot.up_input):
            out[name] = encoding_from_tensor(packed[name], qtype, symmetric=symmetric)
    return out


def lora_layer_captures(graph: gs.Graph, slots: Mapping[str, Any]) -> dict[str, tuple[str, Capture]]:
    """For each slot (by module path, the ``capture`` argument of :func:`~quadc.quant.calibrate.calibrate`): the name of the LoRA layer's input tensor (the activation its ``down`` node reads)
    and how to sample rows of it (conv attributes taken from that node)."""
    consumers: dict[str, gs.Node] = {}
    for node in graph.nodes:
        for t in node.inputs:
            if t.name:
                consumers.setdefault(t.name, node)
    out: dict[str, tuple[str, Capture]] = {}
    for module, slot in slots.items():
        node = consumers.get(slot.down_input)
        if node is None:
            raise QuadcError(f"LoRA input '{slot.down_input}' feeds no node; run the lora-inputs pass first")
        x = next((t for t in node.inputs if t.name != slot.down_input), None)
        if x is None or not x.name:
            raise QuadcError(f"the LoRA down node of '{module}' has no activation input")
        if slot.layout == "channels":
            cap = Capture("channels")
        elif slot.kind == "conv" or node.op == "Conv":
            attrs = node.attrs
            kernel = tuple(int(k) for k in attrs.get("kernel_shape", slot.down_shape[2:]))
            strides = tuple(int(s) for s in attrs.get("strides", (1, 1)))
            pads = tuple(int(p) for p in attrs.get("pads", (0, 0, 0, 0)))
            dil = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
            if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or int(attrs.get("group", 1)) != 1:
                raise QuadcError(f"the LoRA down conv of '{module}' uses auto_pad or groups, which QSS does not sample")
            cap = Capture("conv", kernel, strides, pads, dil)  # type: ignore[arg-type]
        else:
            cap = Capture("linear")
        out[module] = (x.name, cap)
    return out


# -------------------------------------------------------------------------------------------------- scores
@dataclass
class LayerScore:
    """One LoRA layer of one task: mean JS (base 2) over sampled rows, branch SQNR (dB), row count."""

    module: str
    js: float
    sqnr_db: float
    rows: int
    #: ``sum f(x; w)^2`` over the sampled rows (the float branch output's energy, the SQNR's numerator).
    signal: float = math.nan


@dataclass
class TaskScore:
    """A task's QSS (mean of its layers' JS) and its per-layer scores."""

    task: str
    qss: float
    layers: dict[str, LayerScore] = field(default_factory=dict)

    @property
    def sqnr_mean_db(self) -> float:
        """Mean per-layer SQNR (dB) over finite values (inf = exact layer); inf if all are exact."""
        vals = [s.sqnr_db for s in self.layers.values() if math.isfinite(s.sqnr_db)]
        if vals:
            return float(np.mean(vals))
        return math.inf if self.layers else math.nan

    @property
    def worst_layer(self) -> LayerScore | None:
        """The layer with the lowest SQNR (ties: highest JS)."""
        if not self.layers:
            return None
        return min(self.layers.values(), key=lambda s: (s.sqnr_db, -s.js, s.module))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (non-finite numbers become None)."""
        worst = self.worst_layer
        return {
            "qss": _num(self.qss),
            "sqnr_mean_db": _num(self.sqnr_mean_db),
            "worst_layer": None if worst is None else {"module": worst.module, "sqnr_db": _num(worst.sqnr_db),
                                                       "js": _num(worst.js)},
            "layers": len(self.layers),
        }


def _num(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def compute_qss(
    slots: Mapping[str, Any],
    tasks_packed: Mapping[str, Mapping[str, np.ndarray]],
    samples: Mapping[str | None, Mapping[str, np.ndarray]],
    qtype: QType | str = QType.UINT8,
    symmetric: bool = False,
) -> dict[str, TaskScore]:
    """QSS of every task (see the module docstring).

    ``samples[task][module]`` are the rows captured at the input of that LoRA layer with the task bound
    (``Ranges.samples`` of a calibration with ``capture=lora_layer_captures(graph, slots)``). A layer
    without samples for the task is a QuadcError.
    """
    scores: dict[str, TaskScore] = {}
    for task, packed in tasks_packed.items():
        encs = task_encodings(packed, slots, qtype, symmetric)
        task_samples = samples.get(task, {})
        layers: dict[str, LayerScore] = {}
        for module in touched_slots(packed, slots):
            slot = slots[module]
            rows = task_samples.get(module)
            if rows is None or len(rows) == 0:
                raise QuadcError(f"no calibration samples of the input of '{module}' for task '{task}'; "
                                 "calibrate with capture for the LoRA layer inputs")
            down, up = packed[slot.down_input], packed[slot.up_input]
            ref = branch_output(rows, down, up, slot.layout)
            test = branch_output(rows, fake_quant(down, encs[slot.down_input]),
                                 fake_quant(up, encs[slot.up_input]), slot.layout)
            signal = float(np.einsum("ij,ij->", ref, ref))
            noise = float(np.einsum("ij,ij->", ref - test, ref - test))
            layers[module] = LayerScore(module, float(np.mean(output_js(ref, test))),
                                        sqnr_db_from_sums(signal, noise), len(rows), signal)
        qss = float(np.mean([s.js for s in layers.values()])) if layers else 0.0
        scores[task] = TaskScore(task, qss, layers)
    return scores


def select_anchor(qss: Mapping[str, float], tolerance: float = 0.05) -> str | None:
    """The task with the highest QSS, or None (unified fallback) when all QSS values are within
    ``tolerance`` (relative) of the largest: ``max - min <= tolerance * max``. One task is its own
    anchor; no tasks, or all QSS 0, give None. Ties go to the first task in order."""
    if tolerance < 0 or not math.isfinite(tolerance):
        raise QuadcError(f"QSS tolerance must be a non-negative number, got {tolerance}")
    vals = {k: float(v) for k, v in qss.items()}
    if not vals:
        return None
    bad = [k for k, v in vals.items() if not math.isfinite(v)]
    if bad:
        raise QuadcError(f"QSS of task '{bad[0]}' is not finite")
    if len(vals) == 1:
        return next(iter(vals))
    hi, lo = max(vals.values()), min(vals.values())
    if hi <= 0 or hi - lo <= tolerance * hi:
        return None
    return next(k for k, v in vals.items() if v == hi)


class LoRAEncodings(dict):
    """``LoRA input name -> Encoding``: ONE encoding per slot input, shared by every task.

    ``policy`` and ``anchor`` say how they were chosen; ``fallback`` lists inputs where the anchor's own
    tensor was all zero (it does not adapt that layer) so the merged range of all tasks was used.
    """

    def __init__(self, *args: Any, policy: str = "unified", anchor: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy = policy
        self.anchor = anchor
        self.fallback: list[str] = []


def shared_lora_encodings(
    slots: Mapping[str, Any],
    tasks_packed: Mapping[str, Mapping[str, np.ndarray]],
    policy: str,
    anchor: str | None = None,
    qtype: QType | str = QType.UINT8,
    symmetric: bool = False,
) -> LoRAEncodings:
    """The shared encoding of every LoRA input (``<module>.lora_down`` / ``.lora_up``).

    * ``"anchor"``: the anchor task's packed tensor range per input (its own PTQ encodings); where the
      anchor's tensor is all zero (it does not adapt that layer), the merged range of all tasks there
      (recorded in ``.fallback``).
    * ``"unified"``: the merged range of all tasks' packed tensors per input.

    Ranges always include 0 (zero padding and the base model stay exact). With no tasks every input
    gets the degenerate encoding of ``[0, 0]``.
    """
    if policy not in POLICIES:
        raise QuadcError(f"LoRA policy '{policy}' is not one of {', '.join(POLICIES)}")
    if policy == "anchor":
        if anchor is None:
            raise QuadcError("the anchor LoRA policy needs an anchor task")
        if anchor not in tasks_packed:
            raise QuadcError(f"anchor '{anchor}' is not a task ({', '.join(tasks_packed) or 'none'})")
    result = LoRAEncodings(policy=policy, anchor=anchor if policy == "anchor" else None)
    for slot in slots.values():
        for name in (slot.down_input, slot.up_input):
            arrays: Sequence[np.ndarray] = [np.asarray(p[name]) for p in tasks_packed.values()]
            ranges = [(float(a.min()), float(a.max())) for a in arrays if a.size]
            merged = merge_ranges(ranges) if ranges else (0.0, 0.0)
            lo, hi = merged
            if policy == "anchor":
                own = np.asarray(tasks_packed[anchor][name])  # type: ignore[index]
                if np.any(own != 0):
                    lo, hi = float(own.min()), float(own.max())
                else:
                    result.fallback.append(name)
            result[name] = compute_encoding(lo, hi, qtype, symmetric=symmetric)
    return result


def shared_sqnr(
    slots: Mapping[str, Any],
    tasks_packed: Mapping[str, Mapping[str, np.ndarray]],
    samples: Mapping[str | None, Mapping[str, np.ndarray]],
    encodings: Mapping[str, Encoding],
    scores: Mapping[str, TaskScore] | None = None,
) -> dict[str, float]:
    """Per task, the mean branch SQNR (dB, finite layers) over its layers when its tensors are quantized
    with the SHARED ``encodings`` instead of its own: what the shared profile costs each task.

    ``scores`` (from :func:`compute_qss` on the same samples) supply each layer's signal energy, so only
    the difference of the float and quantized branches is computed here (:func:`branch_difference`)."""
    out: dict[str, float] = {}
    for task, packed in tasks_packed.items():
        vals = []
        known = scores[task].layers if scores is not None and task in scores else {}
        for module in touched_slots(packed, slots):
            slot = slots[module]
            rows = samples.get(task, {}).get(module)
            if rows is None or len(rows) == 0:
                continue
            down, up = packed[slot.down_input], packed[slot.up_input]
            diff = branch_difference(rows, down, up, fake_quant(down, encodings[slot.down_input]),
                                     fake_quant(up, encodings[slot.up_input]), slot.layout)
            layer = known.get(module)
            if layer is not None and layer.rows == len(rows) and math.isfinite(layer.signal):
                signal = layer.signal
            else:
                ref = branch_output(rows, down, up, slot.layout)
                signal = float(np.einsum("ij,ij->", ref, ref))
            vals.append(sqnr_db_from_sums(signal, float(np.einsum("ij,ij->", diff, diff))))
        finite = [v for v in vals if math.isfinite(v)]
        out[task] = float(np.mean(finite)) if finite else (math.inf if vals else math.nan)
    return out
