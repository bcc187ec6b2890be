"""Pass ``conv-act-fusion``: a Conv (or linear layer) and the activation after it become one fused
operation, and the SiLU and Erf-GELU patterns collapse to one node wherever they occur.

**Collapsing** (everywhere, not only after a Conv: SD's resnets apply SiLU after GroupNorm, GEGLU applies
GELU to half of a projection):

- SiLU ``Mul(x, Sigmoid(x))`` (either operand order). Option ``silu``:

  - ``function`` (default): one node ``quadc.SiLU(x)`` calling an ONNX local function (a FunctionProto in
    the ``quadc`` domain whose body is ``Sigmoid`` + ``Mul``). It is valid at any opset, onnxruntime
    inlines it (so ORT computes exactly what it did before), and a vendor target maps the node by its
    name to its own SiLU/Swish kernel. Chosen as the default because the only standard op, ``Swish``,
    needs opset 24, which the vendor converters do not accept yet.
  - ``op``: the standard ``Swish`` (opset 24, ``alpha=1``); a graph below opset 24 is upgraded.
  - ``keep``: leave the two nodes.

- GELU in its Erf form ``0.5 * x * (1 + erf(x / sqrt(2)))`` in any of the exporters' arrangements:
  ``((x * (1+erf)) * 0.5)`` (TorchScript), ``x * (0.5 * (1+erf))`` (dynamo), ``(0.5 * x) * (1+erf)``,
  ``(x * (1+erf)) / 2``, with ``x / sqrt(2)`` or ``x * (1/sqrt(2))`` inside, any operand order. Option ``gelu``:

  - ``op`` (default): the standard ``Gelu`` (opset 20, ``approximate="none"``), which onnxruntime runs as
    one kernel and QNN maps to its Gelu op; a graph below opset 20 is upgraded with
    :func:`quadc.passes.qdq_insert.upgrade_opset` (weights stay on disk).
  - ``function``: one node ``quadc.Gelu(x)`` calling a local function with the Erf body, for graphs
    that must stay below opset 20.
  - ``keep``: leave the Erf form.

**Fusing**: a ``Conv`` — or a linear layer, ``Gemm`` / ``MatMul`` with a constant operand, which
``linear-to-conv`` turns into a Conv — whose output is read only by an activation (``Relu``, ``Clip``
with constant bounds, ``Sigmoid``, ``Tanh``, ``Gelu``, ``Swish``, ``quadc.SiLU``, ``quadc.Gelu``) keeps
the activation directly after it, and the pass records the layer's output in ``ctx.unquantized``: the
quantization planner gives it no encoding, so ``qdq-insert`` puts no Q/DQ between the pair and only
the activation's output is quantized (the layer and its activation are one quantized operation).

What each target gets:

- ``onnx`` (float): the graph with ``Gelu`` (opset >= 20) and ``quadc.SiLU`` nodes; layer+activation
  pairs are unchanged (ORT fuses Conv+activation itself). Numbers equal the input graph's.
- ``onnx-qdq``: the same graph with Q/DQ on each ``Gelu`` / ``quadc.SiLU`` input and output like any op
  (nothing inside a function node is quantized: it is one operation), and ``DQ -> Conv -> act -> Q``
  for every fused pair (no Q/DQ on the Conv output), the form onnxruntime's QDQ fusions and QNN's HTP
  backend take as one Conv with a fused activation.

Given::

    c = Conv(x, W, b)              # c read only by r
    r = Relu(c)
    s = Sigmoid(r)
    y = Mul(r, s)                  # SiLU
    e = Erf(Div(y, 1.4142135))
    g = Mul(Mul(y, Add(e, 1.0)), 0.5)

Result (defaults)::

    c = Conv(x, W, b)              # ctx.unquantized = {c}
    r = Relu(c)
    y = quadc.SiLU(r)              # function quadc.SiLU(x) { s = Sigmoid(x)  y = Mul(x, s) }
    g = Gelu(y)                    # opset 20
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.errors import QuadcError
from quadc.passes.base import GraphPass, PassOption, PassResult, register_pass
from quadc.passes.patterns import (
    Const,
    Match,
    Op,
    Rule,
    Var,
    applicable,
    apply_rules,
    const_value,
    match,
    replace_root,
)
from quadc.passes.qdq_insert import upgrade_opset

__all__ = ["QUADC_DOMAIN", "ConvActFusion", "fusable_pairs", "gelu_rules", "silu_rule"]

#: Domain of quadc's local functions (``quadc.SiLU``, ``quadc.Gelu``).
QUADC_DOMAIN = "quadc"
GELU_MODES = ("op", "function", "keep")
SILU_MODES = ("function", "op", "keep")
#: First standard opset with ``Gelu`` / ``Swish``.
OPSET_GELU = 20
OPSET_SWISH = 24
_SQRT2 = math.sqrt(2.0)
#: (domain, op) of the activations a layer fuses with.
ACTIVATIONS = {("", "Relu"), ("", "Clip"), ("", "Sigmoid"), ("", "Tanh"), ("", "Gelu"), ("", "Swish"),
               (QUADC_DOMAIN, "SiLU"), (QUADC_DOMAIN, "Gelu")}
_LAYERS = ("Conv", "Gemm", "MatMul")


def _scalar(value: np.ndarray, want: float) -> bool:
    return value.size == 1 and np.issubdtype(value.dtype, np.floating) and \
        abs(float(value.reshape(-1)[0]) - want) <= 1e-6 * max(1.0, abs(want))


# ------------------------------------------------------------------------------------------------ patterns
def silu_rule(rewrite: Callable[[gs.Graph, Match], None]) -> Rule:
    """``Mul(x, Sigmoid(x))`` in either order."""
    return Rule("silu", Op("Mul", Var("x"), Op("Sigmoid", Var("x")), commutative=True), rewrite)


def _one_plus_erf() -> Op:
    scaled = Op(("Div", "Mul"), Var("x"), Const("k"), name="scaled", commutative=True)
    return Op("Add", Op("Erf", scaled), Const("one"), commutative=True)


def _gelu_check(graph: gs.Graph, m: Match) -> str | None:
    scaled = m.nodes["scaled"]
    if scaled.op == "Div" and scaled.inputs[1] is not m.tensors["k"]:
        return "the Erf argument divides a constant by x"
    k = m.value("k")
    if not _scalar(k, _SQRT2 if scaled.op == "Div" else 1.0 / _SQRT2):
        return f"the Erf argument scales x by {k.reshape(-1)[:1]}, not 1/sqrt(2)"
    if not _scalar(m.value("one"), 1.0):
        return "1 + erf adds another constant"
    if not _scalar(m.value("half"), 2.0 if m.root.op == "Div" else 0.5):
        return "the product is not halved"
    return None


def gelu_rules(rewrite: Callable[[gs.Graph, Match], None]) -> list[Rule]:
    """The Erf form of GELU in the arrangements exporters write (see the module docstring)."""
    half = Const("half")
    patterns = {
        "gelu-x*(1+erf)*0.5": Op("Mul", Op("Mul", Var("x"), _one_plus_erf(), commutative=True), half,
                                 commutative=True),
        "gelu-x*(0.5*(1+erf))": Op("Mul", Var("x"), Op("Mul", half, _one_plus_erf(), commutative=True),
                                   commutative=True),
        "gelu-(0.5*x)*(1+erf)": Op("Mul", Op("Mul", Var("x"), half, commutative=True), _one_plus_erf(),
                                   commutative=True),
        "gelu-x*(1+erf)/2": Op("Div", Op("Mul", Var("x"), _one_plus_erf(), commutative=True), half),
    }
    return [Rule(name, pattern, rewrite, _gelu_check) for name, pattern in patterns.items()]


def _act_check(graph: gs.Graph, m: Match) -> str | None:
    act, layer = m.nodes["act"], m.nodes["layer"]
    if ((act.domain or ""), act.op) not in ACTIVATIONS:
        return f"{act.op} in domain {act.domain!r} is not a fusable activation"
    if act.op == "Clip" and any(t.name and const_value(t) is None for t in act.inputs[1:]):
        return "Clip bounds are not constants"
    if layer.op == "Gemm" and const_value(layer.inputs[1]) is None:
        return "Gemm has no constant weight"
    if layer.op == "MatMul" and all(const_value(t) is None for t in layer.inputs):
        return "MatMul multiplies two activations"
    return None


ACT_PATTERN = Op(tuple(sorted({op for _, op in ACTIVATIONS})), Op(_LAYERS, name="layer"), name="act")


def fusable_pairs(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node]]:
    """(layer, activation) pairs whose layer output only the activation reads."""
    pairs = []
    for node in graph.nodes:
        if node.op in ACT_PATTERN.op:
            m = match(node, ACT_PATTERN, graph)
            if m and _act_check(graph, m) is None:
                pairs.append((m.nodes["layer"], m.nodes["act"]))
    return pairs


# ------------------------------------------------------------------------------------------- functions
def _function(graph: gs.Graph, name: str, body: Callable[[gs.Variable], tuple[list[gs.Node], gs.Variable]]) -> None:
    """Add the local function ``quadc.<name>(x) -> y`` to the graph unless it has it."""
    if any(f.name == name and f.domain == QUADC_DOMAIN for f in graph.functions):
        return
    x = gs.Variable("x")
    nodes, y = body(x)
    fn = gs.Function(name, domain=QUADC_DOMAIN, nodes=nodes, inputs=[x], outputs=[y])
    fn.opset = int(graph.opset)
    graph.functions.append(fn)


def _silu_body(x: gs.Variable) -> tuple[list[gs.Node], gs.Variable]:
    s, y = gs.Variable("s"), gs.Variable("y")
    return [gs.Node("Sigmoid", inputs=[x], outputs=[s]), gs.Node("Mul", inputs=[x, s], outputs=[y])], y


def _gelu_body(x: gs.Variable) -> tuple[list[gs.Node], gs.Variable]:
    t = {n: gs.Variable(n) for n in ("sqrt2", "one", "half", "a", "e", "p", "h", "y")}

    def const(name: str, value: float) -> gs.Node:
        return gs.Node("Constant", attrs={"value": gs.Constant(name, np.array(value, np.float32))},
                       outputs=[t[name]])

    nodes = [const("sqrt2", _SQRT2), const("one", 1.0), const("half", 0.5),
             gs.Node("Div", inputs=[x, t["sqrt2"]], outputs=[t["a"]]),
             gs.Node("Erf", inputs=[t["a"]], outputs=[t["e"]]),
             gs.Node("Add", inputs=[t["e"], t["one"]], outputs=[t["p"]]),
             gs.Node("Mul", inputs=[x, t["p"]], outputs=[t["h"]]),
             gs.Node("Mul", inputs=[t["h"], t["half"]], outputs=[t["y"]])]
    return nodes, t["y"]


# ------------------------------------------------------------------------------------------------ the pass
@register_pass
class ConvActFusion(GraphPass):
    """Fuse Conv/linear + activation (no Q/DQ between them); SiLU -> quadc.SiLU, Erf-GELU -> Gelu."""

    name = "conv-act-fusion"
    requires = ("lora-inputs",)  # LoRA branches added later would land inside what this pass rewrote
    options = (
        PassOption("gelu", str, "op", "Erf-GELU becomes the opset-20 Gelu op (upgrading the graph), a quadc.Gelu "
                   "local function, or stays", choices=GELU_MODES),
        PassOption("silu", str, "function", "x*sigmoid(x) becomes a quadc.SiLU local function, the opset-24 "
                   "Swish op (upgrading the graph), or stays", choices=SILU_MODES),
    )

    def _rules(self) -> list[Rule]:
        rules: list[Rule] = []
        silu, gelu = self.opts["silu"], self.opts["gelu"]
        if silu != "keep":
            def to_silu(graph: gs.Graph, m: Match) -> None:
                if silu == "function":
                    _function(graph, "SiLU", _silu_body)
                    replace_root(graph, m, "SiLU", [m.tensors["x"]], domain=QUADC_DOMAIN)
                else:
                    replace_root(graph, m, "Swish", [m.tensors["x"]], attrs={"alpha": 1.0})
            rules.append(silu_rule(to_silu))
        if gelu != "keep":
            def to_gelu(graph: gs.Graph, m: Match) -> None:
                if gelu == "function":
                    _function(graph, "Gelu", _gelu_body)
                    replace_root(graph, m, "Gelu", [m.tensors["x"]], domain=QUADC_DOMAIN)
                else:
                    replace_root(graph, m, "Gelu", [m.tensors["x"]])
            rules.extend(gelu_rules(to_gelu))
        return rules

    def _opset_needed(self, graph: gs.Graph, rules: list[Rule]) -> int:
        """The opset the rewrites that apply need (0: none beyond the graph's)."""
        need = 0
        for rule in rules:
            wants = OPSET_SWISH if rule.name == "silu" and self.opts["silu"] == "op" else \
                OPSET_GELU if rule.name.startswith("gelu") and self.opts["gelu"] == "op" else 0
            if wants > max(need, int(graph.opset)) and applicable(graph, rule):
                need = wants
        return need

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        rules = self._rules()
        counts = {"silu": 0, "gelu": 0, "fused": 0, "opset_upgraded": 0}
        need = self._opset_needed(graph, rules)
        if need:
            try:
                upgrade_opset(graph, need)
            except QuadcError as exc:
                raise QuadcError(f"conv-act-fusion cannot upgrade the graph to opset {need} ({exc}); set "
                                 "conv-act-fusion.gelu=function and silu=function to keep the opset") from None
            counts["opset_upgraded"] = 1
        applied = apply_rules(graph, rules) if rules else {}
        counts["silu"] = applied.get("silu", 0)
        counts["gelu"] = sum(n for k, n in applied.items() if k.startswith("gelu"))
        for layer, _ in fusable_pairs(graph):
            name = layer.outputs[0].name
            if name not in ctx.unquantized:
                ctx.unquantized.add(name)
                counts["fused"] += 1
        changed = any(counts.values())
        if counts["silu"] or counts["gelu"]:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed, counts)

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        failed = []
        for rule in self._rules():
            left = applicable(graph, rule)
            if left:
                failed.append(f"no {rule.name} pattern is left (found at {left[0].root.name})")
        loose = [layer.outputs[0].name for layer, _ in fusable_pairs(graph)
                 if layer.outputs[0].name not in ctx.unquantized]
        if loose:
            failed.append(f"every layer output read only by its activation is in ctx.unquantized (not {loose[0]})")
        return failed
