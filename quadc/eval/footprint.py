"""Peak activation bytes of a QDQ graph: what 8-bit activations buy in working memory.

An accelerator keeps each activation in its integer type (the output of its ``QuantizeLinear``) from the
node that makes it until its last reader has run. :func:`peak_activation_bytes` walks the graph in its
(topological) node order and returns the largest sum of integer activation bytes alive at once: each
``QuantizeLinear`` of a dynamic tensor makes one, alive from that node to the last node reading one of its
``DequantizeLinear`` outputs (or itself); integer graph inputs (LoRA slot inputs) are alive from the start
to their last reader. Float tensors between a ``DequantizeLinear`` and the next ``QuantizeLinear`` are a
kernel's inside and are not counted. Sizes come from onnx shape inference (with data propagation);
where it cannot tell (a ``Slice`` whose bounds are computed from shapes), :func:`observed_sizes` runs the
graph once on onnxruntime and reads them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from quadc.errors import QuadcError

__all__ = ["activation_starts", "observed_sizes", "peak_activation_bytes"]


def _sizes(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    sizes: dict[str, int] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if t.elem_type and all(d >= 0 for d in dims):
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
            sizes[info.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
    return sizes


def _constants(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.initializer}
    names.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    return names


def activation_starts(model: onnx.ModelProto) -> dict[str, int]:
    """Integer activations (dynamic ``QuantizeLinear`` outputs, integer graph inputs) and the index of
    the node that makes each (0 for inputs)."""
    graph = model.graph
    constants = _constants(graph)
    starts: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants:
            starts[node.output[0]] = i
    for inp in graph.input:
        elem = inp.type.tensor_type.elem_type
        if elem and np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).kind in "iu" and inp.name not in constants:
            starts[inp.name] = 0
    return starts


def observed_sizes(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Bytes of every integer activation of ``model`` (weights loaded) in one onnxruntime run on ``feed``
    (graph inputs it lacks are zeros)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = list(activation_starts(model))
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in outputs)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    full = dict(feed)
    for inp in session.get_inputs():
        if inp.name not in full:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(
                next(i for i in model.graph.input if i.name == inp.name).type.tensor_type.elem_type)
            full[inp.name] = np.zeros(inp.shape, dtype=dtype)
    return {n: int(v.nbytes) for n, v in zip(names, session.run(names, full), strict=True)}


def peak_activation_bytes(model: onnx.ModelProto, sizes: Mapping[str, int] | None = None) -> int:
    """The most integer activation bytes alive at once while ``model``'s nodes run in order (``sizes``:
    bytes per activation, e.g. :func:`observed_sizes`; default: from shape inference)."""
    graph = model.graph
    sizes = dict(sizes) if sizes is not None else _sizes(model)
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(i)
    starts = activation_starts(model)
    delta = np.zeros(len(graph.node) + 1, dtype=np.int64)
    for name, start in starts.items():
        if name not in sizes:
            raise QuadcError(f"activation '{name}' has no static shape; give its size (observed_sizes)")
        last = start
        for r in readers.get(name, []):
            last = max(last, r)
            node = graph.node[r]
            if node.op_type == "DequantizeLinear":
                last = max([last, *[j for o in node.output for j in readers.get(o, [])]])
        delta[start] += sizes[name]
        delta[last + 1] -= sizes[name]
    return int(np.max(np.cumsum(delta))) if starts else 0
