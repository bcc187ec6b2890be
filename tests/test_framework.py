"""Pass framework: presets and pipeline editing, declared options, conditions, fixed points, plugin passes
and targets from an installed package, the test helpers, and the wheel layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from golden import GOLDEN_DIR, parse_text

from quadc.cli import main
from quadc.compiler import CompileOptions, compile_model
from quadc.context import CompileContext
from quadc.errors import QuadcError
from quadc.passes import GraphPass, PassOption, PassPipeline, PassResult, get_pass, run_pipeline
from quadc.targets import get_target
from quadc.testing import apply_pass_and_basic_check, assert_op_count_match

REPO = Path(__file__).resolve().parents[1]


def _graph(name: str = "fold_mul") -> gs.Graph:
    return parse_text(GOLDEN_DIR / "const-fold" / f"{name}.in.onnxtxt")


# ----------------------------------------------------------------------------------- presets and editing
def test_presets_expand_in_place_and_mix_with_pass_names():
    assert PassPipeline("float,qdq").names == ["lora-inputs", "const-fold", "dce", "quant-plan", "qdq-insert"]
    assert PassPipeline(["cleanup", "lora-inputs"]).names == ["const-fold", "dce", "lora-inputs"]
    with pytest.raises(QuadcError, match="unknown pass 'nope'.*cleanup"):
        PassPipeline("cleanup,nope")
    with pytest.raises(QuadcError, match="empty"):
        PassPipeline.parse(" , ")


def test_pipeline_editing_by_name():
    p = PassPipeline("float")
    p.insert_pass("qdq", after="dce").remove_passes(["const-fold"])
    assert p.names == ["lora-inputs", "dce", "quant-plan", "qdq-insert"]
    p.insert_pass("const-fold", before="dce")
    p.insert_pass("dce", index=0)
    assert p.names == ["dce", "lora-inputs", "const-fold", "dce", "quant-plan", "qdq-insert"]
    p.set_options("dce", remove_unused_inputs="yes")
    assert [s.options for s in p.steps if s.name == "dce"] == [{"remove_unused_inputs": "yes"}] * 2
    assert all(q.opts["remove_unused_inputs"] is True for q in p.build() if q.name == "dce")
    p.remove_passes(["qdq"])
    assert "quant-plan" not in p and "qdq-insert" not in p
    with pytest.raises(QuadcError, match="'quant-plan', which is not in the pipeline"):
        p.set_options("quant-plan", precision="w8a8")
    with pytest.raises(QuadcError, match="'nope' is not in the pipeline"):
        p.insert_pass("dce", after="nope")


def test_target_pipelines_are_built_from_presets():
    assert get_target("onnx").pipeline().names == ["lora-inputs", "const-fold", "dce"]
    assert get_target("onnx-qdq").pipeline().names[-2:] == ["quant-plan", "qdq-insert"]


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(("options", "match"), [
    ({"precision": "w4a4"}, r"quant-plan\.precision='w4a4' is not one of w8a16, w8a8"),
    ({"a8_fraction": "1.5"}, r"quant-plan\.a8_fraction='1.5' is out of range"),
    ({"calib_random": "2.5"}, r"quant-plan\.calib_random='2.5' is not an integer"),
    ({"per_channel": "maybe"}, r"quant-plan\.per_channel='maybe' is not a boolean"),
    ({"qss_tolerance": "nan"}, r"quant-plan\.qss_tolerance='nan' must be finite"),
    ({"no_such": 1}, r"'quant-plan' has no option 'no_such'; its options: precision"),
])
def test_declared_options_reject_bad_values_in_one_line(options, match):
    with pytest.raises(QuadcError, match=match) as err:
        get_pass("quant-plan", options)
    assert "\n" not in str(err.value)


def test_options_parse_strings_and_dashes():
    p = get_pass("quant-plan", {"a8-fraction": "0.25", "per_channel": "on", "calib_random": "3"})
    assert (p.opts["a8_fraction"], p.opts["per_channel"], p.opts["calib_random"]) == (0.25, True, 3)
    assert get_pass("quant-plan").opts["precision"] == "w8a16"


def test_cli_set_and_flags_reach_the_pass(tmp_path, capsys):
    code = main(["compile", "-q", "--target", "onnx", "--set", "quant-plan.precision=w8a8", "-o", str(tmp_path / "o")])
    assert code == 2 and "does not run that pass" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    code = main(["compile", "-q", "--target", "onnx", "--set", "dce.bogus=1", "-o", str(tmp_path / "o")])
    assert code == 2 and "'dce' has no option 'bogus'" in capsys.readouterr().err
    code = main(["compile", "-q", "--target", "onnx", "--set", "dce-no-dot", "-o", str(tmp_path / "o")])
    assert code == 2 and "PASS.OPTION=VALUE" in capsys.readouterr().err
    assert main(["compile", "-q", "--set", "dce.remove_unused_inputs=false", "-o", str(tmp_path / "o")]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    dce = next(p for p in manifest["passes"] if p["pass"] == "dce")
    assert dce["options"] == {"remove_unused_inputs": False}


# ---------------------------------------------------------------------------- planning is a visible stage
def test_quant_plan_is_a_named_step(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["compile", "-q", "--target", "onnx-qdq", "--calib-random", "1", "--print-after", "quant-plan",
                 "-o", str(out)]) == 0
    assert "// after quant-plan" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    names = [p["pass"] for p in manifest["passes"]]
    assert names == ["lora-inputs", "const-fold", "dce", "quant-plan", "qdq-insert"]
    plan_step = manifest["passes"][3]
    assert plan_step["options"]["calib_random"] == 1 and plan_step["counts"]["lora_inputs"] > 0


def test_qdq_insert_without_the_plan_stage_is_refused(tmp_path):
    # Refused before the model is even read: the model path does not exist.
    missing_model = tmp_path / "not-there.onnx"
    with pytest.raises(QuadcError, match="target 'onnx-qdq' needs pass 'quant-plan'"):
        compile_model(missing_model, tmp_path / "o", CompileOptions(target="onnx-qdq", passes="lora-inputs,qdq-insert"))
    with pytest.raises(QuadcError, match="'qdq-insert' requires 'quant-plan'"):
        compile_model(missing_model, tmp_path / "o", CompileOptions(target="onnx-qdq", passes="lora-inputs,qdq-insert,quant-plan"))
    with pytest.raises(QuadcError, match="target 'onnx' cannot hold the result of pass 'quant-plan'"):
        compile_model(missing_model, tmp_path / "o", CompileOptions(target="onnx", passes="float,qdq"))
    with pytest.raises(QuadcError, match=r"needs pass 'lora-inputs' \(LoRAs are given\)"):
        compile_model(missing_model, tmp_path / "o", CompileOptions(target="onnx", passes="cleanup", loras={"t": "x"}))
    # Without LoRAs a cleanup-only float artifact is a valid request (it fails on the missing model).
    with pytest.raises(QuadcError, match="not-there.onnx"):
        compile_model(missing_model, tmp_path / "o", CompileOptions(target="onnx", passes="cleanup"))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ pre-/postconditions and fixed points
class _LeavesMul(GraphPass):
    """Test-only pass claiming to remove every Mul, but it does nothing."""

    name = "test-leaves-mul"

    def run(self, graph, ctx):
        return PassResult(False)

    def postcondition(self, graph, ctx):
        n = sum(1 for node in graph.nodes if node.op == "Mul")
        return [f"no Mul remains ({n} do)"] if n else []


class _NeedsNoShape(GraphPass):
    """Test-only pass that requires a graph without Shape ops."""

    name = "test-needs-no-shape"

    def run(self, graph, ctx):
        return PassResult(False)

    def precondition(self, graph, ctx):
        return ["no Shape op"] if any(n.op == "Shape" for n in graph.nodes) else []


def test_a_failing_postcondition_names_the_pass():
    with pytest.raises(RuntimeError, match=r"postcondition of pass 'test-leaves-mul' does not hold: no Mul remains \(1 do\)"):
        run_pipeline(_graph(), [_LeavesMul()], CompileContext(), verify="check")
    # Without verify the conditions are not evaluated; after const-fold folds the Mul it holds.
    run_pipeline(_graph(), [_LeavesMul()], CompileContext())
    run_pipeline(_graph(), [get_pass("const-fold"), _LeavesMul()], CompileContext(), verify="check")


def test_a_failing_precondition_names_the_pass():
    with pytest.raises(RuntimeError, match="precondition of pass 'test-needs-no-shape'"):
        run_pipeline(_graph("fold_shape"), [_NeedsNoShape()], CompileContext(), verify="check")


class _PeelOne(GraphPass):
    """Test-only pass that removes one Identity per run (so it needs a fixed point)."""

    name = "test-peel-one"
    fixed_point = True

    def run(self, graph, ctx):
        node = next((n for n in graph.nodes if n.op == "Identity"), None)
        if node is None:
            return PassResult(False)
        producer = node.inputs[0].inputs[0]
        producer.outputs[0] = node.outputs[0]  # the producer writes the Identity's output directly
        node.inputs.clear()
        node.outputs.clear()
        graph.cleanup()
        return PassResult(True, {"removed": 1})


def _identity_chain(n: int) -> gs.Graph:
    x = gs.Variable("x", np.float32, [2])
    cur = gs.Variable("r", np.float32, [2])
    nodes = [gs.Node("Relu", "relu", inputs=[x], outputs=[cur])]
    for i in range(n):
        nxt = gs.Variable(f"t{i}", np.float32, [2])
        nodes.append(gs.Node("Identity", f"id{i}", inputs=[cur], outputs=[nxt]))
        cur = nxt
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[cur], opset=17)


def test_fixed_point_pass_repeats_until_no_change():
    graph, records = run_pipeline(_identity_chain(3), [_PeelOne()], CompileContext(), verify="numeric")
    assert records[0].rounds == 4 and records[0].counts == {"removed": 3}
    assert_op_count_match(graph, {"Identity": 0})


# -------------------------------------------------------------------------------------------- helpers
def test_apply_pass_and_basic_check_passes_a_good_pass():
    graph, result = apply_pass_and_basic_check(_graph(), "const-fold")
    assert result.changed
    assert_op_count_match(graph, {"Mul": 0, "Add": 1})
    with pytest.raises(AssertionError, match="Mul 0 != 1"):
        assert_op_count_match(graph, {"Mul": 1})


class _SubtractsLoRA(GraphPass):
    """Test-only pass with a LoRA wiring bug: the branch is subtracted instead of added."""

    name = "test-subtracts-lora"

    def run(self, graph, ctx):
        next(n for n in graph.nodes if n.name.endswith("/lora/add")).op = "Sub"
        return PassResult(True)


def _lora_graph() -> tuple[gs.Graph, CompileContext]:
    from golden import case_context, case_pass

    path = GOLDEN_DIR / "lora-inputs" / "output_layer.in.onnxtxt"
    graph, ctx = parse_text(path), case_context(path)
    case_pass("lora-inputs", ctx).run(graph, ctx)
    return graph, ctx


def test_helper_catches_a_miswired_lora_branch_with_nonzero_lora_inputs():
    graph, ctx = _lora_graph()
    # With zero LoRA inputs (the base model) the bug is invisible; the helper feeds non-zero ones.
    with pytest.raises(AssertionError, match="max abs diff"):
        apply_pass_and_basic_check(graph, _SubtractsLoRA(), ctx, numeric=True)


def test_helper_checks_declared_new_inputs_and_outputs():
    from golden import case_context, case_pass

    path = GOLDEN_DIR / "lora-inputs" / "linear_bias.in.onnxtxt"
    ctx = case_context(path)
    with pytest.raises(AssertionError, match="changed the graph inputs"):
        apply_pass_and_basic_check(parse_text(path), case_pass("lora-inputs", ctx), ctx)
    graph, _ = apply_pass_and_basic_check(
        parse_text(path), case_pass("lora-inputs", ctx), ctx,
        expected_new_inputs=["blk.attn1.to_q.lora_down", "blk.attn1.to_q.lora_up"])
    assert {i.name for i in graph.inputs} >= {"blk.attn1.to_q.lora_down", "blk.attn1.to_q.lora_up"}


# ----------------------------------------------------------------------- plugins from an installed package
PLUGIN_PY = '''
import numpy as np
import onnx_graphsurgeon as gs

from quadc.passes import GraphPass, PassOption, PassResult
from quadc.targets.onnx_ref import OnnxTarget


class Legalize(GraphPass):
    """Demo legalization: append Identity after the graph output (a vendor quirk)."""

    name = "demo::legalize"
    options = (PassOption("tag", str, "x", "a tag recorded in the manifest"),)

    def run(self, graph, ctx):
        if any(n.op == "Identity" and n.name == "demo_out" for n in graph.nodes):
            return PassResult(False)
        out = graph.outputs[0]
        new = gs.Variable(out.name, out.dtype, out.shape)
        out.name = out.name + "_pre_demo"
        graph.nodes.append(gs.Node("Identity", "demo_out", inputs=[out], outputs=[new]))
        graph.outputs[0] = new
        return PassResult(True, {"identities": 1})

    def postcondition(self, graph, ctx):
        return [] if graph.nodes and graph.nodes[-1].op == "Identity" or any(
            n.name == "demo_out" for n in graph.nodes) else ["demo_out exists"]


class DemoTarget(OnnxTarget):
    """Float ONNX with the demo legalization."""

    name = "demo-npu"
    description = "demo vendor target from a plugin package"
    passes = ("float", "demo::legalize")
    requires_passes = ("lora-inputs", "demo::legalize")
'''

PLUGIN_TOML = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "quadc-demo-plugin"
version = "0.0.1"

[project.entry-points."quadc.passes"]
legalize = "quadc_demo_plugin:Legalize"

[project.entry-points."quadc.targets"]
demo-npu = "quadc_demo_plugin:DemoTarget"
'''


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", *args], check=True, capture_output=True, text=True)


def test_a_plugin_package_registers_its_pass_and_target(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text(PLUGIN_TOML)
    (src / "quadc_demo_plugin.py").write_text(textwrap.dedent(PLUGIN_PY))
    site = tmp_path / "site"
    _pip("--target", str(site), str(src))
    env = {**os.environ, "PYTHONPATH": str(site)}
    quadc = [sys.executable, "-m", "quadc.cli"]
    listed = subprocess.run([*quadc, "passes"], env=env, capture_output=True, text=True, check=True).stdout
    assert "demo::legalize" in listed and "--set demo::legalize.tag" in listed
    out = tmp_path / "art"
    run = subprocess.run([*quadc, "compile", "-q", "--target", "demo-npu", "--set", "demo::legalize.tag=v1",
                          "--verify", "check", "-o", str(out)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    step = manifest["passes"][-1]
    assert step == {"pass": "demo::legalize", "changed": True, "counts": {"identities": 1}, "options": {"tag": "v1"}}
    # The target refuses a pipeline without its legalization, in one line.
    bad = subprocess.run([*quadc, "compile", "-q", "--target", "demo-npu", "--passes", "float",
                          "-o", str(tmp_path / "bad")], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "needs pass 'demo::legalize'" in bad.stderr
    assert not (tmp_path / "bad").exists()


SCHEME_PLUGIN_PY = '''
from quadc.options import PassOption
from quadc.quant.affine import QType
from quadc.quant.schemes import EncodingScheme
from quadc.targets.onnx_qdq import OnnxQdqTarget

#: A vendor's integer types: int16 symmetric activations, int8 symmetric weights and LoRA inputs.
SYM = EncodingScheme(name="demo-sym16", description="demo: int16 symmetric", activation16=QType.INT16,
                     activation8=QType.INT8, activation_symmetric=True, weight=QType.INT8, weight_symmetric=True,
                     per_channel=True, lora=QType.INT8, lora_symmetric=True)


class SymTarget(OnnxQdqTarget):
    """Quantized ONNX in the demo scheme."""

    name = "demo-sym"
    description = "demo quantized target with its own encoding scheme"
    scheme = "demo-sym16"
    options = (PassOption("flavour", str, "plain", "recorded in the manifest"),)

    def emit(self, graph, ctx, out_dir):
        entries = super().emit(graph, ctx, out_dir)
        entries["flavour"] = self.opts["flavour"]
        return entries
'''

SCHEME_PLUGIN_TOML = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "quadc-demo-scheme"
version = "0.0.1"

[project.entry-points."quadc.schemes"]
demo-sym16 = "quadc_demo_scheme:SYM"

[project.entry-points."quadc.targets"]
demo-sym = "quadc_demo_scheme:SymTarget"
'''


def test_a_plugin_target_with_its_own_scheme_joins_target_all(tmp_path):
    import onnx

    from quadc.quant.encodings import read_encodings

    src = tmp_path / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text(SCHEME_PLUGIN_TOML)
    (src / "quadc_demo_scheme.py").write_text(textwrap.dedent(SCHEME_PLUGIN_PY))
    site = tmp_path / "site"
    _pip("--target", str(site), str(src))
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = tmp_path / "all"
    run = subprocess.run([sys.executable, "-m", "quadc.cli", "compile", "-q", "--target", "all", "--calib-random", "1",
                          "--set", "demo-sym.flavour=spicy", "-o", str(out)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    index = json.loads((out / "targets.json").read_text())
    assert "demo-sym" in index["targets"]
    manifest = json.loads((out / "demo-sym" / "manifest.json").read_text())
    qdq = json.loads((out / "onnx-qdq" / "manifest.json").read_text())
    assert manifest["quant"]["calibration"] == qdq["quant"]["calibration"]  # one calibration, two schemes
    assert manifest["quant"]["scheme"] == "demo-sym16" and manifest["flavour"] == "spicy"
    enc = read_encodings(out / "demo-sym" / "encodings.json")
    assert {str(e.qtype) for n, e in enc.activations.items() if not n.endswith(("lora_down", "lora_up"))} == {"int16"}
    assert all(int(e.zero_point) == 0 for e in enc.activations.values())
    model = onnx.load(str(out / "demo-sym" / "model.onnx"), load_external_data=False)
    lora = [i for i in model.graph.input if i.name.endswith(("lora_down", "lora_up"))]
    assert lora and {i.type.tensor_type.elem_type for i in lora} == {onnx.TensorProto.INT8}
    # The int16/int8 graph runs, binds its int8 task files and stays close to the float graph.
    from quadc.quant.affine import sqnr_db
    from quadc.runtime.engine import Engine

    sym, flt = Engine(out / "demo-sym"), Engine(out / "onnx")
    from quadc.eval.targets_summary import held_out_feeds

    feed = held_out_feeds(flt.manifest, 1)[0]
    task = next(iter(manifest["tasks"]))
    assert sqnr_db(flt.run(feed, task)["out_sample"], sym.run(feed, task)["out_sample"]) > 20.0


def test_a_plugin_pass_without_a_namespace_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text(PLUGIN_TOML.replace('demo-npu = "quadc_demo_plugin:DemoTarget"', ""))
    (src / "quadc_demo_plugin.py").write_text(textwrap.dedent(PLUGIN_PY).replace('"demo::legalize"', '"legalize"'))
    site = tmp_path / "site"
    _pip("--target", str(site), str(src))
    run = subprocess.run([sys.executable, "-m", "quadc.cli", "passes"], env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True)
    assert run.returncode == 2 and "must name its pass 'namespace::name'" in run.stderr


# ------------------------------------------------------------------------------------------------- layout
def test_wheel_installs_passes_and_targets_inside_quadc(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, text=True)
    wheel = next((tmp_path / "dist").glob("quadc-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "quadc/passes/pipeline.py" in names and "quadc/targets/base.py" in names
    assert "quadc/data/tiny_unet.onnx" in names
    assert not any(n.startswith(("passes/", "targets/")) for n in names), "generic top-level modules in the wheel"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "onnx-qdq = quadc.targets.onnx_qdq:OnnxQdqTarget" in zipfile.ZipFile(wheel).read(entry_points).decode()
    site = tmp_path / "site"
    _pip("--target", str(site), str(wheel))
    probe = ("import quadc.passes, quadc.targets; from quadc.targets import discover_targets; "
             "print(quadc.passes.__file__); print(sorted(discover_targets()))")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout.splitlines()
    assert out[0].startswith(str(site)), out
    assert "onnx-qdq" in out[1]


def test_option_declarations_are_complete():
    from quadc.passes import registered_passes

    for name, cls in registered_passes().items():
        for option in cls.options:
            assert isinstance(option, PassOption) and option.help, f"{name}.{option.name} needs help text"
            if option.default is not None:
                assert option.parse(option.default, name) == option.default, f"{name}.{option.name} default"


def test_builtin_postconditions_catch_broken_lora_wiring():
    from test_qdq_insert import DOWN, UP, lora_linear_graph, lora_tasks, make_plan, qdq

    graph, ctx = lora_linear_graph()
    lora_pass = get_pass("lora-inputs")
    assert lora_pass.postcondition(graph, ctx) == []
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, 8)).astype(np.float32), **t} for t in lora_tasks(2)]
    plan = make_plan(graph, feeds, lora_inputs=[DOWN, UP])
    qctx = qdq(graph, plan)
    qctx.lora_slots = ctx.lora_slots
    q_pass = get_pass("qdq-insert")
    assert q_pass.postcondition(graph, qctx) == []
    dq = next(n for n in graph.nodes if n.op == "DequantizeLinear" and n.inputs[0].name == UP)
    dq.inputs[1] = gs.Constant(dq.inputs[1].name + "_other", np.asarray(plan.lora[UP].scale * 2, np.float32))
    assert UP in q_pass.postcondition(graph, qctx)[0]
    # A slot input that no longer feeds anything breaks lora-inputs' postcondition.
    for node in list(graph.nodes):
        if any(t.name == DOWN for t in node.inputs):
            node.inputs = [t for t in node.inputs if t.name != DOWN] + [gs.Constant("zero", np.zeros((8, 2), np.float32))]
    assert DOWN in lora_pass.postcondition(graph, ctx)[0]
