"""A small ONNX-to-torch interpreter: a compiled quadc graph (float or QDQ) as a differentiable torch module.

:class:`OnnxModule` walks the graph once when built and keeps a list of steps; ``forward`` runs them on
torch tensors. Built for quadc's graphs, and so:

- **Q -> DQ pairs become one fake quantizer** (:func:`quadc.align.fakequant.fake_quantize`) with the pair's
  scale and zero point: the forward equals onnxruntime's QuantizeLinear/DequantizeLinear bit for bit, the
  gradient is the clipped straight-through estimator. A DequantizeLinear of an integer graph input (the
  uint8 LoRA inputs) named in ``float_dq_inputs`` takes a *float* tensor instead and fake-quantizes it with
  the DQ's encoding: what binding that tensor's stored integers would give, differentiable.
- **Constant subgraphs are folded once** (weights' DequantizeLinear, int32 biases, shape arithmetic on
  constants), in numpy for Q/DQ (same arithmetic as :mod:`quadc.quant.affine`) and with the op handlers
  otherwise. Constants are plain tensors, not parameters or buffers: nothing of the graph is trainable,
  and distributed wrappers do not broadcast the weights; ``module.to(device)`` still moves them.
- **ONNX local functions** (``quadc.SiLU``, ``quadc.Gelu`` of ``conv-act-fusion``) run their body as a
  nested module.
- **Activations are freed after their last reader** within a forward (autograd keeps what backward needs).

Why not onnx2torch: version 1.5.15 (the latest) converts neither QuantizeLinear nor DequantizeLinear, has
no converters for opset 21 (the QDQ artifact's opset), and imports torchvision at load, whose wheel here is
built for another torch. The operators themselves are in :mod:`quadc.align.ops`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import torch

from quadc.align.fakequant import FakeQuant
from quadc.align.ops import OPS, SPLIT
from quadc.errors import QuadcError

__all__ = ["OnnxModule"]

_QDQ_DOMAINS = (None, "", "ai.onnx", "com.microsoft")
_INT_RANGES = {np.dtype(t): (int(np.iinfo(t).min), int(np.iinfo(t).max))
               for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32)}


@dataclass
class _Step:
    fn: Callable[[list[Any]], Any]
    inputs: list[str]
    outputs: list[str]
    op: str


def _axis_shape(values: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    """Per-axis ``values`` reshaped to broadcast along ``axis`` of a rank-``ndim`` tensor."""
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis % ndim] = values.size
    return values.reshape(shape)


def _qdq_axis(node: gs.Node, scale: np.ndarray) -> int | None:
    if int(node.attrs.get("block_size", 0) or 0):
        raise QuadcError(f"{node.op} '{node.name}' uses blocked quantization, which align does not simulate")
    return int(node.attrs.get("axis", 1)) if np.ndim(scale) == 1 and np.size(scale) > 1 else None


def _np_quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None) -> np.ndarray:
    lo, hi = _INT_RANGES[zp.dtype]
    s = _axis_shape(scale.astype(np.float32), axis, x.ndim)
    z = _axis_shape(zp.astype(np.float32), axis, x.ndim)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        v = np.rint(np.divide(np.asarray(x, np.float32), s, dtype=np.float32)) + z
    return np.clip(v, lo, hi).astype(zp.dtype)


def _np_dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int | None) -> np.ndarray:
    z = _axis_shape(np.zeros((), np.int64) if zp is None else zp.astype(np.int64), axis, q.ndim)
    s = _axis_shape(scale.astype(np.float32), axis, q.ndim)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def _to_torch(value: np.ndarray) -> torch.Tensor:
    arr = np.ascontiguousarray(value)
    if arr.dtype == np.uint16:  # few torch ops take uint16; widen (exact)
        arr = arr.astype(np.int32)
    return torch.from_numpy(arr.copy())


def _same(a: gs.Tensor, b: gs.Tensor, consts: Mapping[str, np.ndarray]) -> bool:
    if a is b or (a.name and a.name == b.name):
        return True
    va, vb = consts.get(a.name), consts.get(b.name)
    return va is not None and vb is not None and va.dtype == vb.dtype and np.array_equal(va, vb)


class OnnxModule(torch.nn.Module):
    """Run a gs graph with torch (see the module docstring). ``forward(inputs)`` takes every graph input
    by name and returns ``{output name: tensor}``."""

    def __init__(self, graph: gs.Graph, *, float_dq_inputs: Collection[str] = ()) -> None:
        super().__init__()
        self.input_names = [t.name for t in graph.inputs]
        self.output_names = [t.name for t in graph.outputs]
        self._float_dq = set(float_dq_inputs) & set(self.input_names)
        self._folded: dict[str, np.ndarray] = {}
        self._steps: list[_Step] = []
        self._quantizers: list[FakeQuant] = []
        self._functions = {(f.domain or "", f.name): f for f in getattr(graph, "functions", None) or []}
        self.calls = torch.nn.ModuleDict()  # one OnnxModule per local function used (quadc.SiLU, ...)
        self._build(graph)
        self._consts: dict[str, torch.Tensor] = {}
        used = {n for s in self._steps for n in s.inputs} | set(self.output_names)
        for name in sorted(used & set(self._folded)):
            self._consts[name] = _to_torch(self._folded[name])
        self._folded.clear()
        self._drop = self._last_uses()

    # ------------------------------------------------------------------------------------------- building
    def _build(self, graph: gs.Graph) -> None:
        consts = self._folded
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant):
                consts[t.name] = np.asarray(t.values)
        inputs = set(self.input_names)
        fused: set[int] = set()
        for node in graph.nodes:
            if id(node) in fused:
                continue
            names = [t.name if t is not None else "" for t in node.inputs]
            if node.op in ("QuantizeLinear", "DequantizeLinear") and node.domain in _QDQ_DOMAINS:
                self._qdq(node, consts, inputs, fused)
                continue
            if (node.domain or "", node.op) in self._functions:
                self._steps.append(_Step(self._call(node), names, [t.name for t in node.outputs], node.op))
                continue
            if node.domain not in (None, "", "ai.onnx"):
                raise QuadcError(f"operator {node.domain}::{node.op} ('{node.name}') is not supported by align")
            if node.op == "Constant":
                value = node.attrs.get("value")
                consts[node.outputs[0].name] = np.asarray(value.values if hasattr(value, "values") else value)
                continue
            fn = self._handler(node)
            outs = [t.name for t in node.outputs]
            if all(not n or n in consts for n in names):
                with torch.no_grad():
                    result = fn([_to_torch(consts[n]) if n else None for n in names])
                for name, value in zip(outs, result if isinstance(result, list | tuple) else [result], strict=False):
                    if name:
                        consts[name] = value.detach().cpu().numpy()
                continue
            self._steps.append(_Step(fn, names, outs, node.op))

    def _call(self, node: gs.Node) -> Callable[[list[Any]], Any]:
        """A call of an ONNX local function (e.g. ``quadc.SiLU``): its body as a nested module."""
        key = f"{node.domain or ''}__{node.op}".replace(".", "_")
        if key not in self.calls:
            if node.attrs:
                raise QuadcError(f"function {node.domain}.{node.op} is called with attributes, which align does not support")
            self.calls[key] = OnnxModule(self._functions[(node.domain or "", node.op)])
        body = self.calls[key]

        def run(ins: list[Any]) -> list[Any]:
            out = body(dict(zip(body.input_names, ins, strict=False)))
            return [out[n] for n in body.output_names]
        return run

    def _handler(self, node: gs.Node) -> Callable[[list[Any]], Any]:
        attrs = dict(node.attrs)
        if node.op == "Split":
            n_out = len(node.outputs)
            return lambda ins: SPLIT(ins, attrs, n_out)
        op = OPS.get(node.op)
        if op is None:
            raise QuadcError(f"operator {node.op} ('{node.name}') is not supported by align's interpreter; "
                             "see quadc/align/ops.py")
        return lambda ins: op(ins, attrs)

    def _qparams(self, node: gs.Node, consts: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int | None]:
        scale_t = node.inputs[1]
        zp_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name else None
        if scale_t.name not in consts or (zp_t is not None and zp_t.name not in consts):
            raise QuadcError(f"{node.op} '{node.name}' has a computed scale or zero point; align needs constant ones")
        scale = consts[scale_t.name]
        zp = consts[zp_t.name] if zp_t is not None else np.zeros(np.shape(scale), np.uint8)
        return scale, zp, _qdq_axis(node, scale)

    def _fake_quant(self, scale: np.ndarray, zp: np.ndarray, axis: int | None) -> FakeQuant:
        if scale.dtype != np.float32:
            raise QuadcError(f"align simulates float32 graphs; a Q/DQ scale is {scale.dtype}")
        lo, hi = _INT_RANGES.get(zp.dtype, (None, None))
        if lo is None:
            raise QuadcError(f"quantized type {zp.dtype} is not supported by align")
        return FakeQuant(torch.from_numpy(scale.astype(np.float32).reshape(-1).copy()).reshape(scale.shape),
                         torch.from_numpy(zp.astype(np.float32).reshape(-1).copy()).reshape(zp.shape), lo, hi, axis)

    def _qdq(self, node: gs.Node, consts: dict[str, np.ndarray], inputs: set[str], fused: set[int]) -> None:
        x = node.inputs[0]
        scale, zp, axis = self._qparams(node, consts)
        if node.op == "DequantizeLinear":
            if x.name in consts:
                consts[node.outputs[0].name] = _np_dequantize(consts[x.name], scale, zp, axis)
            elif x.name in self._float_dq:
                self._steps.append(_Step(self._fq_fn(scale, zp, axis), [x.name], [node.outputs[0].name], "FakeQuant"))
            else:  # an integer tensor computed in the graph or fed as integers: (q - zp) * scale
                s = torch.from_numpy(scale.astype(np.float32).copy())
                z = torch.from_numpy(zp.astype(np.float32).copy())

                def dq(ins: list[Any], s: torch.Tensor = s, z: torch.Tensor = z, axis: int | None = axis) -> Any:
                    q = ins[0].to(torch.float32)
                    return (q - _bcast(z, axis, q).to(q.device)) * _bcast(s, axis, q).to(q.device)
                self._steps.append(_Step(dq, [x.name], [node.outputs[0].name], "DequantizeLinear"))
            return
        # QuantizeLinear
        out = node.outputs[0]
        if x.name in consts:
            consts[out.name] = _np_quantize(consts[x.name], scale, zp, axis)
            return
        readers = list(out.outputs)
        pairable = bool(readers) and not any(t is out for t in self._graph_outputs(node)) and all(
            r.op == "DequantizeLinear" and r.domain in _QDQ_DOMAINS and r.inputs[0] is out
            and _same(r.inputs[1], node.inputs[1], consts)
            and (len(r.inputs) > 2 and len(node.inputs) > 2 and _same(r.inputs[2], node.inputs[2], consts))
            and _qdq_axis(r, scale) == axis for r in readers)
        if not pairable:
            raise QuadcError(f"QuantizeLinear '{node.name}' is not followed only by DequantizeLinear with its "
                             "encoding; align simulates Q -> DQ pairs")
        self._steps.append(_Step(self._fq_fn(scale, zp, axis), [x.name],
                                 [r.outputs[0].name for r in readers], "FakeQuant"))
        fused.update(id(r) for r in readers)

    def _graph_outputs(self, node: gs.Node) -> list[gs.Tensor]:
        return [t for t in node.outputs if t.name in self.output_names]

    def _fq_fn(self, scale: np.ndarray, zp: np.ndarray, axis: int | None) -> Callable[[list[Any]], Any]:
        fq = self._fake_quant(scale, zp, axis)
        self._quantizers.append(fq)

        def run(ins: list[Any]) -> Any:
            return fq(ins[0])
        return run

    def _last_uses(self) -> list[list[str]]:
        last: dict[str, int] = {}
        for i, step in enumerate(self._steps):
            for name in step.inputs:
                if name:
                    last[name] = i
        keep = set(self.output_names) | set(self._consts)
        drop: list[list[str]] = [[] for _ in self._steps]
        for name, i in last.items():
            if name not in keep:
                drop[i].append(name)
        return drop

    # ------------------------------------------------------------------------------------------ running
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> OnnxModule:
        """Move/cast the folded constants and quantizer parameters with the module (``.to``, ``.cuda``);
        integer constants (shapes, indices) stay on the CPU."""
        for name, t in list(self._consts.items()):
            if t.is_floating_point():
                self._consts[name] = fn(t)
        for fq in self._quantizers:
            fq.scale, fq.zero_point = fn(fq.scale), fn(fq.zero_point)
        return super()._apply(fn, recurse)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise QuadcError(f"missing graph input(s) {', '.join(missing[:5])}")
        values: dict[str, Any] = dict(self._consts)
        values.update({n: inputs[n] for n in self.input_names})
        for step, drop in zip(self._steps, self._drop, strict=True):
            result = step.fn([values[n] if n else None for n in step.inputs])
            if step.op == "FakeQuant":
                for name in step.outputs:
                    values[name] = result
            elif isinstance(result, list | tuple):
                for name, value in zip(step.outputs, result, strict=False):
                    if name:
                        values[name] = value
            else:
                values[step.outputs[0]] = result
            for name in drop:
                values.pop(name, None)
        return {n: values[n] for n in self.output_names}


def _bcast(t: torch.Tensor, axis: int | None, like: torch.Tensor) -> torch.Tensor:
    if axis is None or t.ndim == 0:
        return t
    shape = [1] * like.ndim
    shape[axis % like.ndim] = t.numel()
    return t.reshape(shape)
