"""The one description of a generation request: `GenerationRequest` (A1111's API field names and defaults),
`validate` (ranges and limits -> RequestError) and `resolve` (every choice made once). The server's request
bodies, the CLI's options and `model.txt2img/img2img` are made from its fields, so adding a field is an edit
here. A field's `metadata["group"]`: "prompt", "seeds", "sampling", "size", "img2img", "hires" are A1111 API
request fields (txt2img takes all but "img2img", img2img all but "hires"); "settings" are A1111 options that
change the numbers (the server takes them from its options).
"""
from __future__ import annotations

import dataclasses
import inspect
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from sd15.a1111.images import LATENT_UPSCALE_MODES, PIXEL_UPSCALERS
from sd15.samplers.table import DEFAULT_SAMPLER, Sampler, Scheduler, resolve_sampler

DEFAULT_DENOISING_STRENGTH = 0.75  # img2img's API default, also what a hires pass without a strength uses
DEFAULT_HR_UPSCALER = "Latent"
RANDN_SOURCES = ("GPU", "CPU", "NV")
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")  # A1111's `modules/sd_emphasis.py` options
MAX_SEED = 2**63 - 1  # seeds are signed 64-bit here; A1111 draws random ones below 2**32


def _f(default, group: str, doc: str = "", lo=None, hi=None, infotext=()):
    """A schema field: default, group, help text, range (None: open) and the infotext keys that carry it
    ("Size-1" is the first number of "Size")."""
    return field(default=default, metadata={"group": group, "doc": doc, "lo": lo, "hi": hi, "infotext": infotext})


@dataclass(frozen=True)
class GenerationRequest:
    """One A1111 txt2img / img2img request (img2img when `init_images` is set)."""
    # prompt
    prompt: str = _f("", "prompt", "the prompt (A1111 syntax: (word:1.2), [a:b:0.5], <lora:name:0.8>, BREAK)",
        infotext=('Prompt',))
    negative_prompt: str = _f("", "prompt", "the negative prompt", infotext=('Negative prompt',))
    # seeds
    seed: int = _f(-1, "seeds", "-1: random; image k of the job gets seed + k", -1, MAX_SEED, infotext=('Seed',))
    subseed: int = _f(-1, "seeds", "variation seed, -1: random", -1, MAX_SEED, infotext=('Variation seed',))
    subseed_strength: float = _f(0, "seeds", "variation strength (the int 0 as A1111 echoes it)", 0.0, 1.0,
        infotext=('Variation seed strength',))
    seed_resize_from_h: int = _f(-1, "seeds", "make the noise as for this height", -1, infotext=('Seed resize from-2',))
    seed_resize_from_w: int = _f(-1, "seeds", "make the noise as for this width", -1, infotext=('Seed resize from-1',))
    # sampling
    sampler_name: Optional[str] = _f(None, "sampling", f'A1111 sampler name, e.g. "Euler a", "DPM++ 2M Karras"; '
                                                       f'empty: "{DEFAULT_SAMPLER}"', infotext=('Sampler',))
    scheduler: Optional[str] = _f(None, "sampling", 'schedule type, e.g. "Karras"; empty: the sampler\'s own',
        infotext=('Schedule type',))
    steps: int = _f(50, "sampling", "sampling steps", 1, infotext=('Steps',))
    cfg_scale: float = _f(7.0, "sampling", "classifier-free guidance scale", -100.0, 100.0, infotext=('CFG scale',))
    eta: Optional[float] = _f(None, "sampling", "noise of ancestral samplers and DDIM; empty: eta_ddim for "
                                                "DDIM, else eta_ancestral", 0.0, 1000.0)
    s_churn: Optional[float] = _f(None, "sampling", "", 0.0, 1000.0)
    s_tmin: Optional[float] = _f(None, "sampling", "", 0.0, 1000.0)
    s_tmax: Optional[float] = _f(None, "sampling", "", 0.0, 1000.0)
    s_noise: Optional[float] = _f(None, "sampling", "", 0.0, 1000.0)
    s_min_uncond: Optional[float] = _f(None, "sampling", "negative guidance minimum sigma (NGMS)", 0.0,
                                       1000.0, infotext=('NGMS',))
    tiling: bool = _f(False, "sampling", "seamless tiling: the image wraps around left-right and top-bottom",
        infotext=('Tiling',))
    # size and batch
    width: int = _f(512, "size", "image width", 8, infotext=('Size-1',))
    height: int = _f(512, "size", "image height", 8, infotext=('Size-2',))
    batch_size: int = _f(1, "size", "images per batch", 1)
    n_iter: int = _f(1, "size", "batches", 1)
    denoising_strength: Optional[float] = _f(None, "sampling", f"img2img and hires strength; empty: "
                                                           f"{DEFAULT_DENOISING_STRENGTH}", 0.0, 1.0,
                                                               infotext=('Denoising strength',))
    # img2img / inpainting
    init_images: Optional[list] = _f(None, "img2img", "init images (PIL images or base64 strings)")
    resize_mode: int = _f(0, "img2img", "0 resize, 1 crop and resize, 2 resize and fill, 3 latent upscale", 0, 3)
    mask: Any = _f(None, "img2img", "inpainting mask (white: repaint)")
    mask_blur: Optional[int] = _f(None, "img2img", "mask blur on both axes (overrides mask_blur_x/y)", 0, 256,
        infotext=('Mask blur',))
    mask_blur_x: int = _f(4, "img2img", "", 0, 256)
    mask_blur_y: int = _f(4, "img2img", "", 0, 256)
    mask_round: bool = _f(True, "img2img", "")
    inpainting_fill: int = _f(0, "img2img", "0 fill, 1 original, 2 latent noise, 3 latent nothing", 0, 3)
    inpaint_full_res: bool = _f(True, "img2img", "inpaint only the masked area")
    inpaint_full_res_padding: int = _f(0, "img2img", "", 0)
    inpainting_mask_invert: int = _f(0, "img2img", "", 0, 1)
    initial_noise_multiplier: Optional[float] = _f(None, "img2img", "", 0.0, 10.0)
    # hires fix (txt2img)
    enable_hr: bool = _f(False, "hires", "hires fix: a second img2img pass at a larger size")
    hr_scale: float = _f(2.0, "hires", "", 0.05, 16.0, infotext=('Hires upscale',))
    hr_upscaler: Optional[str] = _f(None, "hires", f'empty: "{DEFAULT_HR_UPSCALER}"', infotext=('Hires upscaler',))
    hr_second_pass_steps: int = _f(0, "hires", "0: as many as steps", 0, infotext=('Hires steps',))
    hr_resize_x: int = _f(0, "hires", "", 0, infotext=('Hires resize-1',))
    hr_resize_y: int = _f(0, "hires", "", 0, infotext=('Hires resize-2',))
    hr_sampler_name: Optional[str] = _f(None, "hires", "empty: the first pass's sampler", infotext=('Hires sampler',))
    hr_scheduler: Optional[str] = _f(None, "hires", "empty: the first pass's schedule type",
        infotext=('Hires schedule type',))
    hr_prompt: str = _f("", "hires", "empty: the prompt", infotext=('Hires prompt',))
    hr_negative_prompt: str = _f("", "hires", "empty: the negative prompt", infotext=('Hires negative prompt',))
    # A1111 settings that change the numbers
    randn_source: str = _f("GPU", "settings", "GPU, CPU or NV: where A1111 would draw the noise", infotext=('RNG',))
    eta_noise_seed_delta: int = _f(0, "settings", "ENSD", 0, 2**32 - 1, infotext=('ENSD',))
    clip_skip: int = _f(1, "settings", "CLIP_stop_at_last_layers", 1, 12, infotext=('Clip skip',))
    eta_ddim: float = _f(0.0, "settings", "A1111's option: DDIM's eta when eta is empty", 0.0, 1000.0,
                         infotext=('Eta DDIM',))
    eta_ancestral: float = _f(1.0, "settings", "A1111's option: the ancestral and SDE samplers' eta when "
                                               "eta is empty", 0.0, 1000.0, infotext=('Eta',))
    emphasis: str = _f("Original", "settings", "A1111's option: (word:1.2) weights with the mean restored "
                                               "(Original), without (No norm), parsed but unweighted (Ignore), "
                                               "or not parsed (None)", infotext=('Emphasis',))
    comma_padding_backtrack: int = _f(20, "settings", "A1111's option: a full 75-token chunk moves the words "
                                                      "after a comma up to this many tokens back to the next "
                                                      "(0: never)", 0, 74)
    sigma_min: float = _f(0.0, "settings", "A1111's option: the schedule's lowest σ (0: the model's)", 0.0,
                          infotext=('Schedule min sigma',))
    sigma_max: float = _f(0.0, "settings", "A1111's option: the schedule's highest σ (0: the model's)", 0.0,
                          infotext=('Schedule max sigma',))
    rho: float = _f(0.0, "settings", "A1111's option: Karras's and Polyexponential's ρ (0: theirs, 7 and 1)",
                    0.0, infotext=('Schedule rho',))
    # A1111 writes "Beta schedule alpha/beta" but its paste reads the options' "Beta scheduler alpha/beta"
    beta_dist_alpha: float = _f(0.6, "settings", "A1111's option: the Beta schedule's α", 0.01, 1.0,
                                infotext=('Beta scheduler alpha',))
    beta_dist_beta: float = _f(0.6, "settings", "A1111's option: the Beta schedule's β", 0.01, 1.0,
                               infotext=('Beta scheduler beta',))
    always_discard_next_to_last_sigma: bool = _f(False, "settings", "A1111's option: every sampler's "
                                                                    "schedule is made for steps + 1, then "
                                                                    "loses its penultimate σ (DDIM, PLMS, "
                                                                    "UniPC: kept)",
                                                 infotext=('Discard penultimate sigma',))
    skip_early_cond: float = _f(0.0, "settings", "A1111's option: this fraction of the steps, the first, run "
                                                 "without the negative prompt (no CFG)", 0.0, 1.0,
                                infotext=('Skip Early CFG',))
    s_min_uncond_all: bool = _f(False, "settings", "A1111's option: NGMS skips the negative prompt at every "
                                                   "step below its σ, not every other",
                                infotext=('NGMS all steps',))
    img2img_color_correction: bool = _f(False, "settings", "A1111's option: match each img2img result's "
                                                           "colours to its init image's (LAB histograms)")

    @property
    def is_img2img(self) -> bool:
        return self.init_images is not None

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(GenerationRequest)}


def fields_of(*groups: str) -> list[dataclasses.Field]:
    """The fields of `groups`, in schema order."""
    return [f for f in FIELDS.values() if f.metadata["group"] in groups]


def value_type(f: dataclasses.Field) -> Optional[type]:
    """The type of a field's values, `Optional` aside ("Optional[int]" -> int); None for images and masks."""
    name = f.type.removeprefix("Optional[").rstrip("]")
    return {"int": int, "float": float, "str": str, "bool": bool}.get(name)


def signature(*groups: str, extra: tuple = ()) -> inspect.Signature:
    """The keyword-only signature of the fields of `groups` (then `extra`), for functions that take a request
    as keyword arguments (`model.txt2img`), so that help() and tab completion list them."""
    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
              for f in fields_of(*groups)]
    return inspect.Signature([*params, *extra])


class RequestError(ValueError):
    """A request that cannot run: `problems` is a list of `(field, message, kind)`; kind is a pydantic-style
    error type ("value_error.number.not_ge", ...). The server answers 422, the CLI one line and exit 2."""

    def __init__(self, problems: list[tuple[Optional[str], str, str]]):
        super().__init__("; ".join(f"{name}: {msg}" if name else msg for name, msg, _ in problems))
        self.problems = problems


@dataclass(frozen=True)
class Limits:
    """What one request may ask for beyond the fields' own ranges (the server's `--max-*` flags)."""
    max_pixels: Optional[int] = None   # width × height of any pass (the hires target included)
    max_side: Optional[int] = None     # either side of any pass
    max_steps: int = 10000             # steps and hr_second_pass_steps
    max_batch_size: Optional[int] = None
    max_n_iter: Optional[int] = None
    max_images: Optional[int] = None   # batch_size × n_iter


def range_problem(name, value, lo=None, hi=None) -> Optional[tuple[str, str, str]]:
    """Pydantic v1's `(field, message, type)` for a number below `lo` or above `hi`, else None (also for
    what is not a number: other checks name its type)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if lo is not None and value < lo:
        return name, f"ensure this value is greater than or equal to {lo}", "value_error.number.not_ge"
    if hi is not None and value > hi:
        return name, f"ensure this value is less than or equal to {hi}", "value_error.number.not_le"
    return None


def validate(req: GenerationRequest, limits: Limits = Limits()) -> None:
    """The one range check of a request: every field's range, the limits, and what only makes sense
    together. Raises RequestError listing every problem."""
    problems = []

    def check(name, value, lo=None, hi=None):
        problem = range_problem(name, value, lo, hi)
        if problem:
            problems.append(problem)

    groups = {"prompt", "seeds", "sampling", "size", "settings", "img2img" if req.is_img2img else "hires"}
    for f in FIELDS.values():
        if f.metadata["group"] in groups:
            check(f.name, getattr(req, f.name), f.metadata["lo"], f.metadata["hi"])
    for name, limit in (("steps", limits.max_steps), ("hr_second_pass_steps", limits.max_steps),
                        ("batch_size", limits.max_batch_size), ("n_iter", limits.max_n_iter),
                        ("seed_resize_from_h", limits.max_side), ("seed_resize_from_w", limits.max_side)):
        check(name, getattr(req, name), None, limit)
    if limits.max_images is not None and req.batch_size * req.n_iter > limits.max_images:
        problems.append(("n_iter", f"batch_size × n_iter must be at most {limits.max_images}", "value_error"))
    if req.randn_source not in RANDN_SOURCES:
        problems.append(("randn_source", f"must be one of {', '.join(RANDN_SOURCES)}", "value_error"))
    if req.emphasis not in EMPHASIS_MODES:
        problems.append(("emphasis", f"must be one of {', '.join(EMPHASIS_MODES)}", "value_error"))
    if req.is_img2img:
        if not req.init_images:
            problems.append(("init_images", "img2img needs init_images", "value_error"))
        elif len(req.init_images) > max(req.batch_size, 1) and len(req.init_images) > 1:
            problems.append(("init_images", f"bad number of images passed: {len(req.init_images)} init images for "
                                            f"batch_size {req.batch_size}", "value_error"))
    sizes = [("width", "height", req.width, req.height, None)]  # the fields' own ranges say at least 8
    if req.enable_hr and not req.is_img2img and not problems:
        hr_w, hr_h, _, _ = hires_target_size(req.width, req.height, req.hr_scale, req.hr_resize_x, req.hr_resize_y)
        sizes.append(("hr_resize_x", "hr_resize_y", hr_w, hr_h, 8))
    for wname, hname, w, h, lo in sizes:
        check(wname, w, lo, limits.max_side)
        check(hname, h, lo, limits.max_side)
        if limits.max_pixels is not None and w * h > limits.max_pixels:
            problems.append((wname, f"{w}x{h} is {w * h} pixels; the limit is {limits.max_pixels}", "value_error"))
    if problems:
        raise RequestError(problems)


def fixed_seed(seed: Any, rng: Optional[random.Random] = None) -> int:
    """A1111 `get_fixed_seed`: "", None or a non-numeric string mean -1, and -1 a random integer in
    [0, 4294967293]."""
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        seed = -1
    return (rng or random).randrange(4294967294) if seed == -1 else seed


def job_seeds(seed: int, subseed: int, subseed_strength: float, count: int) -> tuple[list[int], list[int]]:
    """Per-image (seeds, subseeds) of `count` images: seed + i without variation, else `seed` for every
    image; subseed + i always. Seeds must already be resolved (`fixed_seed`)."""
    return ([int(seed) + (i if subseed_strength == 0 else 0) for i in range(count)],
            [int(subseed) + i for i in range(count)])


def hires_target_size(width: int, height: int, hr_scale: float = 2.0, hr_resize_x: int = 0,
                      hr_resize_y: int = 0) -> tuple[int, int, int, int]:
    """A1111 `calculate_target_resolution`: `(hr_w, hr_h, truncate_x, truncate_y)`. Without a resize, the
    size times `hr_scale`; with one side, the other from the aspect ratio; with both, the size that covers
    them, and the latent pixels `truncate_latent` crops after the upscale."""
    if hr_resize_x == 0 and hr_resize_y == 0:
        return int(width * hr_scale), int(height * hr_scale), 0, 0
    if hr_resize_y == 0:
        return hr_resize_x, hr_resize_x * height // width, 0, 0
    if hr_resize_x == 0:
        return hr_resize_y * width // height, hr_resize_y, 0, 0
    if width / height < hr_resize_x / hr_resize_y:
        x, y = hr_resize_x, hr_resize_x * height // width
    else:
        x, y = hr_resize_y * width // height, hr_resize_y
    return x, y, (x - hr_resize_x) // 8, (y - hr_resize_y) // 8


@dataclass(frozen=True)
class Hires:
    """The resolved hires pass: its sampler, schedule, steps, target size and latent crop."""
    sampler: Sampler
    scheduler: Scheduler
    steps: int
    width: int
    height: int
    truncate_x: int
    truncate_y: int
    upscaler: str
    prompt: str
    negative_prompt: str


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with every choice made: what generation and the infotext read (never re-resolved)."""
    request: GenerationRequest
    sampler: Sampler
    scheduler: Scheduler
    seeds: list[int]                  # per image of the whole job (batch_size × n_iter)
    subseeds: list[int]
    batch_size: int                   # img2img with several init images: their number
    strength: Optional[float]         # img2img / hires denoising strength; None for plain txt2img
    hires: Optional[Hires]
    mask_blur_x: int
    mask_blur_y: int

    @property
    def is_img2img(self) -> bool:
        return self.request.is_img2img

    def eta_of(self, sampler: Sampler) -> float:
        """The eta of a pass with `sampler` (A1111's `Sampler.initialize`): the request's `eta`, else
        `eta_ddim` for the timestep samplers and `eta_ancestral` for the others."""
        if self.request.eta is not None:
            return self.request.eta
        return self.request.eta_ddim if sampler.timesteps else self.request.eta_ancestral

    def __getattr__(self, name):      # the request's own fields read through: r.prompt, r.steps, ...
        if name in FIELDS:
            return getattr(self.request, name)
        raise AttributeError(name)


def _same(name: Optional[str]) -> Optional[str]:
    """A1111's "Use same sampler" / "Use same scheduler" mean the first pass's, as empty does."""
    return None if name in ("Use same sampler", "Use same scheduler") else name


def resolve(req: GenerationRequest, *, upscalers: Optional[Iterable[str]] = None) -> ResolvedRequest:
    """Make every choice of a validated request once. Unknown sampler, scheduler or hires upscaler names raise
    ValueError naming the valid ones (the server answers 400, as A1111 does). `upscalers`: the pixel upscaler
    names available (`sd15.upscale.Upscalers.names()`; None: the built-ins)."""
    sampler, scheduler = resolve_sampler(req.sampler_name, req.scheduler)
    batch_size = len(req.init_images) if req.is_img2img and len(req.init_images) > 1 else req.batch_size
    n = batch_size * req.n_iter
    seeds, subseeds = job_seeds(fixed_seed(req.seed), fixed_seed(req.subseed), req.subseed_strength, n)
    hires = None
    if req.enable_hr and not req.is_img2img:
        hr_sampler, hr_scheduler = resolve_sampler(_same(req.hr_sampler_name) or sampler.name,
                                                   _same(req.hr_scheduler) or scheduler.name)
        upscaler = req.hr_upscaler or DEFAULT_HR_UPSCALER
        pixel_upscalers = PIXEL_UPSCALERS if upscalers is None else tuple(upscalers)
        if upscaler not in LATENT_UPSCALE_MODES and upscaler not in pixel_upscalers:
            valid = ", ".join([*LATENT_UPSCALE_MODES, *pixel_upscalers])
            raise ValueError(f"could not find upscaler named {upscaler}. Valid upscalers: {valid}")
        w, h, tx, ty = hires_target_size(req.width, req.height, req.hr_scale, req.hr_resize_x, req.hr_resize_y)
        hires = Hires(hr_sampler, hr_scheduler, req.hr_second_pass_steps or req.steps, w, h, tx, ty, upscaler,
                      req.hr_prompt or req.prompt, req.hr_negative_prompt or req.negative_prompt)
    strength = None
    if req.is_img2img or hires is not None:
        strength = DEFAULT_DENOISING_STRENGTH if req.denoising_strength is None else req.denoising_strength
    blur_x = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
    blur_y = req.mask_blur if req.mask_blur is not None else req.mask_blur_y
    return ResolvedRequest(req, sampler, scheduler, seeds, subseeds, batch_size, strength, hires, blur_x, blur_y)
