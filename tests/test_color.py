"""A1111's img2img colour correction (`sd15.a1111.color`): bit-exact with A1111's recipe run on OpenCV,
scikit-image and blendmodes, applied by the pipeline before the paste-back, and set by the server's option."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import sd15
from sd15.a1111 import color
from sd15.a1111.images import resize_image
from sd15.a1111.inpaint import InitImages, apply_overlay
from sd15.pipeline import generate
from sd15.schema import GenerationRequest, resolve

RNG = np.random.default_rng(0)


def cube_sample(n=1 << 18):
    """Random colours, every grey (grey 111 lands on the cube-root table's one rounding tie) and the six
    pure-colour ramps, as an (N, 1, 3) uint8 image."""
    directions = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]],
                          np.uint8)
    ramps = (np.arange(256, dtype=np.uint8)[:, None, None] * directions).reshape(-1, 3)
    return np.concatenate([RNG.integers(0, 256, (n, 3), dtype=np.uint8), ramps])[:, None]


def image_pairs():
    """(init, result) uint8 pairs: random, a gradient against another, flat against flat and against
    noise, black and white stripes, and a saturated result that the luminosity blend must pull back."""
    g = np.linspace(0, 255, 40 * 24).reshape(40, 24).astype(np.uint8)
    stripes = np.zeros((16, 16, 3), np.uint8)
    stripes[::2] = 255
    hues = np.stack([g, 255 - g, np.zeros_like(g)], -1)
    random = RNG.integers(0, 256, (2, 40, 24, 3), dtype=np.uint8)
    return [(random[0], random[1]),
            (np.stack([g, 255 - g, g // 2], -1), np.stack([g // 3, g, 255 - g], -1)),
            (np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 200, np.uint8)),
            (np.full((16, 16, 3), 128, np.uint8), RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
            (stripes, np.roll(stripes, 1, 0)), (np.full_like(hues, (250, 20, 240)), hues)]


# --- parity with the libraries A1111 calls -------------------------------------------------------------

def test_lab_conversions_are_opencvs():
    cv2 = pytest.importorskip("cv2")
    rgb = cube_sample()
    assert np.array_equal(color.rgb_to_lab(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB))
    lab = cube_sample()  # every (L, a, b) byte triple is valid input
    assert np.array_equal(color.lab_to_rgb(lab), cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))


@pytest.mark.slow
def test_lab_conversions_are_opencvs_on_every_colour():
    cv2 = pytest.importorskip("cv2")
    cube = np.arange(1 << 24, dtype=np.uint32)
    every = np.stack([cube >> 16, (cube >> 8) & 255, cube & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)
    assert np.array_equal(color.rgb_to_lab(every), cv2.cvtColor(every, cv2.COLOR_RGB2LAB))
    assert np.array_equal(color.lab_to_rgb(every), cv2.cvtColor(every, cv2.COLOR_LAB2RGB))


def test_match_histograms_is_skimages():
    exposure = pytest.importorskip("skimage.exposure")
    for source, reference in [((40, 24), (31, 17)), ((8, 8), (64, 64))]:
        image = RNG.integers(0, 256, (*source, 3), dtype=np.uint8)
        ref = RNG.integers(60, 90, (*reference, 3), dtype=np.uint8)  # few values: the interpolation matters
        expected = exposure.match_histograms(image, ref, channel_axis=2)
        assert expected.dtype == np.uint8 and np.array_equal(color.match_histograms(image, ref), expected)


def blendmodes_luminosity(colour, luma):
    """blendmodes' `blendLayers(colour, luma, BlendType.LUMINOSITY)` as in the 2022 release A1111 v1.10.1
    pins, whose float result is truncated to uint8. Later releases round it (and cannot be installed with
    2022's numpy<2 pin beside numpy 2); their `blendLayersArray` returns the same floats, truncated here."""
    blend = pytest.importorskip("blendmodes.blend")
    a, b = Image.fromarray(colour), Image.fromarray(luma)
    if hasattr(blend, "blendLayersArray"):
        arr = blend.blendLayersArray(a, b, blend.BlendType.LUMINOSITY)
        return np.clip(arr[..., :3], 0, 255).astype(np.uint8)
    return np.asarray(blend.blendLayers(a, b, blend.BlendType.LUMINOSITY).convert("RGB"))


def test_luminosity_blend_is_blendmodes():
    for colour, luma in image_pairs():
        assert np.array_equal(color.luminosity_blend(colour, luma), blendmodes_luminosity(colour, luma))


def a1111_color_correction(init: Image.Image, image: Image.Image) -> np.ndarray:
    """A1111's `setup_color_correction` and `apply_color_correction`, on the libraries it calls."""
    cv2 = pytest.importorskip("cv2")
    exposure = pytest.importorskip("skimage.exposure")
    correction = cv2.cvtColor(np.asarray(init.copy()), cv2.COLOR_RGB2LAB)
    lab = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2LAB)
    matched = cv2.cvtColor(exposure.match_histograms(lab, correction, channel_axis=2), cv2.COLOR_LAB2RGB)
    return blendmodes_luminosity(matched.astype("uint8"), np.asarray(image))


def test_color_correction_is_a1111s():
    for init, result in image_pairs():
        init, result = Image.fromarray(init), Image.fromarray(result)
        ours = color.apply_color_correction(color.setup_color_correction(init), result)
        assert np.array_equal(np.asarray(ours), a1111_color_correction(init, result))


# --- where the pipeline applies it ------------------------------------------------------------------------

def noise_image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_img2img_result_is_the_corrected_uncorrected_one(tiny_ckpt):
    """With the option the image is `apply_color_correction(init, the image without it)`; without it
    nothing changes; a batch from one init image corrects every image, and every batch of n_iter."""
    model = sd15.load(tiny_ckpt, device="cpu", dtype=torch.float32)
    init = noise_image(48, 40, 1)  # resized (mode 0) to 64×64 before A1111 takes the target
    kw = dict(prompt="a house", seed=4, steps=2, denoising_strength=0.6, init_images=[init], width=64,
              height=64, batch_size=2, n_iter=2)
    plain = generate(model, GenerationRequest(**kw)).images
    again = generate(model, GenerationRequest(img2img_color_correction=False, **kw)).images
    corrected = generate(model, GenerationRequest(img2img_color_correction=True, **kw)).images
    target = color.setup_color_correction(resize_image(0, init, 64, 64))
    assert len(corrected) == 4
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, again))
    for uncorrected, image in zip(plain, corrected):
        expected = color.apply_color_correction(target, uncorrected)
        assert np.array_equal(np.asarray(image), np.asarray(expected))
        assert not np.array_equal(np.asarray(image), np.asarray(uncorrected))


def test_only_masked_corrects_the_crop_before_the_paste_back():
    """"Only masked": each image's target is its own init's crop as encoded, and the result is corrected
    before it is uncropped into the original (A1111's `apply_color_correction`, then `apply_overlay`)."""
    inits = [noise_image(64, 48, 2), noise_image(64, 48, 3)]
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (40, 8, 56, 24))
    kw = dict(init_images=inits, mask=mask, mask_blur=0, inpaint_full_res=True, inpainting_fill=1, width=32,
              height=32)
    encoded = []

    def encode(pixels):
        encoded.append(pixels)
        return torch.zeros(len(pixels), 4, 4, 4)
    plain = InitImages(resolve(GenerationRequest(**kw)), encode, noise=None)
    init = InitImages(resolve(GenerationRequest(img2img_color_correction=True, **kw)), encode, noise=None)
    results = [noise_image(32, 32, 4), noise_image(32, 32, 5)]
    out = init.finish(results)
    crops = [Image.fromarray((p.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for p in encoded[1]]
    for crop, result, overlay, image in zip(crops, results, init.overlays, out):
        corrected = color.apply_color_correction(color.setup_color_correction(crop), result)
        expected = apply_overlay(corrected, init.inpaint["paste_to"], overlay)
        assert image.size == (64, 48) and np.array_equal(np.asarray(image), np.asarray(expected))
    assert [np.asarray(a).tolist() for a in plain.finish(results)] != [np.asarray(a).tolist() for a in out]


# --- the server's option --------------------------------------------------------------------------------

def test_server_option_corrects_img2img(tmp_path):
    """The `img2img_color_correction` option, set with POST /options or in override_settings, corrects the
    img2img answer as the library does; A1111's default (off) leaves it alone."""
    from starlette.testclient import TestClient

    from server.app import create_app
    from test_server import decode, make_config, write_model_folders

    init = noise_image(64, 64, 6)
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    body = {"init_images": [base64.b64encode(buf.getvalue()).decode()], "prompt": "a", "seed": 2, "steps": 2,
            "width": 64, "height": 64, "denoising_strength": 0.6}
    with TestClient(create_app(make_config(write_model_folders(tmp_path)))) as client:
        def img2img(**more):
            r = client.post("/sdapi/v1/img2img", json={**body, **more})
            assert r.status_code == 200, r.text
            return np.asarray(decode(r.json()["images"][0]).convert("RGB"))

        plain, overridden = img2img(), img2img(override_settings={"img2img_color_correction": True})
        assert client.post("/sdapi/v1/options", json={"img2img_color_correction": True}).status_code == 200
        by_option = img2img()
    expected = color.apply_color_correction(color.setup_color_correction(init), Image.fromarray(plain))
    assert np.array_equal(overridden, np.asarray(expected)) and np.array_equal(by_option, overridden)
    assert not np.array_equal(plain, overridden)
