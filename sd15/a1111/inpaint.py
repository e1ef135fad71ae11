"""Img2img and inpainting on the image side, as A1111 v1.10 does them (`StableDiffusionProcessingImg2Img`
`.init`, `modules/masking.py`, `apply_overlay`): the mask (binarise, invert, blur), the "Only masked" crop
region, the resized init images, masked content, the latent mask, the blend, the colour correction and the
paste-back. `InitImages` owns all of it for one request; the functions below are its steps, on PIL images,
numpy arrays and tensors.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from sd15.a1111.color import apply_color_correction, setup_color_correction
from sd15.a1111.images import flatten, load_image, pil_to_unit_tensor, resize_image, upscale_latent
from sd15.schema import RequestError


class InitImages:
    """The image side of one img2img request `r` (a `sd15.schema.ResolvedRequest`), prepared once: the mask
    and its "Only masked" crop region, the resized init images and their overlays, and the init latent
    (`encode(pixels) -> latents`, the VAE) with the latent side of "masked content", whose "latent noise" is
    `noise(shape)`, and the colour correction targets (`img2img_color_correction`). `blend` and `finish` apply
    them to each batch's results."""

    def __init__(self, r, encode, noise):
        self.inpaint = None  # prepare_inpaint_mask's dict; None without a mask, or a blank "Only masked" one
        if r.mask is not None:
            mask = prepare_mask(_as_image(r.mask), (r.mask_blur_x, r.mask_blur_y), r.inpainting_mask_invert,
                                r.mask_round)
            inpaint = prepare_inpaint_mask(mask, r.width, r.height, r.resize_mode, r.inpaint_full_res,
                                           r.inpaint_full_res_padding)
            if inpaint["image_mask"] is not None:
                self.inpaint = inpaint
        images, self.overlays, self.corrections = [], [], []
        for im in r.init_images:
            image, overlay, mfo = prepare_init_image(_as_image(im), r.width, r.height, r.resize_mode,
                                                     self.inpaint, r.inpainting_fill)
            if self.inpaint is not None:
                self.inpaint["mask_for_overlay"] = mfo  # A1111 keeps it, resized, for the next image
            images.append(image)
            self.overlays.append(overlay)
            if r.img2img_color_correction:  # the image as encoded: "Only masked" crop, masked content filled
                self.corrections.append(setup_color_correction(image))
        if len(images) == 1:  # one init image for the whole batch
            images, self.overlays = images * r.batch_size, self.overlays * r.batch_size
            self.corrections *= r.batch_size
        z = encode(pil_to_unit_tensor(images))
        if r.resize_mode == 3:  # "Just resize (latent upscale)": encoded at its own size, resized as a latent
            z = upscale_latent(z, "Latent", r.width, r.height)
        self.mask = self.nmask = None  # (1, 1, h, w): 1 where the init latent is kept / redrawn
        if self.inpaint is not None:
            mask, nmask = latent_mask(self.inpaint["image_mask"], r.height // 8, r.width // 8, r.mask_round)
            self.mask, self.nmask = mask.to(z.device), nmask.to(z.device)
            # the latent side of "masked content" (0 "fill" and 1 "original" acted on the pixels)
            if r.inpainting_fill == 2:  # "latent noise"
                z = z * self.mask + noise(tuple(z.shape[1:])) * self.nmask
            elif r.inpainting_fill == 3:  # "latent nothing"
                z = z * self.mask
        self.latent = z  # (B, 4, h, w)

    def blend(self, samples: torch.Tensor) -> torch.Tensor:
        """The sampled latents with the unmasked part of the init latent put back (no mask: unchanged)."""
        if self.mask is None:
            return samples
        return samples * self.nmask + self.latent * self.mask

    def finish(self, images: list) -> list:
        """One batch's images colour-corrected, if asked, then pasted back into the originals (overlays, "Only
        masked" uncrop), in A1111's order."""
        if self.corrections:
            images = [apply_color_correction(c, im) for c, im in zip(self.corrections, images)]
        if self.inpaint is None:
            return images
        paste_to = self.inpaint["paste_to"]
        return [apply_overlay(im, paste_to, overlay) for im, overlay in zip(images, self.overlays)]


def _as_image(value) -> Image.Image:
    return value if isinstance(value, Image.Image) else load_image(value, mode=None)


# ---------------------------------------------------------------------------------------------
# the mask
# ---------------------------------------------------------------------------------------------

def create_binary_mask(mask_image: Image.Image, mask_round: bool = True) -> Image.Image:
    """The "L" mask (white = inpaint) of an uploaded mask image: an RGBA image whose alpha is not all 255
    gives its alpha, thresholded `> 128` when `mask_round`; any other image is `convert("L")`, not
    thresholded."""
    if mask_image.mode == "RGBA" and mask_image.getextrema()[-1] != (255, 255):
        alpha = mask_image.getchannel("A")
        if mask_round:
            return Image.fromarray(np.where(np.asarray(alpha) > 128, 255, 0).astype(np.uint8), "L")
        return alpha
    return mask_image.convert("L")


def opencv_gaussian_kernel_q8(ksize: int, sigma: float) -> np.ndarray:
    """The integer kernel (sum 256) of OpenCV's bit-exact 8-bit `GaussianBlur` for an odd `ksize`: the weights
    `exp(-x²/(2σ²))` normalised in double precision, quantised to Q8 by error diffusion over the left half
    (round half to even), mirrored, the centre taking what is left."""
    scale2x = -0.125 / (float(sigma) * float(sigma))  # x runs over 2·(i - ksize // 2) of the left half
    vals = [math.exp(float(x * x) * scale2x) for x in range(1 - ksize, -1, 2)]
    mul = 1.0 / (sum(vals) * 2.0 + 1.0)
    q, err = [], 0.0
    for t in vals:
        adj = (t * mul) * 256.0 + err
        q.append(round(adj))  # Python rounds half to even, like cvRound(softdouble)
        err = adj - q[-1]
    return np.array(q + [256 - 2 * sum(q)] + q[::-1], dtype=np.int64)


def gaussian_blur_axis(arr: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """One of A1111's two mask blurs on a 2-D uint8 array, bit-exact with
    `cv2.GaussianBlur(arr, (k, 1) if axis == 1 else (1, k), sigma)` for `k = 2·int(2.5·sigma + 0.5) + 1`:
    the Q8 kernel, BORDER_REFLECT_101, integer sums and one rounding `(Σ k·v + 128) >> 8`. An axis of length 1
    is left as is (OpenCV drops the kernel there)."""
    arr = np.asarray(arr, dtype=np.uint8)
    ksize = 2 * int(2.5 * sigma + 0.5) + 1
    n = arr.shape[axis]
    if n == 1 or ksize == 1:
        return arr.copy()
    kern = opencv_gaussian_kernel_q8(ksize, sigma)
    r = ksize // 2
    # blur along the last axis; numpy's "reflect" is OpenCV's BORDER_REFLECT_101 (`gfedcb|abcdefgh|gfedcba`)
    x = np.pad(np.moveaxis(arr, axis, -1), ((0, 0), (r, r)), mode="reflect")
    if np.count_nonzero(kern) <= 64:
        acc = np.zeros(x.shape[:-1] + (n,), dtype=np.int32)  # at most 255·256: no overflow
        for j in np.flatnonzero(kern):
            acc += int(kern[j]) * x[..., j:j + n].astype(np.int32)
    else:
        # long kernels: float64 FFT convolution. Every exact sum is an integer <= 65280 and the FFT error is
        # ~1e-9, so rounding recovers the exact integer sums (a symmetric kernel: convolution = correlation).
        size = x.shape[-1] + ksize - 1
        c = np.fft.irfft(np.fft.rfft(x.astype(np.float64), size, axis=-1)
                         * np.fft.rfft(kern.astype(np.float64), size), size, axis=-1)
        acc = np.rint(c[..., ksize - 1: ksize - 1 + n]).astype(np.int64)
    out = np.clip((acc + 128) >> 8, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, -1, axis))


def prepare_mask(mask_image: Image.Image, mask_blur=4, invert: bool = False,
                 mask_round: bool = True) -> Image.Image:
    """The blurred "L" inpainting mask: `create_binary_mask`, inverted for `inpainting_mask_invert`, then
    blurred horizontally and vertically, each only when its σ > 0 and each rounded to uint8 (A1111's two
    OpenCV calls). `mask_blur` is one σ for both axes or a pair `(mask_blur_x, mask_blur_y)`."""
    bx, by = (mask_blur, mask_blur) if np.isscalar(mask_blur) else tuple(mask_blur)
    m = create_binary_mask(mask_image, mask_round)
    if invert:
        m = ImageOps.invert(m)
    a = np.asarray(m, dtype=np.uint8)
    if bx > 0:
        a = gaussian_blur_axis(a, bx, axis=1)
    if by > 0:
        a = gaussian_blur_axis(a, by, axis=0)
    return Image.fromarray(a, "L")


# ---------------------------------------------------------------------------------------------
# "Only masked" crop region
# ---------------------------------------------------------------------------------------------

def get_crop_region(mask, pad: int = 0):
    """A1111 `masking.get_crop_region_v2`: `(x1, y1, x2, y2)` (x2/y2 exclusive) of the non-zero pixels of an
    "L" mask, grown by `pad` and clipped to the image; None for an all-zero mask."""
    box = mask.getbbox()
    if not box:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def expand_crop_region(crop_region, processing_width: int, processing_height: int, image_width: int,
                       image_height: int):
    """A1111 `masking.expand_crop_region`: grow the short side of the box to the processing aspect ratio,
    around its centre (`diff = int(...)`, `diff // 2` before), shifted back inside the image and clipped to
    it."""
    x1, y1, x2, y2 = crop_region
    ratio_crop = (x2 - x1) / (y2 - y1)
    ratio_proc = processing_width / processing_height
    if ratio_crop > ratio_proc:
        y1, y2 = _grow_span(y1, y2, int((x2 - x1) / ratio_proc - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow_span(x1, x2, int((y2 - y1) * ratio_proc - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow_span(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    """One axis of `expand_crop_region`."""
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
    """The "Only masked" box: `get_crop_region` expanded to the `width × height` aspect ratio; None for a
    blank mask (A1111 then falls back to plain img2img)."""
    box = get_crop_region(mask, padding)
    return None if box is None else expand_crop_region(box, width, height, mask.width, mask.height)


def prepare_inpaint_mask(mask: Image.Image, width: int, height: int, resize_mode: int = 0,
                         inpaint_full_res: bool = True, padding: int = 0) -> dict:
    """The masks of the blurred `mask` at processing size, as a dict:

    - `image_mask`: the mask at `width × height` (A1111's `latent_mask` too: `fill_masked` and `latent_mask()`
      use it), or None when "Only masked" found a blank mask;
    - `mask_for_overlay`: the mask whose inverse is the overlay's alpha;
    - `crop_region` `(x1, y1, x2, y2)` and `paste_to` `(x1, y1, w, h)` for "Only masked", else None.

    Whole picture: `image_mask = resize_image(resize_mode, mask, ...)` and `mask_for_overlay =
    clip(2·image_mask)` (values >= 128 fully replace the original). Only masked: `image_mask =
    resize_image(2, mask.crop(crop), ...)` and `mask_for_overlay` is the blurred mask itself.
    """
    out = dict.fromkeys(("image_mask", "mask_for_overlay", "crop_region", "paste_to"))
    if inpaint_full_res:
        m = mask.convert("L")
        crop = inpaint_crop_region(m, padding, width, height)
        if crop is None:
            return out
        x1, y1, x2, y2 = crop
        image_mask = resize_image(2, m.crop(crop), width, height)
        out.update(image_mask=image_mask, mask_for_overlay=mask, crop_region=crop,
                   paste_to=(x1, y1, x2 - x1, y2 - y1))
        return out
    image_mask = resize_image(resize_mode, mask, width, height)
    overlay = Image.fromarray(np.clip(np.asarray(image_mask).astype(np.float32) * 2, 0, 255).astype(np.uint8))
    out.update(image_mask=image_mask, mask_for_overlay=overlay)
    return out


# ---------------------------------------------------------------------------------------------
# the init images: fill, overlay
# ---------------------------------------------------------------------------------------------

_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # (blur radius, times composited)


def _cut_out(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image premultiplied ("RGBa"), pasted through `invert(mask)` onto a transparent canvas."""
    out = Image.new("RGBa", image.size)
    out.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    return out


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111 `masking.fill`: pre-fill the masked area from the surrounding colours. The cut-out image,
    blurred with each radius of `_FILL_PASSES` and un-premultiplied, is alpha-composited onto a transparent
    black canvas that many times -> RGB. Unmasked pixels stay exactly as they were (the radius-0 pass is
    opaque there); a completely masked image becomes black. A1111 runs it for every `inpainting_fill` but 1
    ("original"). `mask` is the latent mask (`image_mask`)."""
    image_mod = Image.new("RGBA", image.size)
    masked = _cut_out(image, mask)
    for radius, repeats in _FILL_PASSES:
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def prepare_init_image(image: Image.Image, width: int, height: int, resize_mode: int = 0, inpaint: dict | None = None,
                       inpainting_fill: int = 1, background="#ffffff"):
    """One init image as A1111's img2img `init` prepares it -> `(image, overlay, mask_for_overlay)`: the RGB
    image to encode, the RGBA overlay for `apply_overlay` (alpha = 255 - mask; None without a mask) and
    `mask_for_overlay`, resized to the image when it differed (A1111 keeps it for the next image).

    `inpaint` is `prepare_inpaint_mask`'s dict of a (non-blank) mask, None for plain img2img. The image is
    flattened onto `background`, resized to `width × height` (unless "Only masked" or resize mode 3), its
    overlay made, then cropped to the "Only masked" region and resized, and pre-filled (`fill_masked`) unless
    `inpainting_fill` is 1. Resize mode 3 keeps the image's size, so its overlay is pasted unscaled at the
    top left of the result (as A1111); a fill then needs the image at `width × height`, else A1111's
    `masking.fill` fails ("images do not match"): a RequestError here."""
    image = flatten(image, background)
    crop = inpaint["crop_region"] if inpaint else None
    if crop is None and resize_mode != 3:
        image = resize_image(resize_mode, image, width, height)
    if inpaint is None:
        return image, None, None
    mfo = inpaint["mask_for_overlay"]
    if mfo.size != image.size:
        mfo = resize_image(resize_mode, mfo, image.width, image.height)
    overlay = _cut_out(image, mfo).convert("RGBA")
    if crop is not None:
        image = resize_image(2, image.crop(crop), width, height)
    if inpainting_fill != 1:
        if image.size != (width, height):
            raise RequestError([("inpainting_fill", f"resize_mode 3 with a mask: masked content other than 1 "
                                 f"(original) needs init images of {width}x{height}, this one is {image.width}x"
                                 f"{image.height} (A1111 fails there); send inpainting_fill 1 or another "
                                 "resize_mode", "value_error")])
        image = fill_masked(image, inpaint["image_mask"])
    return image, overlay, mfo


# ---------------------------------------------------------------------------------------------
# the latent mask
# ---------------------------------------------------------------------------------------------

def latent_mask(mask: Image.Image, latent_h: int, latent_w: int, mask_round: bool = True):
    """`(mask, nmask)`, float32 (1, 1, latent_h, latent_w), broadcasting over (B, 4, h, w): the mask resized
    with Pillow's default BICUBIC, channel 0 `/ 255`, `np.around` (half to even) when `mask_round`. `nmask`
    is 1 where the image is redrawn, `mask = 1 - nmask` where the init latent is kept."""
    lat = np.asarray(mask.convert("RGB").resize((latent_w, latent_h)), dtype=np.float32)[:, :, 0] / 255
    if mask_round:
        lat = np.around(lat)
    nmask = torch.from_numpy(lat)[None, None]
    return 1.0 - nmask, nmask


# ---------------------------------------------------------------------------------------------
# paste-back
# ---------------------------------------------------------------------------------------------

def uncrop(image: Image.Image, dest_size: tuple[int, int], paste_to) -> Image.Image:
    """A1111 `uncrop`: the image resized (mode 1) to the box `paste_to = (x, y, w, h)` and pasted there on a
    transparent RGBA canvas of `dest_size`."""
    x, y, w, h = paste_to
    base = Image.new("RGBA", dest_size)
    base.paste(resize_image(1, image, w, h), (x, y))
    return base


def apply_overlay(image: Image.Image, paste_to, overlay: Image.Image | None) -> Image.Image:
    """A1111 `apply_overlay` -> RGB: "Only masked" results are uncropped onto the overlay's size first (the
    overlay is opaque outside the box), then the overlay (the original, alpha = 255 - mask) is composited
    over."""
    if overlay is None:
        return image
    if paste_to is not None:
        image = uncrop(image, (overlay.width, overlay.height), paste_to)
    image = image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")
