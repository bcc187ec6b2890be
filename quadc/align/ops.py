"""Torch implementations of the ONNX operators a Stable Diffusion U-Net graph uses (after quadc's passes).

Each handler takes the node's inputs (torch tensors, ``None`` for an omitted optional input) and its
attributes (gs-decoded Python values) and returns one tensor or a list of output tensors. Integer "shape"
tensors (Shape, Gather on shapes, Concat of dims) stay small int64 tensors on the CPU; a handler that
needs a static list of ints reads it with :func:`_ints`. QuantizeLinear / DequantizeLinear are not here:
:mod:`quadc.align.interpreter` turns each Q -> DQ pair into one fake quantizer and folds constant ones.

Semantics follow the ONNX operator specs at opset 13-21 (the versions torch and diffusers exports use);
anything else is a :class:`~quadc.errors.QuadcError` naming the operator and the attribute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from quadc.errors import QuadcError

__all__ = ["OPS", "torch_dtype"]

Handler = Callable[[list[Any], dict[str, Any]], Any]


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype of an ONNX element type."""
    np_type = np.dtype(helper.tensor_dtype_to_np_dtype(int(onnx_type)))
    if np_type == np.bool_:
        return torch.bool
    try:
        return torch.from_numpy(np.zeros(1, np_type)).dtype
    except TypeError:
        raise QuadcError(f"ONNX type {TensorProto.DataType.Name(int(onnx_type))} has no torch equivalent") from None


def _ints(t: Any) -> list[int]:
    """A 0-d or 1-d integer tensor (or list) as a list of Python ints."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(t).reshape(-1)]


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` on one device (a small CPU shape tensor joins the other's device)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device != b.device:
        if a.device.type == "cpu" and a.ndim > 0:
            a = a.to(b.device)
        elif b.device.type == "cpu" and b.ndim > 0:
            b = b.to(a.device)
    return a, b


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Handler:
    def run(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
        return fn(*_pair(ins[0], ins[1]))
    return run


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Handler:
    return lambda ins, attrs: fn(ins[0])


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates (C++ '/')
    return a / b


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Handler:
    def run(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
        out = ins[0]
        for other in ins[1:]:
            out = fn(*_pair(out, other))
        return out
    return run


def _axes(ins: list[Any], attrs: dict[str, Any], position: int = 1) -> list[int] | None:
    """Axes from input ``position`` (newer opsets) or the ``axes`` attribute (older); None if neither."""
    if len(ins) > position and ins[position] is not None:
        return _ints(ins[position])
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    return None


# ----------------------------------------------------------------------------------------- linear algebra
def _gemm(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    a, b = ins[0], ins[1]
    if int(attrs.get("transA", 0)):
        a = a.transpose(0, 1)
    if int(attrs.get("transB", 0)):
        b = b.transpose(0, 1)
    y = torch.matmul(a, b)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if len(ins) > 2 and ins[2] is not None:
        y = y + (ins[2] * beta if beta != 1.0 else ins[2])
    return y


def _conv(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    nd = w.ndim - 2
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in ("NOTSET", "VALID") and any(attrs.get("pads", [0]) or [0]):
        raise QuadcError(f"Conv with auto_pad={auto_pad} and pads is not supported")
    if auto_pad not in ("NOTSET", "VALID"):
        raise QuadcError(f"Conv with auto_pad={auto_pad} is not supported; export with explicit pads")
    strides = [int(s) for s in attrs.get("strides", [1] * nd)]
    dil = [int(d) for d in attrs.get("dilations", [1] * nd)]
    pads = [int(p) for p in attrs.get("pads", [0] * 2 * nd)]
    group = int(attrs.get("group", 1))
    begin, end = pads[:nd], pads[nd:]
    padding: Sequence[int] = begin
    if begin != end:
        flat: list[int] = []
        for i in reversed(range(nd)):  # F.pad: last dimension first
            flat += [begin[i], end[i]]
        x = F.pad(x, flat)
        padding = [0] * nd
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(nd)
    if fn is None:
        raise QuadcError(f"Conv over {nd} spatial dimensions is not supported")
    return fn(x, w, b, stride=strides, padding=padding, dilation=dil, groups=group)


# ------------------------------------------------------------------------------------------------- shapes
def _reshape(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, shape = ins[0], _ints(ins[1])
    if not int(attrs.get("allowzero", 0)):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _transpose(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    perm = attrs.get("perm")
    x = ins[0]
    return x.permute(*([int(p) for p in perm] if perm is not None else reversed(range(x.ndim))))


def _shape(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    dims = list(ins[0].shape)
    start = int(attrs.get("start", 0))
    end = attrs.get("end")
    return torch.tensor(dims[start:(None if end is None else int(end))], dtype=torch.int64)


def _gather(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, idx = ins[0], ins[1]
    axis = int(attrs.get("axis", 0)) % x.ndim
    idx = idx.to(torch.int64)
    if idx.device != x.device:
        idx = idx.to(x.device)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


def _unsqueeze(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = ins[0]
    axes = _axes(ins, attrs) or []
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _squeeze(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = ins[0]
    axes = _axes(ins, attrs)
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.ndim for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _concat(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    parts = [t for t in ins if t is not None]
    devices = {t.device for t in parts if t.ndim > 0 and t.numel() > 0}
    if len(devices) > 1:
        target = next(d for d in devices if d.type != "cpu")
        parts = [t.to(target) for t in parts]
    return torch.cat(parts, dim=int(attrs["axis"]))


def _slice(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = ins[0]
    starts, ends = _ints(ins[1]), _ints(ins[2])
    axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        if st <= 0:
            raise QuadcError(f"Slice with step {st} is not supported (only positive steps)")
        index[a % x.ndim] = slice(s, e, st)  # Python clamps out-of-range starts/ends as ONNX does for step > 0
    return x[tuple(index)]


def _split(ins: list[Any], attrs: dict[str, Any], n_out: int) -> list[torch.Tensor]:
    x = ins[0]
    axis = int(attrs.get("axis", 0)) % x.ndim
    sizes = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else [int(s) for s in attrs.get("split", [])]
    if not sizes:
        n = int(attrs.get("num_outputs", n_out))
        chunk = -(-x.shape[axis] // n)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
    return list(torch.split(x, sizes, dim=axis))


def _expand(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, shape = ins[0], _ints(ins[1])
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape)))


def _tile(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return ins[0].repeat(*_ints(ins[1]))


def _flatten(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = ins[0]
    axis = int(attrs.get("axis", 1)) % (x.ndim + 1) if x.ndim else 0
    lead = int(np.prod(x.shape[:axis], dtype=np.int64))
    return x.reshape(lead, -1)


def _cast(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return ins[0].to(torch_dtype(attrs["to"]))


def _constant_of_shape(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    value = attrs.get("value")
    arr = np.asarray(value.values if hasattr(value, "values") else (value if value is not None else np.float32(0)))
    return torch.full(_ints(ins[0]), arr.reshape(-1)[0].item(), dtype=torch.from_numpy(arr.reshape(-1)[:1].copy()).dtype)


def _range(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    start, limit, delta = (t.item() for t in ins[:3])
    return torch.arange(start, limit, delta, dtype=ins[0].dtype)


def _where(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    cond, x = _pair(ins[0], ins[1])
    x, y = _pair(x, ins[2])
    return torch.where(cond.to(torch.bool), x, y)


# --------------------------------------------------------------------------------------------- reductions
def _reduce(fn: Callable[..., torch.Tensor], axes_input_from: int) -> Handler:
    def run(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
        x = ins[0]
        axes = _axes(ins, attrs) if axes_input_from else ([int(a) for a in attrs["axes"]] if "axes" in attrs else None)
        keep = bool(int(attrs.get("keepdims", 1)))
        if not axes:
            if int(attrs.get("noop_with_empty_axes", 0)):
                return x
            axes = list(range(x.ndim))
        return fn(x, dim=[a % x.ndim for a in axes], keepdim=keep)
    return run


# ---------------------------------------------------------------------------------------- normalizations
def _softmax(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return torch.softmax(ins[0], dim=int(attrs.get("axis", -1)))


def _layer_norm(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    axis = int(attrs.get("axis", -1)) % x.ndim
    eps = float(attrs.get("epsilon", 1e-5))
    shape = tuple(x.shape[axis:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return F.layer_norm(x, shape, scale, bias, eps)
    y = F.layer_norm(x, shape, eps=eps) * scale
    return y + bias if bias is not None else y


def _instance_norm(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return F.instance_norm(ins[0], weight=ins[1], bias=ins[2], eps=float(attrs.get("epsilon", 1e-5)))


def _group_norm(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, scale, bias = ins[0], ins[1], ins[2]
    groups = int(attrs["num_groups"])
    channels = x.shape[1]
    if scale.numel() == groups and groups != channels:  # opset 18: one scale/bias per group
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    return F.group_norm(x, groups, scale, bias, float(attrs.get("epsilon", 1e-5)))


# ------------------------------------------------------------------------------------------------- resize
def _nearest_index(out_len: int, in_len: int, scale: float, ctm: str, mode: str) -> torch.Tensor:
    i = torch.arange(out_len, dtype=torch.float64)
    if ctm == "asymmetric":
        coord = i / scale
    elif ctm == "half_pixel":
        coord = (i + 0.5) / scale - 0.5
    elif ctm == "pytorch_half_pixel":
        coord = (i + 0.5) / scale - 0.5 if out_len > 1 else torch.zeros_like(i)
    elif ctm == "align_corners":
        coord = i * (in_len - 1) / (out_len - 1) if out_len > 1 else torch.zeros_like(i)
    elif ctm == "tf_half_pixel_for_nn":
        coord = (i + 0.5) / scale
    else:
        raise QuadcError(f"Resize coordinate_transformation_mode={ctm} is not supported")
    if mode == "floor":
        idx = torch.floor(coord)
    elif mode == "ceil":
        idx = torch.ceil(coord)
    elif mode == "round_prefer_floor":
        idx = torch.where(coord - torch.floor(coord) == 0.5, torch.floor(coord), torch.round(coord))
    elif mode == "round_prefer_ceil":
        idx = torch.where(coord - torch.floor(coord) == 0.5, torch.ceil(coord), torch.round(coord))
    else:
        raise QuadcError(f"Resize nearest_mode={mode} is not supported")
    return idx.clamp(0, in_len - 1).to(torch.int64)


def _text(value: Any, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def _resize(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = ins[0]
    scales = ins[2].tolist() if len(ins) > 2 and ins[2] is not None and ins[2].numel() else None
    sizes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None and ins[3].numel() else None
    if sizes is None and scales is None:
        raise QuadcError("Resize needs scales or sizes")
    if sizes is None:
        sizes = [int(np.floor(d * s)) for d, s in zip(x.shape, scales, strict=True)]  # type: ignore[arg-type]
        eff = [float(s) for s in scales]  # type: ignore[union-attr]
    else:
        eff = [o / d for o, d in zip(sizes, x.shape, strict=True)]
    mode = _text(attrs.get("mode"), "nearest")
    ctm = _text(attrs.get("coordinate_transformation_mode"), "half_pixel")
    if mode == "nearest":
        near = _text(attrs.get("nearest_mode"), "round_prefer_floor")
        for axis, (o, d) in enumerate(zip(sizes, x.shape, strict=True)):
            if o != d or eff[axis] != 1.0:
                idx = _nearest_index(o, d, eff[axis], ctm, near).to(x.device)
                x = torch.index_select(x, axis, idx)
        return x
    if mode == "linear" and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners") and x.ndim == 4 \
            and list(sizes[:2]) == list(x.shape[:2]):
        return F.interpolate(x, size=sizes[2:], mode="bilinear", align_corners=ctm == "align_corners")
    raise QuadcError(f"Resize mode={mode} with coordinate_transformation_mode={ctm} is not supported")


# ---------------------------------------------------------------------------------------------- activations
def _gelu(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return F.gelu(ins[0], approximate=_text(attrs.get("approximate"), "none"))


def _clip(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else attrs.get("min")
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else attrs.get("max")
    lo = lo.item() if isinstance(lo, torch.Tensor) else lo
    hi = hi.item() if isinstance(hi, torch.Tensor) else hi
    return torch.clamp(ins[0], lo, hi)


def _einsum(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return torch.einsum(_text(attrs["equation"], ""), *ins)


def _identity(ins: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return ins[0]


#: ONNX op type -> handler. Split is special (its output count comes from the node).
OPS: dict[str, Handler] = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _binary(_div),
    "Pow": _binary(torch.pow), "MatMul": _binary(torch.matmul), "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt), "Greater": _binary(torch.gt), "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or), "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum),
    "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Erf": _unary(torch.erf),
    "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh), "Relu": _unary(torch.relu),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Sin": _unary(torch.sin), "Cos": _unary(torch.cos),
    "Reciprocal": _unary(torch.reciprocal), "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil),
    "Not": _unary(torch.logical_not), "Softplus": _unary(F.softplus), "HardSwish": _unary(F.hardswish),
    "Identity": _identity, "Gemm": _gemm, "Conv": _conv, "Reshape": _reshape, "Transpose": _transpose,
    "Shape": _shape, "Gather": _gather, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Concat": _concat,
    "Slice": _slice, "Expand": _expand, "Tile": _tile, "Flatten": _flatten, "Cast": _cast,
    "ConstantOfShape": _constant_of_shape, "Range": _range, "Where": _where,
    "ReduceMean": _reduce(torch.mean, 1), "ReduceSum": _reduce(torch.sum, 1),
    "Softmax": _softmax, "LayerNormalization": _layer_norm, "InstanceNormalization": _instance_norm,
    "GroupNormalization": _group_norm, "Resize": _resize, "Gelu": _gelu, "Clip": _clip, "Einsum": _einsum,
}

SPLIT = _split
