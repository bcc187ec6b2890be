"""Streaming activation calibration on onnxruntime's CPU provider, over every task the graph serves.

:func:`calibrate` runs the float graph once per (feed, task) and returns the min/max of every float
tensor that is a graph input or a node output. One graph serves every task, so each feed runs with each
task's packed LoRA tensors bound to the slot inputs, and once with zeros (the base model); the ranges are
the union over all those runs.

**Streaming, memory bounded.** The graph is copied and, for every float node output ``t``, two nodes
``ReduceMin(t)`` / ``ReduceMax(t)`` (``keepdims=0``, all axes) are placed right after ``t``'s producer;
only those scalars are graph outputs. onnxruntime therefore frees each activation as soon as its last
consumer has run, and because the taps run first a consumer that works in place (Softmax on attention
scores) still reuses the buffer: a run needs about the memory of plain inference, never all activations
of the network at once, and after each run only a running ``(min, max)`` per tensor is kept. A tensor
that a Reshape, Transpose, Squeeze, Unsqueeze, Flatten or Identity makes from another tapped tensor has
exactly its values, so it gets no tap of its own and takes that tensor's range. Feeds are consumed one
at a time (a generator works), so memory does not grow with the number of feeds. Graph-input ranges come
from the feeds in numpy. Weights reach onnxruntime without a copy on disk (:func:`quadc.graph.ort_session`).

Why not ``onnxruntime.quantization.MinMaxCalibrater``: it does use the same ReduceMin/ReduceMax
augmentation, but (as of onnxruntime 1.32) it keeps every run's outputs in a list until the end
(``max_intermediate_outputs`` *discards* the collected batches instead of folding them into the ranges),
it needs the model as a file and loads it fully with ``onnx.load`` (3.4 GB twice for SD1.5), it cannot
bind per-task LoRA inputs around one data reader pass, and it has no hook to sample the LoRA layer
inputs that QSS needs. Its augmentation idea is reused here; the loop is quadc's own.

**Captures for QSS.** ``capture`` maps labels (module paths) to a tensor (the input of a LoRA layer) and
how its values are sampled: per run, up to ``rows_per_feed`` rows (a token's feature vector for linear layers, an im2col patch at a
random output pixel for conv layers, see :class:`Capture`), kept per task in a reservoir of at most
``max_rows`` rows per label, so memory stays bounded too. Row indices depend only on shapes, so they are
drawn before the run and linear rows are gathered inside the graph: a captured activation is freed like
any other instead of being kept to the end of the run as an output (0.4 GiB on SD1.5 with LoRAs on
every attention and feed-forward layer).

:func:`measure_sqnr` streams the same way to measure, per tensor, the SQNR of fake-quantizing it with a
given encoding (``QuantizeLinear -> DequantizeLinear`` inside the graph, squared signal and noise summed
by ``ReduceSumSquare``), which the planner uses to rank activations for 8-bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import silent_progress
from quadc.errors import QuadcError
from quadc.graph import infer_shapes, ort_session, return_freed_memory, unique_name
from quadc.quant.affine import Encoding, fake_quant, sqnr_db_from_sums
from quadc.unet_inputs import is_lora_input

__all__ = [
    "Capture",
    "Ranges",
    "calibrate",
    "clone_graph",
    "float_tensors",
    "measure_sqnr",
    "static_tensors",
]

#: Name of the base-model run (all LoRA inputs zero) in progress messages and ``Ranges.samples``.
BASE = None
_GRAPH_ATTRS = ("_quadc_registry", "_quadc_source", "opset_imports", "ir_version")


# ------------------------------------------------------------------------------------------------ helpers
def clone_graph(graph: gs.Graph) -> gs.Graph:
    """A structural copy of ``graph`` sharing its weights (external ones stay lazy), with quadc's
    bookkeeping attributes (external-data registry, opsets, IR version) carried over."""
    clone = graph.copy()
    for attr in _GRAPH_ATTRS:
        if attr in graph.__dict__:  # not getattr: gs.Graph.__getattr__ logs errors for unknown names
            setattr(clone, attr, graph.__dict__[attr])
    return clone


def _is_float(dtype: Any) -> bool:
    try:
        return dtype is not None and np.dtype(dtype).kind == "f"
    except TypeError:
        return False


def float_tensors(graph: gs.Graph) -> tuple[list[str], list[str]]:
    """``(graph inputs, node outputs)``: names of the float tensors calibration covers, in graph order.

    Node output dtypes come from onnx shape inference on a copy (``graph`` is not changed); outputs whose
    dtype stays unknown are left out.
    """
    return _float_tensor_names(infer_shapes(clone_graph(graph)))


def _float_tensor_names(typed: gs.Graph) -> tuple[list[str], list[str]]:
    inputs = [t.name for t in typed.inputs if _is_float(t.dtype)]
    seen = set(inputs)
    outputs: list[str] = []
    for node in typed.nodes:
        for out in node.outputs:
            if out.name and out.name not in seen and _is_float(out.dtype):
                seen.add(out.name)
                outputs.append(out.name)
    return inputs, outputs


def static_tensors(graph: gs.Graph) -> set[str]:
    """Node outputs whose values do not depend on any graph input's values (only on constants and on
    tensor shapes through Shape/Size), e.g. an attention's ``sqrt(head_dim)`` computed from a Shape.
    These are runtime-computed constants, not activations."""
    dependent = {t.name for t in graph.inputs}
    static: set[str] = set()
    for node in graph.nodes:  # graphs are kept topologically sorted
        data_inputs = [t for t in node.inputs if not isinstance(t, gs.Constant) and t.name]
        if node.op not in ("Shape", "Size") and any(t.name in dependent for t in data_inputs):
            dependent.update(o.name for o in node.outputs if o.name)
        else:
            static.update(o.name for o in node.outputs if o.name)
    return static - dependent


@dataclass(frozen=True)
class Capture:
    """How rows are sampled from a captured tensor so that a LoRA branch can be evaluated on them.

    ``kind="linear"``: the tensor is ``[..., d_in]``; a row is one feature vector (token).
    ``kind="channels"``: the tensor is ``[B, d_in, ...]`` (channels first, after ``linear-to-conv``); a row
    is the feature vector at one position.
    ``kind="conv"``: the tensor is ``[B, C, H, W]`` feeding a conv with ``kernel``, ``strides``,
    ``pads`` (ONNX order: top, left, bottom, right) and ``dilations``; a row is the receptive field of one
    output pixel flattened in ``(C, kh, kw)`` order, i.e. ``row @ W.reshape(out, -1).T`` is that pixel's
    conv output.
    """

    kind: str = "linear"
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)

    def rows(self, arr: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``k`` rows of ``arr`` (float32 ``[n, features]``), drawn without replacement."""
        a = np.asarray(arr)
        return self.take(a, self.draw(a.shape, k, rng))

    def count(self, shape: Sequence[int]) -> int:
        """How many rows a tensor of ``shape`` has (tokens, or output pixels of the conv)."""
        if self.kind == "linear":
            return int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        if self.kind == "channels":
            if len(shape) < 2:
                raise QuadcError(f"a channels capture needs a [B, C, ...] tensor, got shape {list(shape)}")
            return int(shape[0]) * int(np.prod(shape[2:], dtype=np.int64))
        b, _, oh, ow = self._conv_geometry(shape)
        return b * oh * ow

    def draw(self, shape: Sequence[int], k: int, rng: np.random.Generator) -> np.ndarray:
        """Sorted indices of up to ``k`` distinct rows of a tensor of ``shape`` (see :meth:`take`)."""
        n = self.count(shape)
        return np.sort(rng.choice(n, size=min(k, n), replace=False))

    def take(self, arr: np.ndarray, picks: np.ndarray) -> np.ndarray:
        """The rows ``picks`` (from :meth:`draw`) of ``arr`` as float32 ``[len(picks), features]``."""
        a = np.asarray(arr)
        if self.kind == "linear":
            flat = a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)
            return np.asarray(flat[picks], dtype=np.float32)
        if self.kind == "channels":
            flat = np.moveaxis(a.reshape(a.shape[0], a.shape[1], -1), 1, 2).reshape(-1, a.shape[1])
            return np.asarray(flat[picks], dtype=np.float32)
        b, c, oh, ow = self._conv_geometry(a.shape)
        kh, kw = self.kernel
        sh, sw = self.strides
        dh, dw = self.dilations
        pt, pl, pb, pr = self.pads
        padded = np.pad(a, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        out = np.empty((len(picks), c * kh * kw), dtype=np.float32)
        for i, flat_index in enumerate(picks):
            bi, rem = divmod(int(flat_index), oh * ow)
            oy, ox = divmod(rem, ow)
            y0, x0 = oy * sh, ox * sw
            patch = padded[bi, :, y0:y0 + dh * (kh - 1) + 1:dh, x0:x0 + dw * (kw - 1) + 1:dw]
            out[i] = patch.reshape(-1)
        return out

    def _conv_geometry(self, shape: Sequence[int]) -> tuple[int, int, int, int]:
        """``(batch, channels, out_h, out_w)`` of the conv on an NCHW input of ``shape``."""
        if self.kind != "conv":
            raise QuadcError(f"unknown capture kind '{self.kind}'; use linear, channels or conv")
        if len(shape) != 4:
            raise QuadcError(f"a conv capture needs an NCHW tensor, got shape {list(shape)}")
        b, c, h, w = (int(d) for d in shape)
        kh, kw = self.kernel
        pt, pl, pb, pr = self.pads
        oh = (h + pt + pb - self.dilations[0] * (kh - 1) - 1) // self.strides[0] + 1
        ow = (w + pl + pr - self.dilations[1] * (kw - 1) - 1) // self.strides[1] + 1
        if oh < 1 or ow < 1:
            raise QuadcError(f"conv capture: kernel {self.kernel} does not fit a {h}x{w} input")
        return b, c, oh, ow


class _Reservoir:
    """At most ``size`` rows, a uniform sample of every row offered so far (Algorithm R)."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        self.count = 0
        self.rows: np.ndarray | None = None
        self.filled = 0

    def add(self, rows: np.ndarray) -> None:
        self.put(rows, self.plan(len(rows)))

    def plan(self, n: int) -> list[int]:
        """Offer ``n`` rows: the slot each one goes to, or -1 (dropped). Draws from ``rng`` exactly as
        offering them one by one would, and depends only on how many rows came before, not on their
        values, so rows can be planned before they are computed."""
        slots = []
        for _ in range(n):
            if self.filled < self.size:
                slots.append(self.filled)
                self.filled += 1
            else:
                j = int(self.rng.integers(0, self.count + 1))
                slots.append(j if j < self.size else -1)
            self.count += 1
        return slots

    def put(self, rows: np.ndarray, slots: Sequence[int]) -> None:
        """Store ``rows`` in the ``slots`` that :meth:`plan` gave for them (in order: later rows win)."""
        if self.rows is None:
            self.rows = np.empty((self.size, rows.shape[1]), dtype=np.float32)
        for row, slot in zip(rows, slots, strict=True):
            if slot >= 0:
                self.rows[slot] = row

    def result(self) -> np.ndarray:
        if self.rows is None:
            return np.empty((0, 0), dtype=np.float32)
        return self.rows[: self.filled].copy()


class Ranges(dict):
    """``tensor name -> (min, max)`` (Python floats), the union over every calibration run.

    Extra fields: ``samples`` (task name, or None for the base run when no tasks were given -> capture
    label -> ``[rows, features]`` float32), ``by_run`` (task name, or None for the base-model runs ->
    that task's own ``tensor -> (min, max)`` over its runs: :meth:`of_runs` unions some of them),
    ``runs`` (graph executions), ``feeds``, ``tasks`` (task names in run order) and ``skipped`` (float
    tensors that never had a finite value).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.samples: dict[str | None, dict[str, np.ndarray]] = {}
        self.by_run: dict[str | None, dict[str, tuple[float, float]]] = {}
        self.runs = 0
        self.feeds = 0
        self.tasks: list[str] = []
        self.skipped: list[str] = []

    def of_runs(self, who: Collection[str | None]) -> dict[str, tuple[float, float]]:
        """``tensor -> (min, max)`` over the runs of ``who`` only (task names, None: the base model);
        tensors none of those runs gave a finite value are left out."""
        out: dict[str, tuple[float, float]] = {}
        for key in who:
            for name, (lo, hi) in self.by_run.get(key, {}).items():
                old = out.get(name)
                out[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        return out


# -------------------------------------------------------------------------------------------------- runs
def _runs(graph: gs.Graph, feeds: Iterable[Mapping[str, np.ndarray]],
          tasks: Mapping[str, Mapping[str, np.ndarray]] | None, include_base: bool,
          progress: Callable[[str], None], label: str) -> Iterator[tuple[int, str | None, dict[str, np.ndarray]]]:
    """Yield ``(feed index, task or None, complete input dict)`` for every (feed, task) run.

    LoRA slot inputs a task does not bind are zero (and all of them are zero in the base run); any other
    graph input missing from a feed is a QuadcError.
    """
    specs = {t.name: t for t in graph.inputs}
    lora_inputs = [n for n in specs if is_lora_input(n)]
    zeros: dict[str, np.ndarray] = {}
    for name in lora_inputs:
        t = specs[name]
        if t.shape is None or any(not isinstance(d, int | np.integer) or d < 0 for d in t.shape):
            raise QuadcError(f"LoRA input '{name}' has no static shape {t.shape}; run the lora-inputs pass first")
        zeros[name] = np.zeros(tuple(int(d) for d in t.shape), dtype=np.dtype(t.dtype or np.float32))
    plan: list[str | None] = []
    if include_base or not tasks:
        plan.append(BASE)
    plan.extend(tasks or {})
    for index, feed in enumerate(feeds):
        missing = [n for n in specs if n not in feed and n not in zeros]
        if missing:
            raise QuadcError(f"calibration feed {index} lacks graph input(s) {', '.join(missing)}; "
                             "give every U-Net input (see quadc.quant.feeds)")
        for task in plan:
            bound = dict(zeros)
            if task is not BASE:
                packed = tasks[task]  # type: ignore[index]
                unknown = [k for k in packed if k not in zeros]
                if unknown:
                    raise QuadcError(f"task '{task}' binds '{unknown[0]}', which is not a LoRA input of the graph; "
                                     "pack it for this graph's slots")
                bound.update(packed)
            bound.update({k: np.asarray(v) for k, v in feed.items() if k in specs and k not in zeros})
            who = "base model" if task is BASE else f"task '{task}'"
            progress(f"{label}: feed {index + 1}, {who}")
            yield index, task, bound


def _reduce(graph: gs.Graph, op: str, tensor: gs.Tensor, taken: set[str], suffix: str,
            attrs: Mapping[str, Any] | None = None) -> gs.Variable:
    out = gs.Variable(unique_name(graph, f"{tensor.name}__quadc_{suffix}", taken), dtype=None)
    graph.nodes.append(gs.Node(op, f"{out.name}/node", attrs=dict(attrs or {"keepdims": 0}),
                               inputs=[tensor], outputs=[out]))
    return out


def _schedule_after_producers(graph: gs.Graph, first_added: int) -> None:
    """Move the nodes appended from index ``first_added`` on (taps and their helpers) to right after the
    node that produces their input, keeping their order.

    onnxruntime executes nodes of equal priority in graph order. A tap placed after its producer runs
    before the tensor's other consumers, so a consumer that can work in place (Softmax on attention
    scores, elementwise ops) still reuses the buffer: with the taps at the end every tapped tensor
    stays alive beside its successor (on SD1.5 about 1 GiB more at each 4096-token attention).
    """
    original, added = graph.nodes[:first_added], graph.nodes[first_added:]
    position: dict[str, int] = {}
    for i, node in enumerate(original):
        for out in node.outputs:
            position[out.name] = i
    first: list[gs.Node] = []
    after: list[list[gs.Node]] = [[] for _ in original]
    for node in added:  # helpers come after what they read, so one pass resolves chains
        where = max((position.get(t.name, -1) for t in node.inputs), default=-1)
        for out in node.outputs:
            position[out.name] = where
        (after[where] if where >= 0 else first).append(node)
    ordered = first
    for node, tail in zip(original, after, strict=True):
        ordered.append(node)
        ordered.extend(tail)
    graph.nodes = ordered


#: Ops whose output holds exactly the values of their first input, only rearranged.
_SAME_VALUES = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def _same_range_sources(graph: gs.Graph, names: Collection[str]) -> dict[str, str]:
    """``tensor -> source`` for each tensor of ``names`` that a value-preserving op (Reshape, Transpose,
    ...) makes from another tensor of ``names``: its min/max are the source's, so it needs no tap.
    Chains resolve to their first tensor, which is tapped."""
    wanted = set(names)
    source: dict[str, str] = {}
    for node in graph.nodes:  # topological order: a chain's source is seen first
        if node.op in _SAME_VALUES and node.inputs and node.outputs:
            src, out = node.inputs[0].name, node.outputs[0].name
            if src in wanted and out in wanted:
                source[out] = source.get(src, src)
    return source


#: Attention scores larger than this are computed in row blocks of about this size in the calibration graph.
ATTENTION_BLOCK_BYTES = 64 << 20


def _consumers(graph: gs.Graph) -> dict[str, list[gs.Node]]:
    users: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        for t in node.inputs:
            users.setdefault(t.name, []).append(node)
    return users


def _split_attention(aug: gs.Graph, typed: gs.Graph, taken: set[str],
                     block_bytes: int) -> dict[str, list[gs.Variable]]:
    """Compute each large ``MatMul -> Softmax(last axis) -> MatMul`` in blocks of query rows.

    Softmax is row-wise, so ``Q[rows] @ K`` -> Softmax -> ``@ V`` for each block of rows, concatenated, is
    the attention output, and the scores and probabilities of the blocks are, together, exactly the
    full tensors: their min/max union is the full tensors' range. onnxruntime keeps the scores and the
    probabilities alive together (Softmax does not work in place there), 2 x 512 MiB per 4096-token
    SD1.5 attention; in blocks, 2 x ``block_bytes``. Returns ``scores or probabilities name -> the
    blocks``; the original tensors no longer exist in ``aug``.
    """
    shapes = {name: _static_shape(t) for name, t in typed.tensors().items()}
    users = _consumers(aug)
    graph_outputs = {t.name for t in aug.outputs}
    opset = int(aug.opset)
    blocks: dict[str, list[gs.Variable]] = {}
    replaced: dict[int, list[gs.Node]] = {}
    position = {id(n): i for i, n in enumerate(aug.nodes)}
    for softmax in [n for n in aug.nodes if n.op == "Softmax"]:
        scores, probs = softmax.inputs[0], softmax.outputs[0]
        first, = scores.inputs if len(scores.inputs) == 1 else (None,)
        second = users.get(probs.name, [])
        shape = shapes.get(scores.name)
        if (first is None or first.op != "MatMul" or len(second) != 1 or second[0].op != "MatMul"
                or second[0].inputs[0] is not probs or shape is None or len(shape) < 3
                or users.get(scores.name) != [softmax] or {scores.name, probs.name} & graph_outputs):
            continue
        axis = int(softmax.attrs.get("axis", -1 if opset >= 13 else 1))
        q, q_shape = first.inputs[0], shapes.get(first.inputs[0].name)
        itemsize = np.dtype(typed.tensors()[scores.name].dtype or np.float32).itemsize
        nbytes = int(np.prod(shape)) * itemsize
        if axis % len(shape) != len(shape) - 1 or q_shape is None or len(q_shape) != len(shape) or nbytes <= block_bytes:
            continue
        rows = shape[-2]
        step = max(1, math.ceil(rows / math.ceil(nbytes / block_bytes)))
        out = second[0].outputs[0]
        nodes: list[gs.Node] = []
        parts: list[gs.Variable] = []
        for start in range(0, rows, step):
            q_rows, s_rows, p_rows, o_rows = (
                gs.Variable(unique_name(aug, f"{t.name}__quadc_rows{start}", taken), dtype=None)
                for t in (q, scores, probs, out))
            bounds = [gs.Constant(unique_name(aug, f"{q_rows.name}_{what}", taken), np.array([value], np.int64))
                      for what, value in (("start", start), ("end", min(start + step, rows)), ("axis", len(shape) - 2))]
            nodes += [
                gs.Node("Slice", f"{q_rows.name}/node", inputs=[q, *bounds], outputs=[q_rows]),
                gs.Node("MatMul", f"{s_rows.name}/node", inputs=[q_rows, first.inputs[1]], outputs=[s_rows]),
                gs.Node("Softmax", f"{p_rows.name}/node", attrs=dict(softmax.attrs), inputs=[s_rows], outputs=[p_rows]),
                gs.Node("MatMul", f"{o_rows.name}/node", inputs=[p_rows, second[0].inputs[1]], outputs=[o_rows]),
            ]
            blocks.setdefault(scores.name, []).append(s_rows)
            blocks.setdefault(probs.name, []).append(p_rows)
            parts.append(o_rows)
        for old in (first, softmax, second[0]):
            old.outputs.clear()
            old.inputs.clear()
        nodes.append(gs.Node("Concat", f"{out.name}__quadc_rows/node", attrs={"axis": len(shape) - 2},
                             inputs=parts, outputs=[out]))
        replaced[position[id(second[0])]] = nodes
    if replaced:
        aug.nodes = [m for i, n in enumerate(aug.nodes) for m in replaced.get(i, [n]) if m.outputs]
    return blocks


@dataclass(frozen=True)
class _Sampler:
    """How calibrate gets the rows of one capture label.

    Rows of a linear capture of a node output are gathered inside the graph (``Flatten`` to
    ``[rows, features]``, then ``Gather`` at indices fed through the graph input ``index_input``), so only
    the sampled rows leave onnxruntime and the tensor is freed like any other activation. The indices are
    drawn from the tensor's shape: the static one, else the one a ``Shape`` output (``shape_output``)
    reports in the first run. Other captures fetch the whole tensor ``output`` (a graph output, alive for
    the whole run), or read a graph input from the feed (``output`` None).
    """

    tensor: str
    how: Capture
    shape: tuple[int, ...] | None
    output: str | None = None
    index_input: str | None = None
    shape_output: str | None = None


def _static_shape(tensor: gs.Tensor | None) -> tuple[int, ...] | None:
    shape = getattr(tensor, "shape", None)
    if shape is None or any(not isinstance(d, int | np.integer) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def _add_samplers(aug: gs.Graph, typed: gs.Graph, capture: Mapping[str, tuple[str, Capture]], taken: set[str],
                  *, shapes_before_rows: bool) -> dict[str, _Sampler]:
    """A :class:`_Sampler` per capture label, adding the nodes and inputs it needs to ``aug``.

    ``shapes_before_rows``: a run without captures (the base model) comes first, so shapes that shape
    inference leaves unknown are learned before any rows are needed and can be gathered in the graph too.
    Otherwise, when some captured node output has no static shape, every capture fetches its whole
    tensor: rows are then drawn after the run, in label order, as the other draws must follow them.
    """
    tensors, types = aug.tensors(), typed.tensors()
    graph_inputs = {t.name for t in aug.inputs}
    in_graph = shapes_before_rows or all(
        _static_shape(tensors[name]) or _static_shape(types.get(name)) for name, _ in capture.values()
        if name not in graph_inputs)
    flat: dict[str, gs.Variable] = {}
    probes: dict[str, str] = {}
    samplers: dict[str, _Sampler] = {}
    for label, (name, how) in capture.items():
        shape = _static_shape(tensors[name]) or _static_shape(types.get(name))
        if name in graph_inputs:
            samplers[label] = _Sampler(name, how, shape)
            continue
        if shape is None and in_graph and name not in probes:
            # Learned in the base run, so that rows are drawn before every later run: a whole-tensor
            # capture without a known shape (a conv layer's input in a graph with symbolic dims) would
            # otherwise put every later label's draw after its run, when its rows are already gathered.
            probe = gs.Variable(unique_name(aug, f"{name}__quadc_shape", taken), np.int64)
            aug.nodes.append(gs.Node("Shape", f"{probe.name}/node", inputs=[tensors[name]], outputs=[probe]))
            probes[name] = probe.name
        if how.kind != "linear" or not in_graph:
            samplers[label] = _Sampler(name, how, shape, output=name, shape_output=probes.get(name))
            continue
        if name not in flat:
            flat[name] = gs.Variable(unique_name(aug, f"{name}__quadc_rows_all", taken), dtype=None)
            aug.nodes.append(gs.Node("Flatten", f"{flat[name].name}/node", attrs={"axis": -1},
                                     inputs=[tensors[name]], outputs=[flat[name]]))
        index = gs.Variable(unique_name(aug, f"{label}__quadc_row_index", taken), np.int64,
                            [unique_name(aug, f"{label}__quadc_rows", taken)])
        rows = gs.Variable(unique_name(aug, f"{label}__quadc_rows", taken), dtype=None)
        aug.nodes.append(gs.Node("Gather", f"{rows.name}/node", attrs={"axis": 0}, inputs=[flat[name], index],
                                 outputs=[rows]))
        aug.inputs.append(index)
        samplers[label] = _Sampler(name, how, shape, output=rows.name, index_input=index.name,
                                   shape_output=probes.get(name))
    return samplers


def _tap_session_options(level: str = "extended") -> dict[str, Any]:
    """Session options for graphs with a ReduceMin/ReduceMax tap on every activation, optimized up to
    ``level`` (``basic`` or ``extended``).

    With ORT's default execution order the taps run late and every activation stays alive: on the full
    SD1.5 U-Net, calibration peaked at 21.8 GiB after two inputs (growing per input). Priority-based
    order runs each tap right after its producer and, without the CPU arena, freed memory goes back:
    5.0 GiB peak and 2.5x faster (measured with benchmarks/bench_quant.py --part speed's model).
    ORT's default level (all) adds the NCHWc conv layout, whose weight reordering made building the
    full SD1.5 session take 32 s instead of 5 s with ``extended``, for no faster run (measured side by
    side, 2 cores).
    """
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    return {"execution_order": ort.ExecutionOrder.PRIORITY_BASED, "enable_cpu_mem_arena": False,
            "graph_optimization_level": levels[level]}


def calibrate(
    graph: gs.Graph,
    feeds: Iterable[Mapping[str, np.ndarray]],
    tasks: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    progress: Callable[[str], None] = silent_progress,
    *,
    include_base: bool = True,
    capture: Mapping[str, tuple[str, Capture]] | None = None,
    capture_tasks: Mapping[str, Collection[str]] | None = None,
    rows_per_feed: int = 64,
    max_rows: int = 256,
    seed: int = 0,
) -> Ranges:
    """Min/max of every float graph input and node output over all feeds and all tasks (streaming).

    ``tasks`` maps a task name to its packed LoRA tensors (:func:`quadc.lora.pack.pack_task`); each feed
    runs once per task and, with ``include_base``, once with every LoRA input zero. ``capture`` maps
    labels (module paths) to ``(tensor name, Capture)``: the LoRA layer's input and how rows are sampled
    from it; rows are kept per task (for the labels in ``capture_tasks[task]`` only, when given),
    ``rows_per_feed`` per run, at most ``max_rows`` per task and label. ``graph`` itself is not modified.
    """
    if rows_per_feed < 1 or max_rows < 1:
        raise QuadcError("rows_per_feed and max_rows must be positive")
    typed = infer_shapes(clone_graph(graph))
    input_names, output_names = _float_tensor_names(typed)
    aug = clone_graph(graph)
    tensors = aug.tensors()
    capture = dict(capture or {})
    unknown = [t for t, _ in capture.values() if t not in tensors]
    if unknown:
        raise QuadcError(f"capture tensor '{unknown[0]}' is not in the graph")
    taken = set(tensors) | {n.name for n in aug.nodes}
    same_range = _same_range_sources(aug, output_names)
    tapped = [name for name in output_names if name not in same_range]
    blocks = _split_attention(aug, typed, taken, ATTENTION_BLOCK_BYTES)
    first_added = len(aug.nodes)
    # One tap pair per tensor, or per block of a tensor computed in blocks (ranges: min/max over blocks).
    members = [blocks.get(name) or [tensors[name]] for name in tapped]
    starts = np.cumsum([0] + [len(group) for group in members[:-1]]).astype(np.intp)
    mins, maxs = [], []
    for group in members:
        for t in group:
            mins.append(_reduce(aug, "ReduceMin", t, taken, "min"))
            maxs.append(_reduce(aug, "ReduceMax", t, taken, "max"))
    samplers = _add_samplers(aug, typed, capture, taken, shapes_before_rows=include_base and bool(tasks))
    _schedule_after_producers(aug, first_added)
    tensors = aug.tensors()
    probes = {s.shape_output: s.tensor for s in samplers.values() if s.shape_output}
    sampled = list(dict.fromkeys([*(s.output for s in samplers.values() if s.output), *probes]))
    aug.outputs = [*mins, *maxs, *(tensors[n] for n in sampled if tensors[n] not in aug.outputs)]
    always = [v.name for v in mins] + [v.name for v in maxs] + list(probes)  # fetched in every run
    no_rows = {s.index_input: np.zeros(0, np.int64) for s in samplers.values() if s.index_input}
    learned: dict[str, tuple[int, ...]] = {}  # shapes the probes reported
    progress(f"calibration: {len(input_names)} inputs + {len(output_names)} activations ({len(tapped)} tapped, "
             f"{len(same_range)} reshaped copies, {len(blocks)} in row blocks), {len(capture)} captured LoRA inputs")
    session = ort_session(aug, **_tap_session_options())
    n, m = len(tapped), len(mins)
    del typed, aug, tensors, mins, maxs, blocks, members  # graph copies: not needed while the runs hold the peak
    return_freed_memory()

    # Running (min, max) per run group (the base model, each task): their union is the result.
    lo: dict[str | None, np.ndarray] = {}
    hi: dict[str | None, np.ndarray] = {}
    in_lo: dict[str | None, dict[str, float]] = {}
    in_hi: dict[str | None, dict[str, float]] = {}
    rng = np.random.default_rng(seed)
    reservoirs: dict[str | None, dict[str, _Reservoir]] = {}
    result = Ranges()
    feeds_seen = -1
    for index, task, bound in _runs(graph, feeds, tasks, include_base, progress, "calibrating"):
        feeds_seen = max(feeds_seen, index)
        wanted: list[str] = []
        if capture and (task is not BASE or not tasks):
            chosen = capture_tasks.get(task, ()) if (capture_tasks is not None and task is not BASE) else capture
            wanted = [label for label in chosen if label in capture]
        store = reservoirs.setdefault(task, {}) if wanted else {}
        # Rows are drawn before the run where the shape is known (the draws depend only on shapes and
        # counts), in label order, so the samples do not depend on where the rows are taken.
        planned: dict[str, tuple[np.ndarray, list[int]]] = {}
        row_index = dict(no_rows)
        for label in wanted:
            sampler = samplers[label]
            shape = (sampler.shape or learned.get(sampler.tensor)) if sampler.output else np.shape(bound[sampler.tensor])
            if shape is None:  # drawn after the run, and so is every later label (the draw order is kept)
                break
            picks = sampler.how.draw(shape, rows_per_feed, rng)
            planned[label] = (picks, store.setdefault(label, _Reservoir(max_rows, rng)).plan(len(picks)))
            if sampler.index_input:
                row_index[sampler.index_input] = picks.astype(np.int64)
        fetch = list(dict.fromkeys(samplers[label].output for label in wanted if samplers[label].output))
        values = session.run(always + fetch, {**bound, **row_index})
        result.runs += 1
        with np.errstate(invalid="ignore"):
            vmin = np.array([float(v) for v in values[:m]], dtype=np.float64)
            vmax = np.array([float(v) for v in values[m:2 * m]], dtype=np.float64)
            if m:
                vmin, vmax = np.minimum.reduceat(vmin, starts), np.maximum.reduceat(vmax, starts)
        ok = np.isfinite(vmin) & np.isfinite(vmax)
        t_lo, t_hi = lo.setdefault(task, np.full(n, np.inf)), hi.setdefault(task, np.full(n, -np.inf))
        lo[task], hi[task] = np.where(ok, np.minimum(t_lo, vmin), t_lo), np.where(ok, np.maximum(t_hi, vmax), t_hi)
        ti_lo = in_lo.setdefault(task, dict.fromkeys(input_names, math.inf))
        ti_hi = in_hi.setdefault(task, dict.fromkeys(input_names, -math.inf))
        for name in input_names:
            arr = np.asarray(bound[name], dtype=np.float64)
            finite = arr[np.isfinite(arr)]
            if finite.size:
                ti_lo[name] = min(ti_lo[name], float(finite.min()))
                ti_hi[name] = max(ti_hi[name], float(finite.max()))
        for probe, shape in zip(probes.values(), values[2 * m:len(always)], strict=True):
            learned[probe] = tuple(int(d) for d in shape)
        got = dict(zip(fetch, values[len(always):], strict=True))
        del values
        for label in wanted:
            sampler = samplers[label]
            arr = got[sampler.output] if sampler.output else bound[sampler.tensor]
            if label not in planned:  # a whole tensor whose shape is known only now
                picks = sampler.how.draw(np.shape(arr), rows_per_feed, rng)
                planned[label] = (picks, store.setdefault(label, _Reservoir(max_rows, rng)).plan(len(picks)))
            picks, slots = planned[label]
            rows = np.asarray(arr, dtype=np.float32) if sampler.index_input else sampler.how.take(arr, picks)
            store[label].put(rows, slots)
        del got
        return_freed_memory()  # else the heap's free holes grow from run to run (+0.3 GiB over 10 SD1.5 runs)
    del session
    return_freed_memory()
    result.feeds = feeds_seen + 1
    if result.feeds == 0:
        raise QuadcError("calibration got no feeds; give at least one (--calib-random N or --calib-dir)")
    result.tasks = list(tasks or {})
    index = {name: i for i, name in enumerate(tapped)}
    for who in lo:
        own: dict[str, tuple[float, float]] = {}
        for name in input_names:
            if math.isfinite(in_lo[who][name]):
                own[name] = (in_lo[who][name], in_hi[who][name])
        for name in output_names:
            i = index[same_range.get(name, name)]
            if math.isfinite(lo[who][i]):
                own[name] = (float(lo[who][i]), float(hi[who][i]))
        result.by_run[who] = own
    union = result.of_runs(list(lo))
    for name in [*input_names, *output_names]:
        if name in union:
            result[name] = union[name]
        else:
            result.skipped.append(name)
    result.samples = {task: {k: r.result() for k, r in store.items()} for task, store in reservoirs.items()}
    progress(f"calibration: {result.runs} runs over {result.feeds} feeds, {len(result)} ranges")
    return result


def measure_sqnr(
    graph: gs.Graph,
    feeds: Iterable[Mapping[str, np.ndarray]],
    encodings: Mapping[str, Encoding],
    tasks: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    progress: Callable[[str], None] = silent_progress,
    *,
    include_base: bool = True,
) -> dict[str, float]:
    """SQNR (dB) of fake-quantizing each tensor of ``encodings`` with its encoding, over all runs.

    ``10 log10(sum x^2 / sum (x - fq(x))^2)`` with both sums taken over every element of every run
    (feeds x tasks, as :func:`calibrate`); ``inf`` when fake quantization is exact. Node outputs are
    fake-quantized inside the graph (``QuantizeLinear -> DequantizeLinear``, which onnxruntime computes
    exactly like :func:`quadc.quant.affine.fake_quant`), graph inputs in numpy. Encodings must be
    per-tensor. Streaming like :func:`calibrate`.
    """
    input_set = {t.name for t in graph.inputs}
    aug = clone_graph(graph)
    tensors = aug.tensors()
    taken = set(tensors) | {n.name for n in aug.nodes}
    names = [n for n in encodings if n not in input_set]
    unknown = [n for n in names if n not in tensors]
    if unknown:
        raise QuadcError(f"tensor '{unknown[0]}' has an encoding but is not in the graph")
    typed = infer_shapes(clone_graph(graph)).tensors()
    signals, noises = [], []
    first_added = len(aug.nodes)
    for name in names:
        enc = encodings[name]
        if enc.per_channel:
            raise QuadcError(f"measure_sqnr takes per-tensor encodings; '{name}' is per-channel")
        t = tensors[name]
        x: gs.Tensor = t
        if np.dtype(typed[name].dtype or np.float32) != np.float32:
            x = gs.Variable(unique_name(aug, f"{name}__quadc_f32", taken), dtype=np.float32)
            aug.nodes.append(gs.Node("Cast", f"{x.name}/node", attrs={"to": 1}, inputs=[t], outputs=[x]))
        scale = gs.Constant(unique_name(aug, f"{name}__quadc_scale", taken), np.array(enc.scale, np.float32))
        zp = gs.Constant(unique_name(aug, f"{name}__quadc_zp", taken), np.array(enc.zero_point))
        q = gs.Variable(unique_name(aug, f"{name}__quadc_q", taken), dtype=enc.qtype.np_dtype)
        dq = gs.Variable(unique_name(aug, f"{name}__quadc_dq", taken), dtype=np.float32)
        diff = gs.Variable(unique_name(aug, f"{name}__quadc_err", taken), dtype=np.float32)
        aug.nodes.append(gs.Node("QuantizeLinear", f"{q.name}/node", inputs=[x, scale, zp], outputs=[q]))
        aug.nodes.append(gs.Node("DequantizeLinear", f"{dq.name}/node", inputs=[q, scale, zp], outputs=[dq]))
        aug.nodes.append(gs.Node("Sub", f"{diff.name}/node", inputs=[x, dq], outputs=[diff]))
        signals.append(_reduce(aug, "ReduceSumSquare", x, taken, "sig"))
        noises.append(_reduce(aug, "ReduceSumSquare", diff, taken, "noise"))
    _schedule_after_producers(aug, first_added)
    aug.outputs = [*signals, *noises]
    # Basic optimizations only: extended ones may fuse or drop the Q -> DQ pairs being measured.
    session = ort_session(aug, **_tap_session_options("basic")) if names else None
    fetch = [v.name for v in signals] + [v.name for v in noises]
    k = len(names)
    sig = np.zeros(k)
    noise = np.zeros(k)
    in_names = [n for n in encodings if n in input_set]
    in_sig = dict.fromkeys(in_names, 0.0)
    in_noise = dict.fromkeys(in_names, 0.0)
    for _, _, bound in _runs(graph, feeds, tasks, include_base, progress, "measuring 8-bit SQNR"):
        if session is not None:
            values = session.run(fetch, bound)
            sig += np.array([float(v) for v in values[:k]])
            noise += np.array([float(v) for v in values[k:]])
            del values
        for name in in_names:
            arr = np.asarray(bound[name], dtype=np.float32)
            err = arr.astype(np.float64) - fake_quant(arr, encodings[name]).astype(np.float64)
            in_sig[name] += float(np.sum(np.square(arr, dtype=np.float64)))
            in_noise[name] += float(np.sum(np.square(err)))
    del session
    return_freed_memory()
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        out[name] = sqnr_db_from_sums(sig[i], noise[i])
    for name in in_names:
        out[name] = sqnr_db_from_sums(in_sig[name], in_noise[name])
    return {name: out[name] for name in encodings}

