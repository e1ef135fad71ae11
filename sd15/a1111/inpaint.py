"""Inpainting, as A1111 v1.10's img2img does it: the mask (binarise, invert, blur), "Only masked" crop
region, masked content, latent mask, blend and paste-back (A1111 `StableDiffusionProcessingImg2Img.init`,
`modules/masking.py`, `apply_overlay`). Pure functions on PIL images, numpy arrays and tensors.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from sd15.a1111.images import flatten, load_image, resize_image

# =============================================================================================
# inpainting: mask
# =============================================================================================


def create_binary_mask(mask_image: Image.Image, mask_round: bool = True) -> Image.Image:
    """the "L" mask of an uploaded mask image.

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
    """One of A1111's two mask blurs on a 2-D uint8 array, bit-exact with
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
    """horizontal blur (σ = mask_blur_x) then vertical blur (σ = mask_blur_y), each only when > 0,
    each rounded to uint8 (two separate OpenCV calls in A1111). Returns an "L" image."""
    a = np.asarray(mask.convert("L") if mask.mode != "L" else mask, dtype=np.uint8)
    if mask_blur_x > 0:
        a = gaussian_blur_axis(a, mask_blur_x, axis=1)
    if mask_blur_y > 0:
        a = gaussian_blur_axis(a, mask_blur_y, axis=0)
    return Image.fromarray(np.ascontiguousarray(a), "L")


def prepare_mask(mask_image: Image.Image, mask_blur=4, invert: bool = False,
                 mask_round: bool = True) -> Image.Image:
    """the blurred "L" inpainting mask (A1111 `StableDiffusionProcessingImg2Img.init`).

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
# "Only masked" crop region
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
    """A1111 `masking.expand_crop_region`: grow the short side of the box to the processing
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
    """"Only masked" box: `get_crop_region(mask, padding)` expanded to the `width × height`
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
    """on the blurred mask from `prepare_mask`. Returns a dict:

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
# and the per-image preparation of 
# ---------------------------------------------------------------------------------------------

_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111 `masking.fill`: pre-fill the masked area from the surrounding colours.

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
    """The RGBA overlay of the original: the image premultiplied, pasted through
    `invert(mask_for_overlay)` onto a transparent canvas, back to straight RGBA. Alpha = 255 - mask."""
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    return masked.convert("RGBA")


def prepare_init_image(image: Image.Image, width: int, height: int, resize_mode: int = 0, inpaint: dict | None = None,
                       inpainting_fill: int = 1, background="#ffffff"):
    """One init image as A1111's img2img `init` prepares it.

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
# latent mask; step 5 latent-side masked content; final blend
# ---------------------------------------------------------------------------------------------


def latent_mask(mask: Image.Image, latent_h: int, latent_w: int, mask_round: bool = True):
    """`(mask, nmask)`, float32 tensors of shape [1, 1, latent_h, latent_w].

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
    """Latent side of "Masked content", applied to the encoded init latent.

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
    """Keep the unmasked latent: `samples·nmask + init·mask`."""
    return samples * nmask + init_latent * mask


# ---------------------------------------------------------------------------------------------
# paste-back and overlay
# ---------------------------------------------------------------------------------------------


def uncrop(image: Image.Image, dest_size: tuple[int, int], paste_to) -> Image.Image:
    """A1111 `uncrop`: `resize_image(1, image, w, h)` to the crop box size and paste it at `(x, y)` on a
    transparent RGBA canvas of `dest_size`. `paste_to = (x, y, w, h)`."""
    x, y, w, h = paste_to
    base = Image.new("RGBA", dest_size)
    base.paste(resize_image(1, image, w, h), (x, y))
    return base


def apply_overlay(image: Image.Image, paste_to, overlay: Image.Image | None) -> Image.Image:
    """Final inpainting composite (A1111 `apply_overlay`) -> RGB image.

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



def _as_image(value) -> Image.Image:
    return value if isinstance(value, Image.Image) else load_image(value, mode=None)


def prepare_init_images(p, batch_size: int):
    """A1111's `StableDiffusionProcessingImg2Img.init` on the pixel side, for a request `p` (sd15.schema):
    decode the init images and the mask, make the mask, the "Only masked" region, the resized images and
    their overlays. Returns (images, overlays, inpaint) with one entry per batch image (a single init image is
    repeated); `inpaint` is `prepare_inpaint_mask`'s dict, or None without a (non-blank) mask."""
    inpaint = None
    if p.mask is not None:
        blur = p.mask_blur if p.mask_blur is not None else (p.mask_blur_x, p.mask_blur_y)
        mask = prepare_mask(_as_image(p.mask), blur, invert=bool(p.inpainting_mask_invert), mask_round=p.mask_round)
        inpaint = prepare_inpaint_mask(mask, p.width, p.height, p.resize_mode, p.inpaint_full_res,
                                       p.inpaint_full_res_padding)
        inpaint = inpaint if inpaint["image_mask"] is not None else None  # blank "only masked" mask
    images, overlays = [], []
    for im in p.init_images:
        image, overlay, mask_for_overlay = prepare_init_image(_as_image(im), p.width, p.height, p.resize_mode,
                                                              inpaint, p.inpainting_fill)
        if inpaint is not None:
            inpaint["mask_for_overlay"] = mask_for_overlay
        images.append(image)
        overlays.append(overlay)
    if len(images) == 1:
        images, overlays = images * batch_size, overlays * batch_size
    return images, overlays, inpaint
