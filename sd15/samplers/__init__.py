"""Samplers, schedules and the denoiser wrappers, reproducing AUTOMATIC1111 v1.10.

- `SAMPLERS`: A1111 sampler name -> plain function `fn(model, x, sigmas, *, noise_sampler, callback, **options)`.
  k-diffusion samplers take `model(x, sigma) -> x₀` and a σ schedule; DDIM/PLMS/UniPC take
  `model(x, t) -> ε`, an integer timestep grid and `alphas_cumprod=` (see `timesteps.py`).
- `get_sigmas(scheduler, steps, alphas_cumprod, sampler=None)`: A1111's twelve schedule types.
- `EpsDenoiser`, `CFGDenoiser`: the UNet ε -> x₀ wrapper and classifier-free guidance.
- `A1111_DEFAULTS` and `sample(...)`: what A1111 decides per sampler (default schedule, discarded σ,
  eta, Brownian noise, img2img entry) and the call that applies it.
"""

from .a1111 import (A1111_DEFAULTS, SAMPLERS, SCHEDULERS, SamplerDefaults, get_sigmas, img2img_steps, sample,
                    split_sampler_name)
from .denoiser import CFGDenoiser, EpsDenoiser
from .schedules import discrete_sigmas, sd15_alphas_cumprod, sigma_to_t, t_to_sigma
from .timesteps import ddim_timesteps

__all__ = ["A1111_DEFAULTS", "SAMPLERS", "SCHEDULERS", "SamplerDefaults", "get_sigmas", "img2img_steps", "sample",
           "split_sampler_name", "CFGDenoiser", "EpsDenoiser", "discrete_sigmas", "sd15_alphas_cumprod", "sigma_to_t",
           "t_to_sigma", "ddim_timesteps"]
