"""A1111's "Extras" over the API: upscaling one or many images, the upscaler listings, and interrogate.

    POST /sdapi/v1/extra-single-image   {image, resize_mode, upscaling_resize, upscaler_1, ...} -> {image, html_info}
    POST /sdapi/v1/extra-batch-images   {imageList: [{data, name}], ...}                       -> {images, html_info}
    GET  /sdapi/v1/upscalers            every upscaler, A1111's names and order (sd15.upscale.list_upscalers)
    GET  /sdapi/v1/realesrgan-models    the Real-ESRGAN files present, [{name, path, scale}]
    POST /sdapi/v1/interrogate          always a 404 naming the caption model this server does not have

What runs is A1111 v1.10's `modules/postprocessing.py` (`run_postprocessing`, `run_extras`) with its Upscale
step (`scripts/postprocessing_upscale.py`): resize mode 0 scales by `upscaling_resize`, mode 1 scales to cover
`upscaling_resize_w x upscaling_resize_h` and, with `upscaling_crop`, pastes the result centred on a black canvas
of exactly that size; `upscaler_2` is computed from the same input and mixed in with
`Image.blend(first, second, extras_upscaler_2_visibility)`. `upscaler_1` "None" makes the call a no-op that still
returns the image (A1111's tests post only `{image}` this way). The output PNG carries A1111's text chunks: the
input's own `parameters` and other text info, plus `postprocessing` (the step's infotext, also the `html_info`).

Face restoration (GFPGAN, CodeFormer) is not part of sd15: a visibility above 0 is a 422 naming the field; 0, the
default, is accepted as A1111 does. The upscalers come from `<ckpt-dir>/ESRGAN` and `<ckpt-dir>/RealESRGAN`
(`--esrgan-models-path`, `--realesrgan-models-path`), rescanned on every listing; nothing is downloaded. The options
`ESRGAN_tile`, `ESRGAN_tile_overlap` and `realesrgan_enabled_models` apply when the engine has them.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
import os
from dataclasses import dataclass, field

from PIL import Image
from PIL.PngImagePlugin import PngInfo
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sd15.a1111 import infotext
from sd15.upscale import ESRGAN_TILE, ESRGAN_TILE_OVERLAP, REALESRGAN_NAMES, UpscalerModelError, Upscalers
from server.a1111 import ApiError, _Request, decode_image
from server.coerce import ValidationError, convert

log = logging.getLogger("server")

API = "/sdapi/v1"

#: A1111's `images.IGNORED_INFO_KEYS`: image info that `read_info_from_image` does not carry over.
IGNORED_INFO_KEYS = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background",
                     "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop"}


# =============================================================================================
# Requests (A1111 v1.10 `modules/api/models.py`: ExtrasBaseRequest and its two children)
# =============================================================================================

def _range(**bounds):
    """Field metadata: pydantic's ge / gt / le / enum, read by `check` (and by anything documenting the schema)."""
    return bounds


@dataclass
class ExtrasBaseRequest(_Request):
    resize_mode: int = field(default=0, metadata=_range(enum=(0, 1)))  # 0: scale by, 1: scale to
    show_extras_results: bool = True  # A1111 returns the images of API calls whatever this says
    gfpgan_visibility: float = field(default=0.0, metadata=_range(ge=0, le=1))
    codeformer_visibility: float = field(default=0.0, metadata=_range(ge=0, le=1))
    codeformer_weight: float = field(default=0.0, metadata=_range(ge=0, le=1))
    upscaling_resize: float = field(default=2.0, metadata=_range(gt=0))
    upscaling_resize_w: int = field(default=512, metadata=_range(ge=1))
    upscaling_resize_h: int = field(default=512, metadata=_range(ge=1))
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = field(default=0.0, metadata=_range(ge=0, le=1))
    upscale_first: bool = False  # ignored by A1111 v1.10 too (the step order is a setting)

    @classmethod
    def from_json(cls, data):
        # pydantic v1's Literal[0, 1]: no coercion from strings, but True/1.0 are equal to 1 and map onto it
        if isinstance(data, dict) and data.get("resize_mode") is not None:
            mode = data["resize_mode"]
            if isinstance(mode, str) or mode not in (0, 1):
                raise ValidationError.one("resize_mode", "unexpected value; permitted: 0, 1", "value_error.const")
            data = {**data, "resize_mode": int(mode)}
        req = super().from_json(data)
        check(req)
        return req


@dataclass
class ExtrasSingleImageRequest(ExtrasBaseRequest):
    """POST /sdapi/v1/extra-single-image: upscale one image (base64 or data URL)."""
    image: str = ""


@dataclass
class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    """POST /sdapi/v1/extra-batch-images: `imageList: [{data, name}]`, answered in the same order."""
    imageList: list[dict] = field(default_factory=list)

    REQUIRED = ("imageList",)

    @classmethod
    def from_json(cls, data):
        req = super().from_json(data)
        problems, items = [], []
        for i, item in enumerate(req.imageList):  # FileData: data and name, both required strings
            out = {}
            for key in ("data", "name"):
                if item.get(key) is None:
                    problems.append(ValidationError.problem(("imageList", i, key), "field required",
                                                            "value_error.missing"))
                    continue
                try:
                    out[key] = convert("imageList", item[key], str)
                except ValidationError as e:
                    problems += [{**p, "loc": ["body", "imageList", i, key]} for p in e.problems]
            items.append(out)
        if problems:
            raise ValidationError(problems)
        req.imageList = items
        return req


@dataclass
class InterrogateRequest(_Request):
    """POST /sdapi/v1/interrogate: `{image, model}` with model "clip" or "deepdanbooru"."""
    image: str = ""
    model: str = "clip"


def check(req: ExtrasBaseRequest) -> None:
    """The ranges in the fields' metadata (pydantic v1's words and codes) -> ValidationError (422)."""
    problems = []
    for f in dataclasses.fields(ExtrasBaseRequest):
        value, m = getattr(req, f.name), f.metadata
        if "gt" in m and not value > m["gt"]:
            problems.append((f.name, f"ensure this value is greater than {m['gt']}", "value_error.number.not_gt"))
        elif "ge" in m and not value >= m["ge"]:
            problems.append((f.name, f"ensure this value is greater than or equal to {m['ge']}",
                             "value_error.number.not_ge"))
        elif "le" in m and not value <= m["le"]:
            problems.append((f.name, f"ensure this value is less than or equal to {m['le']}",
                             "value_error.number.not_le"))
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if not problems and getattr(req, name) > 0:
            problems.append((name, "face restoration (GFPGAN, CodeFormer) is not supported by this server; "
                                   "send 0", "value_error"))
    if problems:
        raise ValidationError([ValidationError.problem(n, msg, t) for n, msg, t in problems])


# =============================================================================================
# The upscalers of a server
# =============================================================================================

def make_upscalers(config) -> Upscalers:
    """The engine's `Upscalers`: folders from `--esrgan-models-path` / `--realesrgan-models-path` (in
    `config.flags`), else `<ckpt-dir>/ESRGAN` and `<ckpt-dir>/RealESRGAN`; on the server's device, in fp16 on
    CUDA unless `--precision` says otherwise."""
    import torch

    flags = config.flags or {}
    esrgan = flags.get("esrgan_models_path") or os.path.join(config.ckpt_dir, "ESRGAN")
    realesrgan = flags.get("realesrgan_models_path") or os.path.join(config.ckpt_dir, "RealESRGAN")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
        config.precision, torch.float16 if device.type == "cuda" else torch.float32)
    return Upscalers(esrgan, realesrgan, device=device, dtype=dtype)


def sync_options(upscalers: Upscalers, options: dict) -> Upscalers:
    """Apply A1111's upscaler options (when the engine has them) and rescan the folders."""
    upscalers.tile = int(options.get("ESRGAN_tile", ESRGAN_TILE))
    upscalers.tile_overlap = int(options.get("ESRGAN_tile_overlap", ESRGAN_TILE_OVERLAP))
    enabled = options.get("realesrgan_enabled_models")
    upscalers.realesrgan_enabled = list(enabled) if enabled is not None else None
    upscalers.refresh()
    return upscalers


def _upscalers(request: Request) -> Upscalers:
    engine = request.state.engine
    return sync_options(engine.upscalers, engine.options)


def resolve(upscalers: Upscalers, name: str) -> None:
    """An unknown upscaler name -> 400 naming the valid ones (A1111 answers its AssertionError with a 500)."""
    if name not in upscalers.names():
        raise ApiError(400, f"could not find upscaler named {name}; valid: {', '.join(upscalers.names())}")


# =============================================================================================
# The work (A1111 run_postprocessing with the Upscale step)
# =============================================================================================

def read_info(image: Image.Image) -> dict:
    """A1111 `read_info_from_image` as `run_postprocessing` keeps it: the image's info minus the technical keys,
    with `parameters` (the infotext) kept."""
    return {k: v for k, v in (image.info or {}).items() if k not in IGNORED_INFO_KEYS}


def upscale_step(upscalers: Upscalers, image: Image.Image, req: ExtrasBaseRequest, info: dict,
                 interrupted=None) -> Image.Image:
    """A1111's Upscale postprocessing step on one RGB image; `info` gets its infotext entries."""
    if req.upscaler_1 == "None":
        return image
    second = None if req.upscaler_2 == "None" else req.upscaler_2

    def one(name):
        if req.resize_mode == 1:
            w, h = req.upscaling_resize_w, req.upscaling_resize_h
            info["Postprocess upscale to"] = f"{w}x{h}"
            out = upscalers.upscale_to(image, name, w, h, crop=req.upscaling_crop, interrupted=interrupted)
            if req.upscaling_crop:
                info["Postprocess crop to"] = f"{out.width}x{out.height}"
            return out
        info["Postprocess upscale by"] = req.upscaling_resize
        return upscalers.upscale(image, name, req.upscaling_resize, interrupted=interrupted)

    result = one(req.upscaler_1)
    info["Postprocess upscaler"] = req.upscaler_1
    if second is not None and req.extras_upscaler_2_visibility > 0:
        other = one(second)
        if other.mode != result.mode:
            other = other.convert(result.mode)
        result = Image.blend(result, other, req.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = second
    return result


def infotext_of(info: dict) -> str:
    """A1111's postprocessing infotext: `k: v` pairs joined by ", ", values quoted as in generation infotexts."""
    return ", ".join(k if k == v else f"{k}: {infotext.quote(v)}" for k, v in info.items() if v is not None)


def plaintext_to_html(text: str) -> str:
    """A1111 `ui_common.plaintext_to_html` (the `html_info` of the response)."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def encode_png(image: Image.Image, text_info: dict | None) -> str:
    """Bare base64 PNG; every str -> str item of `text_info` becomes a tEXt chunk (A1111 `encode_pil_to_base64`)."""
    meta = None
    if text_info:
        meta = PngInfo()
        for k, v in text_info.items():
            if isinstance(k, str) and isinstance(v, str):
                meta.add_text(k, v)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def run_extras(upscalers: Upscalers, images: list, req: ExtrasBaseRequest, pnginfo: bool = True,
               state=None) -> tuple[list[str], str]:
    """(GPU worker) Every image through the Upscale step -> (base64 PNGs in input order, html_info of the last).
    `state` (sd15 JobState) stops the batch between images (and between model tiles) when interrupted."""
    interrupted = (lambda: state.interrupted) if state is not None else None
    outputs, text = [], ""
    for i, image in enumerate(images):
        if state is not None:
            if state.interrupted:
                break
            state.job_no = i
        info: dict = {}
        result = upscale_step(upscalers, image.convert("RGB"), req, info, interrupted)
        text = infotext_of(info)
        outputs.append(encode_png(result, {**read_info(image), "postprocessing": text} if pnginfo else None))
    return outputs, plaintext_to_html(text)


# =============================================================================================
# Endpoints
# =============================================================================================

async def _extras(request: Request, cls, field_name: str):
    from server.app import read_json  # the app's body reader (size limit, FastAPI's JSON errors)

    engine = request.state.engine
    req = cls.from_json(await read_json(request, engine.limits.max_body_bytes))
    upscalers = await run_in_threadpool(sync_options, engine.upscalers, engine.options)
    resolve(upscalers, req.upscaler_1)
    if req.upscaler_1 != "None" and req.upscaler_2 != "None":
        resolve(upscalers, req.upscaler_2)
    if field_name == "image":
        if not req.image:
            raise ApiError(400, "image not selected")  # A1111: AssertionError, a 500
        sources = [(req.image, "image")]
    else:
        sources = [(item["data"], f"imageList[{i}].data") for i, item in enumerate(req.imageList)]
    images = await run_in_threadpool(lambda: [decode_image(s, name, engine.limits) for s, name in sources])
    for image in images:  # the pixel limit applies to what comes out as well
        w, h = _out_size(image, req)
        if w * h > engine.limits.max_image_pixels:
            raise ApiError(400, f"the result would be {w}x{h} = {w * h} pixels; the limit is "
                                f"{engine.limits.max_image_pixels}")
    try:
        return await engine.on_gpu(_job, engine, upscalers, images, req)
    except (ApiError, ValidationError):
        raise
    except (UpscalerModelError, ValueError) as e:  # a bad model file, an upscaler removed meanwhile
        raise ApiError(400, str(e)) from None


def _out_size(image: Image.Image, req: ExtrasBaseRequest) -> tuple[int, int]:
    if req.upscaler_1 == "None":
        return image.size
    if req.resize_mode == 1:
        s = max(req.upscaling_resize_w / image.width, req.upscaling_resize_h / image.height)
        if req.upscaling_crop:
            return req.upscaling_resize_w, req.upscaling_resize_h
    else:
        s = req.upscaling_resize
    return int(image.width * s) // 8 * 8, int(image.height * s) // 8 * 8


def _job(engine, upscalers, images, req):
    """(GPU worker) The extras job -> the response."""
    outputs, html_info = run_extras(upscalers, images, req, engine.options.get("enable_pnginfo", True))
    if isinstance(req, ExtrasSingleImageRequest):
        return JSONResponse({"html_info": html_info, "image": outputs[0] if outputs else None})
    return JSONResponse({"html_info": html_info, "images": outputs})


async def extra_single_image(request: Request):
    """Upscale one image (A1111's Extras tab)."""
    return await _extras(request, ExtrasSingleImageRequest, "image")


async def extra_batch_images(request: Request):
    """Upscale a list of images; the answer keeps their order."""
    return await _extras(request, ExtrasBatchImagesRequest, "imageList")


async def upscalers_list(request: Request):
    """Pixel upscalers: None, Lanczos, Nearest, then the ESRGAN / RealESRGAN files present."""
    ups = await run_in_threadpool(_upscalers, request)
    return JSONResponse([u.as_api() for u in ups.infos])


async def realesrgan_models(request: Request):
    """Real-ESRGAN models present in the RealESRGAN folder."""
    from sd15.upscale import list_upscalers

    engine = request.state.engine
    found = {u.name: u for u in await run_in_threadpool(list_upscalers, None, engine.upscalers.realesrgan_dir)}
    return JSONResponse([{"name": name, "path": str(found[name].path), "scale": scale}
                         for name, (_, scale) in REALESRGAN_NAMES.items() if name in found])


async def interrogate(request: Request):
    """Caption an image: needs the CLIP interrogator or DeepBooru, which this server does not have."""
    from server.app import read_json

    engine = request.state.engine
    req = InterrogateRequest.from_json(await read_json(request, engine.limits.max_body_bytes))
    if not req.image:
        raise ApiError(404, "Image not found")  # A1111's checks, in its order
    await run_in_threadpool(decode_image, req.image, "image", engine.limits)
    needs = {"clip": "the CLIP interrogator (BLIP captioning model and CLIP ViT-L/14 with its category lists)",
             "deepdanbooru": "the DeepBooru tagger (model-resnet_custom_v3.pt)"}
    if req.model not in needs:
        raise ApiError(404, "Model not found")
    raise ApiError(404, f"Model not found: interrogate model '{req.model}' needs {needs[req.model]}, which this "
                        f"server does not include; nothing is downloaded")


routes = [
    Route(f"{API}/extra-single-image", extra_single_image, methods=["POST"]),
    Route(f"{API}/extra-batch-images", extra_batch_images, methods=["POST"]),
    Route(f"{API}/interrogate", interrogate, methods=["POST"]),
    Route(f"{API}/upscalers", upscalers_list, methods=["GET"]),
    Route(f"{API}/realesrgan-models", realesrgan_models, methods=["GET"]),
]
REQUEST_BODIES = {extra_single_image: ExtrasSingleImageRequest, extra_batch_images: ExtrasBatchImagesRequest,
                  interrogate: InterrogateRequest}
