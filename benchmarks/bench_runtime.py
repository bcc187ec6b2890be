"""Claims measured: serving many tasks from one loaded LoRA-as-input graph costs little per step against a
merged graph (<= 10 %), a warm task switch is about a millisecond or less, 10 loaded tasks need far less
RAM than 10 sessions of merged graphs, and 10 tasks store in far fewer bytes than 10 compiled graphs.
Also: which way of binding a task's tensors is faster, OrtValues fed as ordinary inputs (what
quadc.runtime.Engine does) or onnxruntime LoraAdapter objects through RunOptions.add_active_adapter.

Run: ``.venv/bin/python benchmarks/bench_runtime.py`` (full SD1.5 U-Net with random weights, the cached
export; ``--config tiny`` for a quick run). Ten random rank-64 LoRAs on every attention and feed-forward
layer, compiled for the float ``onnx`` target, so both sides of each comparison are float32 on ORT's CPU
provider. Each measurement runs in a fresh process (its peak RSS is its own).

(a) per-step overhead of LoRA-as-input against the merged graph, side by side in ONE process: the merged
    graph's session (task 0 merged into the weights) and the artifact's session, same feeds, same session
    options, both loaded together; --repeats rounds after a warm-up, each round one forward of each in a
    rotating order (merged, Engine.run with task 0 bound, BoundRunner with IOBinding and reused buffers),
    so load from other processes and clock changes hit all alike. Reported: median and best ms of each,
    the overhead of the medians and the median of the per-round ratios (both against the merged graph's
    run of the same round), and the largest difference of the outputs (the same task, so the same result);
    and where the extra time can go: the multiply-adds of the LoRA branches (x @ down, then @ up, per
    adapted layer, by the token count of x) against those of every MatMul/Gemm/Conv of the U-Net, from
    onnxruntime's symbolic shape inference of the artifact's graph;
(b) switch latency: warm (task cached: BoundRunner selects the task's IOBinding), cold (read the task
    file into OrtValues, then bind every LoRA input into a new IOBinding), and onnxruntime.LoraAdapter.Load for comparison;
(c) the public adapter path: a copy of the graph whose LoRA inputs have zero initializer defaults, run
    with RunOptions.add_active_adapter, against the same task fed as OrtValues;
(d) peak RSS: the engine with 1 task loaded, with 10, and k sessions of merged graphs (k = 1, 2; 10 is
    extrapolated from the increment, since ten full-size sessions do not fit this machine's memory);
(e) storage: graph + N adapter files against N merged graphs (all merged graphs have the same size:
    the same tensors; one is written and measured);
(f) the image pipeline per stage (as the paper's Tables 2/3): the U-Net with task 0 and the VAE encoder and
    decoder of the same config (random weights, ``quadc export --component vae-encoder|vae-decoder``)
    compiled into one artifact, then ``quadc.pipeline.generate`` img2img (a random image, random prompt
    embeddings, LCM, 4 steps) twice on one loaded pipeline; the second run's stages are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path

from _common import CACHE, cached_export, dir_bytes, measure
from bench_lora_storage_switch import make_loras

from quadc import frontend
from quadc.compiler import CompileOptions, compile_model
from quadc.context import stderr_progress
from quadc.graph import load_model, save_model
from quadc.lora import fit_lora, read_lora
from quadc.lora.merge import merge_lora

BENCH = Path(__file__).resolve().parent

PRELUDE = f"""
import sys, time, statistics
sys.path.insert(0, {str(BENCH)!r})
import numpy as np
from bench_lora_storage_switch import feeds_for
def median_ms(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)
def medians_ms(fns, runs):
    # Median ms of each function, run in turns (a, b, a, b, ...): load from other processes hits both alike.
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t = time.perf_counter(); fn(); times[i].append(time.perf_counter() - t)
    return [(1000 * min(ts), 1000 * statistics.median(ts)) for ts in times]
"""


def engine_code(art: Path, config: str, tasks: list[str], runs: int) -> str:
    return PRELUDE + f"""
from quadc.runtime.engine import Engine
from quadc.runtime.lora_store import load_packed_task
import onnxruntime as ort
feeds = feeds_for({config!r})
tasks = {tasks!r}
engine = Engine({str(art)!r}, cache_size=None)
runner = engine.runner()
result['engine_run_ms'], result['runner_run_ms'] = medians_ms(
    [lambda: engine.run(feeds, task=tasks[0]), lambda: runner.run(feeds, task=tasks[0])], {runs})
for t in tasks:
    engine.store.get(t)
b = engine.runner()
for t in tasks:
    b.bind_task(t)  # each cached task gets its binding once
order = [tasks[i % len(tasks)] for i in range(200)]
t0 = time.perf_counter()
for t in order:
    b.bind_task(t)
result['warm_switch_ms'] = 1000 * (time.perf_counter() - t0) / len(order)
t0 = time.perf_counter()
for t in order:
    engine.lora_values(t)
result['warm_lookup_us'] = 1e6 * (time.perf_counter() - t0) / len(order)
cold, adapter = [], []
for t in tasks:
    path = engine.task_file(t)
    t0 = time.perf_counter(); loaded = engine._load_task(t, path)  # read the file into OrtValues
    fresh = engine.session.io_binding()
    for name, value in loaded.values.items():
        fresh.bind_ortvalue_input(name, value)
    cold.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); a = ort.LoraAdapter(); a.Load(str(path)); adapter.append(time.perf_counter() - t0)
result['cold_switch_ms'] = 1000 * statistics.median(cold)
result['lora_adapter_load_ms'] = 1000 * statistics.median(adapter)
result['task_bytes'] = engine.store.get(tasks[0]).nbytes
"""


def overhead_code(merged: Path, art: Path, config: str, task: str, repeats: int, threads: int) -> str:
    return PRELUDE + f"""
import onnxruntime as ort
from quadc.runtime.engine import Engine
feeds = feeds_for({config!r})
def options():
    so = ort.SessionOptions(); so.log_severity_level = 3
    if {threads}:
        so.intra_op_num_threads = {threads}
    return so
merged = ort.InferenceSession({str(merged)!r}, options(), providers=['CPUExecutionProvider'])
engine = Engine({str(art)!r}, cache_size=None, session_options=options())  # as the merged one
runner = engine.runner()
want = merged.run(None, feeds)[0]
got = engine.run(feeds, task={task!r})['out_sample']
result['max_abs_diff'] = float(np.abs(got - want).max())
result['max_abs_out'] = float(np.abs(want).max())
fns = {{'merged': lambda: merged.run(None, feeds),
       'engine': lambda: engine.run(feeds, task={task!r}),
       'runner': lambda: runner.run(feeds, task={task!r})}}
for fn in fns.values():
    fn(); fn()  # warm-up: allocator arenas, IOBinding buffers
names = list(fns)
times = {{k: [] for k in names}}
for r in range({repeats}):
    for k in names[r % len(names):] + names[:r % len(names)]:
        t = time.perf_counter(); fns[k](); times[k].append(time.perf_counter() - t)
result['ms'] = {{k: [1000 * min(v), 1000 * statistics.median(v)] for k, v in times.items()}}
result['round_ratio'] = {{k: statistics.median(a / b for a, b in zip(times[k], times['merged']))
                         for k in names if k != 'merged'}}
result['repeats'] = {repeats}
"""


def merged_code(graph: Path, config: str, sessions: int, runs: int) -> str:
    return PRELUDE + f"""
import onnxruntime as ort
feeds = feeds_for({config!r})
so = ort.SessionOptions(); so.log_severity_level = 3
t0 = time.perf_counter()
sess = [ort.InferenceSession({str(graph)!r}, so, providers=['CPUExecutionProvider']) for _ in range({sessions})]
result['create_s'] = (time.perf_counter() - t0) / {sessions}
for s in sess:
    s.run(None, feeds)
if {runs}:
    (result['run_ms'],) = medians_ms([lambda: sess[0].run(None, feeds)], {runs})
"""


def loaded_code(art: Path, config: str, tasks: list[str]) -> str:
    return PRELUDE + f"""
from quadc.runtime.engine import Engine
feeds = feeds_for({config!r})
engine = Engine({str(art)!r}, cache_size=None)
for t in {tasks!r}:
    engine.store.get(t)
engine.run(feeds, task={tasks[0]!r})
result['cached_bytes'] = engine.store.cached_bytes
"""


def adapter_code(graph: Path, art: Path, config: str, task: str, runs: int) -> str:
    return PRELUDE + f"""
import onnxruntime as ort
from pathlib import Path
from quadc.runtime.lora_store import load_packed_task
feeds = feeds_for({config!r})
path = Path({str(art)!r}) / 'lora' / '{task}.onnx_adapter'
so = ort.SessionOptions(); so.log_severity_level = 3
sess = ort.InferenceSession({str(graph)!r}, so, providers=['CPUExecutionProvider'])
adapter = ort.LoraAdapter(); adapter.Load(str(path))
opts = ort.RunOptions(); opts.add_active_adapter(adapter)
values = load_packed_task({task!r}, path).values  # the other slots keep their zero defaults
with_adapter = sess.run(None, feeds, opts)[0]
as_inputs = sess.run(None, {{**feeds, **values}})[0]
result['max_abs_diff'] = float(np.abs(with_adapter - as_inputs).max())
result['adapter_run_ms'], result['ortvalue_run_ms'] = medians_ms(
    [lambda: sess.run(None, feeds, opts), lambda: sess.run(None, {{**feeds, **values}})], {runs})
def switch():
    o = ort.RunOptions(); o.add_active_adapter(adapter)
result['adapter_switch_us'] = 1e3 * median_ms(switch, 200)
"""


def pipeline_code(art: Path, task: str, steps: int) -> str:
    return PRELUDE + f"""
from quadc.pipeline.generate import LoadedPipeline, generate
pipe = LoadedPipeline({str(art)!r})
enc_shape = [int(d) for d in pipe.vae_encoder.session.get_inputs()[0].shape]
rng = np.random.default_rng(0)
image = rng.uniform(-1, 1, enc_shape).astype(np.float32)
cond = next(i for i in pipe.unet.session.get_inputs() if i.name == 'encoder_hidden_states')
embeds = rng.standard_normal([int(d) for d in cond.shape]).astype(np.float32)
runs = [generate({str(art)!r}, {task!r}, sampler='lcm', steps={steps}, image=image, prompt_embeds=embeds,
                 strength=1.0, engine=pipe) for _ in range(2)]
result['first_end_to_end_s'] = runs[0].timings['end_to_end']
result['timings'] = runs[1].timings
result['timesteps'] = runs[1].timesteps
result['image_shape'] = list(runs[1].image.shape)
"""


def pipeline_artifact(config: str, work: Path, task: str, lora: Path) -> Path:
    """U-Net (task ``task`` only) + VAE encoder and decoder of ``config``, float ``onnx`` target (cached)."""
    from quadc.export.components import export_component

    art = work / "pipeline-artifact"
    if (art / "manifest.json").exists():
        return art
    vae = {}
    for component in ("vae-encoder", "vae-decoder"):
        path = CACHE / f"{config}-{component}" / f"{component}.onnx"
        if not path.exists():
            export_component(component, config=config, out=path, progress=stderr_progress)
        vae[component] = path
    compile_model(cached_export(config), art, CompileOptions(loras={task: str(lora)}, components=vae, force=True),
                  progress=stderr_progress)
    return art


def lora_macs(art: Path) -> dict:
    """Multiply-adds of the artifact graph's MatMul/Gemm/Conv nodes: ``base`` (no LoRA input), ``lora``
    (a LoRA input: the down and up MatMuls) and ``lora_by_tokens`` (the LoRA ones by the token count of
    their input), from onnxruntime's symbolic shape inference; ``unknown``: nodes without static shapes."""
    import numpy as np
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    manifest = json.loads((art / "manifest.json").read_text())
    names = {side["name"] for slot in manifest["lora_slots"] for side in (slot["down"], slot["up"])}
    # Shape inference reads constant shape inputs from the external data file, relative to the working folder.
    with contextlib.chdir(art):
        model = SymbolicShapeInference.infer_shapes(
            onnx.load(manifest["graph"], load_external_data=False), auto_merge=True)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    out = {"base": 0, "lora": 0, "lora_by_tokens": {}, "unknown": 0}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        a, w, y = (shapes.get(n) for n in (node.input[0], node.input[1], node.output[0]))
        if not a or not w or not y or None in (*a, *w, *y):
            out["unknown"] += 1
            continue
        macs = int(np.prod(y)) * (int(np.prod(w[1:])) if node.op_type == "Conv" else a[-1])
        if names & set(node.input):
            out["lora"] += macs
            tokens = str(int(np.prod(a[:-1])))
            out["lora_by_tokens"][tokens] = out["lora_by_tokens"].get(tokens, 0) + macs
        else:
            out["base"] += macs
    return out


def with_zero_defaults(art: Path) -> Path:
    """A copy of the artifact's graph (sharing its external data file) whose LoRA inputs have zero
    initializer defaults, so that onnxruntime's Python API accepts adapter-bound runs."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    out = art / "model_zero_defaults.onnx"
    if out.exists():
        return out
    manifest = json.loads((art / "manifest.json").read_text())
    names = {side["name"] for slot in manifest["lora_slots"] for side in (slot["down"], slot["up"])}
    model = onnx.load(str(art / manifest["graph"]), load_external_data=False)
    for inp in model.graph.input:
        if inp.name in names:
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
            model.graph.initializer.append(numpy_helper.from_array(np.zeros(dims, dtype), inp.name))
    onnx.save(model, str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15,
                        help="rounds of the one-process overhead measurement (a)")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads of both sessions in (a) (0: onnxruntime's default)")
    parser.add_argument("--keep", action="store_true", help="keep the merged graph for the next run")
    parser.add_argument("--resume", action="store_true", help="reuse the phases results.json already holds")
    args = parser.parse_args()

    src = cached_export(args.config)
    _, info = frontend.load(src)
    work = CACHE / f"runtime-bench-{args.config}-r{args.rank}"
    loras = make_loras(info, work / "loras", args.tasks, args.rank)
    tasks = list(loras)
    art = work / "artifact"
    if not (art / "manifest.json").exists():
        compile_model(src, art, CompileOptions(loras={k: str(v) for k, v in loras.items()}, force=True),
                      progress=stderr_progress)
    merged = work / "merged" / "unet.onnx"
    if not merged.exists():
        graph = load_model(src)
        merge_lora(graph, info, fit_lora(read_lora(loras[tasks[0]], name=tasks[0], info=info), info))
        save_model(graph, merged)
        del graph
    zero_defaults = with_zero_defaults(art)

    # Each phase's result is kept in results.json as soon as it is measured; --resume skips those already
    # there (a phase killed for memory by other processes on a shared machine can then be run again).
    saved = work / "results.json"
    results = json.loads(saved.read_text()) if args.resume and saved.exists() else {}
    phases = {
        "overhead": lambda: overhead_code(merged, art, args.config, tasks[0], args.repeats, args.threads),
        "engine": lambda: engine_code(art, args.config, tasks, args.runs),
        "merged": lambda: merged_code(merged, args.config, 1, args.runs),
        "adapter": lambda: adapter_code(zero_defaults, art, args.config, tasks[0], args.runs),
        "one": lambda: loaded_code(art, args.config, tasks[:1]),
        "ten": lambda: loaded_code(art, args.config, tasks),
        "merged2": lambda: merged_code(merged, args.config, 2, 0),
        "pipeline": lambda: pipeline_code(pipeline_artifact(args.config, work, tasks[0], loras[tasks[0]]),
                                          tasks[0], 4),
    }
    for name, code in phases.items():
        if name in results and "failed" not in results[name]:
            continue
        print(f"[bench] {name}", file=sys.stderr, flush=True)
        results[name] = measure(code(), allow_failure=True)
        results[name].pop("stderr", None)
        saved.write_text(json.dumps(results, indent=1))
    failed = {k: v["failed"] for k, v in results.items() if "failed" in v}
    if failed:
        print(f"phases that failed (run again with --resume): {failed}")
    ov, eng, m1, ad, one, ten, m2, pipe = (results[k] for k in phases)
    if "macs" not in results:
        results["macs"] = lora_macs(art)
        saved.write_text(json.dumps(results, indent=1))
    macs = results["macs"]

    graph_bytes = dir_bytes(art) - sum(p.stat().st_size for p in (art / "lora").glob("*")) \
        - zero_defaults.stat().st_size
    adapter_bytes = [(art / "lora" / f"{t}.onnx_adapter").stat().st_size for t in tasks]
    merged_bytes = dir_bytes(merged.parent)

    print(f"model {src.name} ({args.config}), {len(tasks)} LoRAs of rank {args.rank}, float32 on ORT CPU; "
          f"{args.runs} timed runs each")
    print(f"\n(a) per-step U-Net latency, one process, {ov.get('repeats', '?')} alternating rounds, "
          f"{args.threads or 'default'} intra-op threads")
    if failed:
        return
    base = ov["ms"]["merged"][1]
    print(f"  {'':38} {'best':>10} {'median':>10}  median vs merged  median per-round ratio")
    for key, label in (("merged", "merged graph (session.run)"), ("engine", "LoRA-as-input, Engine.run"),
                       ("runner", "LoRA-as-input, BoundRunner (IOBinding)")):
        best, med = ov["ms"][key]
        ratio = f"{100 * (ov['round_ratio'][key] - 1):+6.1f} %" if key in ov["round_ratio"] else ""
        print(f"  {label:38} {best:7.1f} ms {med:7.1f} ms  {100 * (med / base - 1):+6.1f} %{'':10} {ratio}")
    print(f"  outputs differ by at most {ov['max_abs_diff']:.2g} (largest output {ov['max_abs_out']:.2g}); "
          f"peak RSS of this process {ov['peak_rss_gib']:.2f} GiB")
    print(f"  multiply-adds: U-Net {macs['base'] / 1e6:.1f} M, LoRA branches {macs['lora'] / 1e6:.1f} M "
          f"(+{100 * macs['lora'] / macs['base']:.1f} %; {macs['unknown']} nodes without static shapes)")
    print("  LoRA branches by input tokens: " + ", ".join(
        f"{t}: {v / 1e6:.1f} M" for t, v in sorted(macs["lora_by_tokens"].items(), key=lambda kv: -int(kv[0]))))
    print("\n(b) task switch")
    print(f"  warm: cached task, BoundRunner.bind_task    {eng['warm_switch_ms']:8.3f} ms "
          f"(Engine.run's look-up alone {eng['warm_lookup_us']:.1f} us)")
    print(f"  cold: read task file into OrtValues + bind  {eng['cold_switch_ms']:8.1f} ms "
          f"({eng['task_bytes'] / 2**20:.1f} MiB per task)")
    print(f"  for comparison: LoraAdapter.Load (cold)     {eng['lora_adapter_load_ms']:8.1f} ms")
    print(f"  new session for a merged graph              {1000 * m1['create_s']:8.0f} ms")
    print("\n(c) binding path, same graph with zero defaults for the LoRA inputs")
    print(f"  RunOptions.add_active_adapter  best {ad['adapter_run_ms'][0]:8.1f} ms, median "
          f"{ad['adapter_run_ms'][1]:8.1f} ms per run (+ {ad['adapter_switch_us']:.1f} us to build the run options)")
    print(f"  OrtValues as ordinary inputs   best {ad['ortvalue_run_ms'][0]:8.1f} ms, median "
          f"{ad['ortvalue_run_ms'][1]:8.1f} ms per run (outputs differ by {ad['max_abs_diff']:.2g})")
    print("\n(d) peak RSS")
    print(f"  engine, 1 task loaded            {one['peak_rss_gib']:7.2f} GiB")
    print(f"  engine, {len(tasks)} tasks loaded          {ten['peak_rss_gib']:7.2f} GiB "
          f"({ten['cached_bytes'] / 2**20:.0f} MiB of LoRA tensors)")
    print(f"  1 merged session                 {m1['peak_rss_gib']:7.2f} GiB")
    if "failed" in m2:
        print(f"  2 merged sessions                failed ({m2['failed']}) at {m2['peak_rss_gib']:.2f} GiB")
    else:
        step = m2["peak_rss_gib"] - m1["peak_rss_gib"]
        print(f"  2 merged sessions                {m2['peak_rss_gib']:7.2f} GiB")
        print(f"  {len(tasks)} merged sessions (extrapolated) {m1['peak_rss_gib'] + (len(tasks) - 1) * step:7.2f} GiB")
    print("\n(e) storage")
    print(f"  graph {graph_bytes / 2**20:.1f} MiB + {len(tasks)} adapters {sum(adapter_bytes) / 2**20:.1f} MiB = "
          f"{(graph_bytes + sum(adapter_bytes)) / 2**20:.1f} MiB; {len(tasks)} merged graphs "
          f"{len(tasks) * merged_bytes / 2**20:.1f} MiB (ratio {len(tasks) * merged_bytes / (graph_bytes + sum(adapter_bytes)):.2f})")
    t = pipe["timings"]
    print(f"\n(f) image pipeline per stage: img2img {pipe['image_shape'][1]}x{pipe['image_shape'][0]}, LCM "
          f"{len(pipe['timesteps'])} steps, task {tasks[0]}, float32 U-Net and VAE (second run on one loaded pipeline)")
    rows = [("VAE encoder", t["vae_encoder"]), *[(f"U-Net step {i + 1} (t={v:g})", t[f"unet_step_{i + 1}"])
                                                 for i, v in enumerate(pipe["timesteps"])],
            ("U-Net per step (mean)", t["unet_per_step"]), ("VAE decoder", t["vae_decoder"]),
            ("end to end", t["end_to_end"]), ("(first run, end to end)", pipe["first_end_to_end_s"])]
    for label, sec in rows:
        print(f"  {label:32} {1000 * sec:10.1f} ms")
    print(f"  peak RSS {pipe['peak_rss_gib']:.2f} GiB (U-Net, VAE encoder and decoder sessions loaded)")
    if not args.keep:
        shutil.rmtree(merged.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
