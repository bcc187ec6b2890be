"""Claims measured: with LoRAs as graph inputs, N tasks cost one graph plus N small adapter files instead
of N full graphs with the LoRA merged in, and switching tasks means binding another adapter on the loaded
session instead of opening another model, which is much faster, while a forward pass costs about what
the merged graph's does.

Run: ``.venv/bin/python benchmarks/bench_lora_storage_switch.py`` (full SD1.5 U-Net, cached export;
``--config tiny`` for a quick run). Ten random rank-64 LoRAs on every attention and feed-forward layer.

(a) storage for N = 1, 4, 10 tasks, measured on real files: quadc's artifact (graph + N adapter files)
    vs N merged graphs, each written to disk, measured, then deleted;
(b) task-switch time: on one loaded ORT session, loading and binding a task's adapter, vs creating an ORT
    session for that task's merged graph; both followed by one forward pass, also reported, and a
    steady-state forward of each (the first forward after a switch pays one-time allocations).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from _common import CACHE, cached_export, dir_bytes

from quadc import frontend
from quadc.compiler import CompileOptions, compile_model
from quadc.context import stderr_progress
from quadc.export.configs import TEXT_TOKENS, get_config
from quadc.graph import load_model, save_model
from quadc.lora import fit_lora, read_lora
from quadc.lora.merge import merge_lora
from quadc.testing_lora import random_lora, write_diffusers

MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def make_loras(info, root: Path, n: int, rank: int) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i in range(n):
        path = root / f"task{i:02d}.safetensors"
        if not path.exists():
            write_diffusers(random_lora(info, modules=MODULES, rank=rank, alpha=float(rank), seed=1000 + i,
                                        scale_std=0.05, name=f"task{i:02d}"), path)
        paths[f"task{i:02d}"] = path
    return paths


def feeds_for(config: str) -> dict[str, np.ndarray]:
    cfg = get_config(config)
    rng = np.random.default_rng(0)
    s = cfg["sample_size"]
    return {"sample": rng.standard_normal((1, 4, s, s)).astype(np.float32),
            "timestep": np.array([500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((1, TEXT_TOKENS[config], cfg["cross_attention_dim"])
                                                         ).astype(np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=10)
    args = parser.parse_args()
    import onnxruntime as ort

    src = cached_export(args.config)
    _, info = frontend.load(src)
    work = CACHE / f"lora-bench-{args.config}-r{args.rank}"
    loras = make_loras(info, work / "loras", args.tasks, args.rank)

    art = work / "artifact"
    t = time.perf_counter()
    compile_model(src, art, CompileOptions(loras={k: str(v) for k, v in loras.items()}, force=True),
                  progress=stderr_progress)
    compile_s = time.perf_counter() - t
    graph_bytes = sum((art / f).stat().st_size for f in ("model.onnx", "model.onnx.data") if (art / f).exists())
    adapter_bytes = [(art / "lora" / f"{k}.onnx_adapter").stat().st_size for k in loras]

    # (a) N merged graphs, each written for real.
    merged_bytes: list[int] = []
    keep = work / "merged0"
    for i, (task, path) in enumerate(loras.items()):
        out = work / "merged-tmp"
        shutil.rmtree(out, ignore_errors=True)
        graph = load_model(src)
        merge_lora(graph, info, fit_lora(read_lora(path, name=task, info=info), info))
        save_model(graph, out / "unet.onnx")
        merged_bytes.append(dir_bytes(out))
        if i == 0:
            shutil.rmtree(keep, ignore_errors=True)
            out.rename(keep)
        else:
            shutil.rmtree(out)
        print(f"[bench] merged graph {i + 1}/{len(loras)}: {merged_bytes[-1] / 2**20:.0f} MiB", file=sys.stderr)

    print(f"model {src.name} ({args.config}), {len(loras)} LoRAs of rank {args.rank} on {', '.join(MODULES)}")
    print(f"quadc compile with {len(loras)} tasks: {compile_s:.1f} s")
    print(f"{'N':>3} {'quadc graph+adapters':>22} {'N merged graphs':>18} {'ratio merged/quadc':>20}")
    for n in (1, 4, 10):
        if n > len(loras):
            continue
        ours = graph_bytes + sum(adapter_bytes[:n])
        theirs = sum(merged_bytes[:n])
        print(f"{n:>3} {ours / 2**20:>18.1f} MiB {theirs / 2**20:>14.1f} MiB {theirs / ours:>20.2f}")
    print(f"    (graph {graph_bytes / 2**20:.1f} MiB, adapter {np.mean(adapter_bytes) / 2**20:.1f} MiB per task)")

    # (b) switch time.
    from quadc.runtime.engine import Engine

    feeds = feeds_for(args.config)
    engine = Engine(art, cache_size=1)
    engine.run(feeds, task=None)  # warm the session
    switch, switch_run = [], []
    for task in list(loras)[:3]:
        t = time.perf_counter()
        engine.store.get(task)
        switch.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.run(feeds, task=task)
        switch_run.append(time.perf_counter() - t)
    t = time.perf_counter()
    engine.run(feeds, task=list(loras)[2])
    steady = time.perf_counter() - t
    del engine
    so = ort.SessionOptions()
    so.log_severity_level = 3
    t = time.perf_counter()
    sess = ort.InferenceSession(str(keep / "unet.onnx"), so, providers=["CPUExecutionProvider"])
    create = time.perf_counter() - t
    t = time.perf_counter()
    sess.run(None, feeds)
    merged_run = time.perf_counter() - t
    t = time.perf_counter()
    sess.run(None, feeds)
    merged_steady = time.perf_counter() - t
    print(f"switch on one session (load+bind adapter): {np.median(switch) * 1000:9.1f} ms "
          f"(+ first forward {np.median(switch_run):.2f} s)")
    print(f"new session for a merged graph            : {create * 1000:9.1f} ms (+ first forward {merged_run:.2f} s)")
    print(f"switch speed-up (session create / adapter switch): {create / np.median(switch):.1f}x; "
          f"including the first forward: {(create + merged_run) / (np.median(switch) + np.median(switch_run)):.2f}x")
    print(f"steady-state forward (same task again): LoRA-as-input {steady:.2f} s, merged graph {merged_steady:.2f} s "
          f"(ratio {steady / merged_steady:.2f})")


if __name__ == "__main__":
    main()
