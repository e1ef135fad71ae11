"""Image-side processing of img2img, inpainting, hires fix and output conversion, as A1111 v1.10 does it.

Spec: generation.md §8 (img2img and inpainting), §9 (hires fix), §10 (output conversion); a1111-api.md §2.2
(image input) and §5 (img2img fields). Everything here is written from those descriptions; where the spec is
silent the behaviour chosen is stated in the docstring ("A1111:" notes describe what the webui does).

Pure functions on PIL images, numpy arrays and torch tensors; no model code. Runtime deps: torch, numpy, Pillow.

`sd15.pipeline.Img2ImgInit` calls these in A1111's order (decode + flatten, mask binarise/invert/blur,
whole-picture or "Only masked" geometry, resize, overlay, masked-content fill, latent mask, paste-back).
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

LANCZOS = Image.Resampling.LANCZOS
NEAREST = Image.Resampling.NEAREST

# =============================================================================================
# §8.1 strength -> steps
# =============================================================================================


def img2img_steps(steps: int, denoising_strength: float, explicit_steps: int | None = None,
                  fix_steps: bool = False) -> tuple[int, int]:
    """A1111 `setup_img2img_steps` (§8.1): returns `(schedule_steps, t_enc)`.

    `schedule_steps` is the length of the schedule the sampler builds (`get_sigmas(p, schedule_steps)`), `t_enc`
    fixes where it starts: k-diffusion samplers use `sigmas[schedule_steps - t_enc - 1:]`
    (`img2img_sigma_start`) and so run `t_enc + 1` steps (`img2img_steps_run`).

    - `fix_steps` (the `img2img_fix_steps` option, default False) or an explicit step count (hires fix passes
      `hr_second_pass_steps or steps`): `requested = explicit_steps or steps`,
      `schedule_steps = int(requested / min(strength, 0.999))` (0 when strength <= 0), `t_enc = requested - 1`,
      so exactly `requested` steps run.
    - otherwise: `schedule_steps = steps`, `t_enc = int(min(strength, 0.999) * steps)`.

    Python float arithmetic as in A1111 (e.g. 0.3 * 20 = 6.000000000000001 -> 6).
    """
    strength = float(denoising_strength)
    if fix_steps or explicit_steps is not None:
        requested = explicit_steps or steps
        total = int(requested / min(strength, 0.999)) if strength > 0 else 0
        return total, requested - 1
    return steps, int(min(strength, 0.999) * steps)


def img2img_sigma_start(schedule_steps: int, t_enc: int) -> int:
    """Index of the first σ a k-diffusion sampler uses in img2img: `sigma_sched = sigmas[start:]` (§8.1)."""
    return schedule_steps - t_enc - 1


def img2img_steps_run(t_enc: int) -> int:
    """Steps a k-diffusion sampler actually runs for an img2img `t_enc` (`len(sigma_sched) - 1`), §8.1."""
    return t_enc + 1


# =============================================================================================
# Image decoding (a1111-api.md §2.2) with decompression-bomb protection
# =============================================================================================

#: Default pixel limit of `load_image` (64 Mpx; Pillow's own warning threshold is ~89 Mpx).
DEFAULT_MAX_PIXELS = 8192 * 8192
#: Formats `load_image` lets Pillow open. Pillow plugins like EPS (which runs Ghostscript) are deliberately
#: excluded; MPO is how Pillow opens multi-picture JPEGs (phone cameras).
DEFAULT_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP")

_B64_JUNK = re.compile(r"\s+")


def decode_base64(data: str) -> bytes:
    """The bytes of an API image string: raw base64 or a data URL (§2.2: up to the first `,` is dropped).

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
    """A1111 `images.flatten` (§8.2 step 1): an RGBA image is pasted with its own alpha onto an opaque
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
    """Decode an API image safely (a1111-api.md §2.2) and return a fully loaded PIL image.

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
# §10 / §8.2 tensor conversions
# =============================================================================================


def _as_list(images):
    return [images] if isinstance(images, Image.Image) else list(images)


def pil_to_unit_tensor(images) -> torch.Tensor:
    """[B,3,H,W] float32 in [0,1]: `np.float32(img) / 255`, channels first (§8.2 step 4).

    Non-RGB images are first made RGB with `flatten` (RGBA onto white). All images must have one size.
    This [0,1] tensor is what A1111 keeps as the img2img batch and feeds to TAESD.
    """
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


def pil_to_tensor(images, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B,3,H,W] in [-1,1], the VAE-encoder input (§8.2, `images_tensor_to_samples`).

    `x = np.float32(img)/255` (float32), cast to `dtype` (A1111: the VAE dtype, fp16 by default), then
    `x * 2 - 1` computed in that dtype. So 0 -> -1, 255 -> 1 exactly; in float32 value u gives
    `fl32(fl32(u/255) * 2 - 1)`.
    """
    return pil_to_unit_tensor(images).to(dtype) * 2 - 1


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """VAE output [B,3,H,W] (or [3,H,W]) in ~[-1,1] -> uint8 [B,H,W,3] exactly as A1111 (§10).

    `t = clamp((x.float() + 1) / 2, 0, 1)` (float32), `u8 = (255. * t).astype(uint8)`: float32 product, then
    truncation (floor), not rounding. So x = 0 -> 127, x = 1 -> 255, x = -1 -> 0. NaN (which A1111 retries
    in fp32) maps to 0 here.
    """
    if x.dim() == 3:
        x = x[None]
    t = torch.clamp((x.detach().float() + 1.0) / 2.0, min=0.0, max=1.0)
    t = torch.nan_to_num(t, nan=0.0).cpu().numpy()
    return (np.float32(255.0) * np.moveaxis(t, 1, 3)).astype(np.uint8)


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """VAE output [B,3,H,W] in ~[-1,1] -> list of RGB PIL images, via `tensor_to_uint8` (§10)."""
    return [Image.fromarray(a, "RGB") for a in tensor_to_uint8(x)]


# =============================================================================================
# §8.3 resize modes, §9 pixel upscalers
# =============================================================================================

#: Pixel upscalers implemented (A1111 also has ESRGAN & co., which need models and are not provided here).
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")


def _upscaler_upscale(im: Image.Image, scale: float, upscaler: str) -> Image.Image:
    """A1111 `Upscaler.upscale` for the built-in "Lanczos"/"Nearest" upscalers (§9, pixel step 2).

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
    """The inner `resize(im, w, h)` of A1111 `resize_image` (§8.3)."""
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
    """Where `resize_image` puts the resized source: `(sw, sh, x, y, fill)` (§8.3).

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
    """A1111 `images.resize_image` (§8.3).

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
    """Hires-fix pixel upscale (§9 pixel step 2) = `resize_image(0, image, width, height, upscaler)`.

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
# §9 hires fix: target size, latent upscale
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


def hires_target_size(width: int, height: int, hr_scale: float = 2.0, hr_resize_x: int = 0,
                      hr_resize_y: int = 0) -> tuple[int, int, int, int]:
    """A1111 `calculate_target_resolution` (§9): `(hr_w, hr_h, truncate_x, truncate_y)`.

    - no resize given: `(int(width·hr_scale), int(height·hr_scale))`.
    - only one of hr_resize_x / hr_resize_y: it, and the other side from the aspect ratio with `//`.
    - both: scale to cover (`width/height < rx/ry` -> `X = rx, Y = rx·height//width`, else
      `X = ry·width//height, Y = ry`), and `truncate_x = (X - rx)//8`, `truncate_y = (Y - ry)//8` latent
      pixels are cropped after the upscale (`truncate_latent`).
    The upscale itself goes to `(hr_h//8, hr_w//8)` latent pixels. The legacy `firstphase_width/height` and
    `use_old_hires_fix_width_height` re-interpretations are not handled here.
    """
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


def truncate_latent(z: torch.Tensor, truncate_x: int, truncate_y: int) -> torch.Tensor:
    """Centre crop after the hires upscale (§9): `z[..., ty//2 : H - (ty+1)//2, tx//2 : W - (tx+1)//2]`."""
    h, w = z.shape[-2], z.shape[-1]
    return z[..., truncate_y // 2: h - (truncate_y + 1) // 2, truncate_x // 2: w - (truncate_x + 1) // 2]


def resolve_hr_upscaler(name: str | None) -> tuple[str, object]:
    """`hr_upscaler` -> `("latent", (mode, antialias))` or `("pixel", name)` (§9; None means "Latent").

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
    """Latent hires upscale (§9): `F.interpolate(z, size=(height//8, width//8), mode, antialias)` with the
    settings of `LATENT_UPSCALE_MODES[mode_name]`. `width`/`height` are in **pixels**.

    `upscale_latent(z, "Latent", W, H)` is also img2img resize mode 3 (§8.2: bilinear, no antialias,
    align_corners False).
    """
    if mode_name not in LATENT_UPSCALE_MODES:
        raise ValueError(f"could not find upscaler named {mode_name}")
    mode, antialias = LATENT_UPSCALE_MODES[mode_name]
    return F.interpolate(z, size=(height // 8, width // 8), mode=mode, antialias=antialias)


# =============================================================================================
# §8.4 inpainting: mask
# =============================================================================================


def create_binary_mask(mask_image: Image.Image, mask_round: bool = True) -> Image.Image:
    """§8.4 step 1 (A1111 `create_binary_mask`): the "L" mask of an uploaded mask image.

    An RGBA image whose alpha is not all 255 uses its alpha channel, thresholded `> 128 -> 255 else 0` when
    `mask_round`; any other image (RGBA with opaque alpha, RGB, LA, P, ...) is `convert("L")` - not
    thresholded (white = inpaint).
    """
    if mask_image.mode == "RGBA" and mask_image.getextrema()[-1] != (255, 255):
        alpha = mask_image.getchannel("A")
        if mask_round:
            return Image.fromarray(np.where(np.asarray(alpha) > 128, 255, 0).astype(np.uint8), "L")
        return alpha
    return mask_image.convert("L")


def _reflect101(idx: np.ndarray, n: int) -> np.ndarray:
    """OpenCV BORDER_REFLECT_101 index mapping (`gfedcb|abcdefgh|gfedcba`), any distance outside."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    p = np.mod(idx, period)
    return np.where(p > n - 1, period - p, p)


def opencv_gaussian_kernel_q8(ksize: int, sigma: float) -> np.ndarray:
    """The integer kernel (sum exactly 256) OpenCV's bit-exact 8-bit `GaussianBlur` uses for an odd `ksize` and
    `sigma > 0`: weights `exp(-x²/(2σ²))` normalised to sum 1 (double precision), then quantised to Q8 by error
    diffusion over the left half (round half to even), mirrored, the centre taking `256 - 2·sum(left half)`.
    """
    if ksize < 1 or ksize % 2 != 1:
        raise ValueError(f"kernel size must be odd and positive, got {ksize}")
    if sigma <= 0:
        raise ValueError("sigma must be > 0")
    half = ksize // 2
    scale2x = -0.125 / (float(sigma) * float(sigma))  # x below runs over even numbers 2·(i - half)
    vals, total = [], 0.0
    for i in range(half):
        x = 2 * i + 1 - ksize
        t = math.exp(float(x * x) * scale2x)
        vals.append(t)
        total += t
    mul = 1.0 / (total * 2.0 + 1.0)
    q, err, qsum = [], 0.0, 0
    for t in vals:
        adj = (t * mul) * 256.0 + err
        r = round(adj)  # Python rounds half to even, like cvRound(softdouble)
        err = adj - r
        q.append(r)
        qsum += r
    return np.array(q + [256 - 2 * qsum] + q[::-1], dtype=np.int64)


def gaussian_blur_axis(arr: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """One of A1111's two mask blurs (§8.4 step 2) on a 2-D uint8 array, bit-exact with
    `cv2.GaussianBlur(arr, (k, 1) if axis == 1 else (1, k), sigma)` for `k = 2·int(2.5·sigma + 0.5) + 1`.

    OpenCV's 8-bit path: the Q8 kernel of `opencv_gaussian_kernel_q8`, BORDER_REFLECT_101, integer sums and one
    rounding `(Σ k·v + 128) >> 8`. An axis of length 1 is left as is (OpenCV drops the kernel there).
    """
    arr = np.asarray(arr, dtype=np.uint8)
    if arr.ndim != 2:
        raise ValueError("expected a 2-D uint8 array")
    if not sigma > 0:
        return arr.copy()
    ksize = 2 * int(2.5 * sigma + 0.5) + 1
    n = arr.shape[axis]
    if n == 1 or ksize == 1:
        return arr.copy()
    kern = opencv_gaussian_kernel_q8(ksize, sigma)
    r = ksize // 2
    padded = np.take(arr, _reflect101(np.arange(-r, n + r), n), axis=axis)
    x = np.ascontiguousarray(np.moveaxis(padded, axis, -1))  # blur along the last axis
    if np.count_nonzero(kern) <= 64:
        acc = np.zeros(x.shape[:-1] + (n,), dtype=np.int32)  # at most 255·256: no overflow
        for j in np.flatnonzero(kern):
            acc += int(kern[j]) * x[..., j:j + n].astype(np.int32)
    else:
        # long kernels: float64 FFT convolution. Every exact sum is an integer <= 65280 and the FFT error is
        # ~1e-9, so rounding to the nearest integer recovers the exact integer sums (the kernel is
        # symmetric, so convolution = correlation).
        size = x.shape[-1] + ksize - 1
        c = np.fft.irfft(np.fft.rfft(x.astype(np.float64), size, axis=-1)
                         * np.fft.rfft(kern.astype(np.float64), size), size, axis=-1)
        acc = np.rint(c[..., ksize - 1: ksize - 1 + n]).astype(np.int64)
    out = np.clip((acc + 128) >> 8, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, -1, axis))


def blur_mask(mask: Image.Image, mask_blur_x: float = 4, mask_blur_y: float = 4) -> Image.Image:
    """§8.4 step 2: horizontal blur (σ = mask_blur_x) then vertical blur (σ = mask_blur_y), each only when > 0,
    each rounded to uint8 (two separate OpenCV calls in A1111). Returns an "L" image."""
    a = np.asarray(mask.convert("L") if mask.mode != "L" else mask, dtype=np.uint8)
    if mask_blur_x > 0:
        a = gaussian_blur_axis(a, mask_blur_x, axis=1)
    if mask_blur_y > 0:
        a = gaussian_blur_axis(a, mask_blur_y, axis=0)
    return Image.fromarray(np.ascontiguousarray(a), "L")


def prepare_mask(mask_image: Image.Image, mask_blur=4, invert: bool = False,
                 mask_round: bool = True) -> Image.Image:
    """§8.4 steps 1-2: the blurred "L" inpainting mask (A1111 `StableDiffusionProcessingImg2Img.init`).

    `create_binary_mask(mask_image, mask_round)`, then `ImageOps.invert` if `invert`
    (`inpainting_mask_invert`), then `blur_mask`. `mask_blur` is a number (both axes, the API's `mask_blur`)
    or a pair `(mask_blur_x, mask_blur_y)` (API defaults 4 / 4).
    """
    bx, by = (mask_blur, mask_blur) if np.isscalar(mask_blur) else tuple(mask_blur)
    m = create_binary_mask(mask_image, mask_round)
    if invert:
        m = ImageOps.invert(m)
    return blur_mask(m, bx, by)


# ---------------------------------------------------------------------------------------------
# §8.4 step 4: "Only masked" crop region
# ---------------------------------------------------------------------------------------------


def get_crop_region(mask, pad: int = 0):
    """A1111 `masking.get_crop_region_v2`: `(x1, y1, x2, y2)` (x2/y2 exclusive) of the non-zero pixels of an "L"
    mask (PIL image or 2-D array), grown by `pad` on every side and clipped to the image; None for an
    all-zero mask."""
    m = mask if isinstance(mask, Image.Image) else Image.fromarray(np.asarray(mask, dtype=np.uint8))
    box = m.getbbox()
    if not box:
        return None
    x1, y1, x2, y2 = box
    if not pad:
        return box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, m.size[0]), min(y2 + pad, m.size[1])


def expand_crop_region(crop_region, processing_width: int, processing_height: int, image_width: int,
                       image_height: int):
    """A1111 `masking.expand_crop_region` (§8.4 step 4): grow the short side of the box to the processing
    aspect ratio.

    If the box is relatively wider than `processing_width/processing_height`: `diff = int(w / ratio - h)`
    (float), `y1 -= diff//2`, `y2 += diff - diff//2`; then if `y2 >= image_height` shift the box up by
    `y2 - image_height`; if `y1 < 0` shift it down by `-y1`; and finally clip `y2` to `image_height` (the box
    can end up smaller than wanted when the image is too small). Otherwise the same along x with
    `diff = int(h·ratio - w)`.
    """
    x1, y1, x2, y2 = crop_region
    ratio_crop = (x2 - x1) / (y2 - y1)
    ratio_proc = processing_width / processing_height
    if ratio_crop > ratio_proc:
        y1, y2 = _grow_span(y1, y2, int((x2 - x1) / ratio_proc - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow_span(x1, x2, int((y2 - y1) * ratio_proc - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow_span(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    """One axis of `expand_crop_region`: widen [lo, hi) by `diff` around its centre, shift it back inside
    [0, limit), and clip it to `limit` if it is still too long."""
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def inpaint_crop_region(mask, padding: int, width: int, height: int):
    """"Only masked" box (§8.4 step 4): `get_crop_region(mask, padding)` expanded to the `width × height`
    aspect ratio inside the mask's size; None for a blank mask (A1111 then falls back to plain img2img)."""
    m = mask if isinstance(mask, Image.Image) else Image.fromarray(np.asarray(mask, dtype=np.uint8))
    if m.mode != "L":
        m = m.convert("L")
    box = get_crop_region(m, padding)
    if box is None:
        return None
    return expand_crop_region(box, width, height, m.width, m.height)


def prepare_inpaint_mask(mask: Image.Image, width: int, height: int, resize_mode: int = 0,
                         inpaint_full_res: bool = True, padding: int = 0) -> dict:
    """§8.4 steps 3-4 on the blurred mask from `prepare_mask`. Returns a dict:

    - `image_mask`: the mask at processing size (`width × height`), or None when "Only masked" found a blank
      mask (A1111 then runs plain img2img: no overlay, no latent mask);
    - `latent_mask`: the image `latent_mask()` must be built from (= `image_mask`);
    - `mask_for_overlay`: the mask whose inverse is the overlay's alpha;
    - `crop_region`: `(x1, y1, x2, y2)` for "Only masked", else None;
    - `paste_to`: `(x1, y1, x2 - x1, y2 - y1)` for "Only masked", else None.

    Whole picture (`inpaint_full_res=False`): `image_mask = resize_image(resize_mode, mask, width, height)`
    (LANCZOS for mode 0 on an "L" mask; RGB result for modes 1-3) and `mask_for_overlay = clip(2·image_mask,
    0, 255)` (so mask values >= 128 fully replace the original).
    Only masked: `mask_for_overlay` is the blurred mask itself (original size), the crop is
    `inpaint_crop_region`, and `image_mask = resize_image(2, mask.crop(crop_region), width, height)`.
    """
    out = {"image_mask": None, "latent_mask": None, "mask_for_overlay": None, "crop_region": None,
           "paste_to": None}
    if inpaint_full_res:
        m = mask.convert("L")
        crop = inpaint_crop_region(m, padding, width, height)
        if crop is None:
            return out
        x1, y1, x2, y2 = crop
        image_mask = resize_image(2, m.crop(crop), width, height)
        out.update(image_mask=image_mask, latent_mask=image_mask, mask_for_overlay=mask, crop_region=crop,
                   paste_to=(x1, y1, x2 - x1, y2 - y1))
        return out
    image_mask = resize_image(resize_mode, mask, width, height)
    a = np.asarray(image_mask)
    overlay = Image.fromarray(np.clip(a.astype(np.float32) * 2, 0, 255).astype(np.uint8))
    out.update(image_mask=image_mask, latent_mask=image_mask, mask_for_overlay=overlay)
    return out


# ---------------------------------------------------------------------------------------------
# §8.4 step 5 (masked content) and the per-image preparation of §8.2
# ---------------------------------------------------------------------------------------------

_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111 `masking.fill` (§8.4 step 5, "fill"): pre-fill the masked area from the surrounding colours.

    The image, premultiplied ("RGBa"), is pasted onto a transparent canvas through the inverted mask (so
    masked pixels become transparent, partially masked ones partly so). Pillow GaussianBlur of that with
    radius 256, 64, 16, 4, 2 and 0 is un-premultiplied to RGBA and alpha-composited onto an initially
    transparent black canvas 1, 1, 2, 4, 2 and 1 times respectively; the result is converted to RGB.
    Unmasked pixels end up exactly unchanged (the final radius-0 pass is opaque there); a completely masked
    image becomes black.

    A1111 runs this for every `inpainting_fill` except 1 ("original"): also before "latent noise" and
    "latent nothing", where it only matters in partly masked pixels. `mask` is the latent mask (`image_mask`).
    """
    image_mod = Image.new("RGBA", image.size)
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in _FILL_PASSES:
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def make_overlay(image: Image.Image, mask_for_overlay: Image.Image) -> Image.Image:
    """The RGBA overlay of the original (§8.4 step 3): the image premultiplied, pasted through
    `invert(mask_for_overlay)` onto a transparent canvas, back to straight RGBA. Alpha = 255 - mask."""
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    return masked.convert("RGBA")


def prepare_init_image(image: Image.Image, width: int, height: int, resize_mode: int = 0, inpaint: dict | None = None,
                       inpainting_fill: int = 1, background="#ffffff"):
    """One init image as A1111's img2img `init` prepares it (§8.2 steps 1-3, §8.4).

    `inpaint` is the dict of `prepare_inpaint_mask` (None for plain img2img). Returns
    `(image, overlay, mask_for_overlay)`: the RGB image to encode (`pil_to_tensor`), the RGBA overlay for
    `apply_overlay` (None without a mask) and the possibly resized `mask_for_overlay` (store it back into the
    dict, as A1111 keeps it for the next image).

    1. `flatten` onto `background`.
    2. Unless "Only masked" or resize mode 3: `resize_image(resize_mode, image, width, height)`.
    3. With a mask: if `mask_for_overlay` differs in size from the image, it is resized with
       `resize_image(resize_mode, ...)` to the image size; the overlay is `make_overlay(image, mask_for_overlay)`.
    4. "Only masked": crop to `crop_region`, `resize_image(2, ..., width, height)`.
    5. With a mask and `inpainting_fill != 1`: `fill_masked(image, latent_mask)`.
    """
    image = flatten(image, background)
    crop = inpaint["crop_region"] if inpaint else None
    has_mask = bool(inpaint) and inpaint.get("image_mask") is not None
    if crop is None and resize_mode != 3:
        image = resize_image(resize_mode, image, width, height)
    overlay, mfo = None, (inpaint or {}).get("mask_for_overlay")
    if has_mask:
        if mfo.size != image.size:
            mfo = resize_image(resize_mode, mfo, image.width, image.height)
        overlay = make_overlay(image, mfo)
    if crop is not None:
        image = resize_image(2, image.crop(crop), width, height)
    if has_mask and inpainting_fill != 1:
        image = fill_masked(image, inpaint["latent_mask"])
    return image, overlay, mfo


# ---------------------------------------------------------------------------------------------
# §8.4 step 6: latent mask; step 5 latent-side masked content; final blend
# ---------------------------------------------------------------------------------------------


def latent_mask(mask: Image.Image, latent_h: int, latent_w: int, mask_round: bool = True):
    """§8.4 step 6: `(mask, nmask)`, float32 tensors of shape [1, 1, latent_h, latent_w].

    `latmask = mask.convert("RGB").resize((latent_w, latent_h))` with Pillow's default resample (BICUBIC),
    channel 0 as float32 `/ 255`, `np.around` (half to even: values >= 128 -> 1) when `mask_round`.
    `nmask = latmask` (1 = regenerate), `mask = 1.0 - latmask` (1 = keep), both float32 (A1111 tiles them over
    the 4 latent channels and casts to the model dtype; these broadcast over [B, 4, h, w]).
    """
    lat = mask.convert("RGB").resize((latent_w, latent_h))
    lat = np.asarray(lat, dtype=np.float32)[:, :, 0] / 255
    if mask_round:
        lat = np.around(lat)
    lat = lat.astype(np.float32)
    keep = (np.float32(1.0) - lat).astype(np.float32)
    return torch.from_numpy(keep)[None, None].clone(), torch.from_numpy(lat)[None, None].clone()


def apply_masked_content(init_latent: torch.Tensor, mask: torch.Tensor, nmask: torch.Tensor, inpainting_fill: int,
                         noise: torch.Tensor | None = None) -> torch.Tensor:
    """Latent side of "Masked content" (§8.4 step 5), applied to the encoded init latent.

    0 "fill" and 1 "original": unchanged (fill acted on pixels, `fill_masked`). 2 "latent noise":
    `init·mask + noise·nmask`, where `noise` is the first draw of a fresh ImageRNG on `all_seeds[0:B]` (even in
    later iterations; the caller makes it). 3 "latent nothing": `init·mask`.
    """
    if inpainting_fill == 2:
        if noise is None:
            raise ValueError("inpainting_fill=2 (latent noise) needs the noise tensor")
        return init_latent * mask + noise * nmask
    if inpainting_fill == 3:
        return init_latent * mask
    return init_latent


def blend_inpaint_latent(samples: torch.Tensor, init_latent: torch.Tensor, mask: torch.Tensor,
                         nmask: torch.Tensor) -> torch.Tensor:
    """Keep the unmasked latent (§8.4 step 6, also A1111's final blend): `samples·nmask + init·mask`."""
    return samples * nmask + init_latent * mask


def inpainting_conditioning_inputs(source: torch.Tensor, mask_image: Image.Image | None = None,
                                   mask_weight: float = 1.0, mask_round: bool = True):
    """Pixel inputs of the 9-channel inpainting UNet's `c_concat` (§8.4 step 7).

    `source`: the init batch in [-1, 1] ([B,3,H,W]). Returns `(masked_image, cond_mask)`:
    `cond_mask = float32(mask.convert("L"))/255` as [1,1,H,W] (rounded when `mask_round`; all ones without a
    mask), `masked_image = lerp(source, source·(1 - cond_mask), mask_weight)` - encode it with the VAE
    (×0.18215), and `inpainting_mask_to_latent(cond_mask, h, w)` gives the mask channel.
    """
    if mask_image is not None:
        m = torch.from_numpy(np.asarray(mask_image.convert("L"), dtype=np.float32) / 255.0)[None, None]
        if mask_round:
            m = torch.round(m)
    else:
        m = source.new_ones(1, 1, *source.shape[-2:])
    m = m.to(device=source.device, dtype=source.dtype)
    return torch.lerp(source, source * (1.0 - m), mask_weight), m


def inpainting_mask_to_latent(cond_mask: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """The mask channel of `c_concat`: `F.interpolate(cond_mask, (latent_h, latent_w))` (mode "nearest")."""
    return F.interpolate(cond_mask, size=(latent_h, latent_w))


# ---------------------------------------------------------------------------------------------
# §8.4 steps 4 and 8: paste-back and overlay
# ---------------------------------------------------------------------------------------------


def uncrop(image: Image.Image, dest_size: tuple[int, int], paste_to) -> Image.Image:
    """A1111 `uncrop`: `resize_image(1, image, w, h)` to the crop box size and paste it at `(x, y)` on a
    transparent RGBA canvas of `dest_size`. `paste_to = (x, y, w, h)`."""
    x, y, w, h = paste_to
    base = Image.new("RGBA", dest_size)
    base.paste(resize_image(1, image, w, h), (x, y))
    return base


def apply_overlay(image: Image.Image, paste_to, overlay: Image.Image | None) -> Image.Image:
    """Final inpainting composite (A1111 `apply_overlay`, §8.4 steps 4 and 8) -> RGB image.

    No overlay: the image unchanged. With `paste_to` ("Only masked"): `uncrop` onto the overlay's size first
    (outside the box the canvas is transparent, and the overlay is opaque there since the mask is zero outside
    its bbox). Then the RGBA overlay (the original, alpha = 255 - mask_for_overlay) is alpha-composited over
    the image and the result converted to RGB.
    """
    if overlay is None:
        return image
    if paste_to is not None:
        image = uncrop(image, (overlay.width, overlay.height), paste_to)
    image = image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")
