"""Issue 8 benchmark: the full-size quantized path against plain ``onnx.load`` + ``onnx.save``.

Run: ``.venv/bin/python benchmarks/bench_full_qdq.py`` (minutes; ~6 GB RAM at a time).

The full SD1.5 U-Net from the TorchScript exporter (opset 17, so ``qdq-insert`` upgrades a graph above
2 GB to opset 21; cached under ``.cache/bench/``), 4 random rank-16 LoRAs on every attention and
feed-forward projection, compiled to ``onnx-qdq`` with ``--calib-random 2``. Each step runs in a fresh
process, side by side in this one run:

  plain   ``onnx.load`` + ``onnx.save`` (external data) of the same file: the floor for reading and writing
          the weights once
  quadc   ``compile_model`` to ``onnx-qdq``
  task    the artifact's runtime (``Engine``) running one task
  forward one plain float forward of the LoRA-as-input graph (no taps; ORT's extended level, as
          calibration), times the runs calibration must make (feeds x (tasks + base)): the part of the
          compile time that one forward per (feed, task) cannot go below

For each: wall time, CPU time (user + system), peak RSS (the child's ``ru_maxrss``, also polled, so a child killed for memory
still reports) and bytes written (the child's ``/proc/self/io`` ``write_bytes``: what it sent to the
storage layer, temporary files included). Then the ratios against the issue's targets: time <= 3x plain,
peak RSS <= 1.5x the fp32 weights, bytes written beyond the artifact <= the artifact's size.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from _common import CACHE, cached_export, dir_bytes, measure

MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
TARGETS = {"time": 3.0, "rss": 1.5, "extra_disk": 1.0}
#: Appended to every child's code: what the process sent to storage (temporary files included).
WRITTEN = ("result['write_bytes'] = int(dict(line.split(': ') for line in "
           "open('/proc/self/io').read().splitlines())['write_bytes'])\n")


def make_loras(model: Path, root: Path, n: int, rank: int) -> dict[str, Path]:
    """``n`` random rank-``rank`` LoRAs on every attention and feed-forward projection (cached)."""
    from quadc import frontend
    from quadc.testing_lora import random_lora, write_diffusers

    root.mkdir(parents=True, exist_ok=True)
    paths = {f"task{i}": root / f"task{i}-r{rank}.safetensors" for i in range(n)}
    if not all(p.exists() for p in paths.values()):
        _, info = frontend.load(model)
        for i, (name, path) in enumerate(paths.items()):
            write_diffusers(random_lora(info, modules=MODULES, rank=rank, seed=1000 + i, scale_std=0.05, name=name),
                            path)
    return paths


def _line(name: str, r: dict) -> str:
    if "failed" in r:
        return f"{name:<8} FAILED ({r['failed']}) after {r['seconds']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB"
    return (f"{name:<8} {r['seconds']:7.1f} s ({r.get('cpu_s', float('nan')):6.1f} s CPU)   peak RSS {r['peak_rss_gib']:5.2f} GiB   "
            f"written {r['write_bytes'] / 2**30:5.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--calib", type=int, default=2, help="random calibration inputs (--calib-random)")
    args = parser.parse_args()

    src = cached_export("sd15", "torchscript")
    weights = (src.parent / (src.name + ".data")).stat().st_size
    loras = make_loras(src, CACHE / "loras-full-qdq", args.tasks, args.rank)
    work = CACHE / "full-qdq"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"full sd15 U-Net, TorchScript export (opset 17), {weights / 2**30:.2f} GiB fp32 weights; "
          f"{len(loras)} rank-{args.rank} LoRAs on {', '.join(MODULES)}; onnx-qdq, --calib-random {args.calib}",
          flush=True)

    plain = measure(
        "import onnx, os\n"
        f"os.makedirs({str(work / 'plain')!r})\n"
        f"m = onnx.load({str(src)!r})\n"
        f"onnx.save(m, {str(work / 'plain' / 'unet.onnx')!r}, save_as_external_data=True, location='unet.onnx.data')\n"
        + WRITTEN, allow_failure=True)
    shutil.rmtree(work / "plain", ignore_errors=True)
    print(_line("plain", plain), flush=True)

    out = work / "quadc"
    task_loras = {name: str(path) for name, path in loras.items()}
    quadc = measure(
        "from quadc.compiler import CompileOptions, compile_model\n"
        f"compile_model({str(src)!r}, {str(out)!r}, CompileOptions(target='onnx-qdq', loras={task_loras!r}, "
        f"pass_options={{'quant-plan': {{'calib_random': {args.calib}}}}}))\n" + WRITTEN, allow_failure=True)
    print(_line("quadc", quadc), flush=True)
    if "failed" in quadc:
        print(quadc["stderr"])
        return
    artifact = dir_bytes(out)
    print(f"         artifact {artifact / 2**30:.2f} GiB, written beyond it "
          f"{(quadc['write_bytes'] - artifact) / 2**30:.2f} GiB", flush=True)

    task = next(iter(loras))
    run = measure(
        "import time, numpy as np\n"
        "from quadc.export import example_inputs\n"
        "from quadc.runtime.engine import Engine\n"
        f"engine = Engine({str(out)!r})\n"
        "feeds = example_inputs('sd15', seed=1)\n"
        "t = time.perf_counter()\n"
        f"y = engine.run(feeds, task={task!r})['out_sample']\n"
        "result['forward_s'] = time.perf_counter() - t\n"
        "result['shape'] = list(y.shape)\n"
        "result['finite'] = bool(np.isfinite(y).all())\n"
        "result['std'] = float(y.std())\n" + WRITTEN, allow_failure=True)
    print(_line("task", run), flush=True)
    if "failed" not in run:
        print(f"         task {task!r}: out_sample {run['shape']}, finite {run['finite']}, std {run['std']:.3f}, "
              f"forward {run['forward_s']:.1f} s")

    runs = args.calib * (len(loras) + 1)
    forward = measure(
        "import time, numpy as np\n"
        "from quadc.compiler import prepare\n"
        "from quadc.graph import ort_session\n"
        "from quadc.passes import PassPipeline, run_pipeline\n"
        "from quadc.quant.feeds import random_feeds\n"
        f"graph, ctx, _ = prepare({str(src)!r}, {task_loras!r})\n"
        "graph, _ = run_pipeline(graph, PassPipeline.parse('float').build(), ctx)\n"
        "feeds = {t.name: np.zeros(t.shape, np.float32) for t in graph.inputs}\n"
        "feeds.update(random_feeds(graph, 1)[0])\n"
        "import onnxruntime as ort\n"
        "session = ort_session(graph, graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)\n"
        "session.run(None, feeds)\n"
        "t = time.perf_counter()\n"
        "session.run(None, feeds)\n"
        "result['forward_s'] = time.perf_counter() - t\n" + WRITTEN, allow_failure=True)
    if "failed" not in forward:
        floor = runs * forward["forward_s"]
        print(f"forward  {forward['forward_s']:7.1f} s   one float forward; x {runs} calibration runs = {floor:.0f} s "
              f"= {floor / plain['seconds']:.2f}x plain load+save before anything else", flush=True)

    if "failed" not in plain:
        print(f"compile CPU time / plain load+save CPU time  {quadc['cpu_s'] / plain['cpu_s']:6.2f}  (wall time depends "
              "on what else runs on the machine; CPU seconds less so)")
    ratios = {
        "time": quadc["seconds"] / plain["seconds"] if "failed" not in plain else float("nan"),
        "rss": quadc["peak_rss_gib"] * 2**30 / weights,
        "extra_disk": max(0, quadc["write_bytes"] - artifact) / artifact,
    }
    labels = {"time": "compile time / plain load+save", "rss": "peak RSS / fp32 weights",
              "extra_disk": "bytes written beyond the artifact / artifact"}
    for key, value in ratios.items():
        verdict = "ok" if value <= TARGETS[key] else "MISSED"
        print(f"{labels[key]:<46} {value:6.2f}  (target <= {TARGETS[key]:.1f})  {verdict}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
