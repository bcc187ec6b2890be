"""Regenerate quadc/data/tiny_unet.onnx: the bundled default U-Net, exported from the trained weights.

Usage: ``python scripts/make_bundled_model.py [--check]``. The weights are the diffusers folder
``quadc/data/tiny_sd/unet`` that ``scripts/train_fixtures.py`` trains (quadc's ``tiny`` config); the export
is ``quadc export``'s code path (:func:`quadc.export.export_unet` with ``weights=`` that folder) and is
deterministic, so running this again rewrites the same bytes; ``--check`` only compares a fresh export
with the bundled file.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quadc.export.unet_export import export_unet  # noqa: E402

BUNDLED = ROOT / "quadc" / "data" / "tiny_unet.onnx"
WEIGHTS = ROOT / "quadc" / "data" / "tiny_sd" / "unet"
#: The recipe of the bundled model (besides the weights folder); quadc/data/README.md repeats it.
RECIPE = {"config": "tiny", "exporter": "torchscript", "opset": 17, "batch": 1}


def make(out: Path, weights: Path = WEIGHTS) -> Path:
    """Export the U-Net in the diffusers folder ``weights`` with the bundled model's recipe to ``out``."""
    return export_unet(out=out, weights=str(weights), progress=lambda m: print(f"  {m}", file=sys.stderr),
                       **RECIPE)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, verify) the bundled tiny U-Net."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare a fresh export with the bundled file")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = make(Path(tmp) / "tiny_unet.onnx")
            same = BUNDLED.is_file() and _sha(fresh) == _sha(BUNDLED)
        print(f"{BUNDLED}: {'up to date' if same else 'DIFFERS from a fresh export'}")
        return 0 if same else 1
    make(BUNDLED)
    print(f"wrote {BUNDLED} ({BUNDLED.stat().st_size} bytes, sha256 {_sha(BUNDLED)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
