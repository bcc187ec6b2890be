"""Claim measured: with the end-to-end A8 sensitivity (issue 12) the W8A8:W8A16 curve on the trained fixtures
follows the paper's Table 4 (almost nothing lost until most activations are 8-bit), and 8-bit activations
buy working memory (Table 5).

Run: ``cd benchmarks && ../.venv/bin/python bench_mixed_precision.py --eval 8`` (about 6 minutes on 2 idle
cores: each fraction's plan measures every one of the tiny U-Net's 546 activation units, 2,745 forwards;
``--set a8_groups=24`` measures 24 module groups instead, as on the full U-Net).

For each fraction F of 8-bit activations (``--a8-fraction F``), the trained tiny U-Net with the four
trained task LoRAs is compiled to ONE shared-encoding graph (``--target``, default ``onnx-qdq``) with the
default calibration (4 synthetic feeds, seed 0) and run on held-out inputs (``--eval`` feeds of seed 123)
against the float graph (target ``onnx``) with the same task bound:

- ``out SQNR``: output SQNR ``out_q(task)`` vs ``out_f(task)``, mean over inputs and tasks (base excluded);
- per task, the effect SQNR: ``out_q(task) - out_q(base)`` vs ``out_f(task) - out_f(base)`` (what the LoRA
  adds, the part a shared encoding can lose), mean over inputs;
- ``a8``: how many activations are 8-bit (of how many), ``forwards`` the sensitivity measurement cost;
- ``peak act``: the most integer activation bytes alive at once in the compiled graph
  (:func:`quadc.eval.footprint.peak_activation_bytes`), and ``artifact``: the artifact directory's bytes.

A last row compiles ``--precision w8a8`` (every activation 8-bit, the timestep path included).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import dir_bytes

FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
HELD_OUT_SEED = 123


def evaluate(engine, ref, feeds, tasks) -> tuple[float, dict[str, float]]:
    """Mean output SQNR over feeds and tasks, and each task's mean effect SQNR."""
    from quadc.quant.affine import sqnr_db

    out, effect = [], {t: [] for t in tasks}
    for feed in feeds:
        qb, fb = engine.run(feed)["out_sample"], ref.run(feed)["out_sample"]
        for task in tasks:
            q, f = engine.run(feed, task=task)["out_sample"], ref.run(feed, task=task)["out_sample"]
            out.append(sqnr_db(f, q))
            effect[task].append(sqnr_db(f - fb, q - qb))
    return float(np.mean(out)), {t: float(np.mean(v)) for t, v in effect.items()}


def row(label: str, work: Path, model, loras, plan_options: dict, target: str, ref, feeds) -> dict:
    import onnx

    from quadc.compiler import CompileOptions, compile_model
    from quadc.eval.footprint import observed_sizes, peak_activation_bytes
    from quadc.runtime.engine import Engine

    out = work / label
    t = time.perf_counter()
    manifest = compile_model(model, out, CompileOptions(target=target, loras=loras,
                                                        pass_options={"quant-plan": plan_options}))
    seconds = time.perf_counter() - t
    mean, effects = evaluate(Engine(out), ref, feeds, list(loras))
    graph_file = next(p for p in ("model.onnx", "qdq/model.onnx") if (out / p).exists())
    graph = onnx.load(str(out / graph_file))
    peak = peak_activation_bytes(graph, observed_sizes(graph, feeds[0]))
    quant = manifest.get("quant", {})
    report = manifest_report(out)
    return {"label": label, "sqnr": mean, "effects": effects, "a8": quant.get("a8_tensors", 0),
            "of": report.get("of"), "forwards": report.get("forwards", 0), "peak": peak,
            "size": dir_bytes(out), "seconds": seconds}


def manifest_report(out: Path) -> dict:
    """The plan's A8 report as the quant-plan pass recorded it (counts only)."""
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    for p in manifest.get("passes", []):
        if p["pass"] == "quant-plan":
            return {"of": p["counts"].get("activations"), "forwards": p["counts"].get("a8_forwards", 0)}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", type=int, default=8, help="held-out inputs (seed 123)")
    parser.add_argument("--target", default="onnx-qdq", help="quantized target to compile (onnx-qdq or qnn)")
    parser.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=V",
                        help="extra quant-plan option, e.g. a8_runs=10")
    args = parser.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.set)

    from quadc.compiler import CompileOptions, bundled_loras, bundled_model, compile_model
    from quadc.graph import load_model
    from quadc.quant.feeds import random_feeds
    from quadc.runtime.engine import Engine

    model = bundled_model()
    loras = {k: str(v) for k, v in bundled_loras().items()}
    feeds = random_feeds(load_model(model), args.eval, seed=HELD_OUT_SEED)
    work = Path(tempfile.mkdtemp(prefix="quadc-bench-mixed-"))
    try:
        compile_model(model, work / "float", CompileOptions(target="onnx", loras=loras))
        ref = Engine(work / "float")
        rows = [row(f"F={f}", work, model, loras, {**extra, "a8_fraction": float(f)}, args.target, ref, feeds)
                for f in (float(x) for x in args.fractions.split(","))]
        rows.append(row("w8a8", work, model, loras, {**extra, "precision": "w8a8"}, args.target, ref, feeds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tasks = list(loras)
    print(f"W8A8:W8A16 on the trained fixtures, target {args.target}, {args.eval} held-out inputs (seed "
          f"{HELD_OUT_SEED}); SQNR in dB against the float graph; effect = out(task) - out(base)\n")
    head = ["F (A8:A16)", "a8 tensors", "out SQNR", *[f"{t} effect" for t in tasks], "peak act KiB",
            "artifact KiB", "forwards", "compile s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        cells = [r["label"], f"{r['a8']}", f"{r['sqnr']:.1f}", *[f"{r['effects'][t]:.1f}" for t in tasks],
                 f"{r['peak'] / 1024:.1f}", f"{r['size'] / 1024:.0f}", f"{r['forwards']}", f"{r['seconds']:.1f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
