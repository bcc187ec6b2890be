"""``--a8-fraction`` on every quantized target: one ``quadc compile --target all`` per fraction, then each
artifact in its own executor (qnn: its QNN context on the HTP backend; neuropilot/enn: LiteRT; onnx-qdq:
ORT CPU) on held-out inputs (synthetic, a seed calibration never used).

Per target and fraction: output SQNR against the float LoRA-as-input graph (the ``onnx`` artifact of the
same compile) and against ``onnx-qdq`` at the same fraction, the minimum over the base model and every
task, plus how many ops run 8-bit (qnn: ``qnn::requantize``'s uint8 units; TFLite: ops whose activations
are all int8) and how many converts the mix costs (QNN converts; TFLite QUANTIZE ops).

    python benchmarks/bench_a8_targets.py --out /tmp/a8 --fractions 0,0.2,0.6,1,w8a8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from quadc.compiler import CompileOptions, bundled_model, compile_model
from quadc.graph import load_model
from quadc.quant.affine import sqnr_db_from_sums
from quadc.quant.feeds import random_feeds
from quadc.runtime.engine import Engine

HELD_OUT_SEED = 4242


def _sqnr(ref: dict, got: dict) -> float:
    return sqnr_db_from_sums(sum(float(np.sum(ref[k].astype(np.float64) ** 2)) for k in ref),
                             sum(float(np.sum((ref[k].astype(np.float64) - got[k]) ** 2)) for k in ref))


def _run(art: Path, feeds: list, tasks: list) -> dict:
    eng = Engine(art)
    return {(t, i): eng.run(f, t)["out_sample"] for t in tasks for i, f in enumerate(feeds)}


def _tflite_widths(art: Path) -> dict[str, int]:
    from ai_edge_litert import schema_py_generated as S

    from quadc.targets.tflite.writer import builtin_name, read_model

    model = read_model((art / "model.tflite").read_bytes())
    sub = model.subgraphs[0]
    dynamic = set(sub.inputs) | {i for o in sub.operators for i in o.outputs}
    lora = {s[side]["name"] for s in json.loads((art / "manifest.json").read_text())["lora_slots"]
            for side in ("down", "up")}
    out = {"int8 ops": 0, "int16 ops": 0, "converts": 0}
    for o in sub.operators:
        if builtin_name(model.operatorCodes[o.opcodeIndex].builtinCode) == "QUANTIZE":
            out["converts"] += 1
            continue
        ts = [sub.tensors[i] for i in [*o.inputs, *o.outputs] if i in dynamic]
        kinds = {t.type for t in ts if t.type in (S.TensorType.INT8, S.TensorType.INT16)
                 and t.name.decode() not in lora}
        out["int8 ops" if kinds == {S.TensorType.INT8} else "int16 ops"] += 1
    return out


def _qnn_widths(manifest: dict[str, Any]) -> dict[str, int]:
    counts = next((p["counts"] for p in manifest["passes"] if p["pass"] == "qnn::requantize"), {})
    return {"int8 ops": counts.get("units_u8", 0), "int16 ops": counts.get("units_u16", 0),
            "converts": counts.get("chains", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fractions", default="0,0.2,0.6,1,w8a8", help="comma-separated; w8a8: --precision w8a8")
    ap.add_argument("--feeds", type=int, default=4)
    args = ap.parse_args()
    feeds = random_feeds(load_model(bundled_model()), args.feeds, seed=HELD_OUT_SEED)
    print("| target | F | 8-bit activations | 8-bit ops / 16-bit ops | converts | min SQNR vs float (dB) "
          "| min SQNR vs onnx-qdq (dB) | executor |")
    print("|---|---|---|---|---|---|---|---|")
    for f in args.fractions.split(","):
        plan = {"precision": "w8a8"} if f == "w8a8" else {"a8_fraction": float(f)}
        out = args.out / f"F{f}"
        if not out.exists():
            t0 = time.perf_counter()
            compile_model(None, out, CompileOptions(target="all", pass_options={"quant-plan": plan}))
            print(f"<!-- compiled --target all {plan} in {time.perf_counter() - t0:.0f} s -->", flush=True)
        tasks = [None, *sorted(json.loads((out / "onnx" / "manifest.json").read_text())["tasks"])]
        ref = _run(out / "onnx", feeds, tasks)
        qdq = _run(out / "onnx-qdq", feeds, tasks)
        for target in ("onnx-qdq", "qnn", "neuropilot", "enn"):
            art = out / target
            if not art.exists():
                continue
            manifest = json.loads((art / "manifest.json").read_text())
            got = qdq if target == "onnx-qdq" else _run(art, feeds, tasks)
            per_task = {t: {k: v for k, v in got.items() if k[0] == t} for t in tasks}
            vs_float = min(_sqnr({k: ref[k] for k in g}, g) for g in per_task.values())
            vs_qdq = min(_sqnr({k: qdq[k] for k in g}, g) for g in per_task.values())
            widths = (_qnn_widths(manifest) if target == "qnn" else
                      _tflite_widths(art) if target in ("neuropilot", "enn") else {})
            executor = manifest.get("executor") or manifest.get("runtime") or "ort-cpu"
            eight = manifest["quant"].get("int8_activations", manifest["quant"].get("a8_tensors"))
            ops = f"{widths['int8 ops']} / {widths['int16 ops']}" if widths else "-"
            print(f"| {target} | {f} | {eight} | {ops} | {widths.get('converts', '-')} | {vs_float:.1f} | "
                  f"{'-' if target == 'onnx-qdq' else f'{vs_qdq:.1f}'} | {executor} |",
                  flush=True)


if __name__ == "__main__":
    main()
