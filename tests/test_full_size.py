"""Full-size SD1.5 U-Net (859.5M parameters), both exporters: LoRA-as-input vs the LoRA merged in.

Marked slow (minutes, ~12 GB RAM): ``.venv/bin/pytest -m slow``. Exports are cached in
``.cache/bench/sd15-<exporter>/`` (shared with benchmarks/).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench"


def _export(exporter: str) -> Path:
    pytest.importorskip("torch")
    from quadc.export import export_unet

    path = CACHE / f"sd15-{exporter}" / "unet.onnx"
    if not path.exists():
        export_unet(config="sd15", exporter=exporter, out=path)
    return path


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_full_size_lora_inputs_match_merged_graph(exporter, tmp_path):
    from quadc import frontend
    from quadc.compiler import CompileOptions, compile_model
    from quadc.export import example_inputs
    from quadc.graph import load_model, ort_session
    from quadc.lora import fit_lora, read_lora
    from quadc.lora.merge import merge_lora
    from quadc.runtime.engine import Engine
    from quadc.testing_lora import random_lora, write_kohya

    src = _export(exporter)
    _, info = frontend.load(src)
    assert 859_520_964 <= info.parameters < 859_520_964 + 10_000  # plus small shape constants
    lora = random_lora(info, modules=["attn1.to_q", "attn2.to_v", "ff.net.2", "resnets.0.conv1", "time_emb_proj"],
                       rank=8, seed=5, scale_std=0.1, name="t")
    path = write_kohya(lora, tmp_path / "t.safetensors")
    compile_model(src, tmp_path / "out", CompileOptions(loras={"t": str(path)}))
    feeds = example_inputs("sd15", seed=1)
    got = Engine(tmp_path / "out").run(feeds, task="t")["out_sample"]
    graph = load_model(src)
    merge_lora(graph, info, fit_lora(read_lora(path, name="t", info=info), info))
    want = ort_session(graph).run(None, feeds)[0]
    scale = float(np.max(np.abs(want)))
    assert np.max(np.abs(got - want)) <= 1e-4 * scale
