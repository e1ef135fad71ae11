"""Image-side img2img / inpainting / hires fix / output conversion (sd15.a1111.images, sd15.a1111.inpaint), as
A1111 v1.10 does them.

Every expected value is exact and derived by hand from A1111's rules (the derivation is in the comment next
to it). Where Pillow or OpenCV arithmetic is involved the cases are chosen so the result is exactly
computable: uniform regions, identity-size resizes, 0/255 colours, or the documented filter weights.
"""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sd15.a1111 import images as I
from sd15.a1111 import inpaint as M
from sd15.samplers import img2img_steps
from sd15.schema import GenerationRequest, hires_target_size, resolve


def rgb(w, h, color):
    return Image.new("RGB", (w, h), color)


def arr(im):
    return np.asarray(im)


def png_bytes(im, **kw):
    b = io.BytesIO()
    im.save(b, "PNG", **kw)
    return b.getvalue()


# =============================================================================================
# strength -> steps
# =============================================================================================

@pytest.mark.parametrize("steps, strength, explicit, fix, expected", [
    (20, 0.75, None, False, (20, 15)),   # spec example: t_enc = int(0.75*20) = 15
    (20, 1.0, None, False, (20, 19)),    # min(1.0, 0.999)*20 = 19.98 -> 19
    (25, 0.999, None, False, (25, 24)),  # 24.975 -> 24
    (20, 0.3, None, False, (20, 6)),     # 0.3*20 = 6.000000000000001 -> 6
    (30, 0.1, None, False, (30, 3)),     # 3.0000000000000004 -> 3
    (7, 0.29, None, False, (7, 2)),      # 2.03 -> 2
    (50, 0.75, None, False, (50, 37)),   # 37.5 -> 37
    (20, 0.0, None, False, (20, 0)),
    (20, 0.7, 20, False, (28, 19)),      # spec hires example: int(20/0.7) = 28, t_enc = 19
    (20, 0.7, 0, False, (28, 19)),       # hr_second_pass_steps = 0 -> p.steps (explicit but falsy)
    (20, 0.5, 10, False, (20, 9)),       # explicit 10 steps: int(10/0.5) = 20
    (20, 0.75, None, True, (26, 19)),    # img2img_fix_steps: int(20/0.75) = 26
    (20, 0.5, None, True, (40, 19)),
    (20, 1.0, None, True, (20, 19)),     # int(20/0.999) = 20
    (20, 0.0, None, True, (0, 19)),      # strength 0 -> 0 schedule steps
])
def test_img2img_steps(steps, strength, explicit, fix, expected):
    # the hires pass asks for an explicit step count (hr_second_pass_steps or steps) with fix_steps
    assert img2img_steps(explicit or steps, strength, fix or explicit is not None) == expected


# =============================================================================================
# hires fix
# =============================================================================================

@pytest.mark.parametrize("w, h, scale, rx, ry, expected", [
    (512, 512, 2.0, 0, 0, (1024, 1024, 0, 0)),
    (512, 768, 1.5, 0, 0, (768, 1152, 0, 0)),
    (520, 512, 1.33, 0, 0, (691, 680, 0, 0)),      # int(691.6), int(680.96)
    (512, 512, 1.1, 0, 0, (563, 563, 0, 0)),       # int(563.2)
    (512, 512, 1.0, 0, 0, (512, 512, 0, 0)),
    (512, 768, 2.0, 1000, 0, (1000, 1500, 0, 0)),  # only x: Y = 1000*768//512
    (768, 512, 2.0, 0, 1000, (1500, 1000, 0, 0)),  # only y: X = 1000*768//512
    (500, 333, 2.0, 1024, 0, (1024, 681, 0, 0)),   # 340992//500 = 681
    (512, 768, 2.0, 1024, 1024, (1024, 1536, 0, 64)),   # 2/3 < 1 -> X = rx; (1536-1024)//8
    (768, 512, 2.0, 1024, 1024, (1536, 1024, 64, 0)),   # 1.5 >= 1 -> Y = ry
    (512, 512, 2.0, 1024, 1024, (1024, 1024, 0, 0)),    # equal ratio -> else branch, no truncation
    (512, 512, 2.0, 1000, 700, (1000, 1000, 0, 37)),    # (1000-700)//8 = 37
    (640, 480, 2.0, 1920, 1080, (1920, 1440, 0, 45)),   # 1920*480//640 = 1440; 360//8 = 45
])
def test_hires_target_size(w, h, scale, rx, ry, expected):
    assert hires_target_size(w, h, scale, rx, ry) == expected


def test_truncate_latent():
    z = torch.arange(180 * 240, dtype=torch.float32).view(1, 1, 180, 240)
    t = I.truncate_latent(z, 0, 45)                      # rows 45//2 = 22 .. 180 - 46//2 = 157
    assert t.shape == (1, 1, 135, 240)                   # 135 = 1080/8
    assert t[0, 0, 0, 0].item() == 22 * 240 and t[0, 0, -1, 0].item() == 156 * 240
    t = I.truncate_latent(torch.arange(10.).view(1, 1, 1, 10), 3, 0)   # cols 1 .. 10 - 2
    assert t.flatten().tolist() == [1, 2, 3, 4, 5, 6, 7]


A1111_LATENT_MODES = {  # A1111's shared.latent_upscale_modes: name -> (interpolate mode, antialias)
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


@pytest.mark.parametrize("name", sorted(A1111_LATENT_MODES))
def test_latent_upscale_modes_run_as_a1111_names_them(name):
    """Each of A1111's names (and only those) upscales with A1111's interpolate mode and antialias setting."""
    assert set(I.LATENT_UPSCALE_MODES) == set(A1111_LATENT_MODES)
    mode, antialias = A1111_LATENT_MODES[name]
    z = torch.randn(1, 4, 7, 9, generator=torch.Generator().manual_seed(0))
    for width, height in ((160, 104), (40, 24)):  # up, and down (where antialias changes the result)
        ref = torch.nn.functional.interpolate(z, size=(height // 8, width // 8), mode=mode, antialias=antialias)
        assert torch.equal(I.upscale_latent(z, name, width, height), ref)


def test_upscale_latent_bilinear_by_hand():
    # align_corners=False: src = (i + 0.5)/2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    z = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    out = I.upscale_latent(z, "Latent", 32, 32)          # pixels 32 -> latent 4
    assert out.tolist() == [[[[0.0, 0.25, 0.75, 1.0], [0.5, 0.75, 1.25, 1.5],
                              [1.5, 1.75, 2.25, 2.5], [2.0, 2.25, 2.75, 3.0]]]]


def test_upscale_latent_nearest_vs_nearest_exact():
    z = torch.arange(4.).view(1, 1, 1, 4)
    # 4 -> 3 columns: nearest floor(i*4/3) = 0,1,2; nearest-exact floor((i+0.5)*4/3) = 0,2,3
    assert I.upscale_latent(z, "Latent (nearest)", 24, 8).flatten().tolist() == [0, 1, 2]
    assert I.upscale_latent(z, "Latent (nearest-exact)", 24, 8).flatten().tolist() == [0, 2, 3]
    assert I.upscale_latent(z, "Latent (nearest)", 64, 8).flatten().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_upscale_latent_uses_pixel_sizes_floored():
    z = torch.zeros(2, 4, 64, 64)
    assert I.upscale_latent(z, "Latent", 691, 680).shape == (2, 4, 85, 86)   # (680//8, 691//8)


# =============================================================================================
# conversions
# =============================================================================================

def test_pil_to_unit_tensor_batch_and_errors():
    x = I.pil_to_unit_tensor([rgb(2, 2, (255, 255, 255)), rgb(2, 2, (0, 0, 0))])
    assert x.shape == (2, 3, 2, 2) and x[0].unique().tolist() == [1.0] and x[1].unique().tolist() == [0.0]
    with pytest.raises(ValueError, match="differ in size"):
        I.pil_to_unit_tensor([rgb(2, 2, 0), rgb(3, 2, 0)])
    # RGBA is flattened on white first
    assert I.pil_to_unit_tensor(Image.new("RGBA", (1, 1), (0, 0, 0, 0))).flatten().tolist() == [1.0, 1.0, 1.0]
    u = I.pil_to_unit_tensor(Image.new("RGB", (1, 1), (255, 0, 51)))
    assert u.flatten().tolist() == [1.0, 0.0, float(np.float32(51) / np.float32(255))]


def test_tensor_to_uint8_truncates():
    x = torch.tensor([-1.0, 0.0, 1.0, 0.5, -0.5, 2.0, -3.0, float("nan")]).view(1, 1, 1, 8).expand(1, 3, 1, 8)
    # (x+1)/2*255: 0, 127.5 -> 127, 255, 191.25 -> 191, 63.75 -> 63 (not 64), clamp 255, clamp 0, NaN -> 0
    u = I.tensor_to_uint8(x)
    assert u.shape == (1, 1, 8, 3) and u.dtype == np.uint8
    assert u[0, 0, :, 0].tolist() == [0, 127, 255, 191, 63, 255, 0, 0]
    ims = I.tensor_to_pil(x.to(torch.float16))
    assert len(ims) == 1 and ims[0].mode == "RGB" and ims[0].size == (8, 1)
    assert arr(ims[0])[0, :, 1].tolist() == [0, 127, 255, 191, 63, 255, 0, 0]


def test_round_trip_loses_one_for_1_to_63():
    # the [-1, 1] encoder input then tensor_to_pil in float32: for u in 1..63, fl32(fl32(u/255)*2-1) + 1 lands just below
    # 2u/255, so 255*t truncates to u - 1. Every other value survives. Checked against the formula itself.
    u = np.arange(256, dtype=np.uint8)
    im = Image.fromarray(np.repeat(u.reshape(16, 16, 1), 3, axis=2))
    back = arr(I.tensor_to_pil(I.pil_to_unit_tensor(im) * 2 - 1)[0])[:, :, 0].reshape(-1)  # VAE encoder input
    expected = [v - 1 if 1 <= v <= 63 else v for v in range(256)]
    assert back.tolist() == expected
    f = np.float32
    formula = [int(f(255) * min(max((f(f(f(v) / f(255)) * f(2) - f(1)) + f(1)) / f(2), f(0)), f(1)))
               for v in range(256)]
    assert formula == expected


# =============================================================================================
# flatten and image decoding
# =============================================================================================

def test_flatten():
    im = Image.fromarray(np.array([[[0, 0, 0, 128], [200, 100, 50, 0], [10, 20, 30, 255]]], dtype=np.uint8), "RGBA")
    # black at alpha 128 over white: 255 - round(255*128/255) = 127
    assert arr(I.flatten(im)).tolist() == [[[127, 127, 127], [255, 255, 255], [10, 20, 30]]]
    assert arr(I.flatten(im, "#000000")).tolist() == [[[0, 0, 0], [0, 0, 0], [10, 20, 30]]]
    # only RGBA is composited: LA just drops its alpha (A1111's convert("RGB"))
    assert arr(I.flatten(Image.new("LA", (1, 1), (50, 0)))).tolist() == [[[50, 50, 50]]]


def test_load_image_forms():
    im = Image.fromarray(np.array([[[1, 2, 3], [250, 128, 0]]], dtype=np.uint8))
    raw = png_bytes(im)
    b64 = base64.b64encode(raw).decode()
    expected = [[[1, 2, 3], [250, 128, 0]]]
    for form in (raw, b64, "data:image/png;base64," + b64, "data:application/octet-stream;base64," + b64,
                 "  " + b64[:10] + "\n" + b64[10:] + "\n", b64.rstrip("="),
                 base64.urlsafe_b64encode(raw).decode()):
        out = I.load_image(form)
        assert out.mode == "RGB" and arr(out).tolist() == expected


def test_load_image_alpha_and_palette():
    rgba = Image.fromarray(np.array([[[0, 0, 255, 0], [0, 0, 255, 128]]], dtype=np.uint8), "RGBA")
    raw = png_bytes(rgba)
    assert I.load_image(raw, mode=None).mode == "RGBA"
    assert arr(I.load_image(raw)).tolist() == [[[255, 255, 255], [127, 127, 255]]]
    # palette PNG with a tRNS alpha table (bytes) -> RGBA (fix_png_transparency) -> flattened
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putdata([0, 1])
    raw = png_bytes(p, transparency=bytes([0, 128]))
    q = I.load_image(raw, mode=None)
    assert q.mode == "RGBA" and arr(q).tolist() == [[[255, 0, 0, 0], [0, 0, 255, 128]]]
    assert arr(I.load_image(raw)).tolist() == [[[255, 255, 255], [127, 127, 255]]]
    # a single transparent index (int) is only metadata: convert("RGB") ignores it, as A1111
    raw = png_bytes(p, transparency=0)
    assert arr(I.load_image(raw)).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    assert I.load_image(raw, mode="L").mode == "L"


def test_load_image_applies_exif_orientation():
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90
    b = io.BytesIO()
    rgb(4, 2, (255, 0, 0)).save(b, "JPEG", exif=ex)
    assert I.load_image(b.getvalue()).size == (2, 4)


@pytest.mark.parametrize("bad", [b"", "", "!!!!", "iVBORw0KGgo", "data:image/png;base64", b"not an image at all",
                                 base64.b64encode(b"GIF89a garbage").decode(), "https://example.com/x.png", 123])
def test_load_image_garbage(bad):
    with pytest.raises(ValueError, match="Invalid encoded image"):
        I.load_image(bad)


def test_load_image_truncated_and_unsupported_format():
    raw = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ValueError, match="Invalid encoded image"):
        I.load_image(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="Invalid encoded image"):
        I.load_image(b"P6\n1 1\n255\n\x00\x00\x00")      # a valid PPM, but not an allowed format


def _png_with_size(w, h):
    """A 1x1 PNG whose IHDR claims w x h (pixel data far too short: decoding it would fail)."""
    raw = bytearray(png_bytes(Image.new("L", (1, 1))))
    ihdr = raw[12:29]                                   # type + data of the IHDR chunk
    ihdr[4:12] = struct.pack(">II", w, h)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(raw)


def test_load_image_bomb_rejected_before_decoding():
    # 9000 x 9000 = 81 Mpx: below Pillow's own limit, above ours (64 Mpx). Pixel data is garbage, so a
    # "too large" error (not "Invalid") shows the size check ran before load().
    with pytest.raises(ValueError, match="Image too large: 9000x9000 = 81000000 pixels"):
        I.load_image(_png_with_size(9000, 9000))
    with pytest.raises(ValueError, match="Image too large"):
        I.load_image(_png_with_size(100000, 100000))   # Pillow's DecompressionBombError, converted
    with pytest.raises(ValueError, match="Image too large: 65x64"):
        I.load_image(png_bytes(Image.new("RGB", (65, 64))), max_pixels=64 * 64)
    assert I.load_image(png_bytes(Image.new("RGB", (64, 64))), max_pixels=64 * 64).size == (64, 64)


# =============================================================================================
# resize modes and pixel upscalers
# =============================================================================================

@pytest.mark.parametrize("mode, src, dst, expected", [
    (0, (10, 7), (8, 8), (8, 8, 0, 0, None)),
    (1, (10, 7), (8, 8), (11, 8, -1, 0, None)),            # r=1 <= R: sh=8, sw=10*8//7=11, x=4-5
    (1, (7, 10), (8, 8), (8, 11, 0, -1, None)),            # r > R: sw=8, sh=10*8//7=11
    (1, (512, 768), (512, 512), (512, 768, 0, -128, None)),
    (2, (10, 7), (8, 8), (8, 5, 0, 2, ("rows", 2))),       # r < R: sw=8, sh=7*8//10=5, y=4-2, band 4-2
    (2, (768, 512), (512, 512), (512, 341, 0, 86, ("rows", 86))),
    (2, (512, 768), (512, 512), (341, 512, 86, 0, ("columns", 86))),
    (2, (16, 8), (8, 4), (8, 4, 0, 0, None)),              # same ratio: no bands
    (3, (512, 768), (512, 512), (341, 512, 86, 0, ("columns", 86))),  # 3 behaves as 2 in resize_image
    (2, (33, 30), (16, 15), (16, 14, 0, 0, ("rows", 0))),  # sh=30*16//33=14, band 7-7=0
])
def test_resize_geometry(mode, src, dst, expected):
    assert I.resize_geometry(mode, *src, *dst) == expected


def test_resize_mode0_and_modes():
    im = Image.new("L", (10, 7), 77)
    out = I.resize_image(0, im, 8, 8)
    assert out.mode == "L" and out.size == (8, 8) and set(arr(out).flatten().tolist()) == {77}
    for mode in (1, 2, 3):   # canvas is RGB even for an L input
        out = I.resize_image(mode, im, 8, 8)
        assert out.mode == "RGB" and out.size == (8, 8)
        assert set(map(tuple, arr(out).reshape(-1, 3).tolist())) == {(77, 77, 77)}


def test_resize_mode1_crop_content():
    # 8x4: cols 0-3 red, 4-7 blue -> 4x4: sw=8 (no resampling), pasted at x = 2 - 4 = -2: cols 2..5 survive
    a = np.zeros((4, 8, 3), np.uint8)
    a[:, :4] = (255, 0, 0)
    a[:, 4:] = (0, 0, 255)
    out = arr(I.resize_image(1, Image.fromarray(a), 4, 4))
    assert out[:, :2].tolist() == [[[255, 0, 0]] * 2] * 4
    assert out[:, 2:].tolist() == [[[0, 0, 255]] * 2] * 4


def test_resize_mode2_fill_rows():
    # 4x2 rows 200 / 40 -> 4x4: paste at y=1, 1-row bands. Pillow bicubic (a=-0.5) on a zero-height box at
    # the edge weights the two nearest rows 1.125 / -0.125: top = 1.125*200 - 0.125*40 = 220,
    # bottom = 1.125*40 - 0.125*200 = 20.
    a = np.zeros((2, 4, 3), np.uint8)
    a[0], a[1] = 200, 40
    out = arr(I.resize_image(2, Image.fromarray(a), 4, 4))
    assert out[:, :, 0].tolist() == [[220] * 4, [200] * 4, [40] * 4, [20] * 4]


def test_resize_mode2_fill_columns_and_clipping():
    a = np.zeros((4, 2, 3), np.uint8)
    a[:, 0], a[:, 1] = 80, 160
    out = arr(I.resize_image(2, Image.fromarray(a), 4, 4))
    # x=1, 1-column bands: left 1.125*80 - 0.125*160 = 70, right 1.125*160 - 0.125*80 = 170
    assert out[:, :, 1].tolist() == [[70, 80, 160, 170]] * 4
    a[:, 0], a[:, 1] = 10, 250    # 11.25 - 31.25 < 0 -> 0; 281.25 - 1.25 > 255 -> 255
    out = arr(I.resize_image(2, Image.fromarray(a), 4, 4))
    assert out[:, :, 2].tolist() == [[0, 10, 250, 255]] * 4


def test_resize_mode2_uniform_edges_are_copies_and_zero_band():
    a = np.zeros((2, 4, 3), np.uint8)
    a[:, :] = (9, 99, 199)
    assert set(map(tuple, arr(I.resize_image(2, Image.fromarray(a), 4, 8)).reshape(-1, 3).tolist())) == {(9, 99, 199)}
    # zero-height band (A1111 would raise): skipped, the last row stays black
    out = arr(I.resize_image(2, Image.new("RGB", (33, 30), (50, 60, 70)), 16, 15))
    assert out.shape == (15, 16, 3) and out[:14].reshape(-1, 3).tolist() == [[50, 60, 70]] * (14 * 16)
    assert out[14].tolist() == [[0, 0, 0]] * 16


def test_resize_mode3_is_mode2():
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (13, 21, 3), dtype=np.uint8))
    assert arr(I.resize_image(3, im, 16, 16)).tolist() == arr(I.resize_image(2, im, 16, 16)).tolist()


def _checker(w, h):
    a = (np.indices((h, w)).sum(0) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([a, 255 - a, a], -1))


def test_upscale_nearest_exact_duplication():
    im = _checker(4, 4)
    out = I.upscale_image(im, "Nearest", 8, 8)   # s=2, dest=(8,8): one NEAREST resize and nothing else
    assert arr(out).tolist() == np.repeat(np.repeat(arr(im), 2, 0), 2, 1).tolist()


def test_upscalers_follow_spec_chain():
    im = _checker(4, 4)
    L = I.LANCZOS
    # "None": LANCZOS straight to the target
    assert arr(I.upscale_image(im, "None", 12, 12)).tolist() == arr(im.resize((12, 12), L)).tolist()
    # s=3: NEAREST/LANCZOS to int(4*3)=12, LANCZOS to dest 12//8*8 = 8, LANCZOS back to 12
    for name, first in (("Nearest", I.NEAREST), ("Lanczos", L)):
        chain = im.resize((12, 12), first).resize((8, 8), L).resize((12, 12), L)
        assert arr(I.upscale_image(im, name, 12, 12)).tolist() == arr(chain).tolist()
    # s<=1: upscaler unused, plain LANCZOS
    big = _checker(8, 8)
    assert arr(I.upscale_image(big, "Nearest", 4, 4)).tolist() == arr(big.resize((4, 4), L)).tolist()
    # s=1.125: dest = int(9)//8*8 = 8 <= 8 -> no upscale, no dest resize; LANCZOS to 9x9
    assert arr(I.upscale_image(big, "Nearest", 9, 9)).tolist() == arr(big.resize((9, 9), L)).tolist()
    with pytest.raises(ValueError, match="could not find upscaler named ESRGAN_4x"):
        I.upscale_image(im, "ESRGAN_4x", 8, 8)


def test_resize_image_with_upscaler_uses_it_only_for_rgb():
    im = _checker(4, 4)
    assert arr(I.resize_image(0, im, 8, 8, "Nearest")).tolist() == np.repeat(np.repeat(arr(im), 2, 0), 2, 1).tolist()
    gray = im.convert("L")    # mode L: always plain LANCZOS
    assert arr(I.resize_image(0, gray, 8, 8, "Nearest")).tolist() == arr(gray.resize((8, 8), I.LANCZOS)).tolist()


def test_resize_image_builds_no_upscaler_list(monkeypatch):
    """The built-ins resize without an `Upscalers` (no folder scan per call); a model name needs one."""
    import sd15.upscale
    def no_list(*args, **kwargs):
        raise AssertionError("Upscalers built")
    monkeypatch.setattr(sd15.upscale.Upscalers, "__init__", no_list)
    im = _checker(4, 4)
    for name in (None, "None", "Lanczos", "Nearest"):
        assert I.resize_image(1, im, 10, 6, name).size == (10, 6)
    with pytest.raises(ValueError, match="could not find upscaler named R-ESRGAN 4x\\+"):
        I.resize_image(0, im, 8, 8, "R-ESRGAN 4x+")


# =============================================================================================
# inpainting: binary mask, blur
# =============================================================================================

def test_create_binary_mask():
    alpha = np.array([[0, 128, 129, 255]], np.uint8)
    rgba = Image.fromarray(np.dstack([np.zeros((1, 4, 3), np.uint8), alpha]), "RGBA")
    assert arr(M.create_binary_mask(rgba)).tolist() == [[0, 0, 255, 255]]            # alpha > 128
    assert arr(M.create_binary_mask(rgba, mask_round=False)).tolist() == [[0, 128, 129, 255]]
    opaque = Image.fromarray(np.array([[[255, 255, 255, 255], [0, 0, 0, 255]]], np.uint8), "RGBA")
    assert arr(M.create_binary_mask(opaque)).tolist() == [[255, 0]]                    # colour, not alpha
    assert arr(M.create_binary_mask(rgb(2, 1, (100, 100, 100)))).tolist() == [[100, 100]]  # no threshold


def test_gaussian_kernel_q8():
    # sigma 1: k = 2*int(3)+1 = 7; exp(-x²/2) normalised: 0.004433, 0.054005, 0.242036, 0.398943 (centre);
    # x256 with error diffusion from the left: 1.1349 -> 1, 13.960 -> 14, 61.92 -> 62, centre 256 - 2*77 = 102
    assert M.opencv_gaussian_kernel_q8(7, 1).tolist() == [1, 14, 62, 102, 62, 14, 1]
    # sigma 4 (the default blur): k = 21 (checked bit-exact against cv2 4.10)
    k4 = M.opencv_gaussian_kernel_q8(21, 4)
    assert k4.tolist() == [1, 2, 4, 5, 9, 11, 16, 19, 23, 25, 26, 25, 23, 19, 16, 11, 9, 5, 4, 2, 1]
    assert int(k4.sum()) == 256
    assert M.opencv_gaussian_kernel_q8(1, 3).tolist() == [256]


def test_blur_single_pixel_and_reflect101_border():
    row = np.zeros((1, 9), np.uint8)
    row[0, 4] = 255
    # (255*k + 128) >> 8 for k = 1, 14, 62, 102
    assert M.gaussian_blur_axis(row, 1, axis=1).tolist() == [[0, 1, 14, 62, 102, 62, 14, 1, 0]]
    edge = np.zeros((1, 9), np.uint8)
    edge[0, 0] = 255
    # reflect-101 mirrors around pixel 0 without repeating it: pixel 0 contributes once to each output
    assert M.gaussian_blur_axis(edge, 1, axis=1).tolist() == [[102, 62, 14, 1, 0, 0, 0, 0, 0]]
    assert M.gaussian_blur_axis(edge.T, 1, axis=0).T.tolist() == [[102, 62, 14, 1, 0, 0, 0, 0, 0]]
    # length-1 axis: OpenCV drops the kernel
    assert M.gaussian_blur_axis(edge.T, 1, axis=1).tolist() == edge.T.tolist()


def test_mask_blur_separable_axes():
    m = np.zeros((9, 9), np.uint8)
    m[4, 4] = 255
    only_x = arr(M.prepare_mask(Image.fromarray(m), (1, 0)))
    assert only_x[4].tolist() == [0, 1, 14, 62, 102, 62, 14, 1, 0] and only_x[3].tolist() == [0] * 9
    only_y = arr(M.prepare_mask(Image.fromarray(m), (0, 1)))
    assert only_y[:, 4].tolist() == [0, 1, 14, 62, 102, 62, 14, 1, 0]
    both = arr(M.prepare_mask(Image.fromarray(m), (1, 1)))
    # vertical pass on the rounded horizontal result, column 4 (value 102): (102*k + 128) >> 8
    assert both[:, 4].tolist() == [0, 0, 6, 25, 41, 25, 6, 0, 0]
    # column 3 (value 62): (62*k + 128) >> 8 -> 0, 3, 15, 25
    assert both[:, 3].tolist() == [0, 0, 3, 15, 25, 15, 3, 0, 0]


def test_prepare_mask_invert_and_blur_options():
    white_box = np.zeros((9, 9), np.uint8)
    white_box[4, 4] = 255
    inv = arr(M.prepare_mask(Image.fromarray(255 - white_box), 0, invert=True))
    assert inv.tolist() == white_box.tolist()
    a = arr(M.prepare_mask(Image.fromarray(white_box), (1, 0)))
    assert a[4].tolist() == [0, 1, 14, 62, 102, 62, 14, 1, 0]
    assert arr(M.prepare_mask(Image.fromarray(white_box), 1)).tolist() == \
        arr(M.prepare_mask(Image.fromarray(white_box), (1, 1))).tolist()


def test_blur_matches_opencv_if_installed():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for sigma in (1, 2, 4, 7, 16, 40):
        a = (rng.random((37, 53)) > 0.7).astype(np.uint8) * 255
        k = 2 * int(2.5 * sigma + 0.5) + 1
        assert np.array_equal(M.gaussian_blur_axis(a, sigma, 1), cv2.GaussianBlur(a, (k, 1), sigma))
        assert np.array_equal(M.gaussian_blur_axis(a, sigma, 0), cv2.GaussianBlur(a, (1, k), sigma))


# =============================================================================================
# crop region
# =============================================================================================

def rect_mask(w, h, x1, y1, x2, y2, value=255):
    m = np.zeros((h, w), np.uint8)
    m[y1:y2, x1:x2] = value
    return Image.fromarray(m)


def test_get_crop_region():
    m = rect_mask(64, 64, 10, 20, 20, 25)
    assert M.get_crop_region(m) == (10, 20, 20, 25)
    assert M.get_crop_region(m, 4) == (6, 16, 24, 29)
    assert M.get_crop_region(m, 15) == (0, 5, 35, 40)        # clipped at 0
    assert M.get_crop_region(m, 50) == (0, 0, 64, 64)
    assert M.get_crop_region(rect_mask(8, 8, 0, 0, 0, 0)) is None
    assert M.get_crop_region(rect_mask(8, 8, 7, 7, 8, 8, value=1)) == (7, 7, 8, 8)


@pytest.mark.parametrize("box, proc, image, expected", [
    ((6, 16, 24, 29), (512, 512), (64, 64), (6, 14, 24, 32)),   # w18 h13: diff int(18-13)=5 -> -2 / +3
    ((10, 20, 20, 40), (512, 512), (64, 64), (5, 20, 25, 40)),  # w10 h20: diff 10 -> -5 / +5
    ((58, 0, 64, 20), (512, 512), (64, 64), (44, 0, 64, 20)),   # 51..71 shifted left by 7
    ((0, 0, 6, 20), (512, 512), (64, 64), (0, 0, 20, 20)),      # -7..13 shifted right by 7
    ((0, 0, 64, 16), (512, 512), (64, 16), (0, 0, 64, 16)),     # image too short: clipped back to 16
    ((10, 10, 20, 20), (768, 512), (64, 64), (8, 10, 23, 20)),  # 10*1.5 = 15: diff 5 -> -2 / +3
    ((0, 0, 10, 10), (512, 768), (100, 100), (0, 0, 10, 15)),   # 10/(2/3) = 15.000000000000002 -> 5
])
def test_expand_crop_region(box, proc, image, expected):
    assert M.expand_crop_region(box, *proc, *image) == expected


def test_inpaint_crop_region():
    m = rect_mask(64, 64, 10, 20, 20, 25)
    assert M.inpaint_crop_region(m, 4, 512, 512) == (6, 14, 24, 32)
    assert M.inpaint_crop_region(m, 0, 512, 512) == (10, 18, 20, 28)   # w10 h5 -> diff 5: -2 / +3
    assert M.inpaint_crop_region(rect_mask(8, 8, 0, 0, 0, 0), 32, 512, 512) is None


# =============================================================================================
# masks, fill, overlay, latent mask
# =============================================================================================

def test_prepare_inpaint_mask_whole_picture():
    for value, overlay in ((100, 200), (127, 254), (128, 255), (200, 255), (0, 0)):
        d = M.prepare_inpaint_mask(Image.new("L", (8, 8), value), 8, 8, 0, inpaint_full_res=False)
        assert d["image_mask"].mode == "L" and set(arr(d["image_mask"]).flatten().tolist()) == {value}
        assert set(arr(d["mask_for_overlay"]).flatten().tolist()) == {overlay}      # clip(2*mask)
        assert d["crop_region"] is None and d["paste_to"] is None
    d = M.prepare_inpaint_mask(Image.new("L", (10, 7), 50), 8, 8, 1, inpaint_full_res=False)
    assert d["image_mask"].mode == "RGB" and d["mask_for_overlay"].mode == "RGB"
    assert set(arr(d["mask_for_overlay"]).flatten().tolist()) == {100}


def test_prepare_inpaint_mask_only_masked():
    m = rect_mask(64, 64, 10, 20, 20, 25)
    d = M.prepare_inpaint_mask(m, 36, 36, 0, inpaint_full_res=True, padding=4)
    assert d["crop_region"] == (6, 14, 24, 32) and d["paste_to"] == (6, 14, 18, 18)
    assert d["mask_for_overlay"] is m                      # the blurred mask itself, original size
    assert d["image_mask"].size == (36, 36) and d["image_mask"].mode == "RGB"   # resize_image(2, ...)
    blank = M.prepare_inpaint_mask(rect_mask(8, 8, 0, 0, 0, 0), 8, 8, 0, inpaint_full_res=True)
    assert blank == {"image_mask": None, "mask_for_overlay": None, "crop_region": None, "paste_to": None}


def test_fill_masked():
    # completely masked: everything transparent, the canvas stays transparent black
    assert set(map(tuple, arr(M.fill_masked(rgb(6, 6, (10, 200, 30)), Image.new("L", (6, 6), 255)))
                   .reshape(-1, 3).tolist())) == {(0, 0, 0)}
    # a pure 0/255 colour survives premultiply/blur/unpremultiply exactly, partial masks included
    m = np.zeros((8, 8), np.uint8)
    m[2:6, 2:6] = 255
    m[0, 0] = 128
    out = arr(M.fill_masked(rgb(8, 8, (255, 0, 255)), Image.fromarray(m)))
    assert set(map(tuple, out.reshape(-1, 3).tolist())) == {(255, 0, 255)}
    # unmasked pixels are returned unchanged (the last, radius-0 pass is opaque there)
    img = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = arr(M.fill_masked(Image.fromarray(img), Image.fromarray(m)))
    assert out[m == 0].tolist() == img[m == 0].tolist()


def test_prepare_init_image_plain_and_fill():
    img = rgb(10, 7, (255, 0, 255)).convert("RGBA")
    out, overlay, mfo = M.prepare_init_image(img, 8, 8, 0)
    assert out.mode == "RGB" and out.size == (8, 8) and overlay is None and mfo is None
    src = Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    m = rect_mask(8, 8, 2, 2, 6, 6)
    d = M.prepare_inpaint_mask(m, 8, 8, 0, inpaint_full_res=False)
    original, _, _ = M.prepare_init_image(src, 8, 8, 0, d, inpainting_fill=1)
    assert arr(original).tolist() == arr(src).tolist()                      # "original": untouched
    for fill in (0, 2, 3):                                                    # fill runs for all but 1
        filled, _, _ = M.prepare_init_image(src, 8, 8, 0, d, inpainting_fill=fill)
        assert arr(filled).tolist() == arr(M.fill_masked(src, d["image_mask"])).tolist()
        assert arr(filled)[arr(m) == 0].tolist() == arr(src)[arr(m) == 0].tolist()
        assert arr(filled)[2:6, 2:6].tolist() != arr(src)[2:6, 2:6].tolist()


def test_overlay_whole_picture_uniform_masks():
    # white original over a black result with alpha 255 - min(2m, 255): the output value is that alpha
    for m, expected in ((0, 255), (1, 253), (50, 155), (64, 127), (100, 55), (127, 1), (128, 0), (255, 0)):
        d = M.prepare_inpaint_mask(Image.new("L", (4, 4), m), 4, 4, 0, inpaint_full_res=False)
        _, overlay, _ = M.prepare_init_image(rgb(4, 4, (255, 255, 255)), 4, 4, 0, d)
        assert arr(overlay)[0, 0].tolist() == ([255, 255, 255, expected] if expected else [0, 0, 0, 0])
        out = M.apply_overlay(rgb(4, 4, (0, 0, 0)), None, overlay)
        assert out.mode == "RGB" and set(arr(out).flatten().tolist()) == {expected}


def test_only_masked_paste_back():
    A, B = (10, 20, 30), (200, 100, 0)
    m = rect_mask(16, 16, 4, 4, 12, 12)
    for proc in (8, 16):   # generation size 8 (no resize on paste back) and 16 (LANCZOS of a uniform image)
        d = M.prepare_inpaint_mask(m, proc, proc, 0, inpaint_full_res=True, padding=0)
        assert d["crop_region"] == (4, 4, 12, 12) and d["paste_to"] == (4, 4, 8, 8)
        init, overlay, _ = M.prepare_init_image(rgb(16, 16, A), proc, proc, 0, d, inpainting_fill=1)
        assert init.size == (proc, proc) and set(map(tuple, arr(init).reshape(-1, 3).tolist())) == {A}
        out = arr(M.apply_overlay(rgb(proc, proc, B), d["paste_to"], overlay))
        expected = np.empty((16, 16, 3), np.uint8)
        expected[:] = A
        expected[4:12, 4:12] = B
        assert out.tolist() == expected.tolist()


def test_uncrop_and_no_overlay():
    base = M.uncrop(rgb(4, 4, (1, 2, 3)), (8, 6), (2, 1, 4, 4))
    a = arr(base)
    assert base.mode == "RGBA" and base.size == (8, 6)
    assert a[1:5, 2:6].reshape(-1, 4).tolist() == [[1, 2, 3, 255]] * 16
    assert a[0].tolist() == [[0, 0, 0, 0]] * 8 and a[:, 0].tolist() == [[0, 0, 0, 0]] * 6
    im = rgb(3, 3, (5, 6, 7))
    assert M.apply_overlay(im, None, None) is im


def test_latent_mask_uniform_and_threshold():
    for value, n in ((128, 1.0), (127, 0.0), (255, 1.0), (0, 0.0)):   # np.around(v/255): >= 128 -> 1
        mask, nmask = M.latent_mask(Image.new("L", (64, 48), value), 6, 8)
        assert mask.shape == nmask.shape == (1, 1, 6, 8) and mask.dtype == nmask.dtype == torch.float32
        assert nmask.unique().tolist() == [n] and mask.unique().tolist() == [1.0 - n]
    mask, nmask = M.latent_mask(Image.new("L", (64, 48), 128), 6, 8, mask_round=False)
    v = np.float32(128) / np.float32(255)
    assert nmask.unique().tolist() == [float(v)] and mask.unique().tolist() == [float(np.float32(1) - v)]


def test_latent_mask_boundary():
    # left half white: bicubic to 8x8, rounded -> latent columns 0-3 regenerate, 4-7 keep
    mask, nmask = M.latent_mask(rect_mask(64, 64, 0, 0, 32, 64), 8, 8)
    assert nmask[0, 0].tolist() == [[1.0] * 4 + [0.0] * 4] * 8
    assert (mask + nmask).unique().tolist() == [1.0]
    # unrounded: the far columns are exactly 1 and 0, the two columns at the edge are in between
    _, soft = M.latent_mask(rect_mask(64, 64, 0, 0, 32, 64), 8, 8, mask_round=False)
    row = soft[0, 0, 0].tolist()
    assert row[0] == 1.0 and row[7] == 0.0 and 0.5 < row[3] < 1.0 and 0.0 < row[4] < 0.5
    # RGB masks (from resize modes 1-3) use channel 0
    _, n2 = M.latent_mask(rect_mask(64, 64, 0, 0, 32, 64).convert("RGB"), 8, 8)
    assert n2.tolist() == nmask.tolist()


@pytest.mark.parametrize("fill, expected", [(0, [3.0, 3.0]), (1, [3.0, 3.0]), (2, [3.0, 5.0]), (3, [3.0, 0.0])])
def test_init_images_masked_content_and_blend(fill, expected):
    """InitImages' init latent: the encoded images (3 here) with "latent noise" (5) or "latent nothing" (0) in
    the redrawn right half; its blend keeps the init latent in the left half and the samples (7) in the right."""
    r = resolve(GenerationRequest(init_images=[rgb(16, 8, (9, 9, 9))], mask=rect_mask(16, 8, 8, 0, 16, 8),
                                  width=16, height=8, mask_blur=0, inpaint_full_res=False, inpainting_fill=fill))
    shapes = []
    init = M.InitImages(r, encode=lambda pixels: torch.full((len(pixels), 4, 1, 2), 3.0),
                        noise=lambda shape: shapes.append(shape) or torch.full((1, *shape), 5.0))
    assert init.nmask[0, 0].tolist() == [[0.0, 1.0]] and (init.mask + init.nmask).unique().tolist() == [1.0]
    assert init.latent[0, :, 0].tolist() == [expected] * 4
    assert shapes == ([(4, 1, 2)] if fill == 2 else [])  # the noise is drawn for "latent noise" only
    assert init.blend(torch.full((1, 4, 1, 2), 7.0))[0, :, 0].tolist() == [[expected[0], 7.0]] * 4




# =============================================================================================
# image files and API images in A1111's `samples_format` (api.encode_pil_to_base64, images.save_image)
# =============================================================================================

INFOTEXT = "a cat, ünïcode ✓\nSteps: 20, Sampler: Euler a, Seed: 1"


def noise(seed=0, w=64, h=48):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def user_comment(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:
        raw = im.getexif().get_ifd(0x8769)[0x9286]
    assert raw[:8] == b"UNICODE\0"  # piexif's `UserComment.dump(..., encoding="unicode")`: UTF-16-BE
    return raw[8:].decode("utf-16-be")


def test_png_is_the_parameters_chunk_byte_for_byte():
    im, meta = noise(), PngInfo()
    meta.add_text("parameters", INFOTEXT)
    assert I.encode_image(im, {"parameters": INFOTEXT}) == png_bytes(im, pnginfo=meta)
    assert I.png_bytes(im, INFOTEXT) == png_bytes(im, pnginfo=meta)
    assert I.png_bytes(im) == png_bytes(im, pnginfo=PngInfo())  # no text: no chunk


JPEG_MAGIC = b"\xff\xd8\xff"


@pytest.mark.parametrize("fmt, magic", [("jpg", JPEG_MAGIC), ("jpeg", JPEG_MAGIC), ("webp", b"RIFF")])
def test_jpeg_and_webp_carry_the_infotext_as_exif_user_comment(fmt, magic):
    data = I.encode_image(noise(), {"parameters": INFOTEXT, "other": "x"}, fmt)
    assert data.startswith(magic) and (fmt != "webp" or data[8:12] == b"WEBP")
    assert user_comment(data) == INFOTEXT
    assert user_comment(I.encode_image(noise(), None, fmt)) == ""  # A1111 writes `parameters or ""`


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_quality_is_used(fmt):
    low, high = (I.encode_image(noise(), None, fmt, quality=q) for q in (30, 95))
    assert len(low) < len(high)


def test_webp_lossless_round_trips_pixels_and_lossy_does_not():
    im = noise()
    for lossless in (True, False):
        with Image.open(io.BytesIO(I.encode_image(im, None, "webp", quality=80, lossless=lossless))) as out:
            assert np.array_equal(arr(out.convert("RGB")), arr(im)) == lossless


def test_rgba_is_saved_as_rgb_in_jpeg():
    data = I.encode_image(Image.new("RGBA", (8, 8), (10, 200, 30, 0)), None, "jpg")
    with Image.open(io.BytesIO(data)) as out:
        assert out.mode == "RGB" and out.format == "JPEG"


def test_save_images_extension_picks_the_format(tmp_path):
    paths = I.save_images([noise(1), noise(2)], ["one", "two"], [5, 6], str(tmp_path / "x.JPG"))
    assert paths == [str(tmp_path / "x-0.JPG"), str(tmp_path / "x-1.JPG")]
    data = open(paths[1], "rb").read()
    assert data == I.encode_image(noise(2), {"parameters": "two"}, "jpg", quality=80)
    assert user_comment(data) == "two"
