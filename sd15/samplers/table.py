"""The one sampler table and the one scheduler table, with A1111 v1.10's names and name resolution;
sampling, the request schema, the infotext, the server and the CLI all read these. From A1111's
`sd_samplers_kdiffusion.py`, `sd_samplers_timesteps.py`, `sd_samplers_lcm.py`, `sd_schedulers.py` and
`sd_samplers.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

DEFAULT_SAMPLER = "Euler"  # A1111's API default (its `sampler_index`) for a request without `sampler_name`


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler: its name and aliases, the function, and what A1111 decides for it."""
    name: str
    aliases: tuple[str, ...]
    function: str                        # its name in `kdiffusion`, or in `timesteps` for timestep samplers
    scheduler: Optional[str] = None      # the label "Automatic" means; None = the model's own (Uniform)
    discard_penultimate: bool = False    # schedule for steps + 1, then drop the last non-zero σ
    second_order: bool = False           # prompt-edit schedules count steps × 2
    brownian: bool = False               # noise from per-image Brownian trees, not the image RNG
    uses_ensd: bool = False              # infotext shows ENSD (the RNG applies ENSD to every sampler)
    timesteps: bool = False              # DDIM/PLMS/UniPC: guided ε on the raw latent, LDM timestep grid
    sigma_range: bool = False            # DPM fast/adaptive: A1111 passes σ_min, σ_max (and n) explicitly
    lcm: bool = False                    # LCM: the consistency-model denoiser on a 50-step σ table
    cfgpp: bool = False                  # CFG++: guidance scale / 12.5, the uncond ε steers
    solver_type: Optional[str] = None    # listed in the API options ("heun")
    options: dict = field(default_factory=dict, hash=False)  # keyword arguments A1111 passes, with defaults

    @property
    def fn(self) -> Callable:
        """The sampling function, imported on first use: the table (and the request schema) needs no torch."""
        from sd15.samplers import kdiffusion, timesteps

        return getattr(timesteps if self.timesteps else kdiffusion, self.function)

    def api(self) -> dict:
        """The `/sdapi/v1/samplers` entry (option values are strings, in A1111's order)."""
        opts = {"scheduler": self.scheduler.lower()} if self.scheduler else {}
        flags = {"discard_next_to_last_sigma": self.discard_penultimate, "uses_ensd": self.uses_ensd,
                 "second_order": self.second_order, "brownian_noise": self.brownian}
        opts.update({key: "True" for key, on in flags.items() if on})
        if self.solver_type:
            opts["solver_type"] = self.solver_type
        return {"name": self.name, "aliases": list(self.aliases), "options": opts}


_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}  # s_tmax 0 means ∞
_ETA = {"eta": 1.0}                                                        # opts.eta_ancestral
_ETA_NOISE = {"eta": 1.0, "s_noise": 1.0}
_ETA_DDIM = {"eta": 0.0}                                                   # opts.eta_ddim

# A1111's order (its UI and `/sdapi/v1/samplers`).
SAMPLER_TABLE: list[Sampler] = [
    Sampler("DPM++ 2M", ("k_dpmpp_2m",), "sample_dpmpp_2m", "Karras"),
    Sampler("DPM++ SDE", ("k_dpmpp_sde",), "sample_dpmpp_sde", "Karras", second_order=True, brownian=True,
            options=_ETA_NOISE),
    Sampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), "sample_dpmpp_2m_sde", "Exponential", brownian=True,
            options=_ETA_NOISE),
    Sampler("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",), "sample_dpmpp_2m_sde_heun", "Exponential",
            brownian=True, solver_type="heun", options=_ETA_NOISE),
    Sampler("DPM++ 2S a", ("k_dpmpp_2s_a",), "sample_dpmpp_2s_ancestral", "Karras", second_order=True,
            uses_ensd=True, options=_ETA_NOISE),
    Sampler("DPM++ 3M SDE", ("k_dpmpp_3m_sde",), "sample_dpmpp_3m_sde", "Exponential",
            discard_penultimate=True, brownian=True, options=_ETA_NOISE),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), "sample_euler_ancestral", uses_ensd=True,
            options=_ETA),  # A1111 does not pass s_noise here
    Sampler("Euler", ("k_euler",), "sample_euler", options=_CHURN),
    Sampler("LMS", ("k_lms",), "sample_lms"),
    Sampler("Heun", ("k_heun",), "sample_heun", second_order=True, options=_CHURN),
    Sampler("DPM2", ("k_dpm_2",), "sample_dpm_2", "Karras", discard_penultimate=True, second_order=True,
            options=_CHURN),
    Sampler("DPM2 a", ("k_dpm_2_a",), "sample_dpm_2_ancestral", "Karras", discard_penultimate=True,
            second_order=True, uses_ensd=True, options=_ETA_NOISE),
    Sampler("DPM fast", ("k_dpm_fast",), "sample_dpm_fast", uses_ensd=True, sigma_range=True,
            options=_ETA_NOISE),
    Sampler("DPM adaptive", ("k_dpm_ad",), "sample_dpm_adaptive", uses_ensd=True, sigma_range=True,
            options=_ETA),
    Sampler("Restart", ("restart",), "sample_restart", "Karras", second_order=True),
    Sampler("DDIM", ("ddim",), "sample_ddim", timesteps=True, options=_ETA_DDIM),
    Sampler("DDIM CFG++", ("ddim_cfgpp",), "sample_ddim_cfgpp", timesteps=True, cfgpp=True,
            options=_ETA_DDIM),
    Sampler("PLMS", ("plms",), "sample_plms", timesteps=True),
    Sampler("UniPC", ("unipc",), "sample_unipc", timesteps=True),
    Sampler("LCM", ("k_lcm",), "sample_lcm", lcm=True),
]


@dataclass(frozen=True)
class Scheduler:
    """One `/sdapi/v1/schedulers` entry. default_rho is -1.0 when the schedule has no ρ."""
    name: str
    label: str
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False

    def api(self) -> dict:
        return {"name": self.name, "label": self.label, "aliases": list(self.aliases) or None,
                "default_rho": self.default_rho, "need_inner_model": self.need_inner_model}


# A1111 v1.10's order; "automatic" has no schedule function of its own.
SCHEDULER_TABLE: list[Scheduler] = [
    Scheduler("automatic", "Automatic"),
    Scheduler("uniform", "Uniform", need_inner_model=True),
    Scheduler("karras", "Karras", default_rho=7.0),
    Scheduler("exponential", "Exponential"),
    Scheduler("polyexponential", "Polyexponential", default_rho=1.0),
    Scheduler("sgm_uniform", "SGM Uniform", ("SGMUniform",), need_inner_model=True),
    Scheduler("kl_optimal", "KL Optimal"),
    Scheduler("align_your_steps", "Align Your Steps"),
    Scheduler("simple", "Simple", need_inner_model=True),
    Scheduler("normal", "Normal", need_inner_model=True),
    Scheduler("ddim", "DDIM", need_inner_model=True),
    Scheduler("beta", "Beta", need_inner_model=True),
]

SAMPLER_BY_NAME = {s.name: s for s in SAMPLER_TABLE}
_SAMPLER_BY_LOWER = {n.lower(): s for s in SAMPLER_TABLE for n in (s.name, *s.aliases)}
_SCHEDULER_BY_LOWER = {n.lower(): c for c in SCHEDULER_TABLE for n in (c.name, c.label, *c.aliases)}
_SUFFIXES_LONGEST_FIRST = sorted(((o, c) for c in SCHEDULER_TABLE for o in (c.label, c.name, *c.aliases)),
                                 key=lambda oc: -len(oc[0]))


def find_sampler(name: Optional[str]) -> Optional[Sampler]:
    """The sampler called `name`: the exact name (all A1111's API accepts), or any case of the name or an
    alias ("euler A", "k_euler_a"). None when unknown."""
    return None if name is None else _SAMPLER_BY_LOWER.get(name.strip().lower())


def find_scheduler(name: Optional[str]) -> Optional[Scheduler]:
    """The scheduler called `name`: any case of its name, label or alias ("karras", "SGMUniform"). None when
    unknown."""
    return None if name is None else _SCHEDULER_BY_LOWER.get(name.strip().lower())


def split_sampler_name(name: str) -> tuple[str, Optional[str]]:
    """Split an old (≤ v1.8) combined name: "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras"); (name, None) for a
    plain sampler name. Like A1111, a trailing " <label|name|alias>" of each scheduler is cut off in table
    order (the last one cut gives the label); when that leaves no known sampler, one suffix of any case is
    tried, longest first ("dpm++ 2m KARRAS", "Euler SGM Uniform"). Raises ValueError for an unknown sampler."""
    if find_sampler(name) is not None:
        return name, None
    base, label = name, None
    for c in SCHEDULER_TABLE:
        for option in (c.label, c.name, *c.aliases):
            if base.endswith(" " + option):
                base, label = base[:-len(option) - 1], c.label
                break
    if find_sampler(base) is None:
        for option, c in _SUFFIXES_LONGEST_FIRST:
            rest = name[:-len(option) - 1]
            if name.lower().endswith(" " + option.lower()) and find_sampler(rest) is not None:
                return rest, c.label
        valid = ", ".join(s.name for s in SAMPLER_TABLE)
        raise ValueError(f"Unknown sampler {name!r}. Valid samplers: {valid} "
                         f"(or an old name with a schedule suffix, e.g. 'DPM++ 2M Karras')")
    return base, label


def resolve_sampler(name: Optional[str], scheduler: Optional[str] = None) -> tuple[Sampler, Scheduler]:
    """A1111 v1.10's API resolution of a sampler name (or alias, or old combined name; empty: DEFAULT_SAMPLER)
    and a schedule name or label (empty: Automatic), which wins over the name's suffix. Unknown names raise
    ValueError naming the valid ones."""
    explicit = None
    if scheduler not in (None, ""):
        explicit = find_scheduler(scheduler)
        if explicit is None:
            valid = ", ".join(f"{c.name} ({c.label})" for c in SCHEDULER_TABLE)
            raise ValueError(f"Unknown scheduler {scheduler!r}. Valid schedulers: {valid}")
    base, suffix = split_sampler_name(name or DEFAULT_SAMPLER)
    return find_sampler(base), explicit or find_scheduler(suffix or "Automatic")


def recorded_schedule(sampler: Sampler, scheduler: Scheduler) -> Optional[Scheduler]:
    """The schedule a k-diffusion pass really uses ("Automatic" -> the sampler's own); None when it records
    none (timestep samplers; "Automatic" on a sampler without a preferred schedule)."""
    if sampler.timesteps:
        return None
    if scheduler.name == "automatic":
        return find_scheduler(sampler.scheduler)
    return scheduler


def samplers_api() -> list[dict]:
    """`GET /sdapi/v1/samplers`."""
    return [s.api() for s in SAMPLER_TABLE]


def schedulers_api() -> list[dict]:
    """`GET /sdapi/v1/schedulers`."""
    return [c.api() for c in SCHEDULER_TABLE]
