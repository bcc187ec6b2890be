"""Pass ``mha-split``: every multi-head self- and cross-attention becomes H independent single-head
branches, the form phone NPUs run well (no 4-D head reshapes or transposes, one small MatMul/Softmax
chain per head).

The pass matches the attention core, ``MatMul(Softmax(MatMul(qh, kt) [* c]), vh)``, and follows each
operand back through Reshape/Transpose and scalar Mul/Div to the Reshape that splits the channel axis
into heads (``[B, S, C] -> [B, S, H, d]``; the head count H is read from that Reshape's constant shape).
The layout of every step after it is tracked axis by axis, so both torch exporters are recognized by
what their nodes compute, not by their names or an exact node sequence: TorchScript reaches ``k^T``
with one ``Transpose(0, 2, 3, 1)`` and scales q and k by ``sqrt(1/sqrt(d))`` computed from ``Shape``;
dynamo reaches it through ``[B*H, Sk, d]`` reshapes and scales by constants. The output side,
``Transpose(0, 2, 1, 3)`` + ``Reshape [B, S, C]``, is followed the same way. Whatever produces the
``[B, S, C]`` tensors q, k and v (the projection MatMuls, their LoRA ``Add``, or the N->T converters
that ``linear-to-conv`` leaves) stays as it is.

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

TorchScript graphs carry no intermediate shapes; when the attention's shapes are unknown the pass runs
onnx shape inference once (graph inputs and outputs keep their declared types). Counts:
``attentions_split``, ``heads`` (their sum) and ``softmax`` (Softmax nodes in the graph afterwards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
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

__all__ = ["MhaSplit"]

#: How many Reshape/Transpose/scale nodes may lie between a head-split Reshape and the attention core.
_MAX_CHAIN = 12

_QK = Op("MatMul", Var("qh"), Var("kt"), name="qk")
#: The attention core; the scores may be scaled by a scalar before the Softmax.
CORE = Op("MatMul",
          Op("Softmax", OneOf(_QK,
                              Op("Mul", _QK, Var("score_scale"), name="score_op", commutative=True),
                              Op("Div", _QK, Var("score_scale"), name="score_op")), name="softmax"),
          Var("vh"), name="pv")


# ---------------------------------------------------------------------------------------------------
# Axis tracking: which logical axes (B, S, H, D) each axis of a tensor holds
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
        return tuple(n for n in names if self.sizes[n] > 1)

    def transpose(self, perm: list[int] | None) -> Layout | None:
        perm = list(reversed(range(len(self.axes)))) if perm is None else list(perm)
        if sorted(perm) != list(range(len(self.axes))):
            return None
        return Layout([self.axes[p] for p in perm], self.sizes)

    def reshape(self, dims: list[int]) -> Layout | None:
        """Regroup the logical axes into ``dims``; None when that would split a logical axis."""
        atoms = [a for axis in self.axes for a in axis]
        out: list[tuple[str, ...]] = []
        i = 0
        for n in dims:
            group: list[str] = []
            size = 1
            while size < n and i < len(atoms):
                size *= self.sizes[atoms[i]]
                group.append(atoms[i])
                i += 1
            if size != n:
                return None
            out.append(tuple(group))
        return Layout(out, self.sizes) if i == len(atoms) else None


def _static_dims(tensor: gs.Tensor) -> list[int] | None:
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int | np.integer) and d > 0 for d in shape):
        return None
    return [int(d) for d in shape]


def _reshape_target(node: gs.Node, in_dims: list[int], opset: int) -> list[int] | None:
    """The output dims of a Reshape whose shape is static, given its input dims."""
    found = static_value(node.inputs[1], opset) if len(node.inputs) > 1 else None
    if found is None:
        return None
    value = found[0]
    dims = [int(v) for v in np.asarray(value).reshape(-1)]
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


def _head_split(node: gs.Node, opset: int) -> tuple[int, int] | None:
    """(heads, head_dim) when ``node`` is a Reshape ``[B, S, C] -> [B, S, H, d]`` with H*d == C."""
    if node.op != "Reshape":
        return None
    in_dims = _static_dims(node.inputs[0])
    if in_dims is None or len(in_dims) != 3:
        return None
    out = _reshape_target(node, in_dims, opset)
    if out is None or len(out) != 4 or out[:2] != in_dims[:2] or out[2] * out[3] != in_dims[2]:
        return None
    return out[2], out[3]


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
    """How one operand of the attention core is made from a ``[B, S, C]`` tensor."""

    source: gs.Tensor
    heads: int
    head_dim: int
    layout: Layout
    factor: float = 1.0
    #: The head-split Reshape and every node after it up to the core.
    nodes: list[gs.Node] = field(default_factory=list)
    #: Nodes computing the chain's static scales and shapes (``Shape`` -> ... -> ``Sqrt``).
    side: list[gs.Node] = field(default_factory=list)


def _shape_nodes(reshape: gs.Node, opset: int) -> list[gs.Node]:
    """The nodes computing a Reshape's static shape input."""
    found = static_value(reshape.inputs[1], opset)
    return found[1] if found is not None else []


def head_chain(tensor: gs.Tensor, opset: int) -> HeadChain | str:
    """Follow ``tensor`` back to the Reshape that splits ``[B, S, C]`` into heads and track its layout
    forward from there; a reason string when it is not made that way."""
    chain: list[gs.Node] = []
    factor = 1.0
    side: list[gs.Node] = []
    t = tensor
    for _ in range(_MAX_CHAIN):
        node = producer(t)
        if node is None:
            return f"{t.name} is not made by a head-split Reshape [B, S, C] -> [B, S, H, d]"
        split = _head_split(node, opset)
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
    heads, head_dim = split
    batch, seq, _ = _static_dims(node.inputs[0]) or [0, 0, 0]
    sizes = {"B": batch, "S": seq, "H": heads, "D": head_dim}
    layout: Layout | None = Layout([tuple(a for a in (name,) if sizes[a] > 1) for name in "BSHD"], sizes)
    for step in reversed(chain):
        assert layout is not None
        if step.op == "Transpose":
            layout = layout.transpose(step.attrs.get("perm"))
        elif step.op == "Reshape":
            dims = _reshape_target(step, layout.dims(), opset)
            layout = layout.reshape(dims) if dims is not None else None
            side.extend(_shape_nodes(step, opset))
        if layout is None:
            return f"{step.op} '{step.name}' does not keep the heads' axes whole"
    side.extend(_shape_nodes(node, opset))
    return HeadChain(node.inputs[0], heads, head_dim, layout, factor, [node, *chain], side)


def _check_operand(chain: HeadChain, last_two: tuple[str, str], role: str) -> str | None:
    lay = chain.layout
    if len(lay.axes) < 3 or tuple(lay.axes[-2:]) != (lay.want(last_two[0]), lay.want(last_two[1])):
        return f"{role} is not laid out as [B, H, {', '.join(last_two)}] (got {lay.axes})"
    leading = [a for axis in lay.axes[:-2] for a in axis]
    if leading != list(lay.want("B", "H")):
        return f"{role} does not lead with batch and heads (got {lay.axes[:-2]})"
    return None


@dataclass
class Attention:
    """One attention recognized around its core: q/k/v head chains, the merge back to ``[B, S, C]``."""

    q: HeadChain
    k: HeadChain
    v: HeadChain
    scale: float
    output: gs.Tensor
    nodes: list[gs.Node]
    side: list[gs.Node]


def _merge_chain(pv: gs.Node, q: HeadChain, v: HeadChain,
                 graph: gs.Graph) -> tuple[gs.Tensor, list[gs.Node], list[gs.Node]] | str:
    """Follow the core's output forward through Reshape/Transpose to ``[B, S, H*d]``."""
    opset = graph.opset
    sizes = {"B": q.layout.sizes["B"], "S": q.layout.sizes["S"], "H": q.heads, "D": v.head_dim}
    layout: Layout | None = Layout([*q.layout.axes[:-2], tuple(a for a in "S" if sizes[a] > 1),
                                    tuple(a for a in "D" if sizes[a] > 1)], sizes)
    final = [tuple(a for a in "B" if sizes[a] > 1), tuple(a for a in "S" if sizes[a] > 1),
             tuple(a for a in "HD" if sizes[a] > 1)]
    t, nodes, side = pv.outputs[0], [], []
    for _ in range(_MAX_CHAIN):
        assert layout is not None
        if layout.axes == final:
            return t, nodes, side
        if len(t.outputs) != 1 or t in graph.outputs or t.outputs[0].op not in ("Reshape", "Transpose"):
            break
        step = t.outputs[0]
        if step.op == "Transpose":
            layout = layout.transpose(step.attrs.get("perm"))
        else:
            dims = _reshape_target(step, layout.dims(), opset)
            layout = layout.reshape(dims) if dims is not None else None
            side.extend(_shape_nodes(step, opset))
        if layout is None:
            return f"{step.op} '{step.name}' after the attention does not merge the heads"
        nodes.append(step)
        t = step.outputs[0]
    return f"the output of '{pv.name}' is not merged back to [B, S, H*d] by Reshape/Transpose"


def recognize(graph: gs.Graph, m: Match) -> Attention | str:
    """The attention around a :data:`CORE` match, or why it is not one this pass splits."""
    opset = graph.opset
    chains = {}
    for role, name, last_two in (("q", "qh", ("S", "D")), ("k", "kt", ("D", "S")), ("v", "vh", ("S", "D"))):
        chain = head_chain(m.tensors[name], opset)
        if isinstance(chain, str):
            return f"{role}: {chain}"
        reason = _check_operand(chain, last_two, role)
        if reason:
            return reason
        chains[role] = chain
    q, k, v = chains["q"], chains["k"], chains["v"]
    if not (q.heads == k.heads == v.heads) or q.head_dim != k.head_dim:
        return f"q/k/v disagree on heads ({q.heads}, {k.heads}, {v.heads}) or q/k head size"
    if not (q.layout.axes[:-2] == k.layout.axes[:-2] == v.layout.axes[:-2]):
        return "q, k and v group batch and heads differently"
    if v.factor != 1.0:
        return "v is scaled; only scales of q, k and the scores are folded"
    axis = m.nodes["softmax"].attrs.get("axis", -1)
    if axis not in (-1, len(q.layout.axes) - 1):
        return f"Softmax normalizes axis {axis}, not the keys' axis"
    scale = q.factor * k.factor
    core = [m.nodes["qk"], m.nodes["softmax"], m.nodes["pv"]]
    side = [*q.side, *k.side, *v.side]
    if "score_op" in m.nodes:
        scaled = _scalar_factor(m.nodes["score_op"], opset)
        if scaled is None or scaled[0] is not m.nodes["qk"].outputs[0]:
            return "the scores are scaled by something other than a static scalar"
        scale *= scaled[1]
        core.append(m.nodes["score_op"])
        side += scaled[2]
    merged = _merge_chain(m.nodes["pv"], q, v, graph)
    if isinstance(merged, str):
        return merged
    output, out_nodes, out_side = merged
    if output in graph.outputs:
        return f"{output.name} is a graph output"
    nodes = _unique([*q.nodes, *k.nodes, *v.nodes, *core, *out_nodes])
    side = _unique([*side, *out_side])
    used = outside_uses([*nodes, *_reading(side, nodes)], [output], graph)
    if used:
        return f"{', '.join(used[:3])} inside the attention is also read elsewhere"
    return Attention(q, k, v, scale, output, nodes, side)


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

    def _split(self, x: gs.Tensor, heads: int, size: int, shape: list[int], base: str) -> list[gs.Tensor]:
        if heads == 1:
            return [x]
        dtype = np.dtype(x.dtype or np.float32)
        outs = [variable(self._name(f"{base}/head{h}"), dtype, [*shape[:-1], size]) for h in range(heads)]
        sizes = np.full(heads, size, np.int64)
        if self.graph.opset >= 13:
            add_node(self.graph, "Split", [x, constant(self._name(f"{base}/sizes"), sizes)], outs,
                     name=self._name(f"{base}/Split"), attrs={"axis": -1})
        else:
            add_node(self.graph, "Split", [x], outs, name=self._name(f"{base}/Split"),
                     attrs={"axis": -1, "split": sizes.tolist()})
        return outs

    def rewrite(self, graph: gs.Graph, m: Match) -> None:
        att = recognize(graph, m)
        assert not isinstance(att, str), att
        name = m.nodes["softmax"].name
        base = name.rsplit("/", 1)[0] if "/" in name.strip("/") else (name or "attention")
        q, k, v = att.q.source, att.k.source, att.v.source
        dtype = np.dtype(q.dtype or np.float32)
        (b, s, c), (_, sk, _), (_, _, cv) = (_static_dims(t) for t in (q, k, v))  # type: ignore[misc]
        heads, d, dv = att.q.heads, att.q.head_dim, att.v.head_dim
        if att.scale != 1.0:
            scale = constant(self._name(f"{base}/scale"), np.asarray(att.scale, dtype))
            q = self._node("Mul", [q, scale], f"{base}/q_scale", [b, s, c], dtype)
        qs = self._split(q, heads, d, [b, s, c], f"{base}/q")
        ks = self._split(k, heads, d, [b, sk, c], f"{base}/k")
        vs = self._split(v, heads, dv, [b, sk, cv], f"{base}/v")
        outs = []
        for h in range(heads):
            kt = self._node("Transpose", [ks[h]], f"{base}/head{h}/kT", [b, d, sk], dtype, {"perm": [0, 2, 1]})
            scores = self._node("MatMul", [qs[h], kt], f"{base}/head{h}/scores", [b, s, sk], dtype)
            probs = self._node("Softmax", [scores], f"{base}/head{h}/Softmax", [b, s, sk], dtype, {"axis": -1})
            outs.append(self._node("MatMul", [probs, vs[h]], f"{base}/head{h}/values", [b, s, dv], dtype))
        output = att.output
        producer(output).outputs.clear()  # the old merge node; cleanup drops the rest of the old core
        add_node(graph, "Concat", outs, [output], name=self._name(f"{base}/Concat"), attrs={"axis": -1})
        self.attentions += 1
        self.heads += heads


def _check(graph: gs.Graph, m: Match) -> str | None:
    att = recognize(graph, m)
    return att if isinstance(att, str) else None


def _head_reshapes_left(graph: gs.Graph) -> list[str]:
    """Attention cores whose operands still come through a head-split Reshape, or whose Softmax is 4-D."""
    problems = []
    for node in graph.nodes:
        if node.op != "MatMul":
            continue
        m = match(node, CORE, graph)
        if not m:
            continue
        softmax = m.nodes["softmax"]
        rank = len(softmax.inputs[0].shape) if softmax.inputs[0].shape is not None else None
        for name in ("qh", "kt", "vh"):
            t = m.tensors[name]
            for _ in range(_MAX_CHAIN):
                p = producer(t)
                if p is None or p.op not in ("Reshape", "Transpose", "Mul", "Div"):
                    break
                if _head_split(p, graph.opset) is not None:
                    problems.append(f"attention at '{softmax.name}' still splits heads with a 4-D Reshape "
                                    f"'{p.name}'")
                    break
                t = p.inputs[0]
        if rank == 4:
            problems.append(f"Softmax '{softmax.name}' still works on a 4-D [B, H, S, Sk] tensor")
    return sorted(set(problems))


def _ensure_shapes(graph: gs.Graph) -> bool:
    """Run shape inference when an attention core's scores have no static shape; True if it ran.
    Graph inputs and outputs keep their declared dtypes and shapes."""
    cores = [n for n in graph.nodes if n.op == "MatMul" and match(n, CORE, graph)]
    if all(_static_dims(n.inputs[0]) is not None for n in cores):
        return False
    declared = [(t, t.dtype, t.shape) for t in [*graph.inputs, *graph.outputs]]
    infer_shapes(graph)
    for t, dtype, shape in declared:
        t.dtype, t.shape = dtype, shape
    return True


@register_pass
class MhaSplit(GraphPass):
    """Split every multi-head attention into independent per-head branches (Split, MatMul, Softmax, MatMul, Concat)."""

    name = "mha-split"

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        _ensure_shapes(graph)
        splitter = _Splitter(graph)
        rule = Rule("split-attention", CORE, splitter.rewrite, check=_check)
        apply_rules(graph, [rule])
        counts = {"attentions_split": splitter.attentions, "heads": splitter.heads,
                  "softmax": op_count(graph, "Softmax")}
        return PassResult(changed=splitter.attentions > 0, counts=counts)

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        problems = _head_reshapes_left(graph)
        blocks = ctx.model_info.attention if ctx.model_info is not None else []
        if blocks and all(b.heads for b in blocks):
            expected = sum(b.heads or 0 for b in blocks)
            found = op_count(graph, "Softmax")
            if found != expected:
                problems.append(f"{found} Softmax nodes, but the frontend's {len(blocks)} attention blocks "
                                f"have {expected} heads in all")
        return problems
