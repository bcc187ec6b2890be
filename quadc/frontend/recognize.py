"""Recognize a U-Net graph (:func:`recognize_unet`): its inputs, every Linear/Conv layer by diffusers module path, attention blocks.

Works on graphs from both of torch's exporters without decoding any weight (shapes come from the lazy
``gs.Constant.shape``):

* Linear layers are ``MatMul(x, W[d_in, d_out])`` with an optional following ``Add(bias)`` (layers on
  3-D activations), ``Gemm(x, W, b, transB=1)`` (layers on 2-D activations, ``W[d_out, d_in]``), or, in
  graphs the dynamo exporter wrote without its optimizer, ``MatMul(x, Transpose(W[d_out, d_in]))``.
* Conv layers are ``Conv(x, W[d_out, d_in/group, kh, kw], b)``. Their padding is read as ONNX defines
  it: explicit ``pads``, or for ``auto_pad`` ``VALID`` none and ``SAME_UPPER``/``SAME_LOWER`` the total
  ``max((ceil(in / stride) - 1) * stride + (k - 1) * dilation + 1 - in, 0)`` per axis, split evenly with
  the odd pixel at the end (UPPER) or the start (LOWER); with a stride above 1 that needs the input's
  size, taken from the graph or from onnx shape inference.
* A weight may reach its layer through ``Cast`` (weights stored as bf16 or fp16 and cast to the
  compute type); the stored initializer is the layer's weight.

A layer's module path comes, in this order, from its weight initializer's name when that is a parameter
name (``down_blocks.0.resnets.0.conv1.weight``; TorchScript convs and Gemms, every dynamo weight quadc
exported), from the node name TorchScript writes (``/down_blocks.0/attentions.0/.../attn1/to_q/MatMul``),
or from the dynamo exporter's ``pkg.torch.onnx.name_scopes`` node metadata (read from the source file,
since onnx-graphsurgeon drops node metadata). A wrapper module's prefix (``unet.``) is removed.
"""

from __future__ import annotations

import ast
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.frontend.model_info import AttachPoint, AttentionBlock, ModelInfo
from quadc.unet_inputs import unet_input_roles

#: First components of diffusers UNet2DConditionModel module paths; anything before them is a wrapper.
UNET_ROOTS = frozenset({
    "conv_in", "time_proj", "time_embedding", "class_embedding", "add_time_proj", "add_embedding",
    "encoder_hid_proj", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out",
    "position_net",
})
_ATTN_PROJ = ("to_q", "to_k", "to_v", "to_out.0")
_ATTN_RE = re.compile(r"^(?P<block>.*\.attn\d+)\.(?P<proj>to_q|to_k|to_v|to_out\.0)$")
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


# ---------------------------------------------------------------------------------------------------
# Small graph helpers
# ---------------------------------------------------------------------------------------------------

def _through_identity(tensor: gs.Tensor) -> gs.Tensor:
    """Follow ``Identity`` chains back to their source (TorchScript shares deduplicated weights so)."""
    seen = 0
    while isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Identity":
        tensor = tensor.inputs[0].inputs[0]
        seen += 1
        if seen > 16:
            break
    return tensor


def _as_constant(tensor: gs.Tensor | None) -> gs.Constant | None:
    """The constant behind ``tensor``: an initializer, an Identity or Cast of one, or a ``Constant`` node's
    value."""
    if tensor is None:
        return None
    tensor = _through_identity(tensor)
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Cast":
        source = _through_identity(tensor.inputs[0].inputs[0])
        if isinstance(source, gs.Constant):
            return source
    if isinstance(tensor, gs.Constant):
        return tensor
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return value
    return None


def _shape(const: gs.Constant) -> tuple[int, ...]:
    return tuple(int(d) for d in const.shape)


def _is_float(const: gs.Constant) -> bool:
    return _is_float_dtype(const.dtype)


def _small_ints(const: gs.Constant, limit: int = 16) -> list[int] | None:
    """Values of a small integer constant (shape tensors); None for anything large or non-integer."""
    shape = _shape(const)
    if len(shape) > 1 or int(np.prod(shape, dtype=np.int64)) > limit:
        return None
    values = np.asarray(const.values)
    if not np.issubdtype(values.dtype, np.integer):
        return None
    return [int(v) for v in values.reshape(-1)]


def _consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def _dtype_name(dtype: object) -> str:
    if dtype is None:
        return "unknown"
    try:
        return np.dtype(dtype).name  # type: ignore[arg-type]
    except TypeError:
        return str(dtype)


def _shape_tuple(tensor: gs.Tensor) -> tuple[int | str | None, ...]:
    if tensor.shape is None:
        return ()
    return tuple(d if isinstance(d, (int, str)) or d is None else int(d) for d in tensor.shape)


# ---------------------------------------------------------------------------------------------------
# Module paths
# ---------------------------------------------------------------------------------------------------

def strip_wrapper(path: str) -> str:
    """Drop a wrapper module's prefix: ``unet.down_blocks.0.x`` -> ``down_blocks.0.x``."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part in UNET_ROOTS:
            return ".".join(parts[i:])
    return path


def _path_from_param(name: str) -> str | None:
    if name.endswith(".weight") and not name.startswith(("onnx::", "val_", "/")):
        return strip_wrapper(name[: -len(".weight")])
    return None


def _path_from_node_name(name: str) -> str | None:
    """TorchScript scopes: ``/down_blocks.0/attentions.0/proj_in/Conv`` -> ``down_blocks.0.attentions.0.proj_in``."""
    if not name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p]
    if len(parts) < 2:
        return None
    return strip_wrapper(".".join(parts[:-1]))


def _path_from_scopes(value: str) -> str | None:
    """dynamo metadata: ``['', 'down_blocks.0', ..., 'down_blocks.0.x.to_q', 'linear_3']`` -> ``...to_q``."""
    try:
        scopes = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or len(scopes) < 2 or not scopes[-2]:
        return None
    return strip_wrapper(str(scopes[-2]))


def read_scope_metadata(path: str | Path) -> dict[str, str]:
    """Node name -> module path from the dynamo exporter's ``name_scopes`` metadata in an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, str] = {}
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == _SCOPES_KEY:
                module = _path_from_scopes(prop.value)
                if module:
                    out[node.name] = module
    return out


# ---------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------

class _Layer:
    """A recognized Linear/Conv node before it gets its module path."""

    __slots__ = ("node", "kind", "weight", "d_in", "d_out", "kernel", "layout", "bias", "stride", "padding")

    def __init__(self, node: gs.Node, kind: str, weight: gs.Constant, d_in: int, d_out: int, *,
                 kernel: tuple[int, int] = (1, 1), layout: str = "in_out", bias: str | None = None,
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int, int, int] = (0, 0, 0, 0)):
        self.node, self.kind, self.weight = node, kind, weight
        self.d_in, self.d_out, self.kernel, self.layout = d_in, d_out, kernel, layout
        self.bias, self.stride, self.padding = bias, stride, padding


def _following_bias(node: gs.Node, d_out: int) -> str | None:
    """The constant of an ``Add`` that is the MatMul's only consumer and adds a ``[d_out]`` vector."""
    out = node.outputs[0]
    users = _consumers(out)
    if len(users) != 1 or users[0].op != "Add":
        return None
    add = users[0]
    other = next((t for t in add.inputs if t is not out), None)
    const = _as_constant(other)
    if const is None or not _is_float(const) or _shape(const)[-1:] != (d_out,):
        return None
    if int(np.prod(_shape(const), dtype=np.int64)) != d_out:
        return None
    return const.name


def _linear_from_matmul(node: gs.Node) -> _Layer | None:
    if len(node.inputs) != 2 or _as_constant(node.inputs[0]) is not None:
        return None
    b = node.inputs[1]
    const = _as_constant(b)
    if const is not None:
        if len(_shape(const)) != 2 or not _is_float(const):
            return None
        d_in, d_out = _shape(const)
        return _Layer(node, "linear", const, d_in, d_out, layout="in_out", bias=_following_bias(node, d_out))
    # Unoptimized dynamo graphs: MatMul(x, Transpose(W[d_out, d_in])).
    src = _through_identity(b)
    if isinstance(src, gs.Variable) and len(src.inputs) == 1 and src.inputs[0].op == "Transpose":
        tr = src.inputs[0]
        const = _as_constant(tr.inputs[0])
        if const is not None and len(_shape(const)) == 2 and _is_float(const) \
                and list(tr.attrs.get("perm", [1, 0])) == [1, 0]:
            d_out, d_in = _shape(const)
            return _Layer(node, "linear", const, d_in, d_out, layout="out_in",
                          bias=_following_bias(node, d_out))
    return None


def _linear_from_gemm(node: gs.Node) -> _Layer | None:
    if len(node.inputs) < 2 or int(node.attrs.get("transA", 0)):
        return None
    const = _as_constant(node.inputs[1])
    if const is None or len(_shape(const)) != 2 or not _is_float(const):
        return None
    if int(node.attrs.get("transB", 0)):
        d_out, d_in = _shape(const)
        layout = "out_in"
    else:
        d_in, d_out = _shape(const)
        layout = "in_out"
    bias_const = _as_constant(node.inputs[2]) if len(node.inputs) > 2 else None
    return _Layer(node, "linear", const, d_in, d_out, layout=layout,
                  bias=bias_const.name if bias_const is not None else None)


class _InputSizes:
    """Spatial size ``(h, w)`` of a conv's input: from the graph, else from onnx shape inference on a copy
    of the graph (run once, only when a conv needs it)."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self._inferred: dict[str, tuple[int, ...]] | None = None

    def __call__(self, tensor: gs.Tensor) -> tuple[int, int] | None:
        dims = _static_dims(tensor.shape)
        if dims is None:
            if self._inferred is None:
                from quadc.graph import infer_shapes
                from quadc.quant.calibrate import clone_graph

                typed = infer_shapes(clone_graph(self.graph))
                self._inferred = {n: d for n, t in typed.tensors().items()
                                  if (d := _static_dims(t.shape)) is not None}
            dims = self._inferred.get(tensor.name)
        return (dims[2], dims[3]) if dims is not None and len(dims) == 4 else None


def _static_dims(shape: object) -> tuple[int, ...] | None:
    if shape is None or not all(isinstance(d, int | np.integer) and d > 0 for d in shape):  # type: ignore[union-attr]
        return None
    return tuple(int(d) for d in shape)  # type: ignore[union-attr]


def conv_padding(attrs: dict, kernel: tuple[int, int], in_hw: tuple[int, int] | None = None,
                 where: str = "conv") -> tuple[int, int, int, int]:
    """A Conv's padding in ONNX ``pads`` order ``(top, left, bottom, right)`` from its attributes (see
    the module docstring for ``auto_pad``). ``in_hw`` (the input's height and width) is needed only for
    ``SAME_*`` with a stride above 1; without it that is a QuadcError naming ``where``."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad == "NOTSET":
        pads = tuple(int(p) for p in attrs.get("pads", [0, 0, 0, 0]))
        return (pads + (0, 0, 0, 0))[:4]  # type: ignore[return-value]
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise QuadcError(f"{where}: unknown auto_pad '{auto_pad}'; ONNX defines NOTSET, VALID, SAME_UPPER, SAME_LOWER")
    strides = [int(v) for v in attrs.get("strides", [1, 1])]
    dilations = [int(v) for v in attrs.get("dilations", [1, 1])]
    begin, end = [], []
    for axis in range(2):
        k, s, d = kernel[axis], strides[axis], dilations[axis]
        if s == 1:
            total = (k - 1) * d
        elif in_hw is None:
            raise QuadcError(f"{where}: auto_pad={auto_pad} with stride {s} needs the input size, which the graph "
                             "does not give; export the model with static shapes")
        else:
            size = in_hw[axis]
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return (begin[0], begin[1], end[0], end[1])


def _conv(node: gs.Node, input_sizes: _InputSizes | None = None) -> _Layer | None:
    if len(node.inputs) < 2:
        return None
    const = _as_constant(node.inputs[1])
    if const is None or len(_shape(const)) != 4 or not _is_float(const):
        return None
    d_out, c_in, kh, kw = _shape(const)
    group = int(node.attrs.get("group", 1))
    stride = tuple(int(s) for s in node.attrs.get("strides", [1, 1]))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    needs_size = auto_pad not in ("NOTSET", b"NOTSET", "VALID", b"VALID") and stride != (1, 1)
    in_hw = input_sizes(node.inputs[0]) if needs_size and input_sizes is not None else None
    pads = conv_padding(node.attrs, (kh, kw), in_hw, where=f"conv '{node.name}'")
    bias_const = _as_constant(node.inputs[2]) if len(node.inputs) > 2 else None
    return _Layer(node, "conv", const, c_in * group, d_out, kernel=(kh, kw), layout="conv",
                  bias=bias_const.name if bias_const is not None else None,
                  stride=(stride + (1, 1))[:2],  # type: ignore[arg-type]
                  padding=(pads + (0, 0, 0, 0))[:4])  # type: ignore[arg-type]


def find_layers(graph: gs.Graph) -> list[_Layer]:
    """Every Linear (MatMul with a constant 2-D weight, Gemm) and Conv node, in graph order."""
    layers: list[_Layer] = []
    input_sizes = _InputSizes(graph)
    for node in graph.nodes:
        if node.op == "MatMul":
            layer = _linear_from_matmul(node)
        elif node.op == "Gemm":
            layer = _linear_from_gemm(node)
        elif node.op == "Conv":
            layer = _conv(node, input_sizes)
        else:
            continue
        if layer is not None:
            layers.append(layer)
    return layers


def _name_layers(layers: list[_Layer], scopes: dict[str, str]) -> tuple[dict[str, AttachPoint], int]:
    """Module path for each layer; returns the points and how many layers fell back to node names."""
    weight_users = Counter(layer.weight.name for layer in layers)
    points: dict[str, AttachPoint] = {}
    unresolved = 0
    for layer in layers:
        module = None
        if weight_users[layer.weight.name] == 1:
            module = _path_from_param(layer.weight.name)
        if module is None:
            module = _path_from_node_name(layer.node.name or "")
        if module is None:
            module = scopes.get(layer.node.name or "")
        if module is None:
            module = layer.node.name or f"{layer.node.op}_{len(points)}"
            unresolved += 1
        key, i = module, 2
        while key in points:
            key = f"{module}#{i}"
            i += 1
        points[key] = AttachPoint(
            module=key, kind=layer.kind, node=layer.node.name, weight=layer.weight.name,
            d_in=layer.d_in, d_out=layer.d_out, kernel=layer.kernel, weight_layout=layer.layout,
            bias=layer.bias, stride=layer.stride, padding=layer.padding,
        )
    return points, unresolved


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------

def _heads_after(node: gs.Node, d_out: int) -> int | None:
    """Head count from the ``Reshape`` to ``[b, s, heads, head_dim]`` that follows a q projection."""
    frontier = [node.outputs[0]]
    for _ in range(3):  # projection -> (bias Add) -> Reshape
        nxt: list[gs.Tensor] = []
        for tensor in frontier:
            for user in _consumers(tensor):
                if user.op == "Reshape" and len(user.inputs) > 1:
                    shape_const = _as_constant(user.inputs[1])
                    dims = _small_ints(shape_const) if shape_const is not None else None
                    if dims and len(dims) == 4:
                        heads, head_dim = dims[2], dims[3]
                        if heads > 0 and head_dim > 0 and heads * head_dim == d_out:
                            return heads
                        if heads > 0 and head_dim == -1 and d_out % heads == 0:
                            return heads
                        if heads == -1 and head_dim > 0 and d_out % head_dim == 0:
                            return d_out // head_dim
                elif user.op == "Add":
                    nxt.extend(user.outputs)
        frontier = nxt
    return None


def _core_nodes(graph: gs.Graph, starts: Iterable[gs.Node], end: gs.Node) -> tuple[str, ...]:
    """Names of the nodes on paths from the q/k/v projections to the output projection, exclusive."""
    start_ids = {id(n) for n in starts}
    forward: set[int] = set()
    stack = [t for n in starts for t in n.outputs]
    while stack:
        tensor = stack.pop()
        for user in tensor.outputs:
            if id(user) in forward or user is end or id(user) in start_ids:
                continue
            forward.add(id(user))
            stack.extend(user.outputs)
    backward: set[int] = set()
    stack = list(end.inputs[:1])
    while stack:
        tensor = stack.pop()
        for prod in tensor.inputs:
            if id(prod) in backward or id(prod) in start_ids:
                continue
            backward.add(id(prod))
            stack.extend(prod.inputs)
    core = forward & backward
    return tuple(n.name for n in graph.nodes if id(n) in core)


def _activation_input(node: gs.Node) -> gs.Tensor:
    return _through_identity(node.inputs[0])


def find_attention(graph: gs.Graph, points: dict[str, AttachPoint]) -> list[AttentionBlock]:
    """Group ``attnN.to_q/to_k/to_v/to_out.0`` attach points into attention blocks, in graph order."""
    by_block: dict[str, dict[str, AttachPoint]] = defaultdict(dict)
    for key, point in points.items():
        match = _ATTN_RE.match(key)
        if match:
            by_block[match["block"]][match["proj"]] = point
    nodes_by_name = {n.name: n for n in graph.nodes if n.name}
    graph_inputs = {id(t) for t in graph.inputs}
    blocks: list[AttentionBlock] = []
    for block, projs in by_block.items():
        heads = None
        if "to_q" in projs and projs["to_q"].node in nodes_by_name:
            heads = _heads_after(nodes_by_name[projs["to_q"].node], projs["to_q"].d_out)
        kind = "cross" if block.endswith("attn2") else "self"
        k_node = nodes_by_name.get(projs["to_k"].node) if "to_k" in projs else None
        if k_node is not None:
            kind = "cross" if id(_activation_input(k_node)) in graph_inputs else "self"
        core: tuple[str, ...] = ()
        starts = [nodes_by_name[projs[p].node] for p in ("to_q", "to_k", "to_v")
                  if p in projs and projs[p].node in nodes_by_name]
        if "to_out.0" in projs and projs["to_out.0"].node in nodes_by_name and starts:
            core = _core_nodes(graph, starts, nodes_by_name[projs["to_out.0"].node])
        blocks.append(AttentionBlock(
            module=block, kind=kind, heads=heads,
            projections=tuple(f"{block}.{p}" for p in _ATTN_PROJ if p in projs), nodes=core,
        ))
    order = {p.node: i for i, p in enumerate(points.values())}
    blocks.sort(key=lambda b: order.get(points[b.projections[0]].node, 0) if b.projections else 0)
    return blocks


# ---------------------------------------------------------------------------------------------------
# Exporter flavour
# ---------------------------------------------------------------------------------------------------

def _is_float_dtype(dtype: object) -> bool:
    if isinstance(dtype, int) and not isinstance(dtype, bool):  # gs keeps types numpy lacks as ONNX enums
        return dtype in (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT,
                         onnx.TensorProto.DOUBLE)
    try:
        return np.issubdtype(np.dtype(dtype), np.floating) or np.dtype(dtype).name == "bfloat16"  # type: ignore[arg-type]
    except TypeError:
        return str(dtype) == "bfloat16"


def detect_exporter(graph: gs.Graph) -> str:
    """``torchscript``, ``dynamo`` or ``unknown``, from node and initializer naming conventions."""
    ts = dy = 0
    for node in graph.nodes:
        name = node.name or ""
        if name.startswith("/"):
            ts += 1
        elif name.startswith("node_"):
            dy += 1
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Constant):
            if name.startswith("onnx::"):
                ts += 1
            elif re.fullmatch(r"val_\d+", name):
                dy += 1
    if ts == dy == 0:
        return "unknown"
    return "torchscript" if ts >= dy else "dynamo"


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------

def recognize_unet(graph: gs.Graph, *, source: str | Path | None = None) -> ModelInfo:
    """Recognize a U-Net gs.Graph: inputs and their roles, attach points, attention blocks, statistics.

    Raises a QuadcError when the graph lacks the U-Net inputs (:func:`quadc.unet_inputs.unet_input_roles`). ``source`` (default: the file
    :func:`quadc.graph.load_model` read) is consulted for dynamo name-scope metadata only when some
    layers cannot be named from initializer or node names.
    """
    source = source if source is not None else getattr(graph, "_quadc_source", None)
    where = str(source) if source else "model"
    roles = unet_input_roles(graph, where)
    layers = find_layers(graph)
    points, unresolved = _name_layers(layers, {})
    if unresolved and source and Path(source).is_file():
        scopes = read_scope_metadata(source)
        if scopes:
            points, unresolved = _name_layers(layers, scopes)
    parameters = 0
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            parameters += int(np.prod(_shape(tensor), dtype=np.int64))
    histogram = Counter(node.op for node in graph.nodes)
    opset = getattr(graph, "opset_imports", {}).get("", None) or getattr(graph, "opset", None)
    return ModelInfo(
        inputs={t.name: (_dtype_name(t.dtype), _shape_tuple(t)) for t in graph.inputs},
        outputs={t.name: (_dtype_name(t.dtype), _shape_tuple(t)) for t in graph.outputs},
        points=points,
        attention=find_attention(graph, points),
        exporter=detect_exporter(graph),
        parameters=parameters,
        op_histogram=dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        roles=roles,
        opset=int(opset) if opset else None,
        unnamed_points=unresolved,
    )
