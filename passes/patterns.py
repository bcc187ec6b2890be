"""The one small pattern layer the rewriting passes share: a pattern, a check that says why it did not
match, and a replacement — the shape of onnxscript's rewriter, over onnx-graphsurgeon graphs.

onnxscript's rewriter itself works on ``onnx_ir`` models; using it here would mean converting the
graph gs -> proto -> onnx_ir -> proto -> gs around every pass, and on the full U-Net the proto step
materializes 3.4 GB of weights that quadc's graph layer otherwise keeps on disk. So the idea is kept and
the code is this module (about 200 lines).

A pattern is a tree of :class:`Op` (an op type and its input patterns), :class:`Var` (any tensor; the
same name must bind the same tensor), :class:`Const` (a constant, optionally checked by a predicate),
:class:`OneOf` (the first of several alternatives that matches) and ``None`` (anything). :func:`match` tries a pattern at a node and returns a :class:`Match` or a
:class:`NoMatch` whose ``reason`` says what differed. A :class:`Rule` adds a check and a rewrite;
:func:`apply_rules` runs rules over a graph until none applies, and :func:`explain` lists why a rule did
not apply at each candidate node (for debugging a pass on a new exporter). :func:`apply_rules_worklist`
is the same loop for rules that move things along the graph (a Transpose sinking op by op): it revisits
only the nodes around each rewrite, so a pass stays linear in the graph size. :func:`static_value`
evaluates a tensor computed from constants and static shapes (``Shape`` of a tensor whose shape is known,
as TorchScript writes the attention scale), and :func:`outside_uses` says which tensors of a set of nodes
are read elsewhere (what a rewrite that drops those nodes must not orphan).

Example — SiLU written as ``x * sigmoid(x)``::

    silu = Op("Mul", Var("x"), Op("Sigmoid", Var("x"), name="sig"), name="mul", commutative=True)
    m = match(node, silu)          # m.tensors["x"], m.nodes["sig"], m.nodes["mul"]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["Const", "Match", "NoMatch", "OneOf", "Op", "Rule", "Var", "applicable", "apply_rules",
           "apply_rules_worklist", "bypass", "const_value", "explain", "is_removed", "match", "outside_uses",
           "producer", "remove_node", "replace_root", "single_consumer", "static_value"]


@dataclass(frozen=True)
class Var:
    """Any tensor, bound under ``name`` (a second use of the name must be the same tensor)."""

    name: str


@dataclass(frozen=True)
class Const:
    """A constant tensor (an initializer, or a ``Constant`` node's output), optionally checked."""

    name: str
    check: Callable[[np.ndarray], bool] | None = None


@dataclass(frozen=True)
class Op:
    """A node of type ``op`` whose inputs match ``inputs`` (``None`` matches anything). ``commutative``
    also tries the two inputs swapped; ``one_use`` requires the node's output to have one consumer
    (ignored for the pattern's root); ``attrs`` must equal the node's attributes where given; ``domain``,
    where given, must be the node's domain (``""`` for standard ONNX ops)."""

    op: str | tuple[str, ...]
    inputs: tuple[Any, ...] = ()
    name: str | None = None
    attrs: dict[str, Any] | None = None
    commutative: bool = False
    one_use: bool = True
    domain: str | None = None

    def __init__(self, op: str | tuple[str, ...], *inputs: Any, name: str | None = None,
                 attrs: dict[str, Any] | None = None, commutative: bool = False, one_use: bool = True,
                 domain: str | None = None) -> None:
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "inputs", tuple(inputs))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "attrs", attrs)
        object.__setattr__(self, "commutative", commutative)
        object.__setattr__(self, "one_use", one_use)
        object.__setattr__(self, "domain", domain)


@dataclass(frozen=True)
class OneOf:
    """The first of ``alternatives`` (patterns) that matches the tensor; e.g. an optional scale:
    ``OneOf(Op("Mul", x, Const("c")), x)``."""

    alternatives: tuple[Any, ...]

    def __init__(self, *alternatives: Any) -> None:
        object.__setattr__(self, "alternatives", tuple(alternatives))


@dataclass
class Match:
    """What a pattern bound: nodes by ``Op.name``, tensors by ``Var``/``Const`` name; ``data`` is where
    a rule's check leaves what it worked out for its rewrite (so the rewrite does not redo it)."""

    root: gs.Node
    nodes: dict[str, gs.Node] = field(default_factory=dict)
    tensors: dict[str, gs.Tensor] = field(default_factory=dict)
    graph_outputs: frozenset[int] = frozenset()
    data: dict[str, Any] = field(default_factory=dict)

    def value(self, name: str) -> np.ndarray:
        """The value of a bound constant."""
        v = const_value(self.tensors[name])
        assert v is not None, f"{name} is not a constant"
        return v


@dataclass
class NoMatch:
    """Why a pattern did not match (falsy, so ``if match(...)`` reads naturally)."""

    reason: str

    def __bool__(self) -> bool:
        return False


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that produces ``tensor`` (None for graph inputs and initializers)."""
    return tensor.inputs[0] if tensor.inputs else None


def single_consumer(tensor: gs.Tensor, graph: gs.Graph | None = None) -> bool:
    """Whether ``tensor`` has exactly one consumer and is not a graph output."""
    return len(tensor.outputs) == 1 and (graph is None or tensor not in graph.outputs)


def is_removed(node: gs.Node) -> bool:
    """Whether a rewrite disconnected ``node`` (see :func:`remove_node`); cleanup drops it later."""
    return not node.inputs and not node.outputs


def remove_node(node: gs.Node) -> None:
    """Disconnect ``node`` from its input and output tensors (``graph.cleanup`` drops it later)."""
    node.inputs.clear()
    node.outputs.clear()


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or ``Constant`` node output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is not None and node.op == "Constant" and "value" in node.attrs:
        return np.asarray(node.attrs["value"].values)
    return None


def _match_tensor(tensor: gs.Tensor, pattern: Any, m: Match, path: str) -> str | None:
    if pattern is None:
        return None
    if isinstance(pattern, OneOf):
        reasons = []
        for alternative in pattern.alternatives:
            trial = Match(m.root, dict(m.nodes), dict(m.tensors), m.graph_outputs)
            reason = _match_tensor(tensor, alternative, trial, path)
            if reason is None:
                m.nodes.update(trial.nodes)
                m.tensors.update(trial.tensors)
                return None
            reasons.append(reason)
        return " / ".join(reasons)
    if isinstance(pattern, Var):
        bound = m.tensors.get(pattern.name)
        if bound is not None and bound is not tensor:
            return f"{path}: '{pattern.name}' is bound to another tensor ({bound.name} vs {tensor.name})"
        m.tensors[pattern.name] = tensor
        return None
    if isinstance(pattern, Const):
        value = const_value(tensor)
        if value is None:
            return f"{path}: {tensor.name} is not a constant"
        if pattern.check is not None and not pattern.check(value):
            return f"{path}: constant {tensor.name} fails the check of '{pattern.name}'"
        m.tensors[pattern.name] = tensor
        return None
    node = producer(tensor)
    if node is None:
        return f"{path}: {tensor.name} has no producer (wanted {pattern.op})"
    uses = len(tensor.outputs) + (id(tensor) in m.graph_outputs)
    if uses != 1 and pattern.one_use:
        return f"{path}: {tensor.name} has {uses} uses (wanted one, for {pattern.op})"
    return _match_node(node, pattern, m, path)


def _match_node(node: gs.Node, pattern: Op, m: Match, path: str) -> str | None:
    ops = (pattern.op,) if isinstance(pattern.op, str) else pattern.op
    if node.op not in ops:
        return f"{path}: {node.name or node.op} is {node.op}, wanted {'|'.join(ops)}"
    if pattern.domain is not None and (node.domain or "") != pattern.domain:
        return f"{path}: {node.name or node.op} is in domain {node.domain or '(onnx)'!r}, wanted {pattern.domain!r}"
    for key, want in (pattern.attrs or {}).items():
        got = node.attrs.get(key)
        if (list(got) if isinstance(got, list | tuple) else got) != (list(want) if isinstance(want, list | tuple) else want):
            return f"{path}: {node.name or node.op} has {key}={got!r}, wanted {want!r}"
    if pattern.inputs and len(node.inputs) < len(pattern.inputs):
        return f"{path}: {node.name or node.op} has {len(node.inputs)} inputs, wanted {len(pattern.inputs)}"
    orders = [pattern.inputs]
    if pattern.commutative and len(pattern.inputs) == 2:
        orders.append(pattern.inputs[::-1])
    first_reason = None
    for order in orders:
        trial = Match(m.root, dict(m.nodes), dict(m.tensors), m.graph_outputs)
        reason = None
        for i, sub in enumerate(order):
            reason = _match_tensor(node.inputs[i], sub, trial, f"{path}/{node.op}[{i}]")
            if reason:
                break
        if reason is None:
            m.nodes.update(trial.nodes)
            m.tensors.update(trial.tensors)
            if pattern.name:
                m.nodes[pattern.name] = node
            return None
        first_reason = first_reason or reason
    return first_reason  # why the inputs in the declared order did not match


def match(node: gs.Node, pattern: Op, graph: gs.Graph | None = None) -> Match | NoMatch:
    """Match ``pattern`` with its root at ``node``; with ``graph``, a graph output counts as a use of
    its tensor (so an intermediate that is also a graph output is not swallowed)."""
    m = Match(node, graph_outputs=frozenset(id(t) for t in graph.outputs) if graph is not None else frozenset())
    reason = _match_node(node, pattern, m, "")
    return NoMatch(reason) if reason else m


@dataclass
class Rule:
    """A rewrite: ``pattern`` (rooted at the node tried), ``check(graph, match)`` returning why it must
    not apply (``None``: apply) and ``rewrite(graph, match)`` that edits the graph in place (and may
    return the nodes it created or touched, for :func:`apply_rules_worklist`)."""

    name: str
    pattern: Op
    rewrite: Callable[[gs.Graph, Match], Iterable[gs.Node] | None]
    check: Callable[[gs.Graph, Match], str | None] = lambda graph, m: None


def _candidates(graph: gs.Graph, rule: Rule) -> list[gs.Node]:
    ops = (rule.pattern.op,) if isinstance(rule.pattern.op, str) else rule.pattern.op
    return [n for n in graph.nodes if n.op in ops]


def apply_rules(graph: gs.Graph, rules: Sequence[Rule], *, max_rounds: int = 32) -> dict[str, int]:
    """Apply every rule wherever it matches and its check passes, repeating until nothing applies;
    returns how often each rule applied. The graph is cleaned up and sorted after each round."""
    counts = {r.name: 0 for r in rules}
    for _ in range(max_rounds):
        applied = 0
        for rule in rules:
            for node in _candidates(graph, rule):
                if is_removed(node):
                    continue  # removed by an earlier rewrite this round
                m = match(node, rule.pattern, graph)
                if not m or rule.check(graph, m) is not None:
                    continue
                rule.rewrite(graph, m)
                counts[rule.name] += 1
                applied += 1
        if not applied:
            return counts
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    raise RuntimeError(f"rules {[r.name for r in rules]} still apply after {max_rounds} rounds")


def applicable(graph: gs.Graph, rule: Rule) -> list[Match]:
    """Every match of ``rule`` whose check passes, without rewriting (e.g. to decide on work before it)."""
    found = []
    for node in _candidates(graph, rule):
        m = match(node, rule.pattern, graph)
        if m and rule.check(graph, m) is None:
            found.append(m)
    return found


def _neighbours(node: gs.Node) -> list[gs.Node]:
    """``node``, the producers of its inputs, its consumers, and the producers of their other inputs."""
    out = [node]
    out.extend(p for t in node.inputs if (p := producer(t)) is not None)
    for t in node.outputs:
        for consumer in t.outputs:
            out.append(consumer)
            out.extend(p for u in consumer.inputs if (p := producer(u)) is not None)
    return out


def apply_rules_worklist(graph: gs.Graph, rules: Sequence[Rule], *, max_steps: int | None = None) -> dict[str, int]:
    """Apply ``rules`` until none applies, visiting nodes from a worklist: every node once in graph order,
    then the nodes around each rewrite again. A rewrite may return the nodes it created or touched (else
    the root's neighbourhood is revisited). Rules are tried in order at each node; the first that
    applies wins. Removed nodes are disconnected, not deleted: the caller cleans the graph up. Returns
    how often each rule applied; raises if more than ``max_steps`` rewrites (default 50 per node) happen."""
    by_op: dict[str, list[Rule]] = {}
    for rule in rules:
        for op in (rule.pattern.op,) if isinstance(rule.pattern.op, str) else rule.pattern.op:
            by_op.setdefault(op, []).append(rule)
    counts = {r.name: 0 for r in rules}
    queue = deque(graph.nodes)
    queued = {id(n) for n in queue}
    limit = max_steps if max_steps is not None else 50 * max(len(graph.nodes), 1)
    steps = 0
    while queue:
        node = queue.popleft()
        queued.discard(id(node))
        if is_removed(node):
            continue
        for rule in by_op.get(node.op, ()):
            m = match(node, rule.pattern, graph)
            if not m or rule.check(graph, m) is not None:
                continue
            around = _neighbours(node)
            touched = rule.rewrite(graph, m)
            counts[rule.name] += 1
            steps += 1
            if steps > limit:
                raise RuntimeError(f"rules {[r.name for r in rules]} still apply after {limit} rewrites")
            for n in [*around, *(touched or ())]:
                for near in _neighbours(n) if not is_removed(n) else ():
                    if id(near) not in queued and not is_removed(near):
                        queued.add(id(near))
                        queue.append(near)
            break
    return counts


def explain(graph: gs.Graph, rule: Rule, nodes: Iterable[gs.Node] | None = None) -> dict[str, str]:
    """Why ``rule`` does not apply: node name -> reason, for every candidate node it does not apply to."""
    out: dict[str, str] = {}
    for node in nodes if nodes is not None else _candidates(graph, rule):
        m = match(node, rule.pattern, graph)
        reason = m.reason if isinstance(m, NoMatch) else rule.check(graph, m)
        if reason:
            out[node.name or f"<{node.op}>"] = reason
    return out


def _static_shape(tensor: gs.Tensor) -> list[int] | None:
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int | np.integer) and d >= 0 for d in shape):
        return None
    return [int(d) for d in shape]


def static_value(tensor: gs.Tensor, opset: int, *, max_nodes: int = 32) -> tuple[np.ndarray, list[gs.Node]] | None:
    """The value of ``tensor`` when it depends only on constants and on static shapes (``Shape`` of a
    tensor whose ``shape`` is known), with the nodes that compute it; None otherwise. The nodes are
    evaluated with onnx's reference evaluator at ``opset``; the graph is not changed."""
    value = const_value(tensor)
    if value is not None:
        node = producer(tensor)
        return value, [node] if node is not None else []
    nodes: list[gs.Node] = []
    leaves: dict[str, np.ndarray] = {}
    seen: set[int] = set()

    def visit(t: gs.Tensor) -> bool:
        if not t.name or t.name in leaves:
            return True
        node = producer(t)
        known = const_value(t)
        if known is not None:
            leaves[t.name] = known
            if node is not None and id(node) not in seen:  # a Constant node
                seen.add(id(node))
                nodes.append(node)
            return True
        if node is None or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return False
        if id(node) in seen:
            return True
        seen.add(id(node))
        if len(seen) > max_nodes:
            return False
        if node.op == "Shape":
            shape = _static_shape(node.inputs[0])
            if shape is None:
                return False
            start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
            leaves[t.name] = np.asarray(shape[start:end], np.int64)
            nodes.append(node)
            return True
        if not all(visit(i) for i in node.inputs):
            return False
        nodes.append(node)
        return True

    if not visit(tensor):
        return None
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    computed = [n for n in nodes if n.op not in ("Shape", "Constant")]
    proto = helper.make_graph(
        [OnnxExporter.export_node(n) for n in computed], "static_value", [],
        [helper.make_value_info(tensor.name, helper.TypeProto())],
        initializer=[numpy_helper.from_array(np.asarray(v), name) for name, v in leaves.items()])
    model = helper.make_model(proto, opset_imports=[helper.make_opsetid("", opset)])
    try:
        result = ReferenceEvaluator(model).run(None, {})[0]
    except Exception:  # an op the reference evaluator cannot run: not static for our purposes
        return None
    return np.asarray(result), nodes


def outside_uses(nodes: Iterable[gs.Node], exits: Iterable[gs.Tensor] = (), graph: gs.Graph | None = None) -> list[str]:
    """Names of the tensors produced by ``nodes`` that something else reads (a node not in ``nodes``, or
    a graph output), ``exits`` excepted: what would be orphaned if a rewrite dropped ``nodes``."""
    inside = {id(n) for n in nodes}
    allowed = {id(t) for t in exits}
    outputs = {id(t) for t in graph.outputs} if graph is not None else set()
    names = []
    for node in nodes:
        for t in node.outputs:
            if id(t) in allowed:
                continue
            if id(t) in outputs or any(id(user) not in inside for user in t.outputs):
                names.append(t.name)
    return names


def replace_root(graph: gs.Graph, m: Match, op: str, inputs: Sequence[gs.Tensor], *, name: str | None = None,
                 attrs: dict[str, Any] | None = None, domain: str | None = None) -> gs.Node:
    """Replace the matched subgraph by one node ``op(inputs)``: it takes over the root's output tensors
    (names, consumers and graph-output places stay), the root is detached, and matched nodes nothing else
    reads are dropped by the next cleanup. Returns the new node (named ``name``, else like the root)."""
    outputs = list(m.root.outputs)
    m.root.outputs.clear()
    m.root.inputs.clear()
    node = gs.Node(op, name if name is not None else m.root.name, attrs=dict(attrs or {}), inputs=list(inputs),
                   outputs=outputs)
    if domain:
        node.domain = domain
    graph.nodes.append(node)
    return node


def bypass(graph: gs.Graph, node: gs.Node, source: gs.Tensor) -> str | None:
    """Remove ``node``, whose (only) output equals ``source``: its consumers read ``source`` instead. When the
    output is a graph output, ``source`` takes its name, type and place, which needs ``source`` to be a
    node output read only by ``node``. Returns why it cannot (``None``: done)."""
    out = node.outputs[0]
    if out in graph.outputs:
        if producer(source) is None or len(source.outputs) != 1 or source in graph.outputs:
            return f"{out.name} is a graph output and {source.name} is not a node output read only by {node.name}"
        graph.outputs[graph.outputs.index(out)] = source
        name = out.name
        out.name = f"{name}/bypassed"
        source.name, source.dtype, source.shape = name, out.dtype, out.shape
    for consumer in list(out.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is out:
                consumer.inputs[i] = source
    node.outputs.clear()
    node.inputs.clear()
    return None
