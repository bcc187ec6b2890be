"""Regenerate quadc/data/tiny_unet.onnx and tiny_vae_{encoder,decoder}.onnx: the bundled default U-Net and
VAE, exported from the trained weights.

Usage: ``python scripts/make_bundled_model.py [--check]``. The weights are the diffusers folders
``quadc/data/tiny_sd/unet`` and ``tiny_sd/vae`` that ``scripts/train_fixtures.py`` trains (quadc's ``tiny``
configs); the export is ``quadc export``'s code path (:func:`quadc.export.export_unet` and
:func:`quadc.export.components.export_component` with ``weights=`` that folder) and is deterministic, so
running this again rewrites the same bytes; ``--check`` only compares fresh exports with the bundled files.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quadc.export.components import export_component  # noqa: E402
from quadc.export.unet_export import export_unet  # noqa: E402

BUNDLED = ROOT / "quadc" / "data" / "tiny_unet.onnx"
WEIGHTS = ROOT / "quadc" / "data" / "tiny_sd" / "unet"
#: The recipe of the bundled model (besides the weights folder); quadc/data/README.md repeats it.
RECIPE = {"config": "tiny", "exporter": "torchscript", "opset": 17, "batch": 1}
#: The bundled VAE components (file name -> component), exported from ``tiny_sd/vae``.
VAE_FILES = {"tiny_vae_encoder.onnx": "vae-encoder", "tiny_vae_decoder.onnx": "vae-decoder"}


def make(out: Path, weights: Path = WEIGHTS) -> Path:
    """Export the U-Net in the diffusers folder ``weights`` with the bundled model's recipe to ``out``."""
    return export_unet(out=out, weights=str(weights), progress=lambda m: print(f"  {m}", file=sys.stderr),
                       **RECIPE)


def make_vae(out_dir: Path, weights: Path = WEIGHTS.parent) -> list[Path]:
    """Export the bundled VAE encoder and decoder from the diffusers pipeline folder ``weights`` into ``out_dir``."""
    return [export_component(component, config="tiny", weights=str(weights), out=out_dir / name,
                             progress=lambda m: print(f"  {m}", file=sys.stderr))
            for name, component in VAE_FILES.items()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, verify) the bundled tiny U-Net."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare a fresh export with the bundled file")
    args = parser.parse_args(argv)
    if args.check:
        ok = True
        with tempfile.TemporaryDirectory() as tmp:
            fresh = [make(Path(tmp) / "tiny_unet.onnx"), *make_vae(Path(tmp))]
            for path in fresh:
                bundled = BUNDLED.parent / path.name
                same = bundled.is_file() and _sha(path) == _sha(bundled)
                ok &= same
                print(f"{bundled}: {'up to date' if same else 'DIFFERS from a fresh export'}")
        return 0 if ok else 1
    for path in [make(BUNDLED), *make_vae(BUNDLED.parent)]:
        print(f"wrote {path} ({path.stat().st_size} bytes, sha256 {_sha(path)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
