"""Pass ``scale-fold``: a constant scalar ``Mul``/``Div`` after a Conv/MatMul/Gemm layer is folded into the
layer's weight and bias, through layout-only ops, and taken off the LoRA path.

A scale node is ``Mul(t, c)`` / ``Mul(c, t)`` / ``Div(t, c)`` with ``c`` a float constant of one element.
From ``t`` the pass walks back through layout-only ops (``Reshape``, ``Transpose``, ``Squeeze``,
``Unsqueeze``, ``Flatten``, ``Identity``, ``Split``, ``Slice``: they commute with a scalar factor) to the
tensor's producer, and folds the factor ``f`` there when

- every reader of the producer's output, through those layout ops, is a scale node with the same ``f``
  (e.g. one Mul per head after mha-split's Split, or the exporters' ``q * d**-0.25`` after the head
  Reshape/Transpose) and none of those tensors is a graph output;
- the producer is linear in constants it can scale: ``Conv`` (weight and bias), ``MatMul`` with a constant
  operand, ``Gemm`` (the constant of A/B, and C), or an ``Add``/``Sub`` of such terms, a constant bias
  and a LoRA branch, each read only there (layout-only ops in between are fine, as in the N layout's
  ``Reshape(MatMul(up, MatMul(down, x)))``).

A LoRA branch is found structurally: a MatMul or Conv one of whose operands is a graph input that
``ctx.lora_slots`` names as a slot's ``up`` input. Its factor is recorded as
``ctx.lora_slots[module] = slot.scaled(f)`` (packing multiplies ``up`` by it, so task files carry it) and
the graph keeps no constant multiply on the LoRA path. A weight read only by the folded layer is scaled in
place (its name stays); a shared one is copied first. A factor of exactly 1 (diffusers'
``Div(out, rescale_output_factor=1.0)``, ``output_scale_factor=1``) scales nothing and the node is simply
removed, wherever it is. Scale nodes before a layer (on its input) and per-channel constants are left alone;
:func:`quadc.passes.patterns.explain` with :func:`scale_rule` says why a scale node was not folded.

Counts: ``folded`` (scale nodes removed), ``weights`` (constants scaled), ``lora_slots`` (slot scales
recorded), ``identity`` (Mul/Div by 1 removed), ``kept`` (scale nodes left, with a reason).

Given (attention q projection with a LoRA slot, the exporters' split scale on q)::

    h = MatMul(x, Wq)                           # Wq constant
    d = MatMul(MatMul(x, to_q.lora_down), to_q.lora_up)
    q = Add(h, d)
    t = Transpose(Reshape(q, [1, 64, 4, 8]), perm=[0, 2, 1, 3])
    s = Mul(t, 0.5946)                          # d**-0.25
    o = Div(Add(MatMul(a, Wo), bo), 1.0)        # rescale_output_factor

Result::

    h = MatMul(x, Wq')                          # Wq' = 0.5946 * Wq
    d = MatMul(MatMul(x, to_q.lora_down), to_q.lora_up)
    q = Add(h, d)                               # ctx.lora_slots["...to_q"].out_scale == 0.5946
    t = Transpose(Reshape(q, [1, 64, 4, 8]), perm=[0, 2, 1, 3])   # s's readers read t
    o = Add(MatMul(a, Wo), bo)                  # bo unchanged: the factor was 1
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.graph import unique_name
from quadc.passes.base import GraphPass, PassResult, register_pass
from quadc.passes.patterns import (
    Const,
    Match,
    Op,
    Rule,
    Var,
    applicable,
    apply_rules,
    bypass,
    const_value,
    match,
    producer,
)

__all__ = ["LAYOUT_OPS", "FoldPlan", "ScaleFold", "plan_fold", "scale_rule"]

#: Ops that only move elements of their first input: a scalar factor commutes with them.
LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Split", "Slice")


def _is_scalar_float(value: np.ndarray) -> bool:
    return value.size == 1 and np.issubdtype(value.dtype, np.floating) and bool(np.isfinite(value).all())


@dataclass
class FoldPlan:
    """What folding one factor does: constants to scale (per reading node and input position), LoRA slot
    modules to scale, and the scale nodes to remove."""

    factor: float
    constants: list[tuple[gs.Node, int]] = field(default_factory=list)
    slots: list[str] = field(default_factory=list)
    scale_nodes: list[gs.Node] = field(default_factory=list)


def _factor(m: Match) -> tuple[gs.Tensor, float] | str:
    """(data tensor, factor) of a matched scale node, or why it is not one."""
    node, c = m.root, m.tensors["c"]
    x = m.tensors["x"]
    if const_value(x) is not None:
        return "both operands are constants (const-fold's work)"
    if node.op == "Div" and node.inputs[1] is not c:
        return "it divides a constant by a tensor"
    value = m.value("c")
    rank = len(x.shape) if x.shape is not None else None
    if value.ndim > (rank if rank is not None else 1):
        return f"the constant's rank {value.ndim} would broadcast the tensor"
    f = float(value.reshape(-1)[0])
    if node.op == "Div":
        if f == 0.0:
            return "it divides by zero"
        f = 1.0 / f
    return x, f


def _layout_source(t: gs.Tensor) -> gs.Tensor:
    """The tensor ``t`` is a layout-only view of (walking back through layout ops)."""
    while (p := producer(t)) is not None and p.op in LAYOUT_OPS and p.inputs and p.inputs[0] is not t:
        t = p.inputs[0]
    return t


def _scale_readers(graph: gs.Graph, t0: gs.Tensor, f: float, rule: Rule) -> list[gs.Node] | str:
    """The scale nodes (factor ``f``) that read ``t0`` through layout ops, or why another reader exists."""
    leaves: list[gs.Node] = []
    stack = [t0]
    while stack:
        t = stack.pop()
        if t in graph.outputs:
            return f"{t.name} is a graph output"
        for reader in {id(n): n for n in t.outputs}.values():
            if reader.op in LAYOUT_OPS and reader.inputs[0] is t and all(u is not t for u in reader.inputs[1:]):
                stack.extend(reader.outputs)
                continue
            m = _match_scale(graph, reader, rule)
            got = _factor(m) if m else None
            if isinstance(got, tuple) and got[0] is t and got[1] == f:
                if all(n is not reader for n in leaves):
                    leaves.append(reader)
                continue
            return f"{t.name} is also read by {reader.op} {reader.name}"
    return leaves


def _match_scale(graph: gs.Graph, node: gs.Node, rule: Rule) -> Match | None:
    m = match(node, rule.pattern, graph) if node.op in ("Mul", "Div") else None
    return m if m else None


def _data_input(node: gs.Node) -> gs.Tensor:
    """The non-constant operand of a scale node."""
    return node.inputs[0] if const_value(node.inputs[0]) is None else node.inputs[1]


def _only_reader(graph: gs.Graph, t: gs.Tensor, node: gs.Node) -> bool:
    return t not in graph.outputs and all(n is node for n in t.outputs)


def _terms(graph: gs.Graph, t: gs.Tensor, ups: Mapping[str, str], plan: FoldPlan) -> str | None:
    """Add to ``plan`` what scaling the producer of ``t`` by the factor means; return why it cannot."""
    node = producer(t)
    if node is None:
        return f"{t.name} is a graph input"
    if node.op in LAYOUT_OPS and len(node.outputs) == 1:
        src = node.inputs[0]
        return _terms(graph, src, ups, plan) if _only_reader(graph, src, node) else \
            f"{src.name} is read by more than {node.name}"
    if node.op in ("Add", "Sub"):
        for i, term in enumerate(node.inputs[:2]):
            if const_value(term) is not None:
                plan.constants.append((node, i))
            elif not _only_reader(graph, term, node):
                return f"{term.name} (summed by {node.name}) is read elsewhere too"
            elif (why := _terms(graph, term, ups, plan)) is not None:
                return why
        return None
    operands = [(i, u) for i, u in enumerate(node.inputs[:2])]
    inputs = {i.name for i in graph.inputs}
    lora = [ups[u.name] for _, u in operands if u.name in ups and u.name in inputs and producer(u) is None]
    if node.op in ("MatMul", "Conv") and lora:
        plan.slots.append(lora[0])
        return None
    if node.op == "Conv":
        if const_value(node.inputs[1]) is None:
            return f"Conv {node.name} has a dynamic weight that is no LoRA slot"
        plan.constants.append((node, 1))
        if len(node.inputs) > 2 and node.inputs[2].name:
            plan.constants.append((node, 2))
        return None
    if node.op in ("MatMul", "Gemm"):
        weight = next((i for i, u in operands if const_value(u) is not None), None)
        if weight is None:
            return f"{node.op} {node.name} multiplies two activations"
        plan.constants.append((node, weight))
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            if const_value(node.inputs[2]) is None:
                return f"Gemm {node.name} has a dynamic C"
            plan.constants.append((node, 2))
        return None
    return f"{node.op} {node.name} is not linear in a constant weight"


def plan_fold(graph: gs.Graph, m: Match, ups: Mapping[str, str], rule: Rule) -> FoldPlan | str:
    """How to fold the matched scale node into its producer, or why it cannot be folded."""
    got = _factor(m)
    if isinstance(got, str):
        return got
    x, f = got
    if f == 1.0 and m.value("c").ndim > 0 and x.shape is None:
        return "a Mul/Div by 1 of unknown rank (it may broadcast)"
    leaves = [m.root] if f == 1.0 else _scale_readers(graph, _layout_source(x), f, rule)
    if isinstance(leaves, str):
        return leaves
    for leaf in leaves:
        src = _data_input(leaf)
        if leaf.outputs[0] in graph.outputs and (producer(src) is None or len(src.outputs) != 1):
            return f"{leaf.outputs[0].name} is a graph output and its input has other readers"
    if f == 1.0:
        return FoldPlan(f, scale_nodes=leaves)
    plan = FoldPlan(f, scale_nodes=leaves)
    why = _terms(graph, _layout_source(x), ups, plan)
    return why if why is not None else plan


def _scale_constant(graph: gs.Graph, node: gs.Node, index: int, f: float) -> None:
    tensor = node.inputs[index]
    values = const_value(tensor)
    assert values is not None
    scaled = (values.astype(np.float64) * f).astype(values.dtype)
    readers = {id(n) for n in tensor.outputs}
    if isinstance(tensor, gs.Constant) and readers == {id(node)} and tensor not in graph.outputs \
            and sum(u is tensor for u in node.inputs) == 1:
        tensor.values = scaled
        return
    node.inputs[index] = gs.Constant(unique_name(graph, f"{tensor.name}/scaled"), scaled)


def scale_rule(ctx: CompileContext, counts: dict[str, int] | None = None) -> Rule:
    """The scale-fold rule over ``ctx.lora_slots`` (``counts`` is updated as it rewrites)."""
    ups = {slot.up_input: module for module, slot in ctx.lora_slots.items()}
    plans: dict[int, FoldPlan] = {}
    tally = counts if counts is not None else {}

    def check(graph: gs.Graph, m: Match) -> str | None:
        plan = plan_fold(graph, m, ups, rule)
        if isinstance(plan, str):
            return plan
        plans[id(m.root)] = plan
        return None

    def rewrite(graph: gs.Graph, m: Match) -> None:
        plan = plans.pop(id(m.root))
        if plan.factor != 1.0:
            seen: set[tuple[int, int]] = set()
            for node, index in plan.constants:
                if (id(node), index) not in seen:
                    seen.add((id(node), index))
                    _scale_constant(graph, node, index, plan.factor)
            for module in dict.fromkeys(plan.slots):
                ctx.lora_slots[module] = ctx.lora_slots[module].scaled(plan.factor)
            tally["weights"] = tally.get("weights", 0) + len(seen)
            tally["lora_slots"] = tally.get("lora_slots", 0) + len(set(plan.slots))
            tally["folded"] = tally.get("folded", 0) + len(plan.scale_nodes)
        else:
            tally["identity"] = tally.get("identity", 0) + 1
        for node in plan.scale_nodes:
            why = bypass(graph, node, _data_input(node))
            assert why is None, why

    pattern = Op(("Mul", "Div"), Var("x"), Const("c", _is_scalar_float), commutative=True)
    rule = Rule("scale-fold", pattern, rewrite, check)
    return rule


@register_pass
class ScaleFold(GraphPass):
    """Fold constant scalar Mul/Div after Conv/MatMul/Gemm into weights and bias; LoRA factors go to the slot table."""

    name = "scale-fold"
    requires = ("lora-inputs",)  # LoRA branches added later would land inside what this pass rewrote

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        counts = {"folded": 0, "weights": 0, "lora_slots": 0, "identity": 0, "kept": 0}
        rule = scale_rule(ctx, counts)
        apply_rules(graph, [rule])
        counts["kept"] = sum(1 for n in graph.nodes if (m := _match_scale(graph, n, rule))
                             and isinstance(_factor(m), tuple) and rule.check(graph, m))
        changed = bool(counts["folded"] or counts["identity"])
        return PassResult(changed, counts)

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        left = applicable(graph, scale_rule(ctx))
        return [f"no foldable scale is left (found {left[0].root.name})"] if left else []
