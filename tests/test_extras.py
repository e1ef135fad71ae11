"""Extras over the API (server/extras.py) through Starlette's TestClient, with a tiny synthetic ESRGAN-folder model.

Every image answer is compared with the same upscale computed directly (`sd15.upscale.Upscalers`, PIL), so a
server that resized differently, dropped the crop or mixed the second upscaler otherwise fails.
"""
from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from starlette.testclient import TestClient

from sd15.a1111.images import encode_image
from sd15.esrgan import SRVGGConfig, SRVGGNetCompact
from sd15.upscale import Upscalers
from server.app import Engine, create_app
from test_server import make_config, write_model_folders

API = "/sdapi/v1"
TINY = "4x-Tiny"  # listed under its file stem, as A1111 lists ESRGAN-folder files


def write_tiny_upscaler(path, upscale=4, seed=0):
    """A compact Real-ESRGAN-layout net with 4 features and 1 body conv, random weights, as a `params` .pth."""
    net = SRVGGNetCompact(SRVGGConfig(num_feat=4, num_conv=1, upscale=upscale))
    g = torch.Generator().manual_seed(seed)
    torch.save({"params": {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in net.state_dict().items()}}, path)


def image(w, h, seed=0, mode="RGB"):
    bands = len(mode)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, bands), dtype=np.uint8), mode)


def b64(im, pnginfo=None, data_url=False):
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=pnginfo)
    s = base64.b64encode(buf.getvalue()).decode()
    return "data:image/png;base64," + s if data_url else s


def decode(s):
    assert not s.startswith("data:")
    im = Image.open(io.BytesIO(base64.b64decode(s)))
    im.load()
    return im


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    f = write_model_folders(tmp_path_factory.mktemp("extras"))
    esrgan = tmp_path_factory.mktemp("esrgan")
    write_tiny_upscaler(esrgan / f"{TINY}.pth")
    realesrgan = tmp_path_factory.mktemp("realesrgan")
    write_tiny_upscaler(realesrgan / "realesr-general-x4v3.pth", seed=1)
    return f, str(esrgan), str(realesrgan)


@pytest.fixture(scope="module")
def config(folders):
    f, esrgan, realesrgan = folders
    config = make_config(f)
    config.flags.update(esrgan_models_path=esrgan, realesrgan_models_path=realesrgan)
    return config


@pytest.fixture(scope="module")
def client(config):
    with TestClient(create_app(config)) as c:
        yield c


@pytest.fixture(scope="module")
def direct(config, folders):
    """The reference: the library's Upscalers on the same folders, device and dtype as the server's (fp32 on the
    CPU), A1111's default tile options."""
    ups = Engine(config).upscalers
    assert (ups.esrgan_dir, ups.realesrgan_dir) == (folders[1], folders[2])
    return Upscalers(folders[1], folders[2], device=ups.device, dtype=ups.dtype)


def post(client, body, batch=False):
    return client.post(f"{API}/extra-{'batch-images' if batch else 'single-image'}", json=body)


# ---- results -------------------------------------------------------------------------------------------------

def test_scale_by_equals_the_library_upscale(client, direct):
    src = image(40, 24, seed=1)
    r = post(client, {"image": b64(src), "upscaler_1": TINY, "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"image", "html_info"}
    out = decode(body["image"])
    want = direct.upscale(src, TINY, 2)  # x4 net, then LANCZOS down to (80, 48)
    assert out.size == (80, 48) and same(out, want)
    assert body["html_info"] == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: 4x-Tiny</p>"
    assert out.info["postprocessing"] == "Postprocess upscale by: 2.0, Postprocess upscaler: 4x-Tiny"


def test_scale_to_with_crop_gives_the_exact_size(client, direct):
    src = image(40, 24, seed=2)
    body = {"image": b64(src), "resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 60,
            "upscaler_1": TINY}
    out = decode(post(client, body).json()["image"])
    assert out.size == (100, 60)
    assert same(out, direct.upscale_to(src, TINY, 100, 60, crop=True))
    # by hand: scale max(100/40, 60/24) = 2.5 -> (96, 56) after //8*8, pasted at (50-48, 30-28) on black
    inner = direct.upscale(src, TINY, 2.5)
    assert inner.size == (96, 56)
    a = np.asarray(out)
    assert not a[:, :2].any() and not a[:2].any() and not a[:, 98:].any() and not a[58:].any()
    assert np.array_equal(a[2:58, 2:98], np.asarray(inner))
    html = post(client, body).json()["html_info"]
    assert html == ("<p>Postprocess upscale to: 100x60, Postprocess crop to: 100x60, "
                    "Postprocess upscaler: 4x-Tiny</p>")
    uncropped = decode(post(client, {**body, "upscaling_crop": False}).json()["image"])
    assert same(uncropped, inner)


def test_second_upscaler_is_blended_by_visibility(client, direct):
    src = image(40, 24, seed=3)
    body = {"image": b64(src), "upscaler_1": "Lanczos", "upscaler_2": TINY, "extras_upscaler_2_visibility": 0.3}
    r = post(client, body).json()
    first = src.resize((80, 48), resample=Image.Resampling.LANCZOS)  # "Lanczos" x2: one PIL resize
    want = Image.blend(first, direct.upscale(src, TINY, 2), 0.3)
    assert same(decode(r["image"]), want)
    assert not same(want, first)
    assert r["html_info"].endswith("Postprocess upscaler: Lanczos, Postprocess upscaler 2: 4x-Tiny</p>")
    # visibility 0: the second upscaler is not used at all
    zero = post(client, {**body, "extras_upscaler_2_visibility": 0}).json()
    assert same(decode(zero["image"]), first) and "upscaler 2" not in zero["html_info"]


def test_batch_answers_one_image_per_input_in_order(client, direct):
    sources = [image(16, 16, seed=10), image(24, 8, seed=11), image(8, 32, seed=12)]
    body = {"imageList": [{"data": b64(s, data_url=i == 1), "name": f"img{i}"} for i, s in enumerate(sources)],
            "upscaler_1": TINY, "upscaling_resize": 1.5}
    r = post(client, body, batch=True)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"images", "html_info"} and len(out["images"]) == 3
    for got, src in zip(out["images"], sources):
        assert same(decode(got), direct.upscale(src, TINY, 1.5))
    assert [decode(g).size for g in out["images"]] == [(24, 24), (32, 8), (8, 48)]


def test_input_text_info_is_kept_and_postprocessing_added(client):
    meta = PngInfo()
    meta.add_text("parameters", "a cat\nSteps: 20, Seed: 1")
    meta.add_text("Comment", "hello")
    src = image(16, 16, seed=4)
    r = post(client, {"image": b64(src, meta), "upscaler_1": "Nearest", "upscaling_resize": 2})
    out = decode(r.json()["image"])
    assert out.info["parameters"] == "a cat\nSteps: 20, Seed: 1" and out.info["Comment"] == "hello"
    assert out.info["postprocessing"] == "Postprocess upscale by: 2.0, Postprocess upscaler: Nearest"
    assert same(out, src.resize((32, 32), resample=Image.Resampling.NEAREST))


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_jpeg_and_webp_input_infotext_from_exif_user_comment(client, fmt):
    """A1111's `read_info_from_image`: a JPEG / WebP input's infotext is its EXIF UserComment (as our own
    answers carry it), passed on as a PNG's `parameters` is."""
    text = "a cat\nSteps: 20, Seed: 1, Model: \u00e9t\u00e9"
    data = base64.b64encode(encode_image(image(16, 16, seed=4), {"parameters": text}, fmt)).decode()
    out = decode(post(client, {"image": data, "upscaler_1": "Nearest", "upscaling_resize": 2}).json()["image"])
    assert out.format == "PNG" and out.info["parameters"] == text
    assert out.info["postprocessing"] == "Postprocess upscale by: 2.0, Postprocess upscaler: Nearest"
    assert not {"exif", "jfif", "jfif_version", "dpi"} & set(out.info)


def test_samples_format_encodes_the_results(client):
    """A1111's `encode_pil_to_base64`: WebP (lossless here, so the pixels can be compared) with the input's
    `parameters` as EXIF UserComment; the batch's images too."""
    meta = PngInfo()
    meta.add_text("parameters", "a cat\nSteps: 20, Seed: 1")
    src = image(16, 16, seed=4)
    opts = {"samples_format": "webp", "webp_lossless": True}
    assert client.post(f"{API}/options", json=opts).status_code == 200
    try:
        body = {"upscaler_1": "Nearest", "upscaling_resize": 2}
        one = decode(post(client, {**body, "image": b64(src, meta)}).json()["image"])
        listed = {**body, "imageList": [{"data": b64(src), "name": "a"}]}
        [batch] = post(client, listed, batch=True).json()["images"]
    finally:
        client.post(f"{API}/options", json={"samples_format": "png", "webp_lossless": False})
    assert one.format == decode(batch).format == "WEBP"
    comment = one.getexif().get_ifd(0x8769)[0x9286]
    assert comment == b"UNICODE\0" + "a cat\nSteps: 20, Seed: 1".encode("utf-16-be")
    assert same(one, src.resize((32, 32), resample=Image.Resampling.NEAREST)) and same(decode(batch), one)


def test_rgba_input_drops_alpha_as_a1111(client):
    src = image(16, 16, seed=5, mode="RGBA")
    out = decode(post(client, {"image": b64(src)}).json()["image"])
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(src)[:, :, :3])


# ---- A1111's own test bodies (test/test_extras.py at v1.10.1), sent as they are --------------------------------

A1111_SIMPLE_UPSCALING = {
    "resize_mode": 0, "show_extras_results": True, "gfpgan_visibility": 0, "codeformer_visibility": 0,
    "codeformer_weight": 0, "upscaling_resize": 2, "upscaling_resize_w": 128, "upscaling_resize_h": 128,
    "upscaling_crop": True, "upscaler_1": "Lanczos", "upscaler_2": "None", "extras_upscaler_2_visibility": 0,
}


@pytest.mark.parametrize("extra", [A1111_SIMPLE_UPSCALING, {}, {"model": "clip"}],
                         ids=["simple_upscaling", "png_info", "interrogate"])
def test_a1111_test_bodies_succeed(client, extra):
    src = image(50, 30, seed=6)
    r = post(client, {**extra, "image": b64(src, data_url=True)})
    assert r.status_code == 200, r.text
    out = decode(r.json()["image"])
    if extra is A1111_SIMPLE_UPSCALING:  # "Lanczos" x2: (100, 60), then LANCZOS to dest = (96, 56) (//8*8)
        want = src.resize((100, 60), Image.Resampling.LANCZOS).resize((96, 56), Image.Resampling.LANCZOS)
        assert same(out, want)
    else:  # upscaler_1 "None": a no-op that returns the image
        assert same(out, src) and r.json()["html_info"] == "<p></p>"


# ---- errors --------------------------------------------------------------------------------------------------

def test_bad_input_is_a_4xx(client):
    good = b64(image(16, 16))
    r = post(client, {"image": "not base64 at all!"})
    assert r.status_code == 400 and "Invalid encoded image" in r.json()["detail"]
    r = post(client, {"image": good, "upscaler_1": "4x-Nope"})
    assert r.status_code == 400
    assert r.json()["detail"].endswith("valid: None, Lanczos, Nearest, 4x-Tiny")
    r = post(client, {"image": good, "upscaler_1": "Lanczos", "upscaler_2": "Bicubic"})
    assert r.status_code == 400 and "Bicubic" in r.json()["detail"]
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        r = post(client, {"image": good, name: 0.5})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", name]
        assert "face restoration" in r.json()["detail"][0]["msg"]
    cases = [({"resize_mode": 2}, "resize_mode", "value_error.const"),
             ({"resize_mode": "1"}, "resize_mode", "value_error.const"),
             ({"upscaling_resize": 0}, "upscaling_resize", "value_error.number.not_gt"),
             ({"extras_upscaler_2_visibility": 1.5}, "extras_upscaler_2_visibility", "value_error.number.not_le"),
             ({"upscaling_resize_w": 0}, "upscaling_resize_w", "value_error.number.not_ge"),
             ({"upscaling_resize": "two"}, "upscaling_resize", "type_error.float")]
    for extra, name, kind in cases:
        r = post(client, {"image": good, **extra})
        assert r.status_code == 422, extra
        assert r.json()["detail"][0]["loc"] == ["body", name] and r.json()["detail"][0]["type"] == kind
    assert post(client, {"image": good, "resize_mode": True}).status_code == 200  # pydantic: True == 1
    r = post(client, {"upscaler_1": "Lanczos"}, batch=True)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "imageList"]
    r = post(client, {"imageList": [{"name": "x"}]}, batch=True)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "imageList", 0, "data"]
    r = post(client, {"imageList": [{"data": good, "name": "a"}, {"data": "@@", "name": "b"}]}, batch=True)
    assert r.status_code == 400 and "imageList[1]" in r.json()["detail"]


def test_result_size_limit(client):
    # the test config allows 1024*1024 pixels per image: 64x64 by 17 is 1088x1088
    r = post(client, {"image": b64(image(64, 64)), "upscaler_1": "Lanczos", "upscaling_resize": 17})
    assert r.status_code == 400 and "limit" in r.json()["detail"]


# ---- listings and interrogate --------------------------------------------------------------------------------

def test_upscaler_listings(client, folders):
    ups = client.get(f"{API}/upscalers").json()
    assert [u["name"] for u in ups] == ["None", "Lanczos", "Nearest", TINY]  # General 4xV3 is not enabled
    assert ups[3]["model_path"].endswith(f"{TINY}.pth") and ups[3]["scale"] == 4 and ups[3]["model_url"] is None
    models = client.get(f"{API}/realesrgan-models").json()
    assert models == [{"name": "R-ESRGAN General 4xV3", "path": f"{folders[2]}/realesr-general-x4v3.pth", "scale": 4}]
    before = client.get(f"{API}/options").json()["realesrgan_enabled_models"]
    try:
        assert client.post(f"{API}/options", json={"realesrgan_enabled_models": ["R-ESRGAN General 4xV3"]}
                           ).status_code == 200
        names = [u["name"] for u in client.get(f"{API}/upscalers").json()]
        assert names == ["None", "Lanczos", "Nearest", TINY, "R-ESRGAN General 4xV3"]
    finally:
        client.post(f"{API}/options", json={"realesrgan_enabled_models": before})


def test_interrogate_names_the_missing_model(client):
    assert client.post(f"{API}/interrogate", json={}).json()["detail"] == "Image not found"
    r = client.post(f"{API}/interrogate", json={"image": b64(image(8, 8)), "model": "clip"})
    assert r.status_code == 404 and "CLIP interrogator" in r.json()["detail"]
    r = client.post(f"{API}/interrogate", json={"image": b64(image(8, 8)), "model": "deepdanbooru"})
    assert r.status_code == 404 and "DeepBooru" in r.json()["detail"]
    r = client.post(f"{API}/interrogate", json={"image": b64(image(8, 8)), "model": "blip2"})
    assert r.status_code == 404 and r.json()["detail"] == "Model not found"
    assert client.post(f"{API}/interrogate", json={"image": "###"}).status_code == 400


def test_tile_options_are_honoured(client, direct):
    src = image(40, 24, seed=7)
    body = {"image": b64(src), "upscaler_1": TINY, "upscaling_resize": 4}
    default = decode(post(client, body).json()["image"])
    assert same(default, direct.upscale(src, TINY, 4))  # 192-pixel tiles: one tile
    try:
        assert client.post(f"{API}/options", json={"ESRGAN_tile": 16, "ESRGAN_tile_overlap": 4}).status_code == 200
        tiled = decode(post(client, body).json()["image"])
    finally:
        client.post(f"{API}/options", json={"ESRGAN_tile": 192, "ESRGAN_tile_overlap": 8})
    ref = Upscalers(direct.esrgan_dir, direct.realesrgan_dir, device=direct.device, dtype=direct.dtype, tile=16,
                    tile_overlap=4)
    assert same(tiled, ref.upscale(src, TINY, 4)) and not same(tiled, default)  # the seams differ


def test_flags_and_default_folders(tmp_path):
    from server.__main__ import _parser, config_from_args

    ups = Engine(config_from_args(_parser().parse_args(["--ckpt-dir", str(tmp_path)]))).upscalers
    assert ups.esrgan_dir == str(tmp_path / "ESRGAN") and ups.realesrgan_dir == str(tmp_path / "RealESRGAN")
    config = config_from_args(_parser().parse_args(["--ckpt-dir", str(tmp_path), "--esrgan-models-path", "/e",
                                                    "--realesrgan-models-path", "/r", "--api-server-stop"]))
    ups = Engine(config).upscalers
    assert (ups.esrgan_dir, ups.realesrgan_dir, config.flags["api_server_stop"]) == ("/e", "/r", True)
    assert config_from_args(_parser().parse_args([])).flags["api_server_stop"] is False


def test_webuiapi_extras_on_a_live_server(folders, direct, tmp_path):
    """webuiapi's extras, interrogate and listing methods against `python -m server` with the folder flags."""
    import requests
    import webuiapi

    from test_admin import finish, start

    f, esrgan, realesrgan = folders
    proc, url = start(f, tmp_path, "--esrgan-models-path", esrgan, "--realesrgan-models-path", realesrgan)
    try:
        host, port = url.rsplit(":", 1)
        api = webuiapi.WebUIApi(host=host.removeprefix("http://"), port=int(port))
        assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest", TINY]
        assert [m["name"] for m in api.get_realesrgan_models()] == ["R-ESRGAN General 4xV3"]
        src = image(40, 24, seed=8)
        res = api.extra_single_image(src, upscaler_1=TINY, upscaling_resize=2)
        assert same(res.image, direct.upscale(src, TINY, 2)) and "4x-Tiny" in res.info
        batch = api.extra_batch_images([src, image(16, 16, seed=9)], upscaler_1="Lanczos", upscaling_resize=1.5)
        assert [im.size for im in batch.images] == [(56, 32), (24, 24)]
        with pytest.raises(RuntimeError, match="CLIP interrogator"):
            api.interrogate(src)
    finally:
        requests.post(f"{url}{API}/server-stop", timeout=30)
        assert finish(proc) == 0


# --- the same upscalers in txt2img's hires fix, and A1111's tiling flag, through the API ----------------------

HIRES = {"prompt": "a lighthouse", "seed": 11, "steps": 2, "width": 64, "height": 64, "cfg_scale": 5,
         "sampler_name": "Euler", "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 1,
         "denoising_strength": 0.5}


def test_hires_fix_with_an_esrgan_file_runs_and_differs_from_lanczos(client):
    """webuiapi's HiResUpscaler.ESRGAN_4x-style request: an upscaler from the ESRGAN folder is a valid
    hr_upscaler (400 before), runs, is named in the infotext, and changes the image against Lanczos."""
    r = client.post("/sdapi/v1/txt2img", json={**HIRES, "hr_upscaler": TINY})
    assert r.status_code == 200, r.text
    esrgan = decode(r.json()["images"][0])
    assert esrgan.size == (128, 128)
    assert f"Hires upscaler: {TINY}" in r.json()["info"]
    lanczos = client.post("/sdapi/v1/txt2img", json={**HIRES, "hr_upscaler": "Lanczos"})
    assert lanczos.status_code == 200
    assert not same(esrgan, decode(lanczos.json()["images"][0]))
    bad = client.post("/sdapi/v1/txt2img", json={**HIRES, "hr_upscaler": "4x-Missing"})
    assert bad.status_code == 400 and TINY in bad.json()["detail"]


def test_tiling_true_is_accepted_and_written_to_the_infotext(client):
    """A1111's test_txt2img_with_tiling_performed: `tiling: true` -> 200 with "Tiling: True"; null takes
    the `tiling` option (off by default); the image differs from the untiled one."""
    body = {"prompt": "a brick wall", "seed": 3, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}
    tiled = client.post("/sdapi/v1/txt2img", json={**body, "tiling": True})
    assert tiled.status_code == 200, tiled.text
    assert "Tiling: True" in tiled.json()["info"]
    plain = client.post("/sdapi/v1/txt2img", json={**body, "tiling": None})
    assert plain.status_code == 200 and "Tiling" not in plain.json()["info"]
    assert not same(decode(tiled.json()["images"][0]), decode(plain.json()["images"][0]))


def test_openapi_is_valid_openapi_3_0_for_path_parameters_and_exclusive_bounds(client):
    """Schemathesis refused two things: Starlette's `{path:path}` in a path without a declared parameter, and
    a number as `exclusiveMinimum` (OpenAPI 3.0 wants `minimum` plus `exclusiveMinimum: true`)."""
    doc = client.get("/openapi.json").json()
    for path, ops in doc["paths"].items():
        assert ":" not in path
        names = set(re.findall(r"\{(\w+)\}", path))
        for op in ops.values():
            assert {p["name"] for p in op.get("parameters", []) if p["in"] == "path"} == names, path

    def walk(node):
        if isinstance(node, dict):
            for key in ("exclusiveMinimum", "exclusiveMaximum"):
                if key in node:
                    assert node[key] is True and ("minimum" if "Min" in key else "maximum") in node
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(doc)
    resize = doc["components"]["schemas"]["ExtrasSingleImageRequest"]["properties"]["upscaling_resize"]
    assert resize["minimum"] == 0 and resize["exclusiveMinimum"] is True
