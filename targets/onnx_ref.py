"""Target ``onnx``: the float LoRA-as-input graph for onnxruntime, the reference every target compares to.

Its :meth:`OnnxTarget.verify` checks the artifact against something it did not produce: the source
model with the task's LoRA merged into its weights (:func:`quadc.lora.merge.merge_lora`), run as a plain
ONNX model. A wrong graph, a wrong or swapped task file, or a wrong runtime binding shows as a large
error and a low SQNR.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.targets.base import Target

if TYPE_CHECKING:
    from quadc.context import CompileContext

GRAPH_FILE = "model.onnx"
BASE_TASKS = (None, "none")


class OnnxTarget(Target):
    """Float ONNX graph with LoRA A/B as inputs; runs on onnxruntime's CPU provider."""

    name = "onnx"
    description = "float LoRA-as-input ONNX graph for onnxruntime (the reference target)"
    passes = ("float",)
    forbids_passes = ("quant-plan", "qdq-insert")

    def emit(self, graph: gs.Graph, ctx: CompileContext, out_dir: Path) -> dict[str, Any]:
        from quadc.lora.pack import write_task_files

        fp16 = any(t.dtype is not None and np.dtype(t.dtype) == np.float16 for t in graph.inputs)
        entries = {**self.write_graph(graph, out_dir, GRAPH_FILE), "precision": "fp16" if fp16 else "fp32"}
        entries.update(write_task_files(ctx, out_dir))
        return entries

    def verify(self, artifact_dir: Path, feeds: dict[str, Any], task: str | None = None, *,
               model: str | os.PathLike[str] | None = None,
               loras: Mapping[str, str | os.PathLike[str]] | None = None) -> dict[str, Any]:
        """Run the artifact with ``task`` bound and compare it with the source model that has the task's
        LoRA merged into its weights (the source model alone for the base model, ``task`` None/"none").

        ``model`` is the ONNX model the artifact was compiled from (its sha256 must match the manifest's);
        ``loras`` maps task names to the LoRA files (or peft folders) compiled as those tasks. Both default
        to the bundled model and LoRAs when the artifact was compiled from them; paths are never taken
        from the manifest. Reports per output ``max_abs`` (of the artifact's output), ``max_abs_err`` and
        ``sqnr_db`` against the merged reference.
        """
        from quadc import frontend
        from quadc.graph import model_sha256, ort_session
        from quadc.runtime.engine import Engine
        from quadc.targets.float_reference import output_errors

        engine = Engine(artifact_dir)
        out = engine.run(feeds, task=task)
        model_path = _source_model(engine.manifest, model)
        if model is not None and model_sha256(model_path) != engine.manifest.get("source", {}).get("sha256"):
            raise QuadcError(f"{model_path} is not the model artifact {artifact_dir} was compiled from (its "
                             "sha256 differs from the manifest's); pass the source model")
        graph, info = frontend.load(model_path)
        report: dict[str, Any] = {"task": task or "none", "model": str(model_path), "outputs": {}}
        if task in BASE_TASKS:
            report["reference"] = "source model"
        else:
            from quadc.lora import fit_lora, read_lora
            from quadc.lora.merge import merge_lora

            lora_path = _source_lora(engine.manifest, task, loras)
            merge_lora(graph, info, fit_lora(read_lora(lora_path, name=task, info=info), info))
            report["reference"] = "source model with the task's LoRA merged into its weights"
            report["lora"] = str(lora_path)
        session = ort_session(graph)
        names = {i.name for i in session.get_inputs()}
        missing = sorted(names - set(feeds))
        if missing:
            raise QuadcError(f"verify needs model input(s) {', '.join(missing)} in feeds")
        types = {i.name: {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(i.type)
                 for i in session.get_inputs()}
        ref_feeds = {k: np.asarray(v).astype(types[k]) if types[k] and np.asarray(v).dtype.kind == "f" else v
                     for k, v in feeds.items() if k in names}  # float feeds in the model's float type
        ref = dict(zip([o.name for o in session.get_outputs()], session.run(None, ref_feeds), strict=True))
        report["outputs"] = output_errors(out, ref)
        return report


def _source_model(manifest: Mapping[str, Any], model: str | os.PathLike[str] | None) -> Path:
    """``model``, or the bundled model when the artifact was compiled from it."""
    from quadc.compiler import bundled_model
    from quadc.graph import model_sha256

    if model is not None:
        return Path(model)
    bundled = bundled_model()
    if manifest.get("source", {}).get("sha256") == model_sha256(bundled):
        return bundled
    raise QuadcError("verify needs the source model of this artifact: pass --model PATH (in Python model=PATH; the ONNX "
                     f"file '{manifest.get('source', {}).get('model', '?')}' it was compiled from)")


def _source_lora(manifest: Mapping[str, Any], task: str,
                 loras: Mapping[str, str | os.PathLike[str]] | None) -> Path:
    """The LoRA given for ``task``, or the bundled LoRA of that name when the task was compiled from it."""
    from quadc.compiler import bundled_loras

    if task not in manifest.get("tasks", {}):
        known = ", ".join(manifest.get("tasks", {})) or "no tasks"
        raise QuadcError(f"unknown task '{task}'; this artifact has: {known}")
    if loras is not None and task in loras:
        return Path(loras[task])
    bundled = bundled_loras().get(task)
    if bundled is not None and manifest["tasks"][task].get("source") == bundled.name:
        return bundled
    raise QuadcError(f"verify needs the LoRA compiled as task '{task}': pass --lora {task}=PATH "
                     f"(in Python loras={{'{task}': PATH}}; the file '{manifest['tasks'][task].get('source', '?')}')")
