"""Pass ``qnn-gelu``: GELU written with ``Erf`` becomes one standard ``Gelu`` node (opset 20), which
Qualcomm's HTP backend runs; HTP has no ``Erf``.

The exact GELU ``0.5 * x * (1 + erf(x / sqrt(2)))`` is matched in the arrangements the torch exporters
write: ``(x * (1 + erf(..))) * 0.5``, ``x * ((1 + erf(..)) * 0.5)``, ``(x * 0.5) * (1 + erf(..))`` and
``(x * (1 + erf(..))) / 2``, with ``x / sqrt(2)`` or ``x * (1/sqrt(2))`` inside and either operand order.
The ``Gelu`` node writes the pattern's output tensor (same name), so ranges calibrated before the fusion
still name it: the pass may run after ``quant-plan`` (it then drops the plan's entries of the tensors it
removed), and the ``qnn`` target runs it there so that its calibration is the one the other targets
share. A graph below opset 20 is converted to opset 21 (what the
``qnn`` target emits; :func:`quadc.passes.qdq_insert.upgrade_opset`, weights stay on disk).

When ``conv-act-fusion`` (preset ``npu``) has already made ``Gelu`` nodes, nothing is left to match and
the pass changes nothing. It must run before ``qdq-insert``: inside Q/DQ the pattern is split by
quantization nodes and no longer matches.

Given::

    d = Div(x, 1.4142135)
    e = Erf(d)
    a = Add(e, 1.0)
    m = Mul(x, a)
    y = Mul(m, 0.5)

Result::

    y = Gelu(x)            # approximate = "none", opset 21
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.passes.base import GraphPass, PassResult, op_count, register_pass
from quadc.passes.patterns import Const, Match, Op, Rule, Var, apply_rules, match
from quadc.passes.qdq_insert import OPSET_16BIT, upgrade_opset

__all__ = ["OPSET_GELU", "QnnGelu", "erf_gelu_rules"]

#: First standard opset with ``Gelu``.
OPSET_GELU = 20
_RTOL = 1e-6


def _scalar(want: float):
    """A check that a constant is one float equal to ``want`` (relative 1e-6)."""
    def check(value: np.ndarray) -> bool:
        return value.size == 1 and value.dtype.kind == "f" and math.isclose(float(value.reshape(-1)[0]), want,
                                                                              rel_tol=_RTOL)
    return check


def _one_plus_erf(inner_op: str) -> Op:
    """``1 + erf(x / sqrt(2))`` (``inner_op`` Div) or ``1 + erf(x * 1/sqrt(2))`` (Mul, either order)."""
    inner = Op(inner_op, Var("x"), Const("k"), name="scale", commutative=inner_op == "Mul")
    return Op("Add", Op("Erf", inner, name="erf"), Const("one", _scalar(1.0)), name="add", commutative=True)


def _gelu_check(graph: gs.Graph, m: Match) -> str | None:
    """Why the match is not GELU: the constant beside ``x`` must be sqrt(2) for Div, 1/sqrt(2) for Mul."""
    if not m.root.outputs:
        return "already rewritten"
    k = float(m.value("k").reshape(-1)[0]) if m.value("k").size == 1 else math.nan
    want = math.sqrt(2.0) if m.nodes["scale"].op == "Div" else 1.0 / math.sqrt(2.0)
    if not math.isclose(k, want, rel_tol=_RTOL):
        return f"{m.nodes['scale'].op} constant {k} is not {want:.7g}"
    x = m.tensors["x"]
    if x.dtype is not None and np.dtype(x.dtype).kind != "f":
        return f"{x.name} is not a float tensor"
    return None


def erf_gelu_rules(rewrite) -> list[Rule]:
    """The Erf form of GELU in the arrangements exporters write (see the module docstring)."""
    half = Const("half", _scalar(0.5))
    two = Const("two", _scalar(2.0))
    rules = []
    for inner in ("Div", "Mul"):
        erf = _one_plus_erf(inner)
        patterns = {
            "x*(1+erf)*0.5": Op("Mul", Op("Mul", Var("x"), erf, commutative=True), half, commutative=True),
            "x*((1+erf)*0.5)": Op("Mul", Var("x"), Op("Mul", erf, half, commutative=True), commutative=True),
            "(0.5*x)*(1+erf)": Op("Mul", Op("Mul", Var("x"), half, commutative=True), erf, commutative=True),
            "x*(1+erf)/2": Op("Div", Op("Mul", Var("x"), erf, commutative=True), two),
        }
        rules += [Rule(f"{name} [{inner}]", pattern, rewrite, _gelu_check) for name, pattern in patterns.items()]
    return rules


def _to_gelu(graph: gs.Graph, m: Match) -> None:
    """Replace the matched subgraph by ``Gelu(x)`` writing the root's output tensor."""
    root = m.root
    out = root.outputs[0]
    root.outputs.clear()
    graph.nodes.append(gs.Node("Gelu", name=f"{root.name or out.name}/Gelu", attrs={"approximate": "none"},
                               inputs=[m.tensors["x"]], outputs=[out]))


def _applies(graph: gs.Graph, rule: Rule) -> bool:
    """Whether ``rule`` matches somewhere and its check passes there."""
    return any(m and rule.check(graph, m) is None
               for m in (match(n, rule.pattern, graph) for n in graph.nodes if n.op == rule.pattern.op))


@register_pass
class QnnGelu(GraphPass):
    """Fuse Erf-GELU into the opset-20 Gelu op (HTP has no Erf); no-op when none is left."""

    name = "qnn-gelu"

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        rules = erf_gelu_rules(_to_gelu)
        if not op_count(graph, "Erf") or not any(_applies(graph, rule) for rule in rules):
            return PassResult(False, {"gelu": 0, "opset_upgraded": 0})
        upgraded = 0
        if graph.opset < OPSET_GELU:  # before the rewrite: the converter does not know Gelu below 20
            upgrade_opset(graph, OPSET_16BIT)
            upgraded = 1
        fused = sum(apply_rules(graph, rules).values())
        if ctx.plan is not None:  # planned before the fusion: forget the tensors it removed
            ctx.plan = ctx.plan.restricted_to(set(graph.tensors()))
        return PassResult(True, {"gelu": fused, "opset_upgraded": upgraded})

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        problems = []
        if op_count(graph, "Gelu") and graph.opset < OPSET_GELU:
            problems.append(f"a graph with Gelu has opset >= {OPSET_GELU} (it has {graph.opset})")
        return problems
