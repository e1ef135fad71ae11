"""What A1111 v1.10 decides per sampler, and how it enters the sampler functions (txt2img, img2img).

References: A1111 `modules/sd_samplers_kdiffusion.py` (sampler list and options, `get_sigmas`,
`sample`, `sample_img2img`), `sd_samplers_timesteps.py`, `sd_samplers_common.py`
(`setup_img2img_steps`, `create_noise_sampler`, `Sampler.initialize`), `sd_schedulers.py`.
Spec: generation.md §2.1, §3.1-§3.5, §4.1, §8.1.
"""

import math
from dataclasses import dataclass, field

import torch

from ..rng import ImageRNG, brownian_noise_sampler
from .denoiser import CFGDenoiser
from .kdiffusion import (sample_dpm_2, sample_dpm_2_ancestral, sample_dpm_adaptive, sample_dpm_fast,
                         sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2m_sde_heun, sample_dpmpp_2s_ancestral,
                         sample_dpmpp_3m_sde, sample_dpmpp_sde, sample_euler, sample_euler_ancestral, sample_heun,
                         sample_lms, sample_restart)
from .schedules import (discrete_sigmas, sigmas_align_your_steps, sigmas_beta, sigmas_ddim, sigmas_exponential,
                        sigmas_karras, sigmas_kl_optimal, sigmas_normal, sigmas_polyexponential, sigmas_sgm_uniform,
                        sigmas_simple, sigmas_uniform)
from .timesteps import ddim_timesteps, sample_ddim, sample_plms, sample_unipc

# A1111's sampler names, in its UI order (the first is the default)
SAMPLERS = {
    "DPM++ 2M": sample_dpmpp_2m,
    "DPM++ SDE": sample_dpmpp_sde,
    "DPM++ 2M SDE": sample_dpmpp_2m_sde,
    "DPM++ 2M SDE Heun": sample_dpmpp_2m_sde_heun,
    "DPM++ 2S a": sample_dpmpp_2s_ancestral,
    "DPM++ 3M SDE": sample_dpmpp_3m_sde,
    "Euler a": sample_euler_ancestral,
    "Euler": sample_euler,
    "LMS": sample_lms,
    "Heun": sample_heun,
    "DPM2": sample_dpm_2,
    "DPM2 a": sample_dpm_2_ancestral,
    "DPM fast": sample_dpm_fast,
    "DPM adaptive": sample_dpm_adaptive,
    "Restart": sample_restart,
    "DDIM": sample_ddim,
    "PLMS": sample_plms,
    "UniPC": sample_unipc,
}

# Schedule types: name -> label (A1111 accepts either, and the alias "SGMUniform")
SCHEDULERS = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
    "simple": "Simple",
    "normal": "Normal",
    "ddim": "DDIM",
    "beta": "Beta",
}


@dataclass(frozen=True)
class SamplerDefaults:
    scheduler: str = None                # what "Automatic" resolves to; None = k-diffusion's default (Uniform)
    discard_penultimate: bool = False    # schedule for steps + 1, then drop the last non-zero σ
    second_order: bool = False           # prompt-edit schedules count steps × 2
    brownian: bool = False               # noise from per-image Brownian trees, not the image RNG
    uses_ensd: bool = False              # infotext shows ENSD (the RNG applies ENSD to every sampler)
    timesteps: bool = False              # DDIM/PLMS/UniPC: guided ε on the raw latent, LDM timestep grid
    sigma_range: bool = False            # DPM fast/adaptive: A1111 passes σ_min, σ_max (and n) explicitly
    options: dict = field(default_factory=dict)  # keyword arguments A1111 passes, with their defaults


_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}  # s_tmax 0 means ∞
_ETA = {"eta": 1.0}                                                        # opts.eta_ancestral
_ETA_NOISE = {"eta": 1.0, "s_noise": 1.0}

A1111_DEFAULTS = {
    "DPM++ 2M": SamplerDefaults(scheduler="Karras"),
    "DPM++ SDE": SamplerDefaults(scheduler="Karras", second_order=True, brownian=True, options=_ETA_NOISE),
    "DPM++ 2M SDE": SamplerDefaults(scheduler="Exponential", brownian=True, options=_ETA_NOISE),
    "DPM++ 2M SDE Heun": SamplerDefaults(scheduler="Exponential", brownian=True, options=_ETA_NOISE),
    "DPM++ 2S a": SamplerDefaults(scheduler="Karras", second_order=True, uses_ensd=True, options=_ETA_NOISE),
    "DPM++ 3M SDE": SamplerDefaults(scheduler="Exponential", discard_penultimate=True, brownian=True,
                                    options=_ETA_NOISE),
    "Euler a": SamplerDefaults(uses_ensd=True, options=_ETA),  # A1111 does not pass s_noise here
    "Euler": SamplerDefaults(options=_CHURN),
    "LMS": SamplerDefaults(),
    "Heun": SamplerDefaults(second_order=True, options=_CHURN),
    "DPM2": SamplerDefaults(scheduler="Karras", discard_penultimate=True, second_order=True, options=_CHURN),
    "DPM2 a": SamplerDefaults(scheduler="Karras", discard_penultimate=True, second_order=True, uses_ensd=True,
                              options=_ETA_NOISE),
    "DPM fast": SamplerDefaults(uses_ensd=True, sigma_range=True, options=_ETA_NOISE),
    "DPM adaptive": SamplerDefaults(uses_ensd=True, sigma_range=True, options=_ETA),
    "Restart": SamplerDefaults(scheduler="Karras", second_order=True),
    "DDIM": SamplerDefaults(timesteps=True, options={"eta": 0.0}),  # opts.eta_ddim
    "PLMS": SamplerDefaults(timesteps=True),
    "UniPC": SamplerDefaults(timesteps=True),
}


def scheduler_name(label: str) -> str:
    """'Karras' / 'karras' / 'SGMUniform' -> the scheduler's name ('karras', 'sgm_uniform')."""
    for name, lab in SCHEDULERS.items():
        if label in (name, lab):
            return name
    if label == "SGMUniform":
        return "sgm_uniform"
    raise ValueError(f"unknown scheduler {label!r}")


def split_sampler_name(name: str):
    """Old names carry the schedule: 'DPM++ 2M Karras' -> ('DPM++ 2M', 'Karras'); else (name, None)."""
    if name in SAMPLERS:
        return name, None
    for suffix in [*SCHEDULERS, *SCHEDULERS.values(), "SGMUniform"]:
        if name.endswith(" " + suffix) and name[:-len(suffix) - 1] in SAMPLERS:
            return name[:-len(suffix) - 1], SCHEDULERS[scheduler_name(suffix)]
    raise ValueError(f"unknown sampler {name!r}")


def get_sigmas(scheduler: str, steps: int, alphas_cumprod: torch.Tensor, *, sampler: str = None,
               sigma_min: float = 0.0, sigma_max: float = 0.0, rho: float = 0.0, beta_alpha: float = 0.6,
               beta_beta: float = 0.6, always_discard_penultimate: bool = False) -> torch.Tensor:
    """The σ schedule A1111 v1.10 samples `steps` steps with (KDiffusionSampler.get_sigmas).

    "Automatic" is the `sampler`'s default schedule, or Uniform without a sampler. With a sampler
    that discards the penultimate σ (DPM2, DPM2 a, DPM++ 3M SDE) the schedule is made for steps + 1
    and its last non-zero σ is dropped. σ_min/σ_max are the model's unless set (A1111 options of the same
    name); `rho` overrides Karras's 7 / Polyexponential's 1 when non-zero; beta_* are Beta's (α, β).
    """
    defaults = A1111_DEFAULTS[sampler] if sampler is not None else SamplerDefaults()
    discard = defaults.discard_penultimate or always_discard_penultimate
    n = steps + (1 if discard else 0)
    name = scheduler_name(scheduler or "Automatic")
    if name == "automatic":
        name = scheduler_name(defaults.scheduler) if defaults.scheduler else "uniform"

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
    elif name == "sgm_uniform":
        sigmas = sigmas_sgm_uniform(n, smin, smax, log_sigmas)
    elif name == "kl_optimal":
        sigmas = sigmas_kl_optimal(n, smin, smax)
    elif name == "align_your_steps":
        sigmas = sigmas_align_your_steps(n)
    elif name == "simple":
        sigmas = sigmas_simple(n, table)
    elif name == "normal":
        sigmas = sigmas_normal(n, smin, smax, log_sigmas)
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


@torch.no_grad()
def sample(name: str, model: CFGDenoiser, rng: ImageRNG, steps: int, *, scheduler: str = "Automatic",
           init_latent: torch.Tensor = None, denoising_strength: float = 0.75, fix_steps: bool = False,
           initial_noise_multiplier: float = None, eta: float = None, s_churn: float = None,
           s_tmin: float = None, s_tmax: float = None, s_noise: float = None, callback=None,
           **schedule_options) -> torch.Tensor:
    """Run A1111's sampler `name` for one batch: txt2img, or img2img/hires when `init_latent` is given.

    `model` is the CFGDenoiser over an EpsDenoiser; `rng` the batch's ImageRNG, whose first draw is the
    initial noise and whose later draws are the in-sampler noise. Unset eta/s_* take A1111's defaults
    (eta 1 for k-diffusion samplers, 0 for DDIM); A1111 passes each only to the samplers listed in
    A1111_DEFAULTS. `initial_noise_multiplier` scales the img2img noise (A1111 option, default 1; the
    hires pass does not apply it). `schedule_options` go to `get_sigmas` (sigma_min, sigma_max, rho, beta_*).
    The final inpainting blend of the samples with the init latent is the caller's.
    """
    fn, defaults = SAMPLERS[name], A1111_DEFAULTS[name]
    denoiser = model.inner
    given = {"eta": eta, "s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    options = {k: (v if given[k] is None else given[k]) for k, v in defaults.options.items()}
    if "s_tmax" in options:
        options["s_tmax"] = options["s_tmax"] or math.inf
    noise = rng.next()  # (B, 4, H/8, W/8): first draw of each image's generator
    steps_total, t_enc = (steps, None) if init_latent is None else img2img_steps(steps, denoising_strength, fix_steps)
    if init_latent is not None and initial_noise_multiplier not in (None, 1.0):
        noise = noise * initial_noise_multiplier

    if defaults.timesteps:
        alphas_cumprod = denoiser.alphas_cumprod
        timesteps = ddim_timesteps(steps_total).to(noise.device)
        if init_latent is None:
            x = noise  # timestep samplers start from the unscaled noise
        else:
            # noise added at the level of timesteps[t_enc]; sampling starts at timesteps[t_enc - 1] (CompVis quirk)
            a = alphas_cumprod[timesteps[t_enc]]
            x = init_latent * torch.sqrt(a) + noise * torch.sqrt(1 - a)
            timesteps = timesteps[:t_enc]
            if name == "UniPC":
                options["img2img"] = True
        return fn(model.eps, x, timesteps, alphas_cumprod=alphas_cumprod, noise_sampler=rng.noise_sampler(),
                  callback=callback, **options)

    sigmas = get_sigmas(scheduler, steps_total, denoiser.alphas_cumprod, sampler=name, **schedule_options)
    sigmas = sigmas.to(noise.device)
    if init_latent is None:
        sigma_sched = sigmas
        x = noise * sigmas[0]
        if defaults.sigma_range:  # txt2img: the model's σ range and the requested step count
            options.update(sigma_min=denoiser.sigma_min, sigma_max=denoiser.sigma_max)
            if name == "DPM fast":
                options["n"] = steps
    else:
        sigma_sched = sigmas[steps_total - t_enc - 1:]  # t_enc + 1 steps
        x = init_latent + noise * sigma_sched[0]
        if defaults.sigma_range:
            options.update(sigma_min=float(sigma_sched[-2]), sigma_max=float(sigma_sched[0]))
            if name == "DPM fast":
                options["n"] = len(sigma_sched) - 1
    if defaults.brownian:  # one tree per image seed, spanning the full schedule
        noise_sampler = brownian_noise_sampler(x, sigmas, rng.seeds, source=rng.source)
    else:
        noise_sampler = rng.noise_sampler()
    return fn(model, x, sigma_sched, noise_sampler=noise_sampler, callback=callback, **options)
