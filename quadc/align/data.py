"""Task examples for the diffusion loss of ``--level model --data DIR``.

``DIR`` holds, per task, ``DIR/<task>.npz`` or any number of ``DIR/<task>/*.npz`` files, each with:

* ``latents``: the clean target latents ``[N, C, H, W]`` (already multiplied by the VAE's scaling factor);
* ``encoder_hidden_states``: the prompt embeddings ``[N, T, D]`` (or ``[T, D]``, shared by all N);
* optional ``source_latents`` ``[N, C, H, W]``: image-to-image tasks (SDEdit-style) start from the noised
  *source*; the target noise is then the one whose x0-prediction is the target latent;
* optional arrays for any other U-Net input, by graph input name.

An example ``j`` at training step ``k`` draws, from a generator seeded with ``(seed, k, j)``, a timestep
uniformly from the sampler timesteps (:data:`quadc.quant.feeds.SCHEDULES`) and noise ``eps ~ N(0, 1)``,
and makes Stable Diffusion's training pair::

    x_t  = sqrt(abar_t) * z_src + sqrt(1 - abar_t) * eps          (z_src = source_latents, else latents)
    eps* = (x_t - sqrt(abar_t) * latents) / sqrt(1 - abar_t)      (= eps when there is no source)

so the same example gets the same noise on every rank (validation examples use ``k = -1``). Tasks
without files train with the reconstruction loss alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quadc.errors import QuadcError
from quadc.quant.feeds import SCHEDULES, alphas_cumprod, read_npz, schedule_timesteps
from quadc.unet_inputs import is_lora_input, unet_input_roles

__all__ = ["TaskExamples", "task_examples"]


class TaskExamples:
    """One task's examples, cut to the graph's batch size; :meth:`example` makes a training pair."""

    def __init__(self, arrays: list[dict[str, np.ndarray]], specs: Mapping[str, tuple[list[Any], np.dtype]],
                 seed: int = 0) -> None:
        self.roles = unet_input_roles(specs, "task examples")
        self.specs = dict(specs)
        self.seed = int(seed)
        self.items = arrays
        self.abar = alphas_cumprod()
        self.timesteps = np.unique(np.concatenate([schedule_timesteps(n, s) for n, s in SCHEDULES]))

    def __len__(self) -> int:
        return len(self.items)

    def example(self, j: int, step: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``(model inputs, target noise)`` of example ``j`` at training step ``step`` (-1: validation)."""
        item = self.items[j]
        rng = np.random.default_rng([self.seed, step + 1, j])
        t = float(self.timesteps[rng.integers(len(self.timesteps))])
        ab = float(np.interp(t, np.arange(len(self.abar)), self.abar))
        z = item["latents"].astype(np.float64)
        src = item.get("source_latents", item["latents"]).astype(np.float64)
        eps = rng.standard_normal(z.shape)
        x_t = np.sqrt(ab) * src + np.sqrt(1.0 - ab) * eps
        target = (x_t - np.sqrt(ab) * z) / np.sqrt(1.0 - ab)
        sample, timestep, cond = (self.roles[r] for r in ("sample", "timestep", "encoder_hidden_states"))
        t_shape, t_dtype = self.specs[timestep]
        feeds = {k: v for k, v in item.items() if k in self.specs and k not in (sample, timestep, cond)}
        feeds.update({
            sample: x_t.astype(self.specs[sample][1]),
            timestep: np.full([int(d) for d in t_shape], t, dtype=t_dtype),
            cond: item["encoder_hidden_states"].astype(self.specs[cond][1]),
        })
        return feeds, target.astype(np.float32)


def _files(directory: Path, task: str) -> list[Path]:
    single = directory / f"{task}.npz"
    folder = directory / task
    files = [single] if single.is_file() else []
    if folder.is_dir():
        files += sorted(p for p in folder.glob("*.npz") if p.is_file())
    return files


def _split(path: Path, arrays: Mapping[str, np.ndarray], specs: Mapping[str, tuple[list[Any], np.dtype]],
           roles: Mapping[str, str]) -> list[dict[str, np.ndarray]]:
    if "latents" not in arrays or "encoder_hidden_states" not in arrays:
        raise QuadcError(f"task data file '{path}' needs arrays 'latents' [N, C, H, W] and 'encoder_hidden_states' "
                         f"[N, T, D]; it has {', '.join(sorted(arrays)) or 'none'}")
    lat = np.asarray(arrays["latents"], np.float32)
    s_shape = specs[roles["sample"]][0]
    batch = int(s_shape[0]) if isinstance(s_shape[0], int | np.integer) and s_shape[0] > 0 else 1
    if lat.ndim != 4 or any(isinstance(d, int | np.integer) and d > 0 and d != a
                            for d, a in zip(s_shape[1:], lat.shape[1:], strict=True)):
        raise QuadcError(f"task data file '{path}': 'latents' has shape {list(lat.shape)}, the U-Net's sample is "
                         f"{list(s_shape)}; store latents at the model's latent size")
    if lat.shape[0] % batch:
        raise QuadcError(f"task data file '{path}' has {lat.shape[0]} examples, not a multiple of the model's "
                         f"batch size {batch}")
    cond = np.asarray(arrays["encoder_hidden_states"], np.float32)
    if cond.ndim == 2:
        cond = np.broadcast_to(cond, (lat.shape[0], *cond.shape))
    if cond.shape[0] != lat.shape[0]:
        raise QuadcError(f"task data file '{path}': {cond.shape[0]} prompt embeddings for {lat.shape[0]} latents")
    source = arrays.get("source_latents")
    if source is not None and np.shape(source) != lat.shape:
        raise QuadcError(f"task data file '{path}': 'source_latents' has shape {list(np.shape(source))}, "
                         f"'latents' {list(lat.shape)}")
    out = []
    for i in range(0, lat.shape[0], batch):
        item = {"latents": lat[i:i + batch], "encoder_hidden_states": np.ascontiguousarray(cond[i:i + batch])}
        if source is not None:
            item["source_latents"] = np.asarray(source, np.float32)[i:i + batch]
        for k, v in arrays.items():
            if k in specs and k not in roles.values() and not is_lora_input(k):
                item[k] = np.asarray(v)[i:i + batch]
        out.append(item)
    return out


def task_examples(directory: str | os.PathLike[str], task: str, graph: Any, seed: int = 0) -> TaskExamples | None:
    """The examples of ``task`` under ``directory`` (None when it has none); see the module docstring."""
    from quadc.graph_inputs import input_specs

    folder = Path(directory)
    if not folder.is_dir():
        raise QuadcError(f"task data folder '{folder}' does not exist; give a folder with <task>.npz files")
    files = _files(folder, task)
    if not files:
        return None
    specs = {k: v for k, v in input_specs(graph).items() if not is_lora_input(k)}
    roles = unet_input_roles(specs, "task examples")
    items: list[dict[str, np.ndarray]] = []
    for path in files:
        arrays = read_npz(path, "task data file")
        items += _split(path, arrays, specs, roles)
    return TaskExamples(items, specs, seed)
