"""The report page: one self-contained HTML file (images and plots embedded as base64 PNGs)."""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from quadc.paths import replaced_atomically
from quadc.report.build import ReportData
from quadc.report.plots import ablation_png, layer_sqnr_png

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
img.sample { width: 192px; image-rendering: pixelated; border: 1px solid #999; }
figure { display: inline-block; margin: 0.3em; text-align: center; }
.note { color: #a60; }
"""


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _image_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _fmt(value: float, digits: int = 2) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], cls: str) -> str:
    out = [f'<table class="{cls}"><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    return "\n".join(out) + "</table>"


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def render(data: ReportData) -> str:
    """The page as an HTML string."""
    m = data.manifest
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>quadc report: {html.escape(str(data.artifact))}"
             f"</title><style>{_STYLE}</style></head><body>",
             f"<h1>quadc report</h1><p>artifact <code>{html.escape(str(data.artifact))}</code> (target "
             f"{html.escape(str(m.get('target')))}, {html.escape(str(m.get('precision', 'float')))})"
             + (f", float reference <code>{html.escape(str(data.float_artifact))}</code>" if data.float_artifact else "")
             + f"; sampler {html.escape(data.sampler)}, {data.steps} steps, seeds "
             f"{', '.join(str(s) for s in data.tasks[0].seeds) if data.tasks else '-'}.</p>"]
    for note in data.notes:
        parts.append(f'<p class="note">{html.escape(note)}</p>')

    parts.append("<h2>Cost</h2>")
    rows = [("shared U-Net graph (one for every task)", _mib(data.shared_rom_bytes))]
    for name, comp in (m.get("components") or {}).items():
        if name != "unet" and isinstance(comp, dict) and "rom_bytes" in comp:
            rows.append((f"component {name}", _mib(int(comp["rom_bytes"]))))
    rows += [(f"task {t.task} (LoRA)", _mib(data.task_rom_bytes(t.task))) for t in data.tasks if t.task != "none"]
    rows.append(("peak RAM (RSS) of the quantized pipeline", _mib(data.peak_rss_bytes)))
    parts.append(_table(("ROM / RAM", "bytes"), rows, "cost"))

    stages = list(dict.fromkeys(s for t in data.tasks for s in t.timings))
    parts.append("<h2>Latency per stage (quantized pipeline, median over seeds, ms)</h2>")
    parts.append(_table(("task", *stages), ([t.task, *(_fmt(1000 * t.timings[s], 1) if s in t.timings else "-"
                                                       for s in stages)] for t in data.tasks), "latency"))

    if data.float_artifact is not None:
        parts.append("<h2>Quality: quantized vs float pipeline on the same seeds</h2>")
        parts.append(_table(("task", "PSNR (dB) mean", "PSNR min", "SSIM mean", "latent SQNR (dB) mean"),
                            ([t.task, _fmt(_mean(t.psnr_db)), _fmt(min(t.psnr_db)), _fmt(_mean(t.ssim), 4),
                              _fmt(_mean(t.latent_sqnr_db))] for t in data.tasks), "quality"))

    parts.append("<h2>Images</h2>")
    for t in data.tasks:
        parts.append(f"<h3>{html.escape(t.task)}</h3><div>")
        for i, seed in enumerate(t.seeds):
            if t.float_images:
                parts.append(f'<figure><img class="sample" alt="float {html.escape(t.task)} seed {seed}" '
                             f'src="{_png_uri(_image_png(t.float_images[i]))}"><figcaption>float, seed {seed}'
                             "</figcaption></figure>")
            caption = f"quantized, seed {seed}" + (f" ({_fmt(t.psnr_db[i])} dB)" if t.psnr_db else "")
            parts.append(f'<figure><img class="sample" alt="quantized {html.escape(t.task)} seed {seed}" '
                         f'src="{_png_uri(_image_png(t.images[i]))}"><figcaption>{caption}</figcaption></figure>')
        parts.append("</div>")

    parts.append("<h2>Plots</h2>")
    if data.ablation:
        parts.append(f'<figure><img class="plot" alt="W8A8:W8A16 ablation" src="{_png_uri(ablation_png(data.ablation))}">'
                     "</figure>")
        parts.append(_table(("activations at 8 bits", "SQNR (dB)"),
                            ((f"{100 * f:.0f}%", _fmt(s)) for f, s in data.ablation), "ablation"))
    if data.lora_layer_sqnr:
        parts.append(f'<figure><img class="plot" alt="per-layer LoRA SQNR" '
                     f'src="{_png_uri(layer_sqnr_png(data.lora_layer_sqnr))}"></figure>')
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(data: ReportData, out: str | os.PathLike[str]) -> Path:
    """Write the page to ``out`` in one step (nothing half-written on failure); returns its path."""
    path = Path(out)
    page = render(data)
    with replaced_atomically(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
