"""QSS (JS divergence of the LoRA branch output), anchor selection and the shared LoRA encodings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quadc.errors import QuadcError
from quadc.passes.lora_inputs import LoRASlot
from quadc.quant.affine import Encoding, QType, dequantize, fake_quant, quantize
from quadc.quant.qss import (
    branch_difference,
    branch_output,
    compute_qss,
    js_divergence,
    output_js,
    select_anchor,
    shared_lora_encodings,
    shared_sqnr,
    touched_slots,
)


def _slots(n=8, d_in=64, d_out=64, r=8, conv_every=0):
    slots = {}
    for i in range(n):
        m = f"block{i}.to_q"
        if conv_every and i % conv_every == 0:
            slots[m] = LoRASlot(m, "conv", r, f"{m}.lora_down", f"{m}.lora_up", (r, d_in // 4, 2, 2), (d_out, r, 1, 1))
        else:
            slots[m] = LoRASlot(m, "linear", r, f"{m}.lora_down", f"{m}.lora_up", (d_in, r), (r, d_out))
    return slots


def _task(slots, seed, outliers=0.0, skip=()):
    """Packed tensors of a gaussian LoRA; ``outliers``: that fraction of entries made 30x larger."""
    rng = np.random.default_rng(seed)
    out = {}
    for module, s in slots.items():
        down = (rng.standard_normal(s.down_shape) / 8).astype(np.float32)
        up = (rng.standard_normal(s.up_shape) * 0.02).astype(np.float32)
        if module in skip:
            down, up = np.zeros_like(down), np.zeros_like(up)
        elif outliers:
            for a in (down, up):
                idx = rng.choice(a.size, max(1, int(a.size * outliers)), replace=False)
                a.reshape(-1)[idx] *= 30
        out[s.down_input], out[s.up_input] = down, up
    return out


def _samples(slots, tasks, seed=0, rows=256):
    rng = np.random.default_rng(seed)
    feats = {m: int(np.prod(s.down_shape[1:])) if s.kind == "conv" else s.down_shape[0] for m, s in slots.items()}
    rows_by_module = {m: rng.standard_normal((rows, f)).astype(np.float32) for m, f in feats.items()}
    return {t: rows_by_module for t in tasks}


def _ref_uint8(lo: float, hi: float) -> tuple[np.float32, int]:
    """(scale, zero point) of uint8 asymmetric PTQ over [lo, hi] widened to hold 0, written out here."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255) if hi > lo else np.float32(1.0)
    return scale, int(np.clip(np.rint(-lo / float(scale)), 0, 255))


def _ref_fake_quant(a: np.ndarray) -> np.ndarray:
    """``a`` through uint8 PTQ from its own min/max: quantize (round half to even, clip), dequantize."""
    a = np.asarray(a, np.float32)
    scale, zp = _ref_uint8(float(a.min()), float(a.max()))
    q = np.clip(np.rint(a / scale) + zp, 0, 255)
    return ((q - zp) * scale).astype(np.float32)


def _ref_branch(rows: np.ndarray, down: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``x @ A^T @ B^T`` of a LoRA layer (conv: A [r, c, kh, kw] over im2col rows, B [out, r, 1, 1])."""
    a = np.asarray(down, np.float64)
    b = np.asarray(up, np.float64)
    if a.ndim == 4:
        a, b = a.reshape(a.shape[0], -1).T, b[:, :, 0, 0].T
    return np.asarray(rows, np.float64) @ a @ b


def _ref_layer_scores(rows: np.ndarray, down: np.ndarray, up: np.ndarray) -> tuple[float, float]:
    """(mean JS base 2 over rows, SQNR dB) of one layer under its own uint8 PTQ, with scipy's JS."""
    from scipy.spatial.distance import jensenshannon
    from scipy.special import softmax

    ref = _ref_branch(rows, down, up)
    test = _ref_branch(rows, _ref_fake_quant(down), _ref_fake_quant(up))
    tau = np.sqrt(np.mean(ref**2, axis=1, keepdims=True))
    js = jensenshannon(softmax(ref / tau, axis=1), softmax(test / tau, axis=1), base=2, axis=1) ** 2
    return float(np.mean(js)), 10 * math.log10(np.sum(ref**2) / np.sum((ref - test) ** 2))


# ---------------------------------------------------------------------------------------------- divergence
def test_js_matches_scipy():
    distance = pytest.importorskip("scipy.spatial.distance")
    rng = np.random.default_rng(0)
    for trial in range(20):
        p = rng.random(17) ** 3
        q = rng.random(17) ** 3
        if trial % 3 == 0:
            p[rng.choice(17, 4, replace=False)] = 0.0  # zeros on one side only
        ref = distance.jensenshannon(p, q, base=2) ** 2
        assert js_divergence(p, q) == pytest.approx(ref, rel=1e-9, abs=1e-15)
        assert js_divergence(p, q, base=math.e) == pytest.approx(distance.jensenshannon(p, q) ** 2, rel=1e-9)
    batch_p, batch_q = rng.random((5, 9)), rng.random((5, 9))
    ref = [distance.jensenshannon(a, b, base=2) ** 2 for a, b in zip(batch_p, batch_q, strict=True)]
    np.testing.assert_allclose(js_divergence(batch_p, batch_q, axis=-1), ref, rtol=1e-9)
    np.testing.assert_allclose(js_divergence(batch_p.T, batch_q.T, axis=0), ref, rtol=1e-9)


def test_js_bounds_and_errors():
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: 1 bit
    assert js_divergence([0.2, 0.8], [0.2, 0.8]) == 0.0
    with pytest.raises(QuadcError, match="one shape"):
        js_divergence([1, 2], [1, 2, 3])
    with pytest.raises(QuadcError, match="non-negative"):
        js_divergence([1, -1], [1, 1])


def test_output_js_is_scale_invariant_and_zero_for_exact():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((10, 32))
    g = f + 0.05 * rng.standard_normal((10, 32))
    np.testing.assert_allclose(output_js(f, g), output_js(1e-3 * f, 1e-3 * g), rtol=1e-9)
    assert np.all(output_js(f, f) == 0.0)
    assert np.all(output_js(np.zeros((2, 4)), np.zeros((2, 4))) == 0.0)


def test_branch_output_layouts():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 12))
    down, up = rng.standard_normal((12, 3)), rng.standard_normal((3, 5))
    np.testing.assert_allclose(branch_output(x, down, up, "linear"), x @ down @ up)
    cdown, cup = rng.standard_normal((3, 3, 2, 2)), rng.standard_normal((5, 3, 1, 1))
    ref = (x @ cdown.reshape(3, -1).T) @ cup[:, :, 0, 0].T
    np.testing.assert_allclose(branch_output(x, cdown, cup, "conv"), ref)
    with pytest.raises(QuadcError, match="features"):
        branch_output(x[:, :5], down, up, "linear")
    dq, uq = np.round(down * 4) / 4, np.round(up * 4) / 4
    np.testing.assert_allclose(branch_difference(x, down, up, dq, uq, "linear"), x @ down @ up - x @ dq @ uq,
                               rtol=1e-9, atol=1e-12)
    cdq, cuq = np.round(cdown * 4) / 4, np.round(cup * 4) / 4
    want = ref - (x @ cdq.reshape(3, -1).T) @ cuq[:, :, 0, 0].T
    np.testing.assert_allclose(branch_difference(x, cdown, cup, cdq, cuq, "conv"), want, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------- QSS
def test_qss_is_higher_for_outliers_and_that_lora_anchors():
    slots = _slots(conv_every=3)
    tasks = {"smooth_a": _task(slots, 1), "heavy": _task(slots, 2, outliers=0.005), "smooth_b": _task(slots, 3)}
    scores = compute_qss(slots, tasks, _samples(slots, tasks))
    qss = {k: s.qss for k, s in scores.items()}
    assert qss["heavy"] > 10 * max(qss["smooth_a"], qss["smooth_b"])
    assert scores["heavy"].sqnr_mean_db < scores["smooth_a"].sqnr_mean_db - 6
    assert select_anchor(qss) == "heavy"
    # The per-layer numbers are what the module says, computed here with numpy and scipy: mean JS and
    # SQNR of the branch under each factor's own uint8 PTQ, for every layer (linear and conv), and the
    # task's QSS is their mean.
    samples = _samples(slots, tasks)
    for task, packed in tasks.items():
        want = {m: _ref_layer_scores(samples[task][m], packed[s.down_input], packed[s.up_input])
                for m, s in slots.items()}
        for module, (js, sqnr) in want.items():
            layer = scores[task].layers[module]
            assert layer.js == pytest.approx(js, rel=1e-6), (task, module)
            assert layer.sqnr_db == pytest.approx(sqnr, rel=1e-6) and layer.rows == 256, (task, module)
        assert scores[task].qss == pytest.approx(np.mean([js for js, _ in want.values()]), rel=1e-6)
    worst = scores["heavy"].worst_layer
    assert worst.sqnr_db == min(v.sqnr_db for v in scores["heavy"].layers.values())
    row = scores["heavy"].to_dict()
    assert set(row) == {"qss", "sqnr_mean_db", "worst_layer", "layers"} and row["layers"] == len(slots)


def test_unified_fallback_for_loras_identical_in_distribution():
    slots = _slots()
    base = _task(slots, 7)
    # Same values in each tensor, other arrangement: identical weight distributions, different LoRAs.
    perm = {f"p{i}": {k: np.random.default_rng(i).permutation(v.reshape(-1)).reshape(v.shape) for k, v in base.items()}
            for i in range(3)}
    qss = {k: s.qss for k, s in compute_qss(slots, perm, _samples(slots, perm)).items()}
    assert select_anchor(qss, 0.05) is None
    same = {"a": base, "b": {k: v.copy() for k, v in base.items()}}
    qss_same = {k: s.qss for k, s in compute_qss(slots, same, _samples(slots, same)).items()}
    assert qss_same["a"] == qss_same["b"] and select_anchor(qss_same) is None


def test_qss_only_counts_layers_the_task_adapts():
    slots = _slots(4)
    tasks = {"partial": _task(slots, 1, skip=("block0.to_q", "block3.to_q"))}
    assert touched_slots(tasks["partial"], slots) == ["block1.to_q", "block2.to_q"]
    samples = _samples(slots, tasks)
    score = compute_qss(slots, tasks, samples)["partial"]
    assert set(score.layers) == {"block1.to_q", "block2.to_q"}
    with pytest.raises(QuadcError, match="no calibration samples"):
        compute_qss(slots, tasks, {"partial": {"block0.to_q": samples["partial"]["block0.to_q"]}})


def test_select_anchor_rules():
    assert select_anchor({}) is None
    assert select_anchor({"only": 0.3}) == "only"
    assert select_anchor({"a": 1.0, "b": 0.96}, 0.05) is None
    assert select_anchor({"a": 1.0, "b": 0.94}, 0.05) == "a"
    assert select_anchor({"a": 0.5, "b": 1.0, "c": 1.0}, 0.05) == "b"  # tie: first
    assert select_anchor({"a": 0.0, "b": 0.0}) is None
    with pytest.raises(QuadcError, match="tolerance"):
        select_anchor({"a": 1.0}, -0.1)


# ------------------------------------------------------------------------------------- shared encodings
def test_shared_encodings_anchor_and_unified():
    slots = _slots(4)
    tasks = {"a": _task(slots, 1), "heavy": _task(slots, 2, outliers=0.01, skip=("block2.to_q",)),
             "c": _task(slots, 3)}
    names = [n for s in slots.values() for n in (s.down_input, s.up_input)]

    anchor = shared_lora_encodings(slots, tasks, "anchor", "heavy")
    assert list(anchor) == names and all(isinstance(e, Encoding) for e in anchor.values())
    assert anchor.policy == "anchor" and anchor.anchor == "heavy"
    merged_ranges = {n: (min(float(t[n].min()) for t in tasks.values()), max(float(t[n].max()) for t in tasks.values()))
                     for n in names}
    own_ranges = {n: (float(tasks["heavy"][n].min()), float(tasks["heavy"][n].max())) for n in names}
    for n in names:
        e = anchor[n]
        assert e.qtype is QType.UINT8 and not e.per_channel and not e.symmetric
        # The anchor does not adapt block2: the merged range of all tasks there; elsewhere its own range.
        scale, zp = _ref_uint8(*(merged_ranges[n] if n.startswith("block2.") else own_ranges[n]))
        assert (float(e.scale), int(e.zero_point)) == (pytest.approx(float(scale), rel=1e-7), zp), n
    assert anchor.fallback == ["block2.to_q.lora_down", "block2.to_q.lora_up"]

    unified = shared_lora_encodings(slots, tasks, "unified")
    assert unified.anchor is None and not unified.fallback
    for n in names:
        scale, zp = _ref_uint8(*merged_ranges[n])
        assert (float(unified[n].scale), int(unified[n].zero_point)) == (pytest.approx(float(scale), rel=1e-7), zp)
        for t in tasks.values():  # covers every task: no value is off by more than half a step
            err = np.abs(fake_quant(t[n], unified[n]) - t[n]).max()
            assert err <= 0.5001 * float(unified[n].scale)
        # Zero (padding, untouched slots, the base model) is exact.
        assert dequantize(quantize(np.zeros(3), unified[n]), unified[n]).tolist() == [0.0, 0.0, 0.0]
        assert quantize(0.0, anchor[n]) == anchor[n].zero_point

    samples = _samples(slots, tasks)
    sq = shared_sqnr(slots, tasks, samples, unified)
    assert set(sq) == set(tasks) and all(math.isfinite(v) for v in sq.values())
    # Under the anchor's encodings the anchor keeps its own PTQ: its shared SQNR is its own mean layer SQNR
    # (computed here); the smooth tasks pay for the anchor's wider outlier ranges.
    own = {t: {m: _ref_layer_scores(samples[t][m], p[s.down_input], p[s.up_input])[1]
               for m, s in slots.items() if np.any(p[s.down_input])} for t, p in tasks.items()}
    shared = shared_sqnr(slots, tasks, samples, anchor)
    assert shared["heavy"] == pytest.approx(np.mean(list(own["heavy"].values())), rel=1e-6)
    # With the QSS scores (their signal energies) the same numbers come out.
    with_scores = shared_sqnr(slots, tasks, samples, anchor, compute_qss(slots, tasks, samples))
    assert with_scores["heavy"] == pytest.approx(np.mean(list(own["heavy"].values())), rel=1e-6)
    assert with_scores == pytest.approx(shared, rel=1e-9)
    for t in ("a", "c"):
        assert shared[t] < np.mean(list(own[t].values())) - 6, t


def test_shared_encodings_errors_and_no_tasks():
    slots = _slots(2)
    tasks = {"a": _task(slots, 1)}
    with pytest.raises(QuadcError, match="needs an anchor"):
        shared_lora_encodings(slots, tasks, "anchor")
    with pytest.raises(QuadcError, match="not a task"):
        shared_lora_encodings(slots, tasks, "anchor", "zzz")
    with pytest.raises(QuadcError, match="policy"):
        shared_lora_encodings(slots, tasks, "average")
    empty = shared_lora_encodings(slots, {}, "unified")
    # No task: every input holds only zeros, the degenerate range [0, 0] (scale 1, zero point 0).
    assert len(empty) == 4
    assert all((float(e.scale), int(e.zero_point), e.qtype) == (1.0, 0, QType.UINT8) for e in empty.values())
