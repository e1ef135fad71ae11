"""The A1111 `/sdapi/v1` request and response shapes; the endpoints live in server/app.py.

`Txt2ImgRequest` / `Img2ImgRequest` carry the API-only fields of A1111 v1.10's request models
(`sampler_index`, `send_images`, `override_settings`, `script_*`, ...) as their own fields, and those they
share with the library (`sd15.schema.GenerationRequest`'s) in `shared`. `from_json` coerces as A1111's
pydantic v1 models do ("7" -> 7, "true" -> True), answers a wrong type with FastAPI's 422 shape, treats `null`
as "not given" and ignores (and logs) unknown fields. `ApiError` is answered with A1111's body
`{"error", "detail", "body", "errors"}`.
"""
from __future__ import annotations

import base64
import dataclasses
import logging
import time
import typing
from dataclasses import dataclass, field
from typing import Optional

from sd15 import schema
from sd15.a1111 import images as imgs
from sd15.a1111 import infotext
from server.coerce import ValidationError, convert  # pydantic v1 coercion and FastAPI's 422 shape
from server.options import OPTIONS, SAMPLER_OPTIONS, SETTING_OPTIONS, defaults

log = logging.getLogger("server")


class ApiError(Exception):
    """An error answered with A1111's handler body: `{"error", "detail", "body", "errors"}`; also how a queued
    job ended when it gave no result (server/jobs.py)."""

    def __init__(self, status: int, detail: str = "", *, error: str = "HTTPException", errors: str = "",
                 headers: Optional[dict] = None):
        super().__init__(detail or errors)
        self.status, self.detail, self.error, self.errors = status, detail, error, errors
        self.headers = headers  # e.g. Retry-After on a 503

    def body(self) -> dict:
        return {"error": self.error, "detail": self.detail, "body": "", "errors": self.errors}


class _Request:
    """`from_json` / `echo` shared by the request bodies below. A generation body carries the API-only fields
    as its own dataclass fields and the schema's fields of its `GROUPS` in `shared` (only those sent)."""

    GROUPS: tuple = ()
    DEFAULTS: dict = {}  # API defaults that differ from the schema's (img2img's denoising_strength)

    @classmethod
    def shared_fields(cls) -> list:
        return schema.fields_of(*cls.GROUPS)

    @classmethod
    def from_json(cls, data):
        if not isinstance(data, dict):
            raise ValidationError.one(None, "value is not a valid dict", "type_error.dict")
        hints = {**_SCHEMA_HINTS, **typing.get_type_hints(cls), **_API_TYPES}
        own = [f.name for f in dataclasses.fields(cls) if f.name != "shared"]
        shared = [f.name for f in cls.shared_fields()]
        unknown = sorted(set(data) - set(own) - set(shared))
        if unknown:
            log.warning("%s: ignoring unknown field(s): %s", cls.__name__, ", ".join(unknown))
        if isinstance(data.get("infotext"), str) and data["infotext"].strip():
            data = merge_infotext(data, own + shared)
        kw, given, problems = {}, {}, []
        for name in own + shared:
            value = data.get(name)
            if value is None:  # missing or null: the default (A1111 would pass null on and maybe fail later)
                continue
            try:
                (given if name in shared else kw)[name] = convert(name, value, hints[name])
            except ValidationError as e:
                problems += e.problems
        missing = [n for n in getattr(cls, "REQUIRED", ()) if n not in kw]
        problems += [ValidationError.problem(n, "field required", "value_error.missing") for n in missing]
        if problems:
            raise ValidationError(problems)
        return cls(**kw, shared=given) if cls.GROUPS else cls(**kw)

    def echo(self) -> dict:
        """The `parameters` of a response: every field with its default, as received after coercion."""
        shared = {f.name: f.default for f in self.shared_fields()}
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "shared"}
        return {**shared, **self.DEFAULTS, **getattr(self, "shared", {}), **own}


_SCHEMA_HINTS = typing.get_type_hints(schema.GenerationRequest)
# on the wire: images as base64 strings; tiling may be null (A1111: the `tiling` option decides)
_API_TYPES = {"init_images": Optional[list[str]], "mask": Optional[str], "tiling": Optional[bool]}


@dataclass
class _GenerationRequest(_Request):
    styles: Optional[list[str]] = None
    restore_faces: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    override_settings: Optional[dict] = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: bool = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict] = None
    force_task_id: Optional[str] = None
    sampler_index: str = schema.DEFAULT_SAMPLER  # used when sampler_name is empty
    script_name: Optional[str] = None
    script_args: list = field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = field(default_factory=dict)
    infotext: Optional[str] = None
    shared: dict = field(default_factory=dict)  # the schema fields sent, coerced

    is_img2img = False

    def __getattr__(self, name):  # shared fields read as attributes: req.steps, req.enable_hr, ...
        if name in schema.FIELDS and name != "shared":
            return self.shared.get(name, self.DEFAULTS.get(name, schema.FIELDS[name].default))
        raise AttributeError(name)


@dataclass
class Txt2ImgRequest(_GenerationRequest):
    """POST /sdapi/v1/txt2img."""
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_checkpoint_name: Optional[str] = None

    GROUPS = ("prompt", "seeds", "sampling", "size", "hires")


@dataclass
class Img2ImgRequest(_GenerationRequest):
    """POST /sdapi/v1/img2img: init images (and an optional inpainting mask) as base64 or data URLs."""
    image_cfg_scale: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: bool = False

    GROUPS = ("prompt", "seeds", "sampling", "size", "img2img")
    DEFAULTS = {"denoising_strength": schema.DEFAULT_DENOISING_STRENGTH}
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


# Infotext keys that are settings: the `infotext` request field puts them into override_settings
_INFOTEXT_SETTINGS = {key: SETTING_OPTIONS[name] for name in SETTING_OPTIONS
                      for key in schema.FIELDS[name].metadata["infotext"]}


def merge_infotext(data: dict, names: list[str]) -> dict:
    """Fill the fields `data` does not set with those its `infotext` string names, and the settings it names
    into override_settings unless set there (A1111 v1.10's `apply_infotext`)."""
    parsed = infotext.parse_infotext(data["infotext"])
    out = dict(data)
    for name, value in infotext.request_from_infotext(parsed, named_only=True).items():
        if name in names and out.get(name) is None:
            out[name] = value
    overrides = dict(out.get("override_settings") or {})
    for key, option in _INFOTEXT_SETTINGS.items():
        if key in parsed and option not in overrides:
            overrides[option] = parsed[key]
    if overrides:
        out["override_settings"] = overrides
    return out


@dataclass(frozen=True)
class Limits(schema.Limits):
    """What one request may ask for (generous defaults; `sd15-server --max-*` flags change them)."""
    max_pixels: int = 2048 * 2048
    max_side: int = 4096
    max_steps: int = 1000
    max_batch_size: int = 16
    max_n_iter: int = 100
    max_images: int = 256
    max_body_bytes: int = 64 << 20  # request body
    max_image_pixels: int = 8192 * 8192  # every decoded input image (decompression-bomb guard)
    max_image_side: int = 16384  # either side of an input image (init image or mask)
    max_image_aspect: float = 64.0  # longer side / shorter side of an input image
    max_prompt_chars: int = 20000  # prompt, negative prompt, hires prompts (each)


def to_request(req: _GenerationRequest, settings: Optional[dict] = None, init_images=None,
               mask=None) -> schema.GenerationRequest:
    """The body as a `sd15.schema.GenerationRequest`: its shared fields as sent, the API's spellings
    (`sampler_index`, legacy `firstphase_*`) translated, and the options that change the numbers from
    `settings` (the effective options; None: A1111's defaults). init_images/mask: the decoded PIL images
    (None: the strings as sent, enough for checking)."""
    settings = {**defaults(), **(settings or {})}
    kw = dict(req.shared)
    kw["sampler_name"] = req.sampler_name or req.sampler_index
    for name in SAMPLER_OPTIONS:  # an option at its default leaves the field empty (A1111's value)
        img2img_only = name == "initial_noise_multiplier" and not req.is_img2img
        if kw.get(name) is None and settings[name] != OPTIONS[name].default and not img2img_only:
            kw[name] = settings[name]
    if isinstance(req, Txt2ImgRequest):
        if req.firstphase_width or req.firstphase_height:  # legacy: width/height are the hires target
            kw.update(width=req.firstphase_width or req.width, height=req.firstphase_height or req.height,
                      hr_resize_x=req.width, hr_resize_y=req.height)
    if req.is_img2img:
        kw.update(init_images=init_images if init_images is not None else req.init_images, mask=mask or req.mask)
        kw.setdefault("denoising_strength", req.denoising_strength)
    if kw.get("tiling") is None:
        kw["tiling"] = bool(settings["tiling"])
    kw.update({name: settings[option] for name, option in SETTING_OPTIONS.items()})
    return schema.GenerationRequest(**kw)


def check(req: _GenerationRequest, limits: Limits, settings: Optional[dict] = None,
          upscalers: Optional[list] = None) -> schema.ResolvedRequest:
    """The request's ranges and limits (`sd15.schema.validate`) and the API-only fields -> ValidationError
    (422); unknown sampler, scheduler or upscaler names -> ApiError 400 (A1111 v1.10 answers 400). Returns
    the request resolved (`sd15.schema.resolve`, the one resolution of the request) with `settings`, its init
    images still as sent; `upscalers`: the pixel upscalers the hires fix may use (None: the built-ins)."""
    problems = []
    if isinstance(req, Txt2ImgRequest):
        for name in ("firstphase_width", "firstphase_height"):
            if not 0 <= getattr(req, name) <= limits.max_side:
                problems.append(ValidationError.problem(name, f"must be between 0 and {limits.max_side}",
                                                        "value_error"))
    if req.is_img2img and not req.init_images:
        raise ApiError(404, "Init image not found")
    request = to_request(req, settings)
    try:
        schema.validate(request, limits)
    except schema.RequestError as e:
        problems += [ValidationError.problem(name, msg, kind) for name, msg, kind in e.problems]
    if req.script_name:
        raise ApiError(422, f"Script '{req.script_name}' not found")
    if req.alwayson_scripts:
        raise ApiError(422, f"always on script {next(iter(req.alwayson_scripts))} not found")
    unsupported = [("restore_faces", req.restore_faces), ("refiner_checkpoint", req.refiner_checkpoint)]
    if isinstance(req, Txt2ImgRequest):
        unsupported.append(("hr_checkpoint_name", req.hr_checkpoint_name not in (None, "", "Use same checkpoint")))
    problems += [ValidationError.problem(name, f"{name} is not supported by this server", "value_error")
                 for name, value in unsupported if value]
    if problems:
        raise ValidationError(problems)
    try:
        return schema.resolve(request, upscalers=upscalers)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def image_format(settings: dict) -> dict:
    """`sd15.a1111.images.encode_image`'s format arguments from A1111's options."""
    return {"fmt": settings["samples_format"], "quality": settings["jpeg_quality"],
            "lossless": settings["webp_lossless"]}


def image_response(req: _GenerationRequest, result, pnginfo: bool, settings: dict) -> dict:
    """txt2img/img2img response: bare base64 images in the options' `samples_format` with the infotext
    (`pnginfo`), the echo, `info` string."""
    images = []
    if req.send_images:
        for image, text in zip(result.images, result.infotexts):
            info = {"parameters": text} if pnginfo else None
            data = imgs.encode_image(image, info, **image_format(settings))
            images.append(base64.b64encode(data).decode("ascii"))
    return {"images": images, "parameters": req.echo(), "info": infotext.info_json(result.info)}


def progress_json(job, last_timestamp: str, preview: Optional[str]) -> dict:
    """GET /progress. `job` is the running job (None when idle): `.state` (sd15 JobState),
    `.started` (time.time()), `.timestamp`, `.kind`, `.n_iter`, `.passes` (2 with hires)."""
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
    """POST /png-info: the infotext (PNG `parameters` chunk or EXIF UserComment), the other
    string-ish info keys, the parsed infotext, and (not in A1111) the request fields it restores and the
    settings it sets: `override_settings` {option: value} and `override_labels` {option: infotext key}, what
    A1111's paste offers in its "Override settings" dropdown (`infotext_utils.get_override_settings`)."""
    text = read_infotext(image)
    items = {}
    for key, value in image.info.items():
        if key in _TECHNICAL_INFO or not isinstance(key, str):
            continue
        if isinstance(value, (str, int, float, bool)):
            items[key] = value
    parameters = infotext.parse_infotext(text)
    request = infotext.request_from_infotext(parameters)
    field_of = {option: name for name, option in SETTING_OPTIONS.items()}
    labels = {option: key for key, option in _INFOTEXT_SETTINGS.items() if key in parameters}
    return {"info": text, "items": items, "parameters": parameters, "request": request,
            "override_settings": {option: request[field_of[option]] for option in labels},
            "override_labels": labels}


def read_infotext(image) -> str:
    """An image's infotext as A1111's `read_info_from_image` finds it: a non-empty EXIF UserComment (what
    jpg and webp carry), else the PNG's `parameters` text."""
    text = _exif_user_comment(image) or image.info.get("parameters")
    return text if isinstance(text, str) else ""


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


def latent_upscale_modes() -> list[dict]:
    return [{"name": name} for name in imgs.LATENT_UPSCALE_MODES]
