"""Check that a LoRA fits a model's attach points, and shape its factors for them.

Rules per layer: the module must be an attach point; linear LoRA goes on linear points (4-D factors with
1x1 kernels are accepted and squeezed); conv LoRA (LoCon: down ``[r, d_in, kh, kw]`` with the point's
kernel, up ``[d_out, r, 1, 1]``) goes on conv points; a 1x1 conv point (SD1.5's ``proj_in``/``proj_out``)
also takes linear-shaped factors, which become 1x1 convs. ``d_in``/``d_out`` must match the point.
"""

from __future__ import annotations

from quadc.errors import QuadcError
from quadc.frontend.model_info import AttachPoint, ModelInfo
from quadc.lora.model import LoRA, LoRALayer


def _expected(point: AttachPoint) -> str:
    if point.kind == "conv":
        kh, kw = point.kernel
        text = f"down [r, {point.d_in}, {kh}, {kw}] and up [{point.d_out}, r, 1, 1]"
        if tuple(point.kernel) == (1, 1):
            text += f" (or down [r, {point.d_in}] and up [{point.d_out}, r])"
        return f"conv {point.d_in}->{point.d_out} {kh}x{kw}: {text}"
    return f"linear {point.d_in}->{point.d_out}: down [r, {point.d_in}] and up [{point.d_out}, r]"


def _fit_layer(lora: LoRA, layer: LoRALayer, info: ModelInfo) -> LoRALayer:
    where = f"{lora.describe()}: layer '{layer.module}'"
    point = info.points.get(layer.module)
    if point is None:
        near = ", ".join(f"'{m}'" for m in info.nearest_modules(layer.module))
        raise QuadcError(
            f"{where} is not a LoRA attach point of the model (nearest: {near or 'none'}); the LoRA was made "
            "for another model — use a LoRA trained on this base model"
        )
    found = f"found down {tuple(layer.down.shape)} and up {tuple(layer.up.shape)}"
    mismatch = QuadcError(
        f"{where} does not fit: the model expects {_expected(point)}, {found}; use a LoRA made for this model"
    )
    down, up = layer.down, layer.up
    if point.kind == "linear":
        if down.ndim == 4:
            if tuple(down.shape[2:]) != (1, 1):
                raise QuadcError(
                    f"{where} is a {down.shape[2]}x{down.shape[3]} conv LoRA but the model's layer is linear "
                    f"(expects {_expected(point)}, {found}); use a LoRA made for this model"
                )
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
    elif point.kind == "conv":
        if down.ndim == 2:
            if tuple(point.kernel) != (1, 1):
                raise QuadcError(
                    f"{where} is a linear LoRA but the model's layer is a {point.kernel[0]}x{point.kernel[1]} "
                    f"conv (expects {_expected(point)}, {found}); use a LoRA made for this model"
                )
            down, up = down[:, :, None, None], up[:, :, None, None]
        elif tuple(down.shape[2:]) != tuple(point.kernel):
            raise mismatch
    else:
        raise QuadcError(f"{where}: attach point kind '{point.kind}' is unknown; this is a frontend bug")
    if down.shape[1] != point.d_in or up.shape[0] != point.d_out:
        raise mismatch
    if down is layer.down:
        return layer
    return LoRALayer(
        module=layer.module, up=up, down=down, alpha=layer.alpha, rank=layer.rank, rslora=layer.rslora
    )


def fit_lora(lora: LoRA, info: ModelInfo) -> LoRA:
    """A copy of ``lora`` with factors shaped for ``info``'s attach points (2-D linear, 4-D conv).

    Raises a QuadcError naming the file, layer and expected vs found shapes if a layer does not fit.
    """
    layers = {module: _fit_layer(lora, layer, info) for module, layer in lora.layers.items()}
    return LoRA(name=lora.name, layers=layers, source=lora.source, format=lora.format, meta=dict(lora.meta))


def check_fits(lora: LoRA, info: ModelInfo) -> None:
    """Raise a QuadcError unless every layer of ``lora`` fits an attach point of ``info``."""
    fit_lora(lora, info)
