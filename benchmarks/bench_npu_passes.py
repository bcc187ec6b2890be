"""Claim measured: the NPU passes (preset ``npu``: linear-to-conv, mha-split, conv-act-fusion, scale-fold,
transpose-cancel, cleanup) rewrite the full SD1.5 U-Net from either torch exporter cheaply: the whole
float pipeline (load, ``float`` with LoRA slots on every attention and feed-forward projection, ``npu``,
save) takes at most 0.75x the time of plain ``onnx.load`` + ``onnx.save`` of the same model, with peak RSS
within 1.2x the fp32 weight bytes. It also prints what the passes did: node count and op histogram before
and after, Transposes left, MatMul/Gemm with a constant weight left, Softmax count, and each pass's time.

Run: ``.venv/bin/python benchmarks/bench_npu_passes.py [--exporter torchscript|dynamo|both] [--config sd15|tiny]``
(exports each model once into ``.cache/bench``; every measurement runs in its own fresh process, side by
side in one run).
"""

from __future__ import annotations

import argparse
import json
import shutil

from _common import CACHE, cached_export, dir_bytes, measure

LORA_TARGETS = "*attn1.to_q,*attn1.to_k,*attn1.to_v,*attn1.to_out.0,*attn2.to_q,*attn2.to_k,*attn2.to_v,*attn2.to_out.0,*ff.net.0.proj,*ff.net.2"

QUADC = """
import collections
import onnx_graphsurgeon as gs
from quadc.compiler import prepare
from quadc.graph import save_model
from quadc.passes import PassPipeline, run_pipeline

def hist(g):
    return dict(collections.Counter(n.op for n in g.nodes).most_common())

def const_linear(g):
    return sum(1 for n in g.nodes if n.op in ("MatMul", "Gemm") and any(isinstance(t, gs.Constant) for t in n.inputs[:2]))

g, ctx, _ = prepare({src!r}, {{}})
result["before"] = hist(g)
result["const_linear_before"] = const_linear(g)
pipeline = PassPipeline("float,npu").set_options("lora-inputs", targets={targets!r}, rank=16)
g, recs = run_pipeline(g, pipeline.build(), ctx)
save_model(g, {out!r})
result["after"] = hist(g)
result["const_linear_after"] = const_linear(g)
result["passes"] = {{r.name: [round(r.seconds, 2), r.counts] for r in recs}}
"""


def run(config: str, exporter: str) -> None:
    src = cached_export(config, exporter)
    weights = dir_bytes(src.parent)
    out = CACHE / "npu-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    plain = measure(
        "import onnx\n"
        f"m = onnx.load({str(src)!r})\n"
        f"onnx.save(m, {str(out / 'plain.onnx')!r}, save_as_external_data=True, all_tensors_to_one_file=True,"
        " location='plain.onnx.data')"
    )
    quadc = measure(QUADC.format(src=str(src), targets=LORA_TARGETS, out=str(out / "quadc" / "unet.onnx")),
                    allow_failure=True)
    gib = weights / 2**30
    print(f"\n== {config} {exporter}: {src} ({gib:.2f} GiB on disk)")
    print(f"onnx.load + onnx.save       : {plain['seconds']:8.1f} s  peak RSS {plain['peak_rss_gib']:.2f} GiB")
    if "failed" in quadc:
        print(f"quadc float,npu pipeline    : FAILED ({quadc['failed']}) after {quadc['seconds']:.1f} s, peak RSS "
              f"{quadc['peak_rss_gib']:.2f} GiB\n{quadc.get('stderr', '')}")
        return
    print(f"quadc load+float,npu+save   : {quadc['seconds']:8.1f} s  peak RSS {quadc['peak_rss_gib']:.2f} GiB")
    before, after = quadc["before"], quadc["after"]
    print(f"nodes {sum(before.values())} -> {sum(after.values())}; Transpose {before.get('Transpose', 0)} -> "
          f"{after.get('Transpose', 0)}; Softmax {before.get('Softmax', 0)} -> {after.get('Softmax', 0)}; "
          f"MatMul/Gemm with a constant weight {quadc['const_linear_before']} -> {quadc['const_linear_after']}")
    ops = sorted(set(before) | set(after), key=lambda o: -max(before.get(o, 0), after.get(o, 0)))
    print("op histogram (before -> after): " + ", ".join(f"{o} {before.get(o, 0)}->{after.get(o, 0)}" for o in ops))
    for name, (seconds, counts) in quadc["passes"].items():
        print(f"  {name:<18} {seconds:7.2f} s  {json.dumps(counts)}")
    print(f"time ratio quadc/plain      : {quadc['seconds'] / plain['seconds']:.3f}  (target <= 0.75)")
    print(f"peak RSS / fp32 weights     : quadc {quadc['peak_rss_gib'] / gib:.3f}  (target <= 1.2)")
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--exporter", default="both", choices=["torchscript", "dynamo", "both"])
    args = parser.parse_args()
    for exporter in (["torchscript", "dynamo"] if args.exporter == "both" else [args.exporter]):
        run(args.config, exporter)


if __name__ == "__main__":
    main()
