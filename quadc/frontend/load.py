"""Load a U-Net ONNX file with validation, and format what the frontend found for ``quadc inspect``."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.frontend.model_info import AttachPoint, ModelInfo
from quadc.frontend.recognize import recognize_unet
from quadc.graph import load_model


def load(path: str | os.PathLike[str]) -> tuple[gs.Graph, ModelInfo]:
    """Load an ONNX U-Net (weights stay memory-mapped) and recognize it (:func:`recognize_unet`).

    Raises a one-sentence QuadcError for a missing, unreadable, truncated or non-ONNX file and for a
    graph without the U-Net inputs (``sample``, ``timestep``, ``encoder_hidden_states``).
    """
    path = Path(path)
    if path.exists() and path.is_file() and path.stat().st_size == 0:
        raise QuadcError(f"{path}: the file is empty; export the model again")
    graph = load_model(path)
    _refuse_fused_graph(graph, path)
    info = recognize_unet(graph, source=path)
    if not info.points:
        raise QuadcError(f"{path}: found no Linear or Conv layer with constant weights; quadc needs a float "
                         "U-Net with its weights as initializers (not an already quantized one)")
    return graph, info


def _refuse_fused_graph(graph: gs.Graph, path: Path) -> None:
    """One line for a graph that onnxruntime's transformer optimizer (or Olive) has already fused: its
    ``com.microsoft`` ops (NhwcConv, GroupNorm, MultiHeadAttention, ...) hide the Linear/Conv layers LoRAs
    attach to, and several have no CPU kernel (calibration ended in an onnxruntime traceback)."""
    fused = Counter(node.op for node in graph.nodes if node.domain == "com.microsoft")
    if fused:
        ops = ", ".join(f"{op} x{n}" for op, n in fused.most_common(3))
        raise QuadcError(f"{path}: the graph holds onnxruntime contrib ops ({ops}), as onnxruntime's transformer "
                         "optimizer or Olive writes them; give quadc the U-Net as torch.onnx exported it, before "
                         "those fusions")


def _group_of(module: str) -> str:
    """``down_blocks.0.attentions.0.x`` -> ``down_blocks.0``; ``conv_in`` -> ``conv_in``."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def _shape_text(point: AttachPoint) -> str:
    if point.kind == "conv":
        extra = f" {point.kernel[0]}x{point.kernel[1]}"
        if point.stride != (1, 1):
            extra += f" stride {point.stride[0]}"
        return f"{point.d_in:>5} -> {point.d_out:<5}{extra}"
    return f"{point.d_in:>5} -> {point.d_out:<5}"


def _fmt_dims(dims: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def format_inspect(info: ModelInfo) -> str:
    """Human-readable summary for ``quadc inspect``: I/O, parameters, ops, attach points, attention."""
    lines: list[str] = []
    opset = f", opset {info.opset}" if info.opset else ""
    lines.append(f"exporter: {info.exporter}{opset}")
    lines.append("inputs:")
    roles = {name: role for role, name in info.roles.items()}
    for name, (dtype, dims) in info.inputs.items():
        role = f"  ({roles[name]})" if name in roles and roles[name] != name else ""
        lines.append(f"  {name:<24} {dtype:<8} {_fmt_dims(dims)}{role}")
    lines.append("outputs:")
    for name, (dtype, dims) in info.outputs.items():
        lines.append(f"  {name:<24} {dtype:<8} {_fmt_dims(dims)}")
    lines.append(f"parameters: {info.parameters:,}")
    total = sum(info.op_histogram.values())
    lines.append(f"ops: {total} nodes, {len(info.op_histogram)} types")
    items = list(info.op_histogram.items())
    for i in range(0, len(items), 4):
        lines.append("  " + "  ".join(f"{op:<22}{count:>5}" for op, count in items[i:i + 4]).rstrip())
    kinds = defaultdict(int)
    for point in info.points.values():
        kinds[point.kind] += 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    lines.append(f"attachment points: {len(info.points)} ({summary})")
    if info.unnamed_points:
        lines.append(f"  note: {info.unnamed_points} layers have no recoverable module path and are "
                     "listed by node name")
    groups: dict[str, list[AttachPoint]] = defaultdict(list)
    for point in info.points.values():
        groups[_group_of(point.module)].append(point)
    width = max((len(p.module) for p in info.points.values()), default=0)
    for group, points in groups.items():
        lines.append(f"  {group}:")
        for point in points:
            bias = "" if point.bias else "  no bias"
            lines.append(f"    {point.module:<{width}}  {point.kind:<6} {_shape_text(point)}{bias}")
    lines.append(f"attention blocks: {len(info.attention)}")
    for block in info.attention:
        heads = f"{block.heads} heads" if block.heads else "heads ?"
        projs = ",".join(p[len(block.module) + 1:] for p in block.projections)
        lines.append(f"  {block.module:<{width}}  {block.kind:<5}  {heads:<9} {projs}")
    return "\n".join(line.rstrip() for line in lines) + "\n"
