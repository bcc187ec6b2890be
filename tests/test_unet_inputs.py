"""One rule for the U-Net's inputs (quadc.unet_inputs.unet_input_roles), shared by the frontend and the
calibration feeds: the exporters' names, the variants other exports use, and the cases on which the
frontend's old ``unet_roles`` and the feeds' old ``unet_input_names`` disagreed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from quadc import frontend
from quadc.errors import QuadcError
from quadc.quant.feeds import SCHEDULES, random_feeds, schedule_timesteps
from quadc.unet_inputs import unet_input_roles

F32, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
DIFFUSERS = {"sample": "sample", "timestep": "timestep", "encoder_hidden_states": "encoder_hidden_states"}
POOL = set(np.concatenate([schedule_timesteps(n, s) for n, s in SCHEDULES]).tolist())


def _specs(*inputs: tuple[str, list, type]) -> dict:
    return {name: (shape, dtype) for name, shape, dtype in inputs}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_both_exporters_names(exporter, request):
    """``quadc export`` with either exporter: the frontend and the feeds give each role its own name."""
    path = request.getfixturevalue(f"tiny_{exporter}_onnx")
    graph, info = frontend.load(path)
    assert info.roles == DIFFUSERS
    feed = random_feeds(graph, 1)[0]
    assert set(feed) == set(DIFFUSERS)
    assert float(np.asarray(feed["timestep"]).reshape(-1)[0]) in POOL


@pytest.mark.parametrize(("inputs", "want"), [
    # diffusers / optimum names; fp16 sample, scalar int64 timestep
    (_specs(("sample", [2, 4, 64, 64], np.float16), ("timestep", [], np.int64),
            ("encoder_hidden_states", [2, 77, 768], np.float16)),
     DIFFUSERS),
    # ldm / ComfyUI style
    (_specs(("x", ["B", 4, 64, 64], np.float32), ("timesteps", ["B"], np.int64), ("context", ["B", 77, 768], np.float32)),
     {"sample": "x", "timestep": "timesteps", "encoder_hidden_states": "context"}),
    # a pipeline's variable names
    (_specs(("latent_model_input", [1, 4, 8, 8], np.float32), ("t", [1], np.float32),
            ("text_embeddings", [1, 8, 32], np.float32)),
     {"sample": "latent_model_input", "timestep": "t", "encoder_hidden_states": "text_embeddings"}),
    # names with decoration: substrings; capitals do not matter
    (_specs(("unet_Sample_in", [1, 4, 8, 8], np.float32), ("TimeStep_in", [1], np.float32),
            ("encoder_hidden_states_in", [1, 8, 32], np.float32)),
     {"sample": "unet_Sample_in", "timestep": "TimeStep_in", "encoder_hidden_states": "encoder_hidden_states_in"}),
    # anonymous inputs: one candidate of each rank
    (_specs(("input_0", [1, 4, 8, 8], np.float32), ("input_1", [1], np.int32), ("input_2", [1, 8, 32], np.float32)),
     {"sample": "input_0", "timestep": "input_1", "encoder_hidden_states": "input_2"}),
])
def test_variants(inputs, want):
    assert unet_input_roles(inputs) == want


def test_lora_slot_input_named_like_a_sampler_is_not_the_sample():
    """A conv slot's ``lora_down`` is a 4-D float input, and ``downsamplers`` contains "sample": the old
    frontend rule took it for the sample (the feeds' rule skipped LoRA inputs)."""
    inputs = _specs(("down_blocks.0.downsamplers.0.conv.lora_down", [4, 8, 3, 3], np.float32),
                    ("down_blocks.0.downsamplers.0.conv.lora_up", [8, 4, 1, 1], np.float32),
                    ("x", [1, 4, 8, 8], np.float32), ("t", [1], np.float32), ("context", [1, 8, 32], np.float32))
    assert unet_input_roles(inputs) == {"sample": "x", "timestep": "t", "encoder_hidden_states": "context"}
    feed = random_feeds(inputs, 1)[0]
    assert set(feed) == {"x", "t", "context"}  # LoRA inputs are bound per task, not fed


def test_two_4d_inputs_told_apart_by_name():
    """A second 4-D float input (a ControlNet residual): the old feeds rule, exact names then rank only,
    found two 4-D candidates and gave up; the name says which is the sample."""
    inputs = _specs(("controlnet_residual", [1, 4, 8, 8], np.float32), ("noisy_sample", [1, 4, 8, 8], np.float32),
                    ("timestep", [1], np.float32), ("encoder_hidden_states", [1, 8, 32], np.float32))
    assert unet_input_roles(inputs)["sample"] == "noisy_sample"
    feed = random_feeds(inputs, 1, seed=3)[0]
    assert set(feed) == set(inputs)  # the extra input gets generic random values
    assert feed["controlnet_residual"].shape == (1, 4, 8, 8)


def test_exact_t_beats_a_name_that_merely_contains_t():
    """The old frontend rule matched the substring "t", so ``attention_scale`` (first in order) became the
    timestep; an exact name now wins over a substring."""
    inputs = _specs(("sample", [1, 4, 8, 8], np.float32), ("attention_scale", [1], np.float32),
                    ("t", [1], np.float32), ("encoder_hidden_states", [1, 8, 32], np.float32))
    assert unet_input_roles(inputs)["timestep"] == "t"


def test_rank_and_dtype_decide_before_names():
    """The old feeds rule took an exact name whatever its rank: a 2-D pooled ``encoder_hidden_states``
    would have been fed a [B, T, D] tensor."""
    inputs = _specs(("sample", [1, 4, 8, 8], np.float32), ("timestep", [1], np.float32),
                    ("encoder_hidden_states", [1, 32], np.float32), ("text_tokens_embedded", [1, 8, 32], np.float32))
    assert unet_input_roles(inputs)["encoder_hidden_states"] == "text_tokens_embedded"
    int_sample = _specs(("sample", [1, 4, 8, 8], np.int64), ("timestep", [1], np.float32),
                        ("encoder_hidden_states", [1, 8, 32], np.float32))
    with pytest.raises(QuadcError, match="not a U-Net graph: it lacks a 4-D float 'sample'"):
        unet_input_roles(int_sample)


def test_ambiguous_roles_are_one_line_errors():
    inputs = _specs(("a", [1, 4, 8, 8], np.float32), ("b", [1, 4, 8, 8], np.float32), ("timestep", [1], np.float32),
                    ("encoder_hidden_states", [1, 8, 32], np.float32))
    with pytest.raises(QuadcError) as err:
        unet_input_roles(inputs, "m.onnx")
    msg = str(err.value)
    assert msg.startswith("m.onnx: cannot tell which input is the U-Net's sample (one of a, b)") and "\n" not in msg
    with pytest.raises(QuadcError, match="cannot tell which input is the U-Net's sample"):
        random_feeds(inputs, 1)


def _conv_unet(path: Path, inputs: list[tuple[str, int, list]]) -> Path:
    """A one-Conv "U-Net" with the given graph inputs (the first 4-D float input feeds the Conv)."""
    vis = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    sample = next(n for n, t, s in inputs if len(s) == 4 and t == F32 and not n.endswith(".lora_down"))
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "conv_in.weight")
    node = helper.make_node("Conv", [sample, "conv_in.weight"], ["out"], name="/conv_in/Conv")
    out = helper.make_tensor_value_info("out", F32, [1, 4, 8, 8])
    model = helper.make_model(helper.make_graph([node], "g", vis, [out], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("inputs", [
    [("x", F32, [1, 4, 8, 8]), ("timesteps", I64, [1]), ("context", F32, [1, 8, 32])],
    [("down_blocks.0.downsamplers.0.conv.lora_down", F32, [4, 4, 1, 1]), ("latent", F32, [1, 4, 8, 8]),
     ("attention_scale", F32, [1]), ("t", F32, [1]), ("cond", F32, [1, 8, 32])],
])
def test_frontend_and_feeds_agree(tmp_path, inputs):
    """What the frontend calls each input is what the feeds fill it with: the sample gets the latent's
    shape, the timestep a sampler timestep, the conditioning a [B, T, D] embedding."""
    graph, info = frontend.load(_conv_unet(tmp_path / "u.onnx", inputs))
    feed = random_feeds(graph, 2)[1]
    shapes = {n: tuple(s) for n, _, s in inputs}
    assert feed[info.roles["sample"]].shape == shapes[info.roles["sample"]] == (1, 4, 8, 8)
    assert float(np.asarray(feed[info.roles["timestep"]]).reshape(-1)[0]) in POOL
    assert feed[info.roles["encoder_hidden_states"]].shape == (1, 8, 32)
    assert set(info.roles.values()) <= set(feed)
