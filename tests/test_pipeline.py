"""Pipeline: parsing, prerequisites, timing records, print-after and the verify modes."""

from __future__ import annotations

import time

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from golden import GOLDEN_DIR, parse_text

from quadc.context import CompileContext
from quadc.errors import QuadcError
from quadc.passes import GraphPass, PassResult, parse_pipeline, registered_passes, run_pipeline


def _graph():
    return parse_text(GOLDEN_DIR / "const-fold" / "fold_mul.in.onnxtxt")


class _BreaksNumbers(GraphPass):
    """Test-only pass that multiplies the first constant by 3 (a numerics bug)."""

    name = "breaks-numbers"

    def run(self, graph, ctx):
        const = next(t for t in graph.tensors().values() if isinstance(t, gs.Constant))
        const.values = np.asarray(const.values) * 3
        return PassResult(True, {"broken": 1})


class _NeedsFold(GraphPass):
    """Test-only pass that requires const-fold."""

    name = "needs-fold"
    requires = ("const-fold",)

    def run(self, graph, ctx):
        return PassResult(False)


def test_parse_from_string_and_list():
    assert [p.name for p in parse_pipeline("const-fold, dce")] == ["const-fold", "dce"]
    assert [p.name for p in parse_pipeline(["dce"])] == ["dce"]
    with pytest.raises(QuadcError, match="unknown pass 'nope'"):
        parse_pipeline("const-fold,nope")
    with pytest.raises(QuadcError, match="empty"):
        parse_pipeline(" , ")


def test_prerequisites_are_checked():
    with pytest.raises(QuadcError, match="requires 'const-fold'"):
        run_pipeline(_graph(), [_NeedsFold()], CompileContext())
    graph, records = run_pipeline(_graph(), [*parse_pipeline("const-fold"), _NeedsFold()], CompileContext())
    assert [r.name for r in records] == ["const-fold", "needs-fold"]


def test_records_timing_and_counts():
    ctx = CompileContext()
    _, records = run_pipeline(_graph(), parse_pipeline("const-fold,dce"), ctx, verify="numeric")
    assert records[0].changed and records[0].counts["nodes_folded"] == 1
    assert records[0].max_abs_diff == 0.0
    assert [s["pass"] for s in ctx.stats] == ["const-fold", "dce"]
    assert ctx.applied == ["const-fold", "dce"]


def test_records_time_each_pass():
    """A pass that takes 0.2 s is recorded as taking about that long; a quick one is not."""

    class _Slow(GraphPass):
        """Test-only pass that sleeps 0.2 s."""

        name = "slow"

        def run(self, graph, ctx):
            time.sleep(0.2)
            return PassResult(False)

    ctx = CompileContext()
    _, records = run_pipeline(_graph(), [_Slow(), *parse_pipeline("dce")], ctx)
    slow, quick = records
    assert 0.2 <= slow.seconds < 2.0 and quick.seconds < 0.1
    assert [s["seconds"] for s in ctx.stats] == [round(slow.seconds, 6), round(quick.seconds, 6)]


def test_numeric_verify_catches_a_pass_that_changes_numbers():
    with pytest.raises(RuntimeError, match="changed the graph's numbers"):
        run_pipeline(_graph(), [_BreaksNumbers()], CompileContext(), verify="numeric")


def test_check_verify_catches_invalid_graph():
    class _Invalid(GraphPass):
        """Test-only pass that leaves a node with an unknown op."""

        name = "invalid"

        def run(self, graph, ctx):
            graph.nodes[0].op = "NoSuchOp"
            return PassResult(True)

    with pytest.raises(RuntimeError, match="invalid graph"):
        run_pipeline(_graph(), [_Invalid()], CompileContext(), verify="check")


def test_print_after_writes_text(tmp_path):
    ctx = CompileContext(dump_dir=tmp_path)
    run_pipeline(_graph(), parse_pipeline("const-fold,dce"), ctx, print_after=["const-fold"])
    dumped = list(tmp_path.glob("*.onnxtxt"))
    assert [p.name for p in dumped] == ["01-const-fold.onnxtxt"]
    assert "Add" in dumped[0].read_text() and "Mul" not in dumped[0].read_text()
    with pytest.raises(QuadcError, match="not in the pipeline"):
        run_pipeline(_graph(), parse_pipeline("dce"), CompileContext(), print_after=["const-fold"])


def test_registered_pass_names_are_kebab_case_with_docs():
    for name, cls in registered_passes().items():
        assert name == cls.name and name == name.lower() and "_" not in name
        assert cls.summary(), f"{name} needs a docstring"
        assert "Given" in (__import__(cls.__module__, fromlist=["x"]).__doc__ or ""), name
