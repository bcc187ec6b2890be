"""Every pass on every golden case: the canonical printed result must equal the reviewed file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from golden import GOLDEN_DIR, REGEN, case_context, case_pass, golden_cases, parse_text, run_case

from quadc.lora.slots import rebind_feeds
from quadc.passes import registered_passes

CASES = golden_cases()


@pytest.mark.parametrize(("pass_name", "in_path"), CASES, ids=[f"{p}/{f.name}" for p, f in CASES])
def test_golden(pass_name, in_path):
    actual, out_path = run_case(pass_name, in_path)
    onnx.checker.check_model(onnx.parser.parse_model(actual))
    if REGEN or not out_path.exists():
        if not REGEN:
            pytest.fail(f"{out_path} is missing; run QUADC_REGEN_GOLDEN=1 pytest tests/test_golden.py")
        out_path.write_text(actual)
    assert actual == out_path.read_text(), f"{pass_name} output differs from {out_path}"


@pytest.mark.parametrize(("pass_name", "in_path"), CASES, ids=[f"{p}/{f.name}" for p, f in CASES])
def test_golden_pass_is_idempotent(pass_name, in_path):
    once, _ = run_case(pass_name, in_path)
    graph = parse_text(in_path)
    ctx = case_context(in_path)
    p = case_pass(pass_name, ctx)
    p.run(graph, ctx)
    second = p.run(graph, ctx)
    assert not second.changed, f"{pass_name} changed the graph on a second run: {second.counts}"


# Passes that change numbers by design (qdq-insert) bound their error in their own tests.
NUMERIC_CASES = [(p, f) for p, f in CASES if registered_passes()[p].preserves_numerics]


@pytest.mark.parametrize(("pass_name", "in_path"), NUMERIC_CASES, ids=[f"{p}/{f.name}" for p, f in NUMERIC_CASES])
def test_golden_keeps_numbers(pass_name, in_path):
    before = onnx.parser.parse_model(in_path.read_text())
    ctx = case_context(in_path)
    slots_before = dict(ctx.lora_slots)
    actual, _ = run_case(pass_name, in_path, lambda _: ctx)
    after = onnx.parser.parse_model(actual)
    rng = np.random.default_rng(0)
    feeds = {}
    after_inputs = {i.name: i for i in after.graph.input}
    for inp in [*before.graph.input, *after_inputs.values()]:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        added = inp.name not in {i.name for i in before.graph.input}
        # Inputs a pass adds (LoRA slots) are fed zeros: the base model must come out unchanged.
        feeds.setdefault(inp.name, np.zeros(shape, np.float32) if added else rng.standard_normal(shape).astype(np.float32))
    # A slot the pass moved to another layout takes the same LoRA factors in its new layout.
    after_feeds = rebind_feeds(feeds, slots_before, ctx.lora_slots)
    run = lambda m, f: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {k: v for k, v in f.items() if k in {i.name for i in m.graph.input}})
    for a, b in zip(run(before, feeds), run(after, after_feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_every_pass_has_golden_cases():
    covered = {p for p, _ in CASES}
    missing = set(registered_passes()) - covered
    assert not missing, f"passes without golden cases in {GOLDEN_DIR}: {sorted(missing)}"
