"""The float LoRA-as-input graph an artifact is measured against, rebuilt from its source model.

:class:`FloatReference` loads the model the artifact was compiled from (its sha256 must match the
manifest's) with every task's LoRA, runs the ``float`` preset with the artifact's ``lora-inputs``
options (so the slots are the ones the artifact was compiled with) and binds a task's float packed
tensors (the base model: zeros). The source model and LoRA files default to the bundled ones when the
artifact was compiled from them; paths are never taken from the manifest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from quadc.errors import QuadcError

__all__ = ["FloatReference", "float_reference", "output_errors"]

_CACHE: dict[str, FloatReference] = {}
_CACHE_SIZE = 1


class FloatReference:
    """One onnxruntime CPU session over the float LoRA-as-input graph of an artifact's source."""

    def __init__(self, manifest: Mapping[str, Any], model: str | os.PathLike[str] | None = None,
                 loras: Mapping[str, str | os.PathLike[str]] | None = None) -> None:
        from quadc.compiler import prepare
        from quadc.graph import model_sha256, ort_session
        from quadc.passes import PassPipeline, run_pipeline
        from quadc.targets.onnx_ref import _source_lora, _source_model

        model_path = _source_model(manifest, model)
        tasks = list(manifest.get("tasks", {}))
        paths = {t: str(_source_lora(manifest, t, loras)) for t in tasks}  # before hashing a large model
        if model_sha256(model_path) != manifest.get("source", {}).get("sha256"):
            raise QuadcError(f"{model_path} is not the model the artifact was compiled from (its sha256 differs "
                             "from the manifest's); pass the source model")
        graph, ctx, _ = prepare(model_path, paths)
        pipeline = PassPipeline("float")
        lora_opts = next((p.get("options", {}) for p in manifest.get("passes", []) if p.get("pass") == "lora-inputs"), {})
        if lora_opts:
            pipeline.set_options("lora-inputs", **lora_opts)
        graph, _ = run_pipeline(graph, pipeline, ctx)
        self.model = model_path
        self.slots = ctx.lora_slots
        self.loras = ctx.loras
        self.session = ort_session(graph)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    @classmethod
    def cached(cls, manifest: Mapping[str, Any], model: str | os.PathLike[str] | None = None,
               loras: Mapping[str, str | os.PathLike[str]] | None = None) -> FloatReference:
        """The reference of an artifact's source, built once per process for the same source, LoRAs and
        slot options (verifying several tasks of several targets compiled together rebuilds nothing)."""
        import json

        lora_opts = next((p.get("options", {}) for p in manifest.get("passes", []) if p.get("pass") == "lora-inputs"), {})
        key = json.dumps([manifest.get("source", {}).get("sha256"), str(model) if model is not None else None,
                          sorted((k, str(v)) for k, v in (loras or {}).items()), sorted(manifest.get("tasks", {})),
                          lora_opts], sort_keys=True, default=str)
        if key not in _CACHE:
            if len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = cls(manifest, model, loras)
        return _CACHE[key]

    def lora_inputs(self, task: str | None) -> dict[str, np.ndarray]:
        """The float packed tensors of ``task`` for every slot (zeros for the base model, None/"none")."""
        from quadc.lora.pack import pack_task

        if task in (None, "none"):
            return pack_task(None, self.slots)
        if self.loras is None or task not in self.loras:
            raise QuadcError(f"unknown task '{task}' for the float reference")
        return pack_task(self.loras[task], self.slots)

    def run(self, feeds: Mapping[str, np.ndarray], task: str | None) -> dict[str, np.ndarray]:
        """The float outputs with ``task`` bound."""
        bound = {**{k: v for k, v in feeds.items() if k in self.inputs}, **self.lora_inputs(task)}
        missing = [n for n in self.inputs if n not in bound]
        if missing:
            raise QuadcError(f"the float reference needs input(s) {', '.join(missing)}")
        return dict(zip(self.outputs, self.session.run(None, {k: bound[k] for k in self.inputs}), strict=True))


def float_reference(manifest: Mapping[str, Any], feeds: Mapping[str, np.ndarray], task: str | None, *,
                    model: str | os.PathLike[str] | None = None,
                    loras: Mapping[str, str | os.PathLike[str]] | None = None) -> dict[str, np.ndarray]:
    """Outputs of the float LoRA-as-input graph of the artifact's source with ``task``'s float LoRA bound
    (``None``/``"none"``: the base model), on ORT CPU; the graph is built once per process and source."""
    return FloatReference.cached(manifest, model, loras).run(feeds, task)


def output_errors(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output of ``got``: ``max_abs``, ``max_abs_err`` and ``sqnr_db`` against ``want`` (float64). An
    output the reference lacks is refused in one line: the artifact does not belong to that model."""
    from quadc.quant.affine import sqnr_db

    report = {}
    for name, value in got.items():
        if name not in want:
            raise QuadcError(f"artifact output '{name}' is not an output of the source model; "
                             "the artifact does not belong to this model")
        g, w = np.asarray(value, np.float64), np.asarray(want[name], np.float64)
        report[name] = {"max_abs": float(np.max(np.abs(g))) if g.size else 0.0,
                        "max_abs_err": float(np.max(np.abs(g - w))) if g.size else 0.0,
                        "sqnr_db": round(float(sqnr_db(w, g)), 4)}
    return report
