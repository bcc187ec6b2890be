"""The layout engine of ``linear-to-conv`` and ``transpose-cancel``: move Transposes and Reshapes through
the ops that do not care about layout until inverse pairs meet and cancel.

Layouts (NPU.md): T is what the exporters produce inside a Transformer2D, ``[B, S, C]`` (``[B, C]`` for
the time embedding); N is channels first, ``[B, C, 1, S]`` (``[B, C, 1, 1]``). The converters are plain
ONNX (:func:`to_channels`, :func:`to_tokens`)::

    T -> N:  Reshape(Transpose(x, [0, 2, 1]), [B, C, 1, S])
    N -> T:  Transpose(Reshape(x, [B, C, S]), [0, 2, 1])

The engine knows nothing about converters: it rewrites Transposes and reshape-like ops (Reshape,
Squeeze, Unsqueeze, Flatten with a static result) with these rules, each keeping the numbers exactly:

- ``merge-transposes`` / ``merge-reshapes`` / ``drop-transpose`` / ``drop-identity``: consecutive ones
  become one; identities go (on a graph output, when the producer can write the output instead); a
  Transpose that only moves unit axes becomes a Reshape;
- ``sink-transpose``: a Transpose moves below its consumers when all of them can take it: elementwise ops
  (constants are transposed, other inputs must be the same Transpose), Slice/Split/Concat/Softmax/
  reductions (their axes are mapped; Softmax only while its axis stays where it is), a Reshape that
  splits or merges whole axes (the Transpose then acts on the reshaped axes), and LayerNormalization
  (when the Transpose moves the normalized axis and only Transposes read the result, the norm is
  written over the new axis: ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt, Div, Mul, Add);
- ``sink-reshape``: a Reshape moves below consumers that can take it, one consumer at a time: any
  Reshape below elementwise ops whose other inputs are scalars or Reshapes of same-size tensors (those
  are reshaped into its frame when it ranks higher: more axes, then more unit axes, so ``[B, C, 1, S]``
  wins over ``[B, C, H, W]`` and ``[B, C, S]``); one that only inserts or removes unit axes also with
  constants (reshaped) and below Slice/Split/Concat/Softmax/reductions (axes mapped);
- ``hoist-transpose``: a Transpose moves above its producer when that removes Transposes: through
  elementwise ops, Concat, a Reshape that splits or merges whole axes, and ``MatMul`` for a swap of the
  last two axes (``(A B)^T = B^T A^T``), down to a Transpose it merges with or a constant.

So ``toN(toT(x))`` cancels, a LayerNorm/GEGLU/residual chain between two converters ends up in N with
no converter, the exporter's ``[B, C, H, W] -> [B, HW, C]`` entry into a Transformer2D becomes a
Reshape, and the attention's head reshapes act on channels directly. :func:`run_layout_engine` applies
the rules to a fixed point (a worklist, linear in the graph size) and then merges identical Transposes/
Reshapes of one tensor.

Given (a LayerNorm between two converted layers)::

    t = Transpose(Reshape(a, [1, 8, 6]), [0, 2, 1])        # N -> T after a Conv, a: [1, 8, 1, 6]
    n = LayerNormalization(t, gamma[8], beta[8], axis=-1)
    b = Reshape(Transpose(n, [0, 2, 1]), [1, 8, 1, 6])     # T -> N before the next Conv

Result::

    m = ReduceMean(a, axes=[1]); d = Sub(a, m); v = ReduceMean(Mul(d, d), axes=[1])
    b = Add(Mul(Div(d, Sqrt(Add(v, eps))), gamma[8, 1, 1]), beta[8, 1, 1])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from quadc.passes.patterns import Match, Op, Rule, apply_rules_worklist, is_removed, producer, remove_node

__all__ = ["Editor", "LazyArray", "count_ops", "ensure_static_shapes", "run_layout_engine", "static_shape",
           "to_channels", "to_tokens", "transpose_2d"]

#: Ops that compute each output element from the same element of every input (broadcasting allowed).
ELEMENTWISE = frozenset({
    "Abs", "Add", "And", "Cast", "Ceil", "Clip", "Cos", "Div", "Elu", "Equal", "Erf", "Exp", "Floor", "Gelu",
    "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Less", "LessOrEqual",
    "Log", "Max", "Mean", "Min", "Mish", "Mul", "Neg", "Not", "Or", "Pow", "Reciprocal", "Relu", "Round",
    "Selu", "Sigmoid", "Sign", "Sin", "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Tanh", "Where", "Xor",
})
RESHAPES = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten"})
REDUCES = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2",
                     "ReduceSumSquare"})
#: Ops a Transpose can move below (some only under conditions the rules check).
TAKES_TRANSPOSE = ELEMENTWISE | RESHAPES | REDUCES | {"Transpose", "Softmax", "LogSoftmax", "Slice", "Split", "Concat",
                                                      "LayerNormalization"}
#: Constants up to this many elements are rewritten (transposed, reshaped) by the engine.
SMALL_CONST = 1 << 16
#: How many producers deep ``hoist-transpose`` looks for something that absorbs a Transpose.
HOIST_DEPTH = 6


# ------------------------------------------------------------------------------------------ shapes, perms
def static_shape(tensor: gs.Tensor) -> list[int] | None:
    """The tensor's shape when every dimension is a known non-negative int, else None."""
    shape = tensor.shape
    if shape is None or any(not isinstance(d, int | np.integer) or d < 0 for d in shape):
        return None
    return [int(d) for d in shape]


def _compose(first: Sequence[int], second: Sequence[int]) -> list[int]:
    """``Transpose(Transpose(x, first), second) == Transpose(x, _compose(first, second))``."""
    return [first[i] for i in second]


def _inverse(perm: Sequence[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, axis in enumerate(perm):
        inv[axis] = i
    return inv


def _is_identity(perm: Sequence[int]) -> bool:
    return list(perm) == list(range(len(perm)))


def _permute(shape: Sequence[int], perm: Sequence[int]) -> list[int]:
    return [shape[i] for i in perm]


def _non_unit(shape: Sequence[int]) -> list[int]:
    return [i for i, d in enumerate(shape) if d != 1]


def _groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """The reshape ``a -> b`` as aligned groups of non-unit axes with equal products, each one-to-many or
    many-to-one; None when some group is many-to-many (the reshape mixes axes)."""
    ai, bi = _non_unit(a), _non_unit(b)
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ai) or j < len(bi):
        if i >= len(ai) or j >= len(bi):
            return None
        ga, gb = [ai[i]], [bi[j]]
        pa, pb = a[ai[i]], b[bi[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(ai):
                ga.append(ai[i])
                pa *= a[ai[i]]
                i += 1
            elif pb < pa and j < len(bi):
                gb.append(bi[j])
                pb *= b[bi[j]]
                j += 1
            else:
                return None
        if len(ga) > 1 and len(gb) > 1:
            return None
        groups.append((ga, gb))
    return groups


def _consecutive(positions: Sequence[int]) -> bool:
    return list(positions) == list(range(positions[0], positions[0] + len(positions)))


def transpose_before_reshape(x_shape: Sequence[int], perm: Sequence[int],
                             out_shape: Sequence[int]) -> tuple[list[int], list[int]] | None:
    """``(mid, new_perm)`` with ``Reshape(Transpose(x, perm), out) == Transpose(Reshape(x, mid), new_perm)``,
    or None when the reshape mixes axes the transpose separates."""
    if 0 in x_shape or 0 in out_shape:
        return None
    groups = _groups(_permute(x_shape, perm), out_shape)
    if groups is None:
        return None
    rank_of = {axis: k for k, axis in enumerate(_non_unit(x_shape))}
    placed: list[tuple[int, list[int]]] = []
    for gy, gout in groups:
        xs = [perm[i] for i in gy]
        if len(xs) > 1 and not _consecutive([rank_of[x] for x in xs]):
            return None
        placed.append((min(xs), gout))
    units = [j for j, d in enumerate(out_shape) if d == 1]
    where = {j: k for k, j in enumerate(units)}
    mid = [1] * len(units)
    for _, gout in sorted(placed):
        for j in gout:
            where[j] = len(mid)
            mid.append(int(out_shape[j]))
    return mid, [where[j] for j in range(len(out_shape))]


def transpose_after_reshape(w_shape: Sequence[int], out_shape: Sequence[int],
                            perm: Sequence[int]) -> tuple[list[int], list[int]] | None:
    """``(w_perm, final)`` with ``Transpose(Reshape(w, out), perm) == Reshape(Transpose(w, w_perm), final)``,
    or None when the transpose separates axes the reshape merged (or splits one it made)."""
    if 0 in w_shape or 0 in out_shape:
        return None
    groups = _groups(w_shape, out_shape)
    if groups is None:
        return None
    final = _permute(out_shape, perm)
    rank_in_final = {axis: k for k, axis in enumerate(p for p in perm if out_shape[p] != 1)}
    keyed: list[tuple[int, list[int]]] = []
    for gw, gout in groups:
        ranks = [rank_in_final[j] for j in gout]
        if len(gout) > 1 and not _consecutive(ranks):
            return None
        keyed.append((min(ranks), gw))
    w_perm = [i for i, d in enumerate(w_shape) if d == 1] + [i for _, gw in sorted(keyed) for i in gw]
    return w_perm, [int(d) for d in final]


def unit_axis_map(x_shape: Sequence[int], y_shape: Sequence[int]) -> list[int | None] | None:
    """For a reshape that only inserts or removes unit axes: for each axis of ``y``, the axis of ``x`` it
    comes from (None for an inserted unit axis); None for any other reshape."""
    if [d for d in x_shape if d != 1] != [d for d in y_shape if d != 1]:
        return None
    mapping: list[int | None] = []
    i = 0
    for d in y_shape:
        while i < len(x_shape) and x_shape[i] != d and x_shape[i] == 1:
            i += 1
        if i < len(x_shape) and x_shape[i] == d:
            mapping.append(i)
            i += 1
        elif d == 1:
            mapping.append(None)
        else:
            return None
    if any(x_shape[k] != 1 for k in range(i, len(x_shape))):
        return None
    return mapping


def _strip_leading_ones(arr: np.ndarray, keep_rank: int = 0) -> np.ndarray:
    shape = list(arr.shape)
    while len(shape) > keep_rank and shape and shape[0] == 1:
        shape.pop(0)
    return arr.reshape(shape)


# ---------------------------------------------------------------------------------------- lazy weights
class LazyArray(LazyValues):
    """Constant values computed from another constant's values only when read (``fn(source)``): a
    converted layer's weight stays on disk until the graph is saved or evaluated."""

    def __init__(self, source: np.ndarray | LazyValues, fn: Callable[[np.ndarray], np.ndarray],
                 shape: Sequence[int], dtype: Any) -> None:
        self.source = source
        self.fn = fn
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def load(self) -> np.ndarray:
        src = self.source.load() if isinstance(self.source, LazyValues) else self.source
        out = np.ascontiguousarray(self.fn(np.asarray(src)), dtype=self.dtype)
        assert out.shape == self.shape, f"lazy values: got {out.shape}, declared {self.shape}"
        return out

    @property
    def tensor(self) -> onnx.TensorProto:  # what onnx-graphsurgeon exports for lazy values
        return onnx.numpy_helper.from_array(self.load())

    def __str__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype})"


def transpose_2d(w: np.ndarray, rows: int = 64) -> np.ndarray:
    """``w.T`` as a contiguous array, copied in blocks of ``rows`` rows: about 2.5x faster than
    ``np.ascontiguousarray(w.T)`` on a memory-mapped weight (26 MB: 24 ms vs 64 ms)."""
    out = np.empty(w.shape[::-1], w.dtype)
    for i in range(0, w.shape[0], rows):
        out[:, i:i + rows] = w[i:i + rows].T
    return out


# ------------------------------------------------------------------------------------------ graph edits
@dataclass
class Editor:
    """Graph edits with fresh names and known shapes: what the passes' rewrites are written with."""

    graph: gs.Graph
    names: set[str] = field(default_factory=set)
    node_names: set[str] = field(default_factory=set)
    _shape_consts: dict[tuple[str, tuple[int, ...]], gs.Constant] = field(default_factory=dict)
    _counter: int = 0

    def __post_init__(self) -> None:
        self.names = set(self.graph.tensors().keys())
        self.node_names = {n.name for n in self.graph.nodes if n.name}
        self.outputs = {id(t) for t in self.graph.outputs}

    @property
    def opset(self) -> int:
        return int(self.graph.opset)

    def name(self, base: str, taken: set[str] | None = None) -> str:
        """A tensor name (node name with ``taken=self.node_names``) starting with ``base``, not used yet."""
        taken = self.names if taken is None else taken
        base = base or "t"
        name = base
        while name in taken:
            self._counter += 1
            name = f"{base}_{self._counter}"
        taken.add(name)
        return name

    def var(self, base: str, shape: Sequence[int], dtype: Any) -> gs.Variable:
        return gs.Variable(self.name(base), dtype=dtype, shape=[int(d) for d in shape])

    def const(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.name(base), np.ascontiguousarray(values))

    def ints(self, values: Sequence[int], kind: str = "shape") -> gs.Constant:
        """A shared int64 constant (Reshape shapes, axes, Slice bounds)."""
        key = (kind, tuple(int(v) for v in values))
        if key not in self._shape_consts:
            self._shape_consts[key] = self.const(f"{kind}_" + "_".join(str(v).replace("-", "m") for v in key[1]),
                                                 np.array(key[1], dtype=np.int64))
        return self._shape_consts[key]

    def node(self, op: str, name: str, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor],
             attrs: dict[str, Any] | None = None) -> gs.Node:
        node = gs.Node(op, self.name(name, self.node_names), attrs=dict(attrs or {}), inputs=list(inputs),
                       outputs=list(outputs))
        self.graph.nodes.append(node)
        return node

    def remove(self, node: gs.Node) -> None:
        """Disconnect ``node`` (cleanup drops it) and free its name for the node that replaces it."""
        remove_node(node)
        self.node_names.discard(node.name)

    def is_output(self, tensor: gs.Tensor) -> bool:
        return id(tensor) in self.outputs

    def can_bypass(self, x: gs.Tensor, out: gs.Tensor) -> bool:
        """Whether a node computing ``out = x`` can go: ``out`` is no graph output, or only that node reads
        ``x`` and ``x``'s producer can write the graph output instead."""
        if not self.is_output(out):
            return True
        return producer(x) is not None and len(x.outputs) == 1 and not self.is_output(x)

    def bypass(self, node: gs.Node, x: gs.Tensor, out: gs.Tensor) -> list[gs.Node]:
        """Remove ``node`` (which computes ``out = x``; :meth:`can_bypass` holds); returns what to revisit."""
        consumers = _consumers(out)
        self.remove(node)
        if not self.is_output(out):
            self.replace_uses(out, x)
            return consumers
        source = producer(x)
        assert source is not None
        source.outputs[source.outputs.index(x)] = out
        return [source, *consumers]

    def transpose(self, x: gs.Tensor, perm: Sequence[int], name: str, out: gs.Tensor | None = None) -> gs.Tensor:
        """``Transpose(x, perm)`` written into ``out`` (a new tensor if None)."""
        shape = _permute(static_shape(x) or [], perm)
        out = out if out is not None else self.var(f"{name}_out", shape, x.dtype)
        self.node("Transpose", name, [x], [out], {"perm": [int(p) for p in perm]})
        return out

    def reshape(self, x: gs.Tensor, shape: Sequence[int], name: str, out: gs.Tensor | None = None) -> gs.Tensor:
        """``Reshape(x, shape)`` (static shape) written into ``out`` (a new tensor if None)."""
        out = out if out is not None else self.var(f"{name}_out", shape, x.dtype)
        self.node("Reshape", name, [x, self.ints(shape)], [out])
        return out

    def replace_uses(self, old: gs.Tensor, new: gs.Tensor) -> None:
        for consumer in list(old.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is old:
                    consumer.inputs[i] = new

    def prune(self, tensors: Sequence[gs.Tensor]) -> None:
        """Remove the producers of ``tensors`` that nothing reads any more, and theirs, recursively."""
        stack = list(tensors)
        while stack:
            t = stack.pop()
            node = producer(t)
            if node is None or is_removed(node):
                continue
            if any(o.outputs or self.is_output(o) for o in node.outputs):
                continue
            ins = list(node.inputs)
            self.remove(node)
            stack.extend(ins)


def to_channels(ed: Editor, x: gs.Tensor, name: str) -> tuple[gs.Tensor, gs.Tensor]:
    """T -> N: ``x`` ``[B, S, C]`` becomes ``[B, C, 1, S]`` (``[B, C]`` becomes ``[B, C, 1, 1]``).
    Returns ``(x_n, x_cs)`` with ``x_cs`` the ``[B, C, S]`` (``[B, C, 1]``) view a LoRA branch reads."""
    shape = static_shape(x)
    assert shape is not None and len(shape) in (2, 3), f"{x.name}: T layout needs a static [B, S, C] or [B, C]"
    if len(shape) == 2:
        b, c = shape
        return ed.reshape(x, [b, c, 1, 1], f"{name}/to_nchw"), ed.reshape(x, [b, c, 1], f"{name}/to_cs")
    b, s, c = shape
    cs = ed.transpose(x, [0, 2, 1], f"{name}/to_nchw/transpose")
    return ed.reshape(cs, [b, c, 1, s], f"{name}/to_nchw/reshape"), cs


def to_tokens(ed: Editor, y: gs.Tensor, rank: int, name: str, out: gs.Tensor) -> None:
    """N -> T: ``y`` ``[B, C, 1, S]`` written into ``out`` as ``[B, S, C]`` (``rank`` 3) or ``[B, C]`` (2)."""
    b, c, _, s = static_shape(y) or [0, 0, 0, 0]
    if rank == 2:
        ed.reshape(y, [b, c], f"{name}/to_tokens", out=out)
        return
    flat = ed.reshape(y, [b, c, s], f"{name}/to_tokens/reshape")
    ed.transpose(flat, [0, 2, 1], f"{name}/to_tokens/transpose", out=out)


# -------------------------------------------------------------------------------------- node attributes
def _perm(node: gs.Node) -> list[int] | None:
    shape = static_shape(node.inputs[0])
    if shape is None:
        return None
    perm = node.attrs.get("perm")
    return [int(p) for p in perm] if perm is not None else list(reversed(range(len(shape))))


def _small_const(tensor: gs.Tensor, limit: int = SMALL_CONST) -> np.ndarray | None:
    """The value of a constant with at most ``limit`` elements (initializer or Constant node), else None;
    big weights are never decoded here."""
    if isinstance(tensor, gs.Constant):
        shape = tensor.shape
        if shape is None or int(np.prod(shape, dtype=np.int64)) > limit:
            return None
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is not None and node.op == "Constant" and "value" in node.attrs:
        value = node.attrs["value"]
        arr = np.asarray(value.values if isinstance(value, gs.Constant) else value)
        return arr if arr.size <= limit else None
    return None


def _axes_of(node: gs.Node, input_index: int = 1) -> list[int] | None:
    """A node's ``axes`` (attribute, or constant input at ``input_index`` from newer opsets)."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > input_index and node.inputs[input_index].name:
        value = _small_const(node.inputs[input_index])
        return None if value is None else [int(a) for a in value.reshape(-1)]
    return []


def _is_size_one(tensor: gs.Tensor, rank: int) -> bool:
    shape = static_shape(tensor)
    return shape is not None and len(shape) <= rank and all(d == 1 for d in shape)


def _single_use(ed: Editor, tensor: gs.Tensor) -> bool:
    return len(tensor.outputs) == 1 and not ed.is_output(tensor)


def _consumers(tensor: gs.Tensor) -> list[gs.Node]:
    seen: dict[int, gs.Node] = {}
    for node in tensor.outputs:
        seen.setdefault(id(node), node)
    return list(seen.values())


def _reduce_keeps_dims(node: gs.Node) -> bool:
    return int(node.attrs.get("keepdims", 1)) == 1 and int(node.attrs.get("noop_with_empty_axes", 0)) == 0


def _with_axes(ed: Editor, node: gs.Node, axes: list[int], x: gs.Tensor) -> tuple[list[gs.Tensor], dict]:
    """Inputs and attributes of a copy of reduce ``node`` reading ``x`` over ``axes`` (an attribute
    where the node has one, else the constant input of newer opsets)."""
    attrs = dict(node.attrs)
    if "axes" in attrs:
        attrs["axes"] = axes
        return [x], attrs
    return [x, ed.ints(axes, "axes")], attrs


# ---------------------------------------------------------------------------------------- rule helpers
Plan = Callable[[], list[gs.Node]]


def _rewrite_in_frame(ed: Editor, node: gs.Node, inputs: list[gs.Tensor], attrs: dict,
                      shapes: list[list[int]], wrap: Callable[[gs.Tensor, gs.Tensor, str], None]) -> list[gs.Node]:
    """Replace ``node`` by a copy reading ``inputs`` with outputs of ``shapes``; ``wrap(new, old, name)``
    writes each old output from the new one (a Transpose or Reshape back)."""
    outs = [ed.var(f"{node.name or node.op}_out", s, o.dtype) for o, s in zip(node.outputs, shapes, strict=True)]
    old_outs = list(node.outputs)
    name = node.name or node.op
    ed.remove(node)
    new = ed.node(node.op, name, inputs, outs, attrs)
    for k, (new_t, old_t) in enumerate(zip(outs, old_outs, strict=True)):
        wrap(new_t, old_t, f"{name}/back{k}" if len(outs) > 1 else f"{name}/back")
    return [new, *(producer(o) for o in old_outs)]


def _transpose_const(arr: np.ndarray, rank: int, perm: Sequence[int]) -> np.ndarray:
    """A constant ``c`` broadcast against ``Transpose(x, perm)``, rewritten to broadcast against ``x``."""
    full = arr.reshape([1] * (rank - arr.ndim) + list(arr.shape))
    return _strip_leading_ones(np.transpose(full, _inverse(perm)))


def _map_const(arr: np.ndarray, mapping: list[int | None], x_rank: int) -> np.ndarray | None:
    """A constant broadcast in the ``y`` frame of a unit-axis reshape, in the ``x`` frame (or None)."""
    full = arr.reshape([1] * (len(mapping) - arr.ndim) + list(arr.shape))
    shape = [1] * x_rank
    for j, i in enumerate(mapping):
        if i is None:
            if full.shape[j] != 1:
                return None
        else:
            shape[i] = full.shape[j]
    return _strip_leading_ones(full.reshape(shape))


# ------------------------------------------------------------------------------- sinking a Transpose
def _plan_transpose_into(ed: Editor, c: gs.Node, y: gs.Tensor, x: gs.Tensor, perm: list[int]) -> Plan | str:
    """How consumer ``c`` of ``y = Transpose(x, perm)`` is rewritten to read ``x`` (or why it cannot)."""
    rank = len(perm)
    inv = _inverse(perm)
    x_shape = static_shape(x)
    name = c.name or c.op
    if x_shape is None or any(static_shape(o) is None for o in c.outputs):
        return f"{name}: shapes are not static"

    def back(new: gs.Tensor, old: gs.Tensor, nm: str) -> None:
        ed.transpose(new, perm, nm, out=old)

    def in_x_frame(shape: Sequence[int]) -> list[int]:
        return _permute(shape, inv)

    if c.op == "Transpose":
        outer = _perm(c)
        if outer is None:
            return f"{name}: shapes are not static"
        composed = _compose(perm, outer)

        def plan_t() -> list[gs.Node]:
            out = c.outputs[0]
            ed.remove(c)
            if _is_identity(composed) and not ed.is_output(out):
                ed.replace_uses(out, x)
                return []
            if _is_identity(composed):  # a graph output: an identity Reshape that merge-reshapes may drop
                return [producer(ed.reshape(x, static_shape(out) or [], name, out=out))]
            ed.transpose(x, composed, name, out=out)
            return [producer(out)]
        return plan_t

    if c.op in RESHAPES:
        out_shape = static_shape(c.outputs[0])
        found = transpose_before_reshape(x_shape, perm, out_shape or [])
        if out_shape is None or found is None:
            return f"{name}: the reshape mixes axes the transpose moves"
        if not c.outputs[0].outputs or any(n.op not in TAKES_TRANSPOSE for n in c.outputs[0].outputs):
            return f"{name}: what reads the reshape would not take the transpose either"
        mid, new_perm = found

        def plan_r() -> list[gs.Node]:
            out = c.outputs[0]
            ed.remove(c)
            r = ed.reshape(x, mid, name)
            ed.transpose(r, new_perm, f"{name}/transpose", out=out)
            return [producer(r), producer(out)]
        return plan_r

    if c.op in ELEMENTWISE:
        if static_shape(c.outputs[0]) != static_shape(y):
            return f"{name}: broadcasting grows the output"
        inputs: list[gs.Tensor] = []
        for t in c.inputs:
            if t is y:
                inputs.append(x)
                continue
            if not t.name:
                inputs.append(t)
                continue
            p = producer(t)
            if p is not None and p.op == "Transpose" and _perm(p) == perm:
                inputs.append(p.inputs[0])
                continue
            value = _small_const(t)
            if value is not None and value.size == 1 and value.ndim <= rank:
                inputs.append(t)
                continue
            if value is not None and value.ndim <= rank:
                inputs.append(ed.const(f"{t.name}_t", _transpose_const(value, rank, perm)))
                continue
            if _is_size_one(t, rank):
                inputs.append(t)
                continue
            return f"{name}: input {t.name} is neither a constant nor the same Transpose"
        shapes = [in_x_frame(static_shape(o) or []) for o in c.outputs]
        return lambda: _rewrite_in_frame(ed, c, inputs, dict(c.attrs), shapes, back)

    if c.op in ("Softmax", "LogSoftmax"):
        axis = int(c.attrs.get("axis", -1)) % rank
        if ed.opset < 13 or perm[axis] != axis:
            return f"{name}: the softmax axis would move"
        return lambda: _rewrite_in_frame(ed, c, [x], dict(c.attrs), [x_shape], back)

    if c.op in REDUCES:
        axes = _axes_of(c)
        if axes is None or not axes or not _reduce_keeps_dims(c) or c.inputs[0] is not y:
            return f"{name}: only reductions with constant axes that keep dims"
        new_axes = sorted(perm[a % rank] for a in axes)
        out_shape = in_x_frame(static_shape(c.outputs[0]) or [])

        def plan_reduce() -> list[gs.Node]:
            ins, attrs = _with_axes(ed, c, new_axes, x)
            return _rewrite_in_frame(ed, c, ins, attrs, [out_shape], back)
        return plan_reduce

    if c.op == "Slice":
        if len(c.inputs) < 3 or c.inputs[0] is not y:
            return f"{name}: not a Slice of the transposed tensor"
        starts = _small_const(c.inputs[1])
        axes = _axes_of(c, 3) if len(c.inputs) > 3 and c.inputs[3].name else list(range(len(starts or [])))
        if starts is None or axes is None or any(_small_const(t) is None for t in c.inputs[2:] if t.name):
            return f"{name}: the slice bounds are not constant"
        new_axes = [perm[a % rank] for a in axes]
        shape = in_x_frame(static_shape(c.outputs[0]) or [])

        def plan_slice() -> list[gs.Node]:
            ins = [x, c.inputs[1], c.inputs[2], ed.ints(new_axes, "axes")] + list(c.inputs[4:5])
            return _rewrite_in_frame(ed, c, ins, dict(c.attrs), [shape], back)
        return plan_slice

    if c.op == "Split":
        if c.inputs[0] is not y:
            return f"{name}: not a Split of the transposed tensor"
        attrs = dict(c.attrs)
        attrs["axis"] = perm[int(attrs.get("axis", 0)) % rank]
        shapes = [in_x_frame(static_shape(o) or []) for o in c.outputs]
        return lambda: _rewrite_in_frame(ed, c, [x, *c.inputs[1:]], attrs, shapes, back)

    if c.op == "Concat":
        inputs = []
        for t in c.inputs:
            p = producer(t)
            if t is y:
                inputs.append(x)
            elif p is not None and p.op == "Transpose" and _perm(p) == perm:
                inputs.append(p.inputs[0])
            else:
                return f"{name}: input {t.name} is not the same Transpose"
        attrs = dict(c.attrs)
        attrs["axis"] = perm[int(attrs["axis"]) % rank]
        shape = in_x_frame(static_shape(c.outputs[0]) or [])
        return lambda: _rewrite_in_frame(ed, c, inputs, attrs, [shape], back)

    if c.op == "LayerNormalization":
        return _plan_layernorm(ed, c, y, x, perm)
    return f"{name}: {c.op} does not take a transposed input"


def _only_transposes_below(ed: Editor, t: gs.Tensor, depth: int = 4) -> bool:
    """Whether everything reading ``t`` is a Transpose, possibly after reshapes."""
    if ed.is_output(t) or not t.outputs or depth <= 0:
        return False
    return all(n.op == "Transpose" or (n.op in RESHAPES and _only_transposes_below(ed, n.outputs[0], depth - 1))
               for n in t.outputs)


def _plan_layernorm(ed: Editor, c: gs.Node, y: gs.Tensor, x: gs.Tensor, perm: list[int]) -> Plan | str:
    rank = len(perm)
    axis = int(c.attrs.get("axis", -1)) % rank
    name = c.name or c.op
    if c.inputs[0] is not y or any(o.outputs or ed.is_output(o) for o in c.outputs[1:]):
        return f"{name}: only the normalized output may be used"
    if all(perm[i] == i for i in range(axis, rank)):
        shape = static_shape(x) or []

        def back(new: gs.Tensor, old: gs.Tensor, nm: str) -> None:
            ed.transpose(new, perm, nm, out=old)
        return lambda: _rewrite_in_frame(ed, c, [x, *c.inputs[1:]], dict(c.attrs), [shape], back)
    if axis != rank - 1:
        return f"{name}: the transpose moves some of several normalized axes"
    if not _only_transposes_below(ed, c.outputs[0]):
        return f"{name}: the result is not read by Transposes only (no layout change to save)"
    params = [_small_const(t) if t.name else None for t in c.inputs[1:3]]
    if params[0] is None or (len(c.inputs) > 2 and c.inputs[2].name and params[1] is None):
        return f"{name}: scale and bias must be constants"
    k = perm[axis]
    eps = float(c.attrs.get("epsilon", 1e-5))
    x_shape = static_shape(x) or []
    x_rank = len(x_shape)
    stat_shape = [1 if i == k else d for i, d in enumerate(x_shape)]

    def per_channel(arr: np.ndarray) -> np.ndarray:
        return arr.reshape([-1] + [1] * (x_rank - 1 - k))

    def plan() -> list[gs.Node]:
        dtype = x.dtype or np.float32
        old = c.outputs[0]
        ed.remove(c)
        created: list[gs.Node] = []

        def op(kind: str, suffix: str, ins: list[gs.Tensor], shape: list[int], attrs: dict | None = None,
               out: gs.Tensor | None = None) -> gs.Tensor:
            o = out if out is not None else ed.var(f"{name}/{suffix}_out", shape, dtype)
            created.append(ed.node(kind, f"{name}/{suffix}", ins, [o], attrs))
            return o

        def mean(t: gs.Tensor, suffix: str) -> gs.Tensor:
            if ed.opset >= 18:
                return op("ReduceMean", suffix, [t, ed.ints([k], "axes")], stat_shape, {"keepdims": 1})
            return op("ReduceMean", suffix, [t], stat_shape, {"axes": [k], "keepdims": 1})

        m = mean(x, "mean")
        d = op("Sub", "centered", [x, m], x_shape)
        var = mean(op("Mul", "square", [d, d], x_shape), "variance")
        std = op("Sqrt", "std", [op("Add", "add_eps", [var, ed.const(f"{name}/eps", np.array(eps, dtype))],
                                    stat_shape)], stat_shape)
        n = op("Div", "normalized", [d, std], x_shape)
        scaled = op("Mul", "scale", [n, ed.const(f"{name}/gamma", per_channel(params[0]))], x_shape)
        result = scaled
        if params[1] is not None:
            result = op("Add", "shift", [scaled, ed.const(f"{name}/beta", per_channel(params[1]))], x_shape)
        ed.transpose(result, perm, f"{name}/back", out=old)
        return [*created, producer(old)]
    return plan


def _sink_transpose_check(graph: gs.Graph, m: Match, ed: Editor) -> str | None:
    t = m.root
    y, x = t.outputs[0], t.inputs[0]
    perm = _perm(t)
    if perm is None or static_shape(y) is None:
        return "shapes are not static"
    if ed.is_output(y) or not y.outputs:
        return "its output is a graph output or unused"
    plans = []
    for c in _consumers(y):
        plan = _plan_transpose_into(ed, c, y, x, perm)
        if isinstance(plan, str):
            return plan
        plans.append(plan)
    m.data["plans"] = plans
    m.data["read"] = [t for c in _consumers(y) for t in c.inputs]
    return None


def _run_plans(ed: Editor, m: Match) -> list[gs.Node]:
    """Apply the consumer rewrites a check planned, then drop what nothing reads any more."""
    touched: list[gs.Node] = []
    for plan in m.data["plans"]:
        touched.extend(n for n in plan() if n is not None)
    ed.prune([m.root.outputs[0], *m.data["read"]] if m.root.outputs else m.data["read"])
    return touched


# ------------------------------------------------------------------------------------ sinking a Reshape
def _plan_reshape_into(ed: Editor, c: gs.Node, y: gs.Tensor, x: gs.Tensor) -> Plan | str:
    """How consumer ``c`` of ``y = Reshape(x)`` is rewritten to read ``x`` (or why it cannot)."""
    x_shape, y_shape = static_shape(x), static_shape(y)
    name = c.name or c.op
    if x_shape is None or y_shape is None or any(static_shape(o) is None for o in c.outputs):
        return f"{name}: shapes are not static"
    mapping = unit_axis_map(x_shape, y_shape)
    y_rank, x_rank = len(y_shape), len(x_shape)

    def back(new: gs.Tensor, old: gs.Tensor, nm: str) -> None:
        ed.reshape(new, static_shape(old) or [], nm, out=old)

    def out_in_x_frame(o: gs.Tensor) -> list[int] | None:
        """The x-frame shape of a same-frame output (unit-axis reshapes only)."""
        shape = static_shape(o) or []
        if mapping is None or len(shape) != y_rank:
            return None
        out = [1] * x_rank
        for j, i in enumerate(mapping):
            if i is None:
                if shape[j] != 1:
                    return None
            else:
                out[i] = shape[j]
        return out

    def frame_key(shape: Sequence[int]) -> tuple[int, int]:
        return len(shape), sum(1 for d in shape if d == 1)

    def other_frame(t: gs.Tensor) -> gs.Tensor | None:
        """For another input ``Reshape(z)`` of the output's shape from a frame that does not rank above
        this one (more axes, then more unit axes): ``z`` reshaped into this frame."""
        p = producer(t)
        z = p.inputs[0] if p is not None and p.op in RESHAPES else None
        z_shape = static_shape(z) if z is not None else None
        if z is None or z_shape is None or static_shape(t) != y_shape:
            return None
        if int(np.prod(z_shape, dtype=np.int64)) != int(np.prod(x_shape, dtype=np.int64)):
            return None
        if frame_key(z_shape) > frame_key(x_shape):
            return None
        return z if z_shape == x_shape else ed.reshape(z, x_shape, f"{p.name or 'Reshape'}/frame")

    def other_frame_ok(t: gs.Tensor) -> bool:
        p = producer(t)
        if p is None or p.op not in RESHAPES or static_shape(t) != y_shape:
            return False
        z_shape = static_shape(p.inputs[0])
        return (z_shape is not None and frame_key(z_shape) <= frame_key(x_shape)
                and int(np.prod(z_shape, dtype=np.int64)) == int(np.prod(x_shape, dtype=np.int64)))

    def same_frame(t: gs.Tensor) -> gs.Tensor | None:
        """For another input ``Reshape(z)`` that the same map takes to this frame: ``z``."""
        p = producer(t)
        if p is None or p.op not in RESHAPES:
            return None
        z = p.inputs[0]
        z_shape, t_shape = static_shape(z), static_shape(t)
        if z_shape is None or t_shape is None:
            return None
        if mapping is None:
            return z if (z_shape == x_shape and t_shape == y_shape) else None
        if len(z_shape) != x_rank or len(t_shape) != y_rank:
            return None
        kept = {i for i in mapping if i is not None}
        if any(z_shape[i] != 1 for i in range(x_rank) if i not in kept):
            return None
        ok = all(t_shape[j] == 1 if i is None else t_shape[j] == z_shape[i] for j, i in enumerate(mapping))
        return z if ok else None

    def map_axis(a: int) -> int | None:
        if mapping is None:
            return None
        return mapping[a % y_rank]

    if c.op in ELEMENTWISE:
        if static_shape(c.outputs[0]) != y_shape:
            return f"{name}: broadcasting grows the output"
        inputs: list[gs.Tensor] = []
        for t in c.inputs:
            if t is y:
                inputs.append(x)
                continue
            if not t.name:
                inputs.append(t)
                continue
            z = same_frame(t)
            if z is not None:
                inputs.append(z)
                continue
            if other_frame_ok(t):
                inputs.append(t)  # reshaped into this frame when the plan runs
                continue
            value = _small_const(t)
            if value is not None and value.size == 1 and value.ndim <= x_rank:
                inputs.append(t)
                continue
            if value is not None and mapping is not None and value.ndim <= y_rank:
                mapped = _map_const(value, mapping, x_rank)
                if mapped is not None:
                    inputs.append(ed.const(f"{t.name}_r", mapped))
                    continue
            if _is_size_one(t, x_rank):
                inputs.append(t)
                continue
            return f"{name}: input {t.name} is not a constant or the same Reshape"
        def plan_elementwise() -> list[gs.Node]:
            ins = [other_frame(t) if (t is not y and t is u and other_frame_ok(t)) else u
                   for t, u in zip(c.inputs, inputs, strict=True)]
            return _rewrite_in_frame(ed, c, ins, dict(c.attrs), [x_shape] * len(c.outputs), back)  # type: ignore[arg-type]
        return plan_elementwise

    if mapping is None:
        return f"{name}: {c.op} only takes reshapes that insert or remove unit axes"
    shapes = [out_in_x_frame(o) for o in c.outputs]
    if any(s is None for s in shapes):
        return f"{name}: the outputs leave the reshape's frame"

    if c.op in ("Softmax", "LogSoftmax"):
        a = int(c.attrs.get("axis", -1)) % y_rank
        if ed.opset < 13 or mapping[a] != x_rank - 1 or a != y_rank - 1:
            return f"{name}: the softmax axis would move"
        attrs = dict(c.attrs)
        attrs["axis"] = -1
        return lambda: _rewrite_in_frame(ed, c, [x], attrs, shapes, back)  # type: ignore[arg-type]

    if c.op in REDUCES:
        axes = _axes_of(c)
        if axes is None or not axes or not _reduce_keeps_dims(c) or c.inputs[0] is not y:
            return f"{name}: only reductions with constant axes that keep dims"
        new_axes = sorted({m for a in axes if (m := map_axis(a)) is not None})
        if not new_axes:
            return f"{name}: reduces only inserted unit axes"

        def plan_reduce() -> list[gs.Node]:
            ins, attrs = _with_axes(ed, c, new_axes, x)
            return _rewrite_in_frame(ed, c, ins, attrs, shapes, back)  # type: ignore[arg-type]
        return plan_reduce

    if c.op == "Slice":
        if len(c.inputs) < 3 or c.inputs[0] is not y:
            return f"{name}: not a Slice of the reshaped tensor"
        starts = _small_const(c.inputs[1])
        axes = _axes_of(c, 3) if len(c.inputs) > 3 and c.inputs[3].name else list(range(len(starts or [])))
        if starts is None or axes is None or any(_small_const(t) is None for t in c.inputs[2:] if t.name):
            return f"{name}: the slice bounds are not constant"
        new_axes = [map_axis(a) for a in axes]
        if any(a is None for a in new_axes):
            return f"{name}: slices an inserted axis"

        def plan_slice() -> list[gs.Node]:
            ins = [x, c.inputs[1], c.inputs[2], ed.ints(new_axes, "axes")] + list(c.inputs[4:5])  # type: ignore[arg-type]
            return _rewrite_in_frame(ed, c, ins, dict(c.attrs), shapes, back)  # type: ignore[arg-type]
        return plan_slice

    if c.op == "Split":
        axis = map_axis(int(c.attrs.get("axis", 0)))
        if c.inputs[0] is not y or axis is None:
            return f"{name}: not a Split of the reshaped tensor along a kept axis"
        attrs = dict(c.attrs)
        attrs["axis"] = axis
        return lambda: _rewrite_in_frame(ed, c, [x, *c.inputs[1:]], attrs, shapes, back)  # type: ignore[arg-type]

    if c.op == "Concat":
        axis = map_axis(int(c.attrs["axis"]))
        inputs = []
        for t in c.inputs:
            z = x if t is y else same_frame(t)
            if z is None or axis is None:
                return f"{name}: input {t.name} is not the same Reshape"
            inputs.append(z)
        attrs = dict(c.attrs)
        attrs["axis"] = axis
        return lambda: _rewrite_in_frame(ed, c, inputs, attrs, shapes, back)  # type: ignore[arg-type]
    return f"{name}: {c.op} does not take a reshaped input"


def _sink_reshape_check(graph: gs.Graph, m: Match, ed: Editor) -> str | None:
    r = m.root
    y, x = r.outputs[0], r.inputs[0]
    if static_shape(y) is None or static_shape(x) is None:
        return "shapes are not static"
    if ed.is_output(y):
        return "its output is a graph output"
    plans, reasons, read = [], [], []
    for c in _consumers(y):
        if c.op in RESHAPES or c.op == "Transpose":
            continue
        plan = _plan_reshape_into(ed, c, y, x)
        if isinstance(plan, str):
            reasons.append(plan)
        else:
            plans.append(plan)
            read.extend(c.inputs)
    if not plans:
        return "; ".join(reasons) or "no consumer takes it"
    m.data["plans"] = plans
    m.data["read"] = read
    return None


# ----------------------------------------------------------------------------------- hoisting a Transpose
def _route_cost(ed: Editor, node: gs.Node, perm: list[int], depth: int) -> int:
    """Transposes added (negative: removed) by producing ``Transpose(node's output, perm)`` from its inputs."""
    rank = len(perm)
    if node.op in ELEMENTWISE:
        if static_shape(node.outputs[0]) is None or len(node.outputs) != 1:
            return 2
        total = 0
        for t in node.inputs:
            if not t.name or _is_size_one(t, rank):
                continue
            shape = static_shape(t)
            if shape is None or len(shape) != rank:
                return 2
            total += _absorb_cost(ed, t, perm, depth)
        return total
    if node.op in RESHAPES:
        w_shape, out_shape = static_shape(node.inputs[0]), static_shape(node.outputs[0])
        if w_shape is None or out_shape is None:
            return 2
        found = transpose_after_reshape(w_shape, out_shape, perm)
        return 2 if found is None else _absorb_cost(ed, node.inputs[0], found[0], depth)
    if node.op == "MatMul":
        a, b = node.inputs
        sa, sb = static_shape(a), static_shape(b)
        swap = list(range(rank - 2)) + [rank - 1, rank - 2]
        if rank < 2 or perm != swap or sa is None or sb is None or len(sa) != rank or len(sb) != rank:
            return 2
        return _absorb_cost(ed, a, perm, depth) + _absorb_cost(ed, b, perm, depth)
    if node.op == "Concat":
        return sum(_absorb_cost(ed, t, perm, depth) for t in node.inputs)
    return 2


def _absorb_cost(ed: Editor, t: gs.Tensor, perm: list[int], depth: int) -> int:
    """Transposes added (negative: removed) by making ``Transpose(t, perm)`` available, at most 1 (a new
    Transpose node)."""
    if _is_identity(perm):
        return 0
    if _small_const(t) is not None:
        return 0
    node = producer(t)
    if node is None:
        return 1
    single = _single_use(ed, t)
    if node.op == "Transpose":
        inner = _perm(node)
        if inner is None:
            return 1
        if _is_identity(_compose(inner, perm)):
            return -1 if single else 0
        return 0 if single else 1
    if not single or depth <= 0:
        return 1
    return min(1, _route_cost(ed, node, perm, depth - 1))


def _materialize(ed: Editor, t: gs.Tensor, perm: list[int], depth: int, created: list[gs.Node]) -> gs.Tensor:
    """A tensor equal to ``Transpose(t, perm)``, made the cheapest way :func:`_absorb_cost` found."""
    if _is_identity(perm):
        return t
    shape = _permute(static_shape(t) or [], perm)
    value = _small_const(t)
    if value is not None:
        return ed.const(f"{t.name}_t", np.transpose(value, perm))
    node = producer(t)
    base = (node.name or node.op) if node is not None else t.name
    if node is not None and node.op == "Transpose":
        composed = _compose(_perm(node) or [], perm)
        if _is_identity(composed):
            return node.inputs[0]
        out = ed.transpose(node.inputs[0], composed, f"{base}/merged")
        created.append(producer(out))
        return out
    if node is None or not _single_use(ed, t) or depth <= 0 or _route_cost(ed, node, perm, depth - 1) >= 1:
        out = ed.transpose(t, perm, f"{t.name}/transpose")
        created.append(producer(out))
        return out
    rank = len(perm)
    if node.op in RESHAPES:
        w_perm, final = transpose_after_reshape(static_shape(node.inputs[0]) or [], static_shape(t) or [],
                                                perm) or ([], [])
        w = _materialize(ed, node.inputs[0], w_perm, depth - 1, created)
        out = ed.reshape(w, final, f"{base}/hoisted")
    elif node.op == "MatMul":
        a, b = node.inputs
        bt = _materialize(ed, b, perm, depth - 1, created)
        at = _materialize(ed, a, perm, depth - 1, created)
        out = ed.var(f"{base}_t_out", shape, t.dtype)
        ed.node("MatMul", f"{base}/swapped", [bt, at], [out])
    elif node.op == "Concat":
        ins = [_materialize(ed, u, perm, depth - 1, created) for u in node.inputs]
        out = ed.var(f"{base}_t_out", shape, t.dtype)
        ed.node("Concat", f"{base}/hoisted", ins, [out], {"axis": _inverse(perm)[int(node.attrs["axis"]) % rank]})
    else:  # elementwise
        ins = [u if (not u.name or _is_size_one(u, rank)) else _materialize(ed, u, perm, depth - 1, created)
               for u in node.inputs]
        out = ed.var(f"{base}_t_out", shape, t.dtype)
        ed.node(node.op, f"{base}/hoisted", ins, [out], dict(node.attrs))
    created.append(producer(out))
    return out


def _hoist_check(graph: gs.Graph, m: Match, ed: Editor) -> str | None:
    t = m.root
    perm = _perm(t)
    x = t.inputs[0]
    node = producer(x)
    if perm is None or node is None or node.op == "Transpose" or ed.is_output(t.outputs[0]):
        return "nothing to hoist into"
    if not _single_use(ed, x):
        return "its input has other uses"
    cost = _route_cost(ed, node, perm, HOIST_DEPTH)
    if cost > 0:
        return f"hoisting through {node.op} would add {cost} Transpose(s)"
    return None


def _hoist_rewrite(ed: Editor, m: Match) -> list[gs.Node]:
    t = m.root
    perm = _perm(t) or []
    x, y = t.inputs[0], t.outputs[0]
    node = producer(x)
    assert node is not None
    created: list[gs.Node] = []
    new = _materialize(ed, x, perm, HOIST_DEPTH + 1, created)  # takes the route the check costed
    ed.remove(t)
    ed.replace_uses(y, new)
    ed.prune([x])
    return [*created, *new.outputs]


# -------------------------------------------------------------------------------------------- merging
def _merge_transposes_check(graph: gs.Graph, m: Match, ed: Editor) -> str | None:
    outer, inner = m.root, m.nodes["inner"]
    p1, p2 = _perm(inner), _perm(outer)
    if p1 is None or p2 is None:
        return "shapes are not static"
    m.data["perm"] = _compose(p1, p2)
    return None


def _merge_transposes(ed: Editor, m: Match) -> list[gs.Node]:
    outer, inner = m.root, m.nodes["inner"]
    x, mid, out = inner.inputs[0], outer.inputs[0], outer.outputs[0]
    perm = m.data["perm"]
    ed.remove(outer)
    if _is_identity(perm) and not ed.is_output(out):
        touched = _consumers(out)
        ed.replace_uses(out, x)
    elif _is_identity(perm):  # a graph output: an identity Reshape that merge-reshapes may drop
        touched = [producer(ed.reshape(x, static_shape(out) or [], outer.name or "Reshape", out=out))]
    else:
        touched = [producer(ed.transpose(x, perm, outer.name or "Transpose", out=out))]
    ed.prune([mid])
    return touched


def _drop_transpose_check(graph: gs.Graph, m: Match, ed: Editor) -> str | None:
    t = m.root
    perm, shape = _perm(t), static_shape(t.inputs[0])
    if perm is None or shape is None:
        return "shapes are not static"
    if _is_identity(perm) and not ed.can_bypass(t.inputs[0], t.outputs[0]):
        return "an identity on a graph output"
    kept = [a for a in perm if shape[a] != 1]
    if kept != sorted(kept):
        return "it moves non-unit axes"
    return None


def _drop_transpose(ed: Editor, m: Match) -> list[gs.Node]:
    """An identity Transpose goes; one that only moves unit axes becomes a Reshape."""
    t = m.root
    x, out = t.inputs[0], t.outputs[0]
    if static_shape(x) == static_shape(out) and ed.can_bypass(x, out):
        return ed.bypass(t, x, out)
    ed.remove(t)
    return [producer(ed.reshape(x, static_shape(out) or [], t.name or "Reshape", out=out))]


def _merge_reshapes_check(graph: gs.Graph, m: Match, ed: Editor) -> str | None:
    r = m.root
    x, out = r.inputs[0], r.outputs[0]
    inner = producer(x)
    shape, x_shape = static_shape(out), static_shape(x)
    if shape is None or x_shape is None:
        return "shapes are not static"
    if inner is not None and inner.op in RESHAPES and static_shape(inner.inputs[0]) is not None:
        m.data["source"] = inner.inputs[0]
        return None
    if shape == x_shape and ed.can_bypass(x, out):
        m.data["source"] = None
        return None
    return "neither after another reshape nor an identity"


def _merge_reshapes(ed: Editor, m: Match) -> list[gs.Node]:
    r = m.root
    x, out = r.inputs[0], r.outputs[0]
    source = m.data["source"]
    if source is None:
        return ed.bypass(r, x, out)
    ed.remove(r)
    if static_shape(source) == static_shape(out) and not ed.is_output(out):
        touched = _consumers(out)
        ed.replace_uses(out, source)
    else:
        touched = [producer(ed.reshape(source, static_shape(out) or [], r.name or "Reshape", out=out))]
    ed.prune([x])
    return touched


def _drop_identity_check(graph: gs.Graph, m: Match, ed: Editor) -> str | None:
    node = m.root
    return None if ed.can_bypass(node.inputs[0], node.outputs[0]) else "it writes a graph output"


def _drop_identity(ed: Editor, m: Match) -> list[gs.Node]:
    return ed.bypass(m.root, m.root.inputs[0], m.root.outputs[0])


def _dedupe(ed: Editor) -> int:
    """Merge Transposes/Reshapes that compute the same thing from the same tensor; returns how many went."""
    merged = 0
    for t in list(ed.graph.tensors().values()):
        seen: dict[tuple, gs.Tensor] = {}
        for node in _consumers(t):
            if node.op not in ("Transpose", "Reshape") or node.inputs[0] is not t or ed.is_output(node.outputs[0]):
                continue
            key = (node.op, tuple(_perm(node) or []) if node.op == "Transpose" else None,
                   tuple(static_shape(node.outputs[0]) or [id(node)]))
            if key in seen:
                ed.replace_uses(node.outputs[0], seen[key])
                ed.remove(node)
                merged += 1
            else:
                seen[key] = node.outputs[0]
    return merged


# ---------------------------------------------------------------------------------------------- driver
def layout_rules(ed: Editor) -> list[Rule]:
    """The engine's rules, bound to an :class:`Editor` (in the order they are tried at a node)."""
    return [
        Rule("merge-transposes", Op("Transpose", Op("Transpose", None, name="inner", one_use=False)),
             lambda g, m: _merge_transposes(ed, m), lambda g, m: _merge_transposes_check(g, m, ed)),
        Rule("drop-transpose", Op("Transpose"), lambda g, m: _drop_transpose(ed, m),
             lambda g, m: _drop_transpose_check(g, m, ed)),
        Rule("drop-identity", Op("Identity"), lambda g, m: _drop_identity(ed, m),
             lambda g, m: _drop_identity_check(g, m, ed)),
        Rule("merge-reshapes", Op(tuple(RESHAPES)), lambda g, m: _merge_reshapes(ed, m),
             lambda g, m: _merge_reshapes_check(g, m, ed)),
        Rule("hoist-transpose", Op("Transpose"), lambda g, m: _hoist_rewrite(ed, m),
             lambda g, m: _hoist_check(g, m, ed)),
        Rule("sink-transpose", Op("Transpose"), lambda g, m: _run_plans(ed, m),
             lambda g, m: _sink_transpose_check(g, m, ed)),
        Rule("sink-reshape", Op(tuple(RESHAPES)), lambda g, m: _run_plans(ed, m),
             lambda g, m: _sink_reshape_check(g, m, ed)),
    ]


def run_layout_engine(graph: gs.Graph, ed: Editor | None = None) -> dict[str, int]:
    """Apply the layout rules to a fixed point, merge duplicate Transposes/Reshapes, clean up; returns
    how often each rule applied (``dedupe``: duplicates merged)."""
    ed = ed or Editor(graph)
    graph.toposort()
    counts = apply_rules_worklist(graph, layout_rules(ed))
    counts["dedupe"] = _dedupe(ed)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return counts


def count_ops(graph: gs.Graph, op: str) -> int:
    return sum(1 for n in graph.nodes if n.op == op)


def ensure_static_shapes(graph: gs.Graph, fold: Callable[[gs.Graph], Any] | None = None) -> None:
    """Give every tensor a static shape if it can have one: onnx shape inference (weights untouched),
    then, when shape computations remain (``Shape`` nodes), ``fold`` (const-fold) and inference again."""
    from quadc.graph import computed_weights_as_dims, infer_shapes

    missing = any(static_shape(t) is None for n in graph.nodes for t in n.outputs)
    if not missing:
        return
    with computed_weights_as_dims(graph):  # converted weights stay uncomputed: inference needs their dims only
        infer_shapes(graph)
        if fold is not None and any(n.op == "Shape" for n in graph.nodes):
            fold(graph)
            infer_shapes(graph)
