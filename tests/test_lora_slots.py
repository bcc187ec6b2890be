"""Slot layouts and folded output scales: packed task tensors compute the LoRA delta in every layout."""

from __future__ import annotations

import numpy as np
import pytest

from quadc.lora import LoRA, LoRALayer
from quadc.lora.pack import pack_task
from quadc.lora.slots import LoRASlot
from quadc.quant.qss import branch_output


def _lora(d_in=6, d_out=5, rank=3, alpha=1.5):
    rng = np.random.default_rng(0)
    layer = LoRALayer(module="m", up=rng.standard_normal((d_out, rank)).astype(np.float32),
                      down=rng.standard_normal((rank, d_in)).astype(np.float32), alpha=alpha, rank=rank)
    return LoRA(name="t", layers={"m": layer}), layer


def test_channels_layout_and_out_scale_compute_the_same_delta():
    lora, layer = _lora()
    slot = LoRASlot("m", "linear", 4, "m.lora_down", "m.lora_up", (6, 4), (4, 5))
    x = np.random.default_rng(1).standard_normal((7, 6))
    # The LoRA's own definition: delta = scale * x @ Bᵀ @ Aᵀ, scale = alpha / rank.
    want = (alpha := 1.5 / 3) * x @ layer.down.T.astype(np.float64) @ layer.up.T.astype(np.float64)
    rows = pack_task(lora, {"m": slot})
    np.testing.assert_allclose(x @ rows["m.lora_down"] @ rows["m.lora_up"], want, rtol=1e-5)
    cf = slot.in_channels_layout().scaled(0.25)
    assert (cf.down_shape, cf.up_shape, cf.layout) == ((4, 6), (5, 4), "channels")
    packed = pack_task(lora, {"m": cf})
    got = (packed["m.lora_up"] @ (packed["m.lora_down"] @ x.T)).T  # the graph's left-operand MatMuls
    np.testing.assert_allclose(got, 0.25 * want, rtol=1e-5)
    np.testing.assert_allclose(branch_output(x, packed["m.lora_down"], packed["m.lora_up"], "channels"),
                               0.25 * want, rtol=1e-5)
    assert alpha == 0.5


def test_only_linear_slots_move_to_channels():
    conv = LoRASlot("c", "conv", 2, "c.lora_down", "c.lora_up", (2, 3, 3, 3), (4, 2, 1, 1))
    assert conv.layout == "conv"
    with pytest.raises(ValueError, match="only a linear slot"):
        conv.in_channels_layout()
