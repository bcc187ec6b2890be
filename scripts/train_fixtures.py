"""Train the bundled fixtures: a tiny VAE, a tiny SD1.5-architecture U-Net and four task LoRAs, on photographs.

Usage: ``python scripts/train_fixtures.py [--out quadc/data] [--scale 1.0] [--report report.json]
[--only TASK]`` (``--only inpaint``: retrain that one LoRA on the U-Net and VAE already in ``--out``)
(needs ``pip install -e '.[export,train]'``). Everything runs on the CPU with one thread, fixed seeds and
``torch.use_deterministic_algorithms(True)``, so the same torch/diffusers/peft versions rewrite the same
bytes. ``--scale 0.05`` shortens every training phase (a smoke run; write it elsewhere with ``--out``).

**Data.** The photographs that ship inside scikit-image (``skimage.data``): the twelve of
:data:`TRAIN_PHOTOS` (grey ones as RGB), each rescaled to a short side of 48, 64 or 96 px and cut into
random 32x32 crops (random flips); ``chelsea`` and the left ``stereo_motorcycle`` view are held out
(:data:`HELD_OUT_PHOTOS`) for every quality number. Pixels are in [-1, 1] as in Stable Diffusion.

**VAE** (diffusers ``AutoencoderKL``, :func:`vae_config`): SD1.5's VAE blocks at 3 levels (x4 down,
4 latent channels: 32x32x3 images <-> 8x8x4 latents, the tiny U-Net's ``sample`` shape), trained as SD's
VAE is, minus its perceptual and adversarial terms: L1 reconstruction of a posterior sample plus
``KL_WEIGHT`` x KL to N(0, I). Its ``scaling_factor`` is set afterwards to 1 / std of the training
latents (how SD's 0.18215 was chosen).

**U-Net** (diffusers ``UNet2DConditionModel``, quadc's ``tiny`` config, so ``tiny_unet.onnx`` keeps its
interface): Stable Diffusion's objective, ``E ||eps - eps_theta(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t,
c)||^2`` with SD1.5's ``scaled_linear`` betas (:func:`quadc.quant.feeds.alphas_cumprod`), ``t`` uniform in
[0, 1000), ``z0`` a posterior sample of the VAE times its scaling factor. The "prompt" ``c`` is a fixed
random embedding per photograph (8 tokens x 32, unit variance; the class of the crop); 10% of the time it
is the null embedding (row 0 of ``embeddings.npy``), as SD drops captions for classifier-free guidance.

**Task LoRAs** (peft ``LoraConfig`` injected into the frozen U-Net with diffusers' ``add_adapter``), each
an image-to-image task with a source and a target image (:data:`TASKS`):

- ``inpaint``: source = the crop with a random rectangle filled with grey; target = the crop. It runs at
  strength 0.5 (not 0.75) and its loss weighs the hole's latent cells 9x (see :data:`INPAINT_PHASE`).
- ``edges_to_image``: source = Sobel edge magnitude of the crop (``skimage.filters.sobel``), white on
  black; target = the crop.
- ``sepia``: source = the crop; target = a sepia tone with a contrast S-curve (a colour/tone transform).
- ``background_removal``: source = an elliptical cut-out of a photo pasted on a texture photo (brick,
  grass, gravel); target = the same cut-out on white.

The conditioning goes through the **latent input** (SDEdit-style img2img): sampling starts from the
source's latent noised to the first timestep of the sampler's schedule at or below ``STRENGTH`` x 1000,
with the class embedding of the source photo as the prompt. The LoRA is trained on two kinds of
examples, half each: *start* examples, ``x_t`` = the noised **source** latent at ``t`` in
[``START_T_MIN``, ``STRENGTH`` x 1000), whose target noise is the one that makes the model's x0-prediction
the **target** latent, ``eps* = (x_t - sqrt(abar_t) z_target) / sqrt(1 - abar_t)``; and *continue*
examples, the ordinary SD objective on the noised target latent at any ``t`` (the later sampler steps see
a noised estimate of the target). The base U-Net and VAE stay frozen.

**Outputs** under ``--out`` (quadc/data by default): ``tiny_sd/unet`` and ``tiny_sd/vae`` (diffusers
folders, float32 safetensors), ``tiny_unet.onnx`` (exported from ``tiny_sd/unet`` by
``scripts/make_bundled_model.py``, i.e. ``quadc export``'s code path), ``loras/<task>`` in three formats
(peft directory, diffusers safetensors, kohya fp16), ``demo/`` (an example source image per task, the
inpainting mask, ``embeddings.npy``) and ``fixtures.json`` (what the runtime needs to use them). The
quality numbers (VAE PSNR and U-Net denoising loss on held-out photos, each task's loss with and
without its LoRA, LoRA effect sizes and weight statistics) go to ``--report`` and stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import make_bundled_model  # noqa: E402

from quadc.export.configs import TEXT_TOKENS, get_config  # noqa: E402
from quadc.quant.feeds import alphas_cumprod  # noqa: E402

TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                "camera", "coins", "moon", "brick", "grass", "gravel")
HELD_OUT_PHOTOS = ("chelsea", "motorcycle")
#: Texture photos: the backgrounds of ``background_removal`` (its foregrounds are the other photos).
TEXTURES = ("brick", "grass", "gravel")
IMAGE = 32
LATENT = get_config("tiny")["sample_size"]
TOKENS, EMBED = TEXT_TOKENS["tiny"], get_config("tiny")["cross_attention_dim"]
SHORT_SIDES = (48, 64, 96)
CROPS_PER_PHOTO = 128
HELD_OUT_CROPS = 64
KL_WEIGHT = 1e-6
NULL_PROMPT_P = 0.1
STRENGTH = 0.75
START_T_MIN = 250
TRAIN_T = 1000
SEED = 0


@dataclass(frozen=True)
class Phase:
    """Steps, batch size and peak learning rate of one training phase (cosine decay, short warm-up)."""

    steps: int
    batch: int
    lr: float


VAE_PHASE = Phase(steps=1000, batch=16, lr=2e-3)
UNET_PHASE = Phase(steps=1200, batch=32, lr=2e-3)
LORA_PHASE = Phase(steps=300, batch=32, lr=3e-3)


@dataclass(frozen=True)
class TaskSpec:
    """A task LoRA: its peft target modules, rank and alpha, and the file format it ships in."""

    name: str
    modules: tuple[str, ...]
    rank: int
    alpha: float
    fmt: str  # "peft" (directory), "diffusers" or "kohya" (fp16) safetensors
    seed: int
    #: img2img strength the task runs at: its *start* examples have ``t`` in [``START_T_MIN``, strength x 1000)
    strength: float = STRENGTH
    #: the task's own training phase (default :data:`LORA_PHASE`)
    phase: Phase | None = None
    #: extra loss weight on the latent cells of the task's mask (0: every cell weighs 1)
    mask_weight: float = 0.0
    #: lowest timestep of the task's *start* examples
    start_t_min: int = START_T_MIN
    #: share of *start* examples in a batch (the rest are *continue* examples)
    start_share: float = 0.5


#: ``inpaint`` runs at strength 0.5: at 0.75 the base model with the legacy mask blending (the runtime keeps the
#: unmasked region on the noised source) already fills the grey hole from its surroundings, so no LoRA can
#: look different; at 0.5 the base model keeps the grey patch, and the LoRA learns to replace it (the hole's
#: latent cells weigh 1 + 8 in its loss, as the rest of the picture is copied anyway).
INPAINT_PHASE = Phase(steps=600, batch=32, lr=3e-3)

TASKS = (
    TaskSpec("inpaint", ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"), 8, 16.0, "peft", 101,
             strength=0.5, phase=INPAINT_PHASE, mask_weight=8.0, start_share=0.75),
    TaskSpec("edges_to_image", ("conv_in", "conv1", "conv2", "proj_in", "proj_out"), 8, 4.0, "diffusers", 102),
    TaskSpec("sepia", ("attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2", "conv_out"), 4, 4.0,
             "kohya", 103),
    TaskSpec("background_removal", ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
                                    "proj_out", "conv_shortcut"), 16, 16.0, "diffusers", 104),
)


def setup_torch(threads: int = 1) -> Any:
    """Deterministic single-process torch: ``threads`` intra-op threads, deterministic algorithms."""
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return torch


# ---------------------------------------------------------------------------------------------------- data
def load_photo(name: str) -> np.ndarray:
    """A photograph of ``skimage.data`` as float32 RGB in [0, 1] (grey ones repeated to 3 channels)."""
    from skimage import data, img_as_float32

    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    img = img_as_float32(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def rescaled(img: np.ndarray) -> list[np.ndarray]:
    """``img`` at each short side of :data:`SHORT_SIDES` (anti-aliased)."""
    from skimage.transform import rescale

    short = min(img.shape[:2])
    return [rescale(img, s / short, channel_axis=2, anti_aliasing=True, order=1).astype(np.float32)
            for s in SHORT_SIDES]


def random_crops(img: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random 32x32 crops of ``img`` at random scales, randomly flipped: ``[n, 32, 32, 3]``."""
    scales = rescaled(img)
    out = np.empty((n, IMAGE, IMAGE, 3), dtype=np.float32)
    for i in range(n):
        s = scales[int(rng.integers(len(scales)))]
        y = int(rng.integers(s.shape[0] - IMAGE + 1))
        x = int(rng.integers(s.shape[1] - IMAGE + 1))
        crop = s[y:y + IMAGE, x:x + IMAGE]
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


@dataclass
class CropSet:
    """Crops in [0, 1] (``[n, 32, 32, 3]``) and the class index of each (1-based; 0 is the null prompt)."""

    images: np.ndarray
    classes: np.ndarray
    photos: np.ndarray  # name of the source photo of each crop


def crop_set(photos: Sequence[str], per_photo: int, seed: int, first_class: int = 1) -> CropSet:
    """``per_photo`` crops of each photo; photo ``i`` is class ``first_class + i``."""
    rng = np.random.default_rng(seed)
    images, classes, names = [], [], []
    for i, name in enumerate(photos):
        images.append(random_crops(load_photo(name), per_photo, rng))
        classes += [first_class + i] * per_photo
        names += [name] * per_photo
    return CropSet(np.concatenate(images), np.asarray(classes, dtype=np.int64), np.asarray(names))


def prompt_embeddings(n_classes: int, seed: int = SEED) -> np.ndarray:
    """Fixed random unit-variance prompts ``[1 + n_classes, TOKENS, EMBED]``; row 0 is the null prompt."""
    return np.random.default_rng(seed + 7).standard_normal((1 + n_classes, TOKENS, EMBED)).astype(np.float32)


# ------------------------------------------------------------------------------------------ task transforms
def rect_masks(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` masks ``[n, 32, 32]`` (1 = to fill): one rectangle of 10..18 px sides each."""
    masks = np.zeros((n, IMAGE, IMAGE), dtype=np.float32)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(10, 19, size=2))
        y, x = int(rng.integers(IMAGE - h + 1)), int(rng.integers(IMAGE - w + 1))
        masks[i, y:y + h, x:x + w] = 1.0
    return masks


def sobel_edges(images: np.ndarray) -> np.ndarray:
    """White-on-black Sobel edge magnitude of each image's grey level, as RGB in [0, 1]."""
    from skimage.color import rgb2gray
    from skimage.filters import sobel

    edges = np.stack([sobel(rgb2gray(img)) for img in images]).astype(np.float32)
    edges = np.clip(edges * 4.0, 0.0, 1.0)
    return np.repeat(edges[..., None], 3, axis=3)


SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float32)


def sepia_tone(images: np.ndarray) -> np.ndarray:
    """Sepia colour matrix, then a contrast S-curve (smoothstep), in [0, 1]."""
    toned = np.clip(images @ SEPIA.T, 0.0, 1.0)
    return (toned * toned * (3.0 - 2.0 * toned)).astype(np.float32)


def ellipse_masks(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` filled ellipses ``[n, 32, 32]`` (1 = foreground), random centre, axes and angle."""
    yy, xx = np.mgrid[0:IMAGE, 0:IMAGE].astype(np.float32)
    masks = np.empty((n, IMAGE, IMAGE), dtype=np.float32)
    for i in range(n):
        cy, cx = rng.uniform(11, 21, size=2)
        a, b = rng.uniform(6, 13, size=2)
        th = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(th) + (yy - cy) * math.sin(th)
        v = -(xx - cx) * math.sin(th) + (yy - cy) * math.cos(th)
        masks[i] = ((u / a) ** 2 + (v / b) ** 2 <= 1.0).astype(np.float32)
    return masks


@dataclass
class TaskPairs:
    """Source and target images in [0, 1] of one task, the prompt class of each pair, and any masks."""

    source: np.ndarray
    target: np.ndarray
    classes: np.ndarray
    masks: np.ndarray | None = None


def task_pairs(task: str, crops: CropSet, textures: np.ndarray, seed: int) -> TaskPairs:
    """Source/target pairs of ``task`` built from ``crops`` (``textures``: background crops)."""
    rng = np.random.default_rng(seed)
    imgs = crops.images
    if task == "inpaint":
        m = rect_masks(len(imgs), rng)
        src = imgs * (1.0 - m[..., None]) + 0.5 * m[..., None]
        return TaskPairs(src.astype(np.float32), imgs, crops.classes, m)
    if task == "edges_to_image":
        return TaskPairs(sobel_edges(imgs), imgs, crops.classes)
    if task == "sepia":
        return TaskPairs(imgs, sepia_tone(imgs), crops.classes)
    if task == "background_removal":
        keep = ~np.isin(crops.photos, TEXTURES)
        fg, classes = imgs[keep], crops.classes[keep]
        m = ellipse_masks(len(fg), rng)[..., None]
        bg = textures[rng.integers(len(textures), size=len(fg))]
        return TaskPairs((fg * m + bg * (1 - m)).astype(np.float32), (fg * m + (1 - m)).astype(np.float32),
                         classes, m[..., 0])
    raise ValueError(f"unknown task {task}")


def to_tensor(images: np.ndarray) -> Any:
    """``[n, H, W, 3]`` in [0, 1] -> torch ``[n, 3, H, W]`` in [-1, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2) * 2.0 - 1.0))


# --------------------------------------------------------------------------------------------------- models
def vae_config() -> dict[str, Any]:
    """The tiny SD1.5-like ``AutoencoderKL`` config: 3 levels (x4 down), 4 latent channels, mid attention."""
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 64], "layers_per_block": 1, "norm_num_groups": 8,
        "act_fn": "silu", "sample_size": IMAGE, "scaling_factor": 1.0,
    }


def make_vae(seed: int = SEED) -> Any:
    """A freshly initialized tiny VAE (``torch.manual_seed(seed)`` first)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**vae_config())


def make_unet(seed: int = SEED) -> Any:
    """A freshly initialized tiny U-Net (quadc's ``tiny`` config; ``torch.manual_seed(seed)`` first)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**get_config("tiny"))


def _schedule(opt: Any, phase: Phase) -> Any:
    import torch

    warm = max(1, phase.steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, phase.steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _loop(params: list[Any], phase: Phase, loss_fn: Callable[[Any, int], Any], label: str,
          seed: int) -> list[float]:
    """AdamW over ``params`` for ``phase.steps`` steps of ``loss_fn(generator, step)``; returns the losses."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=phase.lr, weight_decay=0.0)
    sched = _schedule(opt, phase)
    losses: list[float] = []
    t0 = time.process_time()
    for step in range(phase.steps):
        loss = loss_fn(gen, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, phase.steps // 6) == 0 or step + 1 == phase.steps:
            recent = float(np.mean(losses[-max(1, phase.steps // 6):]))
            print(f"  {label} step {step + 1}/{phase.steps}  loss {recent:.4f}  "
                  f"({time.process_time() - t0:.0f} s CPU)", flush=True)
    return losses


def _batch(gen: Any, n: int, size: int) -> Any:
    import torch

    return torch.randint(0, n, (size,), generator=gen)


# ------------------------------------------------------------------------------------------------------ VAE
def train_vae(vae: Any, images: Any, phase: Phase, seed: int = SEED) -> list[float]:
    """Train ``vae`` on ``images`` (``[n, 3, 32, 32]`` in [-1, 1]): L1 of a posterior sample's decoding
    plus ``KL_WEIGHT`` x KL."""
    vae.train()

    def loss_fn(gen: Any, _: int) -> Any:
        import torch

        x = images[_batch(gen, len(images), phase.batch)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        return (rec - x).abs().mean() + KL_WEIGHT * post.kl().mean()

    losses = _loop(list(vae.parameters()), phase, loss_fn, "vae", seed)
    vae.eval()
    return losses


def encode(vae: Any, images: Any, batch: int = 256) -> tuple[Any, Any]:
    """Posterior mean and std of ``images`` (unscaled latents)."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            post = vae.encode(images[i:i + batch]).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def psnr(a: Any, b: Any) -> float:
    """PSNR (dB) of images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.clamp(-1, 1) - b) ** 2).mean())
    return 10 * math.log10(4.0 / mse)


def vae_psnr(vae: Any, images: Any) -> float:
    """PSNR of decoding the posterior mean of ``images``."""
    import torch

    with torch.no_grad():
        mean, _ = encode(vae, images)
        return psnr(vae.decode(mean).sample, images)


# ---------------------------------------------------------------------------------------------------- U-Net
class Noiser:
    """SD1.5's forward process on latents: ``x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps``."""

    def __init__(self) -> None:
        import torch

        self.abar = torch.from_numpy(alphas_cumprod().astype(np.float32))

    def coefs(self, t: Any) -> tuple[Any, Any]:
        ab = self.abar[t].view(-1, 1, 1, 1)
        return ab.sqrt(), (1 - ab).sqrt()


def sample_latents(mean: Any, std: Any, idx: Any, scale: float, gen: Any) -> Any:
    """Scaled posterior samples ``scale * (mean + std * n)`` of the latents at ``idx``."""
    import torch

    m = mean[idx]
    return scale * (m + std[idx] * torch.randn(m.shape, generator=gen))


def train_unet(unet: Any, mean: Any, std: Any, classes: Any, embeds: Any, scale: float, phase: Phase,
               seed: int = SEED) -> list[float]:
    """Train ``unet`` with SD's noise-prediction loss on the VAE latents (``mean``/``std`` unscaled)."""
    import torch

    noiser = Noiser()
    unet.train()

    def loss_fn(gen: Any, _: int) -> Any:
        idx = _batch(gen, len(mean), phase.batch)
        z0 = sample_latents(mean, std, idx, scale, gen)
        t = torch.randint(0, TRAIN_T, (phase.batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a, s = noiser.coefs(t)
        cls = torch.where(torch.rand(phase.batch, generator=gen) < NULL_PROMPT_P, 0, classes[idx])
        pred = unet(a * z0 + s * eps, t, embeds[cls]).sample
        return ((pred - eps) ** 2).mean()

    losses = _loop([p for p in unet.parameters() if p.requires_grad], phase, loss_fn, "unet", seed)
    unet.eval()
    return losses


def eval_timesteps() -> Any:
    """The timesteps of every evaluation: 50, 150, ..., 950."""
    import torch

    return torch.arange(50, TRAIN_T, 100)


def denoising_loss(unet: Any, z0: Any, cond: Any, seed: int = 1234) -> float:
    """Mean noise-prediction MSE of ``unet`` on scaled latents ``z0`` over :func:`eval_timesteps`."""
    import torch

    noiser = Noiser()
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    ts = eval_timesteps()
    with torch.no_grad():
        for t in ts:
            eps = torch.randn(z0.shape, generator=gen)
            tt = torch.full((len(z0),), int(t))
            a, s = noiser.coefs(tt)
            total += float(((unet(a * z0 + s * eps, tt, cond).sample - eps) ** 2).mean())
    return total / len(ts)


# ---------------------------------------------------------------------------------------------------- LoRAs
def add_lora(unet: Any, spec: TaskSpec) -> None:
    """Inject ``spec``'s peft LoRA (adapter name = task) into ``unet``; only its tensors train."""
    import torch
    from peft import LoraConfig

    unet.requires_grad_(False)
    torch.manual_seed(spec.seed)
    unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.modules),
                                init_lora_weights=True), adapter_name=spec.name)
    unet.set_adapter(spec.name)


def task_loss(unet: Any, zs: Any, zt: Any, cond: Any, t: Any, eps: Any, start: Any, weight: Any = None) -> Any:
    """The task objective on one batch (see the module docstring): per example, a *start* example
    (noised source, target noise that points at the target latent) where ``start`` is true, else a
    *continue* example (noised target, ordinary SD loss); ``weight`` (``[n, 1, h, w]``) weighs latent cells."""
    noiser = Noiser()
    a, s = noiser.coefs(t)
    sel = start.view(-1, 1, 1, 1)
    x_t = a * (sel * zs + (~sel) * zt) + s * eps
    target = (x_t - a * zt) / s
    if weight is None:
        return ((unet(x_t, t, cond).sample - target) ** 2).mean()
    return (((unet(x_t, t, cond).sample - target) ** 2) * weight).mean() / weight.mean()


def task_batch(n: int, size: int, gen: Any, strength: float = STRENGTH, start_t_min: int = START_T_MIN,
               start_share: float = 0.5) -> tuple[Any, Any, Any]:
    """Indices, timesteps and the start/continue split of one task batch."""
    import torch

    idx = _batch(gen, n, size)
    start = torch.rand(size, generator=gen) < start_share
    t_start = torch.randint(start_t_min, int(strength * TRAIN_T), (size,), generator=gen)
    t_cont = torch.randint(0, TRAIN_T, (size,), generator=gen)
    return idx, torch.where(start, t_start, t_cont), start


def train_lora(unet: Any, src: tuple[Any, Any], tgt: tuple[Any, Any], classes: Any, embeds: Any,
               scale: float, phase: Phase, seed: int, strength: float = STRENGTH,
               weights: Any = None, start_t_min: int = START_T_MIN, start_share: float = 0.5) -> list[float]:
    """Train the active adapter of ``unet`` on latent pairs (``(mean, std)`` of source and target);
    ``weights``: per pair a loss weight per latent cell (``[n, 1, h, w]``), or None."""
    import torch

    params = [p for p in unet.parameters() if p.requires_grad]

    def loss_fn(gen: Any, _: int) -> Any:
        idx, t, start = task_batch(len(src[0]), phase.batch, gen, strength, start_t_min, start_share)
        zs = sample_latents(*src, idx, scale, gen)
        zt = sample_latents(*tgt, idx, scale, gen)
        eps = torch.randn(zs.shape, generator=gen)
        w = None if weights is None else weights[idx]
        return task_loss(unet, zs, zt, embeds[classes[idx]], t, eps, start, w)

    unet.train()
    losses = _loop(params, phase, loss_fn, "lora", seed)
    unet.eval()
    return losses


def eval_task_loss(unet: Any, zs: Any, zt: Any, cond: Any, seed: int = 4321,
                   strength: float = STRENGTH) -> dict[str, float]:
    """Task loss on held-out pairs (scaled posterior means), start and continue examples separately,
    over the task timesteps (start: ``START_T_MIN..strength*1000``; continue: :func:`eval_timesteps`)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for kind, ts in (("start", torch.arange(START_T_MIN, int(strength * TRAIN_T), 100)),
                         ("continue", eval_timesteps())):
            total = 0.0
            for t in ts:
                eps = torch.randn(zs.shape, generator=gen)
                start = torch.full((len(zs),), kind == "start")
                total += float(task_loss(unet, zs, zt, cond, torch.full((len(zs),), int(t)), eps, start))
            out[kind] = total / len(ts)
    return out


def lora_from_peft(unet: Any, spec: TaskSpec) -> Any:
    """The trained adapter as a quadc :class:`~quadc.lora.model.LoRA` (factors in float32)."""
    from peft.utils import get_peft_model_state_dict

    from quadc.lora.model import LoRA, LoRALayer

    state = get_peft_model_state_dict(unet, adapter_name=spec.name)
    layers = {}
    for key in sorted(state):
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        down = state[key].detach().float().numpy().astype(np.float32)
        up = state[key.replace(".lora_A.", ".lora_B.")].detach().float().numpy().astype(np.float32)
        layers[module] = LoRALayer(module=module, up=up, down=down, alpha=spec.alpha, rank=spec.rank)
    return LoRA(name=spec.name, layers=layers, source="scripts/train_fixtures.py", format="trained")


def write_lora(lora: Any, spec: TaskSpec, loras_dir: Path) -> Path:
    """Write ``lora`` in ``spec.fmt``; returns the file or directory."""
    from quadc.testing_lora import write_diffusers, write_kohya, write_peft

    if spec.fmt == "peft":
        return write_peft(lora, loras_dir / spec.name)
    if spec.fmt == "diffusers":
        return write_diffusers(lora, loras_dir / f"{spec.name}.safetensors")
    return write_kohya(lora, loras_dir / f"{spec.name}.safetensors", dtype="float16")


def weight_stats(lora: Any) -> dict[str, float]:
    """Std and excess kurtosis of every ``scale * up @ down`` entry, and of the raw factors, of ``lora``."""
    from scipy.stats import kurtosis

    delta = np.concatenate([layer.delta().ravel() for layer in lora.layers.values()])
    ups = np.concatenate([layer.up.ravel() for layer in lora.layers.values()])
    downs = np.concatenate([layer.down.ravel() for layer in lora.layers.values()])
    return {"delta_std": float(delta.std()), "delta_kurtosis": float(kurtosis(delta)),
            "delta_absmax": float(np.abs(delta).max()),
            "up_std": float(ups.std()), "up_kurtosis": float(kurtosis(ups)),
            "down_std": float(downs.std()), "down_kurtosis": float(kurtosis(downs)),
            "layers": len(lora.layers), "parameters": int(ups.size + downs.size)}


# ---------------------------------------------------------------------------------------------- the whole run
def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    arr = image if image.dtype == np.uint8 else np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, optimize=False)


def _scaled(phase: Phase, scale: float) -> Phase:
    return Phase(max(2, round(phase.steps * scale)), phase.batch, phase.lr)


def _effects(unet: Any, specs: Sequence[TaskSpec], feeds: tuple[Any, Any, Any]) -> dict[str, Any]:
    """Per task: RMS of ``out(task) - out(base)`` over RMS of ``out(base)`` on ``feeds``; pairwise cosine
    similarity of the task effects."""
    import torch

    x, t, cond = feeds
    with torch.no_grad():
        unet.disable_adapters()
        base = unet(x, t, cond).sample
        unet.enable_adapters()
        effects = {}
        for spec in specs:
            unet.set_adapter(spec.name)
            effects[spec.name] = (unet(x, t, cond).sample - base).flatten()
    rms = float(base.pow(2).mean().sqrt())
    rel = {k: float(v.pow(2).mean().sqrt()) / rms for k, v in effects.items()}
    names = list(effects)
    cos = {f"{a}|{b}": float(torch.nn.functional.cosine_similarity(effects[a], effects[b], dim=0))
           for i, a in enumerate(names) for b in names[i + 1:]}
    return {"relative_rms": rel, "cosine": cos}


def effect_feeds(z_held: Any, embeds: Any) -> tuple[Any, Any, Any]:
    """The feeds of :func:`_effects`: noised held-out latents over the evaluation timesteps, null prompt."""
    import torch

    gen = torch.Generator().manual_seed(99)
    ts = eval_timesteps().repeat_interleave(2)
    zz = z_held[torch.arange(len(ts)) * 5 % len(z_held)]
    a, s = Noiser().coefs(ts)
    return a * zz + s * torch.randn(zz.shape, generator=gen), ts, embeds[torch.zeros(len(ts), dtype=torch.long)]


def latent_masks(masks: np.ndarray) -> Any:
    """Pixel masks ``[n, 32, 32]`` on the latent grid ``[n, 1, 8, 8]`` (a cell is masked when any pixel is),
    as the runtime's :func:`quadc.pipeline.images.latent_mask`."""
    import torch

    f = IMAGE // LATENT
    cells = masks.reshape(len(masks), LATENT, f, LATENT, f).max(axis=(2, 4))
    return torch.from_numpy(np.ascontiguousarray(cells[:, None], dtype=np.float32))


def train_task(spec: TaskSpec, unet: Any, vae: Any, latent_scale: float, embeds: Any,
               crops: tuple[CropSet, CropSet, np.ndarray, np.ndarray], out: Path,
               scale: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train ``spec``'s LoRA into ``unet`` and write it and its demo files under ``out``; returns its report
    entry and its ``fixtures.json`` entry. ``crops``: training crops, held-out crops, texture crops for
    training and held out."""
    import torch

    train, held, textures, held_textures = crops
    loras_dir, demo = out / "loras", out / "demo"
    pairs = task_pairs(spec.name, train, textures, spec.seed)
    hpairs = task_pairs(spec.name, held, held_textures, spec.seed + 1000)
    src, tgt = encode(vae, to_tensor(pairs.source)), encode(vae, to_tensor(pairs.target))
    hs, ht = (latent_scale * encode(vae, to_tensor(p))[0] for p in (hpairs.source, hpairs.target))
    hcond = embeds[torch.from_numpy(hpairs.classes)]
    add_lora(unet, spec)
    unet.disable_adapters()
    before = eval_task_loss(unet, hs, ht, hcond, strength=spec.strength)
    unet.enable_adapters()
    unet.set_adapter(spec.name)
    print(f" {spec.name} ({spec.fmt}, rank {spec.rank})", flush=True)
    weights = None
    if spec.mask_weight and pairs.masks is not None:
        weights = 1.0 + spec.mask_weight * latent_masks(pairs.masks)
    train_lora(unet, src, tgt, torch.from_numpy(pairs.classes), embeds, latent_scale,
               _scaled(spec.phase or LORA_PHASE, scale), spec.seed, spec.strength, weights, spec.start_t_min,
               spec.start_share)
    after = eval_task_loss(unet, hs, ht, hcond, strength=spec.strength)
    lora = lora_from_peft(unet, spec)
    path = write_lora(lora, spec, loras_dir)
    report = {"format": spec.fmt, "rank": spec.rank, "heldout_loss_base": before, "heldout_loss_lora": after,
              "weights": weight_stats(lora)}
    # the demo example: a held-out source image (and mask), prompt = null (held-out photos have no class)
    k = 3
    _save_png(demo / f"{spec.name}_source.png", hpairs.source[k])
    _save_png(demo / f"{spec.name}_target.png", hpairs.target[k])
    entry = {"lora": str(path.relative_to(out)), "format": spec.fmt, "rank": spec.rank,
             "alpha": spec.alpha, "modules": list(spec.modules), "conditioning": "img2img",
             "strength": spec.strength, "image": f"demo/{spec.name}_source.png",
             "expected": f"demo/{spec.name}_target.png", "prompt_index": 0}
    if spec.name == "inpaint":
        _save_png(demo / "inpaint_mask.png", (hpairs.masks[k] * 255).astype(np.uint8))
        entry["mask"] = "demo/inpaint_mask.png"
    return report, entry


def run(out: Path, scale: float = 1.0, report_path: Path | None = None) -> dict[str, Any]:
    """Train everything, write the fixtures under ``out``, return (and write) the report."""
    torch = setup_torch(1)
    cpu0, wall0 = time.process_time(), time.time()
    report: dict[str, Any] = {"scale": scale}
    print("data: skimage.data photographs", flush=True)
    train = crop_set(TRAIN_PHOTOS, CROPS_PER_PHOTO, SEED)
    held = crop_set(HELD_OUT_PHOTOS, HELD_OUT_CROPS, SEED + 1, first_class=0)
    held.classes[:] = 0  # held-out photos have no class: the null prompt
    embeds = torch.from_numpy(prompt_embeddings(len(TRAIN_PHOTOS)))
    x_train, x_held = to_tensor(train.images), to_tensor(held.images)

    print("VAE", flush=True)
    vae = make_vae()
    report["vae_psnr_untrained_db"] = vae_psnr(vae, x_held)
    train_vae(vae, x_train, _scaled(VAE_PHASE, scale))
    report["vae_psnr_heldout_db"] = vae_psnr(vae, x_held)
    report["vae_psnr_train_db"] = vae_psnr(vae, x_train[::8])
    mean, std = encode(vae, x_train)
    latent_scale = float(1.0 / (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))).std())
    vae.register_to_config(scaling_factor=latent_scale)
    report["vae_scaling_factor"] = latent_scale

    print("U-Net", flush=True)
    unet = make_unet()
    hmean, _ = encode(vae, x_held)
    z_held = latent_scale * hmean
    null = embeds[torch.zeros(len(z_held), dtype=torch.long)]
    report["unet_loss_heldout_untrained"] = denoising_loss(unet, z_held, null)
    classes = torch.from_numpy(train.classes)
    train_unet(unet, mean, std, classes, embeds, latent_scale, _scaled(UNET_PHASE, scale))
    report["unet_loss_heldout"] = denoising_loss(unet, z_held, null)
    report["unet_loss_heldout_zero_prediction"] = 1.0

    out.mkdir(parents=True, exist_ok=True)
    sd_dir = out / "tiny_sd"
    shutil.rmtree(sd_dir, ignore_errors=True)
    unet.save_pretrained(sd_dir / "unet", safe_serialization=True)
    vae.save_pretrained(sd_dir / "vae", safe_serialization=True)

    print("LoRAs", flush=True)
    textures = crop_set(TEXTURES, CROPS_PER_PHOTO, SEED + 2).images
    held_textures = crop_set(TEXTURES, HELD_OUT_CROPS // 2, SEED + 3).images
    loras_dir = out / "loras"
    shutil.rmtree(loras_dir, ignore_errors=True)
    loras_dir.mkdir(parents=True)
    demo = out / "demo"
    shutil.rmtree(demo, ignore_errors=True)
    demo.mkdir(parents=True)
    tasks_json: dict[str, Any] = {}
    report["tasks"] = {}
    for spec in TASKS:
        report["tasks"][spec.name], tasks_json[spec.name] = train_task(
            spec, unet, vae, latent_scale, embeds, (train, held, textures, held_textures), out, scale)

    report["effects"] = _effects(unet, TASKS, effect_feeds(z_held, embeds))

    np.save(demo / "embeddings.npy", embeds.numpy())
    for i, name in enumerate(HELD_OUT_PHOTOS):
        _save_png(demo / f"{name}.png", held.images[i * HELD_OUT_CROPS])
    fixtures = {
        "made_by": "scripts/train_fixtures.py",
        "image_size": IMAGE, "latent_size": LATENT, "latent_channels": 4,
        "vae": "tiny_sd/vae", "unet": "tiny_sd/unet", "unet_onnx": "tiny_unet.onnx",
        "vae_scaling_factor": latent_scale,
        "pixel_range": [-1.0, 1.0],
        "schedule": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                     "num_train_timesteps": TRAIN_T, "prediction_type": "epsilon"},
        "embeddings": "demo/embeddings.npy",
        "prompts": ["<null>", *TRAIN_PHOTOS],
        "tasks": tasks_json,
    }
    (out / "fixtures.json").write_text(json.dumps(fixtures, indent=2) + "\n", encoding="utf-8")

    print("export: tiny_unet.onnx from tiny_sd/unet", flush=True)
    make_bundled_model.make(out / "tiny_unet.onnx", weights=sd_dir / "unet")
    make_bundled_model.make_vae(out, weights=sd_dir)
    report["cpu_s"] = time.process_time() - cpu0
    report["wall_s"] = time.time() - wall0
    report["files"] = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
                       if p.is_file() and p.name != "README.md"}
    text = json.dumps(report, indent=2)
    print(text)
    if report_path is not None:
        report_path.write_text(text + "\n", encoding="utf-8")
    return report


def run_only(out: Path, task: str, scale: float = 1.0, report_path: Path | None = None) -> dict[str, Any]:
    """Retrain the LoRA of ``task`` alone on the U-Net and VAE already under ``out`` (``tiny_sd``), and
    rewrite only its files (LoRA, demo images, its ``fixtures.json`` entry). Each LoRA's training depends
    only on the data, its own seed and the frozen U-Net/VAE, so this writes what a full run writes for it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    specs = {spec.name: spec for spec in TASKS}
    if task not in specs:
        raise SystemExit(f"--only: unknown task {task!r} (tasks: {', '.join(specs)})")
    fixtures_path = out / "fixtures.json"
    if not fixtures_path.is_file():
        raise SystemExit(f"--only needs a full run's output in {out} (no fixtures.json)")
    torch = setup_torch(1)
    cpu0, wall0 = time.process_time(), time.time()
    fixtures = json.loads(fixtures_path.read_text(encoding="utf-8"))
    vae = AutoencoderKL.from_pretrained(str(out / fixtures["vae"]), local_files_only=True).eval()
    unet = UNet2DConditionModel.from_pretrained(str(out / fixtures["unet"]), local_files_only=True).eval()
    latent_scale = float(vae.config.scaling_factor)
    train = crop_set(TRAIN_PHOTOS, CROPS_PER_PHOTO, SEED)
    held = crop_set(HELD_OUT_PHOTOS, HELD_OUT_CROPS, SEED + 1, first_class=0)
    held.classes[:] = 0
    embeds = torch.from_numpy(prompt_embeddings(len(TRAIN_PHOTOS)))
    textures = crop_set(TEXTURES, CROPS_PER_PHOTO, SEED + 2).images
    held_textures = crop_set(TEXTURES, HELD_OUT_CROPS // 2, SEED + 3).images
    spec = specs[task]
    old = out / fixtures["tasks"][task]["lora"]
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink(missing_ok=True)
    entry_report, entry = train_task(spec, unet, vae, latent_scale, embeds,
                                     (train, held, textures, held_textures), out, scale)
    fixtures["tasks"][task] = entry
    fixtures_path.write_text(json.dumps(fixtures, indent=2) + "\n", encoding="utf-8")
    z_held = latent_scale * encode(vae, to_tensor(held.images))[0]
    report = {"scale": scale, "only": task, "tasks": {task: entry_report},
              "effects": _effects(unet, [spec], effect_feeds(z_held, embeds)),
              "cpu_s": time.process_time() - cpu0, "wall_s": time.time() - wall0}
    text = json.dumps(report, indent=2)
    print(text)
    if report_path is not None:
        report_path.write_text(text + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and train."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "quadc" / "data", help="output folder (quadc/data)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every phase's steps (smoke runs)")
    parser.add_argument("--report", type=Path, default=None, help="write the quality report (JSON) here")
    parser.add_argument("--only", metavar="TASK", default=None,
                        help="retrain this task's LoRA alone on the U-Net and VAE already in --out")
    args = parser.parse_args(argv)
    if args.only:
        run_only(args.out, args.only, args.scale, args.report)
    else:
        run(args.out, args.scale, args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
