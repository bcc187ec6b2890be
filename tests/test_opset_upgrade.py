"""upgrade_opset imports only the nodes the converter changed: the same graph as importing all of them."""

from __future__ import annotations

import pytest
from golden import canonical_text

import quadc.passes.qdq_insert as qdq_insert
from quadc.compiler import prepare
from quadc.passes import PassPipeline, run_pipeline


@pytest.mark.parametrize("fixture", ["tiny_torchscript_onnx", "tiny_dynamo_onnx"])
@pytest.mark.parametrize("version", [20, 21])
def test_partial_upgrade_equals_whole_import(fixture, version, request, monkeypatch):
    graphs = []
    for whole in (False, True):
        graph, ctx, _ = prepare(request.getfixturevalue(fixture), {})
        graph, _ = run_pipeline(graph, PassPipeline("float,linear-to-conv,mha-split").build(), ctx)
        kept = {id(n) for n in graph.nodes}
        if whole:
            monkeypatch.setattr(qdq_insert, "_adopt_changed_nodes", lambda *args: False)
        qdq_insert.upgrade_opset(graph, version)
        if not whole:
            # Most nodes are the very same objects (the converter changed a few, e.g. ReduceMean's axes).
            assert sum(id(n) in kept for n in graph.nodes) > 0.9 * len(graph.nodes)
        graphs.append(canonical_text(graph))
    assert graphs[0] == graphs[1]
