"""Adapter packing: one task's LoRA as the exact tensors the compiled graph's LoRA inputs take.

For every slot the ``lora-inputs`` pass created, :func:`pack_task` builds ``<module>.lora_down`` and
``<module>.lora_up`` in the slot's layout, with the LoRA scale folded into ``up`` and the rank
zero-padded to the slot's rank (a task that does not touch a slot gets zeros there). The tensors are
written as an onnxruntime adapter file (``.onnx_adapter``, bound with ``RunOptions.add_active_adapter``)
and as safetensors.

Example: a linear slot of rank 8 and a task of rank 4 with ``A [d_out, 4]``, ``B [4, d_in]``, scale s::

    lora_down = pad(Bᵀ, [d_in, 8])        lora_up = pad((s·A)ᵀ, [8, d_out])
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quadc.errors import QuadcError

ADAPTER_SUFFIX = ".onnx_adapter"
SAFETENSORS_SUFFIX = ".safetensors"


def _pad_axis(arr: np.ndarray, axis: int, size: int) -> np.ndarray:
    if arr.shape[axis] == size:
        return arr
    pad = [(0, 0)] * arr.ndim
    pad[axis] = (0, size - arr.shape[axis])
    return np.pad(arr, pad)


def pack_task(lora: Any | None, slots: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Input name -> float32 tensor for every slot (zeros where ``lora`` has no layer; None = base)."""
    params: dict[str, np.ndarray] = {}
    layers = lora.layers if lora is not None else {}
    for module, slot in slots.items():
        layer = layers.get(module)
        if layer is None:
            params[slot.down_input] = np.zeros(slot.down_shape, np.float32)
            params[slot.up_input] = np.zeros(slot.up_shape, np.float32)
            continue
        if layer.rank > slot.rank:
            raise QuadcError(f"task '{lora.name}' has rank {layer.rank} at '{module}', above the compiled slot "
                             f"rank {slot.rank}; compile again with this LoRA")
        up = np.asarray(layer.up, np.float32) * np.float32(layer.scale)
        down = np.asarray(layer.down, np.float32)
        if slot.kind == "conv":
            down = down.reshape(down.shape[0], down.shape[1], *(down.shape[2:] or (1, 1)))
            up = up.reshape(up.shape[0], up.shape[1], 1, 1)
            params[slot.down_input] = _pad_axis(down, 0, slot.rank)
            params[slot.up_input] = _pad_axis(up, 1, slot.rank)
        else:
            down = down.reshape(down.shape[0], -1)
            up = up.reshape(up.shape[0], -1)
            params[slot.down_input] = _pad_axis(down.T, 1, slot.rank)
            params[slot.up_input] = _pad_axis(up.T, 0, slot.rank)
        for name in (slot.down_input, slot.up_input):
            expected = slot.down_shape if name == slot.down_input else slot.up_shape
            if params[name].shape != tuple(expected):
                raise QuadcError(f"task '{lora.name}': '{name}' packs to {params[name].shape}, the graph expects "
                                 f"{tuple(expected)}; the LoRA does not fit layer '{module}'")
            params[name] = np.ascontiguousarray(params[name], dtype=np.float32)
    return params


def write_onnx_adapter(params: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> Path:
    """Write an onnxruntime adapter file (``onnxruntime.AdapterFormat``)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(params[k])) for k in sorted(params)})
    fmt.export_adapter(str(path))
    return Path(path)


def write_safetensors(params: Mapping[str, np.ndarray], path: str | os.PathLike[str],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write the packed tensors as safetensors (deterministic: the safetensors library orders
    multi-key metadata differently from run to run, so quadc's own writer is used)."""
    from quadc.lora.make import save_safetensors

    return save_safetensors(params, path, metadata)


def read_packed(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Packed tensors from a ``.safetensors`` or ``.onnx_adapter`` file written by this module."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.numpy import load_file

        return load_file(str(path))
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    return {k: v.numpy() for k, v in fmt.get_parameters().items()}


def write_task_files(ctx: Any, out_dir: Path) -> dict[str, Any]:
    """Pack every task of ``ctx.loras`` into ``out_dir/lora/<task>.*``; return manifest entries.

    Manifest entries: ``lora_slots`` (the graph's LoRA inputs) and ``tasks`` (per task: files with bytes
    and sha256, source file and format), plus ``lora_rom_bytes`` per task.
    """
    from quadc.graph import file_sha256

    slots = getattr(ctx, "lora_slots", None) or {}
    entries: dict[str, Any] = {"lora_slots": [slot.to_dict() for slot in slots.values()], "tasks": {}}
    if not slots or ctx.loras is None:
        return entries
    lora_dir = out_dir / "lora"
    lora_dir.mkdir(exist_ok=True)
    for name, lora in ctx.loras.items():
        ctx.progress(f"packing task '{name}'")
        params = pack_task(lora, slots)
        files = {
            "onnx_adapter": write_onnx_adapter(params, lora_dir / f"{name}{ADAPTER_SUFFIX}"),
            "safetensors": write_safetensors(params, lora_dir / f"{name}{SAFETENSORS_SUFFIX}",
                                             {"quadc.task": name, "quadc.layout": "slot"}),
        }
        entries["tasks"][name] = {
            "source": Path(str(lora.source)).name,
            "format": lora.format,
            "layers": len(lora.layers),
            "files": {kind: {"path": str(p.relative_to(out_dir)), "bytes": p.stat().st_size,
                             "sha256": file_sha256(p)} for kind, p in files.items()},
        }
    return entries
