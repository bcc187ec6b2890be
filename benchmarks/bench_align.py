"""Claims measured: QUAD's alignment wins back what sharing one LoRA encoding costs each task, at the layer
and the model level, without moving the aligned LoRA's float behaviour; and which weight quantization
(uint8 per-tensor or int8 symmetric per-channel) keeps the output and each task's effect best.

Run: ``.venv/bin/python benchmarks/bench_align.py`` (the bundled tiny U-Net and its bundled LoRAs), or on
other fixtures ``--model unet.onnx --lora NAME=PATH ... [--calib DIR] [--eval-dir DIR]``; ``--synthetic``
uses three random LoRAs of different strengths instead (one saturates under the anchor's encodings);
``--steps N``, ``--levels layer,model``, ``--lora-policy auto|anchor|unified``, ``--json FILE``.

Per task, on evaluation feeds that neither calibration nor alignment used (synthetic sampler-schedule
feeds with another seed, or ``--eval-dir``), against the float LoRA-as-input graph with the original LoRA:

  effect SQNR   of ``out(task) - out(base)`` (the task's own contribution), dB
  output SQNR   of ``out(task)``, dB

for (own) the task compiled alone with its own encodings (one graph per task: what sharing gives up),
(shared) all tasks in one graph under the shared encodings, unaligned, and (layer)/(model) the same graph
with the non-anchor LoRAs aligned at that level; ``float`` is each aligned LoRA's float output against
the original's (the aligned file must still do its task: >= 30 dB). Weights: the shared unaligned graph
with uint8 per-tensor weights (today's default) and with int8 symmetric per-channel weights: the base
model's output SQNR and every task's effect and output SQNR. Quantized graphs run on onnxruntime with
float32 weight-only MatMuls (``quadc.align.workspace.session``).

Measured on the trained fixtures (the default: bundled tiny U-Net and its four trained task LoRAs; 2-core CPU
shared with other jobs; default options: 16 calibration feeds, 32 training feeds, 200 steps, 8 evaluation
feeds). ``.venv/bin/python benchmarks/bench_align.py`` (policy anchor, anchor ``sepia``). Effect / output
SQNR, dB (``*``: the validation check kept the original LoRA)::

    task                  own            shared         layer                  model                 float
    background_removal    37.60 / 41.33  35.37 / 39.90  37.81 / 41.54   52.79  39.01 / 42.59   51.98
    edges_to_image        37.52 / 40.92  37.01 / 40.61  37.01 / 40.61 exact*  41.19 / 42.98   47.12
    inpaint               30.90 / 39.85  24.32 / 36.45  31.58 / 39.96   51.80  33.82 / 41.21   49.68
    sepia (anchor)        36.35 / 41.41  36.32 / 41.41  (never trained)
    own 71 s; layer 113 s; model 531 s (all tasks, 2 cores shared with other jobs)

Model level: every aligned task beats its own-encodings compile (+1.4 / +3.7 / +2.9 dB effect) and every
output SQNR rises; the anchor stays 0.03 dB under its own compile. Layer level: background_removal and
inpaint beat their own compile; for edges_to_image the validation check kept the original (0.5 dB under
its own). The retrained inpaint LoRA saturates under sepia's encodings: splitting its overflowing rank
components over the spare rank (quadc.align.equalize) took the layer level from 29.37 to 31.58 dB, and the
model level's tenth of ``--lr`` (quadc.align.api) let it train 160 steps instead of stopping at 50 with no
gain (31.58 -> 33.82 dB; background_removal 37.81 -> 39.01, edges_to_image 40.60 -> 41.19). The anchor's 0.03 dB gap is not precision lost (``benchmarks/anchor_diff.py``, issue 11): under ``anchor-fit`` 30 of the
anchor's 548 activations (all uint16: LoRA up/down outputs, up_blocks.0/1 resnet and attention tensors)
take the union, 1.5-3.7x wider, because another task would clip there; the shared graph then rounds the
anchor on other 16-bit grids and its output moves 73 dB below the signal (55 dB below its effect). The
sign of such a change is chance: leaving those 30 tensors float in the own compile loses 0.038 dB too,
and all 548 activations float gain only 0.12 dB. With the anchor's own grids (profile ``anchor``) the
graph is bit-exact with the own compile, extra LoRA-sum requantizations included.

Weights, shared unaligned graph, base output SQNR; effect / output per task:
uint8 per-tensor 41.95; background_removal 35.38 / 39.90, edges_to_image 37.02 / 40.62, inpaint 24.33 / 36.45,
sepia 36.29 / 41.40. int8 per-channel 41.37; 34.54 / 39.58, 36.34 / 41.51, 25.57 / 37.80, 37.56 / 40.99.
Per-tensor keeps the better base output and two of four tasks (per-channel: edges_to_image and the retrained
inpaint); qnn-htp's default was left as it is (README).

``--full-size`` (default options: 200 steps, 4 calibration/training feeds, 2 evaluation feeds; the QSS chose
the unified fallback for these four random LoRAs): 1562 s, peak RSS 12.2 GiB (3.8x the fp32 weights) beside a
test-suite run; effect SQNR 22.48 -> 23.10, 26.36 -> 27.08, 29.90 -> 30.21, 32.38 -> 32.56 dB, output SQNR
within -0.10 .. +0.12 dB of before.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT

sys.path.insert(0, str(ROOT))

from quadc.align.api import EVAL_SEED_OFFSET, AlignOptions, align  # noqa: E402
from quadc.align.evaluate import Evaluator  # noqa: E402
from quadc.align.workspace import build_workspace  # noqa: E402
from quadc.compiler import bundled_loras  # noqa: E402
from quadc.quant.feeds import npz_feeds, random_feeds  # noqa: E402

MODULES = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "ff.net.2"]


def synthetic_loras(folder: Path) -> dict[str, str]:
    """Three random LoRAs on the tiny U-Net of different strengths (small 0.3x, mid, big 1.6x)."""
    from quadc import frontend
    from quadc.compiler import bundled_model
    from quadc.testing_lora import random_lora, write_diffusers

    _, info = frontend.load(bundled_model())
    out = {}
    for name, std, seed in (("small", 0.03, 1), ("mid", 0.1, 2), ("big", 0.16, 3)):
        path = folder / f"{name}.safetensors"
        write_diffusers(random_lora(info, MODULES, rank=4, seed=seed, scale_std=std, name=name), path)
        out[name] = str(path)
    return out


FULL_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
FULL_STRENGTHS = (("style_a", 0.02, 11), ("style_b", 0.04, 12), ("style_c", 0.07, 13), ("style_d", 0.12, 14))


def full_size(args) -> dict:
    """``quadc align --level layer`` on the full SD1.5 U-Net (cached TorchScript export) with four random
    rank-16 attention LoRAs of different strengths, in its own process: time and peak RSS."""
    from _common import cached_export, measure

    model = cached_export("sd15", "torchscript")
    tmp = Path(tempfile.mkdtemp(prefix="bench-align-full-"))
    made = measure(
        "from quadc import frontend\n"
        "from quadc.testing_lora import random_lora, write_diffusers\n"
        f"_, info = frontend.load({str(model)!r})\n"
        f"for name, std, seed in {FULL_STRENGTHS!r}:\n"
        f"    write_diffusers(random_lora(info, {FULL_MODULES!r}, rank=16, seed=seed, scale_std=std, name=name),\n"
        f"                    {str(tmp)!r} + f'/{{name}}.safetensors')\n")
    loras = [a for name, _, _ in FULL_STRENGTHS for a in ("--lora", f"{name}={tmp / (name + '.safetensors')}")]
    out = tmp / "aligned"
    cli = [str(model), *loras, "--level", "layer", "--steps", str(args.steps), "--feeds", str(args.full_feeds),
           "--calib-random", str(args.full_feeds), "--eval-feeds", str(args.full_eval_feeds), "--lora-policy",
           args.lora_policy, "-q", "--force", "-o", str(out)]
    print("[bench] quadc align " + " ".join(cli), file=sys.stderr)
    res = measure("from quadc.cli import main\n"
                  f"assert main(['align', *{cli!r}]) == 0\n"
                  f"result['report'] = json.loads(open({str(out / 'report.json')!r}).read())\n", allow_failure=True)
    if "failed" in res:  # killed for memory: still say how long it ran and how far its RSS got
        print(f"\nFull size: quadc align FAILED ({res['failed']}) after {res['seconds']:.0f} s, peak RSS "
              f"{res['peak_rss_gib']:.1f} GiB\n{res.get('stderr', '')}")
        return {k: v for k, v in res.items() if k != "stderr"}
    rep = res["report"]
    print(f"\nFull size: quadc align --level layer, sd15 U-Net (TorchScript export), 4 rank-16 LoRAs on "
          f"{', '.join(FULL_MODULES)}; {args.steps} steps, {args.full_feeds} calibration/training feeds, "
          f"{args.full_eval_feeds} evaluation feeds")
    print(f"  {res['seconds']:.0f} s, peak RSS {res['peak_rss_gib']:.1f} GiB (writing the LoRAs: "
          f"{made['seconds']:.0f} s); policy {rep['lora_policy']}, anchor {rep['anchor']}")
    for task, e in rep["tasks"].items():
        b, a = e["before"], e["after"]
        print(f"  {task:<10} {e['role']:<8} effect {_f(b['effect_sqnr_db'])} ->{_f(a['effect_sqnr_db'])}  output "
              f"{_f(b['output_sqnr_db'])} ->{_f(a['output_sqnr_db'])}  float{_f(a['float_sqnr_db'])}")
    return {"seconds": round(res["seconds"], 1), "peak_rss_gib": round(res["peak_rss_gib"], 2),
            "steps": args.steps, "feeds": args.full_feeds, "eval_feeds": args.full_eval_feeds, "report": rep}


def eval_feeds(graph, args) -> list:
    if args.eval_dir:
        return npz_feeds(args.eval_dir, graph)
    return random_feeds(graph, args.eval_feeds, seed=args.calib_seed + EVAL_SEED_OFFSET)


def plan_options(args, **extra) -> dict:
    opts = {"lora_policy": args.lora_policy, "calib_seed": args.calib_seed, "calib_random": args.calib_random,
            **({"activation_profile": args.activation_profile} if args.activation_profile else {}), **extra}
    if args.calib:
        opts["calib_dir"] = args.calib
    return {"quant-plan": opts}


def own(args, loras: dict[str, str]) -> dict[str, dict]:
    """Each task compiled alone: its own encodings."""
    out = {}
    for task, path in loras.items():
        ws = build_workspace(args.model, {task: path}, pass_options=plan_options(args))
        out[task] = Evaluator(ws, eval_feeds(ws.float_graph, args)).scores(ws.loras[task])
    return out


def compiled(args, loras: dict[str, str]) -> dict[str, dict]:
    """All tasks in one graph as ``quadc compile`` makes it (activation profile ``union``), unaligned."""
    ws = build_workspace(args.model, loras, pass_options=plan_options(args, activation_profile="union"))
    ev = Evaluator(ws, eval_feeds(ws.float_graph, args))
    return {t: ev.scores(lora) for t, lora in ws.loras.items()}


def weights(args, loras: dict[str, str]) -> dict[str, dict]:
    """The shared unaligned graph with per-tensor and with per-channel weights."""
    from quadc.quant.affine import sqnr_db

    out = {}
    for name, per_channel in (("uint8 per-tensor", False), ("int8 per-channel", True)):
        ws = build_workspace(args.model, loras, pass_options=plan_options(args, per_channel=per_channel))
        ev = Evaluator(ws, eval_feeds(ws.float_graph, args))
        base = sqnr_db(np.concatenate([o.ravel() for run in ev.float_outputs(None) for o in run]),
                       np.concatenate([o.ravel() for run in ev.quant_outputs(None) for o in run]))
        out[name] = {"base_output_sqnr_db": round(float(base), 4),
                     "tasks": {t: ev.scores(lora) for t, lora in ws.loras.items()}}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="ONNX U-Net (default: the bundled tiny U-Net)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH", help="a task LoRA (default: the bundled ones)")
    p.add_argument("--synthetic", action="store_true", help="three random LoRAs of different strengths")
    p.add_argument("--calib", help="folder of .npz calibration (and training) feeds")
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--calib-random", type=int, default=16,
                   help="synthetic calibration feeds without --calib (default 16: with compile's 4, a task compiled "
                        "alone clips activations that its few runs never reached)")
    p.add_argument("--eval-dir", help="folder of .npz evaluation feeds (default: synthetic, another seed)")
    p.add_argument("--eval-feeds", type=int, default=8)
    p.add_argument("--lora-policy", default="auto", choices=["auto", "anchor", "unified"])
    p.add_argument("--activation-profile", choices=["union", "anchor", "anchor-fit"],
                   help="quant-plan.activation_profile of the aligned graph (default: quadc align's)")
    p.add_argument("--levels", default="layer,model")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=AlignOptions.lr, help="as quadc align --lr")
    p.add_argument("--patience", type=int, default=AlignOptions.patience, help="as quadc align --patience")
    p.add_argument("--data", help="task examples for the model level's diffusion loss")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--no-weights", action="store_true", help="skip the per-tensor / per-channel weight comparison")
    p.add_argument("--full-size", action="store_true",
                   help="only the full-size run: quadc align --level layer on the sd15 U-Net, 4 rank-16 LoRAs")
    p.add_argument("--full-feeds", type=int, default=4, help="full size: calibration and training feeds")
    p.add_argument("--full-eval-feeds", type=int, default=2, help="full size: evaluation feeds")
    args = p.parse_args()
    if args.full_size:
        result = full_size(args)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench-align-"))
    if args.synthetic:
        loras = synthetic_loras(tmp)
    elif args.lora:
        loras = dict(item.split("=", 1) for item in args.lora)
    else:
        loras = {k: str(v) for k, v in bundled_loras().items()}
    results: dict = {"loras": loras, "lora_policy": args.lora_policy, "steps": args.steps}
    t0 = time.perf_counter()
    results["own"] = own(args, loras)
    results["compiled"] = compiled(args, loras)
    print(f"[bench] own encodings, one graph unaligned: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    results["levels"] = {}
    for level in [x for x in args.levels.split(",") if x]:
        t = time.perf_counter()
        opts = AlignOptions(level=level, steps=args.steps, eval_feeds=args.eval_feeds, eval_dir=args.eval_dir,
                            data=args.data if level == "model" else None, show_bar=False,
                            lr=args.lr, patience=args.patience)
        report = align(args.model, loras, tmp / level, opts, pass_options=plan_options(args), force=True)
        results["levels"][level] = {"seconds": round(time.perf_counter() - t, 1), "anchor": report["anchor"],
                                    "policy": report["lora_policy"], "profile": report["activation_profile"],
                                    "tasks": report["tasks"]}
        print(f"[bench] align --level {level}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    results["weights"] = {}
    if not args.no_weights:
        t = time.perf_counter()
        results["weights"] = weights(args, loras)
        print(f"[bench] weight schemes: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _f(x) -> str:
    return "  exact" if x is None else f"{x:7.2f}"


def print_tables(r: dict) -> None:
    levels = r["levels"]
    first = next(iter(levels.values()), None)
    anchor = first["anchor"] if first else None
    print(f"\nEffect / output SQNR (dB) per task, evaluation feeds; policy {first['policy'] if first else '?'}"
          + (f", anchor {anchor}" if anchor else "") + (f", aligned graph's activation profile {first['profile']}"
                                                        if first else ""))
    head = (f"{'task':<22}{'own':>16}{'compiled':>16}{'unaligned':>16}"
            + "".join(f"{lvl:>16}{'float':>8}" for lvl in levels))
    print(head)
    for task, own_s in r["own"].items():
        shared = first["tasks"][task]["before"] if first else {}
        union = r["compiled"][task]
        row = f"{task:<22}{_f(own_s['effect_sqnr_db'])} /{_f(own_s['output_sqnr_db'])}"
        row += f"{_f(union['effect_sqnr_db'])} /{_f(union['output_sqnr_db'])}"
        row += f"{_f(shared.get('effect_sqnr_db'))} /{_f(shared.get('output_sqnr_db'))}"
        for rep in levels.values():
            a = rep["tasks"][task]["after"]
            kept = "" if rep["tasks"][task].get("kept", {}).get("which", "aligned") == "aligned" else "*"
            row += f"{_f(a['effect_sqnr_db'])} /{_f(a['output_sqnr_db'])}{_f(a['float_sqnr_db'])}{kept:1}"
        print(row)
    print("  own: each task compiled alone; compiled: all tasks in one graph as quadc compile makes it (activation "
          "profile union), unaligned; unaligned: the aligned graph's encodings with the original LoRAs")
    print("  * the validation check kept the original LoRA (the aligned one did worse on the validation feeds)")
    for lvl, rep in levels.items():
        print(f"  {lvl}: {rep['seconds']} s; steps run " + ", ".join(
            f"{t}=" + "+".join(f"{ph} {r['steps']}" for ph, r in e["training"].items())
            for t, e in rep["tasks"].items() if "training" in e))
    print("\nWeights (shared encodings, unaligned): base output SQNR; per task effect / output SQNR (dB)")
    for scheme, w in r["weights"].items():
        tasks = "  ".join(f"{t} {_f(s['effect_sqnr_db'])} /{_f(s['output_sqnr_db'])}" for t, s in w["tasks"].items())
        print(f"{scheme:<18} base {_f(w['base_output_sqnr_db'])}   {tasks}")


if __name__ == "__main__":
    raise SystemExit(main())
