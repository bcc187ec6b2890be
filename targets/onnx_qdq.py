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

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.graph import load_model, save_model
from quadc.quant.encodings import write_encodings
from quadc.quant.plan import QuantPlan
from quadc.quant.plan_file import encodings_file_of
from quadc.targets.base import Target

if TYPE_CHECKING:
    from quadc.context import CompileContext

GRAPH_FILE = "model.onnx"
ENCODINGS_FILE = "encodings.json"


def strip_activation_qdq(graph: gs.Graph) -> int:
    """Remove the Q -> DQ pairs on dynamic tensors (activations), keeping weight and LoRA dequantization.

    The result computes with float activations and the artifact's quantized weights and LoRA integers:
    the reference :meth:`OnnxQdqTarget.verify` measures activation quantization error against.
    """
    removed = 0
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        src = q.inputs[0]
        if isinstance(src, gs.Constant) or not q.outputs[0].outputs:
            continue
        dqs = list(q.outputs[0].outputs)
        if not all(d.op == "DequantizeLinear" for d in dqs):
            continue
        for dq in dqs:
            out = dq.outputs[0]
            for node in list(out.outputs):
                for i, t in enumerate(node.inputs):
                    if t is out:
                        node.inputs[i] = src
            if any(t is out for t in graph.outputs):
                graph.outputs = [src if t is out else t for t in graph.outputs]
                src.name, out.name = out.name, out.name + "_removed"
            dq.outputs.clear()
            removed += 1
        q.outputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return removed


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

    def verify(self, artifact_dir: Path, feeds: dict[str, Any], task: str | None = None) -> dict[str, Any]:
        """Run the artifact on ORT CPU with ``task`` bound; report its outputs and their error against the
        same graph with float activations (quantized weights and LoRA kept), i.e. the activation error."""
        import onnxruntime as ort

        from quadc.quant.affine import sqnr_db
        from quadc.runtime.engine import Engine

        artifact_dir = Path(artifact_dir)
        engine = Engine(artifact_dir)
        out = engine.run(feeds, task=task)
        lora = engine.lora_inputs(task)
        graph = load_model(artifact_dir / engine.manifest["graph"])
        strip_activation_qdq(graph)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        with tempfile.TemporaryDirectory(prefix="quadc-verify-") as tmp:
            ref_path = save_model(graph, Path(tmp) / "reference.onnx")
            sess = ort.InferenceSession(str(ref_path), so, providers=["CPUExecutionProvider"])
            names = {i.name for i in sess.get_inputs()}
            ref_feeds = {k: v for k, v in {**feeds, **lora}.items() if k in names}
            ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, ref_feeds), strict=True))
        report: dict[str, Any] = {"task": task or "none", "outputs": {}, "reference": "float activations"}
        for name, value in out.items():
            want = ref[name]
            report["outputs"][name] = {
                "max_abs": float(np.max(np.abs(value))) if value.size else 0.0,
                "max_abs_err": float(np.max(np.abs(value.astype(np.float64) - want))) if value.size else 0.0,
                "sqnr_db": round(float(sqnr_db(want, value)), 4),
            }
        return report
