"""Fake quantization in torch that equals onnxruntime's QuantizeLinear -> DequantizeLinear bit for bit,
with the clipped straight-through gradient.

Forward, as :func:`quadc.quant.affine.quantize` / :func:`~quadc.quant.affine.dequantize` (and so ORT's CPU
provider): ``q = clip(round_half_even(x / scale) + zero_point, qmin, qmax)`` with the division in float32,
then ``y = float32(q - zero_point) * scale``. Backward: ``dy/dx = 1`` where ``round(x / scale) +
zero_point`` lies inside ``[qmin, qmax]`` and 0 where it saturates (the clipped STE); scale and zero point
are fixed, never learned.

Why not ``torch.fake_quantize_per_tensor_affine``: its CPU kernel multiplies by ``1 / scale`` instead of
dividing, which rounds a few values per thousand to the neighbouring integer (``tests/test_align_quantsim.py``
shows one), so it would not be the artifact. Its gradient is the same clipped STE as here.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FakeQuant", "fake_quantize"]


class _FakeQuantFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: Any, lo: Any, hi: Any) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.qparams = (scale, lo, hi)
        return _forward(x, scale, lo, hi)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (x,) = ctx.saved_tensors
        scale, lo, hi = ctx.qparams
        v = torch.round(x / scale)
        return grad * ((v >= lo) & (v <= hi)), None, None, None


def _forward(x: torch.Tensor, scale: Any, lo: Any, hi: Any) -> torch.Tensor:
    # clip(round(x / s) + zp, qmin, qmax) - zp == clip(round(x / s), qmin - zp, qmax - zp) for integer zp,
    # so the zero point enters only through the bounds (all exact in float32).
    return torch.clamp(torch.round(x / scale), lo, hi) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                  qmax: int) -> torch.Tensor:
    """``DQ(Q(x))`` with ``scale``/``zero_point`` (float32 tensors broadcastable to ``x``; the zero point
    holds integers) on the integer grid ``[qmin, qmax]``; clipped straight-through gradient."""
    return FakeQuant(scale, zero_point, qmin, qmax)(x)


class FakeQuant:
    """One fixed encoding (per tensor, or per channel along ``axis``) applied as :func:`fake_quantize`.

    ``scale`` and ``zero_point`` are float32 tensors (per-channel ones 1-D); they move with :meth:`to`.
    A per-tensor encoding is applied with Python-float scalars (bit-identical, fewer kernel launches).
    """

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 axis: int | None = None) -> None:
        self.scale = scale.to(torch.float32)
        self.zero_point = zero_point.to(torch.float32)
        self.qmin, self.qmax, self.axis = int(qmin), int(qmax), axis
        self._scalars: tuple[float, float, float] | None = None
        if self.scale.numel() == 1 and self.zero_point.numel() == 1:
            zp = float(self.zero_point.reshape(()))
            self._scalars = (float(self.scale.reshape(())), self.qmin - zp, self.qmax - zp)

    @classmethod
    def from_encoding(cls, enc: Any) -> FakeQuant:
        """From a :class:`quadc.quant.affine.Encoding`."""
        scale = torch.from_numpy(enc.scale.astype("float32").copy())
        zp = torch.from_numpy(enc.zero_point.astype("float32").copy())
        return cls(scale, zp, enc.qtype.qmin, enc.qtype.qmax, enc.axis)

    def to(self, device: torch.device | str) -> FakeQuant:
        self.scale = self.scale.to(device)
        self.zero_point = self.zero_point.to(device)
        return self

    def _shaped(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None or t.ndim == 0:
            return t
        shape = [1] * x.ndim
        shape[self.axis % x.ndim] = t.numel()
        return t.reshape(shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._scalars is not None:
            scale, lo, hi = self._scalars
        else:
            scale = self._shaped(self.scale, x)
            zp = self._shaped(self.zero_point, x)
            lo, hi = self.qmin - zp, self.qmax - zp
        if torch.is_grad_enabled() and x.requires_grad:
            return _FakeQuantFn.apply(x, scale, lo, hi)
        return _forward(x, scale, lo, hi)
