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
