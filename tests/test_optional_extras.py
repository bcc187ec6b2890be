"""quadc without its optional extras: a user who installs only ``pip install quadc`` (no tflite, qnn or
torch) can list targets and compile to the targets that need none of them, and a target whose extra is
missing is refused in one line. The extras are hidden from a fresh interpreter by an import blocker, so
this runs in CI where every extra is installed.

(Found on a machine without ai-edge-litert: every ``quadc compile`` and ``quadc align`` failed with
"target plugin 'enn' ... failed to import: No module named 'ai_edge_litert'", because the TFLite targets
imported the TFLite schema when their plugin was loaded.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BLOCKED = ("ai_edge_litert", "onnxruntime_qnn", "torch", "diffusers", "peft", "transformers")

RUNNER = f"""
import importlib.abc, sys

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Missing())
from quadc.cli import main
code = main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
assert not leaked, leaked
sys.exit(code)
"""


def quadc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, timeout=600)


def test_targets_lists_the_missing_extras_as_unavailable() -> None:
    r = quadc("targets")
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line and not line.startswith(" ")}
    for name in ("neuropilot", "enn"):
        assert "not available" in lines[name] and "ai-edge-litert" in lines[name], lines[name]
    assert "not available" in lines["qnn"], lines["qnn"]
    for name in ("onnx", "onnx-qdq"):
        assert "not available" not in lines[name], lines[name]


def test_compile_to_onnx_qdq_needs_no_extra(tmp_path: Path) -> None:
    out = tmp_path / "art"
    r = quadc("compile", "--target", "onnx-qdq", "--calib-random", "1", "-q", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").exists()


@pytest.mark.parametrize("target", ["neuropilot", "qnn"])
def test_a_target_without_its_extra_is_refused_in_one_line(tmp_path: Path, target: str) -> None:
    out = tmp_path / "art"
    r = quadc("compile", "--target", target, "-q", "-o", str(out))
    assert r.returncode == 2
    message = r.stderr.strip()
    assert len(message.splitlines()) == 1 and "not available" in message and "Traceback" not in message, message
    assert not out.exists()
