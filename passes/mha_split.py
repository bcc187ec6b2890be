"""Pass ``mha-split``: every multi-head self- and cross-attention becomes H independent single-head
branches, the form phone NPUs run well (no 4-D head reshapes or transposes, one small MatMul/Softmax
chain per head).

The pass matches the attention core at its Softmax, ``Softmax(MatMul(qh, kt) [* c])`` read by the value
product (``MatMul(p, vh)``, or ``MatMul(vh, Transpose(p))`` once ``linear-to-conv`` made it channels
first), and follows each operand back through Reshape/Transpose and scalar Mul/Div to the Reshape that
splits the channel axis into heads; the head count H is read from that Reshape's constant shape. The
axes of every step after it are tracked (which of batch, sequence, heads, head size each axis holds), so
the exporters are recognized by what their nodes compute, not by names or an exact node sequence:
TorchScript reaches ``k^T`` with one ``Transpose(0, 2, 3, 1)`` and scales q and k by
``sqrt(1/sqrt(d))`` computed from ``Shape``; dynamo goes through ``[B*H, Sk, d]`` reshapes and scales
by constants; after ``linear-to-conv`` the heads are split straight from ``[B, C, 1, S]``. The output
side (``Transpose`` + ``Reshape`` back to ``[B, S, C]`` or ``[B, C, 1, S]``) is followed the same way.
Whatever produces q, k and v (the projection MatMuls or Convs, their LoRA ``Add``, N->T converters)
stays as it is.

The rewrite slices the projection *outputs*, not their weights: the q/k/v/out projections and their
LoRA branches are untouched, so every LoRA slot keeps its inputs, shapes and layout (the slot table is
not changed). All scale factors of the attention (on q, on k, on the scores) become one constant Mul on q
before the Split; ``scale-fold`` may later fold it into the q projection.

Given (TorchScript export, 2 heads, C = 8, d = 4)::

    qh = Transpose<perm=[0,2,1,3]>(Reshape(q, [1,-1,2,4]))              # [B,H,S,d]
    kt = Transpose<perm=[0,2,3,1]>(Reshape(k, [1,-1,2,4]))              # [B,H,d,Sk]
    vh = Transpose<perm=[0,2,1,3]>(Reshape(v, [1,-1,2,4]))              # [B,H,Sk,d]
    r  = Sqrt(1 / Sqrt(Cast(Shape(qh)[-1:])))                           # 4 ** -0.25
    o  = MatMul(Softmax(MatMul(Mul(qh, r), Mul(kt, r))), vh)            # [B,H,S,d]
    y  = MatMul(Reshape(Transpose<perm=[0,2,1,3]>(o), [1,-1,8]), W_out)

Result::

    q0, q1 = Split<axis=-1>(Mul(q, 0.5), [4, 4])                        # [B,S,d] each
    k0, k1 = Split<axis=-1>(k, [4, 4]);   v0, v1 = Split<axis=-1>(v, [4, 4])
    o0 = MatMul(Softmax<axis=-1>(MatMul(q0, Transpose<perm=[0,2,1]>(k0))), v0)    # likewise o1
    y  = MatMul(Concat<axis=-1>(o0, o1), W_out)

Channels-first q/k/v (``[B, C, 1, S]``) are split on axis 1 in NPU.md's N form: ``q_h`` gets one 3-D
Transpose for the scores, ``k_h^T`` is a Reshape, ``o_h = MatMul(v_h, Transpose(p_h))`` and the heads
are concatenated on axis 1.

TorchScript graphs carry no intermediate shapes: when an attention's Softmax has no static shape, or an
attention is left whole for want of one, the pass runs onnx shape inference (graph inputs and outputs
keep their declared types). Counts:
``attentions_split``, ``heads`` (their sum) and ``softmax`` (Softmax nodes in the graph afterwards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.graph import add_node, constant, infer_shapes, unique_name, variable
from quadc.passes.base import GraphPass, PassResult, op_count, register_pass
from quadc.passes.patterns import (
    Match,
    OneOf,
    Op,
    Rule,
    Var,
    apply_rules,
    match,
    outside_uses,
    producer,
    static_value,
)

__all__ = ["CORE", "MhaSplit", "recognize"]

#: How many Reshape/Transpose/scale nodes may lie between a head-split Reshape and the attention core.
_MAX_CHAIN = 12

_QK = Op("MatMul", Var("qh"), Var("kt"), name="qk")
#: The attention core, rooted at its Softmax; the scores may be scaled by a scalar first.
CORE = Op("Softmax", OneOf(_QK,
                           Op("Mul", _QK, Var("score_scale"), name="score_op", commutative=True),
                           Op("Div", _QK, Var("score_scale"), name="score_op")), name="softmax")

#: The name of the pass's rule: ``explain(graph, Rule(RULE_NAME, CORE, ..., check))`` says why not.
RULE_NAME = "split-attention"

#: Where the channels sit in a tensor the heads are split from (logical axes, None for a unit axis):
#: tokens ``[B, S, C]``, channels first ``[B, C, S]`` and the NPU layout ``[B, C, 1, S]``.
_FAMILIES = {3: (("T", ("B", "S", "C")), ("N3", ("B", "C", "S"))), 4: (("N", ("B", "C", None, "S")),)}


# ---------------------------------------------------------------------------------------------------
# Axis tracking: which logical axes (batch, sequence, heads, head size) each axis of a tensor holds
# ---------------------------------------------------------------------------------------------------

@dataclass
class Layout:
    """The axes of a tensor as groups of logical axes (major first); size-1 logical axes are left out."""

    axes: list[tuple[str, ...]]
    sizes: dict[str, int]

    def dims(self) -> list[int]:
        return [math.prod(self.sizes[a] for a in axis) for axis in self.axes]

    def want(self, *names: str) -> tuple[str, ...]:
        """The group these logical axes form in this layout (size-1 ones dropped)."""
        return tuple(n for n in names if self.sizes.get(n, 1) > 1)

    def transpose(self, perm: list[int] | None) -> Layout | None:
        perm = list(reversed(range(len(self.axes)))) if perm is None else list(perm)
        if sorted(perm) != list(range(len(self.axes))):
            return None
        return Layout([self.axes[p] for p in perm], self.sizes)

    def reshape(self, dims: list[int], split: tuple[str, str, str] | None = None) -> Layout | None:
        """Regroup the logical axes into ``dims``; None when that would cut a logical axis, except that
        ``split = (whole, major, minor)`` lets the axis ``whole`` be cut once into ``major`` x ``minor``."""
        atoms = [a for axis in self.axes for a in axis]
        sizes = dict(self.sizes)
        out: list[tuple[str, ...]] = []
        i = 0
        for n in dims:
            group: list[str] = []
            size = 1
            while size < n and i < len(atoms):
                atom = atoms[i]
                if split and atom == split[0] and not group and sizes[atom] > n and sizes[atom] % n == 0:
                    sizes[split[1]], sizes[split[2]] = n, sizes[atom] // n
                    atoms[i:i + 1] = [split[1], split[2]]
                    split = None
                    continue
                size *= sizes[atom]
                group.append(atom)
                i += 1
            if size != n:
                return None
            out.append(tuple(group))
        return Layout(out, sizes) if i == len(atoms) else None


def _static_dims(tensor: gs.Tensor) -> list[int] | None:
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int | np.integer) and d > 0 for d in shape):
        return None
    return [int(d) for d in shape]


def _reshape_target(node: gs.Node, in_dims: list[int], opset: int) -> list[int] | None:
    """The output dims of a Reshape whose shape input is static, given its input dims."""
    found = static_value(node.inputs[1], opset) if len(node.inputs) > 1 else None
    if found is None:
        return None
    dims = [int(v) for v in np.asarray(found[0]).reshape(-1)]
    allow_zero = bool(node.attrs.get("allowzero", 0))
    for i, d in enumerate(dims):
        if d == 0 and not allow_zero:
            if i >= len(in_dims):
                return None
            dims[i] = in_dims[i]
    if dims.count(-1) > 1:
        return None
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        total = math.prod(in_dims)
        if known <= 0 or total % known:
            return None
        dims[dims.index(-1)] = total // known
    return dims if math.prod(dims) == math.prod(in_dims) else None


def _shape_nodes(reshape: gs.Node, opset: int) -> list[gs.Node]:
    """The nodes computing a Reshape's static shape input."""
    found = static_value(reshape.inputs[1], opset)
    return found[1] if found is not None else []


def _head_split(node: gs.Node, opset: int, seq: str = "S", dim: str = "D") -> tuple[str, Layout] | None:
    """(layout family of the input, layout after) when ``node`` is a Reshape that cuts the channel axis
    of a ``[B, S, C]``, ``[B, C, S]`` or ``[B, C, 1, S]`` tensor into heads ``H`` x head size ``dim``."""
    if node.op != "Reshape":
        return None
    in_dims = _static_dims(node.inputs[0])
    if in_dims is None:
        return None
    out = _reshape_target(node, in_dims, opset)
    if out is None:
        return None
    for family, names in _FAMILIES.get(len(in_dims), ()):
        if None in names and in_dims[names.index(None)] != 1:
            continue
        named = [seq if n == "S" else n for n in names]
        sizes = {n: d for n, d in zip(named, in_dims, strict=True) if n}
        layout = Layout([(n,) if n and sizes[n] > 1 else () for n in named], sizes)
        after = layout.reshape(out, ("C", "H", dim))
        if after is not None and "H" in after.sizes and after.sizes["H"] > 1:
            return family, after
    return None


def _scalar_factor(node: gs.Node, opset: int) -> tuple[gs.Tensor, float, list[gs.Node]] | None:
    """(data input, factor, nodes computing the factor) of a Mul/Div by a static scalar."""
    order = (1, 0) if node.op == "Mul" else (1,)
    for i in order:
        found = static_value(node.inputs[i], opset)
        if found is not None and found[0].size == 1:
            value = float(np.asarray(found[0]).reshape(()))
            if node.op == "Div":
                if value == 0.0:
                    return None
                value = 1.0 / value
            return node.inputs[1 - i], value, found[1]
    return None


@dataclass
class HeadChain:
    """How one operand of the attention core is made from the tensor its heads are split from."""

    source: gs.Tensor
    family: str  # "T" [B, S, C], "N3" [B, C, S] or "N" [B, C, 1, S]
    layout: Layout
    factor: float = 1.0
    #: The head-split Reshape and every node after it up to the core.
    nodes: list[gs.Node] = field(default_factory=list)
    #: Nodes computing the chain's static scales and shapes (``Shape`` -> ... -> ``Sqrt``).
    side: list[gs.Node] = field(default_factory=list)

    @property
    def heads(self) -> int:
        return self.layout.sizes["H"]


def head_chain(tensor: gs.Tensor, opset: int, seq: str, dim: str, graph: gs.Graph,
               absorb: bool = True) -> HeadChain | str:
    """Follow ``tensor`` back to the Reshape that splits a channel axis into heads and track its axes
    forward from there (sequence axis named ``seq``, head size ``dim``); a reason when it is not made so.
    With ``absorb``, a scalar Mul/Div read only by the head split (``linear-to-conv`` leaves the scale
    there) is taken into the chain."""
    chain: list[gs.Node] = []
    factor = 1.0
    side: list[gs.Node] = []
    t = tensor
    for _ in range(_MAX_CHAIN):
        node = producer(t)
        if node is None:
            return f"{t.name} is not made by a Reshape that splits channels into heads"
        split = _head_split(node, opset, seq, dim)
        if split is not None:
            break
        if node.op in ("Reshape", "Transpose"):
            chain.append(node)
            t = node.inputs[0]
        elif node.op in ("Mul", "Div"):
            scaled = _scalar_factor(node, opset)
            if scaled is None:
                return f"{node.name or node.op} multiplies by something other than a static scalar"
            t, f, nodes = scaled
            factor *= f
            chain.append(node)
            side.extend(nodes)
        else:
            return f"{t.name} comes from {node.op} '{node.name}', not from a head-split Reshape"
    else:
        return f"no head-split Reshape within {_MAX_CHAIN} nodes of {tensor.name}"
    family, layout = split
    tracked: Layout | None = layout
    for step in reversed(chain):
        assert tracked is not None
        if step.op == "Transpose":
            tracked = tracked.transpose(step.attrs.get("perm"))
        elif step.op == "Reshape":
            dims = _reshape_target(step, tracked.dims(), opset)
            tracked = tracked.reshape(dims) if dims is not None else None
            side.extend(_shape_nodes(step, opset))
        if tracked is None:
            return f"{step.op} '{step.name}' does not keep the heads' axes whole"
    side.extend(_shape_nodes(node, opset))
    nodes, source = [node, *chain], node.inputs[0]
    while absorb and (before := producer(source)) is not None and before.op in ("Mul", "Div") \
            and len(source.outputs) == 1 and source not in graph.outputs \
            and (scaled := _scalar_factor(before, opset)) is not None and _static_dims(scaled[0]) is not None:
        source, f, computed = scaled
        factor *= f
        nodes.append(before)
        side.extend(computed)
    return HeadChain(source, family, tracked, factor, nodes, side)


def _laid_out(chain: HeadChain, last_two: tuple[str, str], role: str) -> str | None:
    """Why ``chain`` is not ``[B, H, *last_two]`` (batch and heads leading in any grouping), or None."""
    lay = chain.layout
    if len(lay.axes) < 3 or tuple(lay.axes[-2:]) != (lay.want(last_two[0]), lay.want(last_two[1])):
        return f"{role} is not laid out as [B, H, {', '.join(last_two)}] (got {lay.axes})"
    leading = [a for axis in lay.axes[:-2] for a in axis]
    if leading != list(lay.want("B", "H")):
        return f"{role} does not lead with batch and heads (got {lay.axes[:-2]})"
    return None


@dataclass
class Attention:
    """One attention recognized around its Softmax: q/k/v head chains, value product, merged output."""

    q: HeadChain
    k: HeadChain
    v: HeadChain
    scale: float
    v_left: bool  # the value product is MatMul(v, Transpose(p)) (channels first) rather than MatMul(p, v)
    exits: list[tuple[gs.Tensor, str]]  # the merged outputs and their layouts ("T", "N3", "N")
    nodes: list[gs.Node]
    side: list[gs.Node]


def _value_product(softmax: gs.Node, graph: gs.Graph) -> tuple[gs.Node, gs.Tensor, bool, list[gs.Node]] | str:
    """(MatMul, v operand, whether v is the left operand, nodes) of the product of p with v."""
    p = softmax.outputs[0]
    if len(p.outputs) != 1 or p in graph.outputs:
        return "the Softmax output is read more than once"
    user = p.outputs[0]
    if user.op == "MatMul" and user.inputs[0] is p:
        return user, user.inputs[1], False, [user]
    rank = len(softmax.inputs[0].shape or ())
    swap = [*range(rank - 2), rank - 1, rank - 2]
    pt = user.outputs[0] if user.op == "Transpose" and list(user.attrs.get("perm", [])) == swap else None
    if pt is not None and len(pt.outputs) == 1 and pt not in graph.outputs:
        mm = pt.outputs[0]
        if mm.op == "MatMul" and mm.inputs[1] is pt:
            return mm, mm.inputs[0], True, [user, mm]
    return "the Softmax output does not go into a MatMul with v"


def _identity_cast(node: gs.Node) -> bool:
    """A Cast to the dtype its input already has (TorchScript's ``Cast(to=float)`` after the attention)."""
    dtype = node.inputs[0].dtype
    if node.op != "Cast" or dtype is None:
        return False
    return onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs.get("to", 0))) == np.dtype(dtype)


def _merge_exits(pv: gs.Node, start: Layout,
                 graph: gs.Graph) -> tuple[list[tuple[gs.Tensor, str]], list[gs.Node], list[gs.Node]] | str:
    """Follow the value product forward through Reshape/Transpose (and Casts that change nothing) until
    every path has merged the heads back into channels: ``[B, S, C]`` ("T"), ``[B, C, S]`` ("N3") or
    ``[B, C, 1, S]`` ("N"). Returns the exits (tensor, family), the nodes passed and their shape nodes."""
    finals = {"T": [start.want("B"), start.want("S"), start.want("H", "E")],
              "N3": [start.want("B"), start.want("H", "E"), start.want("S")],
              "N": [start.want("B"), start.want("H", "E"), (), start.want("S")]}
    exits: list[tuple[gs.Tensor, str]] = []
    nodes: list[gs.Node] = []
    side: list[gs.Node] = []
    stack: list[tuple[gs.Tensor, Layout]] = [(pv.outputs[0], start)]
    while stack:
        t, layout = stack.pop()
        family = next((f for f, axes in finals.items() if layout.axes == axes), None)
        if family is not None and t is not pv.outputs[0]:
            exits.append((t, family))
            continue
        if t in graph.outputs or not t.outputs:
            return f"{t.name} leaves the attention before its heads are merged back into channels"
        for step in t.outputs:
            after: Layout | None = None
            if step.op == "Transpose":
                after = layout.transpose(step.attrs.get("perm"))
            elif step.op == "Reshape":
                dims = _reshape_target(step, layout.dims(), graph.opset)
                after = layout.reshape(dims) if dims is not None else None
                side.extend(_shape_nodes(step, graph.opset))
            elif _identity_cast(step):
                after = layout
            if after is None:
                return f"{step.op} '{step.name}' after the attention does not merge the heads back into channels"
            if len(nodes) >= 4 * _MAX_CHAIN:
                return f"the output of '{pv.name}' takes too many steps to merge the heads"
            nodes.append(step)
            stack.append((step.outputs[0], after))
    return exits, nodes, side


def recognize(graph: gs.Graph, m: Match) -> Attention | str:
    """The attention around a :data:`CORE` match, or why it is not one this pass splits."""
    opset = graph.opset
    softmax = m.nodes["softmax"]
    product = _value_product(softmax, graph)
    if isinstance(product, str):
        return product
    pv, vh, v_left, pv_nodes = product
    q = head_chain(m.tensors["qh"], opset, "S", "D", graph)
    k = head_chain(m.tensors["kt"], opset, "K", "D", graph)
    v = head_chain(vh, opset, "K", "E", graph, absorb=False)
    for role, chain, last_two in (("q", q, ("S", "D")), ("k", k, ("D", "K")),
                                  ("v", v, ("E", "K") if v_left else ("K", "E"))):
        if isinstance(chain, str):
            return f"{role}: {chain}"
        reason = _laid_out(chain, last_two, role)
        if reason:
            return reason
    assert not isinstance(q, str) and not isinstance(k, str) and not isinstance(v, str)
    if any(c.layout.sizes.get("B", 1) != q.layout.sizes.get("B", 1) or c.heads != q.heads for c in (k, v)) \
            or k.layout.sizes["D"] != q.layout.sizes["D"]:
        return "q, k and v disagree on batch, heads or head size"
    if not (q.layout.axes[:-2] == k.layout.axes[:-2] == v.layout.axes[:-2]):
        return "q, k and v group batch and heads differently"
    if v.factor != 1.0:
        return "v is scaled; only scales of q, k and the scores are folded"
    axis = softmax.attrs.get("axis", -1)
    if axis not in (-1, len(q.layout.axes) - 1):
        return f"Softmax normalizes axis {axis}, not the keys' axis"
    scale = q.factor * k.factor
    core = [m.nodes["qk"], softmax, *pv_nodes]
    side = [*q.side, *k.side, *v.side]
    if "score_op" in m.nodes:
        scaled = _scalar_factor(m.nodes["score_op"], opset)
        if scaled is None or scaled[0] is not m.nodes["qk"].outputs[0]:
            return "the scores are scaled by something other than a static scalar"
        scale *= scaled[1]
        core.append(m.nodes["score_op"])
        side += scaled[2]
    sizes = {"B": q.layout.sizes.get("B", 1), "S": q.layout.sizes.get("S", 1), "H": q.heads,
             "E": v.layout.sizes["E"]}
    seq, size = Layout([], sizes).want("S"), Layout([], sizes).want("E")
    start = Layout([*q.layout.axes[:-2], *((size, seq) if v_left else (seq, size))], sizes)
    merged = _merge_exits(pv, start, graph)
    if isinstance(merged, str):
        return merged
    exits, out_nodes, out_side = merged
    nodes = _unique([*q.nodes, *k.nodes, *v.nodes, *core, *out_nodes])
    side = _unique([*side, *out_side])
    used = outside_uses([*nodes, *_reading(side, nodes)], [t for t, _ in exits], graph)
    if used:
        return f"{', '.join(used[:3])} inside the attention is also read elsewhere"
    return Attention(q, k, v, scale, v_left, exits, nodes, side)


def _unique(nodes: list[gs.Node]) -> list[gs.Node]:
    return list({id(n): n for n in nodes}.values())


def _reading(side: list[gs.Node], nodes: list[gs.Node]) -> list[gs.Node]:
    """The side nodes that depend on tensors the attention's ``nodes`` produce (``Shape(qh)`` and what
    follows it): they die with the attention, so nothing else may read them either."""
    produced = {id(t) for n in nodes for t in n.outputs}
    reading: list[gs.Node] = []
    for node in side:  # static_value lists producers before their consumers
        if any(id(t) in produced for t in node.inputs):
            reading.append(node)
            produced.update(id(t) for t in node.outputs)
    return reading


# ---------------------------------------------------------------------------------------------------
# The rewrite
# ---------------------------------------------------------------------------------------------------

class _Splitter:
    """Builds the per-head branches; keeps the taken names and what it did."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
        self.attentions = 0
        self.heads = 0

    def _name(self, base: str) -> str:
        return unique_name(self.graph, base, self.taken)

    def _node(self, op: str, inputs: list[gs.Tensor], name: str, shape: list[int], dtype: np.dtype,
              attrs: dict | None = None) -> gs.Variable:
        out = variable(self._name(f"{name}_output"), dtype, shape)
        add_node(self.graph, op, inputs, [out], name=self._name(name), attrs=attrs)
        return out

    def _reshape(self, x: gs.Tensor, shape: list[int], name: str, dtype: np.dtype) -> gs.Variable:
        target = constant(self._name(f"{name}_shape"), np.asarray(shape, np.int64))
        return self._node("Reshape", [x, target], name, shape, dtype)

    def _transpose(self, x: gs.Tensor, shape: list[int], name: str, dtype: np.dtype) -> gs.Variable:
        return self._node("Transpose", [x], name, shape, dtype, {"perm": [0, 2, 1]})

    def _split(self, x: gs.Tensor, family: str, heads: int, base: str) -> list[tuple[gs.Tensor, list[int]]]:
        """The heads of ``x`` with their shapes: ``[B, S, d]`` split on the last axis of a ``[B, S, C]``
        tensor ("T"), else ``[B, d, S]`` split on axis 1 (``[B, C, 1, S]`` is reshaped to ``[B, C, S]``)."""
        dims = _static_dims(x)
        assert dims is not None
        dtype = np.dtype(x.dtype or np.float32)
        if family == "N":
            dims = [dims[0], dims[1], dims[3]]
            x = self._reshape(x, dims, f"{base}/flat", dtype)
        axis = 2 if family == "T" else 1
        shape = [*dims[:axis], dims[axis] // heads, *dims[axis + 1:]]
        if heads == 1:
            return [(x, shape)]
        outs = [variable(self._name(f"{base}/head{h}"), dtype, shape) for h in range(heads)]
        sizes = np.full(heads, shape[axis], np.int64)
        attrs = {"axis": -1 if family == "T" else 1}
        if self.graph.opset >= 13:
            add_node(self.graph, "Split", [x, constant(self._name(f"{base}/sizes"), sizes)], outs,
                     name=self._name(f"{base}/Split"), attrs=attrs)
        else:
            add_node(self.graph, "Split", [x], outs, name=self._name(f"{base}/Split"),
                     attrs={**attrs, "split": sizes.tolist()})
        return [(o, shape) for o in outs]

    def rewrite(self, graph: gs.Graph, m: Match) -> None:
        att = recognize(graph, m)
        assert not isinstance(att, str), att
        name = m.nodes["softmax"].name
        base = name.rsplit("/", 1)[0] if "/" in name.strip("/") else (name or "attention")
        q = att.q.source
        dtype = np.dtype(q.dtype or np.float32)
        if att.scale != 1.0:
            scale = constant(self._name(f"{base}/scale"), np.asarray(att.scale, dtype))
            q = self._node("Mul", [q, scale], f"{base}/q_scale", _static_dims(q) or [], dtype)
        heads = att.q.heads
        qs = self._split(q, att.q.family, heads, f"{base}/q")
        ks = self._split(att.k.source, att.k.family, heads, f"{base}/k")
        vs = self._split(att.v.source, att.v.family, heads, f"{base}/v")
        outs = []
        for h in range(heads):
            hb = f"{base}/head{h}"
            (qh, qshape), (kh, kshape), (vh, vshape) = qs[h], ks[h], vs[h]
            if att.q.family == "T":
                b, s, d = qshape
            else:  # [B, d, S] -> [B, S, d]
                b, d, s = qshape
                qh = self._transpose(qh, [b, s, d], f"{hb}/q", dtype)
            if att.k.family == "T":  # [B, Sk, d] -> [B, d, Sk]
                sk = kshape[1]
                kh = self._transpose(kh, [b, d, sk], f"{hb}/kT", dtype)
            else:
                sk = kshape[2]
            scores = self._node("MatMul", [qh, kh], f"{hb}/scores", [b, s, sk], dtype)
            probs = self._node("Softmax", [scores], f"{hb}/Softmax", [b, s, sk], dtype, {"axis": -1})
            if att.v.family == "T":  # o_h = p v: [B, S, e]
                outs.append(self._node("MatMul", [probs, vh], f"{hb}/values", [b, s, vshape[2]], dtype))
            else:  # o_h = v p^T: [B, e, S]
                pt = self._transpose(probs, [b, sk, s], f"{hb}/probs_T", dtype)
                outs.append(self._node("MatMul", [vh, pt], f"{hb}/values", [b, vshape[1], s], dtype))
        self._concat(outs, "T" if att.v.family == "T" else "N3", att.exits, base, dtype)
        self.attentions += 1
        self.heads += heads

    def _concat(self, outs: list[gs.Tensor], family: str, exits: list[tuple[gs.Tensor, str]], base: str,
                dtype: np.dtype) -> None:
        """Concatenate the heads on their channel axis (``family`` "T": last, "N3": 1) and feed every exit
        of the old attention from it, in the exit's layout; an exit of the same layout is the Concat."""
        for t, _ in exits:
            old = producer(t)
            if old is not None:
                old.outputs.clear()  # cleanup drops the old attention
        b, x, y = _static_dims(outs[0]) or [0, 0, 0]
        c = sum((_static_dims(o) or [0, 0, 0])[2 if family == "T" else 1] for o in outs)
        shape = [b, x, c] if family == "T" else [b, c, y]
        same = next((t for t, f in exits if f == family), None)
        merged = same if same is not None else variable(self._name(f"{base}/heads"), dtype, shape)
        add_node(self.graph, "Concat", outs, [merged], name=self._name(f"{base}/Concat"),
                 attrs={"axis": -1 if family == "T" else 1})
        for t, f in exits:
            if t is merged:
                continue
            if f == family:
                add_node(self.graph, "Identity", [merged], [t], name=self._name(f"{base}/heads_copy"))
                continue
            src = merged
            if (f == "T") != (family == "T"):  # swap sequence and channels
                flipped = [shape[0], shape[2], shape[1]]
                if f != "N":
                    add_node(self.graph, "Transpose", [merged], [t], name=self._name(f"{base}/heads_T"),
                             attrs={"perm": [0, 2, 1]})
                    continue
                src = self._transpose(merged, flipped, f"{base}/heads_T", dtype)
            channels = _static_dims(src) or [0, 0, 0]
            target = constant(self._name(f"{base}/heads_N_shape"), np.asarray([channels[0], channels[1], 1, channels[2]], np.int64))
            add_node(self.graph, "Reshape", [src, target], [t], name=self._name(f"{base}/heads_N"))


def _check(graph: gs.Graph, m: Match) -> str | None:
    att = recognize(graph, m)
    return att if isinstance(att, str) else None


def _head_reshapes_left(graph: gs.Graph) -> list[str]:
    """Attention cores whose q/k operands still come through a head-split Reshape, or whose Softmax is 4-D."""
    problems = []
    for node in graph.nodes:
        if node.op != "Softmax" or not (m := match(node, CORE, graph)):
            continue
        label = node.name or node.outputs[0].name
        for name in ("qh", "kt"):
            t = m.tensors[name]
            for _ in range(_MAX_CHAIN):
                p = producer(t)
                if p is None or p.op not in ("Reshape", "Transpose", "Mul", "Div"):
                    break
                if _head_split(p, graph.opset) is not None:
                    problems.append(f"attention at Softmax '{label}' still splits heads with a 4-D Reshape "
                                    f"'{p.name or p.outputs[0].name}'")
                    break
                t = p.inputs[0]
        if node.inputs[0].shape is not None and len(node.inputs[0].shape) == 4:
            problems.append(f"Softmax '{label}' still works on a 4-D [B, H, S, Sk] tensor")
    return sorted(set(problems))


def _shapes_missing(graph: gs.Graph) -> bool:
    """Whether an attention core's Softmax has no static input shape (TorchScript exports)."""
    return any(n.op == "Softmax" and _static_dims(n.inputs[0]) is None and match(n, CORE, graph)
               for n in graph.nodes)


def _whole_attention_left(graph: gs.Graph) -> bool:
    """Whether an attention core still has a 4-D (all heads) Softmax."""
    return any(n.op == "Softmax" and len(n.inputs[0].shape or ()) == 4 and match(n, CORE, graph)
               for n in graph.nodes)


def _infer_shapes(graph: gs.Graph) -> None:
    """onnx shape inference onto the graph's tensors; graph inputs and outputs keep their declared types."""
    declared = [(t, t.dtype, t.shape) for t in [*graph.inputs, *graph.outputs]]
    infer_shapes(graph)
    for t, dtype, shape in declared:
        t.dtype, t.shape = dtype, shape


@register_pass
class MhaSplit(GraphPass):
    """Split every multi-head attention into independent per-head branches (Split, MatMul, Softmax, MatMul, Concat)."""

    name = "mha-split"

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        splitter = _Splitter(graph)
        rule = Rule(RULE_NAME, CORE, splitter.rewrite, check=_check)
        inferred = _shapes_missing(graph)
        if inferred:  # TorchScript graphs carry no intermediate shapes
            _infer_shapes(graph)
        apply_rules(graph, [rule])
        if not inferred and _whole_attention_left(graph):  # another pass may have left a shape unset
            _infer_shapes(graph)
            apply_rules(graph, [rule])
        counts = {"attentions_split": splitter.attentions, "heads": splitter.heads,
                  "softmax": op_count(graph, "Softmax")}
        return PassResult(changed=splitter.attentions > 0, counts=counts)

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        problems = _head_reshapes_left(infer_shapes(graph.copy()) if _shapes_missing(graph) else graph)
        blocks = ctx.model_info.attention if ctx.model_info is not None else []
        if blocks and all(b.heads for b in blocks):
            expected = sum(b.heads or 0 for b in blocks)
            found = op_count(graph, "Softmax")
            if found != expected:
                problems.append(f"{found} Softmax nodes, but the frontend's {len(blocks)} attention blocks "
                                f"have {expected} heads in all")
        return problems
