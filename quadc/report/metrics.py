"""Image and tensor metrics of the report: PSNR and SSIM of decoded uint8 images (scikit-image) and the
SQNR of latents (:func:`quadc.quant.affine.sqnr_db`)."""

from __future__ import annotations

import numpy as np

from quadc.errors import QuadcError
from quadc.quant.affine import sqnr_db


def _images(ref: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, test = np.asarray(ref), np.asarray(test)
    if ref.shape != test.shape or ref.ndim != 3 or ref.shape[2] != 3:
        raise QuadcError(f"image metrics need two HxWx3 images of one shape, got {ref.shape} and {test.shape}")
    return ref, test


def psnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB of two uint8 HxWx3 images (data range 255); ``inf`` when they are equal."""
    from skimage.metrics import peak_signal_noise_ratio

    ref, test = _images(ref, test)
    if np.array_equal(ref, test):
        return float("inf")
    return float(peak_signal_noise_ratio(ref, test, data_range=255))


def ssim(ref: np.ndarray, test: np.ndarray) -> float:
    """Mean structural similarity of two uint8 HxWx3 images (per channel, data range 255; the window
    shrinks to the image for images under 7 pixels a side)."""
    from skimage.metrics import structural_similarity

    ref, test = _images(ref, test)
    side = min(ref.shape[0], ref.shape[1])
    win = min(7, side if side % 2 else side - 1)
    return float(structural_similarity(ref, test, data_range=255, channel_axis=2, win_size=win))


def latent_sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """SQNR in dB of the quantized pipeline's final latents against the float pipeline's."""
    return sqnr_db(ref, test)
