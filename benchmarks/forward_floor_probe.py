"""Issue 8 probe: can calibration's forwards get cheaper than one batch-1 float forward each?

Run: ``.venv/bin/python benchmarks/forward_floor_probe.py`` (about 2 minutes; ~8 GB RAM; run it alone).

``bench_full_qdq.py`` calibrates with 2 feeds x (4 tasks + base) = 10 forwards of the full SD1.5 U-Net.
This probe measures, on the same cached TorchScript export and in one process, what those forwards cost:

  batch 1   one plain float forward (ORT extended level, as calibration), twice
  batch N   one forward of N samples: the idea of one batched forward per feed that carries every task.
            The export bakes batch 1 into 160 Reshape shape constants; those whose leading entry is 1 get 0
            ("copy the input's dimension") and the graph inputs a symbolic batch. Sample 0 of the batch is
            checked against the batch-1 output, so the batched graph computes the same thing.

Printed: seconds per sample for each, and the floor that 10 runs at the best per-sample cost put under a
compile, as a multiple of ``plain`` (give the plain load+save seconds from ``bench_full_qdq.py`` with
``--plain``; default: 13.1 s, the quiet figure of 2026-11-27 on the 2-core development machine).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from _common import cached_export


def batch_graph(src: str, dst: str) -> int:
    """Write ``dst``: ``src`` with a symbolic batch (weights stay in ``src``'s data file); returns how many
    Reshape shape constants were rewritten."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(src, load_external_data=False)
    shape_inputs = {n.input[1] for n in model.graph.node if n.op_type == "Reshape"}
    rewritten = 0
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in shape_inputs:
            for attr in node.attribute:
                arr = numpy_helper.to_array(attr.t).copy() if attr.name == "value" else None
                if arr is not None and arr.ndim == 1 and arr.size and arr[0] == 1:
                    arr[0] = 0
                    attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
                    rewritten += 1
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del model.graph.value_info[:]
    onnx.save(model, dst)
    return rewritten


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=5, help="samples in the batched forward (tasks + base)")
    parser.add_argument("--plain", type=float, default=13.1, help="plain load+save seconds to compare with")
    args = parser.parse_args()

    src = cached_export("sd15", "torchscript")
    dst = src.with_name("unet.batch-probe.onnx")
    try:
        rewritten = batch_graph(str(src), str(dst))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        session = ort.InferenceSession(str(dst), options, providers=["CPUExecutionProvider"])
    finally:
        dst.unlink(missing_ok=True)
    rng = np.random.default_rng(0)

    def feeds(batch: int) -> dict[str, np.ndarray]:
        return {"sample": rng.standard_normal((batch, 4, 64, 64), dtype=np.float32),
                "timestep": np.full((batch,), 500, np.float32),
                "encoder_hidden_states": rng.standard_normal((batch, 77, 768), dtype=np.float32)}

    def timed(feed: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        out = session.run(None, feed)[0]
        return time.perf_counter() - t, out

    print(f"sd15 U-Net, {rewritten} Reshape constants given a copied batch; load {os.getloadavg()[0]:.1f}", flush=True)
    timed(feeds(1))  # warm-up
    single = [timed(feeds(1))[0] for _ in range(2)]
    batched_feed = feeds(args.batch)
    batched, out = timed(batched_feed)
    _, first = timed({k: v[:1] for k, v in batched_feed.items()})
    err = float(np.abs(out[:1] - first).max() / (np.abs(first).max() + 1e-12))
    per_single, per_batched = min(single), batched / args.batch
    print(f"batch 1      {per_single:6.2f} s per sample (runs: {', '.join(f'{s:.2f}' for s in single)} s)")
    print(f"batch {args.batch:<6} {per_batched:6.2f} s per sample ({batched:.2f} s; sample 0 vs batch 1: "
          f"max rel. diff {err:.1e}); {per_single / per_batched:.2f}x the batch-1 speed")
    floor = 10 * min(per_single, per_batched)
    print(f"10 calibration forwards at the best per-sample cost: {floor:.0f} s = {floor / args.plain:.2f}x plain "
          f"load+save ({args.plain:.1f} s), before reading, planning or writing anything")


if __name__ == "__main__":
    main()
