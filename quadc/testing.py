"""Test helpers for pass authors (quadc's own tests and plugin packages), after coremltools'
``apply_pass_and_basic_check`` / ``assert_op_count_match``.

:func:`apply_pass_and_basic_check` runs one pass on a copy of a graph and checks what every pass must
keep: graph inputs (except the new inputs the caller declares, and LoRA inputs whose slot the pass moved
to another layout in ``ctx.lora_slots``: they take the slot's new shape) and outputs (names, types,
shapes), the onnx checker, the pass's postcondition, and — for passes that keep the numbers — outputs on
onnxruntime before and after with **non-zero** random values on every input, LoRA slot inputs included
(at ``quadc.lora.slots.VERIFY_SCALE``), so a mis-wired LoRA branch changes the numbers and fails (a pass
that changes the slot table is checked with the slot inputs converted as packing would convert them). Declared new inputs are fed zeros unless the
caller gives values.

Example::

    graph, result = apply_pass_and_basic_check(graph, "const-fold")
    assert_op_count_match(graph, {"Mul": 0, "Add": 1})
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.graph_inputs import random_inputs
from quadc.lora.slots import VERIFY_SCALE, LoRASlot, rebind_feeds, slot_inputs
from quadc.passes.base import GraphPass, PassResult, get_pass
from quadc.passes.pipeline import check_conditions, check_graph, run_graph

__all__ = ["apply_pass_and_basic_check", "assert_op_count_match", "assert_same_outputs", "io_signature",
           "lora_feeds"]


def io_signature(tensors: Iterable[gs.Tensor]) -> dict[str, tuple[str, tuple[Any, ...] | None]]:
    """name -> (dtype, shape) of graph inputs or outputs."""
    return {t.name: (str(np.dtype(t.dtype)) if t.dtype is not None else "?",
                     tuple(t.shape) if t.shape is not None else None) for t in tensors}


def assert_op_count_match(graph: gs.Graph, expected: Mapping[str, int]) -> None:
    """Assert the graph has exactly ``expected[op]`` nodes of each op type named (0 means none)."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        counts[node.op] = counts.get(node.op, 0) + 1
    wrong = {op: (counts.get(op, 0), n) for op, n in expected.items() if counts.get(op, 0) != n}
    assert not wrong, "op counts differ (got, expected): " + ", ".join(f"{op} {g} != {e}" for op, (g, e) in wrong.items())


def assert_same_outputs(before: gs.Graph, after: gs.Graph, feeds: Mapping[str, np.ndarray], *,
                        rtol: float = 1e-5, after_feeds: Mapping[str, np.ndarray] | None = None) -> float:
    """Assert both graphs give the same outputs on ``feeds`` (``after`` on ``after_feeds`` when given)
    within ``rtol`` of each output's scale; returns the largest absolute difference."""
    ref, got = run_graph(before, feeds), run_graph(after, feeds if after_feeds is None else after_feeds)
    assert len(ref) == len(got), f"output count changed: {len(ref)} -> {len(got)}"
    worst = 0.0
    for name, r, g in zip([t.name for t in before.outputs], ref, got, strict=True):
        assert r.shape == g.shape, f"output {name}: shape {r.shape} -> {g.shape}"
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        diff = float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))) if r.size else 0.0
        worst = max(worst, diff)
        assert diff <= rtol * (scale or 1.0), f"output {name}: max abs diff {diff:.3g} > {rtol:g} x scale {scale:.3g}"
    return worst


def lora_feeds(graph: gs.Graph, slots: Mapping[str, LoRASlot], seed: int = 0) -> dict[str, np.ndarray]:
    """Random values for every graph input, the inputs of ``slots`` at ``VERIFY_SCALE`` (non-zero LoRA
    factors of a realistic size)."""
    feeds = random_inputs(graph, seed=seed)
    for name in slot_inputs(slots) & set(feeds):
        feeds[name] = (feeds[name] * VERIFY_SCALE).astype(feeds[name].dtype)
    return feeds


def apply_pass_and_basic_check(graph: gs.Graph, pass_: str | GraphPass, ctx: CompileContext | None = None, *,
                               options: Mapping[str, Any] | None = None,
                               expected_new_inputs: Iterable[str] = (),
                               new_input_values: Mapping[str, np.ndarray] | None = None,
                               numeric: bool | None = None, rtol: float = 1e-5,
                               seed: int = 0) -> tuple[gs.Graph, PassResult]:
    """Run ``pass_`` on a copy of ``graph`` and check it (see the module docstring); returns the rewritten
    copy and the pass's result. ``numeric`` defaults to the pass's ``preserves_numerics``."""
    p = get_pass(pass_, options) if isinstance(pass_, str) else pass_
    ctx = ctx or CompileContext()
    before = graph.copy()
    after = graph.copy()
    problems = p.precondition(after, ctx)
    assert not problems, f"precondition of '{p.name}' does not hold on the input: {problems}"
    slots_before = dict(ctx.lora_slots)
    result = p.run(after, ctx)
    check_graph(after, p.name)
    check_conditions(p, after, ctx, "after")
    new = set(expected_new_inputs)
    ins_before, ins_after = io_signature(before.inputs), io_signature(after.inputs)
    for module, slot in ctx.lora_slots.items():
        old = slots_before.get(module)
        if old is not None and old.layout != slot.layout:  # moved: its inputs take the slot's new shapes
            for name, shape in ((slot.down_input, slot.down_shape), (slot.up_input, slot.up_shape)):
                if name in ins_before:
                    ins_before[name] = (ins_before[name][0], tuple(shape))
    kept = {k: v for k, v in ins_after.items() if k not in new}
    assert kept == ins_before, f"'{p.name}' changed the graph inputs: {ins_before} -> {kept}"
    missing = new - set(ins_after)
    assert not missing, f"'{p.name}' did not add the declared inputs {sorted(missing)}"
    outs_before, outs_after = io_signature(before.outputs), io_signature(after.outputs)
    assert outs_before == outs_after, f"'{p.name}' changed the graph outputs: {outs_before} -> {outs_after}"
    if p.preserves_numerics if numeric is None else numeric:
        feeds = lora_feeds(before, slots_before, seed=seed)
        added = random_inputs(after, seed=seed, zero_inputs=new)
        feeds.update({k: v for k, v in added.items() if k in new})
        feeds.update(dict(new_input_values or {}))
        # A pass that rescales or re-lays out LoRA inputs (slot table) gets them as packing would give them.
        assert_same_outputs(before, after, feeds, rtol=rtol,
                            after_feeds=rebind_feeds(feeds, slots_before, ctx.lora_slots))
    return after, result
