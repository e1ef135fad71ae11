"""How A1111 v1.10 runs one sampler over one batch (txt2img, img2img): σ schedule, noise, options, denoiser
(A1111 `modules/sd_samplers_kdiffusion.py`, `sd_samplers_timesteps.py`, `sd_samplers_lcm.py`,
`sd_samplers_common.py`, `sd_schedulers.py`).
"""

import math

import torch
from torch import nn

from ..rng import ImageRNG, brownian_noise_sampler
from .denoiser import CFGDenoiser, EpsDenoiser
from .schedules import (discrete_sigmas, sigmas_align_your_steps, sigmas_beta, sigmas_ddim, sigmas_exponential,
                        sigmas_karras, sigmas_kl_optimal, sigmas_normal, sigmas_polyexponential,
                        sigmas_simple, sigmas_uniform, sigma_to_t)
from .table import SAMPLER_BY_NAME, find_scheduler
from .timesteps import ddim_timesteps

SAMPLERS = {name: s.fn for name, s in SAMPLER_BY_NAME.items()}  # A1111 name -> function (public API)
A1111_DEFAULTS = SAMPLER_BY_NAME                                  # A1111 name -> its table entry


def get_sigmas(scheduler: str, steps: int, alphas_cumprod: torch.Tensor, *, sampler: str = None,
               sigma_min: float = 0.0, sigma_max: float = 0.0, rho: float = 0.0, beta_alpha: float = 0.6,
               beta_beta: float = 0.6, always_discard_penultimate: bool = False) -> torch.Tensor:
    """The σ schedule A1111 v1.10 samples `steps` steps with (KDiffusionSampler.get_sigmas).

    "Automatic" is the `sampler`'s default schedule, or Uniform without a sampler. With a sampler
    that discards the penultimate σ (DPM2, DPM2 a, DPM++ 3M SDE) the schedule is made for steps + 1
    and its last non-zero σ is dropped. σ_min/σ_max are the model's unless set (A1111 options of the same
    name); `rho` overrides Karras's 7 / Polyexponential's 1 when non-zero; beta_* are Beta's (α, β).
    """
    entry = SAMPLER_BY_NAME[sampler] if sampler is not None else None
    discard = (entry is not None and entry.discard_penultimate) or always_discard_penultimate
    n = steps + (1 if discard else 0)
    found = find_scheduler(scheduler or "Automatic")
    if found is None:
        raise ValueError(f"unknown scheduler {scheduler!r}")
    name = found.name
    if name == "automatic":
        name = find_scheduler(entry.scheduler).name if entry is not None and entry.scheduler else "uniform"

    table = discrete_sigmas(alphas_cumprod.cpu())  # ascending σ, (1000,)
    log_sigmas = table.log()
    smin = sigma_min or table[0].item()
    smax = sigma_max or table[-1].item()
    if name == "uniform":
        sigmas = sigmas_uniform(n, log_sigmas)
    elif name == "karras":
        sigmas = sigmas_karras(n, smin, smax, rho=rho or 7.0)
    elif name == "exponential":
        sigmas = sigmas_exponential(n, smin, smax)
    elif name == "polyexponential":
        sigmas = sigmas_polyexponential(n, smin, smax, rho=rho or 1.0)
    elif name == "kl_optimal":
        sigmas = sigmas_kl_optimal(n, smin, smax)
    elif name == "align_your_steps":
        sigmas = sigmas_align_your_steps(n)
    elif name == "simple":
        sigmas = sigmas_simple(n, table)
    elif name in ("normal", "sgm_uniform"):
        sigmas = sigmas_normal(n, smin, smax, log_sigmas, sgm=name == "sgm_uniform")
    elif name == "ddim":
        sigmas = sigmas_ddim(n, table)
    else:  # beta
        sigmas = sigmas_beta(n, smin, smax, beta_alpha, beta_beta)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def img2img_steps(steps: int, denoising_strength: float, fix_steps: bool = False):
    """(steps of the full schedule, t_enc) for img2img (setup_img2img_steps); t_enc + 1 steps get run.

    `fix_steps` (option img2img_fix_steps, or an explicit step count as the hires pass gives) runs
    exactly `steps` steps out of a longer schedule.
    """
    strength = min(denoising_strength, 0.999)
    if fix_steps:
        return (int(steps / strength) if denoising_strength > 0 else 0), steps - 1
    return steps, int(strength * steps)


class LCMDenoiser(nn.Module):
    """A1111's `LCMCompVisDenoiser`: the ε model seen through LCM's 50 "original" timesteps
    (t = 19, 39, ..., 999) and its consistency-model output c_skip·x + c_out·x₀ (σ_data 0.5, t scaled by 10)."""

    SKIP = 1000 // 50

    def __init__(self, inner: EpsDenoiser):
        super().__init__()
        self.inner = inner
        self.register_buffer("alphas_cumprod", inner.alphas_cumprod[self.SKIP - 1::self.SKIP], persistent=False)
        self.register_buffer("log_sigmas", discrete_sigmas(self.alphas_cumprod).log(), persistent=False)  # (50,)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.device, non_blocking=True)  # a host σ (CFGDenoiser.host_sigma) joins x's device
        s = sigma[:, None, None, None]                                        # (B, 1, 1, 1)
        t = sigma_to_t(sigma, self.log_sigmas, quantize=True) * self.SKIP + (self.SKIP - 1)  # nearest of 50
        x0 = x - s * self.inner.eps(x / (s ** 2 + 1.0) ** 0.5, t, context)
        st = t[:, None, None, None] * 10.0                                    # (B, 1, 1, 1)
        c_skip = 0.25 / (st ** 2 + 0.25)
        c_out = st / (st ** 2 + 0.25) ** 0.5
        return c_out * x0 + c_skip * x


def make_denoiser(sampler: str, unet, alphas_cumprod: torch.Tensor, cond, uncond, cfg_scale: float,
                  **cfg_options) -> CFGDenoiser:
    """The guided denoiser `sampler` runs on: CFG over the ε model, LCM's denoiser for LCM, and
    cfg_scale / 12.5 for DDIM CFG++ (A1111's `cond_scale_miltiplier`). `cfg_options` go to `CFGDenoiser`."""
    entry = SAMPLER_BY_NAME[sampler]
    inner = EpsDenoiser(unet, alphas_cumprod)
    if entry.lcm:
        inner = LCMDenoiser(inner)
    if entry.cfgpp:
        cfg_scale = cfg_scale / 12.5
    return CFGDenoiser(inner, cond, uncond, cfg_scale, **cfg_options)


@torch.no_grad()
def sample(name: str, model: CFGDenoiser, rng: ImageRNG, steps: int, *, scheduler: str = "Automatic",
           init_latent: torch.Tensor = None, denoising_strength: float = 0.75, fix_steps: bool = False,
           initial_noise_multiplier: float = None, eta: float = None, s_churn: float = None,
           s_tmin: float = None, s_tmax: float = None, s_noise: float = None, callback=None,
           **schedule_options) -> torch.Tensor:
    """Run A1111's sampler `name` for one batch: txt2img, or img2img/hires when `init_latent` is given.

    `rng`'s first draw is the initial noise, its later draws the in-sampler noise. Unset eta/s_* take the
    table's defaults, and only the samplers the table lists them for get them. `initial_noise_multiplier`
    scales the img2img noise (A1111 option); `schedule_options` go to `get_sigmas` (timestep samplers take
    only `always_discard_penultimate`: their grid is made for steps + 1). The final inpainting blend with
    the init latent is the caller's.
    """
    defaults = SAMPLER_BY_NAME[name]
    denoiser = model.inner
    given = {"eta": eta, "s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    options = {k: (v if given[k] is None else given[k]) for k, v in defaults.options.items()}
    if "s_tmax" in options:
        options["s_tmax"] = options["s_tmax"] or math.inf
    noise = rng.next()  # (B, 4, H/8, W/8): first draw of each image's generator
    steps_total, t_enc = (steps, None) if init_latent is None else img2img_steps(steps, denoising_strength, fix_steps)
    if init_latent is not None and initial_noise_multiplier not in (None, 1.0):
        noise = noise * initial_noise_multiplier
    # A1111's `launch_sampling`: the denoiser calls expected, for skip early CFG
    model.total_steps = (steps if init_latent is None else t_enc + 1) * (2 if defaults.second_order else 1)

    if defaults.timesteps:
        alphas_cumprod = denoiser.alphas_cumprod
        discard = schedule_options.get("always_discard_penultimate", False)  # A1111's `get_timesteps`
        timesteps = ddim_timesteps(steps_total + 1 if discard else steps_total).to(noise.device)
        if init_latent is None:
            x = noise  # timestep samplers start from the unscaled noise
        else:
            # noise added at the level of timesteps[t_enc]; sampling starts at timesteps[t_enc - 1] (CompVis quirk)
            a = alphas_cumprod[timesteps[t_enc]]
            x = init_latent * torch.sqrt(a) + noise * torch.sqrt(1 - a)
            timesteps = timesteps[:t_enc]
            if name == "UniPC":
                options["img2img"] = True
        if defaults.cfgpp:
            options["last_noise_uncond"] = lambda: model.last_uncond
        return defaults.fn(model.eps, x, timesteps, alphas_cumprod=alphas_cumprod,
                           noise_sampler=rng.noise_sampler(), callback=callback, **options)

    # LCM's schedules are made on its own 50-entry table (k-diffusion's DiscreteSchedule of LCMCompVisDenoiser)
    sigmas = get_sigmas(scheduler, steps_total, denoiser.alphas_cumprod, sampler=name, **schedule_options)
    sigmas = sigmas.to(noise.device)
    if init_latent is None:
        sigma_sched = sigmas
        x = noise * sigmas[0]
        if defaults.sigma_range:  # txt2img: the model's σ range and the requested step count
            options.update(sigma_min=denoiser.sigma_min, sigma_max=denoiser.sigma_max)
            if name == "DPM fast":
                options["n"] = steps
    else:  # t_enc + 1 steps (DPM fast/adaptive: this schedule's σ range and length, their defaults)
        sigma_sched = sigmas[steps_total - t_enc - 1:]
        x = init_latent + noise * sigma_sched[0]
    if defaults.brownian:  # one tree per image seed, spanning the full schedule
        noise_sampler = brownian_noise_sampler(x, sigmas, rng.seeds, source=rng.source)
    else:
        noise_sampler = rng.noise_sampler()
    return defaults.fn(model, x, sigma_sched, noise_sampler=noise_sampler, callback=callback, **options)
