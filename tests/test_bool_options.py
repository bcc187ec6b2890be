"""One boolean parser (quadc.options.parse_bool) for pass options and for the booleans of peft configs."""

from __future__ import annotations

import json
import math

import pytest

from quadc.errors import QuadcError
from quadc.lora import read_lora
from quadc.options import parse_bool
from quadc.testing_lora import random_lora, write_peft

SHAPES = {"down_blocks.0.attn1.to_q": ("linear", 8, 8)}


@pytest.mark.parametrize(("value", "want"), [(True, True), ("TRUE", True), (" yes ", True), ("on", True), (1, True),
                                             (False, False), ("false", False), ("No", False), ("off", False),
                                             ("0", False), (0, False)])
def test_parse_bool_accepts(value, want):
    assert parse_bool(value, "x") is want


@pytest.mark.parametrize("value", ["maybe", "", 2, 0.5, None, "truthy"])
def test_parse_bool_refuses_in_one_line(value):
    with pytest.raises(QuadcError) as err:
        parse_bool(value, "pass.opt")
    assert "pass.opt=" in str(err.value) and "\n" not in str(err.value)


def _peft_dir(tmp_path, **config_changes):
    lora = random_lora(SHAPES, rank=4, alpha=8, seed=0)
    out = write_peft(lora, tmp_path / "adapter")
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(config_changes)
    cfg_path.write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize(("flag", "scale"), [("false", 8 / 4), ("true", 8 / math.sqrt(4)), (False, 8 / 4),
                                             (None, 8 / 4)])
def test_peft_use_rslora_strings_are_booleans(tmp_path, flag, scale):
    """A hand-edited ``"use_rslora": "false"`` is false (a non-empty string used to count as true)."""
    lora = read_lora(_peft_dir(tmp_path, use_rslora=flag))
    (layer,) = lora.layers.values()
    assert layer.scale == pytest.approx(scale)


@pytest.mark.parametrize("key", ["use_rslora", "use_dora", "fan_in_fan_out"])
def test_peft_flag_that_is_no_boolean_is_an_error(tmp_path, key):
    with pytest.raises(QuadcError, match=f"{key}='maybe' is not a boolean"):
        read_lora(_peft_dir(tmp_path, **{key: "maybe"}))


def test_peft_false_strings_do_not_refuse_the_adapter(tmp_path):
    lora = read_lora(_peft_dir(tmp_path, use_dora="false", fan_in_fan_out="False", lora_bias="no"))
    assert len(lora.layers) == 1
