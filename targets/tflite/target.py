"""The shared fully integer 16x8 TFLite target; ``neuropilot`` and ``enn`` are its vendor variants.

Pipeline: ``float`` (lora-inputs, const-fold, dce), ``tflite::legalize``, ``quant-plan`` (one calibration
with every task bound; QSS anchor or unified fallback for the shared LoRA ranges). ``emit`` derives the
16x8 scheme from the plan's ranges (:func:`~.scheme.scheme_from_plan`), translates the graph
(:func:`~.convert.translate`), refuses an op outside the vendor plugin's list, and writes::

    model.tflite                 int16 activations (zero point 0), int8 per-channel weights, int32 biases;
                                 LoRA factors are int8 subgraph inputs (zero point 0), one encoding per slot;
                                 the plan's 8-bit activations (a8_fraction, w8a8) int8 asymmetric, each op
                                 on its int8 kernel when all its I/O are int8, QUANTIZE at width changes
    host.onnx                    the timestep embedding, computed on the host in numpy (see :mod:`.host`)
    encodings.json               every int16/int8 encoding (quadc's encodings file)
    lora/<task>.safetensors      the task's int8 LoRA tensors in the TFLite input layout, bound as they are
    manifest.json                interface (inputs/outputs with layout and quantization), ops, tasks

``verify`` runs the artifact in LiteRT and compares it with the float LoRA-as-input graph of the source
model with the task's LoRA (ORT CPU).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.quant.encodings import EncodingsFile, write_encodings
from quadc.targets.base import Target
from quadc.targets.tflite.host import host_graph, split_host
from quadc.targets.tflite.scheme import TfliteScheme, quantize_symmetric, scheme_from_plan

if TYPE_CHECKING:
    from quadc.context import CompileContext
    from quadc.targets.tflite.convert import Translation

GRAPH_FILE = "model.tflite"
HOST_FILE = "host.onnx"
ENCODINGS_FILE = "encodings.json"
BASE_TASKS = (None, "none")


def lora_perms(translation: Translation) -> dict[str, list[int]]:
    """LoRA input name -> the perm from its slot layout to its TFLite input layout."""
    return {s.name: s.perm for s in translation.inputs if s.kind == "lora"}


def write_tflite_task_files(ctx: CompileContext, out_dir: Path, scheme: TfliteScheme,
                            perms: Mapping[str, list[int]]) -> dict[str, Any]:
    """Every task's int8 LoRA tensors (TFLite layout, shared encodings) as ``lora/<task>.safetensors``;
    returns the manifest's ``lora_slots`` and ``tasks`` entries (with saturation per task)."""
    from quadc.graph import file_sha256
    from quadc.lora.pack import pack_task, saturation, write_safetensors
    from quadc.paths import check_task_names

    slots = ctx.lora_slots
    entries: dict[str, Any] = {"lora_slots": [], "tasks": {}}
    for slot in slots.values():
        entry = slot.to_dict()
        for side, name in (("down", slot.down_input), ("up", slot.up_input)):
            enc = scheme.lora[name]
            entry[side].update({"dtype": "int8", "zero_point": 0, "scale": float(enc.scale),
                                "tflite_perm": perms.get(name)})
        entries["lora_slots"].append(entry)
    if not slots or ctx.loras is None:
        return entries
    check_task_names(ctx.loras)
    slot_of = {n: m for m, s in slots.items() for n in (s.down_input, s.up_input)}
    lora_dir = out_dir / "lora"
    lora_dir.mkdir(exist_ok=True)
    for name, lora in ctx.loras.items():
        ctx.progress(f"packing task '{name}' (int8, TFLite layout)")
        modules = [m for m in slots if m in lora.layers]
        own = {n for m in modules for n in (slots[m].down_input, slots[m].up_input)}
        params = {k: v for k, v in pack_task(lora, slots).items() if k in own}
        sat = saturation(params, SimpleNamespace(lora=scheme.lora), slot_of)
        stored = {k: quantize_symmetric(np.ascontiguousarray(v.transpose(perms[k])), scheme.lora[k], narrow=True)
                  for k, v in sorted(params.items())}
        path = write_safetensors(stored, lora_dir / f"{name}.safetensors",
                                 {"quadc.task": name, "quadc.layout": "tflite", "quadc.encodings": "shared"})
        entries["tasks"][name] = {
            "source": Path(str(lora.source)).name,
            "format": lora.format,
            "layers": len(lora.layers),
            "modules": modules,
            "dtype": "int8",
            "files": {"safetensors": {"path": str(path.relative_to(out_dir)), "bytes": path.stat().st_size,
                                      "sha256": file_sha256(path)}},
            "lora_rom_bytes": path.stat().st_size,
            **sat.manifest_entry(),
        }
    return entries


def precision_label(scheme: TfliteScheme) -> str:
    """``a16w8`` (int16 activations), ``a8w8`` (all int8) or ``a16w8+a8w8`` (the a8_fraction mix)."""
    eight = len(scheme.int8_activations)
    if not eight:
        return "a16w8"
    return "a8w8" if eight == len(scheme.activations) else "a16w8+a8w8"


class TfliteTarget(Target):
    """Fully integer 16x8 TFLite (int16 activations, int8 weights and LoRA inputs) run in LiteRT."""

    name: ClassVar[str] = ""
    passes = ("float", "tflite::legalize", "quant-plan")
    requires_passes = ("lora-inputs", "tflite::legalize", "quant-plan")
    forbids_passes = ("qdq-insert",)
    static_shapes = True
    #: The TFLite ops the vendor's LiteRT compiler plugin takes (None: any LiteRT builtin).
    supported_ops: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        import importlib.util

        try:
            found = importlib.util.find_spec("ai_edge_litert") is not None
        except (ImportError, ValueError):  # a broken install, or an import blocked in sys.modules
            found = False
        if not found:
            return False, "needs ai-edge-litert (pip install 'quadc[tflite]') for the TFLite schema and interpreter"
        return True, ""

    def build(self, graph: gs.Graph, ctx: CompileContext) -> tuple[TfliteScheme, Translation, Any]:
        """The scheme, the 16x8 translation and the host split of ``graph`` (after the pipeline)."""
        if ctx.plan is None:
            raise QuadcError(f"target {self.name} needs the quantization plan; its pipeline must include quant-plan")
        # The TFLite schema comes from ai-edge-litert (the tflite extra): imported here, so that quadc and its
        # other targets import without it (``available`` says why this one is missing).
        from quadc.targets.tflite.convert import IntPolicy, check_ops, translate

        scheme = scheme_from_plan(graph, ctx.plan)
        host = split_host(graph)
        lora = [n for s in ctx.lora_slots.values() for n in (s.down_input, s.up_input)]
        policy = IntPolicy(scheme)
        translation = translate(graph, policy, lora_inputs=lora, host=host)
        if self.supported_ops is not None:
            check_ops(translation, self.supported_ops, self.name)
        scheme.report["bias_values_saturated"] = policy.bias_saturated
        return scheme, translation, host

    def emit(self, graph: gs.Graph, ctx: CompileContext, out_dir: Path) -> dict[str, Any]:
        scheme, translation, host = self.build(graph, ctx)
        (out_dir / GRAPH_FILE).write_bytes(translation.data)
        files = [GRAPH_FILE]
        if host.nodes:
            onnx.save(host_graph(graph, host), str(out_dir / HOST_FILE))
            files.append(HOST_FILE)
        write_encodings(out_dir / ENCODINGS_FILE, EncodingsFile(
            activations={**scheme.activations, **scheme.lora}, params={},
            quantizer_args={"activation_bitwidth": 16, "param_bitwidth": 8, "dtype": "int", "is_symmetric": True,
                            "per_channel_quantization": True, "lora_inputs": sorted(scheme.lora),
                            "lora_encodings": "shared by every task",
                            "int8_activations": "asymmetric" if scheme.int8_activations else "none"}))
        entries: dict[str, Any] = {
            "graph": GRAPH_FILE,
            "graph_files": files,
            "shared_rom_bytes": sum((out_dir / f).stat().st_size for f in files),
            "runtime": "litert",
            "precision": precision_label(scheme),
            "encodings": ENCODINGS_FILE,
            "quant": {**ctx.plan.summary(), "scheme": "int16 symmetric activations (zp 0), 8-bit ones int8 "
                      "asymmetric, int8 symmetric per-channel weights, int32 biases, int8 zp-0 LoRA inputs",
                      **scheme.report},
            "tflite": {"inputs": [s.to_dict() for s in translation.inputs],
                       "outputs": [s.to_dict() for s in translation.outputs],
                       "ops": translation.ops,
                       "host_graph": HOST_FILE if host.nodes else None,
                       "supported_ops": list(self.supported_ops) if self.supported_ops else None},
        }
        entries.update(write_tflite_task_files(ctx, out_dir, scheme, lora_perms(translation)))
        return entries

    def verify(self, artifact_dir: Path, feeds: dict[str, Any], task: str | None = None, *,
               model: str | os.PathLike[str] | None = None,
               loras: Mapping[str, str | os.PathLike[str]] | None = None) -> dict[str, Any]:
        """Run the artifact in LiteRT with ``task`` bound and report per output ``max_abs``, ``max_abs_err``
        and ``sqnr_db`` against the float LoRA-as-input graph of the source model with the task's float LoRA
        (ORT CPU). ``model``/``loras`` default to the bundled ones when the artifact was built from them."""
        from quadc.runtime.tflite_engine import TfliteEngine
        from quadc.targets.float_reference import float_reference, output_errors

        engine = TfliteEngine(artifact_dir)
        # The reference first: a missing source model or LoRA is refused before the artifact runs.
        ref = float_reference(engine.manifest, feeds, task, model=model, loras=loras)
        out = engine.run(feeds, task=task)
        return {"task": task or "none", "reference": "float LoRA-as-input graph (ORT CPU)",
                "outputs": output_errors(out, ref)}

