"""A1111's "Extras" over the API: upscaling one or many images (`/extra-single-image`, `/extra-batch-images`:
A1111 v1.10's `modules/postprocessing.py` with its Upscale step), the upscaler listings (`/upscalers`,
`/realesrgan-models`), and `/interrogate` (a 404 naming the caption model this server does not have).
Face restoration is not part of sd15: a visibility above 0 is a 422. The upscalers are the files of
`<ckpt-dir>/ESRGAN` and `<ckpt-dir>/RealESRGAN` (or the folder flags), rescanned on every listing; nothing is
downloaded.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import os
from dataclasses import dataclass, field

from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sd15.a1111 import infotext
from sd15.a1111.images import encode_image, upscaled_size
from sd15.schema import range_problem
from sd15.upscale import ESRGAN_TILE, ESRGAN_TILE_OVERLAP, REALESRGAN_NAMES, Upscalers, list_upscalers
from server.a1111 import ApiError, _Request, image_format, read_infotext
from server.coerce import ValidationError, convert
from server.inputs import decode_image, read_json

#: A1111's `images.IGNORED_INFO_KEYS`: image info that `read_info_from_image` does not carry over.
IGNORED_INFO_KEYS = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background",
                     "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop"}


# =============================================================================================
# Requests (A1111 v1.10 `modules/api/models.py`: ExtrasBaseRequest and its two children)
# =============================================================================================

@dataclass
class ExtrasBaseRequest(_Request):
    # metadata: pydantic's bounds (`lo`/`hi` inclusive, as sd15.schema's), checked by `check` and documented
    # by server/openapi.py
    resize_mode: int = field(default=0, metadata={"enum": (0, 1)})  # 0: scale by, 1: scale to
    show_extras_results: bool = True  # A1111 returns the images of API calls whatever this says
    gfpgan_visibility: float = field(default=0.0, metadata={"lo": 0, "hi": 1})
    codeformer_visibility: float = field(default=0.0, metadata={"lo": 0, "hi": 1})
    codeformer_weight: float = field(default=0.0, metadata={"lo": 0, "hi": 1})
    upscaling_resize: float = field(default=2.0, metadata={"gt": 0})
    upscaling_resize_w: int = field(default=512, metadata={"lo": 1})
    upscaling_resize_h: int = field(default=512, metadata={"lo": 1})
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = field(default=0.0, metadata={"lo": 0, "hi": 1})
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
        problems = []
        for i, item in enumerate(req.imageList):  # FileData: data and name, both required strings
            for key in ("data", "name"):
                try:
                    if item.get(key) is None:
                        raise ValidationError.one(None, "field required", "value_error.missing")
                    item[key] = convert("imageList", item[key], str)
                except ValidationError as e:
                    problems += [{**p, "loc": ["body", "imageList", i, key]} for p in e.problems]
        if problems:
            raise ValidationError(problems)
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
        elif problem := range_problem(f.name, value, m.get("lo"), m.get("hi")):
            problems.append(problem)
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if not problems and getattr(req, name) > 0:
            problems.append((name, "face restoration (GFPGAN, CodeFormer) is not supported by this server; "
                                   "send 0", "value_error"))
    if problems:
        raise ValidationError([ValidationError.problem(n, msg, t) for n, msg, t in problems])


# =============================================================================================
# The upscalers of a server
# =============================================================================================

def make_upscalers(config, device, dtype) -> Upscalers:
    """The engine's `Upscalers`, on the model's device and dtype: folders from `--esrgan-models-path` /
    `--realesrgan-models-path` (in `config.flags`), else `<ckpt-dir>/ESRGAN` and `<ckpt-dir>/RealESRGAN`."""
    flags = config.flags or {}
    esrgan = flags.get("esrgan_models_path") or os.path.join(config.ckpt_dir, "ESRGAN")
    realesrgan = flags.get("realesrgan_models_path") or os.path.join(config.ckpt_dir, "RealESRGAN")
    return Upscalers(esrgan, realesrgan, device=device, dtype=dtype)


def sync_options(upscalers: Upscalers, options: dict) -> Upscalers:
    """Apply A1111's upscaler options (when the engine has them) and rescan the folders."""
    upscalers.tile = int(options.get("ESRGAN_tile", ESRGAN_TILE))
    upscalers.tile_overlap = int(options.get("ESRGAN_tile_overlap", ESRGAN_TILE_OVERLAP))
    enabled = options.get("realesrgan_enabled_models")
    upscalers.realesrgan_enabled = list(enabled) if enabled is not None else None
    upscalers.refresh()
    return upscalers


# =============================================================================================
# The work (A1111 run_postprocessing with the Upscale step)
# =============================================================================================

def upscale_step(upscalers: Upscalers, image: Image.Image, req: ExtrasBaseRequest, info: dict) -> Image.Image:
    """A1111's Upscale step (`scripts/postprocessing_upscale.py`) on one RGB image: resize mode 0 scales by
    `upscaling_resize`, mode 1 to cover `upscaling_resize_w x upscaling_resize_h` (with `upscaling_crop`,
    centred on a black canvas of that size); `upscaler_2`, from the same input, is mixed in by `Image.blend`
    with `extras_upscaler_2_visibility`. `info` gets the step's infotext entries."""
    if req.upscaler_1 == "None":
        return image

    def one(name):
        if req.resize_mode == 1:
            w, h = req.upscaling_resize_w, req.upscaling_resize_h
            info["Postprocess upscale to"] = f"{w}x{h}"
            out = upscalers.upscale_to(image, name, w, h, crop=req.upscaling_crop)
            if req.upscaling_crop:
                info["Postprocess crop to"] = f"{out.width}x{out.height}"
            return out
        info["Postprocess upscale by"] = req.upscaling_resize
        return upscalers.upscale(image, name, req.upscaling_resize)

    result = one(req.upscaler_1)
    info["Postprocess upscaler"] = req.upscaler_1
    if req.upscaler_2 != "None" and req.extras_upscaler_2_visibility > 0:
        second = one(req.upscaler_2).convert(result.mode)
        result = Image.blend(result, second, req.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = req.upscaler_2
    return result


def run_extras(upscalers: Upscalers, images: list, req: ExtrasBaseRequest, settings: dict) -> tuple:
    """(GPU worker) Every image through the Upscale step -> (base64 images in input order, the `html_info` of
    the last: A1111's `ui_common.plaintext_to_html` of the step's infotext). As A1111's `encode_pil_to_base64`
    in `samples_format`; with `enable_pnginfo`, PNGs carry the input's text chunks, its infotext as `parameters`
    and `postprocessing`, the step's infotext; JPEG / WebP carry the input's infotext."""
    outputs, text = [], ""
    for image in images:
        info: dict = {}
        result = upscale_step(upscalers, image.convert("RGB"), req, info)
        # A1111's postprocessing infotext: `k: v` pairs, values quoted as in generation infotexts
        text = ", ".join(k if k == v else f"{k}: {infotext.quote(v)}" for k, v in info.items()
                         if v is not None)
        # what A1111's `run_postprocessing` keeps of `read_info_from_image`: the input's info but the
        # technical keys, its infotext (EXIF UserComment, else the PNG's `parameters`), the step's infotext
        chunks = {k: v for k, v in image.info.items() if k not in IGNORED_INFO_KEYS and k != "parameters"}
        if parameters := read_infotext(image):
            chunks["parameters"] = parameters
        chunks["postprocessing"] = text
        data = encode_image(result, chunks if settings["enable_pnginfo"] else None, **image_format(settings))
        outputs.append(base64.b64encode(data).decode("ascii"))
    return outputs, "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


# =============================================================================================
# Endpoints
# =============================================================================================

async def _extras(request: Request, cls):
    engine = request.state.engine
    req = cls.from_json(await read_json(request, engine.limits.max_body_bytes))
    upscalers = await run_in_threadpool(sync_options, engine.upscalers, engine.options)
    for name in [req.upscaler_1] + ([req.upscaler_2] if req.upscaler_1 != "None" else []):
        if name not in upscalers.names():  # A1111 answers its AssertionError with a 500
            raise ApiError(400, f"could not find upscaler named {name}; valid: "
                                + ", ".join(upscalers.names()))
    if cls is ExtrasSingleImageRequest:
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
        outputs, html_info = await engine.on_gpu(run_extras, upscalers, images, req, engine.options)
    except ValueError as e:  # a bad model file (UpscalerModelError), an upscaler removed meanwhile
        raise ApiError(400, str(e)) from None
    if cls is ExtrasSingleImageRequest:
        return JSONResponse({"html_info": html_info, "image": outputs[0] if outputs else None})
    return JSONResponse({"html_info": html_info, "images": outputs})


def _out_size(image: Image.Image, req: ExtrasBaseRequest) -> tuple[int, int]:
    """The size `upscale_step` will make."""
    if req.upscaler_1 == "None":
        return image.size
    if req.resize_mode == 1 and req.upscaling_crop:
        return req.upscaling_resize_w, req.upscaling_resize_h
    s = req.upscaling_resize
    if req.resize_mode == 1:
        s = max(req.upscaling_resize_w / image.width, req.upscaling_resize_h / image.height)
    return upscaled_size(image.width, image.height, s)


async def extra_single_image(request: Request):
    """Upscale one image (A1111's Extras tab)."""
    return await _extras(request, ExtrasSingleImageRequest)


async def extra_batch_images(request: Request):
    """Upscale a list of images; the answer keeps their order."""
    return await _extras(request, ExtrasBatchImagesRequest)


async def upscalers_list(request: Request):
    """Pixel upscalers: None, Lanczos, Nearest, then the ESRGAN / RealESRGAN files present."""
    engine = request.state.engine
    ups = await run_in_threadpool(sync_options, engine.upscalers, engine.options)
    return JSONResponse([u.as_api() for u in ups.infos])


async def realesrgan_models(request: Request):
    """Real-ESRGAN models present in the RealESRGAN folder."""
    engine = request.state.engine
    found = {u.name: u for u in await run_in_threadpool(list_upscalers, None, engine.upscalers.realesrgan_dir)}
    return JSONResponse([{"name": name, "path": str(found[name].path), "scale": scale}
                         for name, (_, scale) in REALESRGAN_NAMES.items() if name in found])


async def interrogate(request: Request):
    """Caption an image: needs the CLIP interrogator or DeepBooru, which this server does not have."""
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
    Route("/sdapi/v1/extra-single-image", extra_single_image, methods=["POST"]),
    Route("/sdapi/v1/extra-batch-images", extra_batch_images, methods=["POST"]),
    Route("/sdapi/v1/interrogate", interrogate, methods=["POST"]),
    Route("/sdapi/v1/upscalers", upscalers_list, methods=["GET"]),
    Route("/sdapi/v1/realesrgan-models", realesrgan_models, methods=["GET"]),
]
REQUEST_BODIES = {extra_single_image: ExtrasSingleImageRequest, extra_batch_images: ExtrasBatchImagesRequest,
                  interrogate: InterrogateRequest}
