"""Claim measured: quadc handles a full-size U-Net as cheaply as plain onnx does. Loading the SD1.5 U-Net,
running const-fold and dce and saving it takes no longer than ``onnx.load`` + ``onnx.save`` of the same
file (time ratio <= 1.0), and quadc's peak RSS stays within 1.2x the weight bytes (weights stay
memory-mapped, never copied whole).

Run: ``.venv/bin/python benchmarks/bench_load_save.py`` (exports the 859.5M-parameter U-Net once into
``.cache/bench``; later runs reuse it). Prints each side's seconds and peak RSS, measured in separate
fresh processes in one run, and the ratios.
"""

from __future__ import annotations

import argparse
import shutil

from _common import CACHE, cached_export, dir_bytes, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="sd15", choices=["sd15", "tiny"])
    args = parser.parse_args()
    src = cached_export(args.config)
    weights = dir_bytes(src.parent)
    out = CACHE / "load-save-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    read_once = measure(
        f"import os\nwith open({str(src) + '.data'!r} if os.path.exists({str(src) + '.data'!r}) else {str(src)!r}, 'rb') as f:\n"
        "    while f.read(64 << 20):\n        pass"
    )
    plain = measure(
        "import onnx\n"
        f"m = onnx.load({str(src)!r})\n"
        f"onnx.save(m, {str(out / 'plain.onnx')!r}, save_as_external_data=True, all_tensors_to_one_file=True,"
        " location='plain.onnx.data')"
    )
    quadc = measure(
        "from quadc.graph import load_model, save_model\n"
        "from quadc.context import CompileContext\n"
        "from quadc.passes import parse_pipeline, run_pipeline\n"
        f"g = load_model({str(src)!r})\n"
        "g, recs = run_pipeline(g, parse_pipeline('const-fold,dce'), CompileContext())\n"
        f"save_model(g, {str(out / 'quadc' / 'unet.onnx')!r})\n"
        "result['passes'] = {r.name: round(r.seconds, 2) for r in recs}"
    )
    gib = weights / 2**30
    print(f"model: {src} ({gib:.2f} GiB on disk)")
    print(f"read weight bytes once : {read_once['seconds']:8.1f} s  peak RSS {read_once['peak_rss_gib']:.2f} GiB")
    print(f"onnx.load + onnx.save  : {plain['seconds']:8.1f} s  peak RSS {plain['peak_rss_gib']:.2f} GiB")
    print(f"quadc load+fold+dce+save: {quadc['seconds']:7.1f} s  peak RSS {quadc['peak_rss_gib']:.2f} GiB  "
          f"passes {quadc['passes']}")
    print(f"time ratio quadc/plain : {quadc['seconds'] / plain['seconds']:.3f}  (target <= 1.0)")
    print(f"peak RSS / weights     : quadc {quadc['peak_rss_gib'] / gib:.3f}  plain {plain['peak_rss_gib'] / gib:.3f}"
          "  (target quadc <= 1.2)")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
