"""Path safety: task names are safe file names, and no path from a manifest or an ONNX file leads quadc out
of its own folder (``..``, absolute paths, symlinks), through the CLI and the Python API alike."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quadc.analyze import analyze
from quadc.cli import main
from quadc.compiler import CompileOptions, bundled_loras, bundled_model, compile_model
from quadc.errors import QuadcError
from quadc.export import example_inputs
from quadc.graph import load_model, model_sha256
from quadc.runtime.engine import Engine

LORA = bundled_loras()["sepia"]  # a single-file LoRA (kohya)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if not line.startswith("[quadc] ")]
    assert len(lines) == 1 and lines[0].startswith("quadc: error: ") and "Traceback" not in err, err
    return lines[0]


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# --------------------------------------------------------------------------------------------------
# Task names
# --------------------------------------------------------------------------------------------------

BAD_NAMES = ["../../evil", "a/b", "/abs", "..", "a..b", ".hidden", "-dash", "with space", "x" * 65, "none",
             "tab\there", "new\nline", "ünï"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_cli_refuses_unsafe_task_name_and_writes_nothing(tmp_path, capsys, name):
    work = tmp_path / "work"
    work.mkdir()
    before = _files_under(tmp_path)
    code = main(["compile", "-q", str(bundled_model()), f"--lora={name}={LORA}", "-o", str(work / "o" / "out")])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "task name" in line
    assert not _files_under(tmp_path) - before, "a refused compile must write nothing, anywhere"


def test_cli_traversal_name_wrote_outside_before(tmp_path, capsys):
    """The reported bug: ``--lora ../../evil=x`` wrote lora files two levels above the output folder."""
    out = tmp_path / "a" / "b" / "out"
    assert main(["compile", "-q", "--lora", f"../../evil={LORA}", str(bundled_model()), "-o", str(out)]) == 2
    assert not list(tmp_path.rglob("evil*"))


def test_names_equal_up_to_case_are_refused(tmp_path, capsys):
    assert main(["compile", "-q", str(bundled_model()), "--lora", f"Style={LORA}", "--lora", f"style={LORA}",
                 "-o", str(tmp_path / "o")]) == 2
    assert "differ only in case" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["../../evil", "a/b", "none"])
def test_python_api_refuses_unsafe_task_names(tmp_path, name):
    with pytest.raises(QuadcError, match="task name") as info:
        compile_model(bundled_model(), tmp_path / "o", CompileOptions(loras={name: LORA}))
    assert "\n" not in str(info.value)
    with pytest.raises(QuadcError, match="task name"):
        analyze(bundled_model(), {name: LORA})
    assert list(tmp_path.iterdir()) == []


def test_safe_names_compile_and_name_their_files(tmp_path):
    names = ["a", "Style_v2.1", "x-y", "0" * 64]
    manifest = compile_model(bundled_model(), tmp_path / "o", CompileOptions(loras={n: LORA for n in names}))
    assert list(manifest["tasks"]) == names
    for n in names:
        assert (tmp_path / "o" / "lora" / f"{n}.onnx_adapter").is_file()


def test_write_task_files_refuses_an_unsafe_name_given_directly(tmp_path):
    """A LoRASet built by hand (not through compile_model) is checked where files are written."""
    from quadc import frontend
    from quadc.context import CompileContext
    from quadc.lora import LoRASet
    from quadc.lora.pack import write_task_files
    from quadc.lora.slots import plan_slots
    from quadc.testing_lora import random_lora

    _, info = frontend.load(bundled_model())
    lora = random_lora(info, ["to_q"], name="../escape")
    ctx = CompileContext(model_info=info, loras=LoRASet([lora]))
    ctx.lora_slots = plan_slots(info, ctx.loras)
    with pytest.raises(QuadcError, match="task name"):
        write_task_files(ctx, tmp_path / "art")
    assert not list(tmp_path.rglob("*escape*"))


# --------------------------------------------------------------------------------------------------
# Hostile artifacts (manifest paths)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "out"
    compile_model(None, out, CompileOptions())
    return out


def _copy(artifact: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "box" / "art"
    shutil.copytree(artifact, dst, symlinks=True)
    return dst


def _edit_manifest(art: Path, edit) -> None:
    path = art / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _first_task(art: Path) -> str:
    return next(iter(json.loads((art / "manifest.json").read_text())["tasks"]))


def _hostile(kind: str, art: Path, outside: Path) -> str:
    """Make ``art`` hostile in one way; return a word the refusal must contain."""
    task = _first_task(art)
    shutil.copy(art / "model.onnx", outside / "model.onnx")
    shutil.copy(art / "lora" / f"{task}.onnx_adapter", outside / "t.onnx_adapter")
    if kind == "graph-dotdot":
        _edit_manifest(art, lambda m: m.update(graph="../../model.onnx"))
    elif kind == "graph-absolute":
        _edit_manifest(art, lambda m: m.update(graph=str(outside / "model.onnx")))
    elif kind == "graph-symlink":
        os.symlink(outside / "model.onnx", art / "link.onnx")
        _edit_manifest(art, lambda m: m.update(graph="link.onnx"))
    elif kind == "graph-files":
        _edit_manifest(art, lambda m: m.update(graph_files=["model.onnx", "../../model.onnx"]))
    elif kind == "encodings-absolute":
        _edit_manifest(art, lambda m: m.update(encodings="/etc/passwd"))
    elif kind == "task-dotdot":
        _edit_manifest(art, lambda m: m["tasks"][task]["files"]["onnx_adapter"].update(path="../../t.onnx_adapter"))
    elif kind == "task-absolute":
        _edit_manifest(art, lambda m: m["tasks"][task]["files"]["safetensors"].update(path="/etc/passwd"))
    elif kind == "task-symlink":
        target = art / "lora" / f"{task}.onnx_adapter"
        target.unlink()
        os.symlink(outside / "t.onnx_adapter", target)
    elif kind == "lora-dir-symlink":
        shutil.move(str(art / "lora"), str(outside / "lora"))
        os.symlink(outside / "lora", art / "lora")
    elif kind == "task-not-a-path":
        _edit_manifest(art, lambda m: m["tasks"][task]["files"]["onnx_adapter"].update(path=["x"]))
        return "not a file name"
    elif kind == "tasks-not-object":
        _edit_manifest(art, lambda m: m.update(tasks=["x"]))
        return "damaged"
    elif kind == "graph-external-data":
        _external_outside(art / "model.onnx", outside)
        return "external data"
    else:  # pragma: no cover
        raise AssertionError(kind)
    return "refusing"


def _external_outside(model_path: Path, outside: Path) -> None:
    """Point the artifact graph's largest initializer at a data file outside the artifact."""
    model = onnx.load(str(model_path))
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (outside / "w.data").write_bytes(init.raw_data)
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../w.data"), ("offset", "0"), ("length", str((outside / "w.data").stat().st_size))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    model_path.write_bytes(model.SerializeToString())


HOSTILE = ["graph-dotdot", "graph-absolute", "graph-symlink", "graph-files", "encodings-absolute", "task-dotdot",
           "task-absolute", "task-symlink", "lora-dir-symlink", "task-not-a-path", "tasks-not-object",
           "graph-external-data"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_artifact_is_refused_by_the_engine(artifact, tmp_path, kind):
    art = _copy(artifact, tmp_path)
    word = _hostile(kind, art, tmp_path)
    with pytest.raises(QuadcError) as info:
        Engine(art)
    assert word in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_artifact_is_refused_by_run_and_verify(artifact, tmp_path, capsys, kind):
    from quadc.targets import get_target

    art = _copy(artifact, tmp_path)
    word = _hostile(kind, art, tmp_path)
    feeds = example_inputs("tiny")
    np.savez(tmp_path / "feeds.npz", **feeds)
    task = _first_task(artifact)
    assert main(["run", str(art), "--task", task, "--inputs", str(tmp_path / "feeds.npz"),
                 "-o", str(tmp_path / "r.npz")]) == 2
    assert word in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r.npz").exists()
    with pytest.raises(QuadcError, match=word):
        get_target("onnx").verify(art, feeds, task=task)


def test_untouched_copy_runs(artifact, tmp_path):
    """Control: the same copy without the hostile edit runs, and a symlink that stays inside is fine."""
    art = _copy(artifact, tmp_path)
    task = _first_task(art)
    (art / "alias").mkdir()
    os.symlink(art / "lora" / f"{task}.onnx_adapter", art / "alias" / "t.onnx_adapter")
    _edit_manifest(art, lambda m: m["tasks"][task]["files"]["onnx_adapter"].update(path="alias/t.onnx_adapter"))
    feeds = example_inputs("tiny")
    got = Engine(art).run(feeds, task=task)["out_sample"]
    want = Engine(artifact).run(feeds, task=task)["out_sample"]
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------------------------
# Hostile input models (external data locations)
# --------------------------------------------------------------------------------------------------

def _add_model(folder: Path, location: str, *, in_attribute: bool = False, data: bytes | None = None) -> Path:
    """``y = x + w`` with ``w`` (4 floats) stored as external data at ``location`` (as an initializer or
    as a Constant node's value)."""
    folder.mkdir(parents=True, exist_ok=True)
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    inits = [w]
    if in_attribute:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=w, name="const"))
        inits = []
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    if data is not None:
        (folder / "w.data").write_bytes(data)
    return path


SECRET = np.array([1.0, 2.0, 3.0, 4.0], np.float32).tobytes()


@pytest.fixture()
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.bin"
    path.write_bytes(SECRET)
    return path


@pytest.mark.parametrize("in_attribute", [False, True])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "deep-dotdot", "etc-passwd"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, secret, how, in_attribute):
    folder = tmp_path / "m"
    folder.mkdir()
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "link.bin",
                "deep-dotdot": "sub/../../secret.bin", "etc-passwd": "../../../../../../../../etc/passwd"}[how]
    if how == "symlink":
        os.symlink(secret, folder / "link.bin")
    path = _add_model(folder, location, in_attribute=in_attribute)
    for read in (load_model, model_sha256):
        with pytest.raises(QuadcError, match="refusing") as info:
            read(path)
        assert "\n" not in str(info.value)


def test_attribute_external_data_is_not_read_from_the_working_directory(tmp_path, secret, monkeypatch):
    """onnx resolves a Constant's external data against the working directory; quadc must use the model's
    folder (where this file does not exist) and say so, not return the bytes of ./secret.bin."""
    monkeypatch.chdir(tmp_path)
    path = _add_model(tmp_path / "m", "secret.bin", in_attribute=True)
    with pytest.raises(QuadcError, match="missing"):
        load_model(path)


@pytest.mark.parametrize("in_attribute", [False, True])
def test_external_data_inside_the_folder_loads(tmp_path, in_attribute):
    """Control: the same model with its data beside it loads, with the stored values."""
    path = _add_model(tmp_path / "m", "w.data", in_attribute=in_attribute, data=SECRET)
    graph = load_model(path)
    values = [t.values for t in graph.tensors().values() if t.name == "w" and hasattr(t, "values")]
    if in_attribute:
        values = [n.attrs["value"].values for n in graph.nodes if n.op == "Constant"]
    np.testing.assert_array_equal(np.asarray(values[0]), np.frombuffer(SECRET, np.float32))
    assert len(model_sha256(path)) == 64


def test_cli_compile_refuses_a_unet_whose_data_lies_outside(tmp_path, capsys):
    """The bundled U-Net saved with external data, its data file moved out of the model's folder."""
    folder = tmp_path / "unet"
    folder.mkdir()
    model = onnx.load(str(bundled_model()))
    onnx.save_model(model, str(folder / "unet.onnx"), save_as_external_data=True, location="unet.data",
                    size_threshold=1024)
    assert main(["inspect", str(folder / "unet.onnx")]) == 0  # control: loads where it is
    capsys.readouterr()
    shutil.move(str(folder / "unet.data"), str(tmp_path / "unet.data"))
    model = onnx.load(str(folder / "unet.onnx"), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../unet.data"
    onnx.save_model(model, str(folder / "unet.onnx"))
    assert main(["compile", "-q", str(folder / "unet.onnx"), "--lora", f"t={LORA}", "-o", str(tmp_path / "o")]) == 2
    assert "leads outside" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    from quadc.paths import replaced_atomically

    out = tmp_path / "report.json"
    out.write_text("old")
    with pytest.raises(RuntimeError), replaced_atomically(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    with replaced_atomically(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
