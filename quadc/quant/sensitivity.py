"""End-to-end A8 sensitivity: which activations can take 8 bits, judged by the model's output.

A tensor's own 8-bit SQNR does not say how its error grows downstream (an 8-bit timestep has a fine SQNR
and ruins every resnet). Here the cost of making a **group** of activations 8-bit is the relative error it
causes in the graph's outputs, over calibration runs that cover the base model and every task:

    cost(g) = mean over runs r of  ||y_r(g at 8 bits) - y_r||^2 / ||y_r||^2

where ``y_r`` is the output with every activation at its 16-bit encoding (the W8A16 graph, fake-quantized)
and ``y_r(g)`` the same with group ``g`` at its 8-bit encoding.

**One graph, switched per tensor.** :class:`SwitchedGraph` fake-quantizes every candidate activation in
one onnxruntime session: each tensor's scale, zero point and integer limits are chosen by ``Where(switch,
8-bit, 16-bit)``, ``switch`` a boolean graph input, so every measurement (a group, a whole choice) reuses
the same session and only the switches change (``y = (clip(round(x / s) + z, lo, hi) - z) * s``, what
``QuantizeLinear -> DequantizeLinear`` computes).

**Units.** A tensor and those that movement operators (``Reshape``, ``Transpose``, ...) make from it hold
the same values and get the same encoding: once the first is 8-bit the others cost nothing, so they are
chosen together (:func:`movement_units`).

**Every unit alone, where it is affordable.** When the budget covers every unit (``max_groups=0`` on a
graph of at most :data:`PER_UNIT_LIMIT` candidates: the tiny U-Net's 546 units), each unit is measured alone
and ranked by its own measured cost: on the trained fixtures the group estimate below misranked units
inside a group (held-out drop at F = 0.6: -2.6 dB with 24 groups, -1.2 dB per unit); re-measuring the
remaining units' costs in rounds with the chosen ones at 8 bits gained nothing over that one-shot ranking
(interactions are small), so it is not done.

**Groups, refined where the error is (larger graphs).** Units are grouped by the module path in their producer's name
(``/down_blocks.1/attentions.0/...``, :func:`tensor_paths`). The top-level modules (``down_blocks.0``,
``mid_block``, ...) are measured first; then, while the budget (``max_groups`` measured groups) lasts, the
group with the largest cost x tensors is split into its sub-modules (down to single units), which are
measured in turn. Each unit's cost is then estimated as its finest group's **gain** (cost per unit of
injected noise energy, ``cost(g) / sum of the 8-bit noise energies of g's units``) times its own 8-bit noise
energy ``sum (x - fq8(x))^2`` (:func:`noise_energy`, one more pass over the runs).

**Choice.** Two greedy choices up to the ``k`` tensors asked for: units by estimated cost per tensor, and
measured groups by cost per tensor (cheapest first, while they fit). Both are measured as a whole and the
one with the smaller output error wins (``A8Choice.method``). A plan so runs ``runs x (3 + measured
groups)`` forwards plus one noise pass, whatever the model's size: with 4 tasks (5 runs) and
``max_groups=24``, 135 forwards; ``runs=1``, 27; every unit of the tiny U-Net: 2,745. A group measured by
an earlier plan in the same process with the same graph, encodings and runs (another fraction) is not
measured again.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import silent_progress
from quadc.errors import QuadcError
from quadc.graph import infer_shapes, ort_session, unique_name
from quadc.quant.affine import Encoding, fake_quant
from quadc.quant.calibrate import BASE, _runs, clone_graph

__all__ = ["A8Choice", "MOVEMENT_OPS", "SwitchedGraph", "choose_a8", "movement_units", "noise_energy", "sample_runs",
           "tensor_paths"]

SWITCH_PREFIX = "__quadc_a8_switch/"
#: With ``max_groups=0``, graphs of at most this many candidate activations (the tiny U-Net: 668) get every
#: unit measured alone (546 units x 5 runs: 2,730 forwards, about 40 s on 2 cores); larger ones (the full
#: SD1.5 U-Net: 2,000+) 24 groups, so the plan stays within a few dozen forwards per run.
PER_UNIT_LIMIT = 1000
_PART = re.compile(r"[^/]+")


def tensor_paths(graph: gs.Graph, names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each tensor's place in the module hierarchy: its producer's module path (the node name's parts
    before the last, ``/a/b/Conv`` -> ``("a", "b")``) followed by the tensor itself; graph inputs are
    top-level."""
    producer = {o.name: node for node in graph.nodes for o in node.outputs if o.name}
    paths = {}
    for name in names:
        node = producer.get(name)
        parts = _PART.findall(node.name or "")[:-1] if node is not None else []
        paths[name] = (*parts, name)
    return paths


def sample_runs(n_feeds: int, tasks: Sequence[str | None], count: int) -> list[tuple[int, str | None]]:
    """``count`` (feed index, task) runs (``None`` = base model) spread over feeds and tasks: run ``i``
    takes feed ``i mod n_feeds`` and task ``i mod len(tasks)``, so the first ``len(tasks)`` runs cover
    every task, each on another feed where there are enough."""
    if n_feeds < 1 or not tasks:
        raise QuadcError("A8 sensitivity needs at least one calibration feed")
    total = n_feeds * len(tasks)
    runs = []
    seen = set()
    i = 0
    while len(runs) < min(count, total):
        pair = (i % n_feeds, tasks[i % len(tasks)])
        if pair not in seen:  # when n_feeds and len(tasks) share a factor the cycle repeats: shift a feed
            seen.add(pair)
            runs.append(pair)
        else:
            pair = next(((f, tasks[i % len(tasks)]) for f in range(n_feeds)
                         if (f, tasks[i % len(tasks)]) not in seen), None)
            if pair is not None:
                seen.add(pair)
                runs.append(pair)
        i += 1
        if i > 4 * total:
            break
    return runs


class SwitchedGraph:
    """``graph`` with every tensor of ``groups`` fake-quantized at its 16-bit encoding, or at its 8-bit one
    where its group's switch is on; one onnxruntime session for every measurement."""

    def __init__(self, graph: gs.Graph, groups: Mapping[str, str], enc16: Mapping[str, Encoding],
                 enc8: Mapping[str, Encoding]) -> None:
        """``groups``: tensor name -> switch name (tensors sharing a switch go 8-bit together)."""
        aug = clone_graph(graph)
        tensors = aug.tensors()
        typed = infer_shapes(clone_graph(graph)).tensors()
        taken = set(tensors) | {n.name for n in aug.nodes}
        self.switches: dict[str, str] = {}
        for switch in dict.fromkeys(groups.values()):
            var = gs.Variable(unique_name(aug, SWITCH_PREFIX + switch, taken), dtype=np.bool_, shape=[])
            aug.inputs.append(var)
            self.switches[switch] = var.name
        switch_vars = {t.name: t for t in aug.inputs}
        consumers: dict[str, list[gs.Node]] = {}
        for node in aug.nodes:
            for t in node.inputs:
                if t.name:
                    consumers.setdefault(t.name, []).append(node)
        for name, switch in groups.items():
            if name not in tensors:
                raise QuadcError(f"tensor '{name}' has an encoding but is not in the graph")
            for enc in (enc16[name], enc8[name]):
                if enc.per_channel:
                    raise QuadcError(f"A8 sensitivity takes per-tensor encodings; '{name}' is per-channel")
            users = consumers.get(name, [])
            out = self._fake_quant(aug, tensors[name], typed[name].dtype, switch_vars[self.switches[switch]],
                                   enc16[name], enc8[name], taken)
            for node in users:
                node.inputs = [out if t is tensors[name] else t for t in node.inputs]
            aug.outputs = [out if t is tensors[name] else t for t in aug.outputs]
        self.outputs = [t.name for t in aug.outputs]
        self.session = ort_session(aug)

    @staticmethod
    def _fake_quant(aug: gs.Graph, x: gs.Tensor, dtype: Any, switch: gs.Variable, e16: Encoding, e8: Encoding,
                    taken: set[str]) -> gs.Variable:
        def var(tag: str, dt: Any = np.float32) -> gs.Variable:
            return gs.Variable(unique_name(aug, f"{x.name}__quadc_a8_{tag}", taken), dtype=dt)

        def const(tag: str, value: float) -> gs.Constant:
            return gs.Constant(unique_name(aug, f"{x.name}__quadc_a8_{tag}", taken), np.array(value, np.float32))

        def node(op: str, inputs: list[gs.Tensor], tag: str, dt: Any = np.float32, **attrs: Any) -> gs.Variable:
            out = var(tag, dt)
            aug.nodes.append(gs.Node(op, f"{out.name}/node", attrs=attrs, inputs=inputs, outputs=[out]))
            return out

        def pick(tag: str, v16: float, v8: float) -> gs.Variable:
            return node("Where", [switch, const(tag + "8", v8), const(tag + "16", v16)], tag)

        f32 = np.dtype(dtype or np.float32) == np.float32
        src = x if f32 else node("Cast", [x], "f32", to=1)
        s = pick("s", float(e16.scale), float(e8.scale))
        z = pick("z", float(e16.zero_point), float(e8.zero_point))
        lo = pick("lo", e16.qtype.qmin, e8.qtype.qmin)
        hi = pick("hi", e16.qtype.qmax, e8.qtype.qmax)
        q = node("Add", [node("Round", [node("Div", [src, s], "div")], "round"), z], "q")
        y = node("Mul", [node("Sub", [node("Clip", [q, lo, hi], "clip"), z], "sub"), s], "y")
        if f32:
            return y
        return node("Cast", [y], "back", dt=np.dtype(dtype), to=int(_onnx_type(dtype)))

    def run(self, bound: Mapping[str, np.ndarray], on: Sequence[str] = ()) -> list[np.ndarray]:
        """The graph's outputs for the inputs ``bound`` with the switches in ``on`` set (8-bit)."""
        feed = dict(bound)
        on_set = set(on)
        for switch, name in self.switches.items():
            feed[name] = np.array(switch in on_set)
        return self.session.run(self.outputs, feed)


def _onnx_type(dtype: Any) -> int:
    import onnx

    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


@dataclass
class A8Choice:
    """The chosen 8-bit tensors and how they were chosen (for the plan's report)."""

    tensors: list[str]
    #: Measured group -> (tensor count, cost = mean relative output error energy with it at 8 bits).
    costs: dict[str, tuple[int, float]] = field(default_factory=dict)
    chosen_groups: list[str] = field(default_factory=list)
    runs: int = 0
    forwards: int = 0
    #: Relative output error energy of the chosen set: the sum of the tensors' estimates, and measured.
    predicted: float = 0.0
    measured: float = 0.0
    #: Which greedy choice won ("per tensor" or "per group").
    method: str = ""


def noise_energy(graph: gs.Graph, enc8: Mapping[str, Encoding], bound_runs: Sequence[Mapping[str, np.ndarray]],
                 names: Sequence[str]) -> dict[str, float]:
    """Each tensor's own 8-bit quantization noise energy ``sum (x - fq8(x))^2``, summed over the runs (node
    outputs through ``QuantizeLinear -> DequantizeLinear`` taps in one session, graph inputs in numpy)."""
    inputs = {t.name for t in graph.inputs}
    aug = clone_graph(graph)
    tensors = aug.tensors()
    typed = infer_shapes(clone_graph(graph)).tensors()
    taken = set(tensors) | {n.name for n in aug.nodes}
    inner = [n for n in names if n not in inputs]
    taps = []
    for name in inner:
        enc = enc8[name]
        x: gs.Tensor = tensors[name]

        def var(tag: str, dt: Any = np.float32, name: str = name) -> gs.Variable:
            return gs.Variable(unique_name(aug, f"{name}__quadc_n8_{tag}", taken), dtype=dt)

        if np.dtype(typed[name].dtype or np.float32) != np.float32:
            f = var("f32")
            aug.nodes.append(gs.Node("Cast", f"{f.name}/node", attrs={"to": 1}, inputs=[x], outputs=[f]))
            x = f
        scale = gs.Constant(unique_name(aug, f"{name}__quadc_n8_s", taken), np.array(enc.scale, np.float32))
        zp = gs.Constant(unique_name(aug, f"{name}__quadc_n8_z", taken), np.array(enc.zero_point))
        q, dq, diff, tap = var("q", enc.qtype.np_dtype), var("dq"), var("err"), var("sum")
        aug.nodes.append(gs.Node("QuantizeLinear", f"{q.name}/node", inputs=[x, scale, zp], outputs=[q]))
        aug.nodes.append(gs.Node("DequantizeLinear", f"{dq.name}/node", inputs=[q, scale, zp], outputs=[dq]))
        aug.nodes.append(gs.Node("Sub", f"{diff.name}/node", inputs=[x, dq], outputs=[diff]))
        aug.nodes.append(gs.Node("ReduceSumSquare", f"{tap.name}/node", attrs={"keepdims": 0}, inputs=[diff],
                                 outputs=[tap]))
        taps.append(tap)
    aug.outputs = taps
    import onnxruntime as ort

    session = ort_session(aug, graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC) if taps else None
    energy = dict.fromkeys(names, 0.0)
    for bound in bound_runs:
        if session is not None:
            for name, value in zip(inner, session.run([t.name for t in taps], dict(bound)), strict=True):
                energy[name] += float(value)
        for name in names:
            if name in inputs:
                arr = np.asarray(bound[name], np.float32)
                energy[name] += float(np.sum(np.square(arr.astype(np.float64) - fake_quant(arr, enc8[name]))))
    return energy


#: Operators that copy values (same min/max): a tensor they make from a candidate is 8-bit for free once
#: that candidate is, since requantizing a value already on the same grid changes nothing.
MOVEMENT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


def movement_units(graph: gs.Graph, candidates: Sequence[str]) -> list[list[str]]:
    """``candidates`` partitioned into units chosen together: a tensor and those that movement operators
    (:data:`MOVEMENT_OPS`) make from it, first tensor first (graph order), the others alone."""
    wanted = set(candidates)
    parent = {n: n for n in candidates}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in graph.nodes:
        if node.op in MOVEMENT_OPS and node.inputs and node.outputs:
            src, dst = node.inputs[0].name, node.outputs[0].name
            if src in wanted and dst in wanted:
                parent[find(dst)] = find(src)
    units: dict[str, list[str]] = {}
    for n in candidates:
        units.setdefault(find(n), []).append(n)
    return list(units.values())


#: Measured costs of recent plans (fingerprint of graph, encodings and runs -> group -> cost): compiling
#: one model at several fractions measures each group once. Only the last few fingerprints are kept.
_MEMO: OrderedDict[str, dict[tuple[str, ...], float]] = OrderedDict()
_MEMO_KEEP = 2


def _measured(graph: gs.Graph, candidates: Sequence[str], enc16: Mapping[str, Encoding],
              enc8: Mapping[str, Encoding], bound_runs: Sequence[Mapping[str, np.ndarray]]
              ) -> dict[tuple[str, ...], float]:
    """The cost table of this exact measurement setting (empty the first time): keyed by a digest of the
    graph (nodes and constant values), the candidates' encodings and the runs' inputs."""
    h = hashlib.blake2b(digest_size=20)
    for node in graph.nodes:
        h.update(f"{node.op}|{node.name}|{[t.name for t in node.inputs]}|{[t.name for t in node.outputs]}|"
                 f"{sorted(node.attrs.items(), key=lambda kv: kv[0])!r}".encode())
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                h.update(np.ascontiguousarray(t.values).tobytes())
    for n in candidates:
        for enc in (enc16[n], enc8[n]):
            h.update(f"{n}|{float(enc.scale)}|{float(enc.zero_point)}|{enc.qtype}".encode())
    for bound in bound_runs:
        for name in sorted(bound):
            h.update(name.encode())
            h.update(np.ascontiguousarray(bound[name]).tobytes())
    key = h.hexdigest()
    if key not in _MEMO:
        _MEMO[key] = {}
        while len(_MEMO) > _MEMO_KEEP:
            _MEMO.popitem(last=False)
    _MEMO.move_to_end(key)
    return _MEMO[key]


def _relative_error(out: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> float:
    noise = sum(float(np.sum(np.square(o.astype(np.float64) - r))) for o, r in zip(out, ref, strict=True))
    signal = sum(float(np.sum(np.square(r.astype(np.float64)))) for r in ref)
    return noise / signal if signal > 0 else noise


def _key(path: tuple[str, ...]) -> str:
    return "/".join(path) or "."


def choose_a8(graph: gs.Graph, candidates: Sequence[str], k: int, enc16: Mapping[str, Encoding],
              enc8: Mapping[str, Encoding], feeds: Sequence[Mapping[str, np.ndarray]],
              tasks: Mapping[str, Mapping[str, np.ndarray]], *, runs: int = 0, max_groups: int = 0,
              progress: Callable[[str], None] = silent_progress) -> A8Choice:
    """Up to ``k`` of ``candidates`` to make 8-bit, least output error first (see the module docstring).

    ``runs``: how many (feed, task) calibration runs each measurement covers (0: one per task and one of
    the base model, :func:`sample_runs`); ``max_groups``: at most this many groups are measured (0: every
    unit alone up to :data:`PER_UNIT_LIMIT` candidates, else 24); when every unit fits, each unit is
    measured alone.
    """
    if k <= 0 or not candidates:
        return A8Choice([])
    if k >= len(candidates):
        return A8Choice(sorted(candidates))
    units = movement_units(graph, candidates)
    root = {n: unit[0] for unit in units for n in unit}
    module_paths = tensor_paths(graph, candidates)
    # A unit's tensors share every level of the hierarchy down to the unit (named by its first tensor).
    paths = {n: (*module_paths[root[n]][:-1], root[n]) for n in candidates}
    order: list[str | None] = [BASE, *tasks]
    pairs = sample_runs(len(feeds), order, runs or len(order))
    bound_runs = []
    for feed_index, task in pairs:
        chosen_tasks = None if task is BASE else {task: tasks[task]}
        bound_runs.extend(b for _, _, b in _runs(graph, [feeds[feed_index]], chosen_tasks, task is BASE,
                                                 silent_progress, "A8 sensitivity"))
    # One switch per finest group (a leaf is one tensor): measurements switch any union of them.
    switched = SwitchedGraph(graph, {n: n for n in candidates}, enc16, enc8)
    progress(f"A8 sensitivity: {len(candidates)} candidate activations, {len(bound_runs)} run(s) per measurement")
    refs = [switched.run(b) for b in bound_runs]
    forwards = len(bound_runs)
    memo = _measured(graph, candidates, enc16, enc8, bound_runs)
    if memo:
        progress(f"A8 sensitivity: reusing {len(memo)} measurement(s) of an earlier plan of the same graph, "
                 "encodings and runs")

    members: dict[tuple[str, ...], list[str]] = {}

    def children(prefix: tuple[str, ...]) -> dict[tuple[str, ...], list[str]]:
        depth = len(prefix) + 1
        out: dict[tuple[str, ...], list[str]] = {}
        for name in members[prefix]:
            out.setdefault(paths[name][:depth], []).append(name)
        return out

    if max_groups <= 0:
        max_groups = len(units) if len(candidates) <= PER_UNIT_LIMIT else 24
    members[()] = list(candidates)
    frontier = children(())
    while len(frontier) == 1:  # descend to the first level with a choice
        (only, names), = frontier.items()
        members[only] = names
        frontier = children(only)
    costs: dict[tuple[str, ...], float] = {}
    n_measured = 0

    def measure(groups: Mapping[tuple[str, ...], list[str]]) -> None:
        nonlocal forwards
        nonlocal n_measured
        for prefix, names in groups.items():
            members[prefix] = names
            n_measured += 1
            if len(groups) <= 64 or n_measured % 50 == 0 or n_measured == len(groups):
                progress(f"A8 sensitivity: group {n_measured} (at most {max(max_groups, n_measured)}) "
                         f"{_key(prefix)}, {len(names)} tensors")
            key = tuple(sorted(names))
            if key not in memo:
                err = [_relative_error(switched.run(b, names), ref) for b, ref in zip(bound_runs, refs, strict=True)]
                forwards += len(bound_runs)
                memo[key] = float(np.mean(err))
            costs[prefix] = memo[key]

    if len(units) <= max_groups:  # the budget covers every unit: measure each alone, no estimate needed
        frontier = {paths[u[0]]: list(u) for u in units}
    measure(frontier)
    # Drill down where the error is: split the group with the most error x tensors while the budget lasts.
    while True:
        splittable = [p for p in frontier if len({root[n] for n in frontier[p]}) > 1]  # a unit is not split
        if not splittable:
            break
        worst = max(splittable, key=lambda p: (costs[p] * len(frontier[p]), _key(p)))
        parts = children(worst)
        while len(parts) == 1:  # a module with one sub-module: descend without measuring
            (sub, names), = parts.items()
            members[sub] = names
            parts = children(sub)
        if n_measured + len(parts) > max_groups:
            break
        del frontier[worst]
        frontier.update(parts)
        measure(parts)
    # Each tensor's cost: its group's gain (output error per unit of injected 8-bit noise) x its own noise.
    roots = [u[0] for u in units]
    energy = noise_energy(graph, enc8, bound_runs, roots)
    estimate: dict[str, float] = {}  # per unit (by its root): later tensors of a unit add no error
    for prefix, names in frontier.items():
        unit_roots = {root[n] for n in names}
        injected = sum(energy[r] for r in unit_roots)
        gain = costs[prefix] / injected if injected > 0 else 0.0
        estimate.update({r: gain * energy[r] for r in unit_roots})
    by_tensor: list[str] = []
    for unit in sorted(units, key=lambda u: (estimate[u[0]] / len(u), u[0])):
        if len(by_tensor) + len(unit) <= k:
            by_tensor.extend(unit)
    by_tensor.sort()
    by_group: list[str] = []
    for prefix in sorted(frontier, key=lambda p: (costs[p] / len(frontier[p]), _key(p))):
        if len(by_group) + len(frontier[prefix]) <= k:
            by_group.extend(frontier[prefix])
    # "or better": both greedy choices are measured as a whole; the one with less output error wins.
    options = {}
    for label, names in (("per tensor", by_tensor), ("per group", sorted(by_group))):
        err = [_relative_error(switched.run(b, names), ref) for b, ref in zip(bound_runs, refs, strict=True)]
        forwards += len(bound_runs)
        options[label] = (float(np.mean(err)), names)
        progress(f"A8 sensitivity: {label} greedy, {len(names)} tensors: output SQNR "
                 f"{-10 * np.log10(max(options[label][0], 1e-30)):.1f} dB over the calibration runs")
    label = min(options, key=lambda m: (options[m][0], m))
    measured, chosen = options[label]
    predicted = sum(estimate[n] for n in chosen if root[n] == n)
    taken = sorted(p for p in frontier if set(frontier[p]) <= set(chosen))
    progress(f"A8 sensitivity: {len(chosen)} of {len(candidates)} candidates 8-bit from {len(taken)} group(s), "
             f"{forwards} forwards")
    return A8Choice(chosen, {_key(p): (len(members[p]), c) for p, c in costs.items()}, [_key(p) for p in taken],
                    runs=len(bound_runs), forwards=forwards, predicted=predicted, measured=measured,
                    method=label)
