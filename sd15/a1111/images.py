"""Image-side steps of A1111 v1.10 (`modules/images.py`, `modules/processing.py`): decoding API images,
tensor <-> PIL conversions, resize modes and upscalers, the hires fix's latent upscale, and image files with
their infotext. Inpainting masks are in `sd15.a1111.inpaint`.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

if TYPE_CHECKING:  # torch is imported where it is used: the request schema reads this module's upscaler names
    import torch

LANCZOS = Image.Resampling.LANCZOS
NEAREST = Image.Resampling.NEAREST

DEFAULT_MAX_PIXELS = 8192 * 8192  # of a decoded image (Pillow itself only warns from ~89 Mpx)
# What `load_image` lets Pillow open: not EPS and the like (Ghostscript); MPO is Pillow's multi-picture JPEG
DEFAULT_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP")


def decode_base64(data: str) -> bytes:
    """The bytes of an API image string, raw base64 or a data URL (everything up to its first comma goes,
    which is what A1111 keeps for the URLs it accepts). Unlike A1111 it ignores whitespace, adds missing `=`
    padding and takes the URL-safe alphabet. Raises ValueError on anything that is not base64."""
    s = data.strip()
    if s.startswith(("http://", "https://")):
        raise ValueError("Invalid encoded image: URLs must be fetched by the caller, not passed to decode_base64")
    if s.startswith("data:"):
        comma = s.find(",")
        if comma < 0:
            raise ValueError("Invalid encoded image: data URL without a comma")
        s = s[comma + 1:]
    s = re.sub(r"\s+", "", s).replace("-", "+").replace("_", "/").rstrip("=")
    if len(s) % 4 == 1:
        raise ValueError("Invalid encoded image: bad base64 length")
    s += "=" * (-len(s) % 4)
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"Invalid encoded image: not base64 ({e})") from None
    if not raw:
        raise ValueError("Invalid encoded image: empty")
    return raw


def fix_png_transparency(image: Image.Image) -> Image.Image:
    """A1111 `images.fix_png_transparency`: an RGB/P image whose `transparency` is bytes (a tRNS table)
    becomes RGBA; a single transparent index stays metadata, which `convert("RGB")` ignores, as in A1111."""
    if image.mode not in ("RGB", "P") or not isinstance(image.info.get("transparency"), bytes):
        return image
    return image.convert("RGBA")


def flatten(image: Image.Image, background="#ffffff") -> Image.Image:
    """A1111 `images.flatten`: RGBA is composited onto `background` (`opts.img2img_background_color`), then
    everything is `convert("RGB")`, which drops the alpha of other modes (LA, PA), as in A1111."""
    if image.mode == "RGBA":
        base = Image.new("RGBA", image.size, background)
        base.paste(image, mask=image)
        image = base
    return image.convert("RGB")


def load_image(data, max_pixels: int = DEFAULT_MAX_PIXELS, mode: str | None = "RGB", background="#ffffff",
               formats=DEFAULT_FORMATS) -> Image.Image:
    """An API image (file bytes, base64 or a data URL), decoded safely: the size is checked against
    `max_pixels` from the header before any pixel is decoded, only `formats` are tried, and every failure is
    a ValueError saying "Invalid encoded image" (A1111's detail) or "Image too large". Then, as A1111's
    `images.read`: EXIF orientation and `fix_png_transparency`. `mode="RGB"` flattens (init images), None
    keeps the image as decoded (masks, whose alpha counts), any other mode converts."""
    if isinstance(data, str):
        data = decode_base64(data)
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"Invalid encoded image: unsupported input type {type(data).__name__}")
    try:
        Image.init()  # Pillow 13 reads MPO through its JPEG plugin and has no "MPO" entry: skip unknown names
        formats = [f for f in formats if f in Image.OPEN] if formats else None
        im = Image.open(io.BytesIO(data), formats=formats)
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ValueError(f"size {w}x{h}")
        if w * h > max_pixels:
            raise Image.DecompressionBombError(f"{w}x{h} = {w * h} pixels (limit {max_pixels})")
        im.load()
    except Image.DecompressionBombError as e:
        raise ValueError(f"Image too large: {e}") from None
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError from broken headers, ...
        raise ValueError(f"Invalid encoded image: {e}") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:
        pass
    im = fix_png_transparency(im)
    try:
        if mode == "RGB":
            im = flatten(im, background)
        elif mode is not None and im.mode != mode:
            im = im.convert(mode)
    except Exception as e:
        raise ValueError(f"Invalid encoded image: cannot convert mode {im.mode} ({e})") from None
    return im


def pil_to_unit_tensor(images) -> torch.Tensor:
    """[B,3,H,W] float32 in [0,1] (`np.float32(img) / 255`, non-RGB images flattened), the img2img batch as
    A1111 keeps it; all images must have one size."""
    import torch

    arrs = []
    for im in [images] if isinstance(images, Image.Image) else images:
        if im.mode != "RGB":
            im = flatten(im)
        arrs.append(np.moveaxis(np.asarray(im, dtype=np.uint8).astype(np.float32) / 255.0, 2, 0))
    if not arrs:
        raise ValueError("no images")
    if any(a.shape != arrs[0].shape for a in arrs):
        raise ValueError("images differ in size: " + ", ".join(f"{a.shape[2]}x{a.shape[1]}" for a in arrs))
    return torch.from_numpy(np.stack(arrs))


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """VAE output [B,3,H,W] (or [3,H,W]) in ~[-1,1] -> uint8 [B,H,W,3] as A1111: `(255. * t).astype(uint8)`
    of `t = clamp((x + 1) / 2, 0, 1)` in float32, truncating (x = 0 -> 127); NaN (A1111 retries) -> 0."""
    import torch

    if x.dim() == 3:
        x = x[None]
    t = torch.clamp((x.detach().float() + 1.0) / 2.0, min=0.0, max=1.0)
    t = torch.nan_to_num(t, nan=0.0).cpu().numpy()
    return (np.float32(255.0) * np.moveaxis(t, 1, 3)).astype(np.uint8)


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """VAE output [B,3,H,W] in ~[-1,1] -> RGB PIL images."""
    return [Image.fromarray(a, "RGB") for a in tensor_to_uint8(x)]


PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")  # the built-in ones; ESRGAN models are `sd15.upscale`'s


def upscaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The size A1111's `Upscaler.upscale` ends at: the scaled size rounded down to multiples of 8."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


def upscale(image: Image.Image, name: str, scale: float,
            run: Callable[[Image.Image], Image.Image] | None = None,
            interrupted: Callable[[], bool] | None = None) -> Image.Image:
    """A1111 `Upscaler.upscale`: one pass of the upscaler (`run`, a model's; None: the built-in "Lanczos" or
    "Nearest" resize by `scale`), up to three times, until the image covers `dest = upscaled_size(W, H,
    scale)`, then LANCZOS to `dest` if the size differs."""
    if run is None and name not in PIXEL_UPSCALERS:
        raise ValueError(f"could not find upscaler named {name}")  # A1111's message
    dest_w, dest_h = upscaled_size(image.width, image.height, scale)
    for i in range(3):
        covered = image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1)
        if covered or name == "None" or (interrupted is not None and interrupted()):
            break
        before = image.size
        if run is None:
            size = (int(image.width * scale), int(image.height * scale))
            image = image.resize(size, resample=LANCZOS if name == "Lanczos" else NEAREST)
        else:
            image = run(image)
        if image.size == before:  # interrupted, or a scale too small to change the size
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=LANCZOS)
    return image


def resize(image: Image.Image, name: str | None, width: int, height: int, upscalers=None,
           interrupted: Callable[[], bool] | None = None) -> Image.Image:
    """A1111 `resize_image(0, image, width, height, name)`: "None" (or None, or a mode "L" image) is one
    LANCZOS resize; otherwise the upscaler (of `upscalers`, a `sd15.upscale.Upscalers`; None: a built-in)
    runs when `max(width/W, height/H) > 1`, then LANCZOS to the exact size."""
    if name in (None, "None") or image.mode == "L":
        return image.resize((width, height), resample=LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0 and upscalers is not None:
        image = upscalers.upscale(image, name, scale, interrupted)
    elif scale > 1.0:
        image = upscale(image, name, scale)
    if image.size != (width, height):
        image = image.resize((width, height), resample=LANCZOS)
    return image


def resize_geometry(resize_mode: int, src_w: int, src_h: int, width: int, height: int):
    """Where `resize_image` puts the source: resized to `sw × sh`, pasted at `(x, y)` of the result
    (negative: cropped), and `fill` None or `("rows" | "columns", band)`, the edge bands mode 2 stretches.
    Mode 1 covers the target, mode 2 (and every mode but 0 and 1, as in A1111) fits inside it."""
    if resize_mode == 0:
        return width, height, 0, 0, None
    ratio, src_ratio = width / height, src_w / src_h
    by_width = ratio > src_ratio if resize_mode == 1 else ratio < src_ratio  # the side that fits exactly
    sw, sh = (width, src_h * width // src_w) if by_width else (src_w * height // src_h, height)
    fill = None
    if resize_mode != 1 and ratio != src_ratio:
        fill = ("rows", height // 2 - sh // 2) if by_width else ("columns", width // 2 - sw // 2)
    return sw, sh, width // 2 - sw // 2, height // 2 - sh // 2, fill


def resize_image(resize_mode: int, image: Image.Image, width: int, height: int,
                 upscaler: str | None = None) -> Image.Image:
    """A1111 `images.resize_image`: 0 just resize, 1 crop and resize, 2 resize and fill, 3 as 2 (A1111 takes
    mode 3's init image through `upscale_latent`, but its masks through here). Modes 1-3 paste onto a black
    RGB canvas, so an "L" image comes back RGB. Mode 2 fills the bars by resizing a zero-height (zero-width)
    edge box with Pillow's bicubic, which weighs the two edge rows 1.125 / -0.125 rather than copying one;
    bands of size 0 are skipped (A1111 would raise). `upscaler` "Lanczos"/"Nearest" runs A1111's Upscaler
    (`resize`) when enlarging RGB; None and "None" resize with LANCZOS."""
    if resize_mode == 0:
        return resize(image, upscaler, width, height)
    sw, sh, x, y, fill = resize_geometry(resize_mode, image.width, image.height, width, height)
    resized = resize(image, upscaler, sw, sh)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(x, y))
    if fill is not None and fill[1] > 0:
        band = fill[1]
        if fill[0] == "rows":
            res.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, band), box=(0, resized.height, width, resized.height)),
                      box=(0, band + sh))
        else:
            res.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((band, height), box=(resized.width, 0, resized.width, height)),
                      box=(band + sw, 0))
    return res


def upscale_image(image: Image.Image, upscaler: str, width: int, height: int) -> Image.Image:
    """The hires fix's pixel upscale with a built-in upscaler, `resize_image(0, ...)`; other names raise
    A1111's "could not find upscaler named ..."."""
    if upscaler not in PIXEL_UPSCALERS:
        raise ValueError(f"could not find upscaler named {upscaler}")
    return resize_image(0, image, width, height, upscaler)


# A1111 `shared.latent_upscale_modes`: name -> (interpolate mode, antialias), align_corners at its default
LATENT_UPSCALE_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


def truncate_latent(z: torch.Tensor, truncate_x: int, truncate_y: int) -> torch.Tensor:
    """Centre crop after the hires upscale: `z[..., ty//2 : H - (ty+1)//2, tx//2 : W - (tx+1)//2]`."""
    h, w = z.shape[-2], z.shape[-1]
    return z[..., truncate_y // 2: h - (truncate_y + 1) // 2, truncate_x // 2: w - (truncate_x + 1) // 2]


def upscale_latent(z: torch.Tensor, mode_name: str, width: int, height: int) -> torch.Tensor:
    """The latent upscale of hires fix (and of img2img resize mode 3, "Latent") to width × height pixels."""
    if mode_name not in LATENT_UPSCALE_MODES:
        raise ValueError(f"could not find upscaler named {mode_name}")
    import torch.nn.functional as F

    mode, antialias = LATENT_UPSCALE_MODES[mode_name]
    return F.interpolate(z, size=(height // 8, width // 8), mode=mode, antialias=antialias)


# A1111's `samples_format` values -> Pillow's format names
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image: Image.Image, info: dict | None = None, fmt: str = "png", quality: int = 80,
                 lossless: bool = False) -> bytes:
    """File bytes of `image` in the `samples_format` `fmt`, as A1111's `api.encode_pil_to_base64` and
    `images.save_image` write them. `info` is A1111's `image.info`, the infotext under `parameters`: PNG
    writes each str item as a tEXt chunk; JPEG and WebP, of RGB, write `parameters` as EXIF UserComment
    ("UNICODE\\0" + UTF-16-BE, as A1111's piexif does) with `quality` (`opts.jpeg_quality`, WebP's too) and
    WebP `lossless` (`opts.webp_lossless`)."""
    info, buf = info or {}, io.BytesIO()
    if IMAGE_FORMATS[fmt] == "PNG":
        meta = PngInfo()
        for key, value in info.items():
            if isinstance(key, str) and isinstance(value, str):
                meta.add_text(key, value)
        image.save(buf, format="PNG", pnginfo=meta)
        return buf.getvalue()
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + (info.get("parameters") or "").encode("utf-16-be")
    options = {"lossless": lossless} if IMAGE_FORMATS[fmt] == "WEBP" else {}
    image.convert("RGB").save(buf, format=IMAGE_FORMATS[fmt], exif=exif.tobytes(), quality=quality, **options)
    return buf.getvalue()


def png_bytes(image: Image.Image, text: str | None = None) -> bytes:
    """PNG bytes carrying the infotext as A1111's `parameters` tEXt chunk."""
    return encode_image(image, {"parameters": text} if text else None)


def next_sequence_number(folder: str) -> int:
    """A1111's `get_next_sequence_number`: one more than the largest leading number of the names in `folder`."""
    taken = [int(m.group(1)) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
             if (m := re.match(r"(\d+)", name))]
    return max(taken, default=-1) + 1


SAVE_FORMATS = tuple(f".{name}" for name in IMAGE_FORMATS)  # the file extensions `save_images` writes


def save_images(images: list, texts: list, seeds: list[int], out: str) -> list[str]:
    """Write `images` with their infotexts (A1111 `images.save_image`) -> the paths written. `out` with a
    `SAVE_FORMATS` extension is a file name (several images: `name-0.png`, ...), anything else a folder
    (created if missing) of `NNNNN-SEED.png` files numbered after those already there; the extension picks
    the format (`encode_image`, A1111's default quality 80)."""
    stem, ext = os.path.splitext(out)
    if ext.lower() in SAVE_FORMATS and not os.path.isdir(out):
        paths = [out] if len(seeds) == 1 else [f"{stem}-{i}{ext}" for i in range(len(seeds))]
    else:
        start = next_sequence_number(out)
        paths = [os.path.join(out, f"{start + i:05d}-{seed}.png") for i, seed in enumerate(seeds)]
    for image, text, path in zip(images, texts, paths):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as f:
            f.write(encode_image(image, {"parameters": text}, os.path.splitext(path)[1][1:].lower()))
    return paths
