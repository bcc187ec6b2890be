"""What alignment works on: the float graph (teacher), the quantized graph (student), the shared encodings.

:func:`build_workspace` loads the model and LoRAs the way ``quadc compile`` does
(:func:`quadc.compiler.prepare`) and runs the target's own pipeline (``onnx-qdq`` by default, or the
user's ``--passes``, with every ``--set`` option) in two parts: the passes before ``quant-plan`` give the
float LoRA-as-input graph, which is kept as the teacher; the rest (``quant-plan``, ``qdq-insert`` and
anything after) gives the QDQ graph the artifact would hold, with ``ctx.plan`` holding every encoding.
The student is built from that graph, so it is the artifact, whatever options quantized it.

:func:`session` opens an onnxruntime session with ``session.qdq_matmulnbits_accuracy_level=1``:
onnxruntime's CPU provider otherwise fuses ``DequantizeLinear(uint8 weight) -> MatMul`` into
``MatMulNBits`` at accuracy level 4, which quantizes the *activation* to int8 inside the MatMul, an
approximation the QDQ graph does not contain (on the tiny U-Net it moves the output by 40 dB SQNR from the
graph's own result). Level 1 computes in float32, so these sessions compute what the graph says.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from quadc.context import CompileContext, silent_progress
from quadc.errors import QuadcError
from quadc.lora.model import LoRA
from quadc.lora.slots import LoRASlot
from quadc.quant.plan import QuantPlan

__all__ = ["Workspace", "build_workspace", "session"]

#: onnxruntime session config that keeps weight-only MatMuls in float32 (see the module docstring).
EXACT_MATMUL_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}
_EMBED_MAX = 1 << 30


def session(graph: gs.Graph) -> Any:
    """An onnxruntime CPU session over ``graph`` that computes the graph's own arithmetic (see the module
    docstring); graphs with over 1 GB of weights go through a temporary file."""
    import onnxruntime as ort

    from quadc.graph import save_model, to_model_bytes, weight_bytes

    so = ort.SessionOptions()
    so.log_severity_level = 3
    for key, value in EXACT_MATMUL_CONFIG.items():
        so.add_session_config_entry(key, value)
    if weight_bytes(graph) <= _EMBED_MAX:
        return ort.InferenceSession(to_model_bytes(graph), so, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="quadc-align-") as tmp:
        path = save_model(graph, Path(tmp) / "model.onnx", external=True)
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@dataclass
class Workspace:
    """The graphs and decisions of one alignment (see the module docstring)."""

    model_path: Path
    ctx: CompileContext
    float_graph: gs.Graph
    float_slots: dict[str, LoRASlot]
    qdq_graph: gs.Graph
    pass_options: dict[str, dict[str, Any]]

    @property
    def plan(self) -> QuantPlan:
        assert self.ctx.plan is not None
        return self.ctx.plan

    @property
    def slots(self) -> dict[str, LoRASlot]:
        """The slot table of the quantized graph (the artifact's)."""
        return self.ctx.lora_slots

    @property
    def loras(self) -> dict[str, LoRA]:
        return dict(self.ctx.loras or {})

    @property
    def anchor(self) -> str | None:
        """The anchor task (its LoRA is never trained), None under the unified fallback."""
        return self.plan.anchor

    def trainable_tasks(self) -> list[str]:
        """The tasks alignment trains: every task but the anchor."""
        return [t for t in self.loras if t != self.anchor]


def _quant_plan_index(names: Sequence[str]) -> int:
    if "quant-plan" not in names or "qdq-insert" not in names:
        raise QuadcError(f"align needs a quantizing pipeline with quant-plan and qdq-insert, got {','.join(names)}; "
                         "use --target onnx-qdq (the default) or add the qdq preset to --passes")
    if names.index("qdq-insert") < names.index("quant-plan"):
        raise QuadcError("align needs quant-plan before qdq-insert in the pipeline")
    return names.index("quant-plan")


def build_workspace(model: str | os.PathLike[str] | None, loras: Mapping[str, str | os.PathLike[str]], *,
                    target: str = "onnx-qdq", passes: str | Sequence[str] | None = None,
                    pass_options: Mapping[str, Mapping[str, Any]] | None = None,
                    plan_defaults: Mapping[str, Any] | None = None,
                    progress: Callable[[str], None] = silent_progress) -> Workspace:
    """Load ``model`` (default: the bundled tiny U-Net and, without ``loras``, its LoRAs) and run the
    target's pipeline, keeping the float graph before ``quant-plan`` (see the module docstring).
    ``plan_defaults``: ``quant-plan`` options used where ``pass_options`` leaves them unset."""
    from quadc.compiler import build_pipeline, prepare
    from quadc.passes import run_pipeline
    from quadc.passes.pipeline import check_prerequisites
    from quadc.quant.calibrate import clone_graph
    from quadc.targets import get_target

    options = {k: dict(v) for k, v in (pass_options or {}).items()}
    tgt = get_target(target)
    pipeline = build_pipeline(tgt, passes, options)
    split = _quant_plan_index(pipeline.names)
    if plan_defaults:
        plan = options.setdefault("quant-plan", {})
        plan.update({k: v for k, v in plan_defaults.items() if plan.get(k) is None})
        pipeline = build_pipeline(tgt, passes, options)
    built = pipeline.build()
    check_prerequisites(built)
    graph, ctx, model_path = prepare(model, loras, progress)
    if not ctx.loras:
        raise QuadcError("align needs at least one LoRA (--lora NAME=PATH)")
    ctx.options.setdefault("target", tgt.name)
    graph, _ = run_pipeline(graph, built[:split], ctx)
    float_graph = clone_graph(graph)
    float_slots = dict(ctx.lora_slots)
    graph, _ = run_pipeline(graph, built[split:], ctx)
    if ctx.plan is None:
        raise QuadcError("the pipeline made no quantization plan; align needs quant-plan")
    bad = [m for m, s in ctx.lora_slots.items() if np.dtype(s.dtype) != np.float32]
    if bad:
        raise QuadcError(f"align works on float32 U-Nets; slot '{bad[0]}' is {ctx.lora_slots[bad[0]].dtype} "
                         "(export with --dtype fp32)")
    return Workspace(model_path, ctx, float_graph, float_slots, graph, options)
