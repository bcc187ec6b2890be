"""Full-size SD1.5 U-Net (859.5M parameters): LoRA-as-input vs the LoRA merged in (both exporters), and
the quantized ``onnx-qdq`` path with four LoRAs (disk writes, peak memory, quality).

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


_COMPILE = """
import json, resource, sys
from quadc.compiler import CompileOptions, compile_model
src, out, loras = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
compile_model(src, out, CompileOptions(target="onnx-qdq", loras=loras, pass_options={"quant-plan": {"calib_random": 2}}))
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "written": int(io["write_bytes"])}))
"""


def test_full_size_quantized_path(tmp_path):
    """onnx-qdq on the full TorchScript export (opset 17: the opset-21 upgrade runs above 2 GB) with 4 rank-16
    LoRAs on every attention and feed-forward projection, --calib-random 2, in a fresh process: it writes
    nothing beyond the artifact (no temporary copy of the weights), peaks under 1.5x the fp32 weights, and a
    task's output is close to the float graph with that LoRA merged in (an independent reference)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from quadc import frontend
    from quadc.export import example_inputs
    from quadc.graph import load_model, ort_session
    from quadc.lora import fit_lora, read_lora
    from quadc.lora.merge import merge_lora
    from quadc.quant.affine import sqnr_db
    from quadc.runtime.engine import Engine
    from quadc.testing_lora import random_lora, write_diffusers

    if not Path("/proc/self/io").exists():
        pytest.skip("needs /proc/self/io")
    src = _export("torchscript")
    weights = (src.parent / (src.name + ".data")).stat().st_size
    _, info = frontend.load(src)
    modules = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    loras = {}
    for i in range(4):
        loras[f"t{i}"] = str(write_diffusers(random_lora(info, modules=modules, rank=16, seed=100 + i,
                                                         scale_std=0.05, name=f"t{i}"), tmp_path / f"t{i}.safetensors"))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", _COMPILE, str(src), str(out), json.dumps(loras)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])
    artifact = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert got["written"] <= artifact + (64 << 20), f"wrote {got['written']} bytes for a {artifact}-byte artifact"
    assert got["peak"] <= 1.5 * weights, f"peak RSS {got['peak'] / 2**30:.2f} GiB, weights {weights / 2**30:.2f} GiB"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["opset"] == 21 and sorted(manifest["tasks"]) == ["t0", "t1", "t2", "t3"]

    feeds = example_inputs("sd15", seed=1)
    engine = Engine(out)
    y = {task: engine.run(feeds, task=task)["out_sample"] for task in ("t0", "t1")}
    del engine
    graph = load_model(src)
    merge_lora(graph, info, fit_lora(read_lora(loras["t0"], name="t0", info=info), info))
    want = ort_session(graph).run(None, feeds)[0]
    own, other = sqnr_db(want, y["t0"]), sqnr_db(want, y["t1"])
    print(f"SQNR vs float t0: own {own:.1f} dB, other task {other:.1f} dB")
    assert own > other + 6 and own > 30, (own, other)  # quantized closely, and the bound task is what matters
