"""Samplers, schedules and the denoiser wrappers, reproducing AUTOMATIC1111 v1.10.

- `SAMPLER_TABLE` (sd15.samplers.table): the one list of samplers (name, aliases, function, default
  schedule, flags); `SAMPLERS` maps A1111 names to the plain functions
  `fn(model, x, sigmas, *, noise_sampler, callback, **options)`. k-diffusion samplers take
  `model(x, sigma) -> x₀` and a σ schedule; DDIM, DDIM CFG++, PLMS and UniPC take `model(x, t) -> ε`, an integer
  timestep grid and `alphas_cumprod=` (see `timesteps.py`).
- `resolve_sampler(name, scheduler)`: A1111's name resolution (aliases, old "DPM++ 2M Karras" names).
- `get_sigmas(scheduler, steps, alphas_cumprod, sampler=None)`: A1111's twelve schedule types.
- `EpsDenoiser`, `CFGDenoiser`, `make_denoiser`: the UNet ε -> x₀ wrapper, classifier-free guidance, and the
  denoiser a given sampler runs on; `sample(...)` runs one batch as A1111 does.
"""

from .denoiser import CFGDenoiser, EpsDenoiser
from .sampling import (A1111_DEFAULTS, SAMPLERS, SCHEDULERS, LCMDenoiser, get_sigmas, img2img_steps, make_denoiser,
                       sample)
from .schedules import discrete_sigmas, sd15_alphas_cumprod, sigma_to_t, t_to_sigma
from .table import (DEFAULT_SAMPLER, SAMPLER_TABLE, SCHEDULER_TABLE, Sampler, Scheduler, find_sampler,
                    find_scheduler, recorded_schedule, resolve_sampler, samplers_api, schedulers_api,
                    split_sampler_name)
from .timesteps import ddim_timesteps

__all__ = ["A1111_DEFAULTS", "SAMPLERS", "SCHEDULERS", "SAMPLER_TABLE", "SCHEDULER_TABLE", "DEFAULT_SAMPLER",
           "Sampler", "Scheduler", "find_sampler", "find_scheduler", "recorded_schedule", "resolve_sampler",
           "samplers_api", "schedulers_api", "split_sampler_name", "get_sigmas", "img2img_steps", "sample",
           "make_denoiser", "LCMDenoiser", "CFGDenoiser", "EpsDenoiser", "discrete_sigmas", "sd15_alphas_cumprod",
           "sigma_to_t", "t_to_sigma", "ddim_timesteps"]
