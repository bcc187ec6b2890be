"""Images in and out of the pipeline: PNG files <-> the VAE's ``[1, 3, H, W]`` tensors in [-1, 1], masks, PSNR."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from quadc.errors import QuadcError


def _open(path: str | os.PathLike[str], what: str):  # noqa: ANN202 - a PIL image
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise QuadcError(f"{path}: no such {what} file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise QuadcError(f"{path}: not a readable {what} file ({exc.__class__.__name__})") from None
    return img


def load_image(path: str | os.PathLike[str], size: tuple[int, int]) -> np.ndarray:
    """The image at ``path`` as RGB resized to ``size`` = (H, W): float32 ``[1, 3, H, W]`` in [-1, 1]."""
    from PIL import Image

    img = _open(path, "image").convert("RGB")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])


def load_mask(path: str | os.PathLike[str], size: tuple[int, int]) -> np.ndarray:
    """The mask at ``path`` (white = to fill) resized to ``size``: float32 ``[H, W]`` of 0 and 1."""
    from PIL import Image

    img = _open(path, "mask").convert("L")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.NEAREST)
    return (np.asarray(img, dtype=np.float32) >= 128).astype(np.float32)


def latent_mask(mask: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """A pixel mask ``[H, W]`` on the latent grid ``[1, 1, h, w]``: a latent cell is to fill when any of its
    pixels is."""
    h, w = latent_hw
    fy, fx = mask.shape[0] // h, mask.shape[1] // w
    if fy * h != mask.shape[0] or fx * w != mask.shape[1]:
        raise QuadcError(f"mask {list(mask.shape)} does not tile the latent grid {h}x{w}")
    return mask.reshape(h, fy, w, fx).max(axis=(1, 3))[None, None].astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A decoded ``[1, 3, H, W]`` image in [-1, 1] as uint8 ``H x W x 3`` (clipped, rounded)."""
    arr = np.clip((np.asarray(image, dtype=np.float32)[0].transpose(1, 2, 0) + 1.0) * 127.5, 0.0, 255.0)
    return np.round(arr).astype(np.uint8)


def save_png(image: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a uint8 ``H x W x 3`` image as PNG (through a temporary file); returns the path."""
    from PIL import Image

    from quadc.paths import replaced_atomically

    out = Path(path)
    with replaced_atomically(out) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images (inf when equal)."""
    if a.shape != b.shape:
        raise QuadcError(f"images of shapes {a.shape} and {b.shape} cannot be compared")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
