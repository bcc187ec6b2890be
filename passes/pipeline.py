"""Run an ordered list of passes: prerequisites, timing, print-after, and verification.

A pipeline is a list of pass names or a comma-separated string (``"const-fold,dce"``). Before running,
every pass's ``requires`` must appear earlier in the list or in ``ctx.applied``. Each pass is timed; its
counts and seconds go to ``ctx.stats``. ``print_after`` names passes after which the graph is printed in
ONNX text syntax. ``verify`` is ``"none"``, ``"check"`` (onnx checker after each pass) or ``"numeric"``
(checker, plus ORT outputs before vs after on random inputs for passes that preserve numerics; inputs a
pass adds are fed zeros, which for LoRA inputs means the base model).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from quadc.context import CompileContext
from quadc.errors import QuadcError
from quadc.graph import export_proto, ort_session, to_model_bytes, weight_bytes
from quadc.passes.base import GraphPass, PassResult, get_pass

VERIFY_MODES = ("none", "check", "numeric")
#: Models above this size are checked with onnx.checker on a file path (protobuf limit); skipped here.
_CHECK_MAX_BYTES = 1 << 30


@dataclass
class PassRecord:
    """One pass's entry in the pipeline report."""

    name: str
    changed: bool
    counts: dict[str, int]
    seconds: float
    max_abs_diff: float | None = None


def parse_pipeline(spec: str | Sequence[str]) -> list[GraphPass]:
    """Pass instances from ``"a,b,c"`` or ``["a", "b", "c"]``."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [s.strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise QuadcError("the pass pipeline is empty; name passes like --passes const-fold,dce")
    return [get_pass(n) for n in names]


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


def verify_inputs(graph: gs.Graph, seed: int = 0, dim_value: int = 1,
                 zero_inputs: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Random inputs for any graph (symbolic dims become ``dim_value``), for verify mode; U-Net calibration
    inputs come from :func:`quadc.quant.feeds.random_feeds`."""
    rng = np.random.default_rng(seed)
    zeros = set(zero_inputs)
    feeds: dict[str, np.ndarray] = {}
    for inp in graph.inputs:
        if inp.dtype is None or inp.shape is None:
            raise QuadcError(f"graph input '{inp.name}' has no dtype or shape; cannot build verify inputs")
        shape = tuple(d if isinstance(d, int) and d >= 0 else dim_value for d in inp.shape)
        dtype = np.dtype(inp.dtype)
        if inp.name in zeros:
            feeds[inp.name] = np.zeros(shape, dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            feeds[inp.name] = rng.integers(max(info.min, 0), min(info.max, 1000), shape, endpoint=False).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = rng.random(shape) < 0.5
        else:
            raise QuadcError(f"graph input '{inp.name}' has dtype {dtype}, which verify cannot generate")
    return feeds


def run_graph(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of the graph on ORT's CPU provider, in graph output order."""
    sess = ort_session(graph)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def check_graph(graph: gs.Graph, pass_name: str) -> None:
    """onnx.checker on the graph (without decoding external weights)."""
    model, _ = export_proto(graph)
    if model.ByteSize() > _CHECK_MAX_BYTES:
        return
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise RuntimeError(f"pass '{pass_name}' produced an invalid graph: {exc}") from exc


def print_graph(graph: gs.Graph) -> str:
    """The graph in ONNX text syntax (weights above 64 elements elided by the printer's choice)."""
    model = onnx.load_from_string(to_model_bytes(graph)) if weight_bytes(graph) < (64 << 20) else export_proto(graph)[0]
    return onnx.printer.to_text(model.graph)


def run_pipeline(graph: gs.Graph, passes: Sequence[GraphPass], ctx: CompileContext, *,
                 verify: str = "none", print_after: Iterable[str] = (),
                 verify_seed: int = 0, rtol: float = 1e-4) -> tuple[gs.Graph, list[PassRecord]]:
    """Run ``passes`` in order on ``graph``; returns the graph and one record per pass."""
    if verify not in VERIFY_MODES:
        raise QuadcError(f"unknown verify mode '{verify}'; use one of {', '.join(VERIFY_MODES)}")
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
        if verify == "numeric" and p.preserves_numerics:
            feeds = verify_inputs(graph, seed=verify_seed)
            reference = run_graph(graph, feeds)
        start = time.perf_counter()
        result: PassResult = p.run(graph, ctx)
        seconds = time.perf_counter() - start
        ctx.applied.append(p.name)
        record = PassRecord(p.name, result.changed, dict(result.counts), seconds)
        if verify in ("check", "numeric"):
            check_graph(graph, p.name)
        if reference is not None and feeds is not None:
            added = [i.name for i in graph.inputs if i.name not in before_inputs]
            feeds.update({k: v for k, v in verify_inputs(graph, seed=verify_seed, zero_inputs=added).items()
                          if k in added})
            after = run_graph(graph, feeds)
            record.max_abs_diff = _compare(reference, after, p.name, rtol)
        ctx.stats.append({"pass": p.name, "changed": result.changed, "counts": dict(result.counts),
                          "seconds": round(seconds, 6)})
        records.append(record)
        if p.name in dumps:
            text = print_graph(graph)
            if ctx.dump_dir is not None:
                ctx.dump_dir.mkdir(parents=True, exist_ok=True)
                (ctx.dump_dir / f"{index:02d}-{p.name}.onnxtxt").write_text(text)
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
