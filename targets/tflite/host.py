"""The timestep embedding runs on the host, in numpy; the .tflite takes its result as an input.

The U-Net's sinusoidal timestep embedding (``timestep -> Mul(freqs) -> Sin/Cos -> Concat``) needs
COS/SIN, which LiteRT has no int16 kernel for and NeuroPilot's plugin does not list (nor EXP). So the
graph is cut after it: :func:`split_host` finds the nodes that depend only on the inputs feeding a
Sin/Cos/Exp (and on constants), stopping before the first layer with weights, and the tensors where
the rest of the graph reads them become inputs of the TFLite model. :func:`host_graph` keeps that
subgraph as a small ONNX model stored in the artifact (``host.onnx``), and :class:`HostEmbedding`
evaluates it with ``onnx.reference.ReferenceEvaluator`` (the ONNX reference implementation, plain numpy)
before each TFLite run. The embedding is computed in float32 on the host and quantized to int16 like
any other model input.

Given::

    e = Concat(Sin(Mul(timestep, freqs)), Cos(Mul(timestep, freqs)))      # host, numpy
    h = Gemm(e, W1, b1) ...                                                 # TFLite, input e
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

#: Ops LiteRT cannot run in int16 (or NeuroPilot does not list) that mark the host subgraph's inputs.
HOST_MARKERS = ("Sin", "Cos", "Exp")
#: Ops that start the TFLite part even when they depend only on host inputs (they hold weights).
WEIGHTED_OPS = ("MatMul", "Gemm", "Conv")


@dataclass
class HostSplit:
    """The host part of a graph: its nodes, the graph inputs it reads and the tensors it hands over."""

    nodes: list[gs.Node]
    inputs: list[gs.Variable]
    outputs: list[gs.Variable]


def _ancestors_inputs(graph: gs.Graph, node: gs.Node) -> set[str]:
    seen: set[str] = set()
    stack = list(node.inputs)
    names = {t.name for t in graph.inputs}
    found: set[str] = set()
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        if t.name in names:
            found.add(t.name)
        for p in t.inputs:
            stack.extend(p.inputs)
    return found


def split_host(graph: gs.Graph) -> HostSplit:
    """The host subgraph (empty when no Sin/Cos/Exp exists): nodes whose non-constant inputs all come from
    the graph inputs feeding a Sin/Cos/Exp or from other host nodes, weighted layers excluded."""
    markers = [n for n in graph.nodes if n.op in HOST_MARKERS]
    if not markers:
        return HostSplit([], [], [])
    source_names: set[str] = set()
    for m in markers:
        source_names |= _ancestors_inputs(graph, m)
    host_tensors = set(source_names)
    nodes: list[gs.Node] = []
    for node in graph.nodes:  # topologically sorted
        data = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
        if node.op not in WEIGHTED_OPS and data and all(t.name in host_tensors for t in data):
            nodes.append(node)
            host_tensors.update(o.name for o in node.outputs)
    produced = {o.name for n in nodes for o in n.outputs}
    host_ids = {id(n) for n in nodes}
    outputs: list[gs.Variable] = []
    for node in nodes:
        for o in node.outputs:
            if any(id(c) not in host_ids for c in o.outputs) or o in graph.outputs:
                outputs.append(o)
    inputs = [t for t in graph.inputs if t.name in source_names]
    # A graph input read outside the host part stays a TFLite input too; only the host part's own outputs
    # are handed over.
    return HostSplit(nodes, inputs, [o for o in outputs if o.name in produced])


def host_graph(graph: gs.Graph, split: HostSplit) -> onnx.ModelProto:
    """The host part as a standalone ONNX model (its inputs -> the handed-over tensors)."""
    tensors: dict[str, gs.Tensor] = {}

    def mapped(t: gs.Tensor) -> gs.Tensor:
        if t.name not in tensors:
            tensors[t.name] = (gs.Constant(t.name, np.asarray(t.values)) if isinstance(t, gs.Constant)
                               else gs.Variable(t.name, t.dtype, t.shape))
        return tensors[t.name]

    nodes = [gs.Node(n.op, n.name, dict(n.attrs), [mapped(t) for t in n.inputs], [mapped(t) for t in n.outputs])
             for n in split.nodes]
    sub = gs.Graph(nodes=nodes, opset=graph.opset)
    sub.inputs = [tensors[t.name] for t in split.inputs]
    sub.outputs = [tensors[t.name] for t in split.outputs]
    for t in sub.outputs:
        t.dtype = np.float32
    model = gs.export_onnx(sub.cleanup().toposort())
    model.opset_import[0].version = int(graph.opset)
    return model


class HostEmbedding:
    """Evaluates the stored host part (``host.onnx``) in numpy with onnx's reference evaluator."""

    def __init__(self, path: str | Path):
        from onnx.reference import ReferenceEvaluator

        self.model = onnx.load(str(path))
        self._eval = ReferenceEvaluator(self.model)
        self.input_names = [i.name for i in self.model.graph.input]
        self.output_names = [o.name for o in self.model.graph.output]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {n: np.asarray(feeds[n], np.float32) for n in self.input_names}
        values = self._eval.run(None, inputs)
        return {n: np.asarray(v, np.float32) for n, v in zip(self.output_names, values, strict=True)}
