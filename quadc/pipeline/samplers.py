"""Few-step samplers in numpy (no torch at runtime): Euler Discrete, LCM, DDIM and DPM-Solver++ (2M).

Each reproduces the diffusers scheduler of the same name built from Stable Diffusion 1.5's scheduler config
(``scaled_linear`` betas 0.00085..0.012, 1000 training steps, ``steps_offset=1``, ``set_alpha_to_one=False``,
epsilon prediction; every other setting at the class default, as ``from_pretrained`` of SD1.5's
``scheduler_config.json`` gives it), and the img2img pipelines' ``strength``:

=========  ==================================  ================================================================
name       diffusers class                     timesteps (4 steps, strength 1)
=========  ==================================  ================================================================
``euler``  ``EulerDiscreteScheduler``          ``linspace`` spacing: 999, 666, 333, 0 (sigmas, final 0)
``lcm``    ``LCMScheduler``                    the 50-step distillation grid: 999, 759, 499, 259
``ddim``   ``DDIMScheduler`` (eta 0)           ``leading`` spacing + offset 1: 751, 501, 251, 1
``dpmpp``  ``DPMSolverMultistepScheduler``     ``linspace``: 999, 749, 500, 250; 2nd order, 1st on the last step
=========  ==================================  ================================================================

OLSS (Duan et al. 2023) is not implemented: it fits a linear combination of earlier model outputs per
step from a many-step teacher trajectory of the very model it serves, and diffusers has no reference
scheduler to test it against. DPM-Solver++ 2M, another multistep solver that reuses earlier outputs,
stands in for it (``--sampler dpmpp``).

``strength < 1`` (img2img) runs the tail of the schedule as diffusers' img2img pipelines do: Euler, DDIM
and DPM-Solver++ skip the first ``steps - int(steps * strength)`` steps of the ``steps``-step schedule;
LCM spreads its ``steps`` over the first ``int(50 * strength)`` entries of its grid. The source latent
is noised to the first remaining timestep (:meth:`Sampler.noised`).

Use::

    sampler = make_sampler("lcm", steps=4)
    x = sampler.initial(noise)                       # or sampler.noised(source_latents, noise)
    for i, t in enumerate(sampler.timesteps):
        eps = unet(sampler.model_input(x, i), t)
        x = sampler.step(x, eps, i, noise=rng.standard_normal(x.shape) if sampler.needs_noise(i) else None)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from quadc.errors import QuadcError

#: Sampler names of ``quadc generate --sampler``.
SAMPLERS = ("euler", "lcm", "ddim", "dpmpp")


@dataclass(frozen=True)
class NoiseSchedule:
    """A DDPM training schedule (``scaled_linear`` betas), SD1.5's by default."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    train_steps: int = 1000
    steps_offset: int = 1

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """``abar_t`` for ``t = 0..train_steps-1`` (float64)."""
        from quadc.quant.feeds import alphas_cumprod  # the one place of the scaled_linear formula

        return alphas_cumprod(self.beta_start, self.beta_end, self.train_steps)

    @property
    def sigmas(self) -> np.ndarray:
        """k-diffusion noise levels ``sqrt((1 - abar_t) / abar_t)``."""
        ab = self.alphas_cumprod
        return np.sqrt((1.0 - ab) / ab)


SD15_SCHEDULE = NoiseSchedule()


def _check(steps: int, strength: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or not 1 <= steps <= 1000:
        raise QuadcError(f"sampler steps must be an integer between 1 and 1000, got {steps!r}")
    if not 0.0 < float(strength) <= 1.0:
        raise QuadcError(f"strength must be in (0, 1], got {strength!r}")


class Sampler:
    """One sampling run: the timesteps it visits and the update of each step (state: earlier outputs).

    Subclasses set ``timesteps`` (what the U-Net is fed, descending) in ``__init__``.
    """

    name = ""

    def __init__(self, steps: int, strength: float = 1.0, schedule: NoiseSchedule = SD15_SCHEDULE):
        _check(steps, strength)
        self.steps = int(steps)
        self.strength = float(strength)
        self.schedule = schedule
        self.abar = schedule.alphas_cumprod
        self.timesteps = np.zeros(0)

    def _tail(self, n: int) -> int:
        """Index of the first step img2img runs (diffusers' ``get_timesteps``); refuses an empty run."""
        init = min(int(n * self.strength), n)
        if init < 1:
            raise QuadcError(f"strength {self.strength} with {n} steps leaves no step to run; raise either")
        return n - init

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial latent of a text-to-image run."""
        return 1.0

    def initial(self, noise: np.ndarray) -> np.ndarray:
        """The starting latent of a text-to-image run from unit Gaussian ``noise``."""
        return (noise * self.init_noise_sigma).astype(np.float32)

    def level(self, i: int) -> tuple[float, float]:
        """``(a, s)`` such that the latent entering step ``i`` is ``a * x0 + s * noise`` (``i`` = the number
        of steps: the clean latent, ``(1, 0)``)."""
        if i >= len(self.timesteps):
            return 1.0, 0.0
        ab = self.abar[int(self.timesteps[i])]
        return math.sqrt(ab), math.sqrt(1.0 - ab)

    def noised(self, latents: np.ndarray, noise: np.ndarray, i: int = 0) -> np.ndarray:
        """``latents`` noised to the level of step ``i`` (default: the img2img start), as the scheduler's
        ``add_noise``."""
        a, s = self.level(i)
        return (a * latents + s * noise).astype(np.float32)

    def model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        """What the U-Net is fed at step ``i`` (``scale_model_input``)."""
        return x

    def needs_noise(self, i: int) -> bool:
        """Whether :meth:`step` ``i`` takes fresh noise."""
        return False

    def step(self, x: np.ndarray, eps: np.ndarray, i: int, noise: np.ndarray | None = None) -> np.ndarray:
        """The latent after step ``i`` from the latent ``x`` and the U-Net's noise prediction ``eps``."""
        raise NotImplementedError


class EulerSampler(Sampler):
    """``EulerDiscreteScheduler`` (``linspace`` spacing, no churn): ``x += eps * (sigma_next - sigma)``."""

    name = "euler"

    def __init__(self, steps: int, strength: float = 1.0, schedule: NoiseSchedule = SD15_SCHEDULE):
        super().__init__(steps, strength, schedule)
        ts = np.linspace(0, schedule.train_steps - 1, self.steps)[::-1]
        sig = np.interp(ts, np.arange(schedule.train_steps), schedule.sigmas)
        self._sigma_max = float(sig[0])
        begin = self._tail(self.steps)
        self.timesteps = ts[begin:].copy()
        self.sigmas = np.concatenate([sig[begin:], [0.0]])

    @property
    def init_noise_sigma(self) -> float:
        return self._sigma_max  # linspace spacing: sigma_max itself

    def level(self, i: int) -> tuple[float, float]:
        return 1.0, float(self.sigmas[min(i, len(self.sigmas) - 1)])

    def model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return (x / math.sqrt(self.sigmas[i] ** 2 + 1.0)).astype(np.float32)

    def step(self, x: np.ndarray, eps: np.ndarray, i: int, noise: np.ndarray | None = None) -> np.ndarray:
        return (x + eps * (self.sigmas[i + 1] - self.sigmas[i])).astype(np.float32)


class DdimSampler(Sampler):
    """``DDIMScheduler`` with eta 0 (deterministic), ``leading`` spacing and ``steps_offset``."""

    name = "ddim"

    def __init__(self, steps: int, strength: float = 1.0, schedule: NoiseSchedule = SD15_SCHEDULE):
        super().__init__(steps, strength, schedule)
        self.ratio = schedule.train_steps // self.steps
        ts = (np.arange(self.steps) * self.ratio)[::-1] + schedule.steps_offset
        self.timesteps = ts[self._tail(self.steps):].astype(np.float64)

    def step(self, x: np.ndarray, eps: np.ndarray, i: int, noise: np.ndarray | None = None) -> np.ndarray:
        t = int(self.timesteps[i])
        prev = t - self.ratio
        a_t = self.abar[t]
        a_prev = self.abar[prev] if prev >= 0 else self.abar[0]  # set_alpha_to_one=False
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        return (math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps).astype(np.float32)


class LcmSampler(Sampler):
    """``LCMScheduler``: consistency steps on the 50-step distillation grid; each step predicts ``x0``
    (boundary scalings with ``timestep_scaling=10``) and noises it afresh to the next timestep."""

    name = "lcm"
    original_steps = 50
    timestep_scaling = 10.0
    sigma_data = 0.5

    def __init__(self, steps: int, strength: float = 1.0, schedule: NoiseSchedule = SD15_SCHEDULE):
        super().__init__(steps, strength, schedule)
        k = schedule.train_steps // self.original_steps
        grid = (np.arange(1, int(self.original_steps * self.strength) + 1) * k - 1)[::-1]
        if self.steps > len(grid):
            raise QuadcError(f"lcm takes at most {len(grid)} steps at strength {self.strength} (its 50-step "
                             f"distillation grid), got {self.steps}")
        idx = np.floor(np.linspace(0, len(grid), num=self.steps, endpoint=False)).astype(np.int64)
        self.timesteps = grid[idx].astype(np.float64)

    def needs_noise(self, i: int) -> bool:
        return i < len(self.timesteps) - 1

    def step(self, x: np.ndarray, eps: np.ndarray, i: int, noise: np.ndarray | None = None) -> np.ndarray:
        t = int(self.timesteps[i])
        last = i == len(self.timesteps) - 1
        a_t = self.abar[t]
        st = t * self.timestep_scaling
        c_skip = self.sigma_data**2 / (st**2 + self.sigma_data**2)
        c_out = st / math.sqrt(st**2 + self.sigma_data**2)
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        denoised = c_out * x0 + c_skip * x
        if last:
            return denoised.astype(np.float32)
        if noise is None:
            raise QuadcError(f"lcm step {i} needs noise (only the last step is deterministic)")
        a_prev = self.abar[int(self.timesteps[i + 1])]
        return (math.sqrt(a_prev) * denoised + math.sqrt(1.0 - a_prev) * noise).astype(np.float32)


class DpmppSampler(Sampler):
    """``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M, midpoint, ``linspace`` spacing, final sigma 0):
    second order from the second step on, first order on the first and the last step."""

    name = "dpmpp"

    def __init__(self, steps: int, strength: float = 1.0, schedule: NoiseSchedule = SD15_SCHEDULE):
        super().__init__(steps, strength, schedule)
        n = schedule.train_steps
        ts = np.round(np.linspace(0, n - 1, self.steps + 1))[::-1][:-1]
        sig = np.interp(ts, np.arange(n), schedule.sigmas)
        begin = self._tail(self.steps)
        self.timesteps = ts[begin:].copy()
        self.sigmas = np.concatenate([sig[begin:], [0.0]])
        self._x0: list[np.ndarray] = []

    @staticmethod
    def _alpha_sigma(sigma: float) -> tuple[float, float]:
        alpha = 1.0 / math.sqrt(sigma**2 + 1.0)
        return alpha, sigma * alpha

    def level(self, i: int) -> tuple[float, float]:
        return self._alpha_sigma(float(self.sigmas[min(i, len(self.sigmas) - 1)]))

    def step(self, x: np.ndarray, eps: np.ndarray, i: int, noise: np.ndarray | None = None) -> np.ndarray:
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i])
        x0 = (x - sigma_s * eps) / alpha_s
        self._x0.append(x0)
        if self.sigmas[i + 1] == 0.0:  # the final step lands on x0 exactly (lambda_t = +inf)
            return x0.astype(np.float32)
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        lam_t, lam_s = math.log(alpha_t / sigma_t), math.log(alpha_s / sigma_s)
        h = lam_t - lam_s
        out = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * x0
        if i > 0:  # second order (midpoint) with the previous x0 prediction
            alpha_p, sigma_p = self._alpha_sigma(self.sigmas[i - 1])
            r0 = (lam_s - math.log(alpha_p / sigma_p)) / h
            d1 = (x0 - self._x0[-2]) / r0
            out = out - 0.5 * alpha_t * math.expm1(-h) * d1
        return out.astype(np.float32)


_CLASSES: dict[str, type[Sampler]] = {c.name: c for c in (EulerSampler, LcmSampler, DdimSampler, DpmppSampler)}


def make_sampler(name: str, steps: int, strength: float = 1.0, schedule: NoiseSchedule = SD15_SCHEDULE) -> Sampler:
    """A fresh sampler ``name`` (one of :data:`SAMPLERS`) for ``steps`` steps at img2img ``strength``."""
    key = str(name).lower()
    if key == "olss":
        raise QuadcError("sampler 'olss' is not implemented (it needs coefficients fitted to the model's own "
                         "teacher trajectories); use 'dpmpp', DPM-Solver++ 2M, which stands in for it")
    if key not in _CLASSES:
        raise QuadcError(f"unknown sampler '{name}'; use one of {', '.join(SAMPLERS)}")
    return _CLASSES[key](steps, strength, schedule)
