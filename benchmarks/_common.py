"""Shared helpers for benchmarks: the cached full-size export and per-subprocess measurements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("QUADC_BENCH_CACHE", ROOT / ".cache" / "bench"))


def cached_export(config: str = "sd15", exporter: str = "torchscript", opset: int | None = None) -> Path:
    """Export the U-Net once into the cache (reused by every later run) and return its path."""
    name = f"{config}-{exporter}" + (f"-op{opset}" if opset else "")
    path = CACHE / name / "unet.onnx"
    if not path.exists():
        from quadc.context import stderr_progress
        from quadc.export import export_unet

        t = time.perf_counter()
        export_unet(config=config, exporter=exporter, out=path, opset=opset, progress=stderr_progress)
        print(f"[bench] exported {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return path


def measure(code: str) -> dict:
    """Run ``code`` in a fresh Python process; it sets ``result`` (a dict). Adds seconds and peak RSS.

    The child prints ``result`` plus its own ``ru_maxrss`` as JSON on its last line, so every
    measurement's peak memory is its own.
    """
    wrapper = (
        "import json, resource, time\n"
        "result = {}\n"
        "_t = time.perf_counter()\n"
        f"{code}\n"
        "result['seconds'] = time.perf_counter() - _t\n"
        "result['peak_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20\n"
        "print(json.dumps(result))\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
