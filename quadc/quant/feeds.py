"""Calibration feeds for a U-Net graph's inputs: synthetic ones spread over few-step sampler schedules, or
``.npz`` files recorded from a real pipeline.

A feed is one ``{input name: array}`` dict for the U-Net inputs ``sample`` ``[B, 4, H, W]``, ``timestep``
``[B]`` (or a scalar) and ``encoder_hidden_states`` ``[B, T, D]``. LoRA slot inputs (``*.lora_down`` /
``*.lora_up``) are not part of a feed: :func:`quadc.quant.calibrate.calibrate` binds them per task.

:func:`random_feeds` makes feeds that look like what the U-Net sees while sampling with the few-step
samplers QUAD deploys (LCM 4 steps, Euler-discrete 4 steps, and an 8-step DDIM-style schedule standing
in for OLSS, whose learned schedule is not public):

* **timesteps**: the union of the three schedules (computed in numpy by :func:`schedule_timesteps`,
  matching diffusers' ``LCMScheduler`` / ``EulerDiscreteScheduler`` / ``DDIMScheduler`` with Stable
  Diffusion 1.5's ``scaled_linear`` betas 0.00085..0.012 and ``steps_offset=1``), sorted from noisiest
  to cleanest; feed ``i`` of ``n`` takes evenly spaced entries of that list, so even 4 feeds span it.
* **sample**: the model input at timestep ``t``. In the variance-preserving (DDPM/LCM) form the model
  sees ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; Euler-discrete keeps ``x0 + sigma_t eps`` and
  divides by ``sqrt(sigma_t^2 + 1)`` in ``scale_model_input``, which is the same tensor since
  ``sigma_t^2 = (1 - abar_t) / abar_t``. ``eps ~ N(0, 1)`` and ``x0`` is a spatially smooth
  unit-variance stand-in for a VAE latent (scaled by 0.18215, SD latents have about unit std).
* **encoder_hidden_states**: CLIP-like text embeddings: zero-mean tokens with a fixed per-channel scale
  profile (a few outlier channels about 6x larger, as in CLIP ViT-L/14's last hidden state) and a fixed,
  prompt-independent first (BOS) token about 3x larger. The profile comes from a fixed seed (it is a
  property of the "text encoder"); the tokens from ``seed``.

Everything is numpy; this module imports neither torch nor diffusers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quadc.errors import QuadcError
from quadc.graph_inputs import concrete_shape, input_specs, random_inputs
from quadc.unet_inputs import is_lora_input, unet_input_roles

__all__ = [
    "SCHEDULES",
    "SD15_BETA_END",
    "SD15_BETA_START",
    "SD15_TRAIN_STEPS",
    "alphas_cumprod",
    "calibration_timesteps",
    "noise_sigma",
    "npz_feeds",
    "random_feeds",
    "read_npz",
    "schedule_timesteps",
]

#: Stable Diffusion 1.5's training schedule (``scaled_linear`` betas).
SD15_BETA_START = 0.00085
SD15_BETA_END = 0.012
SD15_TRAIN_STEPS = 1000
#: SD1.5's scheduler config sets ``steps_offset: 1`` (used by "leading" spacing).
SD15_STEPS_OFFSET = 1
#: (schedule name, steps) of the samplers the QUAD paper deploys; "ddim" 8 steps stands in for OLSS.
SCHEDULES: tuple[tuple[str, int], ...] = (("lcm", 4), ("euler", 4), ("ddim", 8))
#: Name aliases accepted by :func:`schedule_timesteps`.
_ALIASES = {"lcm": "lcm", "euler": "euler", "euler-discrete": "euler", "euler_discrete": "euler", "ed": "euler",
            "ddim": "ddim", "olss": "ddim"}
_SPACINGS = ("leading", "linspace", "trailing")
#: LCM's distillation schedule length (diffusers' ``original_inference_steps`` default).
LCM_ORIGINAL_STEPS = 50
#: SD1.5 latents (after the VAE scaling factor) and CLIP-L/14 hidden states; used for symbolic dims.
_DEFAULT_DIMS = {"batch": 1, "channels": 4, "height": 64, "width": 64, "tokens": 77, "embed": 768}


# --------------------------------------------------------------------------------------------- schedules
def alphas_cumprod(beta_start: float = SD15_BETA_START, beta_end: float = SD15_BETA_END,
                   train_steps: int = SD15_TRAIN_STEPS) -> np.ndarray:
    """``abar_t`` for ``t = 0..train_steps-1`` of the ``scaled_linear`` schedule (float64).

    ``betas = linspace(sqrt(beta_start), sqrt(beta_end), train_steps) ** 2``, ``abar = cumprod(1 - betas)``.
    """
    betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), train_steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def noise_sigma(t: Any, abar: np.ndarray | None = None) -> np.ndarray:
    """Euler/k-diffusion noise level ``sigma_t = sqrt((1 - abar_t) / abar_t)``, linearly interpolated at
    fractional ``t`` the way ``EulerDiscreteScheduler`` does (``np.interp`` over the integer steps)."""
    ab = alphas_cumprod() if abar is None else abar
    sigmas = np.sqrt((1.0 - ab) / ab)
    return np.interp(np.asarray(t, dtype=np.float64), np.arange(len(sigmas)), sigmas)


def schedule_timesteps(name: str, steps: int, *, spacing: str = "leading",
                       train_steps: int = SD15_TRAIN_STEPS, steps_offset: int = SD15_STEPS_OFFSET,
                       original_steps: int = LCM_ORIGINAL_STEPS) -> np.ndarray:
    """The timesteps (descending, float64) a diffusers sampler visits in ``steps`` steps.

    * ``"lcm"``: ``LCMScheduler``: the distillation schedule ``k*i - 1`` (``k = train_steps // original_steps``,
      ``i = 1..original_steps``), reversed, at ``floor(linspace(0, original_steps, steps, endpoint=False))``
      (``spacing`` does not apply). 4 steps: 999, 759, 499, 259.
    * ``"euler"`` (``EulerDiscreteScheduler``) and ``"ddim"`` / ``"olss"`` (``DDIMScheduler``, the 8-step
      stand-in for OLSS) share the spacing rules of diffusers:

      - ``leading`` (SD1.5's PNDM config, ``steps_offset=1``): ``arange(steps) * (train_steps // steps)``
        reversed, plus ``steps_offset``. Euler 4 steps: 751, 501, 251, 1;
      - ``linspace``: ``linspace(0, train_steps - 1, steps)`` reversed (rounded for DDIM, not for Euler);
      - ``trailing``: ``round(arange(train_steps, 0, -train_steps / steps)) - 1``.
    """
    key = _ALIASES.get(str(name).lower())
    if key is None:
        raise QuadcError(f"unknown sampler schedule '{name}'; use one of lcm, euler, ddim (olss)")
    if not isinstance(steps, int | np.integer) or steps < 1 or steps > train_steps:
        raise QuadcError(f"sampler steps must be an integer in [1, {train_steps}], got {steps!r}")
    steps = int(steps)
    if key == "lcm":
        if steps > original_steps:
            raise QuadcError(f"LCM takes at most {original_steps} steps (its distillation schedule), got {steps}")
        k = train_steps // original_steps
        origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
        idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
        return origin[idx].astype(np.float64)
    if spacing not in _SPACINGS:
        raise QuadcError(f"unknown timestep spacing '{spacing}'; use one of {', '.join(_SPACINGS)}")
    if spacing == "leading":
        ratio = train_steps // steps
        ts = (np.arange(0, steps) * ratio).round()[::-1] + steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, train_steps - 1, steps)[::-1]
        if key == "ddim":
            ts = ts.round()
    else:
        ts = np.round(np.arange(train_steps, 0, -train_steps / steps)) - 1
    return np.ascontiguousarray(ts, dtype=np.float64)


def calibration_timesteps(n: int, schedules: Sequence[tuple[str, int]] = SCHEDULES) -> np.ndarray:
    """``n`` timesteps spread over the union of ``schedules`` (noisiest first).

    The union (with repeats removed) is sorted descending and ``n`` evenly spaced entries are taken; with
    more feeds than distinct timesteps the list is cycled.
    """
    if n < 1:
        raise QuadcError(f"need at least one calibration feed, got {n}")
    pool = np.unique(np.concatenate([schedule_timesteps(name, steps) for name, steps in schedules]))[::-1]
    if n >= len(pool):
        return np.resize(pool, n)
    idx = np.round(np.linspace(0, len(pool) - 1, n)).astype(np.int64)
    return pool[idx]


# ------------------------------------------------------------------------------------------------- feeds
def _smooth_latent(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A unit-variance, spatially correlated stand-in for a clean VAE latent ``[B, C, H, W]``."""
    b, c, h, w = shape
    coarse = rng.standard_normal((b, c, -(-h // 4), -(-w // 4)))
    up = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)[:, :, :h, :w]
    x0 = up + 0.35 * rng.standard_normal(shape) + 0.25 * rng.standard_normal((b, c, 1, 1))
    std = float(x0.std()) or 1.0
    return x0 / std


_COND_PROFILE_SEED = 0x51C1  # fixed: the per-channel profile belongs to the "text encoder", not the feed


def _cond_profile(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel std (a few outlier channels) and the fixed BOS token, for embedding width ``d``."""
    rng = np.random.default_rng(_COND_PROFILE_SEED + d)
    scale = np.exp(0.3 * rng.standard_normal(d))
    outliers = rng.choice(d, size=max(1, d // 100), replace=False)
    scale[outliers] *= 6.0
    scale /= np.sqrt(np.mean(scale**2))  # unit mean square overall
    bos = 3.0 * scale * rng.standard_normal(d)
    return scale, bos


def random_feeds(graph_or_input_specs: Any, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` synthetic feeds for the U-Net inputs of a graph (or ``{name: (shape, dtype)}``); see the module
    docstring for the distributions. Deterministic for a given ``seed``. Symbolic dims default to SD1.5's
    (batch 1, 64x64 latents, 77 tokens, width 768). The roles come from
    :func:`quadc.unet_inputs.unet_input_roles`; any other input that is not a LoRA slot input gets
    :func:`quadc.graph_inputs.random_inputs` values (symbolic dims 1)."""
    if not isinstance(n, int | np.integer) or n < 1:
        raise QuadcError(f"the number of random calibration feeds must be a positive integer, got {n!r}")
    specs = input_specs(graph_or_input_specs)
    roles = unet_input_roles(specs, "calibration feeds")
    s_shape, s_dtype = specs[roles["sample"]]
    t_shape, t_dtype = specs[roles["timestep"]]
    c_shape, c_dtype = specs[roles["encoder_hidden_states"]]
    others = [n for n in specs if n not in roles.values() and not is_lora_input(n)]
    d = _DEFAULT_DIMS
    sample_shape = concrete_shape(s_shape, (d["batch"], d["channels"], d["height"], d["width"]))
    cond_shape = concrete_shape(c_shape, (sample_shape[0], d["tokens"], d["embed"]))
    t_conc = concrete_shape(t_shape, (sample_shape[0],))
    batch = sample_shape[0]
    # One timestep per batch element when the timestep input has one entry per element, else per feed.
    per_elem = batch if int(np.prod(t_conc, dtype=np.int64)) == batch else 1
    abar = alphas_cumprod()
    timesteps = calibration_timesteps(int(n) * per_elem)
    scale, bos = _cond_profile(cond_shape[2])
    rng = np.random.default_rng(seed)
    feeds: list[dict[str, np.ndarray]] = []
    for i in range(int(n)):
        ts = timesteps[i * per_elem:(i + 1) * per_elem]
        ab = np.interp(np.resize(ts, batch), np.arange(len(abar)), abar).reshape(batch, 1, 1, 1)
        x0 = _smooth_latent(rng, sample_shape)
        eps = rng.standard_normal(sample_shape)
        sample = np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * eps
        cond = rng.standard_normal(cond_shape) * scale
        cond[:, 0, :] = bos
        t_arr = np.resize(ts, t_conc).astype(np.float64)
        if np.issubdtype(t_dtype, np.integer):
            t_arr = np.round(t_arr)
        feed = random_inputs(specs, seed=seed + i, names=others)
        feed.update({
            roles["sample"]: sample.astype(s_dtype),
            roles["timestep"]: t_arr.astype(t_dtype),
            roles["encoder_hidden_states"]: cond.astype(c_dtype),
        })
        feeds.append(feed)
    return feeds


def read_npz(path: str | os.PathLike[str], what: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file ``path`` (no pickles); one line naming ``what`` if it is unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as exc:
        raise QuadcError(f"{what} '{path}' is not a readable .npz file ({exc})") from None


def npz_feeds(directory: str | os.PathLike[str], graph_or_input_specs: Any = None) -> list[dict[str, np.ndarray]]:
    """One feed per ``*.npz`` file in ``directory`` (sorted by name).

    With a graph (or input specs) every file must hold each U-Net input (every non-LoRA graph input) with
    a matching shape (symbolic dims match anything); arrays are cast to the input's dtype and other
    arrays in the file are ignored. Without one, each file's arrays are returned as they are. Every
    problem (no folder, no files, missing inputs, wrong shapes) is a QuadcError naming the file.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise QuadcError(f"calibration folder '{folder}' does not exist; pass a folder of .npz files (one per feed)")
    files = sorted(p for p in folder.glob("*.npz") if p.is_file())
    if not files:
        raise QuadcError(
            f"calibration folder '{folder}' has no .npz files; save one feed per file with "
            "numpy.savez(path, sample=..., timestep=..., encoder_hidden_states=...)"
        )
    wanted: dict[str, tuple[list[int | str | None], np.dtype]] | None = None
    if graph_or_input_specs is not None:
        specs = input_specs(graph_or_input_specs)
        wanted = {k: v for k, v in specs.items() if not is_lora_input(k)}
    feeds: list[dict[str, np.ndarray]] = []
    for path in files:
        arrays = read_npz(path, "calibration file")
        if wanted is None:
            feeds.append(arrays)
            continue
        missing = [k for k in wanted if k not in arrays]
        if missing:
            have = ", ".join(sorted(arrays)) or "none"
            raise QuadcError(
                f"calibration file '{path}' lacks the input(s) {', '.join(missing)} (it has: {have}); "
                "save every U-Net input under its graph input name"
            )
        feed: dict[str, np.ndarray] = {}
        for name, (shape, dtype) in wanted.items():
            arr = arrays[name]
            ok = arr.ndim == len(shape) and all(
                not isinstance(d, int | np.integer) or d <= 0 or d == a for d, a in zip(shape, arr.shape, strict=True)
            )
            if not ok:
                raise QuadcError(
                    f"calibration file '{path}': input '{name}' has shape {list(arr.shape)}, the graph expects "
                    f"{list(shape)}; record feeds at the shapes the model was exported with"
                )
            if arr.dtype.kind not in "fiub":
                raise QuadcError(f"calibration file '{path}': input '{name}' has dtype {arr.dtype}, not a number")
            feed[name] = np.ascontiguousarray(arr.astype(dtype, copy=False))
        feeds.append(feed)
    return feeds
