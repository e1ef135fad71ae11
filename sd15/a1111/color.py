"""A1111's img2img colour correction (`processing.setup_color_correction` / `apply_color_correction`): each
result's CIELAB histograms are matched to its init image's, then the result's own luminosity is put back.
A1111 runs OpenCV's 8-bit `cvtColor` (RGB <-> LAB), scikit-image's `match_histograms` and blendmodes'
luminosity blend; this module does the same integer and float steps in numpy, to the bit.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# sRGB (D65) -> XYZ and back, with the D65 white point: OpenCV's constants
RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                    [0.019334, 0.119193, 0.950227]])
XYZ2RGB = np.array([[3.240479, -1.53715, -0.498535], [-0.969256, 1.875991, 0.041556],
                    [0.055648, -0.204043, 1.057311]])
D65 = np.array([0.950456, 1.0, 1.088754])
F32 = np.float32


def _gamma(x):
    """sRGB's decoding curve, in float64, rounded to float32 as OpenCV's table builder does."""
    return F32(np.where(x <= 809 / 20000, x / (323 / 25), ((x + 11 / 200) / (1 + 11 / 200)) ** (12 / 5)))


def _inv_gamma(x):
    """sRGB's encoding curve, in float64, rounded to float32."""
    return F32(np.where(x <= 7827 / 2500000, x * (323 / 25), x ** (1 / (12 / 5)) * (1 + 11 / 200) - 11 / 200))


def _tables() -> dict:
    """OpenCV's fixed-point tables for 8-bit LAB (`initLabTabs` in `color_lab.cpp`): float32 arithmetic,
    rounded half to even."""
    i = np.arange(4096, dtype=F32)
    # RGB -> LAB: 8-bit sRGB to linear light in 1/2040ths; f(t) (cube root, linear near 0) in 1/32768ths
    gamma = np.rint(F32(2040) * _gamma((i[:256] / F32(255)).astype(np.float64)))
    t = i[:3072] * (F32(1) / F32(2040))
    # OpenCV's fused mulAdd, in float64 here: it rounds to the same float32 on every entry
    lin = F32(t.astype(np.float64) * (F32(841) / F32(108)) + (F32(16) / F32(116)))
    cbrt = np.rint(F32(32768) * np.where(t < F32(216) / F32(24389), lin, F32(np.cbrt(t.astype(np.float64)))))
    cbrt[324] -= 1  # a tie, 17745.5: OpenCV's float32 cube root (softfloat's f32_cbrt) is one ulp low there
    # LAB -> RGB: L to y and f(y) in 1/16384ths, f(x) and f(z) back to x and z, 1/4096ths of light to 8 bits
    L = i[:256]
    fy = F32(L * F32(100 * 16384)) / F32(255 * 116) + F32(16 * 16384) / F32(116)
    low = L <= 20  # L·100/255 <= 8: the linear segment
    y = np.where(low, np.rint(F32(L * F32(16384 * 20 * 9)) / F32(17 * 29 ** 3)),
                 np.rint(fy * fy * fy / F32(2 ** 28)))
    ify = np.where(low, np.rint(F32(16384) * (F32(16) / F32(116) + F32(L * 5) / F32(3 * 17 * 29))),
                   np.rint(fy))
    v = np.arange(-8145, 36864 - 8145, dtype=np.int64)  # f·16384 from OpenCV's lowest f(x), f(z) on
    xz = np.where(v <= 3390, np.fix(v * 108 / 841) - 290, v * v // 16384 * v // 16384)  # C's truncating /
    inv = np.rint(F32(255) * _inv_gamma((i / F32(4096)).astype(np.float64)))
    tables = dict(gamma=gamma, cbrt=cbrt, y=y, ify=ify, xz=xz, inv=inv, to_xyz=4096 * RGB2XYZ / D65[:, None],
                  to_rgb=4096 * XYZ2RGB * D65)
    return {name: np.rint(tab).astype(np.int64) for name, tab in tables.items()}


_T = _tables()


def _descale(x, n: int):
    return (x + (1 << (n - 1))) >> n


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """`cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)` of an (H, W, 3) uint8 array: L·255/100, a + 128, b + 128."""
    lin = _T["gamma"][np.asarray(rgb, dtype=np.uint8)]
    fx, fy, fz = np.moveaxis(_T["cbrt"][_descale(lin @ _T["to_xyz"].T, 12)], -1, 0)
    lab = [_descale(296 * fy - 1336934, 15), _descale(500 * (fx - fy) + (128 << 15), 15),
           _descale(200 * (fy - fz) + (128 << 15), 15)]
    return np.clip(np.stack(lab, axis=-1), 0, 255).astype(np.uint8)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """`cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)` of an (H, W, 3) uint8 array (OpenCV's bit-exact integer
    path)."""
    L, a, b = np.moveaxis(np.asarray(lab, dtype=np.int64), -1, 0)
    ify = _T["ify"][L]
    x = _T["xz"][ify + ((5 * a * 53687 + 128) >> 13) - 4194 + 8145]  # f(x) = f(y) + (a - 128)/500
    z = _T["xz"][ify - ((b * 41943 + 16) >> 9) + 10484 + 8145]  # f(z) = f(y) - (b - 128)/200
    xyz = np.stack([x, _T["y"][L], z], axis=-1)
    return _T["inv"][np.clip(_descale(xyz @ _T["to_rgb"].T, 14), 0, 4095)].astype(np.uint8)


def match_histograms(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """skimage's `match_histograms(image, reference, channel_axis=2)` on uint8: per channel, each value's
    quantile is mapped through the reference's quantiles with `np.interp`, stored back truncated to uint8."""
    out = np.empty_like(image)
    for c in range(image.shape[-1]):
        src, ref = image[..., c].reshape(-1), reference[..., c].reshape(-1)
        ref_counts = np.bincount(ref)
        ref_values = np.nonzero(ref_counts)[0]
        quantiles = np.interp(np.cumsum(np.bincount(src)) / src.size,
                              np.cumsum(ref_counts[ref_values]) / ref.size, ref_values)
        out[..., c] = quantiles[src].reshape(image.shape[:-1])
    return out


def _lum(c):
    return c[..., 0] * 0.299 + c[..., 1] * 0.587 + c[..., 2] * 0.114


def luminosity_blend(colour: np.ndarray, luma: np.ndarray) -> np.ndarray:
    """blendmodes 2022's `blendLayers(colour, luma, BlendType.LUMINOSITY)` (A1111 pins that version) of opaque
    uint8 RGB arrays: `colour` shifted to `luma`'s luminosity (0.299, 0.587, 0.114), pulled back into [0, 1]
    towards the grey of its luminosity where it left it (W3C's ClipColor), truncated to uint8."""
    c = colour / 255
    c = c + (_lum(luma / 255) - _lum(c))[..., None]
    lum, lo, hi = _lum(c)[..., None], c.min(axis=-1, keepdims=True), c.max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(lo < 0, lum + (c - lum) * lum / (lum - lo), c)
        c = np.where(hi > 1, lum + (c - lum) * (1 - lum) / (hi - lum), c)
    return (np.clip(c, 0, 1) * 255).astype(np.uint8)


def setup_color_correction(image: Image.Image) -> np.ndarray:
    """The correction target of an init image: its LAB pixels."""
    return rgb_to_lab(np.asarray(image.convert("RGB")))


def apply_color_correction(target: np.ndarray, image: Image.Image) -> Image.Image:
    """A result with its LAB histograms matched to `target`'s, keeping its own luminosity."""
    rgb = np.asarray(image.convert("RGB"))
    matched = lab_to_rgb(match_histograms(rgb_to_lab(rgb), target))
    return Image.fromarray(luminosity_blend(matched, rgb), "RGB")
