"""Target ``enn``: Samsung Exynos (ENN) inputs — the 16x8 TFLite and the QDQ ONNX of the same encodings.

Exynos AI Studio takes TFLite or ONNX, quantized int8/int16. The artifact holds both forms, built from
one calibration and one scheme (:mod:`quadc.targets.tflite.scheme`):

- ``model.tflite`` (+ ``host.onnx``, ``lora/``): the fully integer 16x8 TFLite under the constraints
  LiteRT's Samsung compiler plugin states (its op builders, :data:`ENN_OPS`; FULLY_CONNECTED with a 2-D
  kernel, which quadc always writes), run here in LiteRT;
- ``qdq/``: a complete ``onnx-qdq``-form artifact (``qdq/manifest.json``, ``qdq/model.onnx``,
  ``qdq/lora/<task>.onnx_adapter``) of the legalized graph with the very same encodings as standard
  QuantizeLinear/DequantizeLinear (opset 21): int16 symmetric activations, int8 symmetric per-channel
  weights, int8 zero-point-0 LoRA inputs. ``quadc run OUT/qdq`` runs it on ORT CPU.

What the public docs do not state (and so this target does not assume): whether the Exynos NPU keeps
16-bit activations for every op, and whether a CONV_2D filter or a FULLY_CONNECTED weight may be a
subgraph input (the conv LoRA factors are); the LiteRT plugin source takes a 2-D FC kernel only.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.targets.tflite.scheme import TfliteScheme, weight_encoding
from quadc.targets.tflite.target import TfliteTarget, precision_label

if TYPE_CHECKING:
    from quadc.context import CompileContext

QDQ_DIR = "qdq"

#: TFLite builtins LiteRT's Samsung (Exynos) compiler plugin has op builders for.
ENN_OPS: tuple[str, ...] = (
    "ADD", "MUL", "DIV", "SUB", "EXP", "MAXIMUM", "MINIMUM", "SQRT", "RSQRT", "SQUARED_DIFFERENCE", "ARG_MAX",
    "BATCH_MATMUL", "BROADCAST_TO", "CAST", "CONCATENATION", "CONV_2D", "CONV_3D", "CUMSUM", "DEQUANTIZE",
    "FULLY_CONNECTED", "GATHER", "GATHER_ND", "GELU", "HARD_SWISH", "L2_NORMALIZATION", "LEAKY_RELU",
    "LOGISTIC", "PAD", "MAX_POOL_2D", "AVERAGE_POOL_2D", "QUANTIZE", "SUM", "MEAN", "REDUCE_MAX", "REDUCE_MIN",
    "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "REVERSE_V2",
    "SELECT", "SELECT_V2", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "STRIDED_SLICE", "TANH",
    "TRANSPOSE_CONV", "TRANSPOSE",
)


def qdq_plan(graph: gs.Graph, ctx: CompileContext, scheme: TfliteScheme) -> Any:
    """A :class:`~quadc.quant.plan.QuantPlan` holding the TFLite scheme's encodings, for ``qdq-insert``."""
    from quadc.quant.plan import QuantPlan
    from quadc.quant.weights import weight_axes

    consts = {n: t for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    weights = {n: weight_encoding(np.asarray(consts[n].values), axis) for n, axis in weight_axes(graph).items()
               if np.ndim(consts[n].values) >= 2}
    names = {t.name for t in graph.inputs} | {o.name for n in graph.nodes for o in n.outputs}
    plan = QuantPlan(precision="w8a16", activations={k: v for k, v in scheme.activations.items() if k in names},
                     weights=weights, lora=dict(scheme.lora), per_channel=True, lora_policy=ctx.plan.lora_policy,
                     anchor=ctx.plan.anchor, qss=dict(ctx.plan.qss),
                     activation_profile=ctx.plan.activation_profile, profile_anchor=ctx.plan.profile_anchor)
    return plan


class EnnTarget(TfliteTarget):
    """16x8 TFLite under the Samsung LiteRT plugin's constraints, plus the same encodings as QDQ ONNX."""

    name = "enn"
    description = "Samsung Exynos: 16x8 TFLite (LiteRT) and the same encodings as QDQ ONNX (qdq/, ORT)"
    supported_ops = ENN_OPS

    def emit(self, graph: gs.Graph, ctx: CompileContext, out_dir: Path) -> dict[str, Any]:
        entries = super().emit(graph, ctx, out_dir)
        entries["qdq_artifact"] = self._emit_qdq(graph, ctx, out_dir / QDQ_DIR)
        return entries

    def _emit_qdq(self, graph: gs.Graph, ctx: CompileContext, qdir: Path) -> str:
        import quadc
        from quadc.artifact import FORMAT_VERSION, MANIFEST_NAME, write_json
        from quadc.lora.pack import write_task_files
        from quadc.passes import get_pass
        from quadc.quant.calibrate import clone_graph
        from quadc.quant.encodings import write_encodings
        from quadc.quant.plan_file import encodings_file_of
        from quadc.targets.tflite.scheme import scheme_from_plan

        scheme = scheme_from_plan(graph, ctx.plan)
        qgraph = clone_graph(graph)
        qctx = copy.copy(ctx)
        qctx.plan = qdq_plan(qgraph, ctx, scheme)
        get_pass("qdq-insert").run(qgraph, qctx)
        qdir.mkdir()
        manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "quadc_version": quadc.__version__,
                                    "target": "onnx-qdq", "form_of": self.name,
                                    "inputs": {t.name: {"dtype": str(t.dtype), "shape": list(t.shape or [])}
                                               for t in qgraph.inputs},
                                    "outputs": {t.name: {"dtype": str(t.dtype), "shape": list(t.shape or [])}
                                                for t in qgraph.outputs}}
        manifest.update(self.write_graph(qgraph, qdir, "model.onnx"))
        write_encodings(qdir / "encodings.json", encodings_file_of(qctx.plan))
        manifest.update({"opset": int(qgraph.opset), "precision": precision_label(scheme), "encodings": "encodings.json",
                         "quant": qctx.plan.summary()})
        manifest.update(write_task_files(qctx, qdir, quantized=True, plan=qctx.plan))
        write_json(qdir / MANIFEST_NAME, manifest)
        return QDQ_DIR

    def verify(self, artifact_dir: Path, feeds: dict[str, Any], task: str | None = None, *,
               model: str | os.PathLike[str] | None = None,
               loras: Mapping[str, str | os.PathLike[str]] | None = None) -> dict[str, Any]:
        """The TFLite report of :meth:`TfliteTarget.verify`, plus ``qdq``: the QDQ ONNX form on ORT CPU
        against the same float reference, and ``agreement_sqnr_db`` between the two forms."""
        from quadc.quant.affine import sqnr_db
        from quadc.runtime.engine import Engine
        from quadc.runtime.tflite_engine import TfliteEngine
        from quadc.targets.float_reference import float_reference

        report = super().verify(artifact_dir, feeds, task, model=model, loras=loras)
        qdq = Engine(Path(artifact_dir) / QDQ_DIR).run(feeds, task=task)
        tfl = TfliteEngine(artifact_dir).run(feeds, task=task)
        ref = float_reference(TfliteEngine(artifact_dir).manifest, feeds, task, model=model, loras=loras)
        report["qdq"] = {name: {"sqnr_db": round(float(sqnr_db(np.asarray(ref[name], np.float64),
                                                                 np.asarray(v, np.float64))), 4),
                                "agreement_sqnr_db": round(float(sqnr_db(np.asarray(v, np.float64),
                                                                         np.asarray(tfl[name], np.float64))), 4)}
                         for name, v in qdq.items()}
        return report
