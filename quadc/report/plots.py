"""The report's figures as PNG bytes (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

from quadc.errors import QuadcError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QuadcError("quadc report draws its plots with matplotlib: pip install 'quadc[report]'") from None
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def ablation_png(curve: Sequence[tuple[float, float]]) -> bytes:
    """SQNR of the U-Net output against the fraction of activations at 8 bits (W8A8 share)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    xs, ys = [100 * x for x, _ in curve], [y for _, y in curve]
    ax.plot(xs, ys, marker="o")
    ax.set_xlabel("activations at 8 bits (%)  [0 = W8A16, 100 = W8A8]")
    ax.set_ylabel("U-Net output SQNR (dB)")
    ax.set_title("W8A8 : W8A16 ablation")
    ax.grid(True, alpha=0.3)
    return _png(fig)


def layer_sqnr_png(per_task: Mapping[str, Mapping[str, float]]) -> bytes:
    """Per LoRA layer (x, in slot order) the SQNR of each task's LoRA under the shared encodings."""
    plt = _pyplot()
    modules = sorted({m for layers in per_task.values() for m in layers})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(modules) + 3), 3.6))
    for task, layers in per_task.items():
        ax.plot(range(len(modules)), [layers.get(m, float("nan")) for m in modules], marker=".", label=task)
    ax.set_xlabel(f"LoRA layer (1..{len(modules)}, by module name)")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("Per-layer SQNR of each task's LoRA under the shared encodings")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
