"""Adapter packing: one task's LoRA as the exact tensors the compiled graph's LoRA inputs take.

For every slot the ``lora-inputs`` pass created, :func:`pack_task` builds ``<module>.lora_down`` and
``<module>.lora_up`` in the slot's layout, with the LoRA scale folded into ``up`` and the rank
zero-padded to the slot's rank (a task that does not touch a slot gets zeros there). The tensors are
written as an onnxruntime adapter file (``.onnx_adapter``, bound with ``RunOptions.add_active_adapter``)
and as safetensors.

Tensors take the slot's float type (``LoRASlot.dtype``: ``float32``, or ``float16`` for an fp16 model's
layers), so float task files bind to the graph's inputs as they are.

Example: a linear slot of rank 8 and a task of rank 4 with ``A [d_out, 4]``, ``B [4, d_in]``, scale s::

    lora_down = pad(Bᵀ, [d_in, 8])        lora_up = pad((s·A)ᵀ, [8, d_out])

(in the slot's ``"channels"`` layout, after ``linear-to-conv``, the same without the transposes; a slot's
``out_scale`` multiplies ``up`` too).

Quantized packing (:func:`quantize_task`) stores each tensor as the integers of the ONE encoding the plan
gives its slot input (``plan.lora``): every task uses the very same encoding objects, so one compiled graph
dequantizes every task's bytes identically. Values outside the shared range saturate; that is the method
(QUAD aligns the LoRAs so little does). :func:`saturation` counts them per slot; the manifest records each
task's saturated fraction and its worst slot, and ``--max-saturation`` turns too much into an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quadc.errors import QuadcError

if TYPE_CHECKING:
    from quadc.quant.plan import QuantPlan

ADAPTER_SUFFIX = ".onnx_adapter"
SAFETENSORS_SUFFIX = ".safetensors"


def _pad_axis(arr: np.ndarray, axis: int, size: int) -> np.ndarray:
    if arr.shape[axis] == size:
        return arr
    pad = [(0, 0)] * arr.ndim
    pad[axis] = (0, size - arr.shape[axis])
    return np.pad(arr, pad)


def slot_dtype(slot: Any) -> np.dtype:
    """The float type of a slot's inputs (``LoRASlot.dtype``: the layer's activation type)."""
    return np.dtype(getattr(slot, "dtype", "float32"))


def pack_task(lora: Any | None, slots: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Input name -> tensor in the slot's float type for every slot (zeros where ``lora`` has no layer;
    None = base). The scale is folded in float32 and the result rounded once to the slot's type."""
    params: dict[str, np.ndarray] = {}
    layers = lora.layers if lora is not None else {}
    for module, slot in slots.items():
        layer = layers.get(module)
        if layer is None:
            params[slot.down_input] = np.zeros(slot.down_shape, slot_dtype(slot))
            params[slot.up_input] = np.zeros(slot.up_shape, slot_dtype(slot))
            continue
        if layer.rank > slot.rank:
            raise QuadcError(f"task '{lora.name}' has rank {layer.rank} at '{module}', above the compiled slot "
                             f"rank {slot.rank}; compile again with this LoRA")
        up = np.asarray(layer.up, np.float32) * np.float32(layer.scale * slot.out_scale)
        down = np.asarray(layer.down, np.float32)
        if slot.layout == "conv":
            down = down.reshape(down.shape[0], down.shape[1], *(down.shape[2:] or (1, 1)))
            up = up.reshape(up.shape[0], up.shape[1], 1, 1)
            params[slot.down_input] = _pad_axis(down, 0, slot.rank)
            params[slot.up_input] = _pad_axis(up, 1, slot.rank)
        elif slot.layout == "channels":  # left MatMul operands: down [r, d_in], up [d_out, r]
            params[slot.down_input] = _pad_axis(down.reshape(down.shape[0], -1), 0, slot.rank)
            params[slot.up_input] = _pad_axis(up.reshape(up.shape[0], -1), 1, slot.rank)
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
            params[name] = np.ascontiguousarray(params[name], dtype=slot_dtype(slot))
    return params


def pack_tasks(loras: Any | None, slots: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Every task of a LoRASet packed for ``slots`` (:func:`pack_task`); empty without LoRAs or slots."""
    if loras is None or not slots:
        return {}
    return {name: pack_task(lora, slots) for name, lora in loras.items()}


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
    from quadc.lora.safetensors_io import save_safetensors

    return save_safetensors(params, path, metadata)


def read_packed(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Packed tensors from a ``.safetensors`` or ``.onnx_adapter`` file written by this module."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.numpy import load_file

        return load_file(str(path))
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    # OrtValue.numpy() views memory the AdapterFormat owns: copy before it is freed.
    return {k: np.array(v.numpy(), copy=True) for k, v in sorted(fmt.get_parameters().items())}


def _lora_encodings(plan: QuantPlan, names: list[str]) -> dict[str, Any]:
    missing = [n for n in names if n not in plan.lora]
    if missing:
        raise QuadcError(f"the quantization plan has no shared encoding for LoRA input '{missing[0]}'; "
                         "plan the LoRA encodings with every slot of this compile")
    return {n: plan.lora[n] for n in names}


def quantize_task(params: Mapping[str, np.ndarray], plan: QuantPlan) -> dict[str, np.ndarray]:
    """Input name -> integer tensor (uint8 for the default plan) under the plan's shared slot encoding.

    Uses :func:`quadc.quant.affine.quantize` (bit-exact with the graph's QuantizeLinear) with
    ``plan.lora[name]`` for every tensor: the same encoding for every task. Out-of-range values saturate.
    """
    from quadc.quant.affine import quantize

    encs = _lora_encodings(plan, sorted(params))
    return {n: np.ascontiguousarray(quantize(params[n], encs[n])) for n in sorted(params)}


def dequantize_task(qparams: Mapping[str, np.ndarray], plan: QuantPlan) -> dict[str, np.ndarray]:
    """The float32 values the graph's DequantizeLinear makes of a task's stored integers."""
    from quadc.quant.affine import dequantize

    encs = _lora_encodings(plan, sorted(qparams))
    return {n: dequantize(qparams[n], encs[n]) for n in sorted(qparams)}


@dataclass(frozen=True)
class Saturation:
    """How many of one task's float LoRA values saturate under the shared encodings, in all and per slot.

    ``per_slot`` maps a slot (its module path, or the input name when no slot table is given) to
    ``(saturated values, values)``; :attr:`worst_slot` is the slot with the highest saturated fraction.
    """

    saturated: int
    total: int
    per_slot: Mapping[str, tuple[int, int]]

    @property
    def fraction(self) -> float:
        return self.saturated / self.total if self.total else 0.0

    def slot_fraction(self, slot: str) -> float:
        clipped, total = self.per_slot[slot]
        return clipped / total if total else 0.0

    @property
    def worst_slot(self) -> str | None:
        """The slot with the highest saturated fraction (first in order on ties); None if none saturates."""
        if not self.saturated:
            return None
        return max(self.per_slot, key=self.slot_fraction)

    def manifest_entry(self) -> dict[str, Any]:
        """``saturated`` (the task's fraction) and ``saturated_worst_slot`` (module and its fraction, or
        None) for the task's manifest entry."""
        worst = self.worst_slot
        return {"saturated": round(self.fraction, 8),
                "saturated_worst_slot": None if worst is None else
                {"module": worst, "fraction": round(self.slot_fraction(worst), 8)}}

    def describe(self) -> str:
        """One phrase: the fraction and the worst slot, e.g. ``2.10% of LoRA values (worst slot m: 9.38%)``."""
        worst = self.worst_slot
        where = f" (worst slot {worst}: {self.slot_fraction(worst):.2%})" if worst is not None else ""
        return f"{self.fraction:.2%} of LoRA values{where}"


def saturation(params: Mapping[str, np.ndarray], plan: QuantPlan,
               slot_of: Mapping[str, str] | None = None) -> Saturation:
    """Count the float LoRA values of a task that saturate under the shared encodings: farther than half a
    step outside the representable range (closer ones round to the end of the grid like any value).

    ``slot_of`` maps input names to their slot's module path (both inputs of a slot count together);
    without it each input is its own slot.
    """
    encs = _lora_encodings(plan, sorted(params))
    per_slot: dict[str, tuple[int, int]] = {}
    for name, enc in encs.items():
        arr = np.asarray(params[name], np.float32)
        half = enc.scale.astype(np.float64) / 2
        lo, hi = enc.grid_min - half, enc.grid_max + half
        if enc.per_channel:
            shape = [1] * arr.ndim
            shape[enc.axis % arr.ndim] = enc.num_channels
            lo, hi = lo.reshape(shape), hi.reshape(shape)
        slot = slot_of.get(name, name) if slot_of is not None else name
        clipped, total = per_slot.get(slot, (0, 0))
        per_slot[slot] = (clipped + int(np.count_nonzero((arr < lo) | (arr > hi))), total + arr.size)
    return Saturation(sum(c for c, _ in per_slot.values()), sum(t for _, t in per_slot.values()), per_slot)


def saturated_fraction(params: Mapping[str, np.ndarray], plan: QuantPlan) -> float:
    """Fraction of a task's float LoRA values that saturate under the shared encodings (see
    :func:`saturation`)."""
    return saturation(params, plan).fraction


def _own_params(lora: Any, slots: Mapping[str, Any]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The slots (module paths) ``lora`` adapts and its packed float tensors for exactly those slots."""
    modules = [m for m in slots if m in lora.layers]
    own = {n for m in modules for n in (slots[m].down_input, slots[m].up_input)}
    return modules, {k: v for k, v in pack_task(lora, slots).items() if k in own}


def task_saturations(ctx: Any, plan: QuantPlan | None = None) -> dict[str, Saturation]:
    """Per task of ``ctx.loras``: its :class:`Saturation` under the shared LoRA encodings of ``plan``
    (default ``ctx.plan``); empty when there is no plan with LoRA encodings (float targets) or no task."""
    plan = plan if plan is not None else ctx.plan
    slots = ctx.lora_slots
    if plan is None or not plan.lora or not slots or ctx.loras is None:
        return {}
    slot_of = {n: m for m, s in slots.items() for n in (s.down_input, s.up_input)}
    return {name: saturation(_own_params(lora, slots)[1], plan, slot_of) for name, lora in ctx.loras.items()}


def check_max_saturation(saturations: Mapping[str, Saturation], limit: float) -> None:
    """A one-line QuadcError naming the most saturated task when any task saturates more than ``limit``."""
    over = {name: sat for name, sat in saturations.items() if sat.fraction > limit}
    if not over:
        return
    name = max(over, key=lambda n: over[n].fraction)
    others = f" ({len(over) - 1} other task(s) too)" if len(over) > 1 else ""
    raise QuadcError(f"task '{name}' saturates {over[name].describe()} under the shared encodings, above "
                     f"--max-saturation {limit:g}{others}; try --lora-policy unified, or compile that task "
                     "separately")


def slot_input_spec(enc: Any) -> dict[str, Any]:
    """Manifest description of a quantized slot input: dtype, zero point (and axis) of its shared encoding.

    The runtime binds ``zero_point`` everywhere for the base model, which dequantizes to exactly 0.
    """
    zp = enc.zero_point
    spec: dict[str, Any] = {"dtype": enc.qtype.value,
                            "zero_point": int(zp) if zp.ndim == 0 else [int(z) for z in zp.reshape(-1)]}
    if enc.axis is not None:
        spec["axis"] = int(enc.axis)
    return spec


def write_task_files(ctx: Any, out_dir: Path, *, quantized: bool = False,
                     plan: QuantPlan | None = None) -> dict[str, Any]:
    """Pack every task of ``ctx.loras`` into ``out_dir/lora/<task>.*``; return manifest entries.

    Manifest entries: ``lora_slots`` (the graph's LoRA inputs) and ``tasks`` (per task: files with bytes
    and sha256, source file and format, ``modules``: the slots the task stores (the runtime binds zeros
    to the others), ``lora_rom_bytes``: the bytes of the adapter file the runtime loads). With
    ``quantized`` the tensors are stored as integers under the shared encodings of ``plan`` (default
    ``ctx.plan``): each slot input entry gains its ``dtype`` and ``zero_point``; no encoding is stored per
    task. Whenever a plan with LoRA encodings exists (also for float LoRA inputs, which the graph's Q/DQ
    clips alike) each task gains ``saturated`` and ``saturated_worst_slot`` (:meth:`Saturation.manifest_entry`)
    and a progress line when any of its values saturate. Task names are checked to be safe file names.
    """
    from quadc.graph import file_sha256
    from quadc.paths import check_task_names

    slots = ctx.lora_slots
    if quantized:
        plan = plan if plan is not None else ctx.plan
        if plan is None:
            raise QuadcError("quantized LoRA files need the quantization plan's shared encodings; "
                             "compile with a quantizing target")
        if plan.lora_float_inputs:
            raise QuadcError("this plan keeps float LoRA inputs (lora_float_inputs); write float LoRA files")
    slot_entries = []
    for slot in slots.values():
        entry = slot.to_dict()
        if quantized:
            assert plan is not None
            encs = _lora_encodings(plan, [slot.down_input, slot.up_input])
            entry["down"].update(slot_input_spec(encs[slot.down_input]))
            entry["up"].update(slot_input_spec(encs[slot.up_input]))
        slot_entries.append(entry)
    entries: dict[str, Any] = {"lora_slots": slot_entries, "tasks": {}}
    if not slots or ctx.loras is None:
        return entries
    check_task_names(ctx.loras)  # task names become file names
    saturations = task_saturations(ctx, plan)
    lora_dir = out_dir / "lora"
    lora_dir.mkdir(exist_ok=True)
    for name, lora in ctx.loras.items():
        ctx.progress(f"packing task '{name}'")
        # Only the task's own slots are stored; the runtime binds the shared zero (zero-point) tensors
        # for the others, so a task that adapts few layers costs few bytes.
        modules, params = _own_params(lora, slots)
        metadata = {"quadc.task": name, "quadc.layout": "slot"}
        stored = params
        extra: dict[str, Any] = {}
        if name in saturations:
            extra.update(saturations[name].manifest_entry())
            if saturations[name].saturated:
                ctx.progress(f"task '{name}' saturates {saturations[name].describe()} under the shared "
                             "encodings")
        if quantized:
            assert plan is not None
            stored = quantize_task(params, plan)
            metadata["quadc.encodings"] = "shared"
        files = {
            "onnx_adapter": write_onnx_adapter(stored, lora_dir / f"{name}{ADAPTER_SUFFIX}"),
            "safetensors": write_safetensors(stored, lora_dir / f"{name}{SAFETENSORS_SUFFIX}", metadata),
        }
        entries["tasks"][name] = {
            "source": Path(str(lora.source)).name,
            "format": lora.format,
            "layers": len(lora.layers),
            "modules": modules,
            "dtype": str(next(iter(stored.values())).dtype) if stored else str(slot_dtype(next(iter(slots.values())))),
            "files": {kind: {"path": str(p.relative_to(out_dir)), "bytes": p.stat().st_size,
                             "sha256": file_sha256(p)} for kind, p in files.items()},
            "lora_rom_bytes": files["onnx_adapter"].stat().st_size,
            **extra,
        }
    return entries
