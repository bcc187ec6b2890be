"""Regenerate the bundled demo LoRAs in quadc/data/loras/ (deterministic; no torch needed).

Three tasks in three formats and ranks, on the bundled tiny U-Net's attach points:

- ``object_removal.safetensors``: kohya/A1111 (fp16), rank 8, attention + LoCon on resnet convs
- ``sketch_to_image.safetensors``: diffusers (``unet.`` prefix), rank 4, attention + feed-forward
- ``stickers/``: peft adapter directory, rank 16, feed-forward + proj_in/proj_out

Weights are random (no trained LoRAs can be downloaded here); their scale is set so each task changes
the U-Net output visibly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from quadc import frontend
from quadc.testing_lora import random_lora, write_diffusers, write_kohya, write_peft

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "quadc" / "data"


def main() -> None:
    _, info = frontend.load(DATA / "tiny_unet.onnx")
    out = DATA / "loras"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    write_kohya(random_lora(info, modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"], rank=8,
                            alpha=4.0, seed=101, scale_std=0.1, name="object_removal"),
                out / "object_removal.safetensors", dtype="float16")
    write_diffusers(random_lora(info, modules=["attn2.to_k", "attn2.to_v", "ff.net.0.proj", "ff.net.2"], rank=4,
                                alpha=4.0, seed=102, scale_std=0.1, name="sketch_to_image"),
                    out / "sketch_to_image.safetensors")
    write_peft(random_lora(info, modules=["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"], rank=16,
                           alpha=8.0, seed=103, scale_std=0.1, name="stickers"), out / "stickers")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(ROOT)}  {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
