"""The A1111 `/sdapi/v1` request and response shapes, written out (spec a1111-api.md §2, §4-§7, §9-§11).

- `Txt2ImgRequest` / `Img2ImgRequest` / `PngInfoRequest`: explicit dataclasses with A1111 v1.10's field
  names and API defaults (steps 50, sampler "Euler" through `sampler_index`, img2img denoising 0.75, ...).
  `from_json` coerces as A1111's pydantic v1 models do ("7" -> 7, 7 -> 7.0, "true" -> True), answers a wrong
  type with FastAPI's 422 shape, treats `null` as "not given", and ignores (and logs) unknown fields.
- `check(req, limits)`: ranges and limits (sizes, steps, batch, strengths, seeds), 422 in the same shape.
- `to_params(req, ...)`: the request as an `sd15.pipeline.Params`; the server adds nothing of its own.
- `OPTIONS`: every A1111 `/sdapi/v1/options` key with its default and checks (server/options.py).
- Error bodies: `ApiError` -> `{"error", "detail", "body", "errors"}` (§11.2); `ValidationError` -> FastAPI's
  `{"detail": [{"loc", "msg", "type"}]}` (§11.3).

Nothing here touches the model; the endpoints live in server/app.py.
"""
from __future__ import annotations

import base64
import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from typing import Optional

from sd15 import images as imgs
from sd15 import infotext
from server.coerce import ValidationError, convert  # pydantic v1 coercion and FastAPI's 422 shape
from server.options import OPTIONS, READ_ONLY_OPTIONS, options_json, validate as option_value  # noqa: F401

log = logging.getLogger("server")

MAX_SEED = 2**63 - 1  # seeds are signed 64-bit here; A1111 draws random ones below 2**32


# =============================================================================================
# Errors
# =============================================================================================

class ApiError(Exception):
    """An error answered with A1111's handler body (§11.2): `{"error", "detail", "body", "errors"}`."""

    def __init__(self, status: int, detail: str = "", *, error: str = "HTTPException", errors: str = "",
                 headers: Optional[dict] = None):
        super().__init__(detail or errors)
        self.status, self.detail, self.error, self.errors = status, detail, error, errors
        self.headers = headers  # e.g. Retry-After on a 503

    def body(self) -> dict:
        return {"error": self.error, "detail": self.detail, "body": "", "errors": self.errors}


class _Request:
    """`from_json` / `echo` shared by the request dataclasses below."""

    @classmethod
    def from_json(cls, data):
        if not isinstance(data, dict):
            raise ValidationError.one(None, "value is not a valid dict", "type_error.dict")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            log.warning("%s: ignoring unknown field(s): %s", cls.__name__, ", ".join(unknown))
        if isinstance(data.get("infotext"), str) and data["infotext"].strip():
            data = merge_infotext(data, names)
        kw, problems = {}, []
        for name in names:
            value = data.get(name)
            if value is None:  # missing or null: the default (A1111 would pass null on and maybe fail later)
                continue
            try:
                kw[name] = convert(name, value, hints[name])
            except ValidationError as e:
                problems += e.problems
        missing = [n for n in getattr(cls, "REQUIRED", ()) if n not in kw]
        problems += [ValidationError.problem(n, "field required", "value_error.missing") for n in missing]
        if problems:
            raise ValidationError(problems)
        return cls(**kw)

    def echo(self) -> dict:
        """The `parameters` of a response: every field, as received after coercion (§4.5)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# =============================================================================================
# Requests (§4.2, §5), fields in A1111's order
# =============================================================================================

@dataclass
class _GenerationRequest(_Request):
    prompt: str = ""
    negative_prompt: str = ""
    styles: Optional[list[str]] = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: Optional[str] = None
    scheduler: Optional[str] = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = None
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict] = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: bool = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict] = None
    force_task_id: Optional[str] = None
    sampler_index: str = "Euler"
    script_name: Optional[str] = None
    script_args: list = field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = field(default_factory=dict)
    infotext: Optional[str] = None

    is_img2img = False


@dataclass
class Txt2ImgRequest(_GenerationRequest):
    """POST /sdapi/v1/txt2img (§4.2)."""
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


@dataclass
class Img2ImgRequest(_GenerationRequest):
    """POST /sdapi/v1/img2img (§5): init images (and an optional inpainting mask) as base64 or data URLs."""
    init_images: Optional[list[str]] = None
    resize_mode: int = 0
    denoising_strength: Optional[float] = 0.75
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: Optional[int] = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: bool = False

    is_img2img = True

    def echo(self) -> dict:
        out = super().echo()
        if not self.include_init_images:  # A1111 does not send the (large) inputs back unless asked
            out["init_images"] = None
            out["mask"] = None
        return out


@dataclass
class PngInfoRequest(_Request):
    """POST /sdapi/v1/png-info: `{image}` (base64 or data URL)."""
    image: str = ""

    REQUIRED = ("image",)


# The `infotext` request field (§4.2, v1.8+): infotext keys -> request fields the client did not set.
_INFOTEXT_FIELDS = {
    "Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps", "Sampler": "sampler_name",
    "Schedule type": "scheduler", "CFG scale": "cfg_scale", "Seed": "seed", "Size-1": "width", "Size-2": "height",
    "Variation seed": "subseed", "Variation seed strength": "subseed_strength",
    "Seed resize from-1": "seed_resize_from_w", "Seed resize from-2": "seed_resize_from_h",
    "Denoising strength": "denoising_strength", "Hires upscale": "hr_scale", "Hires upscaler": "hr_upscaler",
    "Hires steps": "hr_second_pass_steps", "Hires resize-1": "hr_resize_x", "Hires resize-2": "hr_resize_y",
    "Hires prompt": "hr_prompt", "Hires negative prompt": "hr_negative_prompt", "Hires sampler": "hr_sampler_name",
    "Hires schedule type": "hr_scheduler", "Mask blur": "mask_blur", "Eta": "eta", "Eta DDIM": "eta",
}
# ... and infotext keys that are settings: they go into override_settings unless already there
_INFOTEXT_SETTINGS = {"Clip skip": "CLIP_stop_at_last_layers", "ENSD": "eta_noise_seed_delta", "RNG": "randn_source"}
_USE_SAME = {"Use same sampler", "Use same scheduler", "Use same checkpoint"}


def merge_infotext(data: dict, names: list[str]) -> dict:
    """Fill fields (and settings) that `data` does not set from its `infotext` string, as A1111 does."""
    parsed = infotext.parse_infotext(data["infotext"])
    out = dict(data)
    for key, name in _INFOTEXT_FIELDS.items():
        value = parsed.get(key)
        if name in names and out.get(name) is None and value not in (None, "") and value not in _USE_SAME:
            out[name] = value
    if "enable_hr" in names and out.get("enable_hr") is None and "Hires upscale" in parsed:
        out["enable_hr"] = True
    overrides = dict(out.get("override_settings") or {})
    for key, option in _INFOTEXT_SETTINGS.items():
        if key in parsed and option not in overrides:
            overrides[option] = parsed[key]
    if overrides:
        out["override_settings"] = overrides
    return out


# =============================================================================================
# Ranges and limits
# =============================================================================================

@dataclass
class Limits:
    """What one request may ask for (generous defaults; `sd15-server --max-*` flags change them)."""
    max_pixels: int = 2048 * 2048  # width × height of any pass (the hires target included)
    max_side: int = 4096  # either side of any pass
    max_steps: int = 1000  # steps and hr_second_pass_steps
    max_batch_size: int = 16
    max_n_iter: int = 100
    max_images: int = 256  # batch_size × n_iter
    max_body_bytes: int = 64 << 20  # request body
    max_image_pixels: int = 8192 * 8192  # every decoded input image (decompression-bomb guard)
    max_image_side: int = 16384  # either side of an input image (init image or mask)
    max_image_aspect: float = 64.0  # longer side / shorter side of an input image
    max_prompt_chars: int = 20000  # prompt, negative prompt, hires prompts (each)


class _Checker:
    def __init__(self):
        self.problems: list[dict] = []

    def range(self, name, value, lo=None, hi=None):
        if value is None:
            return
        if lo is not None and value < lo:
            self.problems.append(ValidationError.problem(
                name, f"ensure this value is greater than or equal to {lo}", "value_error.number.not_ge"))
        elif hi is not None and value > hi:
            self.problems.append(ValidationError.problem(
                name, f"ensure this value is less than or equal to {hi}", "value_error.number.not_le"))

    def fail(self, name, msg):
        self.problems.append(ValidationError.problem(name, msg, "value_error"))


def hires_size(req: Txt2ImgRequest) -> tuple[int, int, int, int]:
    """(first-pass width, height, hires width, height), with A1111's legacy `firstphase_*` reading: when
    either is set, width/height become the hires target and they give the first pass."""
    w, h, rx, ry = req.width, req.height, req.hr_resize_x, req.hr_resize_y
    if req.firstphase_width or req.firstphase_height:
        rx, ry = w, h
        w, h = req.firstphase_width or w, req.firstphase_height or h
    hr_w, hr_h, _, _ = imgs.hires_target_size(w, h, req.hr_scale, rx, ry)
    return w, h, hr_w, hr_h


def check(req: _GenerationRequest, limits: Limits) -> None:
    """Types are already right (from_json); this checks ranges and limits -> ValidationError (422)."""
    c = _Checker()
    c.range("seed", req.seed, -1, MAX_SEED)
    c.range("subseed", req.subseed, -1, MAX_SEED)
    c.range("subseed_strength", req.subseed_strength, 0.0, 1.0)
    c.range("seed_resize_from_h", req.seed_resize_from_h, -1, limits.max_side)
    c.range("seed_resize_from_w", req.seed_resize_from_w, -1, limits.max_side)
    c.range("batch_size", req.batch_size, 1, limits.max_batch_size)
    c.range("n_iter", req.n_iter, 1, limits.max_n_iter)
    if req.batch_size * req.n_iter > limits.max_images:
        c.fail("n_iter", f"batch_size × n_iter must be at most {limits.max_images}")
    c.range("steps", req.steps, 1, limits.max_steps)
    c.range("cfg_scale", req.cfg_scale, -100.0, 100.0)
    c.range("denoising_strength", req.denoising_strength, 0.0, 1.0)
    for name in ("eta", "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise"):
        c.range(name, getattr(req, name), 0.0, 1000.0)
    sizes = [("width", "height", req.width, req.height)]
    if isinstance(req, Txt2ImgRequest):
        c.range("firstphase_width", req.firstphase_width, 0, limits.max_side)
        c.range("firstphase_height", req.firstphase_height, 0, limits.max_side)
        c.range("hr_second_pass_steps", req.hr_second_pass_steps, 0, limits.max_steps)
        c.range("hr_resize_x", req.hr_resize_x, 0, limits.max_side)
        c.range("hr_resize_y", req.hr_resize_y, 0, limits.max_side)
        c.range("hr_scale", req.hr_scale, 0.05, 16.0)
        if req.enable_hr and not c.problems:
            w, h, hr_w, hr_h = hires_size(req)
            sizes = [("width", "height", w, h), ("hr_resize_x", "hr_resize_y", hr_w, hr_h)]
    else:
        c.range("resize_mode", req.resize_mode, 0, 3)
        c.range("mask_blur", req.mask_blur, 0, 256)
        c.range("mask_blur_x", req.mask_blur_x, 0, 256)
        c.range("mask_blur_y", req.mask_blur_y, 0, 256)
        c.range("inpainting_fill", req.inpainting_fill, 0, 3)
        c.range("inpaint_full_res_padding", req.inpaint_full_res_padding, 0, limits.max_side)
        c.range("inpainting_mask_invert", req.inpainting_mask_invert, 0, 1)
        c.range("initial_noise_multiplier", req.initial_noise_multiplier, 0.0, 10.0)
        if req.init_images is not None and len(req.init_images) > max(req.batch_size, 1) and len(req.init_images) > 1:
            c.fail("init_images", f"bad number of images passed: {len(req.init_images)} init images for "
                                  f"batch_size {req.batch_size}")
    for wname, hname, w, h in sizes:
        c.range(wname, w, 8, limits.max_side)
        c.range(hname, h, 8, limits.max_side)
        if w * h > limits.max_pixels:
            c.fail(wname, f"{w}x{h} is {w * h} pixels; the limit is {limits.max_pixels}")
    if req.script_name:
        raise ApiError(422, f"Script '{req.script_name}' not found")  # A1111's words; no scripts here
    if req.alwayson_scripts:
        raise ApiError(422, f"always on script {next(iter(req.alwayson_scripts))} not found")
    unsupported = [("restore_faces", req.restore_faces), ("tiling", req.tiling),
                   ("refiner_checkpoint", req.refiner_checkpoint)]
    if isinstance(req, Txt2ImgRequest):
        unsupported.append(("hr_checkpoint_name", req.hr_checkpoint_name not in (None, "", "Use same checkpoint")))
    for name, value in unsupported:
        if value:
            c.fail(name, f"{name} is not supported by this server")
    if c.problems:
        raise ValidationError(c.problems)


def resolve_names(req: _GenerationRequest) -> None:
    """Unknown sampler / scheduler / hires upscaler -> 400 naming the valid ones (A1111 v1.10 uses 400 for
    a bad sampler; old combined names such as "DPM++ 2M Karras" are valid)."""
    try:
        infotext.resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
        if isinstance(req, Txt2ImgRequest) and req.enable_hr:
            infotext.resolve_sampler(_same(req.hr_sampler_name) or req.sampler_name or req.sampler_index,
                                     _same(req.hr_scheduler) or req.scheduler)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    if isinstance(req, Txt2ImgRequest) and req.enable_hr:
        name = req.hr_upscaler or "Latent"
        if name not in imgs.LATENT_UPSCALE_MODES and name not in imgs.PIXEL_UPSCALERS:
            valid = ", ".join([*imgs.LATENT_UPSCALE_MODES, *imgs.PIXEL_UPSCALERS])
            raise ApiError(400, f"could not find upscaler named {name}. Valid upscalers: {valid}")


def _same(value: Optional[str]) -> Optional[str]:
    return None if value in _USE_SAME or value == "" else value


def to_params(req: _GenerationRequest, settings: dict, init_images=None, mask=None):
    """The request as an `sd15.pipeline.Params`; `settings` are the effective options (overrides applied),
    init_images/mask the already decoded PIL images."""
    from sd15.pipeline import Params

    sampler = req.sampler_name or req.sampler_index
    eta = req.eta
    info = infotext.find_sampler(infotext.resolve_sampler(sampler, req.scheduler)[0])
    if eta is None:  # the eta options only count when they differ from A1111's defaults
        key = "eta_ddim" if info is not None and info.is_timesteps else "eta_ancestral"
        if settings[key] != OPTIONS[key].default:
            eta = settings[key]
    kw = dict(
        prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed, subseed=req.subseed,
        subseed_strength=req.subseed_strength, seed_resize_from_h=req.seed_resize_from_h,
        seed_resize_from_w=req.seed_resize_from_w, sampler_name=sampler, scheduler=req.scheduler,
        batch_size=req.batch_size, n_iter=req.n_iter, steps=req.steps, cfg_scale=req.cfg_scale, width=req.width,
        height=req.height, eta=eta, denoising_strength=req.denoising_strength,
        randn_source=settings["randn_source"], eta_noise_seed_delta=settings["eta_noise_seed_delta"],
        clip_skip=settings["CLIP_stop_at_last_layers"],
    )
    for name in ("s_churn", "s_tmin", "s_tmax", "s_noise", "s_min_uncond"):
        value = getattr(req, name)
        if value is None and settings[name] != OPTIONS[name].default:
            value = settings[name]
        kw[name] = value
    if isinstance(req, Txt2ImgRequest) and req.enable_hr:
        w, h, _, _ = hires_size(req)
        legacy = bool(req.firstphase_width or req.firstphase_height)
        kw.update(width=w, height=h, enable_hr=True, hr_scale=req.hr_scale, hr_upscaler=req.hr_upscaler,
                  hr_second_pass_steps=req.hr_second_pass_steps,
                  hr_resize_x=req.width if legacy else req.hr_resize_x,
                  hr_resize_y=req.height if legacy else req.hr_resize_y,
                  hr_sampler_name=_same(req.hr_sampler_name), hr_scheduler=_same(req.hr_scheduler),
                  hr_prompt=req.hr_prompt, hr_negative_prompt=req.hr_negative_prompt)
    if isinstance(req, Img2ImgRequest):
        noise = req.initial_noise_multiplier
        if noise is None and settings["initial_noise_multiplier"] != OPTIONS["initial_noise_multiplier"].default:
            noise = settings["initial_noise_multiplier"]
        kw.update(init_images=init_images, resize_mode=req.resize_mode, mask=mask, mask_blur=req.mask_blur,
                  mask_blur_x=req.mask_blur_x, mask_blur_y=req.mask_blur_y, mask_round=req.mask_round,
                  inpainting_fill=req.inpainting_fill, inpaint_full_res=req.inpaint_full_res,
                  inpaint_full_res_padding=req.inpaint_full_res_padding,
                  inpainting_mask_invert=req.inpainting_mask_invert, initial_noise_multiplier=noise)
    return Params.from_kwargs(**kw)


def decode_image(data: str, name: str, limits: Limits):
    """A request image (base64 or data URL) -> PIL image as decoded; bad or oversized data -> 400."""
    if data.strip().startswith(("http://", "https://")):
        raise ApiError(400, f"{name}: image URLs are not fetched by this server; send the image as base64")
    try:
        return imgs.load_image(data, max_pixels=limits.max_image_pixels, mode=None)
    except ValueError as e:
        raise ApiError(400, f"{name}: {e}") from None


# =============================================================================================
# Responses
# =============================================================================================

def image_response(req: _GenerationRequest, result, pnginfo: bool = True) -> dict:
    """txt2img/img2img response (§4.5): bare base64 PNGs with the infotext chunk, the echo, `info` string."""
    from sd15.pipeline import png_bytes

    images = []
    if req.send_images:
        for image, text in zip(result.images, result.infotexts):
            images.append(base64.b64encode(png_bytes(image, text if pnginfo else None)).decode("ascii"))
    return {"images": images, "parameters": req.echo(), "info": infotext.info_json(result.info)}


def progress_json(job, last_timestamp: str, preview: Optional[str]) -> dict:
    """GET /progress (§10.1). `job` is the running job (None when idle): `.state` (sd15 JobState),
    `.started` (time.time()), `.timestamp`, `.kind`, `.n_iter`, `.passes` (2 with hires)."""
    import time

    if job is None:
        state = dict(skipped=False, interrupted=False, stopping_generation=False, job="", job_count=0,
                     job_timestamp=last_timestamp, job_no=0, sampling_step=0, sampling_steps=0)
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    s = job.state
    job_count = s.job_count or -1  # A1111 shows -1 until the job has counted its batches
    progress = 0.01
    if job_count > 0:
        progress += s.job_no / job_count
        if s.sampling_steps:
            progress += s.sampling_step / s.sampling_steps / job_count
    progress = min(progress, 1.0)
    elapsed = time.time() - job.started
    name = f"scripts_{job.kind}"
    if job.n_iter > 1:
        name = f"Batch {min(s.job_no // job.passes, job.n_iter - 1) + 1} out of {job.n_iter}"
    state = dict(skipped=bool(s.skipped), interrupted=bool(s.interrupted), stopping_generation=False, job=name,
                 job_count=job_count, job_timestamp=job.timestamp, job_no=s.job_no,
                 sampling_step=s.sampling_step, sampling_steps=s.sampling_steps)
    return {"progress": progress, "eta_relative": elapsed / progress - elapsed, "state": state,
            "current_image": preview, "textinfo": None}


_TECHNICAL_INFO = {"parameters", "exif", "icc_profile", "dpi", "jfif", "jfif_version", "jfif_unit", "jfif_density",
                   "adobe", "adobe_transform", "progressive", "progression", "photoshop", "loop", "duration",
                   "background", "transparency", "timestamp", "chromaticity", "gamma", "srgb", "aspect", "xmp"}


def png_info(image) -> dict:
    """POST /png-info (§3.1): the infotext (PNG `parameters` chunk or EXIF UserComment), the other
    string-ish info keys, and the parsed infotext."""
    text = image.info.get("parameters")
    if not isinstance(text, str):
        text = _exif_user_comment(image) or ""
    items = {}
    for key, value in image.info.items():
        if key in _TECHNICAL_INFO or not isinstance(key, str):
            continue
        if isinstance(value, (str, int, float, bool)):
            items[key] = value
    return {"info": text, "items": items, "parameters": infotext.parse_infotext(text)}


def _exif_user_comment(image) -> Optional[str]:
    try:
        raw = image.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD -> UserComment
    except Exception:
        return None
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\x00":  # A1111 writes UTF-16 (big-endian, as piexif does)
        codec = "utf-16-le" if body[:2] == b"\xff\xfe" or (len(body) > 1 and body[1:2] == b"\x00"
                                                            and body[0:1] != b"\x00") else "utf-16-be"
        return body.decode(codec, errors="replace").lstrip("\ufeff")
    return body.decode("utf-8", errors="replace").rstrip("\x00")


# What A1111 answers on endpoints that have nothing behind them here (§3.1).
EMPTY_SHAPES = {
    "prompt-styles": [],
    "face-restorers": [],
    "hypernetworks": [],
    "extensions": [],
}


def latent_upscale_modes() -> list[dict]:
    return [{"name": name} for name in imgs.LATENT_UPSCALE_MODES]
