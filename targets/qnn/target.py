"""Target ``qnn``: Qualcomm HTP. The HTP-legal QDQ ONNX graph (opset 21, static shapes), its AIMET
encodings for Qualcomm's own converter, and a QNN context binary compiled by onnxruntime-qnn's HTP backend.

Pipeline (:attr:`QnnTarget.passes`)::

    float, qnn-groupnorm, quant-plan, qnn-gelu, qnn-div-const, qnn-const-first, qdq-insert(act_matmul_8bit), qnn::requantize

- ``qnn-groupnorm`` lowers GroupNormalization to the InstanceNormalization form HTP runs; it adds
  tensors with ranges of their own, so it comes before calibration (on TorchScript exports, which have
  no GroupNormalization, it changes nothing and the calibration stays shared with the other targets);
- ``quant-plan`` derives the encodings in the ``qnn-htp`` scheme (uint16 asymmetric activations, 8-bit
  weights, uint8 asymmetric LoRA inputs);
- ``qnn-gelu`` fuses Erf-GELU into ``Gelu`` (HTP has no Erf); it keeps tensor names, so it runs after
  calibration and shares it;
- ``qnn-div-const`` writes a division by a float constant as a multiplication by its reciprocal (with
  ``Div(x, c)`` the HTP backend fails to finalize the VAE decoder); it keeps tensor names, as qnn-gelu;
- ``qnn-const-first`` puts the constant operand of Add/Mul first (with it second, as the dynamo exporter
  writes linear biases, the HTP backend fails to finalize the graph); numbers and names unchanged;
- ``qdq-insert`` with ``act_matmul_8bit``: a MatMul of two 16-bit activations takes its second input as
  uint8, one of HTP's MatMul type pairs, so the ORT CPU graph computes what HTP computes;
- ``qnn::requantize`` (:mod:`.requantize`): with ``a8_fraction`` mixing uint8 and uint16, each op gets
  activations of one type (uint8 when all its I/O are, else uint16) through explicit requantize chains
  (QNN ``Convert``); w8a16 graphs are left as they are.

The NPU passes (preset ``npu``) go before ``qnn-groupnorm`` (they change the graph, so calibration
must see their result): ``passes = ("float", "npu", "qnn-groupnorm", "quant-plan", "qnn-gelu",
"qnn-div-const", "qnn-const-first", "qdq-insert", "qnn::requantize")``; :meth:`QnnTarget.pipeline` then keeps SiLU as Sigmoid*Mul
(``conv-act-fusion.silu=keep``). Measured that way on the bundled model (16 calibration inputs): every
node on HTP, 36 dB against the float graph and 43 dB against the same QDQ graph on the CPU.

Artifact::

    model.onnx (+ .data)       the HTP-legal QDQ graph; LoRA inputs are uint8 graph inputs (no defaults)
                               read through DequantizeLinear with ONE shared encoding each
    encodings.json             AIMET 1.0.0 encodings of exactly this graph's tensors (--quantization_overrides)
    model_ctx.onnx             onnxruntime's context model: EPContext node(s) naming the binary
    model_ctx_qnn.bin          the QNN context binary (HTP), compiled with every node on HTP
    lora/<task>.*              uint8 LoRA tensors under the shared encodings: bound as they are
    manifest.json              ... and "qnn": context files, ep_compatibility_info, provider options

Options (``--set qnn.OPTION=VALUE``; ``--htp-arch`` / ``--soc-model``): ``htp_arch`` and ``soc_model`` are
passed to the QNN provider; ``context_embed`` puts the binary inside ``model_ctx.onnx`` (embed mode 1)
instead of beside it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.options import PassOption
from quadc.quant.encodings import write_encodings
from quadc.quant.plan import QuantPlan
from quadc.quant.plan_file import encodings_file_of
from quadc.quant.schemes import get_scheme
from quadc.targets.base import Target
from quadc.targets.qnn import legality
from quadc.targets.qnn.requantize import mixed_units

if TYPE_CHECKING:
    from quadc.context import CompileContext
    from quadc.passes import PassPipeline

GRAPH_FILE = "model.onnx"
ENCODINGS_FILE = "encodings.json"
CONTEXT_FILE = "model_ctx.onnx"
BASE_TASKS = (None, "none")


class QnnTarget(Target):
    """Qualcomm HTP: HTP-legal QDQ ONNX + AIMET encodings + a QNN context binary (onnxruntime-qnn)."""

    name = "qnn"
    description = ("Qualcomm HTP: HTP-legal QDQ ONNX (opset 21), AIMET encodings and a QNN context binary "
                   "compiled by onnxruntime-qnn; uint8 LoRA inputs under one shared encoding per slot")
    passes = ("float", "qnn-groupnorm", "quant-plan", "qnn-gelu", "qnn-div-const", "qnn-const-first", "qdq-insert", "qnn::requantize")
    static_shapes = True
    requires_passes = ("lora-inputs", "quant-plan", "qdq-insert")
    scheme = "qnn-htp"
    options = (
        PassOption("htp_arch", str, None, "HTP architecture of the context binary, e.g. 73 or 75 (QNN provider "
                   "option htp_arch)"),
        PassOption("soc_model", str, None, "SoC model of the context binary, e.g. 57 (QNN provider option "
                   "soc_model)"),
        PassOption("context_embed", bool, False, "embed the context binary in model_ctx.onnx (embed mode 1) "
                   "instead of writing it beside it"),
    )

    @classmethod
    def available(cls) -> tuple[bool, str]:
        from quadc.runtime.qnn_engine import qnn_available

        return qnn_available()

    def pipeline(self) -> PassPipeline:
        pipeline = super().pipeline().set_options("qdq-insert", act_matmul_8bit=True, opset="21")
        if "conv-act-fusion" in pipeline:
            # SiLU as a quadc.SiLU local function makes onnxruntime abort while compiling the context
            # ("Processed 100 nodes. Expected to process 1486"); left as Sigmoid*Mul it runs on HTP.
            pipeline.set_options("conv-act-fusion", silu="keep")
        return pipeline

    def provider_options(self) -> dict[str, str]:
        """The QNN provider options of this target's context binary."""
        from quadc.runtime.qnn_engine import htp_provider_options

        return htp_provider_options(self.opts["htp_arch"], self.opts["soc_model"])

    # --------------------------------------------------------------------------------------------- emit
    def check_graph(self, graph: gs.Graph, plan: QuantPlan) -> None:
        """A one-line QuadcError when the QDQ graph breaks what HTP takes (see :mod:`.legality`)."""
        if graph.opset < 21:
            raise QuadcError(f"target qnn needs an opset-21 QDQ graph (16-bit Q/DQ), the graph has opset {graph.opset}; "
                             "keep qdq-insert's opset option at 21")
        checks = [
            (legality.matmul_pairs(graph, get_scheme(plan.scheme)),
             "keep qdq-insert's act_matmul_8bit option on, as the qnn pipeline sets it"),
            (mixed_units(graph),
             "keep pass qnn::requantize after qdq-insert, as the qnn pipeline has it"),
        ]
        for problems, fix in checks:
            if problems:
                more = f" ({len(problems) - 1} more)" if len(problems) > 1 else ""
                raise QuadcError(f"target qnn: {problems[0]}{more}, which HTP does not take; {fix}")

    def emit(self, graph: gs.Graph, ctx: CompileContext, out_dir: Path) -> dict[str, Any]:
        from quadc.lora.pack import write_task_files
        from quadc.runtime.qnn_engine import compile_context

        ok, why = self.available()
        if not ok:
            raise QuadcError(f"target qnn cannot compile the QNN context binary: {why}")
        plan = ctx.plan
        if not isinstance(plan, QuantPlan):
            raise QuadcError("target qnn needs a quantization plan; its pipeline must include quant-plan")
        if plan.lora_float_inputs:
            raise QuadcError("target qnn takes uint8 LoRA inputs; drop --lora-float (lora_float_inputs)")
        self.check_graph(graph, plan)
        entries: dict[str, Any] = self.write_graph(graph, out_dir, GRAPH_FILE)
        qdq_bytes = entries.pop("shared_rom_bytes")
        proto = onnx.load(str(out_dir / GRAPH_FILE), load_external_data=False)
        defaults = legality.lora_defaults(proto)
        if defaults:
            raise QuadcError(f"target qnn: {defaults[0]}; a QNN context model with LoRA defaults fails to load")
        del proto
        write_encodings(out_dir / ENCODINGS_FILE, encodings_file_of(plan))
        ctx.progress("compiling the QNN context binary on the HTP backend (onnxruntime-qnn)")
        qnn = compile_context(out_dir / GRAPH_FILE, out_dir / CONTEXT_FILE, self.provider_options(),
                              embed=self.opts["context_embed"])
        context_files = [qnn["context_model"]] + ([qnn["context_binary"]] if qnn["context_binary"] else [])
        qnn["files"] = {f: (out_dir / f).stat().st_size for f in context_files}
        entries.update({
            "opset": int(graph.opset),
            "precision": plan.precision,
            "quant": plan.summary(),
            "encodings": ENCODINGS_FILE,
            "executor": "qnn-htp",
            "qnn": qnn,
            "qdq_graph_bytes": qdq_bytes,
            # What a phone keeps: the context binary (its weights and compiled graph) and the context model.
            "shared_rom_bytes": sum(qnn["files"].values()),
        })
        entries.update(write_task_files(ctx, out_dir, quantized=True, plan=plan))
        return entries

    # ------------------------------------------------------------------------------------------- verify
    def verify(self, artifact_dir: Path, feeds: dict[str, Any], task: str | None = None, *,
               model: str | os.PathLike[str] | None = None,
               loras: Mapping[str, str | os.PathLike[str]] | None = None,
               executor: str = "auto", reference: Any = None) -> dict[str, Any]:
        """Run the artifact with ``task`` bound (``executor`` ``qnn-htp``: its QNN context on the HTP
        backend; ``cpu``: its QDQ graph on ORT CPU; ``auto``: HTP when onnxruntime-qnn is installed) and
        report the executor and per output ``max_abs``, ``max_abs_err`` and
        ``sqnr_db`` against the float LoRA-as-input graph with the task's float LoRA bound
        (:class:`~quadc.targets.float_reference.FloatReference`, rebuilt from ``model`` and ``loras``,
        which default to the bundled ones; built once per process for one source and reused)."""
        from quadc.runtime.engine import Engine
        from quadc.targets.float_reference import FloatReference, output_errors

        engine = Engine(artifact_dir, executor=executor)
        # The reference first: a missing source model or LoRA is refused before the artifact runs.
        ref = reference if reference is not None else FloatReference.cached(engine.manifest, model, loras)
        want_all = ref.run(feeds, None if task in BASE_TASKS else task)
        out = engine.run(feeds, task=task)
        report: dict[str, Any] = {"task": task or "none", "executor": engine.executor,
                                  "reference": "float LoRA-as-input graph", "outputs": output_errors(out, want_all)}
        return report
