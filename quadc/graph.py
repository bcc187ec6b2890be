"""Thin helpers over onnx-graphsurgeon: the one graph API that every stage of quadc uses.

Loading keeps weights that live in external data files un-decoded: each becomes an
:class:`ExternalValues` that memory-maps its bytes only when a pass asks for them. Saving copies those
bytes from the source file into the new data file in large chunks, never through protobuf, so a 3.4 GB
U-Net is neither decoded nor held in memory twice, and models over 2 GB load and save like small ones.

Example::

    graph = load_model("unet.onnx")          # gs.Graph; weights stay on disk
    graph.cleanup().toposort()
    save_model(graph, "out/unet.onnx")       # writes out/unet.onnx + out/unet.onnx.data
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.ir.tensor import LazyValues

from quadc.errors import QuadcError

#: Initializers at least this large go to the external data file when a model is saved externally.
EXTERNAL_MIN_BYTES = 1024
#: Offsets in external data files are aligned so ORT can memory-map each tensor.
EXTERNAL_ALIGN = 4096
#: Above this many weight bytes a model is always saved with external data (protobuf's limit is 2 GiB).
EMBED_MAX_BYTES = 1 << 30
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class ExternalSource:
    """Where an external tensor's bytes live: an absolute file path, a byte offset and a length."""

    path: str
    offset: int
    length: int


class ExternalValues(LazyValues):
    """Lazy values of an initializer stored in an external data file.

    ``load()`` returns a read-only ``np.memmap``: pages are read from disk only when touched, and
    :func:`save_model` recognizes an untouched memmap and copies its bytes file-to-file.
    """

    def __init__(self, tensor: onnx.TensorProto, source: ExternalSource, registry: dict[int, Any]):
        super().__init__(tensor)
        self.source = source
        self._registry = registry

    def load(self) -> np.ndarray:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        shape = tuple(self.shape)
        if self.source.length == 0:
            return np.zeros(shape, dtype=dtype)
        arr = np.memmap(self.source.path, dtype=dtype, mode="r", offset=self.source.offset, shape=shape)
        # Remember which array came from which source so save_model can copy it without decoding.
        self._registry[id(arr)] = (weakref.ref(arr), self)
        return arr


def _external_fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _resolve_external(tensor: onnx.TensorProto, base_dir: Path, model_path: Path) -> ExternalSource:
    """Where ``tensor``'s external bytes are, checked: the location must be a relative path that stays
    inside the model's folder once symlinks are resolved, and the file must hold the bytes."""
    from quadc.paths import resolve_inside

    fields = _external_fields(tensor)
    location = fields.get("location", "")
    target = resolve_inside(base_dir, location, what=f"external data of tensor '{tensor.name}'",
                            label=str(model_path))
    if not target.is_file():
        raise QuadcError(
            f"{model_path}: external data file '{location}' for initializer '{tensor.name}' is missing; "
            "keep the .data file next to the .onnx file"
        )
    try:
        offset = int(fields.get("offset", "0"))
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
        length = int(fields.get("length", str(expected)))
    except (KeyError, TypeError, ValueError):
        raise QuadcError(f"{model_path}: tensor '{tensor.name}' has unreadable external data fields; "
                         "export the model again") from None
    if length != expected or offset < 0:
        raise QuadcError(
            f"{model_path}: initializer '{tensor.name}' declares {length} external bytes at offset {offset} "
            f"but its shape needs {expected}; the model file is inconsistent, export it again"
        )
    if offset + length > target.stat().st_size:
        raise QuadcError(
            f"{model_path}: external data file '{location}' is truncated (initializer '{tensor.name}' "
            f"needs bytes up to {offset + length}, file has {target.stat().st_size}); copy it again"
        )
    return ExternalSource(str(target), offset, length)


def _nested_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph`` except its own initializers: sparse initializers, node attributes
    (``Constant`` values and the like) and everything inside subgraphs, recursively."""
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from sub.initializer
                yield from _nested_tensors(sub)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from model.graph.initializer
    yield from _nested_tensors(model.graph)


def external_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external data files an ONNX file references, in order of first use, each checked to lie
    inside the model's folder (symlinks resolved); a QuadcError in one line otherwise."""
    path = Path(path)
    model = read_model_proto(path)
    files: list[Path] = []
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            target = Path(_resolve_external(tensor, path.parent, path).path)
            if target not in files:
                files.append(target)
    return files


def _inline_nested_external(model: onnx.ModelProto, base_dir: Path, model_path: Path) -> None:
    """Read the (small) external tensors outside the top-level initializers into the proto from their
    checked locations, so that nothing later resolves a location on its own (onnx does so against the
    working directory)."""
    for tensor in _nested_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            src = _resolve_external(tensor, base_dir, model_path)
            with open(src.path, "rb") as f:
                f.seek(src.offset)
                tensor.raw_data = f.read(src.length)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT


def read_model_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse an ONNX file without loading external data, turning parse failures into QuadcErrors."""
    path = Path(path)
    if not path.exists():
        raise QuadcError(f"{path}: no such file; pass the path of an exported .onnx model")
    if path.is_dir():
        raise QuadcError(f"{path}: is a directory; pass the path of an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise QuadcError(f"{path}: not a readable ONNX model ({exc.__class__.__name__}); is the file truncated "
                         "or of another format?") from None
    if not model.graph.node:
        raise QuadcError(f"{path}: not an ONNX model (no graph nodes); is the file truncated or of another format?")
    return model


def load_model(path: str | os.PathLike[str]) -> gs.Graph:
    """Load an ONNX model as a gs.Graph with external weights left on disk (memory-mapped on demand)."""
    path = Path(path)
    model = read_model_proto(path)
    base_dir = path.parent
    registry: dict[int, Any] = {}
    externals: dict[str, ExternalSource] = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            externals[init.name] = _resolve_external(init, base_dir, path)
    _inline_nested_external(model, base_dir, path)
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:  # gs raises bare exceptions on malformed graphs
        raise QuadcError(f"{path}: the ONNX graph is malformed ({exc}); export it again") from None
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and tensor.name in externals:
            lazy = tensor._values
            if isinstance(lazy, LazyValues):
                tensor._values = ExternalValues(lazy.tensor, externals[tensor.name], registry)
    graph._quadc_registry = registry  # type: ignore[attr-defined]
    graph._quadc_source = str(path.resolve())  # type: ignore[attr-defined]
    graph.opset_imports = {d.domain: d.version for d in model.opset_import}  # type: ignore[attr-defined]
    graph.ir_version = model.ir_version  # type: ignore[attr-defined]
    return graph


def _external_value_of(const: gs.Constant, registry: Mapping[int, Any]) -> ExternalValues | None:
    values = const._values
    if isinstance(values, ExternalValues):
        return values
    entry = registry.get(id(values))
    if entry is not None and entry[0]() is values and values.shape == tuple(entry[1].shape):
        return entry[1]
    return None


def constant_values(const: gs.Constant) -> np.ndarray:
    """A constant's values without caching them in it: ``const.values`` keeps an external weight's memory
    map in the constant, so reading every weight of a model that way keeps all of them mapped (3.2 GiB
    of resident file pages for SD1.5) for as long as the graph lives; here the map goes with the array."""
    values = const._values
    return values.load() if isinstance(values, LazyValues) else values


class _DimsOnly(LazyValues):
    """Stands in for lazily computed values while a graph is exported for its structure only: exports as a
    data-less external tensor, so nothing computes the values."""

    def __init__(self, lazy: LazyValues) -> None:
        self.shape, self.dtype = tuple(lazy.shape), np.dtype(lazy.dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def load(self) -> np.ndarray:  # pragma: no cover - only exported, never read
        raise RuntimeError("dims-only stand-in read")

    @property
    def tensor(self) -> onnx.TensorProto:
        t = onnx.TensorProto(data_type=onnx.helper.np_dtype_to_tensor_dtype(self.dtype), dims=list(self.shape))
        t.data_location = onnx.TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", "__quadc_stripped__"
        return t


@contextlib.contextmanager
def computed_weights_as_dims(graph: gs.Graph) -> Iterator[dict[str, LazyValues]]:
    """Within the block, constants whose values a pass computes lazily (a ``LazyValues`` other than
    :class:`ExternalValues`, e.g. linear-to-conv's transposed weights) export with their dims only, so
    shape inference or an opset conversion never computes them. Yields tensor name -> the lazy values."""
    # gs's own LazyValues read a proto, ExternalValues a file: only other LazyValues are computed
    lazy = [t for t in graph.tensors().values() if isinstance(t, gs.Constant) and _computed_lazily(t._values)]
    saved = [t._values for t in lazy]
    try:
        for t in lazy:
            t._values = _DimsOnly(t._values)
        yield {t.name: v for t, v in zip(lazy, saved, strict=True)}
    finally:
        for t, values in zip(lazy, saved, strict=True):
            t._values = values


def weight_bytes(graph: gs.Graph) -> int:
    """Bytes held by the graph's constants (external or in memory)."""
    total = 0
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            values = tensor._values
            total += int(values.nbytes) if hasattr(values, "nbytes") else 0
    return total


def export_proto(graph: gs.Graph, *, keep_external: bool = True) -> tuple[onnx.ModelProto, dict[str, ExternalSource]]:
    """Export a gs.Graph to a ModelProto without decoding external weights.

    Returns the proto and, for each initializer still backed by a source file, where its bytes are. In
    the proto those initializers are external references into the source file (fine for shape inference
    and for :func:`save_model`, which rewrites them).
    """
    registry = getattr(graph, "_quadc_registry", {})
    swapped: list[tuple[gs.Constant, Any]] = []
    sources: dict[str, ExternalSource] = {}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            ext = _external_value_of(tensor, registry)
            if ext is None and tensor.data_location == onnx.TensorProto.EXTERNAL:
                # The values were replaced in memory: the imported location is stale.
                tensor.data_location = None
            if ext is not None:
                if not keep_external:
                    continue
                # gs mutates the exported proto's name: give it a private copy.
                proto = onnx.TensorProto()
                proto.CopyFrom(ext.tensor)
                ev = ExternalValues(proto, ext.source, registry)
                swapped.append((tensor, tensor._values))
                tensor._values = ev
                sources[tensor.name] = ext.source
    try:
        opsets = getattr(graph, "opset_imports", None) or {"": graph.opset}
        kwargs: dict[str, Any] = {"do_type_check": False}
        model = gs.export_onnx(graph, **kwargs)
        del model.opset_import[:]
        opsets = dict(opsets)
        opsets[""] = graph.opset
        for node in graph.nodes:
            if node.domain and node.domain not in opsets:
                opsets[node.domain] = 1
        for domain, version in sorted(opsets.items()):
            model.opset_import.append(onnx.helper.make_opsetid(domain, version))
        ir_version = getattr(graph, "ir_version", None)
        if ir_version:
            model.ir_version = ir_version
    finally:
        for tensor, values in swapped:
            tensor._values = values
    return model, sources


def _copy_range(src_path: str, offset: int, length: int, dst: int, dst_offset: int) -> None:
    """Copy ``length`` bytes of ``src_path`` from ``offset`` into the file descriptor ``dst`` at
    ``dst_offset``, by the kernel (``os.copy_file_range``) where it can, else with pread/pwrite."""
    with open(src_path, "rb") as src:
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(src.fileno(), dst, min(_COPY_CHUNK, length - done), offset + done,
                                       dst_offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # this kernel or file system cannot: the rest through Python
        while done < length:
            chunk = os.pread(src.fileno(), min(_COPY_CHUNK, length - done), offset + done)
            if not chunk:
                raise QuadcError(f"{src_path}: external data ended early; the file was changed while compiling")
            done += _pwrite_all(dst, chunk, dst_offset + done)


def _pwrite_all(fd: int, data: bytes | np.ndarray, offset: int) -> int:
    """Write bytes, or an array's bytes in C order (without a copy into a bytes object), at ``offset`` of
    the file descriptor ``fd``; returns how many were written."""
    view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else data)
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)
    return written


def _lazy_nbytes(lazy: LazyValues) -> int:
    return int(np.prod(tuple(lazy.shape), dtype=np.int64)) * np.dtype(lazy.dtype).itemsize


def save_model(graph: gs.Graph, path: str | os.PathLike[str], *, external: bool | None = None) -> Path:
    """Save a gs.Graph to ``path``; large weights go to ``<name>.data`` beside it.

    ``external=None`` chooses: external data when the source had it or the weights exceed
    :data:`EMBED_MAX_BYTES`. Output is deterministic: same graph, same bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Weights a pass computes lazily are written one at a time, never all held in the proto at once.
    with computed_weights_as_dims(graph) as computed:
        model, sources = export_proto(graph)
    if external is None:
        external = bool(sources) or weight_bytes(graph) > EMBED_MAX_BYTES
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    if not external:
        _inline_external(model, sources)
        for init in model.graph.initializer:
            if init.name in computed:
                _inline_values(init, computed[init.name])
        _write_proto(model, path)
        if data_path.exists():
            data_path.unlink()
        return path
    # Where every tensor goes is decided first; then the kernel copies the kept weights (a thread that
    # mostly waits on the disk) while this thread computes and writes the rewritten ones.
    copies: list[tuple[ExternalSource, int]] = []
    writes: list[tuple[onnx.TensorProto, LazyValues | None, int, int]] = []
    end = 0
    for init in model.graph.initializer:
        src = sources.get(init.name)
        lazy = computed.get(init.name)
        if src is None and lazy is None and init.data_location == onnx.TensorProto.EXTERNAL:
            raise QuadcError(f"initializer '{init.name}' references external data quadc did not load")
        if src is None and lazy is None and len(init.raw_data) < EXTERNAL_MIN_BYTES:
            continue
        offset = end + (-end) % EXTERNAL_ALIGN
        length = src.length if src is not None else _lazy_nbytes(lazy) if lazy is not None else len(init.raw_data)
        if src is not None:
            copies.append((src, offset))
        else:
            writes.append((init, lazy, offset, length))
        end = offset + length
        del init.external_data[:]
        init.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
    with open(data_path, "wb", buffering=0) as data:
        data.truncate(end)  # the alignment gaps read as zeros
        fd = data.fileno()
        with ThreadPoolExecutor(max_workers=1) as pool:
            copied = pool.submit(lambda: [_copy_range(src.path, src.offset, src.length, fd, at)
                                          for src, at in copies])
            for init, lazy, offset, length in writes:
                written = _pwrite_all(fd, lazy.load() if lazy is not None else init.raw_data, offset)
                if written != length:
                    raise QuadcError(f"initializer '{init.name}' has {written} bytes of values, its shape "
                                     f"needs {length}")
                init.ClearField("raw_data")
            copied.result()
    _write_proto(model, path)
    return path


def _inline_values(init: onnx.TensorProto, lazy: LazyValues) -> None:
    """Put a lazily computed weight's bytes into its (data-less) initializer."""
    init.raw_data = np.ascontiguousarray(lazy.load()).tobytes()
    del init.external_data[:]
    init.data_location = onnx.TensorProto.DEFAULT


def _inline_external(model: onnx.ModelProto, sources: Mapping[str, ExternalSource]) -> None:
    """Read each still-external initializer's bytes into the proto (small models only)."""
    for init in model.graph.initializer:
        src = sources.get(init.name)
        if src is not None:
            with open(src.path, "rb") as f:
                f.seek(src.offset)
                init.raw_data = f.read(src.length)
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT


def _write_proto(model: onnx.ModelProto, path: Path) -> None:
    with open(path, "wb") as f:
        f.write(model.SerializeToString(deterministic=True))


def to_model_bytes(graph: gs.Graph) -> bytes:
    """Serialize a graph whose weights all fit in protobuf (tests, small models) to ONNX bytes."""
    model, sources = export_proto(graph)
    _inline_external(model, sources)
    return model.SerializeToString(deterministic=True)


def infer_shapes(graph: gs.Graph) -> gs.Graph:
    """Run onnx shape inference and copy the inferred dtypes/shapes onto the graph's variables.

    Weights are never decoded: external initializers stay references, so this works above 2 GB.
    """
    model, _ = export_proto(graph)
    for init in model.graph.initializer:
        if len(init.raw_data) > (1 << 20):
            # Shape inference needs only dims and type of big weights; keep protobuf small.
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            entry = init.external_data.add()
            entry.key, entry.value = "location", "__quadc_stripped__"
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    infos = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Variable) and name in infos:
            ttype = infos[name].type.tensor_type
            if ttype.elem_type:
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
            if ttype.HasField("shape"):
                tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                for d in ttype.shape.dim]
    return graph


def tidy(graph: gs.Graph, *, remove_unused_inputs: bool = False) -> gs.Graph:
    """Drop the nodes that no graph output depends on, then sort the rest topologically: onnx-graphsurgeon's
    ``cleanup`` + ``toposort``, with the same node order (by depth, ties in gs's depth-first order), in
    linear time. Graph inputs are kept unless ``remove_unused_inputs``.

    gs's own pair took about a quarter of the NPU pipeline's time on the SD1.5 U-Net: its cleanup tests
    each graph input for membership in a list of every used tensor (320 LoRA inputs), its toposort builds
    name maps of the whole graph. Graphs with subgraphs (If/Loop bodies), and ``remove_unused_inputs``, are
    left to gs itself; local functions (small bodies) are cleaned and sorted by gs.
    """
    if remove_unused_inputs or any(True for node in graph.nodes for _ in node.subgraphs()):
        return graph.cleanup(remove_unused_graph_inputs=remove_unused_inputs).toposort()
    for func in graph.functions:
        func.cleanup(remove_unused_graph_inputs=False, recurse_functions=False).toposort(mode="nodes")
    _drop_unused_nodes(graph)
    order = _depth_first_levels(graph)
    if order is None:  # a cycle: gs's toposort reports it
        return graph.toposort()
    graph.nodes = [node for node, _ in sorted(order, key=lambda item: item[1])]
    if graph.functions:
        graph.toposort(mode="functions")
    return graph


def _drop_unused_nodes(graph: gs.Graph) -> None:
    """Disconnect and remove every node that no graph output depends on (gs's ``cleanup``)."""
    for tensor in graph.inputs:
        tensor.inputs.clear()
    in_graph = {id(node) for node in graph.nodes}
    used: set[int] = set()
    seen: set[int] = set()
    stack = list(graph.outputs)
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        for node in tensor.inputs:
            if id(node) in in_graph and id(node) not in used:
                used.add(id(node))
                stack.extend(node.inputs)
    kept = []
    for node in graph.nodes:
        if id(node) in used:
            kept.append(node)
        else:
            node.inputs.clear()
            node.outputs.clear()
    graph.nodes = kept


def _depth_first_levels(graph: gs.Graph) -> list[tuple[gs.Node, int]] | None:
    """Each node with its depth (0: reads no node's output; else 1 + its deepest producer's), in the
    post-order of a depth-first walk from the nodes in graph order through their producers in input
    order, as gs's toposort records them; None when the graph has a cycle."""
    in_graph = {id(node) for node in graph.nodes}

    def producers(node: gs.Node) -> list[gs.Node]:
        found: dict[int, gs.Node] = {}
        for tensor in node.inputs:
            for p in tensor.inputs:
                if id(p) in in_graph:
                    found.setdefault(id(p), p)
        return list(found.values())

    level: dict[int, int] = {}
    order: list[tuple[gs.Node, int]] = []
    on_path: set[int] = set()
    for root in graph.nodes:
        stack: list[tuple[gs.Node, list[gs.Node] | None]] = [(root, None)]
        while stack:
            node, inputs = stack.pop()
            if inputs is not None:  # every producer is done
                on_path.discard(id(node))
                depth = 1 + max((level[id(p)] for p in inputs), default=-1)
                level[id(node)] = depth
                order.append((node, depth))
                continue
            if id(node) in level:
                continue
            if id(node) in on_path:
                return None
            on_path.add(id(node))
            inputs = producers(node)
            stack.append((node, inputs))
            stack.extend((p, None) for p in reversed(inputs) if id(p) not in level)
    return order


# ---------------------------------------------------------------------------------------------------
# Builders used by passes
# ---------------------------------------------------------------------------------------------------

def unique_name(graph: gs.Graph, base: str, taken: set[str] | None = None) -> str:
    """A tensor/node name starting with ``base`` that the graph does not use yet."""
    names = taken if taken is not None else set(graph.tensors().keys()) | {n.name for n in graph.nodes}
    if base not in names:
        names.add(base)
        return base
    i = 1
    while f"{base}_{i}" in names:
        i += 1
    names.add(f"{base}_{i}")
    return f"{base}_{i}"


def constant(name: str, values: np.ndarray | Sequence[Any] | float | int, dtype: Any = None) -> gs.Constant:
    """A gs.Constant from array-like values (dtype optional)."""
    return gs.Constant(name, np.asarray(values, dtype=dtype))


def variable(name: str, dtype: Any = None, shape: Sequence[int | str | None] | None = None) -> gs.Variable:
    """A gs.Variable (graph input, output or intermediate)."""
    return gs.Variable(name, dtype=np.dtype(dtype) if dtype is not None else None, shape=shape)


def add_node(graph: gs.Graph, op: str, inputs: Iterable[gs.Tensor], outputs: Iterable[gs.Tensor], *,
             name: str, attrs: Mapping[str, Any] | None = None, domain: str | None = None) -> gs.Node:
    """Append a node to the graph (callers toposort once when done)."""
    node = gs.Node(op=op, name=name, inputs=list(inputs), outputs=list(outputs), attrs=dict(attrs or {}))
    if domain:
        node.domain = domain
    graph.nodes.append(node)
    return node


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_COPY_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 over an ONNX file and, in order, the external data files it references (each checked to
    lie inside the model's folder)."""
    path = Path(path)
    digest = hashlib.sha256()
    digest.update(bytes.fromhex(file_sha256(path)))
    for data_file in external_data_files(path):
        digest.update(bytes.fromhex(file_sha256(data_file)))
    return digest.hexdigest()


#: In-memory weights at least this large reach onnxruntime as OrtValues rather than inside the protobuf.
ORT_VALUE_MIN_BYTES = 1 << 20
#: Placeholder ``location`` of an initializer whose data onnxruntime receives as an OrtValue.
_IN_MEMORY = "__quadc_in_memory__"
#: dtypes ``OrtValue.ortvalue_from_numpy`` takes without conversion.
_ORT_VALUE_KINDS = ("f", "i", "u", "b")


def _ort_value_ready(values: Any) -> bool:
    """Whether an in-memory array can go to onnxruntime as an OrtValue (large, plain numpy dtype)."""
    return (isinstance(values, np.ndarray) and values.nbytes >= ORT_VALUE_MIN_BYTES
            and values.dtype.kind in _ORT_VALUE_KINDS and values.dtype.isnative)


def _computed_lazily(values: Any) -> bool:
    """Whether constant values are computed by a pass on demand (not read from a file or a proto)."""
    return (isinstance(values, LazyValues) and type(values) is not LazyValues
            and not isinstance(values, ExternalValues | _DimsOnly))


def _set_external(init: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del init.external_data[:]
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value


def ort_model(graph: gs.Graph) -> tuple[bytes, str | None, dict[str, np.ndarray]]:
    """What :func:`ort_session` hands onnxruntime, built without copying any weight to disk.

    Returns ``(model bytes, folder, arrays)``. In the model, every initializer still backed by its source
    file is an external reference into that file relative to ``folder`` (None when there is none), so
    onnxruntime reads or memory-maps the bytes where they are; every large in-memory weight is an
    external reference to a placeholder and its array is in ``arrays`` (for
    ``SessionOptions.add_external_initializers``); the rest is inline.
    """
    in_memory: dict[str, np.ndarray] = {}
    swapped: list[tuple[gs.Constant, Any]] = []
    registry = graph.__dict__.get("_quadc_registry", {})  # not getattr: gs logs an error for unknown names
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and _external_value_of(tensor, registry) is None:
            values = original = tensor._values
            if _computed_lazily(values):  # e.g. linear-to-conv's transposed weights: computed once, here
                values = values.load()
            if _ort_value_ready(values):
                # Export a bodiless reference instead of copying the array into protobuf.
                proto = onnx.TensorProto(name=tensor.name, dims=values.shape,
                                         data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype))
                _set_external(proto, _IN_MEMORY, 0, values.nbytes)
                in_memory[tensor.name] = np.ascontiguousarray(values)
                swapped.append((tensor, original))
                tensor._values = LazyValues(proto)
    try:
        model, sources = export_proto(graph)
    finally:
        for tensor, values in swapped:
            tensor._values = values
    folder = os.path.commonpath([os.path.dirname(s.path) for s in sources.values()]) if sources else None
    for init in model.graph.initializer:
        src = sources.get(init.name)
        if src is not None and src.length == 0:  # an empty tensor: nothing to read
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
        elif src is not None:
            _set_external(init, Path(os.path.relpath(src.path, folder)).as_posix(), src.offset, src.length)
    return model.SerializeToString(), folder, in_memory


def return_freed_memory() -> None:
    """Hand memory that was freed (by an onnxruntime session, say) back to the OS: glibc keeps freed heap
    pages for reuse, 1.1 GiB after calibrating SD1.5, which later stages would add to the peak RSS.
    Does nothing where the C library has no ``malloc_trim``."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def ort_session(graph: gs.Graph, providers: Sequence[str] = ("CPUExecutionProvider",), **opts: Any):
    """An onnxruntime InferenceSession over a gs.Graph of any size, writing nothing to disk.

    Weights still in their source file are read (memory-mapped where aligned) by onnxruntime from that
    file; large in-memory weights are handed over as OrtValues (onnxruntime copies them once); see
    :func:`ort_model`. ``opts`` are set on the ``SessionOptions``.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    for key, value in opts.items():
        setattr(so, key, value)
    model, folder, arrays = ort_model(graph)
    if folder is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    if arrays:
        so.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()])
    return ort.InferenceSession(model, so, providers=list(providers))
