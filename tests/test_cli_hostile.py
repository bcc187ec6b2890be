"""The CLI under unlucky use: `--force` never destroys the files it compiles, nor the working directory."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from quadc.cli import main
from quadc.compiler import bundled_loras, bundled_model


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_force_into_the_models_own_folder_keeps_the_model(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    model = folder / "unet.onnx"
    shutil.copy(bundled_model(), model)
    before = _sha(model)
    assert main(["compile", str(model), "-q", "--force", "-o", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--force would replace" in err
    assert _sha(model) == before
    assert sorted(p.name for p in folder.iterdir()) == ["unet.onnx"]


def test_force_into_a_loras_folder_keeps_the_lora(tmp_path, capsys):
    folder = tmp_path / "loras"
    folder.mkdir()
    lora = folder / "s.safetensors"
    shutil.copy(bundled_loras()["sepia"], lora)
    assert main(["compile", str(bundled_model()), "-q", "--force", "--lora", f"s={lora}", "-o", str(folder)]) == 2
    assert "--force would replace" in capsys.readouterr().err
    assert lora.exists() and sorted(p.name for p in folder.iterdir()) == ["s.safetensors"]


@pytest.mark.parametrize("out", [".", ".."])
def test_force_over_the_working_directory_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, out):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    assert main(["compile", "-q", "--force", "--target", "onnx", "-o", out]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "working directory" in err
    assert sorted(os.listdir(work)) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path / "a")) == ["b"]


def test_force_replaces_an_unrelated_artifact(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["compile", "-q", "--force", "-o", str(out)]) == 0
    assert (out / "manifest.json").exists() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigterm_during_compile_leaves_no_partial_folder(tmp_path):
    """`timeout` and process managers stop a compile with SIGTERM; the staging folder must go too."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "quadc.cli", "compile", "-q", "--target", "all", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the compile ended before its staging folder appeared"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == []


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "q"
    assert main(["compile", "-q", "--target", "onnx", "-o", str(out)]) == 0
    return out


def _feeds(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, sample=rng.random((1, 4, 8, 8), dtype=np.float32), timestep=np.array([10.0], np.float32),
             encoder_hidden_states=rng.random((1, 8, 32), dtype=np.float32))
    return path


def test_run_output_that_is_a_directory_is_one_line(tiny_artifact, tmp_path, capsys):
    (tmp_path / "res").mkdir()
    feeds = _feeds(tmp_path / "feeds.npz")
    assert main(["run", str(tiny_artifact), "--task", "sepia", "--inputs", str(feeds),
                 "-o", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feeds.npz", "res"]


def test_run_on_a_target_all_folder_names_the_artifacts_inside(tmp_path, capsys):
    folder = tmp_path / "all"
    folder.mkdir()
    (folder / "targets.json").write_text("{}")
    feeds = _feeds(tmp_path / "feeds.npz")
    assert main(["run", str(folder), "--task", "sepia", "--inputs", str(feeds), "-o", str(tmp_path / "r.npz")]) == 2
    assert "--target all folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["report", "{art}", "-o", "{dir}"],
    ["generate", "{art}", "--task", "sepia", "-o", "{dir}"],
    ["verify", "{art}", "--random", "1", "--json", "{dir}"],
    ["analyze", "--json", "{dir}"],
])
def test_output_that_is_a_directory_is_refused_before_the_work(tiny_artifact, tmp_path, capsys, monkeypatch, argv):
    """`report` spent its whole run and then ended in an IsADirectoryError traceback."""
    import quadc.analyze
    import quadc.eval.targets_summary
    import quadc.pipeline.generate
    import quadc.report

    def no_work(*args, **kwargs):
        raise AssertionError("the long work started before the output path was checked")

    for module, name in [(quadc.report, "build_report"), (quadc.pipeline.generate, "generate"),
                         (quadc.eval.targets_summary, "verify_artifacts"), (quadc.analyze, "analyze")]:
        monkeypatch.setattr(module, name, no_work)
    args = [a.format(art=tiny_artifact, dir=tmp_path) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is a directory" in err


def test_align_force_into_the_loras_folder_keeps_the_lora(tmp_path, capsys):
    pytest.importorskip("torch")
    folder = tmp_path / "loras"
    folder.mkdir()
    lora = folder / "s.safetensors"
    shutil.copy(bundled_loras()["sepia"], lora)
    assert main(["align", "--lora", f"s={lora}", "--force", "-o", str(folder)]) == 2
    assert "--force would replace" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["s.safetensors"]


def test_unreadable_input_image_is_named_once(tiny_artifact, tmp_path, capsys):
    junk = tmp_path / "in.png"
    junk.write_text("not a picture")
    assert main(["generate", str(tiny_artifact), "--task", "sepia", "--image", str(junk),
                 "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "not a readable image file" in err and "image image" not in err


def test_litert_artifact_refuses_the_qnn_executor(tmp_path, capsys):
    """`--executor qnn-htp` on a TFLite artifact silently ran LiteRT; the onnx-qdq artifact refuses it."""
    pytest.importorskip("ai_edge_litert")
    art = tmp_path / "np"
    assert main(["compile", "-q", "--target", "neuropilot", "-o", str(art)]) == 0
    feeds = _feeds(tmp_path / "feeds.npz")
    assert main(["run", str(art), "--task", "sepia", "--inputs", str(feeds), "-o", str(tmp_path / "r.npz"),
                 "--executor", "qnn-htp"]) == 2
    assert "cannot run this LiteRT artifact" in capsys.readouterr().err
    assert not (tmp_path / "r.npz").exists()
