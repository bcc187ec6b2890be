"""The numpy samplers against diffusers' schedulers, step for step on the same U-Net outputs.

Both run in lockstep from the same start; at every step the bundled trained tiny U-Net (onnxruntime) is
fed diffusers' model input, and its noise prediction advances both. Timesteps, model inputs and latents
must agree at every step (float64 numpy against float32 torch: relative 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest

from quadc.errors import QuadcError
from quadc.pipeline.samplers import SAMPLERS, make_sampler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

#: Stable Diffusion 1.5's scheduler_config.json (the keys it has; the rest are each class's defaults).
SD15_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}
CLASSES = {"euler": "EulerDiscreteScheduler", "lcm": "LCMScheduler", "ddim": "DDIMScheduler",
           "dpmpp": "DPMSolverMultistepScheduler"}


def _diffusers_scheduler(name: str, steps: int, strength: float):
    """The diffusers scheduler set up as its img2img pipeline does; returns (scheduler, timesteps)."""
    cls = getattr(diffusers, CLASSES[name])
    sched = cls.from_config(SD15_CONFIG)
    if name == "lcm":  # LatentConsistencyModelImg2ImgPipeline: strength goes into set_timesteps
        sched.set_timesteps(steps, strength=strength)
        return sched, sched.timesteps
    sched.set_timesteps(steps)
    # StableDiffusionImg2ImgPipeline.get_timesteps
    init = min(int(steps * strength), steps)
    start = max(steps - init, 0)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start * sched.order)
    return sched, sched.timesteps[start * sched.order:]


@pytest.fixture(scope="module")
def unet():
    import onnxruntime as ort

    from quadc.compiler import bundled_model

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(bundled_model()), so, providers=["CPUExecutionProvider"])
    cond = np.random.default_rng(3).standard_normal((1, 8, 32)).astype(np.float32)

    def run(x: np.ndarray, t: float) -> np.ndarray:
        feeds = {"sample": x.astype(np.float32), "timestep": np.array([t], np.float32), "encoder_hidden_states": cond}
        return sess.run(None, feeds)[0]

    return run


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps,strength", [(4, 1.0), (8, 1.0), (4, 0.75), (8, 0.6)])
def test_sampler_matches_diffusers(name: str, steps: int, strength: float, unet) -> None:
    sched, ts_ref = _diffusers_scheduler(name, steps, strength)
    mine = make_sampler(name, steps, strength)
    np.testing.assert_allclose(mine.timesteps, ts_ref.double().numpy(), rtol=0, atol=1e-3)
    rng = torch.Generator().manual_seed(7)
    noise = torch.randn((1, 4, 8, 8), generator=rng)
    if strength < 1.0:  # img2img: a source latent noised to the first timestep
        source = torch.randn((1, 4, 8, 8), generator=rng)
        x_ref = sched.add_noise(source, noise, ts_ref[:1])
        x = mine.noised(source.numpy(), noise.numpy())
    else:
        x_ref = noise * sched.init_noise_sigma
        x = mine.initial(noise.numpy())
    np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-4, atol=1e-4)
    gen_ref = torch.Generator().manual_seed(11)  # LCM's fresh noise: the same draws for both
    gen_mine = torch.Generator().manual_seed(11)
    for i, t in enumerate(ts_ref):
        model_in_ref = sched.scale_model_input(x_ref, t)
        np.testing.assert_allclose(mine.model_input(x, i), model_in_ref.numpy(), rtol=1e-4, atol=1e-4)
        eps = unet(model_in_ref.numpy(), float(t))
        x_ref = sched.step(torch.from_numpy(eps), t, x_ref, generator=gen_ref).prev_sample
        fresh = torch.randn((1, 4, 8, 8), generator=gen_mine).numpy() if mine.needs_noise(i) else None
        x = mine.step(x, eps, i, noise=fresh)
        scale = float(np.abs(x_ref.numpy()).max())
        np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-4, atol=1e-4 * max(1.0, scale),
                                   err_msg=f"{name} step {i} (t={float(t)})")
    assert len(ts_ref) == len(mine.timesteps)


def test_samplers_refuse_bad_arguments() -> None:
    with pytest.raises(QuadcError, match="dpmpp"):
        make_sampler("olss", 4)
    with pytest.raises(QuadcError, match="unknown sampler"):
        make_sampler("heun", 4)
    with pytest.raises(QuadcError, match="steps"):
        make_sampler("euler", 0)
    with pytest.raises(QuadcError, match="no step"):
        make_sampler("ddim", 1, strength=0.5)
    with pytest.raises(QuadcError, match="at most"):
        make_sampler("lcm", 40, strength=0.5)
