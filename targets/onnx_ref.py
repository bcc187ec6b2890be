"""Target ``onnx``: the float LoRA-as-input graph for onnxruntime, the reference every target compares to."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.targets.base import Target

if TYPE_CHECKING:
    from quadc.context import CompileContext

GRAPH_FILE = "model.onnx"


class OnnxTarget(Target):
    """Float ONNX graph with LoRA A/B as inputs; runs on onnxruntime's CPU provider."""

    name = "onnx"
    description = "float LoRA-as-input ONNX graph for onnxruntime (the reference target)"
    passes = ("float",)
    forbids_passes = ("quant-plan", "qdq-insert")

    def emit(self, graph: gs.Graph, ctx: CompileContext, out_dir: Path) -> dict[str, Any]:
        from quadc.lora.pack import write_task_files

        entries = {**self.write_graph(graph, out_dir, GRAPH_FILE), "precision": "fp32"}
        entries.update(write_task_files(ctx, out_dir))
        return entries

    def verify(self, artifact_dir: Path, feeds: dict[str, Any], task: str | None = None) -> dict[str, Any]:
        from quadc.runtime.engine import Engine

        engine = Engine(artifact_dir)
        out = engine.run(feeds, task=task)
        return {"outputs": {k: float(np.max(np.abs(v))) for k, v in out.items()}}
