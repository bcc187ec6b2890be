"""Run an ordered pipeline of passes: presets, options, prerequisites, conditions, timing, verification.

A :class:`PassPipeline` is an editable list of steps (pass name + options), built from pass and preset
names (``"float,qdq"`` or ``["lora-inputs", "cleanup"]``, presets in :mod:`quadc.passes.presets`) and
edited by name like coremltools' ``PassPipeline``: ``insert_pass``, ``remove_passes``, ``set_options``.
Options are validated against the pass's declared :class:`~quadc.passes.base.PassOption` s when set.

:func:`run_pipeline` checks every pass's ``requires`` (it must appear earlier or in ``ctx.applied``),
times each pass (counts and seconds go to ``ctx.stats``), repeats ``fixed_point`` passes until they
report no change, prints the graph after passes named in ``print_after``, and verifies per ``verify``:

- ``"none"``: nothing;
- ``"check"``: the full onnx checker with types after each pass (on a saved copy when the graph is over
  the 2 GB protobuf limit), and each pass's pre- and postconditions;
- ``"numeric"``: ``check``, plus ORT outputs before vs after on random inputs for passes that preserve
  numerics. Existing inputs get random non-zero values, and LoRA slot inputs the compiled tasks' own
  tensors (:func:`task_feeds`, packed again after a pass that changes a slot's layout), so a mis-wired
  LoRA branch shows; inputs a pass adds are fed zeros (for
  LoRA inputs: the base model).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.errors import QuadcError
from quadc.graph import export_proto, ort_session, save_model, to_model_bytes, weight_bytes
from quadc.graph_inputs import random_inputs
from quadc.passes.base import GraphPass, PassResult, get_pass, registered_passes
from quadc.passes.presets import PRESETS, expand

VERIFY_MODES = ("none", "check", "numeric")
#: Protobuf's limit: larger models are checked from a saved copy with external data.
_PROTO_LIMIT = (2 << 30) - 1
#: A fixed-point pass that still changes the graph after this many rounds is a bug.
MAX_FIXED_POINT_ROUNDS = 16


@dataclass
class PassStep:
    """One step of a pipeline: a pass name and the option values set for it."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


class PassPipeline:
    """An ordered, editable list of pass steps; presets expand when the pipeline is built."""

    def __init__(self, names: str | Iterable[str] = ()) -> None:
        if isinstance(names, str):
            names = [s.strip() for s in names.split(",")]
        items = [n.strip() for n in names if n and n.strip()]
        try:
            expanded = expand(items)
        except ValueError as exc:
            raise QuadcError(str(exc)) from None
        known = registered_passes()
        for name in expanded:
            if name not in known:
                raise QuadcError(f"unknown pass '{name}'; known passes and presets: "
                                 f"{', '.join([*PRESETS, *known])}")
        self.steps: list[PassStep] = [PassStep(n) for n in expanded]

    @classmethod
    def parse(cls, spec: str | Sequence[str]) -> PassPipeline:
        """A pipeline from ``"a,b,preset"`` or a list; an empty spec is a one-line error."""
        pipeline = cls(spec)
        if not pipeline.steps:
            raise QuadcError("the pass pipeline is empty; name passes or presets like --passes float,qdq")
        return pipeline

    @property
    def names(self) -> list[str]:
        """The pass names in order."""
        return [s.name for s in self.steps]

    def __str__(self) -> str:
        return ",".join(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def insert_pass(self, name: str, *, index: int | None = None, after: str | None = None,
                    before: str | None = None, **options: Any) -> PassPipeline:
        """Insert pass or preset ``name`` at ``index``, after/before the first step called so, or last."""
        new = PassPipeline([name]).steps
        for step in new:
            step.options = dict(options)
            get_pass(step.name, step.options)  # validate now, not at run time
        if after is not None:
            index = self._index(after) + 1
        elif before is not None:
            index = self._index(before)
        index = len(self.steps) if index is None else index
        self.steps[index:index] = new
        return self

    def remove_passes(self, names: Iterable[str]) -> PassPipeline:
        """Remove every step whose pass is named (a preset name removes its passes)."""
        drop = set(PassPipeline(list(names)).names)
        self.steps = [s for s in self.steps if s.name not in drop]
        return self

    def set_options(self, name: str, **options: Any) -> PassPipeline:
        """Set options of every step of pass ``name``; checked against the pass's declared options."""
        steps = [s for s in self.steps if s.name == name]
        if not steps:
            raise QuadcError(f"options are set for pass '{name}', which is not in the pipeline ({self})")
        for step in steps:
            merged = {**step.options, **options}
            get_pass(name, merged)
            step.options = merged
        return self

    def build(self) -> list[GraphPass]:
        """Fresh pass instances with their options parsed."""
        return [get_pass(s.name, s.options) for s in self.steps]

    def _index(self, name: str) -> int:
        if name not in self.names:
            raise QuadcError(f"pass '{name}' is not in the pipeline ({self})")
        return self.names.index(name)


@dataclass
class PassRecord:
    """One pass's entry in the pipeline report."""

    name: str
    changed: bool
    counts: dict[str, int]
    seconds: float
    max_abs_diff: float | None = None
    rounds: int = 1
    options: dict[str, Any] = field(default_factory=dict)


def parse_pipeline(spec: str | Sequence[str] | PassPipeline) -> list[GraphPass]:
    """Pass instances from ``"a,b,c"``, a list of pass/preset names, or a :class:`PassPipeline`."""
    pipeline = spec if isinstance(spec, PassPipeline) else PassPipeline.parse(spec)
    return pipeline.build()


def check_prerequisites(passes: Sequence[GraphPass], already: Iterable[str] = ()) -> None:
    """Raise a QuadcError if a pass runs before one it requires."""
    seen = set(already)
    for p in passes:
        missing = [r for r in p.requires if r not in seen]
        if missing:
            raise QuadcError(
                f"pass '{p.name}' requires {', '.join(repr(m) for m in missing)} to run before it; "
                "reorder the pipeline"
            )
        seen.add(p.name)


def _slot_inputs(ctx: CompileContext) -> list[str]:
    """Every LoRA slot input name (fed zeros unless a task gives values: random values would not follow
    a pass that changes a slot's layout)."""
    return [n for s in ctx.lora_slots.values() for n in (s.down_input, s.up_input)]


def task_feeds(graph: gs.Graph, ctx: CompileContext) -> dict[str, np.ndarray]:
    """The compiled tasks' LoRA slot tensors (each slot from the first task that uses it) for the slot
    inputs the graph has, for numeric verify.

    N(0, 1) noise in every slot pushes the tiny U-Net's attention logits to ~1e3; there float32 rounding
    alone moves the output by more than the tolerance (the float graph run by ORT with and without its
    graph optimizations differs by 4% of the output scale), so a pass that merely reorders attention
    arithmetic would fail. Task tensors have the size real LoRAs have and are non-zero.
    """
    if ctx.loras is None or not ctx.lora_slots:
        return {}
    from quadc.lora.pack import pack_task

    shapes = {t.name: tuple(t.shape or ()) for t in graph.inputs}
    feeds: dict[str, np.ndarray] = {}
    for lora in ctx.loras.values():
        for name, value in pack_task(lora, ctx.lora_slots).items():
            if name not in feeds and shapes.get(name) == value.shape and np.any(value):
                feeds[name] = value
    return feeds


def run_graph(graph: gs.Graph, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of the graph on ORT's CPU provider, in graph output order."""
    sess = ort_session(graph)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def check_graph(graph: gs.Graph, pass_name: str) -> None:
    """The full onnx checker (types and shapes inferred strictly) on the graph; a graph over the 2 GB
    protobuf limit is saved to a temporary directory and checked by path."""
    model, _ = export_proto(graph)
    try:
        if model.ByteSize() <= _PROTO_LIMIT and weight_bytes(graph) <= _PROTO_LIMIT - model.ByteSize():
            onnx.checker.check_model(onnx.load_from_string(to_model_bytes(graph)), full_check=True)
        else:
            with tempfile.TemporaryDirectory(prefix="quadc-check-") as tmp:
                path = save_model(graph, Path(tmp) / "model.onnx", external=True)
                onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise RuntimeError(f"pass '{pass_name}' produced an invalid graph: {first}") from exc


def check_conditions(p: GraphPass, graph: gs.Graph, ctx: CompileContext, when: str) -> None:
    """Raise naming the pass when its pre- (``when="before"``) or postcondition does not hold."""
    failed = p.precondition(graph, ctx) if when == "before" else p.postcondition(graph, ctx)
    if failed:
        kind = "precondition" if when == "before" else "postcondition"
        raise RuntimeError(f"{kind} of pass '{p.name}' does not hold: {'; '.join(failed)}")


def print_graph(graph: gs.Graph) -> str:
    """The graph in ONNX text syntax (weights above 64 elements elided by the printer's choice)."""
    model = onnx.load_from_string(to_model_bytes(graph)) if weight_bytes(graph) < (64 << 20) else export_proto(graph)[0]
    return onnx.printer.to_text(model.graph)


def _run_once_or_to_fixed_point(p: GraphPass, graph: gs.Graph, ctx: CompileContext) -> tuple[PassResult, int]:
    result = p.run(graph, ctx)
    if not p.fixed_point:
        return result, 1
    total = PassResult(result.changed, dict(result.counts))
    rounds = 1
    while result.changed:
        if rounds >= MAX_FIXED_POINT_ROUNDS:
            raise RuntimeError(f"pass '{p.name}' still changes the graph after {rounds} rounds")
        result = p.run(graph, ctx)
        rounds += 1
        for k, v in result.counts.items():
            total.counts[k] = total.counts.get(k, 0) + v
    return total, rounds


def run_pipeline(graph: gs.Graph, passes: Sequence[GraphPass] | PassPipeline | str, ctx: CompileContext, *,
                 verify: str = "none", print_after: Iterable[str] = (),
                 verify_seed: int = 0, rtol: float = 1e-4) -> tuple[gs.Graph, list[PassRecord]]:
    """Run ``passes`` in order on ``graph``; returns the graph and one record per pass."""
    if verify not in VERIFY_MODES:
        raise QuadcError(f"unknown verify mode '{verify}'; use one of {', '.join(VERIFY_MODES)}")
    if not isinstance(passes, Sequence) or isinstance(passes, str):
        passes = parse_pipeline(passes)
    check_prerequisites(passes, ctx.applied)
    dumps = set(print_after)
    unknown = dumps - {p.name for p in passes}
    if unknown:
        raise QuadcError(f"--print-after names {', '.join(sorted(unknown))}, which is not in the pipeline")
    records: list[PassRecord] = []
    for index, p in enumerate(passes, 1):
        ctx.progress(f"pass {index}/{len(passes)}: {p.name}")
        before_inputs = {i.name for i in graph.inputs}
        reference = None
        feeds = None
        if verify != "none":
            check_conditions(p, graph, ctx, "before")
        if verify == "numeric" and p.preserves_numerics:
            feeds = random_inputs(graph, seed=verify_seed, zero_inputs=_slot_inputs(ctx))
            feeds.update(task_feeds(graph, ctx))
            reference = run_graph(graph, feeds)
        start = time.perf_counter()
        result, rounds = _run_once_or_to_fixed_point(p, graph, ctx)
        seconds = time.perf_counter() - start
        ctx.applied.append(p.name)
        record = PassRecord(p.name, result.changed, dict(result.counts), seconds, rounds=rounds,
                            options={k: v for k, v in p.opts.items() if v is not None})
        if verify != "none":
            check_graph(graph, p.name)
            check_conditions(p, graph, ctx, "after")
        if reference is not None and feeds is not None:
            added = [i.name for i in graph.inputs if i.name not in before_inputs]
            feeds.update(random_inputs(graph, seed=verify_seed, zero_inputs=added, names=added))
            # A pass may move a slot to another layout (ctx.lora_slots): the same tasks, packed anew.
            resized = [i.name for i in graph.inputs if i.name in feeds and tuple(i.shape or ()) != feeds[i.name].shape]
            feeds.update(random_inputs(graph, seed=verify_seed, zero_inputs=resized, names=resized))
            feeds.update({k: v for k, v in task_feeds(graph, ctx).items() if k not in added})
            after = run_graph(graph, feeds)
            record.max_abs_diff = _compare(reference, after, p.name, rtol)
        ctx.stats.append({"pass": p.name, "changed": result.changed, "counts": dict(result.counts),
                          "seconds": round(seconds, 6)})
        records.append(record)
        if p.name in dumps:
            text = print_graph(graph)
            if ctx.dump_dir is not None:
                ctx.dump_dir.mkdir(parents=True, exist_ok=True)
                (ctx.dump_dir / f"{index:02d}-{p.name.replace('::', '--')}.onnxtxt").write_text(text)
            else:
                print(f"// after {p.name}\n{text}")
    return graph, records


def _compare(reference: list[np.ndarray], after: list[np.ndarray], name: str, rtol: float) -> float:
    if len(reference) != len(after):
        raise RuntimeError(f"pass '{name}' changed the number of graph outputs")
    worst = 0.0
    for ref, got in zip(reference, after, strict=True):
        if ref.shape != got.shape:
            raise RuntimeError(f"pass '{name}' changed an output shape {ref.shape} -> {got.shape}")
        scale = float(np.max(np.abs(ref))) or 1.0
        diff = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)))) if ref.size else 0.0
        worst = max(worst, diff)
        if diff > rtol * scale + 1e-6:
            raise RuntimeError(
                f"pass '{name}' changed the graph's numbers: max abs diff {diff:.3g} vs output scale {scale:.3g}"
            )
    return worst
