"""Target ``onnx-qdq``: one quantized QDQ ONNX graph whose LoRA inputs take uint8 under shared encodings.

The graph is the float LoRA-as-input graph with standard QuantizeLinear/DequantizeLinear from the
quantization plan (pass ``qdq-insert``): W8A16 by default, uint8 LoRA inputs that every task's stored
bytes bind to as they are. It runs on onnxruntime's CPU provider and is the QDQ form that onnxruntime's
QNN execution provider (HTP backend) compiles.

Artifact::

    model.onnx (+ model.onnx.data)      the QDQ graph (opset 21, or com.microsoft Q/DQ below it)
    encodings.json                      AIMET 1.0.0: activations, params, LoRA slot inputs (one each)
    lora/<task>.onnx_adapter            uint8 tensors under the shared encodings (onnxruntime LoraAdapter)
    lora/<task>.safetensors             the same tensors as safetensors
    manifest.json                       precision, quant summary, per-task files and ROM bytes

Nothing in the artifact is per-task except the LoRA integers: no task has its own encoding.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.quant.encodings import write_encodings
from quadc.quant.plan import QuantPlan
from quadc.quant.plan_file import encodings_file_of
from quadc.targets.base import Target

if TYPE_CHECKING:
    from quadc.context import CompileContext

GRAPH_FILE = "model.onnx"
ENCODINGS_FILE = "encodings.json"


class OnnxQdqTarget(Target):
    """Quantized QDQ ONNX graph (W8A16, uint8 LoRA inputs under shared encodings) for onnxruntime/QNN."""

    name = "onnx-qdq"
    description = "quantized QDQ ONNX graph, uint8 LoRA inputs with one shared encoding per slot (ORT CPU / QNN)"
    passes = ("float", "qdq")
    requires_passes = ("lora-inputs", "quant-plan", "qdq-insert")

    def emit(self, graph: gs.Graph, ctx: CompileContext, out_dir: Path) -> dict[str, Any]:
        from quadc.lora.pack import write_task_files

        plan = ctx.plan
        if not isinstance(plan, QuantPlan):
            raise QuadcError("target onnx-qdq needs a quantization plan; its pipeline must include quant-plan")
        entries: dict[str, Any] = self.write_graph(graph, out_dir, GRAPH_FILE)
        write_encodings(out_dir / ENCODINGS_FILE, encodings_file_of(plan))
        entries.update({
            "opset": int(graph.opset),
            "precision": plan.precision,
            "quant": plan.summary(),
            "encodings": ENCODINGS_FILE,
        })
        entries.update(write_task_files(ctx, out_dir, quantized=not plan.lora_float_inputs, plan=plan))
        return entries

    def verify(self, artifact_dir: Path, feeds: dict[str, Any], task: str | None = None, *,
               model: str | os.PathLike[str] | None = None,
               loras: Mapping[str, str | os.PathLike[str]] | None = None) -> dict[str, Any]:
        """Run the artifact on ORT CPU with ``task`` bound and report per output ``max_abs``, ``max_abs_err``
        and ``sqnr_db`` against the float LoRA-as-input graph of the source model with the task's float
        LoRA (:func:`~quadc.targets.float_reference.float_reference`; ``model``/``loras`` default to the
        bundled ones when the artifact was compiled from them)."""
        from quadc.runtime.engine import Engine
        from quadc.targets.float_reference import float_reference, output_errors

        engine = Engine(Path(artifact_dir))
        # The reference first: a missing source model or LoRA is refused before the artifact runs.
        ref = float_reference(engine.manifest, feeds, task, model=model, loras=loras)
        out = engine.run(feeds, task=task)
        return {"task": task or "none", "outputs": output_errors(out, ref), "reference": "float LoRA-as-input graph"}
