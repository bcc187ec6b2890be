"""Golden-graph harness: run one pass on a small ONNX-text graph and print the result canonically.

Cases live in ``golden_graphs/<pass>/<case>.in.onnxtxt`` with the expected result in
``<case>.out.onnxtxt``. Regenerate expected files with ``QUADC_REGEN_GOLDEN=1 pytest tests/test_golden.py``
and review the diff like code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.frontend.model_info import AttachPoint, ModelInfo
from quadc.graph import to_model_bytes
from quadc.lora.slots import LoRASlot
from quadc.options import parse_bool
from quadc.passes import get_pass
from quadc.quant.affine import Encoding
from quadc.quant.plan import QuantPlan

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden_graphs"
REGEN = parse_bool(os.environ.get("QUADC_REGEN_GOLDEN", "0"), "QUADC_REGEN_GOLDEN")


def golden_cases() -> list[tuple[str, Path]]:
    """(pass name, input file) for every golden case."""
    return [(p.parent.name, p) for p in sorted(GOLDEN_DIR.glob("*/*.in.onnxtxt"))]


def parse_text(path: Path) -> gs.Graph:
    """A gs.Graph from a file in ONNX text syntax."""
    model = onnx.parser.parse_model(path.read_text())
    onnx.checker.check_model(model)
    graph = gs.import_onnx(model)
    graph.opset_imports = {d.domain: d.version for d in model.opset_import}
    graph.ir_version = model.ir_version
    return graph


def canonical_text(graph: gs.Graph) -> str:
    """The graph in ONNX text syntax after a toposort: what golden files hold."""
    graph.toposort()
    model = onnx.load_from_string(to_model_bytes(graph))
    return onnx.printer.to_text(model).strip() + "\n"


def plan_from_spec(spec: dict) -> QuantPlan:
    """A QuantPlan from a ctx.json ``plan`` object.

    ``activations``, ``weights`` and ``lora`` map tensor names to encodings in
    :meth:`Encoding.to_dict` form (``{"qtype": "uint16", "scale": 0.01, "zero_point": 32768}``, plus
    ``axis``/``symmetric`` for per-channel ones); other keys (``precision``, ``per_channel``,
    ``lora_float_inputs``, ``a8_tensors``) are QuantPlan fields.
    """
    fields = {k: v for k, v in spec.items() if k not in ("activations", "weights", "lora")}
    plan = QuantPlan(**fields)
    for section in ("activations", "weights", "lora"):
        target = getattr(plan, section)
        for name, enc in spec.get(section, {}).items():
            target[name] = Encoding.from_dict(enc)
    return plan


def case_context(in_path: Path) -> CompileContext:
    """The context for a case: ``<case>.ctx.json`` may give ``options``, attach ``points``, LoRA ``slots``
    (:class:`~quadc.lora.slots.LoRASlot` fields by module, for passes that run after ``lora-inputs``) and
    a ``plan`` (a QuantPlan, see :func:`plan_from_spec`) that becomes ``ctx.plan``; ``options`` are the
    pass's declared options."""
    ctx = CompileContext()
    sidecar = in_path.with_name(in_path.name.replace(".in.onnxtxt", ".ctx.json"))
    if sidecar.exists():
        spec = json.loads(sidecar.read_text())
        ctx.options["pass_options"] = dict(spec.get("options", {}))
        points = {}
        for module, fields in spec.get("points", {}).items():
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
            points[module] = AttachPoint(module=module, **fields)
        ctx.model_info = ModelInfo(points=points)
        for module, fields in spec.get("slots", {}).items():
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
            ctx.lora_slots[module] = LoRASlot(module=module, **fields)
        if "plan" in spec:
            ctx.plan = plan_from_spec(spec["plan"])
    return ctx


def case_pass(pass_name: str, ctx: CompileContext):
    """The pass of a case, built with the case's options (kept in ``ctx.options["pass_options"]``)."""
    return get_pass(pass_name, ctx.options.get("pass_options", {}))


def run_case(pass_name: str, in_path: Path,
             make_ctx: Callable[[Path], CompileContext] = case_context) -> tuple[str, Path]:
    """Run the pass on the case; return (actual canonical text, expected file path)."""
    graph = parse_text(in_path)
    ctx = make_ctx(in_path)
    case_pass(pass_name, ctx).run(graph, ctx)
    out_path = in_path.with_name(in_path.name.replace(".in.onnxtxt", ".out.onnxtxt"))
    return canonical_text(graph), out_path
