"""Pass ``quant-plan``: the quantization planning stage — calibration, QSS, the anchor (or unified
fallback) and every encoding — as a named step of the pipeline.

It does not change the graph: it reads the float LoRA-as-input graph and the LoRA set, and writes
``ctx.plan`` (a :class:`~quadc.quant.plan.QuantPlan`) that ``qdq-insert``, packing and the quantized
targets read. It packs every task for the slots (:func:`quadc.lora.pack.pack_tasks`) and hands the
tensors to :func:`quadc.quant.planner.build_plan`. Its options are the planner's
(:data:`quadc.quant.plan_options.PLAN_OPTIONS`: encoding scheme, precision, a8_fraction, calibration
feeds, LoRA policy, per-channel weights, an encodings file to compile against).

Calibration is target-independent: it is kept in ``ctx.calibrations`` under the graph's fingerprint and
the calibration options, so targets compiled from one source (``quadc compile --target all``) calibrate
each distinct graph once; the encodings are then derived in the target's scheme (option ``scheme``, else
``ctx.options["scheme"]`` that the compiler sets from the target, else ``qnn-htp``).

Given::

    graph inputs: sample, timestep, encoder_hidden_states, to_q.lora_down: float[8, 4], to_q.lora_up: float[4, 8]
    h = MatMul(x, W) ...                          ctx.plan = None

Result (graph unchanged)::

    ctx.plan = QuantPlan(activations={h: uint16 ...}, weights={W: uint8 ...},
                         lora={to_q.lora_down: uint8 (one, shared by every task), ...})
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.lora.pack import pack_tasks
from quadc.passes.base import GraphPass, PassResult, register_pass
from quadc.quant.plan_options import PLAN_OPTIONS, PlanOptions
from quadc.quant.planner import build_plan
from quadc.quant.schemes import get_scheme


@register_pass
class QuantPlanStage(GraphPass):
    """Plan quantization: calibrate with every task bound, QSS anchor or unified, shared LoRA encodings."""

    name = "quant-plan"
    requires = ("lora-inputs",)
    options = PLAN_OPTIONS

    def run(self, graph: gs.Graph, ctx: CompileContext) -> PassResult:
        opts = PlanOptions(**self.opts)
        scheme = get_scheme(opts.scheme or ctx.options.get("scheme"))
        calibration = None
        if not opts.encodings_file:
            names = list(ctx.loras or {}) if ctx.lora_slots else []
            calibration = ctx.calibrations.get(graph, ctx.lora_slots, lambda: pack_tasks(ctx.loras, ctx.lora_slots),
                                               names, opts, ctx.progress)
        ctx.plan = build_plan(graph, ctx.lora_slots, calibration.tasks if calibration else {}, opts, ctx.progress,
                              scheme=scheme, calibration=calibration, unquantized=ctx.unquantized)
        s = ctx.plan.summary()
        return PassResult(False, {"activations": s["activation_encodings"], "weights": s["weight_encodings"],
                                  "lora_inputs": s["lora_encodings"], "a8": s["a8_tensors"]})

    def postcondition(self, graph: gs.Graph, ctx: CompileContext) -> list[str]:
        plan = ctx.plan
        if plan is None:
            return ["ctx.plan is set"]
        missing = [n for s in ctx.lora_slots.values() for n in (s.down_input, s.up_input) if n not in plan.lora]
        return [f"every LoRA input has one shared encoding (missing: {', '.join(missing[:3])})"] if missing else []
