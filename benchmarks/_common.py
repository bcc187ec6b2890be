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


def measure(code: str, *, allow_failure: bool = False) -> dict:
    """Run ``code`` in a fresh Python process; it sets ``result`` (a dict). Adds seconds, CPU seconds
    (``cpu_s``: user + system of the child, less sensitive than wall time to other load) and peak RSS.

    Every measurement's peak memory is its own process's ``ru_maxrss``. The parent also polls the child's RSS (psutil), so a child the kernel kills for memory still reports how
    far it got; ``allow_failure`` returns ``{"failed": reason, ...}`` instead of raising.
    """
    import psutil

    wrapper = (
        "import json, resource, time\n"
        "result = {}\n"
        "_t = time.perf_counter()\n"
        f"{code}\n"
        "result['seconds'] = time.perf_counter() - _t\n"
        "result['peak_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20\n"
        "_u = resource.getrusage(resource.RUSAGE_SELF)\n"
        "result['cpu_s'] = _u.ru_utime + _u.ru_stime\n"
        "print(json.dumps(result))\n"
    )
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", wrapper], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    child = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, child.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        reason = f"exit {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode < 0 else "")
        if not allow_failure:
            raise RuntimeError(f"benchmark child failed ({reason}):\n{err[-4000:]}")
        return {"failed": reason, "seconds": wall, "peak_rss_gib": peak / 2**30, "stderr": err[-2000:]}
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gib"] = max(result["peak_rss_gib"], peak / 2**30)  # the child's own ru_maxrss is exact
    return result


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
