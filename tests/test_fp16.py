"""fp16 and bf16-weight U-Nets through every target, against the same model in fp32.

Oracle: the fp32 LoRA-as-input compile (target ``onnx``) of the fp32 export of the same weights, with the
same bundled LoRAs. The fp16 model is ``quadc export --dtype fp16`` of the tiny U-Net (random, seed 0; the bundled
LoRAs, trained on the bundled U-Net, fit its shapes); the
bf16-weight model is the bundled fp32 U-Net with every weight matrix stored as bfloat16 behind a
``Cast`` to float, and its oracle the fp32 model holding those very (bf16-rounded) values.
Quantized artifacts are calibrated on synthetic feeds of seed 0 and measured on feeds of seed 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quadc.compiler import CompileOptions, bundled_loras, compile_model
from quadc.errors import QuadcError
from quadc.lora.pack import read_packed
from quadc.quant.affine import sqnr_db
from quadc.quant.encodings import read_encodings
from quadc.quant.feeds import random_feeds
from quadc.runtime.engine import Engine

#: Unified LoRA encodings: this random U-Net is not the one the bundled LoRAs were trained on, and under QSS's
#: anchor (sepia) the shared LoRA encodings clip the inpaint LoRA's weights: 26.3 dB in fp16 and 25.9 dB in
#: fp32 alike (measured), which is what ``quadc align`` is for, not an fp16 matter. Unified: 36.5-38 dB.
CALIB = {"calib_random": 16, "calib_seed": 0, "lora_policy": "unified"}
EVAL_SEED = 1
#: fp16 tolerance: max |fp16 - fp32| over the output, relative to max |fp32| (measured: about 1.6e-3).
FP16_TOL = 4e-3
#: Quantized vs float artifact on feeds not used for calibration (measured fp16: 32-36 dB).
MIN_SQNR_DB = 30.0


def _compile(model: Path, out: Path, target: str, **plan: object) -> Engine:
    options = CompileOptions(target=target, loras={k: str(v) for k, v in bundled_loras().items()},
                             pass_options={"quant-plan": dict(plan)} if plan else {})
    compile_model(model, out, options)
    return Engine(out)


def _eval_feeds(engine: Engine, n: int = 2) -> list[dict[str, np.ndarray]]:
    """Synthetic U-Net feeds of seed EVAL_SEED (never seen by calibration), float32."""
    specs = {i.name: (i.shape, np.float32) for i in engine.session.get_inputs() if i.name in engine.model_inputs}
    return random_feeds(specs, n, seed=EVAL_SEED)


def _outputs(engine: Engine, feeds: list[dict[str, np.ndarray]]) -> dict[str | None, list[np.ndarray]]:
    return {task: [engine.run(f, task)["out_sample"].astype(np.float64) for f in feeds]
            for task in [None, *engine.tasks]}


def _graph_inputs(artifact: Path) -> dict[str, int]:
    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    return {i.name: i.type.tensor_type.elem_type for i in model.graph.input}


# ------------------------------------------------------------------------------------------------ fp16
@pytest.fixture(scope="module")
def fp16_artifacts(tmp_path_factory, tiny_fp16_onnx, tiny_torchscript_onnx):
    """(fp32 oracle, fp16 float, fp16 quantized) engines and the fp16 artifact folders."""
    root = tmp_path_factory.mktemp("fp16")
    oracle = _compile(tiny_torchscript_onnx, root / "fp32_onnx", "onnx")
    flt = _compile(tiny_fp16_onnx, root / "fp16_onnx", "onnx")
    qdq = _compile(tiny_fp16_onnx, root / "fp16_qdq", "onnx-qdq", **CALIB)
    return oracle, flt, qdq, root


def test_fp16_export_is_the_fp32_model_rounded(tiny_fp16_onnx, tiny_torchscript_onnx):
    m16 = onnx.load(str(tiny_fp16_onnx))
    m32 = onnx.load(str(tiny_torchscript_onnx))
    assert {i.name: i.type.tensor_type.elem_type for i in [*m16.graph.input, *m16.graph.output]} == {
        "sample": TensorProto.FLOAT16, "timestep": TensorProto.FLOAT16,
        "encoder_hidden_states": TensorProto.FLOAT16, "out_sample": TensorProto.FLOAT16}
    w32 = {t.name: numpy_helper.to_array(t) for t in m32.graph.initializer}
    w16 = {t.name: numpy_helper.to_array(t) for t in m16.graph.initializer}
    w = "down_blocks.0.resnets.0.conv1.weight"
    assert w16[w].dtype == np.float16
    np.testing.assert_array_equal(w16[w], w32[w].astype(np.float16))


def test_fp16_float_artifact_matches_fp32_oracle(fp16_artifacts):
    oracle, flt, _, root = fp16_artifacts
    manifest = json.loads((root / "fp16_onnx" / "manifest.json").read_text())
    assert manifest["precision"] == "fp16"
    slots = manifest["lora_slots"]
    assert slots and all(s[side]["dtype"] == "float16" for s in slots for side in ("down", "up"))
    inputs = _graph_inputs(root / "fp16_onnx")
    assert all(inputs[s[side]["name"]] == TensorProto.FLOAT16 for s in slots for side in ("down", "up"))
    for task, entry in manifest["tasks"].items():
        packed = read_packed(root / "fp16_onnx" / entry["files"]["onnx_adapter"]["path"])
        assert packed and all(v.dtype == np.float16 for v in packed.values()), task
    feeds = _eval_feeds(oracle)
    want, got = _outputs(oracle, feeds), _outputs(flt, feeds)
    assert set(got) == {None, *bundled_loras()}
    for task in want:
        for w, g, base in zip(want[task], got[task], want[None], strict=True):
            scale = float(np.abs(w).max())
            np.testing.assert_allclose(g, w, rtol=0, atol=FP16_TOL * scale, err_msg=f"task {task}")
            if task is not None:  # the LoRA moves the output far more than the fp16 tolerance
                assert float(np.abs(w - base).max()) > 20 * FP16_TOL * scale, task


def test_fp16_float_artifact_verifies_against_the_fp16_model_with_each_lora_merged(fp16_artifacts, tiny_fp16_onnx):
    from quadc.targets import get_target

    _, flt, _, root = fp16_artifacts
    loras = {k: str(v) for k, v in bundled_loras().items()}
    feed = _eval_feeds(flt, 1)[0]
    for task in [None, *flt.tasks]:
        report = get_target("onnx").verify(root / "fp16_onnx", feed, task, model=tiny_fp16_onnx, loras=loras)
        assert report["outputs"]["out_sample"]["sqnr_db"] >= 45.0, (task, report)


def test_fp16_quantized_artifact_reaches_sqnr_on_unseen_inputs(fp16_artifacts):
    _, flt, qdq, root = fp16_artifacts
    manifest = json.loads((root / "fp16_qdq" / "manifest.json").read_text())
    assert manifest["quant"]
    feeds = _eval_feeds(flt, 3)
    want, got = _outputs(flt, feeds), _outputs(qdq, feeds)
    for task in want:
        db = sqnr_db(np.concatenate(want[task]), np.concatenate(got[task]))
        assert db >= MIN_SQNR_DB, f"task {task}: {db:.1f} dB"


def test_fp16_qdq_scales_are_float16_and_match_the_shared_lora_encodings(fp16_artifacts):
    _, _, _, root = fp16_artifacts
    art = root / "fp16_qdq"
    model = onnx.shape_inference.infer_shapes(onnx.load(str(art / "model.onnx")))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    # A Q/DQ scale has the float type of the tensor it quantizes: float16 almost everywhere, float32 in the
    # timestep embedding torch computes in float32.
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        assert helper.np_dtype_to_tensor_dtype(inits[q.input[1]].dtype) == types[q.input[0]], q.name
    weights = [n for n in dqs if n.input[0].endswith(".weight_quantized")]
    assert weights and all(inits[n.input[1]].dtype == np.float16 for n in weights)
    # Every LoRA input is uint8 and its DequantizeLinear uses exactly the encodings.json scale and zero point
    # that the stored task bytes were quantized with.
    encs = read_encodings(art / "encodings.json")
    slots = json.loads((art / "manifest.json").read_text())["lora_slots"]
    inputs = _graph_inputs(art)
    for name in (s[side]["name"] for s in slots for side in ("down", "up")):
        assert inputs[name] == TensorProto.UINT8, name
        dq = next(n for n in dqs if n.input[0] == name)
        enc = encs.get(name)
        assert inits[dq.input[1]].dtype == np.float16, name
        assert np.float32(inits[dq.input[1]]) == np.float32(enc.scale), name
        assert int(inits[dq.input[2]]) == int(enc.zero_point), name


def test_fp16_base_model_equals_the_exported_model(fp16_artifacts, tiny_fp16_onnx):
    import onnxruntime as ort

    _, flt, _, _ = fp16_artifacts
    feed = {k: v.astype(np.float16) for k, v in _eval_feeds(flt, 1)[0].items()}
    want = ort.InferenceSession(str(tiny_fp16_onnx), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(flt.run(feed)["out_sample"].astype(np.float32), want.astype(np.float32),
                               rtol=0, atol=2e-3 * float(np.abs(want).max()))


@pytest.mark.parametrize(("pass_options", "message"), [
    ({"qdq-insert": {"bias": "float"}}, "float16 bias"),  # onnxruntime would requantize it in float16
    ({"quant-plan": {"precision": "w8a8"}}, "8-bit encodings"),  # onnxruntime's QLinearConcat rejects it
], ids=["bias-float", "w8a8"])
def test_fp16_options_onnxruntime_cannot_run_are_refused(tmp_path, tiny_fp16_onnx, pass_options, message):
    opts = {"quant-plan": {"calib_random": 1}}
    for name, values in pass_options.items():
        opts[name] = {**opts.get(name, {}), **values}
    options = CompileOptions(target="onnx-qdq", loras={k: str(v) for k, v in bundled_loras().items()},
                             pass_options=opts)
    with pytest.raises(QuadcError, match=message) as err:
        compile_model(tiny_fp16_onnx, tmp_path / "out", options)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ bf16
def _bf16_models(src: Path, root: Path) -> tuple[Path, Path]:
    """(bf16-weight model, fp32 model with the same bf16-rounded values) from the fp32 model ``src``.

    Every float initializer of rank >= 2 (all Conv/MatMul/Gemm weights) is stored as bfloat16 under its
    own name and cast to float by a ``Cast`` node, whose output the layers read.
    """
    model = onnx.load(str(src))
    rounded = onnx.load(str(src))
    casts, inits = [], []
    for init, twin in zip(model.graph.initializer, rounded.graph.initializer, strict=True):
        if init.data_type != TensorProto.FLOAT or len(init.dims) < 2:
            inits.append(init)
            continue
        values = numpy_helper.to_array(init).astype(ml_dtypes.bfloat16)
        twin.CopyFrom(numpy_helper.from_array(values.astype(np.float32), init.name))
        inits.append(numpy_helper.from_array(values, init.name))
        casts.append(helper.make_node("Cast", [init.name], [f"{init.name}__float"], to=TensorProto.FLOAT,
                                      name=f"{init.name}/Cast"))
        for node in model.graph.node:
            node.input[:] = [f"{init.name}__float" if i == init.name else i for i in node.input]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    nodes = [*casts, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    bf16, fp32 = root / "unet_bf16.onnx", root / "unet_bf16_as_fp32.onnx"
    onnx.save(model, str(bf16))
    onnx.save(rounded, str(fp32))
    return bf16, fp32


@pytest.fixture(scope="module")
def bf16_artifacts(tmp_path_factory, bundled_unet):
    root = tmp_path_factory.mktemp("bf16")
    bf16, fp32 = _bf16_models(bundled_unet, root)
    oracle = _compile(fp32, root / "fp32_onnx", "onnx")
    flt = _compile(bf16, root / "bf16_onnx", "onnx")
    qdq = _compile(bf16, root / "bf16_qdq", "onnx-qdq", **CALIB)
    return oracle, flt, qdq, root


def test_bf16_weight_model_compiles_and_matches_its_fp32_values(bf16_artifacts):
    oracle, flt, _, root = bf16_artifacts
    manifest = json.loads((root / "bf16_onnx" / "manifest.json").read_text())
    assert len(manifest["lora_slots"]) == len(json.loads((root / "fp32_onnx" / "manifest.json").read_text())[
        "lora_slots"]) > 0
    assert all(s["down"]["dtype"] == "float32" for s in manifest["lora_slots"])
    feeds = _eval_feeds(oracle)
    want, got = _outputs(oracle, feeds), _outputs(flt, feeds)
    for task in want:
        for w, g in zip(want[task], got[task], strict=True):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(np.abs(w).max()), err_msg=f"task {task}")


def test_bf16_weight_model_quantizes(bf16_artifacts):
    _, flt, qdq, _ = bf16_artifacts
    feeds = _eval_feeds(flt, 3)
    want, got = _outputs(flt, feeds), _outputs(qdq, feeds)
    for task in want:
        db = sqnr_db(np.concatenate(want[task]), np.concatenate(got[task]))
        assert db >= MIN_SQNR_DB, f"task {task}: {db:.1f} dB"


def test_export_refuses_an_unknown_dtype(tmp_path):
    from quadc.export import export_unet

    with pytest.raises(QuadcError, match="unknown export dtype 'bf16'"):
        export_unet(out=tmp_path / "unet.onnx", dtype="bf16")
