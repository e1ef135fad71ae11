"""Image-side steps of A1111 v1.10: decoding API images, tensor <-> PIL conversions, resize modes, upscalers,
the hires fix's target size and latent upscale, PNG output with the infotext (A1111 `modules/images.py`,
`modules/processing.py`). Pure functions on PIL images and tensors; no model code. Inpainting masks are in
`sd15.a1111.inpaint`.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # torch is imported where it is used: the request schema reads this module's upscaler names
    import torch

LANCZOS = Image.Resampling.LANCZOS
NEAREST = Image.Resampling.NEAREST

# =============================================================================================
# Image decoding with decompression-bomb protection
# =============================================================================================

#: Default pixel limit of `load_image` (64 Mpx; Pillow's own warning threshold is ~89 Mpx).
DEFAULT_MAX_PIXELS = 8192 * 8192
#: Formats `load_image` lets Pillow open. Pillow plugins like EPS (which runs Ghostscript) are deliberately
#: excluded; MPO is how Pillow opens multi-picture JPEGs (phone cameras).
DEFAULT_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP")

_B64_JUNK = re.compile(r"\s+")


def decode_base64(data: str) -> bytes:
    """The bytes of an API image string: raw base64 or a data URL.

    A1111 strips the prefix only for `data:image/...;...,` strings (`split(";")[1].split(",")[1]`); here any
    `data:` string loses everything up to its first comma, which gives the same bytes for every URL A1111
    accepts. Whitespace is ignored, missing `=` padding is added and the URL-safe alphabet (`-`, `_`) is
    accepted (A1111 would fail on the last two). Raises ValueError on anything that is not base64.
    """
    if not isinstance(data, str):
        raise ValueError("Invalid encoded image: expected a base64 string")
    s = data.strip()
    if s.startswith(("http://", "https://")):
        raise ValueError("Invalid encoded image: URLs must be fetched by the caller, not passed to decode_base64")
    if s.startswith("data:"):
        comma = s.find(",")
        if comma < 0:
            raise ValueError("Invalid encoded image: data URL without a comma")
        s = s[comma + 1:]
    s = _B64_JUNK.sub("", s).replace("-", "+").replace("_", "/")
    s = s.rstrip("=")
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
    """A1111 `images.fix_png_transparency`: an RGB/P image whose `transparency` info is bytes (a PNG tRNS
    palette) becomes RGBA; everything else is returned unchanged (so `P` with a single transparent index
    keeps it only as metadata, and later `convert("RGB")` ignores it, as in A1111)."""
    if image.mode not in ("RGB", "P") or not isinstance(image.info.get("transparency"), bytes):
        return image
    return image.convert("RGBA")


def flatten(image: Image.Image, background="#ffffff") -> Image.Image:
    """A1111 `images.flatten`: an RGBA image is pasted with its own alpha onto an opaque
    `background` (`opts.img2img_background_color`, "#ffffff"); then `convert("RGB")`.

    Only mode RGBA is composited. Other modes with alpha (LA, PA, RGBa) are converted with Pillow's
    `convert("RGB")`, which drops the alpha channel (transparent pixels show their stored colour) - that is
    what A1111 does. P/L/1/CMYK/I;16/YCbCr... are converted with Pillow's standard conversions.
    """
    if image.mode == "RGBA":
        base = Image.new("RGBA", image.size, background)
        base.paste(image, mask=image)
        image = base
    return image.convert("RGB")


def load_image(data, max_pixels: int = DEFAULT_MAX_PIXELS, mode: str | None = "RGB", background="#ffffff",
               formats=DEFAULT_FORMATS) -> Image.Image:
    """Decode an API image safely and return a fully loaded PIL image.

    `data`: raw file bytes, or a str holding base64 / a data URL (see `decode_base64`). URLs are not fetched.

    Safety: the image header is parsed first (`Image.open` reads no pixel data) and `width * height` is checked
    against `max_pixels` *before* `load()` decodes anything; only `formats` are tried; Pillow's own
    `DecompressionBombError` and every decoding error (truncated file, garbage, unsupported mode) become a
    `ValueError` whose message starts with "Invalid encoded image" (the A1111 HTTP 500 detail) or says the
    image is too large. Only the first frame of animated files is decoded.

    After decoding, as A1111's `images.read` does: EXIF orientation is applied (`ImageOps.exif_transpose`,
    failures ignored) and `fix_png_transparency`.

    `mode="RGB"` (default, for init images): `flatten(image, background)`: RGBA composited on white, any other
    mode `convert("RGB")`. `mode=None`: the image as decoded (for masks, whose RGBA alpha `prepare_mask`
    needs). Any other mode string: `image.convert(mode)`.
    """
    if isinstance(data, str):
        raw = decode_base64(data)
    elif isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if not raw:
            raise ValueError("Invalid encoded image: empty")
    else:
        raise ValueError(f"Invalid encoded image: unsupported input type {type(data).__name__}")
    try:
        Image.init()  # Pillow 13 reads MPO through its JPEG plugin and has no "MPO" entry: skip unknown names
        im = Image.open(io.BytesIO(raw), formats=[f for f in formats if f in Image.OPEN] if formats else None)
    except Image.DecompressionBombError as e:
        raise ValueError(f"Image too large: {e}") from None
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError from broken headers, ...
        raise ValueError(f"Invalid encoded image: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ValueError(f"Invalid encoded image: size {w}x{h}")
    if w * h > max_pixels:
        raise ValueError(f"Image too large: {w}x{h} = {w * h} pixels (limit {max_pixels})")
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise ValueError(f"Image too large: {e}") from None
    except Exception as e:
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


# =============================================================================================
# Tensor conversions
# =============================================================================================


def _as_list(images):
    return [images] if isinstance(images, Image.Image) else list(images)


def pil_to_unit_tensor(images) -> torch.Tensor:
    """[B,3,H,W] float32 in [0,1]: `np.float32(img) / 255`, channels first.

    Non-RGB images are first made RGB with `flatten` (RGBA onto white). All images must have one size.
    This [0,1] tensor is what A1111 keeps as the img2img batch and feeds to TAESD.
    """
    import torch

    arrs = []
    for im in _as_list(images):
        if im.mode != "RGB":
            im = flatten(im)
        arrs.append(np.moveaxis(np.asarray(im, dtype=np.uint8).astype(np.float32) / 255.0, 2, 0))
    if not arrs:
        raise ValueError("no images")
    if any(a.shape != arrs[0].shape for a in arrs):
        raise ValueError("images differ in size: " + ", ".join(f"{a.shape[2]}x{a.shape[1]}" for a in arrs))
    return torch.from_numpy(np.stack(arrs))


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """VAE output [B,3,H,W] (or [3,H,W]) in ~[-1,1] -> uint8 [B,H,W,3] exactly as A1111.

    `t = clamp((x.float() + 1) / 2, 0, 1)` (float32), `u8 = (255. * t).astype(uint8)`: float32 product, then
    truncation (floor), not rounding. So x = 0 -> 127, x = 1 -> 255, x = -1 -> 0. NaN (which A1111 retries
    in fp32) maps to 0 here.
    """
    import torch

    if x.dim() == 3:
        x = x[None]
    t = torch.clamp((x.detach().float() + 1.0) / 2.0, min=0.0, max=1.0)
    t = torch.nan_to_num(t, nan=0.0).cpu().numpy()
    return (np.float32(255.0) * np.moveaxis(t, 1, 3)).astype(np.uint8)


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """VAE output [B,3,H,W] in ~[-1,1] -> list of RGB PIL images, via `tensor_to_uint8`."""
    return [Image.fromarray(a, "RGB") for a in tensor_to_uint8(x)]


# =============================================================================================
# resize modes, pixel upscalers
# =============================================================================================

#: Pixel upscalers implemented (A1111 also has ESRGAN & co., which need models and are not provided here).
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")


def _upscaler_upscale(im: Image.Image, scale: float, upscaler: str) -> Image.Image:
    """A1111 `Upscaler.upscale` for the built-in "Lanczos"/"Nearest" upscalers.

    `dest = (int(W·s)//8·8, int(H·s)//8·8)`. If the image is already at least `dest` in both directions (only
    possible for small s) it is not upscaled; otherwise one PIL resize with LANCZOS/NEAREST to
    `(int(W·s), int(H·s))`. Then LANCZOS to `dest` if the size differs.
    """
    dest_w = int((im.width * scale) // 8 * 8)
    dest_h = int((im.height * scale) // 8 * 8)
    if not (im.width >= dest_w and im.height >= dest_h and scale != 1):
        resample = LANCZOS if upscaler == "Lanczos" else NEAREST
        im = im.resize((int(im.width * scale), int(im.height * scale)), resample=resample)
    if im.width != dest_w or im.height != dest_h:
        im = im.resize((int(dest_w), int(dest_h)), resample=LANCZOS)
    return im


def _resize(im: Image.Image, w: int, h: int, upscaler: str | None) -> Image.Image:
    """The inner `resize(im, w, h)` of A1111 `resize_image`."""
    if upscaler is None or upscaler == "None" or im.mode == "L":
        return im.resize((w, h), resample=LANCZOS)
    if upscaler not in PIXEL_UPSCALERS:
        raise ValueError(f"could not find upscaler named {upscaler}")
    scale = max(w / im.width, h / im.height)
    if scale > 1.0:
        im = _upscaler_upscale(im, scale, upscaler)
    if im.width != w or im.height != h:
        im = im.resize((w, h), resample=LANCZOS)
    return im


def resize_geometry(resize_mode: int, src_w: int, src_h: int, width: int, height: int):
    """Where `resize_image` puts the resized source: `(sw, sh, x, y, fill)`.

    The source is resized to `sw × sh` and pasted with its top-left corner at `(x, y)` of the `width × height`
    result (x or y negative = cropped). `fill` is None, or `("rows", band)` / `("columns", band)`: mode 2
    stretches the edge rows/columns into bands of that thickness.

    - mode 0: `(width, height, 0, 0, None)`.
    - mode 1 (cover): `r = width/height`, `R = src_w/src_h`; if r > R: `sw = width`, `sh = src_h·width//src_w`,
      else `sh = height`, `sw = src_w·height//src_h`.
    - mode 2 and anything else (fit; A1111's `resize_image` treats every mode other than 0 and 1 as 2): if
      r < R: `sw = width`, `sh = src_h·width//src_w`, bands of `height//2 - sh//2` rows; if r > R:
      `sh = height`, `sw = src_w·height//src_h`, bands of `width//2 - sw//2` columns; r == R: no bands.
    - `(x, y) = (width//2 - sw//2, height//2 - sh//2)`.
    """
    if resize_mode == 0:
        return width, height, 0, 0, None
    ratio, src_ratio = width / height, src_w / src_h
    if resize_mode == 1:
        sw = width if ratio > src_ratio else src_w * height // src_h
        sh = height if ratio <= src_ratio else src_h * width // src_w
        fill = None
    else:
        sw = width if ratio < src_ratio else src_w * height // src_h
        sh = height if ratio >= src_ratio else src_h * width // src_w
        if ratio < src_ratio:
            fill = ("rows", height // 2 - sh // 2)
        elif ratio > src_ratio:
            fill = ("columns", width // 2 - sw // 2)
        else:
            fill = None
    return sw, sh, width // 2 - sw // 2, height // 2 - sh // 2, fill


def resize_image(resize_mode: int, image: Image.Image, width: int, height: int,
                 upscaler: str | None = None) -> Image.Image:
    """A1111 `images.resize_image`.

    `upscaler`: None or "None" (the img2img default, `opts.upscaler_for_img2img = None`) resizes with PIL
    LANCZOS; "Lanczos"/"Nearest" run A1111's Upscaler (only when the scale `max(w/W, h/H)` > 1, see
    `_upscaler_upscale`) and then LANCZOS to the exact size. Mode "L" images always use plain LANCZOS.

    - 0 "Just resize": resize to (width, height); the result keeps the input's mode.
    - 1 "Crop and resize": resize to cover, paste centred on a black **RGB** canvas (the excess is cropped).
    - 2 "Resize and fill": resize to fit, paste centred on a black RGB canvas, then fill the bars by resizing a
      zero-height (or zero-width) box at the first/last row (column) of the resized image to the band size with
      Pillow's default resample (BICUBIC). With a zero-size box Pillow samples the two rows nearest the edge
      with bicubic weights 1.125 / -0.125 (a = -0.5 at distances 0.5 and 1.5), so a band is
      `clip(1.125·edge - 0.125·next)` rather than a plain copy of the edge row. Bands of size 0 are skipped
      (A1111 would raise there).
    - 3 "Just resize (latent upscale)": A1111 never passes the init image through `resize_image` in this mode
      (it is encoded at its own size and the latent is resized bilinearly, see `upscale_latent(z, "Latent",
      width, height)`); but `resize_image(3, ...)` itself - which A1111 calls on the inpainting mask in mode 3 -
      behaves exactly like mode 2, and so does this function. Other values also behave like 2.

    Modes 1-3 return RGB even for an "L" input (A1111 pastes onto `Image.new("RGB")`).
    """
    if resize_mode == 0:
        return _resize(image, width, height, upscaler)
    sw, sh, x, y, fill = resize_geometry(resize_mode, image.width, image.height, width, height)
    resized = _resize(image, sw, sh, upscaler)
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
    """Hires-fix pixel upscale = `resize_image(0, image, width, height, upscaler)`.

    - "None": PIL LANCZOS straight to (width, height).
    - "Lanczos"/"Nearest": `s = max(width/W, height/H)`; if s > 1: PIL LANCZOS/NEAREST to `(int(W·s), int(H·s))`
      (skipped if the image already covers `dest`), LANCZOS to `dest = (int(W·s)//8·8, int(H·s)//8·8)` if
      different; finally LANCZOS to (width, height) if different.
    Other names raise `ValueError("could not find upscaler named ...")` (A1111's message).
    """
    if upscaler not in PIXEL_UPSCALERS:
        raise ValueError(f"could not find upscaler named {upscaler}")
    return resize_image(0, image, width, height, upscaler)


# =============================================================================================
# hires fix: target size, latent upscale
# =============================================================================================

#: A1111 `shared.latent_upscale_modes`: name -> (torch interpolate mode, antialias). align_corners is left at
#: its default (False for bilinear/bicubic).
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


def resolve_hr_upscaler(name: str | None) -> tuple[str, object]:
    """`hr_upscaler` -> `("latent", (mode, antialias))` or `("pixel", name)`.

    Names are matched exactly, as A1111 does. Unknown names raise `ValueError("could not find upscaler named
    X")` (the API's 500 detail).
    """
    if name is None:
        name = "Latent"
    if name in LATENT_UPSCALE_MODES:
        return "latent", LATENT_UPSCALE_MODES[name]
    if name in PIXEL_UPSCALERS:
        return "pixel", name
    raise ValueError(f"could not find upscaler named {name}")


def upscale_latent(z: torch.Tensor, mode_name: str, width: int, height: int) -> torch.Tensor:
    """Latent hires upscale: `F.interpolate(z, size=(height//8, width//8), mode, antialias)` with the
    settings of `LATENT_UPSCALE_MODES[mode_name]`. `width`/`height` are in **pixels**.

    `upscale_latent(z, "Latent", W, H)` is also img2img resize mode 3.
    """
    if mode_name not in LATENT_UPSCALE_MODES:
        raise ValueError(f"could not find upscaler named {mode_name}")
    import torch.nn.functional as F

    mode, antialias = LATENT_UPSCALE_MODES[mode_name]
    return F.interpolate(z, size=(height // 8, width // 8), mode=mode, antialias=antialias)


def png_bytes(image: Image.Image, text: str | None = None) -> bytes:
    """PNG bytes carrying the infotext as A1111's `parameters` tEXt chunk."""
    from PIL.PngImagePlugin import PngInfo

    meta = None
    if text:
        meta = PngInfo()
        meta.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


# =============================================================================================
# Saving images with their infotext (A1111 `modules/images.py` save_image / save_image_with_geninfo)
# =============================================================================================

#: File extensions images can be saved as, and their Pillow format.
SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_file_bytes(image: Image.Image, text: str | None, fmt: str = "PNG") -> bytes:
    """The file bytes of `image` in `fmt` carrying the infotext where A1111 puts it: the PNG `parameters` chunk,
    or for JPEG / WebP the EXIF UserComment ("UNICODE" + UTF-16-BE, as piexif writes it)."""
    if fmt == "PNG":
        return png_bytes(image, text)
    exif = Image.Exif()
    if text:
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")  # Exif IFD, UserComment
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt, exif=exif.tobytes(), quality=80)  # A1111's jpeg_quality
    return buf.getvalue()


def next_sequence_number(folder: str) -> int:
    """A1111 `get_next_sequence_number`: one more than the largest leading number of the files in `folder`."""
    numbers = [-1]
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.match(r"(\d+)", name)
        if m:
            numbers.append(int(m.group(1)))
    return max(numbers) + 1


def output_paths(out: str, seeds: list[int]) -> list[str]:
    """Where `save_images` writes one image per seed. `out` ending in a `SAVE_FORMATS` extension is a file name
    (several images: `name-0.png`, `name-1.png`, ...); anything else is a folder, named A1111's way
    (`NNNNN-SEED.png`, numbered after the files already there). Creates nothing."""
    stem, ext = os.path.splitext(out)
    if ext.lower() in SAVE_FORMATS and not os.path.isdir(out):
        return [out] if len(seeds) == 1 else [f"{stem}-{i}{ext}" for i in range(len(seeds))]
    start = next_sequence_number(out)
    return [os.path.join(out, f"{start + i:05d}-{seed}.png") for i, seed in enumerate(seeds)]


def save_images(images: list, texts: list, seeds: list[int], out: str) -> list[str]:
    """Write `images` with their infotexts to `out` (a folder, created if missing, or a file name; see
    `output_paths`) -> the paths written."""
    paths = output_paths(out, seeds)
    for image, text, path in zip(images, texts, paths):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as f:
            f.write(image_file_bytes(image, text, SAVE_FORMATS[os.path.splitext(path)[1].lower()]))
    return paths
