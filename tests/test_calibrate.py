"""Calibration feeds (sampler schedules vs diffusers, npz folders) and streaming calibration on the tiny U-Net."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tracemalloc

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

import quadc.graph
from quadc import frontend
from quadc.context import CompileContext
from quadc.errors import QuadcError
from quadc.graph import to_model_bytes
from quadc.lora import LoRASet
from quadc.lora.pack import pack_task
from quadc.passes import parse_pipeline, run_pipeline
from quadc.quant.affine import compute_encoding, fake_quant, sqnr_db
from quadc.quant.calibrate import Capture, calibrate, float_tensors, measure_sqnr, static_tensors
from quadc.quant.feeds import (
    SCHEDULES,
    calibration_timesteps,
    noise_sigma,
    npz_feeds,
    random_feeds,
    schedule_timesteps,
)
from quadc.quant.qss import branch_output, lora_layer_captures
from quadc.testing_lora import random_lora

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            steps_offset=1)
MODULES = ["attn1.to_q", "attn2.to_v", "resnets.0.conv1", "proj_in"]


def _prepare(bundled_unet, loras):
    graph, info = frontend.load(bundled_unet)
    ctx = CompileContext(model_info=info)
    ctx.loras = LoRASet(loras)
    graph, _ = run_pipeline(graph, parse_pipeline("lora-inputs,const-fold,dce"), ctx)
    return graph, ctx


@pytest.fixture(scope="module")
def prepared(bundled_unet):
    """The tiny U-Net after the float passes with a small and a large LoRA on a few layers of each kind."""
    _, info = frontend.load(bundled_unet)
    small = random_lora(info, MODULES, rank=4, seed=1, name="small", scale_std=0.05)
    large = random_lora(info, MODULES, rank=4, seed=2, name="large", scale_std=3.0)
    graph, ctx = _prepare(bundled_unet, [small, large])
    tasks = {name: pack_task(lora, ctx.lora_slots) for name, lora in ctx.loras.items()}
    return graph, ctx, tasks


def _all_outputs_session(graph, names):
    """Oracle: an ORT session returning every named tensor (plain outputs, no reductions)."""
    model = onnx.load_from_string(to_model_bytes(graph))
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _bind(graph, feed, packed=None):
    bound = {t.name: np.zeros(t.shape, np.float32) for t in graph.inputs if t.name.endswith((".lora_down", ".lora_up"))}
    bound.update(packed or {})
    bound.update(feed)
    return bound


# ---------------------------------------------------------------------------------------------- schedules
def test_schedules_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    lcm = diffusers.LCMScheduler(**SD15)
    lcm.set_timesteps(4)
    np.testing.assert_array_equal(schedule_timesteps("lcm", 4), lcm.timesteps.numpy())
    for steps in (1, 2, 4, 8):
        lcm.set_timesteps(steps)
        np.testing.assert_array_equal(schedule_timesteps("lcm", steps), lcm.timesteps.numpy())
    for spacing in ("leading", "linspace", "trailing"):
        euler = diffusers.EulerDiscreteScheduler(**SD15, timestep_spacing=spacing)
        ddim = diffusers.DDIMScheduler(**SD15, timestep_spacing=spacing)
        for steps in (4, 8, 3):
            euler.set_timesteps(steps)
            ddim.set_timesteps(steps)
            ours = schedule_timesteps("euler", steps, spacing=spacing)
            np.testing.assert_allclose(ours, euler.timesteps.numpy(), rtol=0, atol=1e-3)
            np.testing.assert_allclose(noise_sigma(ours), euler.sigmas.numpy()[:-1], rtol=2e-4)
            np.testing.assert_array_equal(schedule_timesteps("olss", steps, spacing=spacing), ddim.timesteps.numpy())
    # SD1.5's own spacing ("leading", steps_offset=1) is the default.
    np.testing.assert_array_equal(schedule_timesteps("euler", 4), [751, 501, 251, 1])
    np.testing.assert_array_equal(schedule_timesteps("ddim", 8), [876, 751, 626, 501, 376, 251, 126, 1])


def test_schedule_errors():
    with pytest.raises(QuadcError, match="unknown sampler"):
        schedule_timesteps("heun", 4)
    with pytest.raises(QuadcError, match="spacing"):
        schedule_timesteps("euler", 4, spacing="karras")
    with pytest.raises(QuadcError, match="steps"):
        schedule_timesteps("ddim", 0)


def test_calibration_timesteps_span_all_schedules():
    pool = set(np.concatenate([schedule_timesteps(n, s) for n, s in SCHEDULES]).tolist())
    ts = calibration_timesteps(4)
    assert set(ts.tolist()) <= pool and ts[0] == 999 and ts[-1] == 1
    assert list(ts) == sorted(ts, reverse=True)
    assert len(calibration_timesteps(40)) == 40


# ------------------------------------------------------------------------------------------------ feeds
def test_random_feeds(bundled_unet):
    graph, _ = frontend.load(bundled_unet)
    feeds = random_feeds(graph, 6, seed=3)
    assert len(feeds) == 6
    for feed in feeds:
        assert set(feed) == {"sample", "timestep", "encoder_hidden_states"}
        for t in graph.inputs:
            assert feed[t.name].shape == tuple(t.shape) and feed[t.name].dtype == np.float32
    pool = set(np.concatenate([schedule_timesteps(n, s) for n, s in SCHEDULES]).tolist())
    assert {float(f["timestep"][0]) for f in feeds} <= pool
    samples = np.stack([f["sample"] for f in feeds])
    assert 0.7 < samples.std() < 1.3  # variance preserving: sqrt(abar) x0 + sqrt(1-abar) eps
    cond = np.stack([f["encoder_hidden_states"] for f in feeds])
    assert abs(cond.mean()) < 0.2
    again = random_feeds(graph, 6, seed=3)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(feeds, again, strict=True) for k in a)
    other = random_feeds(graph, 6, seed=4)
    assert not np.array_equal(other[0]["sample"], feeds[0]["sample"])
    # Input specs work as well as a graph; symbolic dims get SD1.5 defaults; int timesteps are rounded.
    specs = {"sample": (["B", 4, 16, 16], np.float16), "timestep": ([], np.int64),
             "encoder_hidden_states": (["B", 77, 768], np.float32)}
    f = random_feeds(specs, 2)[1]
    assert f["sample"].shape == (1, 4, 16, 16) and f["sample"].dtype == np.float16
    assert f["timestep"].shape == () and f["timestep"].dtype == np.int64
    assert f["encoder_hidden_states"].shape == (1, 77, 768)
    with pytest.raises(QuadcError, match="positive"):
        random_feeds(graph, 0)


def test_npz_feeds(bundled_unet, tmp_path):
    graph, _ = frontend.load(bundled_unet)
    with pytest.raises(QuadcError, match="does not exist"):
        npz_feeds(tmp_path / "nope", graph)
    with pytest.raises(QuadcError, match=r"no \.npz files"):
        npz_feeds(tmp_path, graph)
    feeds = random_feeds(graph, 2)
    for i, feed in enumerate(feeds):
        np.savez(tmp_path / f"feed{i}.npz", **{k: v.astype(np.float64) for k, v in feed.items()}, extra=np.ones(2))
    got = npz_feeds(tmp_path, graph)
    assert len(got) == 2 and set(got[0]) == set(feeds[0])
    assert got[1]["sample"].dtype == np.float32 and np.array_equal(got[1]["sample"], feeds[1]["sample"])
    np.savez(tmp_path / "feed2.npz", sample=feeds[0]["sample"], timestep=feeds[0]["timestep"])
    with pytest.raises(QuadcError, match=r"feed2\.npz.*lacks the input\(s\) encoder_hidden_states"):
        npz_feeds(tmp_path, graph)
    np.savez(tmp_path / "feed2.npz", **{**feeds[0], "sample": np.zeros((1, 4, 16, 16), np.float32)})
    with pytest.raises(QuadcError, match=r"'sample' has shape \[1, 4, 16, 16\], the graph expects \[1, 4, 8, 8\]"):
        npz_feeds(tmp_path, graph)


# ------------------------------------------------------------------------------------------- calibration
def test_ranges_equal_oracle_and_cover_every_task(prepared):
    graph, ctx, tasks = prepared
    feeds = random_feeds(graph, 2)
    n_nodes, outputs = len(graph.nodes), [t.name for t in graph.outputs]
    ranges = calibrate(graph, feeds, tasks)
    assert len(graph.nodes) == n_nodes and [t.name for t in graph.outputs] == outputs  # graph untouched
    assert ranges.runs == 2 * 3 and ranges.feeds == 2 and ranges.tasks == ["small", "large"]
    inputs, node_outputs = float_tensors(graph)
    assert set(ranges) == set(inputs) | set(node_outputs) and not ranges.skipped
    # Oracle: every tensor fetched whole, min/max in numpy, union over feeds x (base + tasks).
    session = _all_outputs_session(graph, node_outputs)
    lo = dict.fromkeys(node_outputs, np.inf)
    hi = dict.fromkeys(node_outputs, -np.inf)
    for feed in feeds:
        for packed in (None, *tasks.values()):
            values = session.run(node_outputs, _bind(graph, feed, packed))
            for name, v in zip(node_outputs, values, strict=True):
                lo[name] = min(lo[name], float(v.min()))
                hi[name] = max(hi[name], float(v.max()))
    for name in node_outputs:
        np.testing.assert_allclose(ranges[name], (lo[name], hi[name]), rtol=1e-5, atol=1e-6, err_msg=name)
    # Slot inputs: the union of the packed tensors (and zero).
    slot = next(iter(ctx.lora_slots.values()))
    packed_up = [t[slot.up_input] for t in tasks.values()]
    assert ranges[slot.up_input] == (min(0.0, *(float(p.min()) for p in packed_up)),
                                     max(0.0, *(float(p.max()) for p in packed_up)))
    # A tensor downstream of a LoRA: much wider with the large LoRA bound than for the base model.
    base = calibrate(graph, feeds, None)
    small = calibrate(graph, feeds, {"small": tasks["small"]}, include_base=False)
    out = graph.outputs[0].name
    up_outs = [n for n in node_outputs if n.endswith("/lora/up_out")]
    assert len(up_outs) == len(ctx.lora_slots)
    # The layer outputs the LoRA branches are added into: wider too. (Not the U-Net's final output: the
    # trained bundled U-Net absorbs a random LoRA on four layers, its output range grew by 0.6% here.)
    merged = [o.name for n in graph.nodes if any(i.name in up_outs for i in n.inputs) for o in n.outputs]
    assert len(merged) == len(up_outs)
    for name in (*up_outs, *merged):
        width = ranges[name][1] - ranges[name][0]
        assert width > 1.05 * (base[name][1] - base[name][0]), name
    for name in (out, *up_outs, *merged):
        assert ranges[name][0] <= small[name][0] and ranges[name][1] >= small[name][1]
        assert ranges[name][0] <= base[name][0] and ranges[name][1] >= base[name][1]
    for name in up_outs:  # the base model's LoRA branch is exactly zero; the large LoRA's is not small
        assert base[name] == (0.0, 0.0)
        assert ranges[name][1] - ranges[name][0] > 5 * (small[name][1] - small[name][0]), name


def test_ranges_per_run_group_are_those_of_separate_calibrations(prepared):
    """``by_run`` / ``of_runs``: the ranges of some tasks' runs only (the anchor activation profile) are what
    calibrating with just those tasks gives."""
    graph, _, tasks = prepared
    feeds = random_feeds(graph, 2)
    ranges = calibrate(graph, feeds, tasks)
    assert sorted(ranges.by_run, key=str) == sorted([None, "small", "large"], key=str)
    base = calibrate(graph, feeds, None)
    small_alone = calibrate(graph, feeds, {"small": tasks["small"]}, include_base=False)
    small_and_base = calibrate(graph, feeds, {"small": tasks["small"]})
    for who, expected in (([None], base), (["small"], small_alone), ([None, "small"], small_and_base)):
        got = ranges.of_runs(who)
        assert got.keys() == dict(expected).keys(), who
        for name, r in expected.items():
            np.testing.assert_allclose(got[name], r, rtol=1e-6, atol=1e-7, err_msg=f"{who} {name}")
    # the large LoRA widens what the union holds; the small task's own ranges stay narrow
    widened = [n for n in ranges if ranges[n] != small_and_base[n]]
    assert len(widened) > 10


def test_calibrate_streams_feeds(prepared):
    """Feeds are consumed one at a time and memory does not grow with their number."""
    graph, _, tasks = prepared
    events: list[str] = []

    def gen(n):
        for feed in random_feeds(graph, n):
            events.append("yield")
            yield feed

    calibrate(graph, gen(3), tasks, progress=lambda m: events.append("run") if "feed" in m else None)
    assert events[:4] == ["yield", "run", "run", "run"] and events[4] == "yield"  # lazy: feed 2 after feed 1's runs

    def peak(n):
        gc.collect()
        tracemalloc.start()
        calibrate(graph, gen(n), tasks)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    peak(1)  # warm caches
    few, many = peak(2), peak(8)
    # Keeping even one run's outputs per feed would add megabytes (865 tensors x 3 runs x 6 more feeds).
    assert many - few < 512 * 1024, (few, many)


def test_external_data_gives_same_ranges(prepared, tmp_path):
    """Weights that ORT reads from the model's own data file (as for a model over 2 GB) calibrate exactly like
    weights embedded in the session's protobuf."""
    graph, _, tasks = prepared
    feeds = random_feeds(graph, 1)
    in_memory = calibrate(graph, feeds, tasks)
    path = quadc.graph.save_model(graph, tmp_path / "float.onnx", external=True)
    external = quadc.graph.load_model(path)
    assert any(isinstance(t._values, quadc.graph.ExternalValues) for t in external.tensors().values()
               if hasattr(t, "_values"))
    assert dict(calibrate(external, feeds, tasks)) == dict(in_memory)


_ATTENTION_PEAK = """
import json, resource, sys
import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime
import quadc.quant.calibrate as cal
cal.ATTENTION_BLOCK_BYTES = int(sys.argv[1])
h, n, d = 8, 2048, 32  # scores and probabilities: 128 MiB each
x = {k: gs.Variable(k, np.float32, s) for k, s in (("q", [1, h, n, d]), ("kt", [1, h, d, n]), ("v", [1, h, n, d]))}
s, p, o = (gs.Variable(k, np.float32) for k in "spo")
graph = gs.Graph(nodes=[gs.Node("MatMul", inputs=[x["q"], x["kt"]], outputs=[s]),
                        gs.Node("Softmax", attrs={"axis": -1}, inputs=[s], outputs=[p]),
                        gs.Node("MatMul", inputs=[p, x["v"]], outputs=[o])],
                 inputs=list(x.values()), outputs=[o], opset=17)
rng = np.random.default_rng(0)
feed = {k: rng.standard_normal(v.shape, np.float32) for k, v in x.items()}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ranges = cal.calibrate(graph, [feed])
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"grown": grown, "ranges": {k: ranges[k] for k in "spo"}}))
"""


def _attention(block_bytes: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _ATTENTION_PEAK, str(block_bytes)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_taps_do_not_keep_activations_alive():
    """Peak process memory (RSS, fresh process) of calibrating an attention in one piece: the taps on the
    128 MiB scores run before Softmax, which then reuses their buffer, so the peak stays near one score
    tensor, not two."""
    grown = _attention(1 << 40)["grown"]
    assert grown < 1.5 * 128 * 2**20, f"peak grew by {grown / 2**20:.0f} MiB"


def test_large_attention_is_calibrated_in_row_blocks():
    """With 32 MiB blocks the 128 MiB scores never exist whole (peak RSS well under one score tensor), and
    the ranges of scores, probabilities and output are still those of the whole tensors (numpy oracle)."""
    got = _attention(32 << 20)
    assert got["grown"] < 0.75 * 128 * 2**20, f"peak grew by {got['grown'] / 2**20:.0f} MiB"
    rng = np.random.default_rng(0)
    q, kt, v = (rng.standard_normal(shape, np.float32) for shape in ([1, 8, 2048, 32], [1, 8, 32, 2048],
                                                                     [1, 8, 2048, 32]))
    scores = q.astype(np.float64) @ kt
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for name, ref in (("s", scores), ("p", probs), ("o", probs @ v)):
        np.testing.assert_allclose(got["ranges"][name], (ref.min(), ref.max()), rtol=1e-4, atol=1e-6, err_msg=name)


_CAPTURE_PEAK = """
import resource, sys
import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime
from quadc.quant.calibrate import Capture, calibrate
x = gs.Variable("x", np.float32, [16384, 1024])  # 64 MiB activations
one = gs.Constant("one", np.ones(1, np.float32))
nodes, t, capture = [], x, {}
for i in range(6):
    a, r = gs.Variable(f"a{i}", np.float32, [16384, 1024]), gs.Variable(f"r{i}", np.float32, [16384, 1024])
    nodes += [gs.Node("Add", inputs=[t, one], outputs=[a]), gs.Node("Relu", inputs=[a], outputs=[r])]
    capture[f"layer{i}"] = (r.name, Capture("linear"))
    t = r
y = gs.Variable("y", np.float32, [16384, 1024])
graph = gs.Graph(nodes=[*nodes, gs.Node("Add", inputs=[t, one], outputs=[y])], inputs=[x], outputs=[y], opset=17)
feed = {"x": np.random.default_rng(0).standard_normal((16384, 1024), np.float32)}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ranges = calibrate(graph, [feed], capture=capture if sys.argv[1] == "capture" else None)
assert sys.argv[1] != "capture" or all(v.shape == (64, 1024) for v in ranges.samples[None].values())
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_captured_tensors_are_not_kept_alive():
    """Sampling rows of six captured 64 MiB activations adds (almost) nothing to the peak process memory
    (RSS, fresh processes): rows are gathered inside the graph, whole tensors never become outputs."""
    def peak(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _CAPTURE_PEAK, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    extra = peak("capture") - peak("none")
    assert extra < 64 * 2**20, f"captures added {extra / 2**20:.0f} MiB"


def test_calibrate_errors(prepared):
    graph, _, tasks = prepared
    with pytest.raises(QuadcError, match="lacks graph input"):
        calibrate(graph, [{"sample": np.zeros((1, 4, 8, 8), np.float32)}])
    with pytest.raises(QuadcError, match="no feeds"):
        calibrate(graph, [], tasks)
    with pytest.raises(QuadcError, match="not a LoRA input"):
        calibrate(graph, random_feeds(graph, 1), {"bad": {"nope.lora_up": np.zeros(2)}})


def test_conv_capture_rows_are_receptive_fields():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    cap = Capture("conv", (3, 3), (2, 1), (1, 0, 1, 2), (1, 1))
    rows = cap.rows(x, 10**6, rng)  # every output pixel, in (batch, y, x) order
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 2)))
    oh, ow = (7 + 2 - 3) // 2 + 1, (6 + 2 - 3) // 1 + 1
    ref = np.empty((2, oh, ow, 5))
    for b in range(2):
        for i in range(oh):
            for j in range(ow):
                ref[b, i, j] = np.einsum("oikl,ikl->o", w, padded[b, :, 2 * i:2 * i + 3, j:j + 3])
    np.testing.assert_allclose(rows @ w.reshape(5, -1).T, ref.reshape(-1, 5), rtol=1e-5, atol=1e-5)
    assert Capture().rows(x.reshape(-1, 6), 4, rng).shape == (4, 6)


def test_captured_rows_reproduce_the_lora_branch(prepared):
    """branch_output on captured rows equals the graph's own LoRA branch output (linear and conv slots)."""
    graph, ctx, tasks = prepared
    captures = lora_layer_captures(graph, ctx.lora_slots)
    kinds = {s.kind for s in ctx.lora_slots.values()}
    assert kinds == {"linear", "conv"}
    feed = random_feeds(graph, 1)[0]
    ranges = calibrate(graph, [feed], {"large": tasks["large"]}, include_base=False, capture=captures,
                       rows_per_feed=10**6, max_rows=10**6)
    rows = ranges.samples["large"]
    names = {}
    for node in graph.nodes:
        if node.name.endswith("/lora/up"):
            names[node.inputs[1].name] = node.outputs[0].name
    session = _all_outputs_session(graph, list(names.values()))
    got = dict(zip(names.values(), session.run(list(names.values()), _bind(graph, feed, tasks["large"])), strict=True))
    for module, slot in ctx.lora_slots.items():
        out = got[names[slot.up_input]]
        ref = out.transpose(0, 2, 3, 1).reshape(-1, out.shape[1]) if slot.kind == "conv" else out.reshape(-1, out.shape[-1])
        f = branch_output(rows[module], tasks["large"][slot.down_input], tasks["large"][slot.up_input], slot.kind)
        np.testing.assert_allclose(f, ref, rtol=1e-3, atol=1e-4, err_msg=module)


def test_captures_of_a_graph_with_symbolic_shapes_equal_the_static_graphs(prepared):
    """A U-Net exported with dynamic axes has no static activation shapes. Its captured LoRA inputs must be
    the rows the static graph gives (the draws depend only on shapes): before the fix, the conv layer's
    unknown shape deferred every later label's draw past its run, and those labels got zero rows, which
    failed the onnx-qdq compile of such a model in QSS."""
    graph, ctx, tasks = prepared
    captures = lora_layer_captures(graph, ctx.lora_slots)
    feeds = random_feeds(graph, 2)
    want = calibrate(graph, feeds, tasks, capture=captures, rows_per_feed=8, max_rows=12)
    dynamic = graph.copy()
    for tensor in dynamic.tensors().values():
        if not isinstance(tensor, gs.Constant) and tensor not in dynamic.inputs:
            tensor.shape = None
    sample = next(t for t in dynamic.inputs if t.name == "sample")
    sample.shape = ["batch", sample.shape[1], "height", "width"]
    got = calibrate(dynamic, feeds, tasks, capture=captures, rows_per_feed=8, max_rows=12)
    assert set(got.samples) == set(want.samples) == set(tasks)
    for task, rows in want.samples.items():
        assert set(got.samples[task]) == set(rows)
        for label, expected in rows.items():
            assert len(expected) == 12, label
            np.testing.assert_array_equal(got.samples[task][label], expected, err_msg=f"{task} {label}")


def test_capture_reservoir_is_bounded(prepared):
    graph, ctx, tasks = prepared
    captures = lora_layer_captures(graph, ctx.lora_slots)
    ranges = calibrate(graph, random_feeds(graph, 3), tasks, capture=captures, rows_per_feed=8, max_rows=12,
                       capture_tasks={"small": list(ctx.lora_slots)[:1], "large": list(ctx.lora_slots)})
    assert set(ranges.samples) == {"small", "large"}
    assert list(ranges.samples["small"]) == list(ctx.lora_slots)[:1]
    assert all(len(r) <= 12 for r in ranges.samples["large"].values())


def test_measure_sqnr_matches_numpy(prepared):
    graph, _, tasks = prepared
    feeds = random_feeds(graph, 2)
    ranges = calibrate(graph, feeds, tasks)
    static = static_tensors(graph)
    names = [n for n in ranges if n not in static and not n.endswith((".lora_down", ".lora_up"))][::7]
    names.append("sample")
    encs = {n: compute_encoding(*ranges[n], "uint8") for n in names}
    got = measure_sqnr(graph, feeds, encs, tasks)
    node_names = [n for n in names if n != "sample"]
    session = _all_outputs_session(graph, node_names)
    ref: dict[str, list] = {n: [] for n in names}
    for feed in feeds:
        for packed in (None, *tasks.values()):
            bound = _bind(graph, feed, packed)
            for n, v in zip(node_names, session.run(node_names, bound), strict=True):
                ref[n].append(v.reshape(-1))
            ref["sample"].append(bound["sample"].reshape(-1))
    for n in names:
        x = np.concatenate(ref[n])
        assert got[n] == pytest.approx(sqnr_db(x, fake_quant(x, encs[n])), abs=0.05), n


def test_channels_capture_rows_are_feature_vectors_at_positions():
    """kind="channels" ([B, C, 1, S] after linear-to-conv): each row is the C-vector at one (batch, position)."""
    from quadc.quant.calibrate import Capture

    b, c, s = 2, 3, 5
    arr = np.arange(b * c * s, dtype=np.float32).reshape(b, c, 1, s)
    every = {tuple(float(arr[i, j, 0, p]) for j in range(c)) for i in range(b) for p in range(s)}
    how = Capture(kind="channels")
    assert how.count(arr.shape) == b * s
    rows = how.rows(arr, 7, np.random.default_rng(0))
    assert rows.shape == (7, c)
    got = {tuple(map(float, r)) for r in rows}
    assert len(got) == 7 and got <= every
    assert how.rows(arr, 100, np.random.default_rng(0)).shape == (b * s, c)
