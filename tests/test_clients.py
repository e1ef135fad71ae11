"""Real A1111 clients against `python -m server` on 127.0.0.1 (tiny synthetic checkpoint, no auth):

1. the request bodies of AUTOMATIC1111's own API tests (its `test/` folder at v1.10.1: `test_txt2img.py`,
   `test_img2img.py`, `test_extras.py`, `test_utils.py`), replayed as data (A1111 is AGPL-3.0, so its files are not
   vendored; the bodies are facts about its API) with the same pass condition, status 200;
2. every `webuiapi.WebUIApi` method that talks to an endpoint we serve;
3. the txt2img bodies Open WebUI's, SillyTavern's and LibreChat's A1111 backends send, and the response fields they
   read."""
from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from sd15.esrgan import RRDBConfig, RRDBNet

requests = pytest.importorskip("requests")
webuiapi = pytest.importorskip("webuiapi")

from test_admin import finish, start  # noqa: E402
from test_extras import write_tiny_upscaler  # noqa: E402
from test_server import write_model_folders  # noqa: E402

API = "/sdapi/v1"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    folders = write_model_folders(root)
    esrgan = root / "ESRGAN"
    esrgan.mkdir()
    write_tiny_upscaler(esrgan / "ESRGAN_4x.pth")  # A1111's ESRGAN folder: listed by its file name
    realesrgan = root / "RealESRGAN"
    realesrgan.mkdir()
    write_tiny_rrdbnet(realesrgan / "RealESRGAN_x4plus.pth")  # "R-ESRGAN 4x+", webuiapi's HiResUpscaler.ESRGAN_4x
    proc, base = start(folders, root, "--esrgan-models-path", str(esrgan), "--realesrgan-models-path", str(realesrgan))
    try:
        yield base
    finally:
        requests.post(f"{base}{API}/server-stop", timeout=30)
        assert finish(proc) == 0


def write_tiny_rrdbnet(path):
    """RealESRGAN_x4plus.pth's layout (BasicSR RRDBNet, `params_ema`) with 4 features, 1 block, random weights."""
    net = RRDBNet(RRDBConfig(num_feat=4, num_block=1, num_grow_ch=2))
    g = torch.Generator().manual_seed(0)
    torch.save({"params_ema": {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in net.state_dict().items()}},
               path)


def data_url(im: Image.Image) -> str:
    """A1111's conftest sends its test images as `data:image/png;base64,...`."""
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def picture(w=64, h=64, seed=0) -> Image.Image:
    g = __import__("random").Random(seed)
    return Image.frombytes("RGB", (w, h), bytes(g.randrange(256) for _ in range(w * h * 3)))


def mask(w=64, h=64) -> Image.Image:
    im = Image.new("L", (w, h), 0)
    im.paste(255, (16, 16, 48, 48))
    return im


def decode(s: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[-1])))


# ---- 1. AUTOMATIC1111's own API tests (v1.10.1), bodies replayed --------------------------------------------------

A1111_TXT2IMG = {
    "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0, "firstphase_height": 0,
    "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "", "prompt": "example prompt",
    "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0, "sampler_index": "Euler a",
    "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3, "styles": [], "subseed": -1,
    "subseed_strength": 0, "tiling": False, "width": 64,
}

A1111_IMG2IMG = {
    "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0.75, "eta": 0, "height": 64, "include_init_images": False,
    "inpaint_full_res": False, "inpaint_full_res_padding": 0, "inpainting_fill": 0, "inpainting_mask_invert": False,
    "mask": None, "mask_blur": 4, "n_iter": 1, "negative_prompt": "", "override_settings": {},
    "prompt": "example prompt", "resize_mode": 0, "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0,
    "s_tmin": 0, "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
    "steps": 3, "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64,
}

TXT2IMG_CASES = {  # A1111's test name -> the change its test makes to the simple body
    "test_txt2img_simple_performed": {},
    "test_txt2img_with_negative_prompt_performed": {"negative_prompt": "example negative prompt"},
    "test_txt2img_with_complex_prompt_performed":
        {"prompt": "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"},
    "test_txt2img_not_square_image_performed": {"height": 128},
    "test_txt2img_with_hrfix_performed": {"enable_hr": True},
    "test_txt2img_with_tiling_performed": {"tiling": True},
    "test_txt2img_with_vanilla_sampler_performed[PLMS]": {"sampler_index": "PLMS"},
    "test_txt2img_with_vanilla_sampler_performed[DDIM]": {"sampler_index": "DDIM"},
    "test_txt2img_with_vanilla_sampler_performed[UniPC]": {"sampler_index": "UniPC"},
    "test_txt2img_multiple_batches_performed": {"n_iter": 2},
    "test_txt2img_batch_performed": {"batch_size": 2},
}


@pytest.mark.parametrize("name", list(TXT2IMG_CASES))
def test_a1111_txt2img(url, name):
    change = TXT2IMG_CASES[name]
    r = requests.post(f"{url}{API}/txt2img", json={**A1111_TXT2IMG, **change})
    assert r.status_code == 200, r.text
    out = r.json()
    count = change.get("n_iter", 1) * change.get("batch_size", 1)
    assert len(out["images"]) == count
    scale = 2 if change.get("enable_hr") else 1  # A1111's hr_scale default is 2
    assert decode(out["images"][0]).size == (64 * scale, change.get("height", 64) * scale)


def test_a1111_txt2img_with_restore_faces_is_a_clear_4xx(url):
    """The one A1111 test we do not pass: face restoration (GFPGAN/CodeFormer) is out of scope."""
    r = requests.post(f"{url}{API}/txt2img", json={**A1111_TXT2IMG, "restore_faces": True})
    assert 400 <= r.status_code < 500
    assert "restore" in r.text.lower() or "face" in r.text.lower(), r.text


@pytest.mark.parametrize("name,change", [
    ("test_img2img_simple_performed", {}),
    ("test_inpainting_masked_performed", {"mask": "MASK"}),
    ("test_inpainting_with_inverted_masked_performed", {"mask": "MASK", "inpainting_mask_invert": True}),
    ("test_img2img_sd_upscale_performed", {"script_name": "sd upscale", "script_args": ["", 8, "Lanczos", 2.0]}),
])
def test_a1111_img2img(url, name, change):
    body = {**A1111_IMG2IMG, "init_images": [data_url(picture(96, 80))], **change}
    if body["mask"] == "MASK":
        body["mask"] = data_url(mask(96, 80))
    r = requests.post(f"{url}{API}/img2img", json=body)
    assert r.status_code == 200, r.text
    size = decode(r.json()["images"][0]).size
    assert size == ((192, 160) if "script_name" in change else (64, 64))  # sd upscale: the init image × 2


@pytest.mark.parametrize("name,body", [
    ("test_simple_upscaling_performed", {
        "resize_mode": 0, "show_extras_results": True, "gfpgan_visibility": 0, "codeformer_visibility": 0,
        "codeformer_weight": 0, "upscaling_resize": 2, "upscaling_resize_w": 128, "upscaling_resize_h": 128,
        "upscaling_crop": True, "upscaler_1": "Lanczos", "upscaler_2": "None", "extras_upscaler_2_visibility": 0}),
    ("test_png_info_performed", {}),
    ("test_interrogate_performed", {"model": "clip"}),
])
def test_a1111_extras(url, name, body):
    r = requests.post(f"{url}{API}/extra-single-image", json={**body, "image": data_url(picture(48, 40))})
    assert r.status_code == 200, r.text
    want = (96, 80) if "upscaler_1" in body else (48, 40)  # upscaler_1 "None" (the default) leaves the size
    assert decode(r.json()["image"]).size == want


def test_a1111_options_write(url):
    pre = requests.get(f"{url}{API}/options").json()["send_seed"]
    assert requests.post(f"{url}{API}/options", json={"send_seed": not pre}).status_code == 200
    assert requests.get(f"{url}{API}/options").json()["send_seed"] == (not pre)
    assert requests.post(f"{url}{API}/options", json={"send_seed": pre}).status_code == 200


@pytest.mark.parametrize("path", ["cmd-flags", "samplers", "upscalers", "sd-models", "hypernetworks", "face-restorers",
                                  "realesrgan-models", "prompt-styles", "embeddings"])
def test_a1111_get_api_url(url, path):
    assert requests.get(f"{url}{API}/{path}").status_code == 200


# ---- 2. webuiapi (the PyPI client) -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(url):
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=2)


def test_webuiapi_txt2img_seeds_and_sizes(api):
    res = api.txt2img(prompt="a red cube", seed=1234, width=64, height=48, batch_size=2, cfg_scale=5)
    assert [im.size for im in res.images] == [(64, 48), (64, 48)]
    assert res.info["all_seeds"] == [1234, 1235] and res.info["seed"] == 1234
    assert res.parameters["prompt"] == "a red cube"
    again = api.txt2img(prompt="a red cube", seed=1234, width=64, height=48, cfg_scale=5)
    assert again.image.tobytes() == res.images[0].tobytes()  # same seed, same first image


def test_webuiapi_hires_with_esrgan_4x(api):
    res = api.txt2img(prompt="a lighthouse", seed=5, width=64, height=64, enable_hr=True, hr_scale=2,
                      hr_upscaler=webuiapi.HiResUpscaler.ESRGAN_4x, hr_second_pass_steps=1, denoising_strength=0.5)
    assert res.image.size == (128, 128)
    assert webuiapi.HiResUpscaler.ESRGAN_4x == "R-ESRGAN 4x+"
    assert "Hires upscaler: R-ESRGAN 4x+" in res.info["infotexts"][0]


def test_webuiapi_img2img_and_inpainting(api):
    src = picture(64, 64, seed=3)
    res = api.img2img(images=[src], prompt="a house", seed=7, width=64, height=64, denoising_strength=0.6)
    assert res.image.size == (64, 64) and res.info["seed"] == 7
    kept = {}
    for invert in (False, True):  # the mask flag as a bool, as clients send it
        out = api.img2img(images=[src], mask_image=mask(), inpainting_mask_invert=invert, inpaint_full_res=False,
                          prompt="a house", seed=7, width=64, height=64, denoising_strength=0.9, mask_blur=0)
        assert out.image.size == (64, 64)
        kept[invert] = out.image
    # A1111 pastes the source back outside the (unblurred) mask: the corner for the plain mask, the centre when
    # inverted; inside it the pixels are generated
    assert kept[False].getpixel((2, 2)) == src.getpixel((2, 2)) != kept[True].getpixel((2, 2))
    assert kept[True].getpixel((32, 32)) == src.getpixel((32, 32)) != kept[False].getpixel((32, 32))


def test_webuiapi_extras_png_info_interrogate(api):
    src = picture(40, 24, seed=8)
    one = api.extra_single_image(src, upscaler_1="ESRGAN_4x", upscaling_resize=2)
    assert one.image.size == (80, 48)
    many = api.extra_batch_images([src, picture(16, 16)], upscaler_1="Lanczos", upscaling_resize=1.5)
    assert [im.size for im in many.images] == [(56, 32), (24, 24)]  # A1111 floors the size to a multiple of 8
    made = api.txt2img(prompt="a tree", seed=99, width=64, height=64)
    info = api.png_info(made.image)
    assert info.info.startswith("a tree\nSteps: 2, Sampler: Euler a") and "Seed: 99" in info.info
    with pytest.raises(RuntimeError, match="(?i)interrogat|clip"):
        api.interrogate(src)


def test_webuiapi_options_and_model_utils(api):
    before = api.get_options()
    assert api.set_options({"send_seed": not before["send_seed"]}) is None  # A1111 answers null
    assert api.get_options()["send_seed"] == (not before["send_seed"])
    api.set_options({"send_seed": before["send_seed"]})
    names = api.util_get_model_names()
    assert any(n.startswith("v1-5-pruned-emaonly") for n in names) and any("other" in n for n in names)
    api.util_set_model("other")
    assert "other" in api.util_get_current_model()
    api.util_set_model("v1-5-pruned-emaonly")
    assert api.util_get_current_model().startswith("v1-5-pruned-emaonly")
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    api.util_wait_for_ready(check_interval=0.1)


def test_webuiapi_listings(api):
    assert {"ESRGAN_4x", "R-ESRGAN 4x+"} <= {u["name"] for u in api.get_upscalers()}
    assert {"name", "aliases", "options"} <= set(api.get_samplers()[0])
    assert {"name", "label"} <= set(api.get_schedulers()[0])
    assert {"title", "model_name", "hash", "sha256", "filename"} <= set(api.get_sd_models()[0])
    assert "tiny-vae.safetensors" in [v["model_name"] for v in api.get_sd_vae()]
    assert "my_style" in [lo["name"] for lo in api.get_loras()] or "style" in [lo["name"] for lo in api.get_loras()]
    assert {"neg", "old"} <= set(api.get_embeddings()["loaded"])
    assert api.baseurl.endswith(f":{api.get_cmd_flags()['port']}/sdapi/v1")
    assert (api.get_hypernetworks(), api.get_face_restorers(), api.get_prompt_styles()) == ([], [], [])
    assert "R-ESRGAN 4x+" in [m["name"] for m in api.get_realesrgan_models()]
    assert {"name": "Latent (nearest-exact)"} in api.get_latent_upscale_modes()
    assert api.get_memory()["ram"]["total"] > 0
    scripts = api.get_scripts()
    assert "sd upscale" in scripts["img2img"]
    api.check_extensions()
    assert (api.has_controlnet, api.has_adetailer) == (False, False)
    assert api.refresh_checkpoints() is None
    assert set(api.get_progress()) >= {"progress", "eta_relative", "state", "current_image"}


def test_webuiapi_skip_and_interrupt(api):
    import threading
    import time
    assert (api.skip(), api.interrupt()) == (None, {})  # A1111's answers (null and {}), also when idle
    box = {}
    worker = threading.Thread(target=lambda: box.update(res=api.txt2img(prompt="slow", seed=3, width=256,
                                                                       height=256, steps=60)))
    worker.start()
    deadline = time.time() + 60
    while api.get_progress()["state"]["sampling_step"] < 2 and time.time() < deadline:
        time.sleep(0.02)
    api.skip()
    worker.join(120)
    assert box["res"].image.size == (256, 256)  # the partly sampled image comes back, as in A1111


# ---- 3. Open WebUI, SillyTavern and LibreChat: their A1111 backends' requests ------------------------------------

def check_txt2img(r, size, count=1, seed=None, first_pass=None) -> dict:
    """What these clients read: `images[i]` as plain base64 PNG, `info` as a JSON string with the seed. With hires
    fix `info`'s width/height are the first pass's, as in A1111."""
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["images"]) == count
    for b64 in out["images"]:
        assert not b64.startswith("data:")
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert im.format == "PNG" and im.size == size
    info = json.loads(out["info"])
    assert (info["width"], info["height"]) == (first_pass or size) and len(info["infotexts"]) == count
    if seed is not None:
        assert info["seed"] == seed and info["all_seeds"][:count] == [seed + i for i in range(count)]
    return info


def test_open_webui(url):
    """Open WebUI's `routers/images.py`: model switch by GET options then POST of the whole dict back, models from
    sd-models, an `authorization` header that is empty without auth, txt2img with `batch_size` = n."""
    headers = {"authorization": ""}
    models = requests.get(f"{url}{API}/sd-models", headers=headers).json()
    choices = [{"id": m["title"], "name": m["model_name"]} for m in models]
    other = next(c["id"] for c in choices if "other" in c["id"])
    options = requests.get(f"{url}{API}/options", headers=headers).json()
    options["sd_model_checkpoint"] = other
    r = requests.post(f"{url}{API}/options", json=options, headers=headers)
    assert r.status_code == 200, r.text
    # A1111 adds the short hash to a title once the file is hashed (on load); sd-models then lists it too
    now = requests.get(f"{url}{API}/options", headers=headers).json()["sd_model_checkpoint"]
    assert now.startswith(other) and now in [m["title"] for m in requests.get(f"{url}{API}/sd-models").json()]
    body = {"prompt": "a fox", "batch_size": 2, "width": 64, "height": 48, "steps": 2, "negative_prompt": "blurry"}
    info = check_txt2img(requests.post(f"{url}{API}/txt2img", json=body, headers=headers), (64, 48), count=2)
    assert "Model: other" in info["infotexts"][0]
    options["sd_model_checkpoint"] = next(c["id"] for c in choices if "v1-5" in c["id"])
    assert requests.post(f"{url}{API}/options", json=options, headers=headers).status_code == 200


def test_sillytavern(url):
    """SillyTavern's stable-diffusion extension (`generateAutoImage`, forwarded unchanged by its server's
    `/api/sd/generate`), with its defaults; `seed` is left out when random. Plus the calls its settings page makes."""
    for path in ("samplers", "schedulers", "upscalers", "latent-upscale-modes", "sd-models", "sd-vae", "options",
                 "progress"):
        assert requests.get(f"{url}{API}/{path}").status_code == 200, path
    for path in ("refresh-checkpoints", "refresh-vae", "refresh-loras"):
        assert requests.post(f"{url}{API}/{path}").status_code == 200, path
    assert requests.post(f"{url}{API}/options", json={"sd_vae": "tiny-vae.safetensors"}).status_code == 200
    body = {
        "prompt": "a knight, castle", "negative_prompt": "lowres", "sampler_name": "DPM++ 2M", "scheduler": "karras",
        "steps": 2, "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False, "enable_hr": False,
        "hr_upscaler": "Latent", "hr_scale": 2.0, "hr_additional_modules": [], "denoising_strength": 0.7,
        "hr_second_pass_steps": 0, "override_settings": {"CLIP_stop_at_last_layers": 1},
        "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
        "do_not_save_grid": False, "do_not_save_samples": False,
    }
    # its server forwards the whole body, its own `url` and `auth` fields included, with a Basic header made from
    # `auth` (empty without credentials); its connection check is GET options
    body.update(url=url, auth="")
    headers = {"Authorization": "Basic "}
    assert requests.get(f"{url}{API}/options", headers=headers).status_code == 200
    info = check_txt2img(requests.post(f"{url}{API}/txt2img", json=body, headers=headers), (64, 64))
    assert "VAE: tiny-vae" in info["infotexts"][0]
    seeded = check_txt2img(requests.post(f"{url}{API}/txt2img", json={**body, "seed": 4242, "enable_hr": True}),
                           (128, 128), seed=4242, first_pass=(64, 64))
    assert "Hires upscaler: Latent" in seeded["infotexts"][0]
    assert requests.post(f"{url}{API}/options", json={"sd_vae": "Automatic"}).status_code == 200
    assert requests.post(f"{url}{API}/interrupt").status_code == 200


def test_librechat(url):
    """LibreChat's `StableDiffusion.js` tool: prompt, negative_prompt, cfg_scale 4.5, steps 22, a square size (1024
    there; 64 for the tiny model). It reads images[0] and, from info, width/height/seed/infotexts[0]."""
    body = {"prompt": "photo of a man in black clothes, coastline", "negative_prompt": "cgi, 3d, sketch",
            "cfg_scale": 4.5, "steps": 22, "width": 64, "height": 64}
    info = check_txt2img(requests.post(f"{url}{API}/txt2img", json=body), (64, 64))
    assert isinstance(info["seed"], int) and info["seed"] >= 0
    params = info["infotexts"][0].split("\n").pop()
    assert params.startswith("Steps: 22, Sampler: ") and f"Seed: {info['seed']}" in params


def test_webuiapi_defaults_inpaint_full_res_and_resize_to(api):
    """webuiapi's own defaults: `inpaint_full_res=True` (A1111's "only masked") and the integer mask flag 0; extras
    scaled to a size with crop (resize_mode 1)."""
    src = picture(64, 64, seed=4)
    out = api.img2img(images=[src], mask_image=mask(), prompt="a door", seed=2, width=64, height=64,
                      denoising_strength=0.9, mask_blur=0)
    assert out.image.size == (64, 64) and out.image.getpixel((2, 2)) == src.getpixel((2, 2))
    assert out.image.getpixel((32, 32)) != src.getpixel((32, 32))
    res = api.extra_single_image(picture(40, 24), resize_mode=1, upscaling_resize_w=32, upscaling_resize_h=32,
                                 upscaling_crop=True, upscaler_1="Lanczos")
    assert res.image.size == (32, 32)


def test_webuiapi_interrupt_returns_what_it_has(api):
    import threading
    import time
    box = {}
    worker = threading.Thread(target=lambda: box.update(res=api.txt2img(prompt="slow", seed=3, width=256,
                                                                       height=256, steps=60, n_iter=3)))
    worker.start()
    deadline = time.time() + 60
    while api.get_progress()["state"]["sampling_step"] < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert api.interrupt() == {}
    worker.join(120)
    assert [im.size for im in box["res"].images] == [(256, 256)]  # the first batch, partly sampled; no more
