"""Issue 11 point 6 on real hardware: ``quadc align`` on the CPU, on one CUDA GPU, and under ``torchrun``.

Run: ``python benchmarks/bench_align_devices.py [--level model] [--steps 200] [--out DIR]`` on a machine
with a GPU (without one, only the CPU run is made). The bundled trained fixtures are aligned three times,
each in a fresh process and with the same seed:

  cpu      ``quadc align --device cpu``
  cuda     ``quadc align --device cuda`` (one GPU)
  torchrun ``torchrun --nproc_per_node=<GPUs> -m quadc.cli align --device cuda`` (DDP over NCCL; with one GPU
           a world of one, which still goes through the process group)

It prints wall time per run, each task's effect and output SQNR after alignment (from ``report.json``),
and how close each run's aligned LoRA tensors are to the CPU run's: the SQNR of the GPU tensors against the
CPU tensors (float kernels differ between devices, so training drifts apart a little; bit-equality is not
expected) and whether every run kept the same choice (aligned or original) per task. A summary goes to
``--out``/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _run(label: str, cmd: list[str], out: Path, env: dict[str, str]) -> dict:
    if out.exists():
        shutil.rmtree(out)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        print(f"{label}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"label": label, "failed": proc.returncode, "seconds": seconds, "stderr": proc.stderr[-3000:]}
    report = json.loads((out / "report.json").read_text())
    return {"label": label, "seconds": seconds, "dir": str(out), "device": report.get("device"),
            "world_size": report.get("world_size"), "tasks": report["tasks"]}


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}


def _sqnr(test: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    signal = sum(float(np.sum(ref[k] ** 2)) for k in ref)
    noise = sum(float(np.sum((test[k] - ref[k]) ** 2)) for k in ref)
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", choices=("layer", "model"), default="model")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of the cpu run")
    parser.add_argument("--out", type=Path, default=Path("align-devices"))
    args = parser.parse_args(argv)

    import torch

    gpus = torch.cuda.device_count()
    print(f"torch {torch.__version__}, {gpus} CUDA device(s)"
          + (f": {torch.cuda.get_device_name(0)}" if gpus else ""))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    common = ["align", "--level", args.level, "--steps", str(args.steps), "-q", "--force"]
    quadc = [sys.executable, "-m", "quadc.cli"]
    runs = [_run("cpu", [*quadc, *common, "--device", "cpu", "--threads", str(args.threads), "-o",
                         str(args.out / "cpu")], args.out / "cpu", env)]
    if gpus:
        runs.append(_run("cuda", [*quadc, *common, "--device", "cuda", "-o", str(args.out / "cuda")],
                         args.out / "cuda", env))
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", "-m", "quadc.cli"]
        runs.append(_run("torchrun", [*torchrun, *common, "--device", "cuda", "-o", str(args.out / "torchrun")],
                         args.out / "torchrun", env))
    ref = runs[0]
    print(f"\n{'run':<9} {'device':<8} {'world':>5} {'seconds':>8}  task: effect/output SQNR dB after, kept, "
          "aligned tensors vs cpu (SQNR dB)")
    for r in runs:
        if "failed" in r:
            print(f"{r['label']:<9} FAILED after {r['seconds']:.0f} s")
            continue
        print(f"{r['label']:<9} {r['device']:<8} {r['world_size']:>5} {r['seconds']:8.1f}")
        for task, info in sorted(r["tasks"].items()):
            after = info.get("after", info.get("before", {}))
            kept = info.get("kept", {}).get("which", info.get("role"))
            line = (f"{'':<34}{task:<20} {after.get('effect_sqnr_db', float('nan')):6.2f} / "
                    f"{after.get('output_sqnr_db', float('nan')):6.2f}  {kept:<9}")
            if r is not ref and "failed" not in ref and info.get("role") == "aligned":
                mine = _tensors(Path(r["dir"]) / info["file"])
                theirs = _tensors(Path(ref["dir"]) / ref["tasks"][task]["file"])
                info["tensor_sqnr_vs_cpu_db"] = _sqnr(mine, theirs)
                line += f"  {info['tensor_sqnr_vs_cpu_db']:.1f}"
            print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(runs, indent=1, default=str))
    return 0 if all("failed" not in r for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
