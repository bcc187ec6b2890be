"""One builder of the AIMET encodings file: what the onnx-qdq artifact ships reads back as the very plan
the compile made (the file the tests round-trip is the file artifacts are written with)."""

from __future__ import annotations

import json

import pytest

from quadc.compiler import CompileOptions, compile_model, prepare
from quadc.passes import PassPipeline, run_pipeline
from quadc.quant.plan_file import plan_from_encodings_file
from quadc.quant.plan_options import PlanOptions


@pytest.mark.parametrize("options", [{}, {"precision": "w8a8", "per_channel": True}])
def test_artifact_encodings_read_back_as_the_plan(tmp_path, options):
    graph, ctx, _ = prepare(None, {})
    pipeline = PassPipeline.parse("float,quant-plan")
    if options:
        pipeline.set_options("quant-plan", **options)
    graph, _ = run_pipeline(graph, pipeline.build(), ctx)
    plan = ctx.plan
    assert plan is not None and plan.lora and plan.weights and plan.activations

    out = tmp_path / "art"
    compile_model(None, out, CompileOptions(target="onnx-qdq", pass_options={"quant-plan": options}))
    back = plan_from_encodings_file(graph, ctx.lora_slots, PlanOptions(encodings_file=str(out / "encodings.json")),
                                    lambda _: None)
    assert back.activations == plan.activations
    assert back.weights == plan.weights
    assert back.lora == plan.lora
    assert back.precision == plan.precision  # w8a8 comes back from the file, not from the default option
    assert back.per_channel == plan.per_channel
    assert sorted(back.a8_tensors) == sorted(plan.a8_tensors)
    args = json.loads((out / "encodings.json").read_text())["quantizer_args"]
    assert args["lora_inputs"] == sorted(plan.lora)
    assert args["activation_bitwidth"] == (8 if options.get("precision") == "w8a8" else 16)
