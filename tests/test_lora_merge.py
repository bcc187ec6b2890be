"""Merging a LoRA into the weights gives the same output as binding it to the LoRA-as-input graph."""

from __future__ import annotations

import numpy as np
import pytest

from quadc import frontend
from quadc.compiler import CompileOptions, bundled_loras, bundled_model, compile_model
from quadc.graph import ort_session
from quadc.graph_inputs import random_inputs
from quadc.lora import fit_lora, read_lora
from quadc.lora.merge import merge_lora
from quadc.runtime.engine import Engine


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "out"
    compile_model(None, out, CompileOptions())
    return out


@pytest.mark.parametrize("task", sorted(bundled_loras()))
def test_merged_graph_equals_bound_task(artifact, task):
    graph, info = frontend.load(bundled_model())
    feeds = random_inputs(graph, seed=7)
    feeds["timestep"] = np.array([500.0], np.float32)
    base = ort_session(graph).run(None, feeds)[0]
    lora = fit_lora(read_lora(bundled_loras()[task], name=task, info=info), info)
    assert merge_lora(graph, info, lora) == len(lora.layers)
    merged = ort_session(graph).run(None, feeds)[0]
    bound = Engine(artifact).run(feeds, task=task)["out_sample"]
    scale = float(np.max(np.abs(merged)))
    assert np.max(np.abs(merged - base)) > 1e-2 * scale, "the LoRA must change the output"
    assert np.max(np.abs(merged - bound)) <= 1e-4 * scale
