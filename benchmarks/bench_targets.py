"""Claims measured: ``quadc compile --target all`` builds every installed target from one load and one
calibration faster than compiling the targets one by one, and what each target's artifact costs — the
QNN context binary next to the QDQ ONNX it was compiled from, the shared ROM, each task's LoRA ROM.

Run: ``.venv/bin/python benchmarks/bench_targets.py`` (full SD1.5 U-Net, cached export, 3 random rank-16
LoRAs on the attention and feed-forward layers); ``--config tiny`` uses the bundled tiny U-Net and its
bundled LoRAs. Every compile runs in a fresh process with its own wall time and peak RSS:

  all        ``--target all`` into one folder (shared float passes, one calibration)
  <target>   that target alone

Printed: per target, separate compile seconds and peak RSS, artifact bytes (QDQ ONNX, context binary,
shared ROM, LoRA ROM per task); then ``--target all`` against the sum of the separate compiles.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from _common import CACHE, cached_export, dir_bytes, measure

MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def sd15_loras(model: Path, n: int = 3, rank: int = 16) -> dict[str, Path]:
    """``n`` random kohya LoRAs for the model's attention and feed-forward layers, cached."""
    from quadc import frontend
    from quadc.testing_lora import random_lora, write_kohya

    root = CACHE / f"{model.parent.name}-loras"
    root.mkdir(parents=True, exist_ok=True)
    paths = {f"task{i}": root / f"task{i}.safetensors" for i in range(n)}
    if not all(p.exists() for p in paths.values()):
        _, info = frontend.load(model)
        for i, (name, path) in enumerate(paths.items()):
            write_kohya(random_lora(info, modules=MODULES, rank=rank, seed=100 + i, scale_std=0.05, name=name), path)
    return paths


def compile_code(model: Path | None, loras: dict[str, Path], target: str, out: Path, calib: int) -> str:
    """Code for a fresh process that compiles ``target`` and reports the artifact sizes."""
    return (
        "from pathlib import Path\n"
        "from quadc.compiler import CompileOptions, compile_model\n"
        f"opts = CompileOptions(target={target!r}, loras={ {k: str(v) for k, v in loras.items()} !r}, force=True,\n"
        f"    pass_options={{'quant-plan': {{'calib_random': {calib}}}}} if {target!r} != 'onnx' else {{}})\n"
        f"m = compile_model({str(model) if model else None!r}, Path({str(out)!r}), opts)\n"
        "result['calibrations'] = m.get('calibrations')\n"
        # The QNN context is compiled in a child process: its peak counts too.
        "import resource\n"
        "result['child_peak_rss_gib'] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20\n"
    )


def peak(r: dict) -> float:
    """Peak RSS of a compile: its own process or the child that compiled the QNN context, the larger."""
    return max(r["peak_rss_gib"], r.get("child_peak_rss_gib") or 0.0)


def sizes(art: Path) -> dict:
    """Artifact bytes: total, shared ROM, QDQ graph and QNN context files, LoRA ROM per task."""
    manifest = json.loads((art / "manifest.json").read_text())
    qnn = manifest.get("qnn") or {}
    return {"total": dir_bytes(art), "shared_rom": manifest.get("shared_rom_bytes"),
            "qdq_onnx": manifest.get("qdq_graph_bytes") or (manifest.get("shared_rom_bytes") if manifest.get("quant") else None),
            "context_binary": (qnn.get("files") or {}).get(qnn.get("context_binary")),
            "lora_rom": {t: e.get("lora_rom_bytes") for t, e in manifest.get("tasks", {}).items()}}


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:9.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])
    parser.add_argument("--calib", type=int, default=4, help="synthetic calibration inputs (default 4)")
    args = parser.parse_args()

    from quadc.compiler import bundled_loras
    from quadc.targets import discover_targets

    if args.config == "tiny":
        model, loras = None, {k: Path(v) for k, v in bundled_loras().items()}
    else:
        model = cached_export("sd15", args.exporter)
        loras = sd15_loras(model)
    targets = [n for n, cls in discover_targets().items() if cls.available()[0]]
    tmp = Path(tempfile.mkdtemp(prefix="quadc-bench-targets-", dir=CACHE if CACHE.exists() else None))
    try:
        print(f"{args.config} ({args.exporter if model else 'bundled'}), {len(loras)} LoRAs, {args.calib} calibration "
              f"inputs, targets: {', '.join(targets)}", flush=True)
        header = (f"\n{'target':<10} {'compile s':>9} {'peak GiB':>9} {'total MiB':>9} {'ROM MiB':>9} {'QDQ MiB':>9} "
                  f"{'ctx bin MiB':>11}  LoRA ROM MiB per task")
        together = measure(compile_code(model, loras, "all", tmp / "all", args.calib), allow_failure=True)
        if "failed" in together:
            print(f"--target all FAILED after {together['seconds']:.0f} s: {together['failed']}\n{together.get('stderr', '')[-2000:]}", flush=True)
            return
        print(f"--target all: {together['seconds']:.1f} s, peak {peak(together):.2f} GiB", flush=True)
        shutil.rmtree(tmp / "all")  # sizes are per target below; the disk is needed for the next compiles
        rows = {}
        print(header, flush=True)
        for target in targets:  # each row is printed as it finishes: a later failure keeps the earlier rows
            r = measure(compile_code(model, loras, target, tmp / target, args.calib), allow_failure=True)
            if "failed" in r:
                print(f"{target:<10} FAILED after {r['seconds']:.0f} s: {r['failed']}\n{r.get('stderr', '')[-2000:]}", flush=True)
                continue
            rows[target] = r
            r["sizes"] = s = sizes(tmp / target)
            shutil.rmtree(tmp / target)
            lora = ", ".join(f"{t} {v / 2**20:.3f}" for t, v in s["lora_rom"].items() if v is not None)
            print(f"{target:<10} {r['seconds']:9.1f} {peak(r):9.2f} {mib(s['total'])} {mib(s['shared_rom'])} "
                  f"{mib(s['qdq_onnx'])} {mib(s['context_binary']):>11}  {lora}", flush=True)
        if len(rows) < len(targets):
            print("\nsome targets failed: no all-against-separate ratio")
            return
        separate = sum(r["seconds"] for r in rows.values())
        print(f"\n--target all: {together['seconds']:.1f} s, peak {peak(together):.2f} GiB, "
              f"{together['calibrations']} calibration(s)")
        print(f"separate:     {separate:.1f} s in all (peak {max(peak(r) for r in rows.values()):.2f} GiB)"
              f"  ratio all/separate {together['seconds'] / separate:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
