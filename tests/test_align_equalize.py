"""Range equalization keeps a LoRA's float product and fits it to the shared grids."""

from __future__ import annotations

import numpy as np

from quadc.align.equalize import equalize
from quadc.lora.model import LoRA, LoRALayer
from quadc.lora.pack import pack_task
from quadc.lora.slots import LoRASlot
from quadc.quant.affine import QType, compute_encoding, fake_quant, sqnr_db
from quadc.quant.plan import QuantPlan


def _case() -> tuple[LoRA, dict, QuantPlan]:
    rng = np.random.default_rng(0)
    # down fills a tenth of its grid, up nine tenths; component 1 is negative where the grid is short
    down = rng.uniform(-0.1, 0.1, (2, 16)).astype(np.float32)
    up = rng.uniform(-0.9, 0.9, (12, 2)).astype(np.float32)
    lora = LoRA("t", {"m": LoRALayer("m", up=up, down=down, alpha=2.0, rank=2)})
    slot = LoRASlot("m", "linear", 2, "m.lora_down", "m.lora_up", (16, 2), (2, 12))
    plan = QuantPlan(lora={"m.lora_down": compute_encoding(-1.0, 1.0, QType.UINT8),
                           "m.lora_up": compute_encoding(-1.0, 1.0, QType.UINT8)})
    return lora, {"m": slot}, plan


def test_equalize_keeps_the_product_and_balances_the_grids() -> None:
    lora, slots, plan = _case()
    eq = equalize(lora, slots, plan)
    before, after = lora.layers["m"], eq.layers["m"]
    np.testing.assert_allclose(after.delta(), before.delta(), rtol=1e-5, atol=1e-7)
    assert after.scale == before.scale and after.rank == before.rank
    packed_b, packed_a = pack_task(lora, slots), pack_task(eq, slots)
    for name in ("m.lora_down", "m.lora_up"):
        assert np.abs(packed_a[name]).max() <= 1.0  # nothing saturates
    # both factors now reach about sqrt(0.1 * 0.9) of their grid, per rank component
    usage_d = np.abs(packed_a["m.lora_down"]).max(axis=0)
    usage_u = np.abs(packed_a["m.lora_up"]).max(axis=1)
    np.testing.assert_allclose(usage_d, usage_u, rtol=0.05)
    x = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    ref = x @ packed_b["m.lora_down"] @ packed_b["m.lora_up"]

    def quantized(p: dict) -> np.ndarray:
        return x @ fake_quant(p["m.lora_down"], plan.lora["m.lora_down"]) @ fake_quant(p["m.lora_up"],
                                                                                     plan.lora["m.lora_up"])
    assert sqnr_db(ref, quantized(packed_a)) > sqnr_db(ref, quantized(packed_b)) + 3


def test_equalize_flips_signs_to_fit_an_asymmetric_grid() -> None:
    lora, slots, plan = _case()
    layer = lora.layers["m"]
    layer.down[:] = np.abs(layer.down)  # all positive
    layer.up[:] = np.abs(layer.up)
    plan.lora["m.lora_down"] = compute_encoding(-1.0, 0.1, QType.UINT8)  # mostly negative grid
    eq = equalize(lora, slots, plan)
    np.testing.assert_allclose(eq.layers["m"].delta(), layer.delta(), rtol=1e-5, atol=1e-7)
    assert (eq.layers["m"].down <= 0).all()


def test_equalize_splits_an_overflowing_component_over_the_spare_rank() -> None:
    rng = np.random.default_rng(2)
    # component 0 needs about 3x both grids (no rescaling fits it), component 1 fits; the slot has rank 8
    down = np.stack([rng.uniform(-3.0, 3.0, 16), rng.uniform(-0.3, 0.3, 16)]).astype(np.float32)
    up = np.stack([rng.uniform(-1.5, 1.5, 12), rng.uniform(-0.3, 0.3, 12)], axis=1).astype(np.float32)
    lora = LoRA("t", {"m": LoRALayer("m", up=up, down=down, alpha=1.0, rank=2)})
    slots = {"m": LoRASlot("m", "linear", 8, "m.lora_down", "m.lora_up", (16, 8), (8, 12))}
    plan = QuantPlan(lora={"m.lora_down": compute_encoding(-1.0, 1.0, QType.UINT8),
                           "m.lora_up": compute_encoding(-1.0, 1.0, QType.UINT8)})
    layer = equalize(lora, slots, plan).layers["m"]
    unsplit = equalize(lora, slots, plan, split=False)
    assert 2 < layer.rank <= 8 and layer.scale == lora.layers["m"].scale
    np.testing.assert_allclose(layer.delta(), lora.layers["m"].delta(), rtol=1e-5, atol=1e-6)
    packed = pack_task(LoRA("t", {"m": layer}), slots)
    for name in ("m.lora_down", "m.lora_up"):
        assert np.abs(packed[name]).max() <= 1.0  # nothing saturates any more
    # on inputs the LoRA never saw, the quantized branch keeps the float one far better than without splitting
    x = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)
    ref = x @ lora.layers["m"].down.T @ lora.layers["m"].up.T * lora.layers["m"].scale

    def quantized(p: dict) -> np.ndarray:
        return x @ fake_quant(p["m.lora_down"], plan.lora["m.lora_down"]) @ fake_quant(p["m.lora_up"],
                                                                                     plan.lora["m.lora_up"])
    assert sqnr_db(ref, quantized(packed)) > sqnr_db(ref, quantized(pack_task(unsplit, slots))) + 10
    assert sqnr_db(ref, quantized(packed)) > 25
