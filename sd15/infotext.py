"""A1111 v1.10 infotext, the `info` JSON, sampler/scheduler name tables and model hashes.

Written from `spec/a1111-api.md` §6-§9 and `spec/generation.md` §2.3/§3.2 (A1111's behaviour described in
words; no A1111 code is reproduced). Pure Python: no torch.

- `SAMPLER_NAMES` / `SCHEDULERS`: what `/sdapi/v1/samplers` and `/sdapi/v1/schedulers` list (`samplers_api()`,
  `schedulers_api()` give the exact JSON), and `resolve_sampler()`: A1111's name resolution.
- `GenerationParams`: everything about one job that reaches the infotext; `create_infotext(params, index)`
  gives image `index`'s infotext byte for byte, `create_info(params, infotexts, ...)` the `info` object and
  `info_json()` its string.
- `parse_infotext(text)`: png-info's `parameters` (A1111 `parse_generation_parameters`).
- `model_hash`, `legacy_model_hash`, `addnet_hash` and `cached_hash` (a small JSON cache beside the files).

Typical use by the pipeline/server (one call per returned image, the grid being image 0's text):

    params = GenerationParams.for_job(prompt, negative_prompt, seed=fixed_seed(req.seed),
                                      subseed=fixed_seed(req.subseed), batch_size=2, n_iter=1,
                                      sampler_name=sampler, scheduler=scheduler, steps=20, cfg_scale=7.0,
                                      sd_model_name="v1-5-pruned-emaonly", sd_model_hash="6ce0161689")
    infotexts = [create_infotext(params, i) for i in range(len(params.all_prompts))]
    info = info_json(create_info(params, infotexts, job_timestamp=job_timestamp()))
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
import threading
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = [
    "A1111_VERSION", "SamplerInfo", "SchedulerInfo", "SAMPLER_NAMES", "SCHEDULERS",
    "sampler_names", "samplers_api", "schedulers_api", "find_sampler", "find_scheduler", "split_sampler_name",
    "resolve_sampler", "default_scheduler", "sampler_from_infotext", "hr_sampler_from_infotext",
    "GenerationParams", "fixed_seed", "job_seeds", "job_timestamp", "extra_generation_params",
    "create_infotext", "create_info", "info_json", "quote", "unquote", "format_hashes", "parse_infotext",
    "model_hash", "short_hash", "legacy_model_hash", "addnet_hash", "cached_hash", "HASH_CACHE_NAME",
]

log = logging.getLogger(__name__)

A1111_VERSION = "v1.10.1"  # what infotext "Version" and info "version" say by default


# =============================================================================================
# Sampler and scheduler tables (spec a1111-api.md §8.1, §8.2; generation.md §3.2)
# =============================================================================================

@dataclass(frozen=True)
class SamplerInfo:
    """One `/sdapi/v1/samplers` entry plus what the infotext needs to know about the sampler.

    name, aliases, options: exactly as the API lists them (option values are strings: "True", "karras").
    kind: "k-diffusion" (σ schedules; records "Schedule type") or "timesteps" (DDIM, DDIM CFG++, PLMS, UniPC:
          schedule types do not apply).
    has_eta: the sampling function takes `eta` (infotext "Eta" / "Eta DDIM" when it differs from the default).
    """
    name: str
    aliases: tuple[str, ...]
    options: dict = field(default_factory=dict, hash=False)
    kind: str = "k-diffusion"
    has_eta: bool = False

    @property
    def default_scheduler(self) -> Optional[str]:
        """The scheduler *name* "Automatic" means for this sampler (e.g. "karras"), or None."""
        return self.options.get("scheduler")

    @property
    def uses_ensd(self) -> bool:
        return self.options.get("uses_ensd") == "True"

    @property
    def second_order(self) -> bool:
        return self.options.get("second_order") == "True"

    @property
    def is_timesteps(self) -> bool:
        return self.kind == "timesteps"


_T = "True"

# /sdapi/v1/samplers, in A1111's order (the first is the default); option order as A1111 lists them.
SAMPLER_NAMES: list[SamplerInfo] = [
    SamplerInfo("DPM++ 2M", ("k_dpmpp_2m",), {"scheduler": "karras"}),
    SamplerInfo("DPM++ SDE", ("k_dpmpp_sde",), {"scheduler": "karras", "second_order": _T, "brownian_noise": _T},
                has_eta=True),
    SamplerInfo("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), {"scheduler": "exponential", "brownian_noise": _T},
                has_eta=True),
    SamplerInfo("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",),
                {"scheduler": "exponential", "brownian_noise": _T, "solver_type": "heun"}, has_eta=True),
    SamplerInfo("DPM++ 2S a", ("k_dpmpp_2s_a",), {"scheduler": "karras", "uses_ensd": _T, "second_order": _T},
                has_eta=True),
    SamplerInfo("DPM++ 3M SDE", ("k_dpmpp_3m_sde",),
                {"scheduler": "exponential", "discard_next_to_last_sigma": _T, "brownian_noise": _T}, has_eta=True),
    SamplerInfo("Euler a", ("k_euler_a", "k_euler_ancestral"), {"uses_ensd": _T}, has_eta=True),
    SamplerInfo("Euler", ("k_euler",), {}),
    SamplerInfo("LMS", ("k_lms",), {}),
    SamplerInfo("Heun", ("k_heun",), {"second_order": _T}),
    SamplerInfo("DPM2", ("k_dpm_2",), {"scheduler": "karras", "discard_next_to_last_sigma": _T, "second_order": _T}),
    SamplerInfo("DPM2 a", ("k_dpm_2_a",),
                {"scheduler": "karras", "discard_next_to_last_sigma": _T, "uses_ensd": _T, "second_order": _T},
                has_eta=True),
    SamplerInfo("DPM fast", ("k_dpm_fast",), {"uses_ensd": _T}, has_eta=True),
    SamplerInfo("DPM adaptive", ("k_dpm_ad",), {"uses_ensd": _T}, has_eta=True),
    SamplerInfo("Restart", ("restart",), {"scheduler": "karras", "second_order": _T}),
    SamplerInfo("DDIM", ("ddim",), {}, kind="timesteps", has_eta=True),
    SamplerInfo("DDIM CFG++", ("ddim_cfgpp",), {}, kind="timesteps", has_eta=True),
    SamplerInfo("PLMS", ("plms",), {}, kind="timesteps"),
    SamplerInfo("UniPC", ("unipc",), {}, kind="timesteps"),
    SamplerInfo("LCM", ("k_lcm",), {}),
]


@dataclass(frozen=True)
class SchedulerInfo:
    """One `/sdapi/v1/schedulers` entry. default_rho is -1.0 when the schedule has no ρ."""
    name: str
    label: str
    aliases: Optional[tuple[str, ...]] = None
    default_rho: float = -1.0
    need_inner_model: bool = False


# /sdapi/v1/schedulers (v1.10), in A1111's order; "automatic" has no schedule function of its own.
SCHEDULERS: list[SchedulerInfo] = [
    SchedulerInfo("automatic", "Automatic"),
    SchedulerInfo("uniform", "Uniform", need_inner_model=True),
    SchedulerInfo("karras", "Karras", default_rho=7.0),
    SchedulerInfo("exponential", "Exponential"),
    SchedulerInfo("polyexponential", "Polyexponential", default_rho=1.0),
    SchedulerInfo("sgm_uniform", "SGM Uniform", ("SGMUniform",), need_inner_model=True),
    SchedulerInfo("kl_optimal", "KL Optimal"),
    SchedulerInfo("align_your_steps", "Align Your Steps"),
    SchedulerInfo("simple", "Simple", need_inner_model=True),
    SchedulerInfo("normal", "Normal", need_inner_model=True),
    SchedulerInfo("ddim", "DDIM", need_inner_model=True),
    SchedulerInfo("beta", "Beta", need_inner_model=True),
]

_SAMPLER_BY_NAME = {s.name: s for s in SAMPLER_NAMES}
_SAMPLER_BY_LOWER = {}
for _s in SAMPLER_NAMES:
    for _n in (_s.name, *_s.aliases):
        _SAMPLER_BY_LOWER.setdefault(_n.lower(), _s)
_SCHEDULER_EXACT = {**{s.name: s for s in SCHEDULERS}, **{s.label: s for s in SCHEDULERS}}  # A1111's map
_SCHEDULER_BY_LOWER = {}
for _c in SCHEDULERS:
    for _n in (_c.name, _c.label, *(_c.aliases or ())):
        _SCHEDULER_BY_LOWER.setdefault(_n.lower(), _c)
del _s, _n, _c


def sampler_names() -> list[str]:
    """The 20 sampler names, in A1111's order."""
    return [s.name for s in SAMPLER_NAMES]


def samplers_api() -> list[dict]:
    """`GET /sdapi/v1/samplers`: [{name, aliases, options}] (option values are strings)."""
    return [{"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)} for s in SAMPLER_NAMES]


def schedulers_api() -> list[dict]:
    """`GET /sdapi/v1/schedulers`: [{name, label, aliases, default_rho, need_inner_model}]."""
    return [{"name": c.name, "label": c.label, "aliases": list(c.aliases) if c.aliases is not None else None,
             "default_rho": c.default_rho, "need_inner_model": c.need_inner_model} for c in SCHEDULERS]


def find_sampler(name: Optional[str], *, lenient: bool = True) -> Optional[SamplerInfo]:
    """The sampler called `name`: exact name first (all A1111's API accepts), then, when `lenient`, any
    case of the name or an alias ("euler A", "k_euler_a"; A1111's own case-insensitive alias table, which
    its scripts use). None when unknown."""
    if name is None:
        return None
    s = _SAMPLER_BY_NAME.get(name)
    if s is None and lenient:
        s = _SAMPLER_BY_LOWER.get(name.strip().lower())
    return s


def find_scheduler(name: Optional[str], *, lenient: bool = True) -> Optional[SchedulerInfo]:
    """The scheduler called `name`: its name or label exactly (A1111: "karras" or "Karras"), then, when
    `lenient`, any case of its name, label or alias ("SGMUniform", "KARRAS"). None when unknown."""
    if name is None:
        return None
    c = _SCHEDULER_EXACT.get(name)
    if c is None and lenient:
        c = _SCHEDULER_BY_LOWER.get(name.strip().lower())
    return c


def default_scheduler(sampler: str) -> Optional[str]:
    """The label "Automatic" resolves to for `sampler` ("Karras" for DPM++ 2M), or None when the sampler
    has no preferred schedule (Euler, LMS, ...: the model's default σ schedule, numerically Uniform)."""
    s = find_sampler(sampler)
    if s is None or s.default_scheduler is None:
        return None
    return _SCHEDULER_EXACT[s.default_scheduler].label


def _valid_samplers_text() -> str:
    return ", ".join(sampler_names())


def _valid_schedulers_text() -> str:
    return ", ".join(f"{c.name} ({c.label})" for c in SCHEDULERS)


def split_sampler_name(name: str, *, lenient: bool = True) -> tuple[str, Optional[str]]:
    """Split an old (≤ v1.8) combined name: "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras").

    Like A1111, a trailing " <label|name|alias>" of any scheduler is cut off (each scheduler is tried once, in
    table order, so "X Karras Uniform" loses both and keeps Karras); the last one cut gives the scheduler
    label. Returns (name, None) when nothing matches. With `lenient`, when that leaves no known sampler, one
    suffix of any case is tried, longest first: "dpm++ 2m KARRAS", and "Euler SGM Uniform" (which A1111 cuts
    as " Uniform", leaving the unknown "Euler SGM")."""
    if name in _SAMPLER_BY_NAME:
        return name, None
    base, label = name, None
    for c in SCHEDULERS:
        for option in (c.label, c.name, *(c.aliases or ())):
            if base.endswith(" " + option):
                base, label = base[:-len(option) - 1], c.label
                break
    if lenient and find_sampler(base) is None:
        for option, c in _SUFFIXES_LONGEST_FIRST:
            if name.lower().endswith(" " + option.lower()):
                rest = name[:-len(option) - 1]
                if find_sampler(rest) is not None:
                    return rest, c.label
    return base, label


_SUFFIXES_LONGEST_FIRST = sorted(((o, c) for c in SCHEDULERS for o in (c.label, c.name, *(c.aliases or ()))),
                                 key=lambda oc: -len(oc[0]))


def resolve_sampler(name: Optional[str], scheduler: Optional[str] = None, *, strict: bool = True,
                    convert_automatic: bool = False) -> tuple[str, str]:
    """A1111 v1.10's API resolution of (sampler, scheduler) -> (sampler name, scheduler label).

    - `scheduler`: name or label ("karras", "Karras"), "automatic"/"Automatic", or None/"" (= Automatic).
      With `strict` (default) an unknown one raises ValueError; otherwise it becomes Automatic (A1111).
    - `name`: a sampler name, or an old combined name ("DPM++ 2M Karras" -> ("DPM++ 2M", "Karras"));
      None/"" is the first sampler, "DPM++ 2M". Aliases and other cases ("k_euler_a", "euler a") are accepted
      too (A1111's API takes only exact names). Unknown: ValueError naming the valid samplers with `strict`,
      else A1111's silent fallback to "DPM++ 2M".
    - A suffix scheduler applies only when no valid explicit `scheduler` was given (the explicit one wins,
      as in A1111's txt2img/img2img endpoints).
    - `convert_automatic`: report "Automatic" when the scheduler is the sampler's own default (A1111's
      UI display); off by default, so "DPM++ 2M Karras" gives ("DPM++ 2M", "Karras"). Either way the σ
      schedule and the infotext are the same.
    """
    explicit = None
    if scheduler not in (None, ""):
        c = find_scheduler(scheduler)
        if c is None:
            if strict:
                raise ValueError(f"Unknown scheduler {scheduler!r}. Valid schedulers: {_valid_schedulers_text()}")
            c = SCHEDULERS[0]
        explicit = c.label

    text = name if name not in (None, "") else SAMPLER_NAMES[0].name
    base, suffix_label = split_sampler_name(text)
    sampler = find_sampler(base)
    if sampler is None:
        if strict:
            raise ValueError(f"Unknown sampler {text!r}. Valid samplers: {_valid_samplers_text()} "
                             f"(or an old name with a schedule suffix, e.g. 'DPM++ 2M Karras')")
        sampler = SAMPLER_NAMES[0]

    label = explicit or suffix_label or "Automatic"
    if convert_automatic and sampler.default_scheduler is not None \
            and _SCHEDULER_EXACT[sampler.default_scheduler].label == label:
        label = "Automatic"
    return sampler.name, label


def sampler_from_infotext(d: Mapping[str, Any]) -> tuple[str, str]:
    """(sampler, schedule type) a pasted infotext means: "Sampler" and "Schedule type" through A1111's
    split (old "DPM++ 2M Karras" -> DPM++ 2M + Karras; a missing Schedule type is Automatic; a scheduler
    equal to the sampler's default shows as "Automatic"; unknown sampler -> DPM++ 2M)."""
    return resolve_sampler(d.get("Sampler"), d.get("Schedule type"), strict=False, convert_automatic=True)


def hr_sampler_from_infotext(d: Mapping[str, Any]) -> tuple[str, str]:
    """(hires sampler, hires schedule type) of a pasted infotext, "Use same sampler"/"Use same scheduler"
    when they equal the first pass's (A1111's paste logic)."""
    hr_sampler = d.get("Hires sampler", "Use same sampler")
    hr_scheduler = d.get("Hires schedule type", "Use same scheduler")
    sampler = d.get("Sampler") if hr_sampler == "Use same sampler" else hr_sampler
    scheduler = d.get("Schedule type") if hr_scheduler == "Use same scheduler" else hr_scheduler
    # A1111 resolves this pair with the suffix winning over the explicit schedule type
    base, suffix = split_sampler_name(sampler or SAMPLER_NAMES[0].name)
    s, c = resolve_sampler(base, suffix or scheduler, strict=False, convert_automatic=True)
    return (s if s != d.get("Sampler") else "Use same sampler",
            c if c != d.get("Schedule type") else "Use same scheduler")


def _recorded_schedule(sampler: SamplerInfo, scheduler: Optional[str]) -> Optional[str]:
    """The label A1111's k-diffusion `get_sigmas` records for this pass, or None when it records nothing
    (timestep samplers; "Automatic" on a sampler without a preferred schedule; unknown names)."""
    if sampler.is_timesteps:
        return None
    name = scheduler or "Automatic"
    if name == "Automatic":
        name = sampler.default_scheduler
        if name is None:
            return None
    c = _SCHEDULER_EXACT.get(name)
    if c is None or c.name == "automatic":
        return None
    return c.label


# =============================================================================================
# Generation parameters
# =============================================================================================

def fixed_seed(seed: Any, rng: Optional[random.Random] = None) -> int:
    """A1111 `get_fixed_seed`: "", None or a non-numeric string mean -1; -1 becomes a random integer in
    [0, 4294967293]; anything else is returned as an int."""
    if seed is None or seed == "":
        seed = -1
    elif isinstance(seed, str):
        try:
            seed = int(seed)
        except ValueError:
            seed = -1
    if seed == -1:
        return int((rng or random).randrange(4294967294))
    return int(seed)


def job_seeds(seed: int, subseed: int, subseed_strength: float, count: int) -> tuple[list[int], list[int]]:
    """Per-image (seeds, subseeds) of a job of `count` images: seed + i without variation, else `seed` for
    every image; subseed + i always. Seeds must already be resolved (`fixed_seed`)."""
    seeds = [int(seed) + (i if subseed_strength == 0 else 0) for i in range(count)]
    subseeds = [int(subseed) + i for i in range(count)]
    return seeds, subseeds


def job_timestamp(now: Optional[datetime.datetime] = None) -> str:
    """`YYYYMMDDhhmmss`, local time (info "job_timestamp")."""
    return (now or datetime.datetime.now()).strftime("%Y%m%d%H%M%S")


def _tuple(v) -> Optional[tuple]:
    if v is None:
        return None
    if isinstance(v, str):
        return (v,)
    return tuple(v)


@dataclass(frozen=True)
class GenerationParams:
    """Everything about one txt2img/img2img job that reaches its infotexts and `info` object.

    Numbers are printed with Python's str(): pass them with the types the request model gives them
    (API floats such as cfg_scale arrive as 7.0 and print "7.0"; ints print "20").

    Per image (whole job, batch_size × n_iter entries; styles already applied):
      all_prompts, all_negative_prompts: final prompts.
      all_seeds, all_subseeds: resolved seeds (see `fixed_seed`, `job_seeds`).
      all_hr_prompts, all_hr_negative_prompts: hires-pass prompts; None = the same as the first pass.
    Request fields (A1111 names):
      is_img2img: img2img job (always writes "Denoising strength").
      sampler_name, scheduler: normalised on construction as A1111 does before generating: old combined
        names are split, the scheduler becomes its label ("karras" -> "Karras", None -> "Automatic"),
        unknown names fall back silently (resolve strictly beforehand with `resolve_sampler`).
      steps, cfg_scale, width, height (first-pass size), batch_size, subseed_strength,
      seed_resize_from_w/h (-1/0 = off), restore_faces, tiling (resolved bools), eta (None = the option),
      denoising_strength (None for plain API txt2img), styles, image_cfg_scale (edit models only; None).
    Hires fix (txt2img): enable_hr, hr_scale, hr_upscaler (None = not written), hr_second_pass_steps
      (0 = not written), hr_resize_x/y, hr_checkpoint_title (short title of the resolved checkpoint, None =
      same), hr_sampler_name (None = same), hr_scheduler (None = same as scheduler).
    img2img masks: has_mask, mask_blur_x/y, inpainting_fill (0 fill, 1 original, 2 latent noise,
      3 latent nothing), inpaint_full_res (effective: False when the mask was blank), inpaint_full_res_padding,
      inpainting_mask_invert, initial_noise_multiplier (None = 1.0), is_using_inpainting_conditioning,
      inpainting_mask_weight, init_img_hash.
    Model: sd_model_name (checkpoint stem), sd_model_hash (10 hex; None when not hashed), sd_vae_name
      (external VAE file's basename) and sd_vae_hash (None when no external VAE).
    Options: clip_skip (CLIP_stop_at_last_layers), eta_noise_seed_delta, randn_source, eta_ancestral,
      eta_ddim, face_restoration_model, token_merging_ratio(_hr), fp8_weight/cache_fp16_weight (None =
      no fp8), add_*_to_info switches, version (None = unknown), user (written when not None).
    extra_generation_params: further infotext entries in insertion order (e.g. "Lora hashes", "TI hashes",
      "Emphasis", "NGMS", "VAE Decoder"); a list value is per image (indexed like all_prompts); None = omit.
      They follow the entries A1111 adds at init (hires, mask) and precede those it adds while sampling
      ("Noise multiplier", "Schedule type", "Eta"); an entry with the name of a computed one keeps its
      position and takes the computed value.
    """
    all_prompts: Sequence[str] = ("",)
    all_negative_prompts: Sequence[str] = ("",)
    all_seeds: Sequence[int] = (0,)
    all_subseeds: Sequence[int] = (0,)
    all_hr_prompts: Optional[Sequence[str]] = None
    all_hr_negative_prompts: Optional[Sequence[str]] = None

    is_img2img: bool = False
    sampler_name: Optional[str] = "Euler"
    scheduler: Optional[str] = None
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    subseed_strength: float = 0
    seed_resize_from_w: int = -1
    seed_resize_from_h: int = -1
    restore_faces: bool = False
    tiling: bool = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = None
    styles: Sequence[str] = ()
    image_cfg_scale: Optional[float] = None

    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_title: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None

    has_mask: bool = False
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: Optional[float] = None
    is_using_inpainting_conditioning: bool = False
    inpainting_mask_weight: float = 1.0
    init_img_hash: Optional[str] = None

    sd_model_name: Optional[str] = None
    sd_model_hash: Optional[str] = None
    sd_vae_name: Optional[str] = None
    sd_vae_hash: Optional[str] = None

    clip_skip: int = 1
    eta_noise_seed_delta: int = 0
    randn_source: str = "GPU"
    eta_ancestral: float = 1.0
    eta_ddim: float = 0.0
    face_restoration_model: Optional[str] = "CodeFormer"
    token_merging_ratio: float = 0
    token_merging_ratio_hr: float = 0
    fp8_weight: Optional[str] = None
    cache_fp16_weight: Optional[bool] = None
    add_model_hash_to_info: bool = True
    add_model_name_to_info: bool = True
    add_vae_hash_to_info: bool = True
    add_vae_name_to_info: bool = True
    add_version_to_infotext: bool = True
    version: Optional[str] = A1111_VERSION
    user: Optional[str] = None

    extra_generation_params: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        set_ = object.__setattr__
        for name in ("all_prompts", "all_negative_prompts", "all_seeds", "all_subseeds",
                     "all_hr_prompts", "all_hr_negative_prompts", "styles"):
            set_(self, name, _tuple(getattr(self, name)))
        if self.styles is None:
            set_(self, "styles", ())
        set_(self, "extra_generation_params", dict(self.extra_generation_params or {}))

        # A1111 normalises the pair before generating: split old names (the suffix wins), label the scheduler
        base, suffix = split_sampler_name(self.sampler_name or SAMPLER_NAMES[0].name)
        sampler, label = resolve_sampler(base, suffix or self.scheduler, strict=False)
        set_(self, "sampler_name", sampler)
        set_(self, "scheduler", label)

        hr_sampler = self.hr_sampler_name
        if hr_sampler in ("", "Use same sampler"):
            hr_sampler = None
        if hr_sampler is not None and find_sampler(hr_sampler) is not None:
            hr_sampler = find_sampler(hr_sampler).name
        set_(self, "hr_sampler_name", hr_sampler)
        hr_sched = self.hr_scheduler
        if hr_sched in ("", "Use same scheduler"):
            hr_sched = None
        if hr_sched is not None and find_scheduler(hr_sched) is not None:
            hr_sched = find_scheduler(hr_sched).label
        set_(self, "hr_scheduler", hr_sched)
        if self.hr_checkpoint_title in ("", "Use same checkpoint"):
            set_(self, "hr_checkpoint_title", None)

    @classmethod
    def for_job(cls, prompt: str = "", negative_prompt: str = "", *, seed: int, subseed: int = 0,
                subseed_strength: float = 0, batch_size: int = 1, n_iter: int = 1, hr_prompt: str = "",
                hr_negative_prompt: str = "", **kw) -> "GenerationParams":
        """Params of a job of batch_size × n_iter images of one prompt: expands the per-image lists as A1111
        does (seeds per `job_seeds`; an empty hires prompt means the first-pass prompt). `seed`/`subseed`
        must be resolved already (`fixed_seed`); other keyword arguments are fields."""
        n = batch_size * n_iter
        seeds, subseeds = job_seeds(seed, subseed, subseed_strength, n)
        enable_hr = kw.get("enable_hr", False)
        return cls(all_prompts=[prompt] * n, all_negative_prompts=[negative_prompt] * n,
                   all_seeds=seeds, all_subseeds=subseeds,
                   all_hr_prompts=[hr_prompt or prompt] * n if enable_hr else None,
                   all_hr_negative_prompts=[hr_negative_prompt or negative_prompt] * n if enable_hr else None,
                   subseed_strength=subseed_strength, batch_size=batch_size, **kw)

    # ------------------------------------------------------------------ derived values
    @property
    def sampler(self) -> SamplerInfo:
        return _SAMPLER_BY_NAME[self.sampler_name]

    @property
    def hr_sampler(self) -> Optional[SamplerInfo]:
        """The hires pass's sampler (None when its name is unknown)."""
        return find_sampler(self.hr_sampler_name or self.sampler_name)

    @property
    def mask_blur(self) -> Optional[int]:
        """A1111's `mask_blur`: the blur when x and y agree, else None."""
        return self.mask_blur_x if self.mask_blur_x == self.mask_blur_y else None

    @property
    def schedule_type(self) -> str:
        """What "Schedule type" says for the first pass."""
        return _recorded_schedule(self.sampler, self.scheduler) or self.scheduler

    def hr_prompt(self, index: int) -> str:
        return (self.all_hr_prompts or self.all_prompts)[index]

    def hr_negative_prompt(self, index: int) -> str:
        return (self.all_hr_negative_prompts or self.all_negative_prompts)[index]

    def replace(self, **changes) -> "GenerationParams":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw.update(changes)
        return GenerationParams(**kw)


_HIRES_PROMPT = object()      # placeholders: per-image values filled in by create_infotext, null in `info`
_HIRES_NEG_PROMPT = object()


def _eta_entry(sampler: SamplerInfo, p: GenerationParams) -> Optional[tuple[str, float]]:
    if not sampler.has_eta:
        return None
    if sampler.is_timesteps:
        eta = p.eta if p.eta is not None else p.eta_ddim
        return ("Eta DDIM", eta) if eta != 0.0 else None
    eta = p.eta if p.eta is not None else p.eta_ancestral
    return ("Eta", eta) if eta != 1.0 else None


def _extra_params(p: GenerationParams) -> dict:
    """A1111's `p.extra_generation_params` at the end of the job, in insertion order, with placeholders for
    the per-image hires prompts."""
    extra: dict = {}

    # --- init
    if p.is_img2img:
        extra["Denoising strength"] = p.denoising_strength
        if p.has_mask:
            if p.inpainting_mask_invert:
                extra["Mask mode"] = "Inpaint not masked"
            if p.mask_blur_x > 0 or p.mask_blur_y > 0:
                extra["Mask blur"] = p.mask_blur
            if p.inpaint_full_res:
                extra["Inpaint area"] = "Only masked"
                extra["Masked area padding"] = p.inpaint_full_res_padding
            masked_content = {0: "fill", 2: "latent noise", 3: "latent nothing"}.get(p.inpainting_fill)
            if masked_content is not None:
                extra["Masked content"] = masked_content
    elif p.enable_hr:
        extra["Denoising strength"] = p.denoising_strength
        if p.hr_checkpoint_title is not None:
            extra["Hires checkpoint"] = p.hr_checkpoint_title
        if p.hr_sampler_name is not None and p.hr_sampler_name != p.sampler_name:
            extra["Hires sampler"] = p.hr_sampler_name
        extra["Hires prompt"] = _HIRES_PROMPT
        extra["Hires negative prompt"] = _HIRES_NEG_PROMPT
        extra["Hires schedule type"] = None
        if p.hr_resize_x == 0 and p.hr_resize_y == 0:
            extra["Hires upscale"] = p.hr_scale
        else:
            extra["Hires resize"] = f"{p.hr_resize_x}x{p.hr_resize_y}"
        if p.hr_second_pass_steps:
            extra["Hires steps"] = p.hr_second_pass_steps
        if p.hr_upscaler is not None:
            extra["Hires upscaler"] = p.hr_upscaler

    # --- the caller's entries (extra networks, embeddings, emphasis, ...)
    extra.update(p.extra_generation_params)

    # --- sampling (first pass)
    if p.is_img2img:
        noise_multiplier = 1.0 if p.initial_noise_multiplier is None else p.initial_noise_multiplier
        if noise_multiplier != 1.0:
            extra["Noise multiplier"] = noise_multiplier
    recorded = _recorded_schedule(p.sampler, p.scheduler)
    if recorded is not None:
        extra["Schedule type"] = recorded
    eta = _eta_entry(p.sampler, p)
    if eta is not None:
        extra[eta[0]] = eta[1]

    # --- hires pass
    if p.enable_hr and not p.is_img2img:
        hr_sampler = p.hr_sampler
        if hr_sampler is not None:
            hr_recorded = _recorded_schedule(hr_sampler, p.hr_scheduler or p.scheduler)
            if hr_recorded is not None and hr_recorded != extra.get("Schedule type"):
                extra["Hires schedule type"] = hr_recorded
            eta = _eta_entry(hr_sampler, p)
            if eta is not None:
                extra[eta[0]] = eta[1]
    return extra


def extra_generation_params(params: GenerationParams) -> dict:
    """The `info.extra_generation_params` object: A1111's extra entries in insertion order; the per-image
    "Hires prompt"/"Hires negative prompt" entries are null there (A1111 stores functions for them)."""
    return {k: (None if v is _HIRES_PROMPT or v is _HIRES_NEG_PROMPT else v) for k, v in _extra_params(params).items()}


def quote(value: Any) -> Any:
    """A1111's infotext value quoting: a value whose text has a ",", ":" or newline becomes a JSON string
    literal (non-ASCII kept); anything else is written as is."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """Inverse of `quote` for a double-quoted value; anything else (or invalid JSON) is returned unchanged."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_hashes(pairs: Iterable[tuple[str, str]]) -> str:
    """The value of "Lora hashes" / "TI hashes": "name: hash, name: hash", with ":" and "," removed from
    the names (A1111 does so, so that the value parses back)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in pairs)


def _per_image(value, index):
    if isinstance(value, list):
        return value[index]
    return value


def create_infotext(params: GenerationParams, index: int = 0) -> str:
    """Image `index`'s infotext (index over the whole job, like all_prompts; the grid's is index 0's).

    Layout: prompt, then "Negative prompt: ..." when the negative prompt is non-empty, then one line of
    "Key: value" pairs joined by ", " in A1111's order; null values are left out, a value equal to its key
    is written bare, values are quoted by `quote`. The whole text is stripped."""
    p = params
    prompt = p.all_prompts[index]
    negative_prompt = p.all_negative_prompts[index]

    eta_for_ensd = p.eta if p.eta is not None else p.eta_ancestral
    uses_ensd = p.eta_noise_seed_delta != 0 and p.sampler.uses_ensd and eta_for_ensd != 0
    variation = p.subseed_strength != 0
    extra = _extra_params(p)

    entries = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "Schedule type": p.scheduler,
        "CFG scale": p.cfg_scale,
        "Image CFG scale": p.image_cfg_scale,
        "Seed": p.all_seeds[index],
        "Face restoration": p.face_restoration_model if p.restore_faces else None,
        "Size": f"{p.width}x{p.height}",
        "Model hash": p.sd_model_hash if p.add_model_hash_to_info else None,
        "Model": p.sd_model_name if p.add_model_name_to_info else None,
        "FP8 weight": p.fp8_weight,
        "Cache FP16 weight for LoRA": p.cache_fp16_weight if p.fp8_weight is not None else None,
        "VAE hash": p.sd_vae_hash if p.add_vae_hash_to_info else None,
        "VAE": p.sd_vae_name if p.add_vae_name_to_info else None,
        "Variation seed": p.all_subseeds[index] if variation else None,
        "Variation seed strength": p.subseed_strength if variation else None,
        "Seed resize from": (None if p.seed_resize_from_w <= 0 or p.seed_resize_from_h <= 0
                             else f"{p.seed_resize_from_w}x{p.seed_resize_from_h}"),
        "Denoising strength": extra.get("Denoising strength"),
        "Conditional mask weight": p.inpainting_mask_weight if p.is_using_inpainting_conditioning else None,
        "Clip skip": None if p.clip_skip <= 1 else p.clip_skip,
        "ENSD": p.eta_noise_seed_delta if uses_ensd else None,
        "Token merging ratio": None if p.token_merging_ratio == 0 else p.token_merging_ratio,
        "Token merging ratio hr": (None if not p.enable_hr or p.token_merging_ratio_hr == 0
                                   else p.token_merging_ratio_hr),
        "Init image hash": p.init_img_hash,
        "RNG": p.randn_source if p.randn_source != "GPU" else None,
        "Tiling": "True" if p.tiling else None,
    }
    entries.update(extra)
    entries["Version"] = p.version if p.add_version_to_infotext else None
    entries["User"] = p.user

    for key, value in entries.items():
        if value is _HIRES_PROMPT:
            hr = p.hr_prompt(index)
            entries[key] = hr if hr != prompt else None
        elif value is _HIRES_NEG_PROMPT:
            hr = p.hr_negative_prompt(index)
            entries[key] = hr if hr != negative_prompt else None
        else:
            entries[key] = _per_image(value, index)

    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in entries.items() if v is not None)
    negative_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative_text}\n{line}".strip()


def create_info(params: GenerationParams, infotexts: Sequence[str], *, job_timestamp: str,
                index_of_first_image: int = 0) -> dict:
    """The `info` object of a txt2img/img2img response (spec §6), keys in A1111's order. `infotexts` are
    those of the returned images (grid first when there is one); serialise with `info_json`."""
    p = params
    return {
        "prompt": p.all_prompts[0],
        "all_prompts": list(p.all_prompts),
        "negative_prompt": p.all_negative_prompts[0],
        "all_negative_prompts": list(p.all_negative_prompts),
        "seed": p.all_seeds[0],
        "all_seeds": list(p.all_seeds),
        "subseed": p.all_subseeds[0],
        "all_subseeds": list(p.all_subseeds),
        "subseed_strength": p.subseed_strength,
        "width": p.width,
        "height": p.height,
        "sampler_name": p.sampler_name,
        "cfg_scale": p.cfg_scale,
        "steps": p.steps,
        "batch_size": p.batch_size,
        "restore_faces": p.restore_faces,
        "face_restoration_model": p.face_restoration_model if p.restore_faces else None,
        "sd_model_name": p.sd_model_name,
        "sd_model_hash": p.sd_model_hash,
        "sd_vae_name": p.sd_vae_name,
        "sd_vae_hash": p.sd_vae_hash,
        "seed_resize_from_w": p.seed_resize_from_w,
        "seed_resize_from_h": p.seed_resize_from_h,
        "denoising_strength": p.denoising_strength,
        "extra_generation_params": extra_generation_params(p),
        "index_of_first_image": index_of_first_image,
        "infotexts": list(infotexts),
        "styles": list(p.styles),
        "job_timestamp": job_timestamp,
        "clip_skip": p.clip_skip,
        "is_using_inpainting_conditioning": p.is_using_inpainting_conditioning,
        "version": p.version,
    }


def info_json(info: Mapping[str, Any]) -> str:
    """The `info` string: Python's default json.dumps (", "/": " separators, non-ASCII as \\uXXXX), with
    anything not serialisable written as null (as A1111 does)."""
    return json.dumps(info, default=lambda o: None)


# =============================================================================================
# Parsing (png-info `parameters`, the `infotext` request field): spec §7.3
# =============================================================================================

# key: a word character, then one or more word characters, spaces, "-" or "/"; value: a JSON-style
# double-quoted string, or everything up to the next comma
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def _parse_version(text: Optional[str]):
    """Comparable key of an infotext "Version" ("v1.10.1", "v1.7.0-225-gabc1234", "1.8.0-RC"), ordered as
    PEP 440 orders versions ("1.7.0-225" is post-release 225 of 1.7.0, "1.8.0-RC" a pre-release of 1.8.0);
    None when it does not parse. Only the part before a second "-" is used, as A1111 does."""
    if text is None:
        return None
    m = re.match(r"([^-]+-[^-]+)-.*", text)
    if m:
        text = m.group(1)
    m = _VERSION.fullmatch(text.strip())
    if not m:
        return None
    release = [int(x) for x in m.group(1).split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    has_post = m.group(4) is not None or m.group(6) is not None
    has_dev = m.group(9) is not None
    if m.group(2) is not None:
        pre_key = (0, _PRE_RANK[m.group(2).lower()], int(m.group(3) or 0))
    elif has_dev and not has_post:
        pre_key = (-1,)                    # 1.0.dev1 < 1.0a1
    else:
        pre_key = (1,)
    post_key = (0, int(m.group(5) or m.group(8) or 0)) if has_post else (-1,)
    dev_key = (0, int(m.group(10) or 0)) if has_dev else (1,)
    return (tuple(release), pre_key, post_key, dev_key)


_VERSION = re.compile(r"v?(\d+(?:\.\d+)*)"
                      r"(?:[-_.]?(a|b|c|rc|alpha|beta|pre|preview)[-_.]?(\d*))?"
                      r"(?:(-(\d+))|([-_.]?(post|rev|r)[-_.]?(\d*)))?"
                      r"(?:([-_.]?dev[-_.]?(\d*)))?"
                      r"(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?", re.IGNORECASE)
_PRE_RANK = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}


_V160 = _parse_version("1.6.0")
_V170_TSNR = _parse_version("v1.7.0-225")
_V180 = _parse_version("1.8.0")
_V180_HR_STYLES = _parse_version("1.8.0-139")


def _old_hires_first_pass(width: int, height: int) -> tuple[int, int]:
    """A1111's old automatic first-pass size: about 512² pixels, rounded up to multiples of 64."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def _uses_emphasis(prompt: str, negative_prompt: str) -> bool:
    from .prompt import parse_prompt_attention
    try:
        parts = parse_prompt_attention(prompt) + parse_prompt_attention(negative_prompt)
    except ValueError:  # a malformed weight such as "(a:1.2.3)": A1111 would fail here; treat as plain text
        return False
    return any(w != 1.0 and t != "BREAK" for t, w in parts)


def parse_infotext(text: str, *, skip_fields: Iterable[str] = (), backcompat: bool = True) -> dict:
    """A1111's `parse_generation_parameters` (png-info `parameters`), default options.

    - The last line holds the parameters only when at least 3 "key: value" pairs match on it; otherwise it
      is part of the prompt. Other lines (each stripped) form the prompt until one starting with
      "Negative prompt:"; from there on, the negative prompt.
    - Values are strings; a double-quoted value is JSON-unquoted; a "WxH" value is split into
      "<Key>-1"/"<Key>-2" ("Size-1": "512"). A key with an empty value is dropped (A1111 skips it).
    - "Prompt" and "Negative prompt" are added, then A1111's defaults for absent keys (spec §7.3) and the
      version back-compat flags (`backcompat`, A1111's `auto_backcompat` option, on by default).
    - Styles are not extracted (no styles are defined); `skip_fields` are removed at the end
      (A1111's `infotext_skip_pasting`).
    """
    res: dict = {}
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""

    prompt = ""
    negative_prompt = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        if in_negative:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line

    for key, value in _PARAM.findall(last):
        if value == "":
            continue
        if value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        m = _SIZE.match(value) if isinstance(value, str) else None
        if m is not None:
            res[f"{key}-1"] = m.group(1)
            res[f"{key}-2"] = m.group(2)
        else:
            res[key] = value

    # A1111 runs its style extraction here ("Apply if any"); with no styles defined it only normalises the
    # hires prompts: one equal to the first-pass prompt becomes "" (for infotexts newer than v1.8.0-139)
    if "Hires prompt" in res or "Hires negative prompt" in res:
        ver = _parse_version(res.get("Version"))
        if ver is None or ver > _V180_HR_STYLES:
            hr_prompt = res.get("Hires prompt", prompt)
            hr_negative_prompt = res.get("Hires negative prompt", negative_prompt)
            res["Hires prompt"] = "" if hr_prompt == prompt else hr_prompt
            res["Hires negative prompt"] = "" if hr_negative_prompt == negative_prompt else hr_negative_prompt

    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt

    res.setdefault("Clip skip", "1")
    hypernet = res.get("Hypernet")
    if hypernet is not None:
        res["Prompt"] += f"<hypernet:{hypernet}:{res.get('Hypernet strength', '1.0')}>"
    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0
    res.setdefault("Hires sampler", "Use same sampler")
    res.setdefault("Hires schedule type", "Use same scheduler")
    res.setdefault("Hires checkpoint", "Use same checkpoint")
    res.setdefault("Hires prompt", "")
    res.setdefault("Hires negative prompt", "")
    res.setdefault("Mask mode", "Inpaint masked")
    res.setdefault("Masked content", "original")
    res.setdefault("Inpaint area", "Whole picture")
    res.setdefault("Masked area padding", 32)

    # old "First pass size" infotexts: the first pass becomes Size, the old Size the hires target
    fw, fh = res.get("First pass size-1"), res.get("First pass size-2")
    if fw is not None and fh is not None:
        fw, fh = int(fw), int(fh)
        width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
        if fw == 0 or fh == 0:
            fw, fh = _old_hires_first_pass(width, height)
        res["Size-1"], res["Size-2"] = fw, fh
        res["Hires resize-1"], res["Hires resize-2"] = width, height

    res.setdefault("RNG", "GPU")
    res.setdefault("Schedule type", "Automatic")
    res.setdefault("Schedule max sigma", 0)
    res.setdefault("Schedule min sigma", 0)
    res.setdefault("Schedule rho", 0)
    res.setdefault("VAE Encoder", "Full")
    res.setdefault("VAE Decoder", "Full")
    res.setdefault("FP8 weight", "Disable")
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    if "Emphasis" not in res and _uses_emphasis(prompt, negative_prompt):
        res["Emphasis"] = "Original"
    res.setdefault("Refiner switch by sampling steps", False)

    if backcompat:
        ver = _parse_version(res.get("Version"))
        if ver is not None:
            if ver < _V160 and "[" in res.get("Prompt", ""):
                res["Old prompt editing timelines"] = True
            if ver < _V160 and res.get("Sampler", "") in ("DDIM", "PLMS"):
                res["Pad conds v0"] = True
            if ver < _V170_TSNR:
                res["Downcast alphas_cumprod"] = True
            if ver < _V180 and res.get("Refiner"):
                res["Refiner switch by sampling steps"] = True

    for key in skip_fields:
        res.pop(key, None)
    return res


# =============================================================================================
# Hashes (spec §9.3) and their cache
# =============================================================================================

_BLOCK = 1 << 20
HASH_CACHE_NAME = ".sd15-hashes.json"
_CACHE_FORMAT = 1
_cache_lock = threading.Lock()


def _sha256_from(f, offset: int = 0) -> str:
    h = hashlib.sha256()
    f.seek(offset)
    for block in iter(lambda: f.read(_BLOCK), b""):
        h.update(block)
    return h.hexdigest()


def model_hash(path: str | os.PathLike) -> str:
    """SHA-256 of the whole file, lowercase hex (64 digits), read in 1 MiB blocks. A1111's "hash"/"Model
    hash"/"VAE hash" is its first 10 digits (`short_hash`)."""
    with open(path, "rb") as f:
        return _sha256_from(f)


def short_hash(full: Optional[str]) -> Optional[str]:
    """The 10-digit form A1111 shows (titles, infotext "Model hash")."""
    return full[:10] if full else None


def legacy_model_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-digit hash: SHA-256 of the 0x10000 bytes at offset 0x100000 (whatever is there for a
    shorter file, so the hash of nothing when it ends before), "NOFILE" when the file does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    except FileNotFoundError:
        return "NOFILE"


def addnet_hash(path: str | os.PathLike) -> str:
    """LoRA hash: for .safetensors, SHA-256 of the file after its header (8-byte length + JSON), else the
    whole file's SHA-256. A1111 writes its first 12 digits in "Lora hashes"."""
    with open(path, "rb") as f:
        if str(path).lower().endswith(".safetensors"):
            n = int.from_bytes(f.read(8), "little")
            return _sha256_from(f, 8 + n)
        return _sha256_from(f)


def _read_cache(cache_path: str) -> dict:
    try:
        with open(cache_path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("ignoring unreadable hash cache %s", cache_path)
        return {}
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return {k: v for k, v in data["files"].items() if isinstance(v, dict)}


def _write_cache(cache_path: str, files: dict) -> None:
    directory = os.path.dirname(cache_path) or "."
    tmp = None
    try:
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, prefix=HASH_CACHE_NAME + ".",
                                         suffix=".tmp", delete=False) as f:
            tmp = f.name
            json.dump({"format": _CACHE_FORMAT, "files": files}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache_path)
        tmp = None
    except OSError as e:  # read-only model folder and the like: hashes are just not remembered
        log.info("could not write hash cache %s: %s", cache_path, e)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def cached_hash(path: str | os.PathLike, kind: str = "sha256", *, use_cache: bool = True,
                compute: bool = True) -> Optional[str]:
    """`model_hash` (kind "sha256") or `addnet_hash` (kind "addnet") of `path`, remembered in
    `<dir>/.sd15-hashes.json` under the file's name with its size and mtime (ns): a changed size or mtime
    recomputes it. The cache is rewritten atomically (temp file + rename); a corrupt or unreadable cache
    counts as empty, an unwritable folder just means no caching. With `compute=False` only a cached value
    is returned (None when there is none), e.g. to list checkpoints without hashing them (A1111 titles
    carry the hash only once it is known)."""
    hasher = {"sha256": model_hash, "addnet": addnet_hash}.get(kind)  # looked up per call (patchable)
    if hasher is None:
        raise ValueError(f"unknown hash kind {kind!r} (sha256, addnet)")
    path = os.fspath(path)
    if not use_cache:
        return hasher(path) if compute else None
    st = os.stat(path)
    cache_path = os.path.join(os.path.dirname(os.path.abspath(path)), HASH_CACHE_NAME)
    key = os.path.basename(path)

    def fresh(entry) -> bool:
        return entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns

    with _cache_lock:
        entry = _read_cache(cache_path).get(key)
    if entry is not None and fresh(entry) and isinstance(entry.get(kind), str):
        return entry[kind]
    if not compute:
        return None

    value = hasher(path)

    with _cache_lock:
        files = _read_cache(cache_path)  # re-read: another process may have added entries meanwhile
        entry = files.get(key)
        if entry is None or not fresh(entry):
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        entry[kind] = value
        files[key] = entry
        _write_cache(cache_path, files)
    return value
