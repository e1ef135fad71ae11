"""The A1111 API server through Starlette's TestClient, on tiny synthetic checkpoints (64×64, 2-3 steps).

The lifespan runs (`with TestClient(app)`), so these go through the real model loading, the GPU queue and
sd15.pipeline; only `test_seed_document_payload` stubs the pipeline (a 512×512, 20-step job is too slow
for CI on a tiny model).
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

import synthetic
from sd15 import hashing, schema
from sd15.a1111 import infotext
from sd15.samplers import SAMPLERS
from server import a1111
from server import app as app_module
from server.a1111 import Limits
from server.app import ServerConfig, create_app

API = "/sdapi/v1"
SMALL = {"width": 64, "height": 64, "steps": 2}


# --------------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------------

def write_tiny_vae(path: str) -> str:
    """A standalone VAE file (no prefix) with the tiny VAE's shapes."""
    prefix = "first_stage_model."
    sd = synthetic.tiny_state_dict(seed=3)
    vae = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    synthetic.write_safetensors(path, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in sorted(vae.items())])
    return path


def write_model_folders(root) -> dict:
    """models/ with two tiny checkpoints (one in a subfolder), and VAE/, Lora/, embeddings/ inside it, as
    `python -m server` lays them out by default."""
    models = root / "models"
    (models / "sub").mkdir(parents=True)
    for d in ("VAE", "Lora", "embeddings"):
        (models / d).mkdir()
    synthetic.write_tiny_checkpoint(str(models / "v1-5-pruned-emaonly.safetensors"))
    synthetic.write_tiny_checkpoint(str(models / "sub" / "other.safetensors"), seed=1)
    write_tiny_vae(str(models / "VAE" / "tiny-vae.safetensors"))
    synthetic.write_safetensors(str(models / "Lora" / "style.safetensors"),
                                [("lora_unet_x.lora_down.weight", (4, 8), torch.float32, lambda: torch.zeros(4, 8))],
                                metadata={"ss_output_name": "my_style", "ss_tag_frequency": '{"cat": 3}'})
    synthetic.write_safetensors(str(models / "embeddings" / "neg.safetensors"),
                                [("emb_params", (2, 64), torch.float32, lambda: torch.zeros(2, 64))])
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(3, 64)}, "name": "old",
                "step": 500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model"},
               str(models / "embeddings" / "old.pt"))  # A1111's .pt layout
    return {"ckpt_dir": str(models), "vae_dir": str(models / "VAE"), "lora_dir": str(models / "Lora"),
            "embeddings_dir": str(models / "embeddings")}


def make_config(folders: dict, **kw) -> ServerConfig:
    limits = Limits(max_body_bytes=1 << 20, max_image_pixels=1024 * 1024)
    kw.setdefault("allowed_hosts", ["testserver"])  # TestClient's Host header
    kw.setdefault("save", False)
    return ServerConfig(**folders, limits=limits, flags={"port": 7860, "api_auth": None}, **kw)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_model_folders(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def client(folders):
    with TestClient(create_app(make_config(folders))) as c:
        yield c


@pytest.fixture
def fresh(client):
    """Restore the options this test changes (model and VAE included)."""
    before = client.get(f"{API}/options").json()
    yield client
    now = client.get(f"{API}/options").json()
    changed = {k: v for k, v in before.items() if now.get(k) != v and k != "sd_checkpoint_hash"}
    if changed:
        assert client.post(f"{API}/options", json=changed).status_code == 200


def png_b64(size=(64, 64), color=(200, 30, 30), mode="RGB", **save) -> str:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG", **save)
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> Image.Image:
    assert not b64.startswith("data:")
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def png_claiming(width: int, height: int) -> str:
    """A PNG whose header claims width×height pixels but carries no pixel data (a decompression bomb's
    first bytes)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return base64.b64encode(raw).decode()


def txt2img(client, **kw):
    r = client.post(f"{API}/txt2img", json={**SMALL, **kw})
    assert r.status_code == 200, r.text
    body = r.json()
    body["info"] = json.loads(body["info"])
    return body


def wait_for(predicate, timeout=60.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------------------------------
# txt2img / img2img
# --------------------------------------------------------------------------------------------------

def test_txt2img_response_shape(client):
    r = client.post(f"{API}/txt2img", json={"prompt": "a cat", "seed": 123, "negative_prompt": "blurry", **SMALL})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert float(r.headers["x-process-time"]) > 0
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    assert isinstance(body["info"], str)  # a JSON *string*
    info = json.loads(body["info"])
    assert info["seed"] == 123 and info["all_seeds"] == [123]
    assert info["sampler_name"] == "Euler" and info["steps"] == 2 and info["cfg_scale"] == 7.0
    assert info["sd_model_name"] == "v1-5-pruned-emaonly"
    assert info["denoising_strength"] is None and info["index_of_first_image"] == 0
    assert len(body["images"]) == 1
    image = decode(body["images"][0])
    assert image.format == "PNG" and image.size == (64, 64)
    text = image.info["parameters"]
    assert text == info["infotexts"][0]
    assert text.startswith("a cat\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, Schedule type: Automatic, "
                           "CFG scale: 7.0, Seed: 123, Size: 64x64, Model hash: ")
    # parameters echoes the request: every txt2img field (schema and API-only), defaults included, as sent
    params = body["parameters"]
    expected = {f.name for f in schema.fields_of("prompt", "seeds", "sampling", "size", "hires")}
    expected |= {f.name for f in dataclasses.fields(a1111.Txt2ImgRequest)} - {"shared"}
    assert set(params) == expected and "init_images" not in params and "randn_source" not in params
    assert params["prompt"] == "a cat" and params["seed"] == 123 and params["sampler_name"] is None
    assert params["sampler_index"] == "Euler" and params["cfg_scale"] == 7.0 and params["enable_hr"] is False
    assert params["override_settings_restore_afterwards"] is True and params["alwayson_scripts"] == {}


def test_txt2img_api_defaults_and_lenient_types(client, monkeypatch):
    """A1111's API defaults (steps 50, Euler) and pydantic v1 coercion; unknown fields ignored."""
    seen = {}
    real = app_module.generate

    def spy(model, params, **kw):
        seen["params"] = params
        return real(model, schema.resolve(params.request.replace(steps=2)), **kw)
    monkeypatch.setattr(app_module, "generate", spy)
    r = client.post(f"{API}/txt2img", json={"width": "64", "height": 64.0, "seed": 7.9, "cfg_scale": 5,
                                             "send_images": "true", "guidance_scale": 3, "hires_fix": True,
                                             "styles": None})
    assert r.status_code == 200, r.text
    p = seen["params"]
    assert (p.steps, p.sampler_name, p.width, p.height, p.seed, p.cfg_scale) == (50, "Euler", 64, 64, 7, 5.0)
    params = r.json()["parameters"]
    assert params["steps"] == 50 and params["cfg_scale"] == 5.0 and isinstance(params["cfg_scale"], float)
    assert "guidance_scale" not in params and "hires_fix" not in params


def test_batch_and_n_iter_seeds(client):
    body = txt2img(client, seed=1000, batch_size=2, n_iter=2)
    assert body["info"]["all_seeds"] == [1000, 1001, 1002, 1003]
    assert len(body["images"]) == 4
    seeds = [infotext.parse_infotext(decode(b).info["parameters"])["Seed"] for b in body["images"]]
    assert seeds == ["1000", "1001", "1002", "1003"]


def test_random_seed_and_send_images_false(client):
    body = txt2img(client, seed=-1, send_images=False)
    assert body["images"] == []
    assert 0 <= body["info"]["seed"] <= 4294967293
    assert body["parameters"]["seed"] == -1


def test_old_sampler_names_and_lowercase_scheduler(client):
    info = txt2img(client, sampler_name="DPM++ 2M Karras", seed=1)["info"]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in info["infotexts"][0]
    info = txt2img(client, sampler_name="Euler a", scheduler="automatic", sampler_index="DDIM", seed=1)["info"]
    assert info["sampler_name"] == "Euler a"  # sampler_name wins over sampler_index


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix(client, upscaler):
    body = txt2img(client, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.6, seed=3,
                   hr_upscaler=upscaler)
    assert decode(body["images"][0]).size == (96, 96)
    info = body["info"]
    assert info["width"] == 64 and info["denoising_strength"] == 0.6
    assert "Hires upscale: 1.5" in info["infotexts"][0] and f"Hires upscaler: {upscaler}" in info["infotexts"][0]


def test_legacy_firstphase_size(client):
    body = txt2img(client, enable_hr=True, firstphase_width=64, firstphase_height=64, width=80, height=96, seed=3)
    assert decode(body["images"][0]).size == (80, 96) and body["info"]["width"] == 64


def test_denoising_strength_not_in_plain_txt2img_infotext(client):
    """webuiapi sends denoising_strength 0.7 on every txt2img call; without hires it must not show."""
    info = txt2img(client, denoising_strength=0.7, seed=2)["info"]
    assert "Denoising strength" not in info["infotexts"][0] and info["denoising_strength"] is None


def test_infotext_field_fills_unset_fields(client):
    text = "a dog\nNegative prompt: ugly\nSteps: 2, Sampler: Euler a, CFG scale: 5, Seed: 77, Size: 64x64"
    body = txt2img(client, infotext=text, steps=None, width=None, height=None, cfg_scale=9)
    info = body["info"]
    assert (info["prompt"], info["negative_prompt"], info["seed"], info["steps"]) == ("a dog", "ugly", 77, 2)
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 9.0  # set fields win


def test_infotext_field_eta_entries_are_the_eta_options(client):
    """A1111 reads `Eta` as the eta_ancestral option and `Eta DDIM` as eta_ddim (override_settings), not as
    the request's eta: each applies only to a sampler of its kind."""
    text = "a dog\nSteps: 2, Sampler: Euler a, Seed: 7, Size: 64x64"
    def line(extra):
        return txt2img(client, infotext=text + extra, steps=None, width=None, height=None)["info"]["infotexts"][0]
    assert "Eta: 0.6" in line(", Eta: 0.6")
    assert "Eta" not in line(", Eta DDIM: 0.3")  # DDIM's option does not reach Euler a


def test_infotext_field_sets_hires_by_a1111s_checkbox_rule():
    """A1111 ticks Hires. fix from an infotext only with "Denoising strength" and one of the hires keys."""
    from server.a1111 import Txt2ImgRequest
    base = "a dog\nSteps: 2, Sampler: Euler a, Seed: 7, Size: 64x64"
    cases = {", Denoising strength: 0.5, Hires resize: 96x96, Hires upscaler: Latent": True,
             ", Denoising strength: 0.5, Hires upscale: 1.5": True,
             ", Hires upscale: 1.5": False,  # no strength: A1111 leaves the checkbox off
             ", Denoising strength: 0.5": False}
    for extra, expected in cases.items():
        assert Txt2ImgRequest.from_json({"infotext": base + extra}).enable_hr is expected, extra
    assert Txt2ImgRequest.from_json({"infotext": base + ", Hires upscale: 1.5", "enable_hr": True}).enable_hr


def test_infotext_field_restores_what_a1111s_paste_gives():
    """Each field the body leaves empty takes the value A1111's paste gives, typed: samplers split from an old
    combined name, an unknown or missing sampler is A1111's first, "Use same sampler" leaves the hires one
    empty; fields the infotext does not name stay unset."""
    from server.a1111 import Txt2ImgRequest
    def shared(text, **body):
        return Txt2ImgRequest.from_json({"infotext": text, **body}).shared
    got = shared("a dog\nSteps: 2, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 77, Size: 64x48, "
                 "Tiling: True, Hires sampler: Use same sampler, Hires schedule type: Use same scheduler")
    assert got == {"prompt": "a dog", "negative_prompt": "", "seed": 77, "sampler_name": "DPM++ 2M",
                   "scheduler": "karras", "steps": 2, "cfg_scale": 5.0, "tiling": True, "width": 64,
                   "height": 48, "enable_hr": False}
    assert [type(got[k]) for k in ("steps", "cfg_scale", "seed")] == [int, float, int]
    got = shared("a dog\nSteps: 2, Sampler: Euler Dy, Seed: 7, Hires sampler: DPM++ SDE Exponential, "
                 "Denoising strength: 0.4, Hires upscale: 1.5", steps=3)
    assert (got["sampler_name"], got["scheduler"], got["steps"]) == ("DPM++ 2M", "automatic", 3)
    assert (got["hr_sampler_name"], got["hr_scheduler"], got["hr_scale"]) == ("DPM++ SDE", "exponential", 1.5)
    got = shared("a dog\nSteps: 2, Seed: 7, Size: 64x64")  # no Sampler: A1111's paste gives its first
    assert got["sampler_name"] == "DPM++ 2M"
    assert "hr_scale" not in got and "hr_resize_x" not in got and "denoising_strength" not in got


def test_infotext_field_restores_the_inpainting_words_it_names():
    """img2img: "Inpaint area", "Masked area padding", "Masked content", "Mask mode" are words; when the
    infotext does not name them, the API's defaults stay (not the parser's fill-ins)."""
    from server.a1111 import Img2ImgRequest
    base = "a cat\nSteps: 2, Sampler: Euler a, Seed: 7, Size: 64x64, Denoising strength: 0.6, Mask blur: 8"
    req = Img2ImgRequest.from_json({"init_images": ["x"], "infotext": base + ", Inpaint area: Only masked, "
                                    "Masked area padding: 16, Masked content: latent noise, Mask mode: "
                                    "Inpaint not masked"})
    assert (req.inpaint_full_res, req.inpaint_full_res_padding, req.inpainting_fill) == (True, 16, 2)
    assert (req.inpainting_mask_invert, req.mask_blur, req.denoising_strength) == (1, 8, 0.6)
    req = Img2ImgRequest.from_json({"init_images": ["x"], "infotext": base, "inpainting_fill": 3})
    assert (req.inpaint_full_res, req.inpaint_full_res_padding, req.inpainting_fill) == (True, 0, 3)
    assert req.inpainting_mask_invert == 0 and "inpaint_full_res" not in req.shared
    assert "enable_hr" not in req.shared  # not an img2img field


def test_img2img(client):
    data_url = "data:image/png;base64," + png_b64((80, 72))
    r = client.post(f"{API}/img2img", json={"init_images": [data_url], "denoising_strength": 0.5, "seed": 9,
                                             "prompt": "a red square", **SMALL})
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert info["denoising_strength"] == 0.5 and "Denoising strength: 0.5" in info["infotexts"][0]
    assert decode(body["images"][0]).size == (64, 64)
    assert body["parameters"]["init_images"] is None and body["parameters"]["mask"] is None
    assert body["parameters"]["inpaint_full_res"] is True and body["parameters"]["resize_mode"] == 0


def test_img2img_inpainting_with_mask_and_echo(client):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    mask_b64 = base64.b64encode(buf.getvalue()).decode()
    init = png_b64()
    r = client.post(f"{API}/img2img", json={"init_images": [init], "mask": mask_b64, "include_init_images": True,
                                             "inpainting_fill": 1, "seed": 4, **SMALL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"]["init_images"] == [init] and body["parameters"]["mask"] == mask_b64
    text = json.loads(body["info"])["infotexts"][0]
    assert "Mask blur: 4" in text and "Inpaint area: Only masked" in text


def test_seed_document_payload(client, monkeypatch):
    """The seed document's exact request (512×512, 20 steps) maps onto the pipeline unchanged; the
    pipeline is stubbed here because the real job is too slow for CI."""
    from sd15.pipeline import Result

    seen = {}

    def stub(model, params, **kw):
        seen["params"] = params
        image = Image.new("RGB", (params.width, params.height), (1, 2, 3))
        return Result(images=[image], seeds=[5], subseeds=[6], infotexts=["a beautiful cat\nSteps: 20"],
                      info={"seed": 5, "infotexts": ["a beautiful cat\nSteps: 20"]})
    monkeypatch.setattr(app_module, "generate", stub)
    r = client.post(f"{API}/options", json={"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors"})
    assert r.status_code == 200 and r.json() is None
    r = client.post(f"{API}/txt2img", json={"prompt": "a beautiful cat", "steps": 20, "width": 512, "height": 512})
    assert r.status_code == 200
    p = seen["params"]
    assert (p.prompt, p.steps, p.width, p.height) == ("a beautiful cat", 20, 512, 512)
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.size == (512, 512) and image.info["parameters"] == "a beautiful cat\nSteps: 20"


# --------------------------------------------------------------------------------------------------
# queue, progress, interrupt, skip
# --------------------------------------------------------------------------------------------------

def test_progress_idle(client):
    r = client.get(f"{API}/progress")
    assert r.status_code == 200
    body = r.json()
    assert body["progress"] == 0.0 and body["eta_relative"] == 0.0 and body["current_image"] is None
    assert set(body["state"]) == {"skipped", "interrupted", "stopping_generation", "job", "job_count",
                                  "job_timestamp", "job_no", "sampling_step", "sampling_steps"}
    assert body["state"]["job_count"] == 0 and body["state"]["job"] == ""


def test_concurrent_requests_each_get_their_seed(client):
    seeds = [11, 22, 33, 44]
    results = {}

    def run(seed):
        results[seed] = client.post(f"{API}/txt2img", json={"seed": seed, "prompt": f"p{seed}", **SMALL})
    threads = [threading.Thread(target=run, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(results) == seeds
    for seed, r in results.items():
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["seed"] == seed and info["prompt"] == f"p{seed}"
        assert f"Seed: {seed}," in decode(r.json()["images"][0]).info["parameters"]


def test_interrupt_returns_partial_result_with_200(client):
    out = {}
    t = threading.Thread(target=lambda: out.update(r=client.post(
        f"{API}/txt2img", json={"prompt": "long", "seed": 5, "width": 64, "height": 64, "steps": 400})))
    t.start()
    try:
        # poll until a live preview has been decoded (every 10 steps, only while someone polls)
        p = wait_for(lambda: (lambda b: b if b["current_image"] else None)(client.get(f"{API}/progress").json()),
                     what="a live preview")
        state = p["state"]
        assert state["job"] == "scripts_txt2img" and state["job_count"] == 1 and state["sampling_steps"] == 400
        assert 0.01 < p["progress"] < 1.0 and p["eta_relative"] > 0
        # A1111's default "Approx NN" without its weights file: "Approx cheap", one pixel per latent cell
        assert decode(p["current_image"]).size == (8, 8)
        assert client.get(f"{API}/progress?skip_current_image=true").json()["current_image"] is None
        r = client.post(f"{API}/interrupt")
        assert r.status_code == 200 and r.json() == {}
    finally:
        t.join(120)
    r = out["r"]
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1 and decode(r.json()["images"][0]).size == (64, 64)
    assert json.loads(r.json()["info"])["steps"] == 400
    idle = client.get(f"{API}/progress").json()
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0
    assert idle["state"]["job_timestamp"] != "0"


def test_skip_keeps_the_partial_batch_and_moves_on(client):
    out = {}
    t = threading.Thread(target=lambda: out.update(r=client.post(
        f"{API}/txt2img", json={"seed": 8, "n_iter": 2, "width": 64, "height": 64, "steps": 200})))
    t.start()
    try:
        wait_for(lambda: client.get(f"{API}/progress").json()["state"]["sampling_step"] >= 1, what="step 1")
        p = client.get(f"{API}/progress").json()
        assert p["state"]["job"] == "Batch 1 out of 2" and p["state"]["job_count"] == 2
        assert client.post(f"{API}/skip").json() is None
        wait_for(lambda: client.get(f"{API}/progress").json()["state"]["job_no"] == 1, what="batch 2")
        client.post(f"{API}/interrupt")
    finally:
        t.join(120)
    # A1111: the skipped batch returns its partly sampled image, the interrupted one too
    assert out["r"].status_code == 200 and len(out["r"].json()["images"]) == 2


def test_interrupt_and_skip_when_idle(client):
    assert client.post(f"{API}/interrupt").json() == {}
    assert client.post(f"{API}/skip").json() is None
    txt2img(client, seed=1)  # the next job is not affected


def test_unexpected_exception_is_json_500_and_server_lives(client, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("boom")
    monkeypatch.setattr(app_module, "generate", boom)
    r = client.post(f"{API}/txt2img", json=SMALL)
    assert r.status_code == 500
    assert r.json() == {"error": "RuntimeError", "detail": "", "body": "", "errors": "boom"}
    monkeypatch.undo()
    txt2img(client, seed=1)
    assert client.get(f"{API}/progress").json()["state"]["job_count"] == 0


# --------------------------------------------------------------------------------------------------
# models, VAEs, options
# --------------------------------------------------------------------------------------------------

def test_sd_models_titles_and_hashes(client, folders):
    models = client.get(f"{API}/sd-models").json()
    assert [m["model_name"] for m in models] == ["sub_other", "v1-5-pruned-emaonly"]  # VAE/Lora/... not listed
    default = models[1]
    assert default["sha256"] == hashing.model_hash(default["filename"])  # hashed when it was loaded
    assert default["hash"] == default["sha256"][:10]
    assert default["title"] == f"v1-5-pruned-emaonly.safetensors [{default['hash']}]"
    assert default["filename"] == os.path.join(folders["ckpt_dir"], "v1-5-pruned-emaonly.safetensors")
    assert default["config"] is None
    opts = client.get(f"{API}/options").json()
    assert opts["sd_model_checkpoint"] == default["title"] and opts["sd_checkpoint_hash"] == default["sha256"]
    assert os.path.isfile(os.path.join(folders["ckpt_dir"], hashing.HASH_CACHE_NAME))


def test_hashes_are_cached_beside_the_files(client, folders, monkeypatch):
    """A fresh listing (a restart) reads the hash from the cache instead of hashing the file again."""
    from server.models import Library

    def no_hashing(path):
        raise AssertionError(f"{path} hashed again")
    monkeypatch.setattr(hashing, "model_hash", no_hashing)
    lib = Library(folders["ckpt_dir"], folders["vae_dir"], folders["lora_dir"], folders["embeddings_dir"])
    c = lib.find_checkpoint("v1-5-pruned-emaonly.safetensors")
    assert c.sha256 and c.title.endswith(f"[{c.sha256[:10]}]")


@pytest.mark.parametrize("alias", ["sub/other.safetensors", "other", "sub_other", "title", "legacy", "path"])
def test_switch_model_by_any_alias(fresh, alias):
    client = fresh
    other = next(m for m in client.get(f"{API}/sd-models").json() if m["model_name"] == "sub_other")
    name = {"title": other["title"], "path": other["filename"],
            "legacy": hashing.legacy_model_hash(other["filename"])}.get(alias, alias)
    r = client.post(f"{API}/options", json={"sd_model_checkpoint": name})
    assert r.status_code == 200 and r.json() is None
    opts = client.get(f"{API}/options").json()
    other = next(m for m in client.get(f"{API}/sd-models").json() if m["model_name"] == "sub_other")
    assert other["sha256"] and opts["sd_model_checkpoint"] == f"sub/other.safetensors [{other['hash']}]"
    assert opts["sd_checkpoint_hash"] == other["sha256"]
    info = txt2img(client, seed=1)["info"]
    assert info["sd_model_name"] == "other" and info["sd_model_hash"] == other["hash"]
    # once hashed, the short and the full hash name it too
    for name in (other["hash"], other["sha256"], f"other [{other['hash']}]"):
        assert client.post(f"{API}/options", json={"sd_model_checkpoint": name}).status_code == 200


@pytest.mark.parametrize("name", ["nope.safetensors", "../v1-5-pruned-emaonly.safetensors",
                                  "/etc/passwd", "OTHER", "sub\\other.safetensors", "VAE/tiny-vae.safetensors"])
def test_switch_to_unknown_model_is_400_and_changes_nothing(fresh, name):
    client = fresh
    before = client.get(f"{API}/options").json()
    r = client.post(f"{API}/options", json={"sd_model_checkpoint": name, "CLIP_stop_at_last_layers": 2})
    assert r.status_code == 400
    assert r.json()["error"] == "HTTPException" and f"model '{name}' not found" in r.json()["detail"]
    assert client.get(f"{API}/options").json() == before


def test_override_settings_model_is_restored_afterwards(fresh):
    client = fresh
    title = client.get(f"{API}/options").json()["sd_model_checkpoint"]
    info = txt2img(client, seed=1, override_settings={"sd_model_checkpoint": "other", "CLIP_stop_at_last_layers": 2,
                                                      "not_an_option": 1})["info"]
    assert info["sd_model_name"] == "other" and "Clip skip: 2" in info["infotexts"][0]
    assert client.get(f"{API}/options").json()["sd_model_checkpoint"] == title
    assert txt2img(client, seed=1)["info"]["sd_model_name"] == "v1-5-pruned-emaonly"
    # not an exact alias: silently dropped, as A1111 does
    assert txt2img(client, seed=1, override_settings={"sd_model_checkpoint": "nope"})["info"]["sd_model_name"] \
        == "v1-5-pruned-emaonly"


def test_override_settings_kept_when_not_restoring(fresh):
    client = fresh
    txt2img(client, seed=1, override_settings={"eta_noise_seed_delta": 31337},
            override_settings_restore_afterwards=False)
    assert client.get(f"{API}/options").json()["eta_noise_seed_delta"] == 31337


ETA_OPTIONS = {"eta_ddim": 0.3, "eta_ancestral": 0.7}


@pytest.mark.parametrize("body, eta", [
    ({"sampler_name": "DDIM"}, 0.3), ({"sampler_name": "PLMS"}, 0.3), ({"sampler_name": "UniPC"}, 0.3),
    ({"sampler_name": "", "sampler_index": "DDIM"}, 0.3), ({"sampler_name": "Euler a"}, 0.7),
    ({"sampler_name": "DPM++ 2S a", "scheduler": "Karras"}, 0.7), ({"sampler_name": "DDIM", "eta": 0.5}, 0.5),
])
def test_empty_eta_means_the_option_of_the_resolved_sampler(body, eta):
    """A1111: an empty `eta` is `eta_ddim` for DDIM/PLMS/UniPC (the timestep samplers), else `eta_ancestral`;
    the choice is made from the sampler the request resolved to."""
    req = a1111.Txt2ImgRequest.from_json(body)
    resolved = a1111.check(req, Limits(), ETA_OPTIONS)
    assert resolved.sampler.name == (body["sampler_name"] or body["sampler_index"])
    assert resolved.eta_of(resolved.sampler) == eta


@pytest.mark.parametrize("sampler, option, entry", [
    ("DDIM", {"eta_ddim": 0.3}, "Eta DDIM: 0.3"), ("Euler a", {"eta_ancestral": 0.7}, "Eta: 0.7"),
    ("DDIM", {"eta_ancestral": 0.7}, None), ("Euler a", {"eta_ddim": 0.3}, None),
])
def test_eta_options_reach_the_sampler(client, sampler, option, entry):
    text = txt2img(client, seed=1, sampler_name=sampler, override_settings=option)["info"]["infotexts"][0]
    assert (entry in text) if entry else ("Eta" not in text), text


def test_hires_pass_takes_its_own_eta_option(fresh):
    """A DDIM first pass takes `eta_ddim`, an Euler a hires pass `eta_ancestral` (set with POST /options)."""
    client = fresh
    assert client.post(f"{API}/options", json={"eta_ddim": 0.3, "eta_ancestral": 0.6}).status_code == 200
    info = txt2img(client, seed=1, sampler_name="DDIM", enable_hr=True, hr_sampler_name="Euler a",
                   hr_scale=1.5, denoising_strength=0.5)["info"]
    assert info["infotexts"][0].endswith(", Eta DDIM: 0.3, Eta: 0.6, Version: v1.10.1")
    assert (info["extra_generation_params"]["Eta DDIM"], info["extra_generation_params"]["Eta"]) == (0.3, 0.6)


def test_emphasis_option_changes_the_image_and_is_written(fresh):
    """A1111's `emphasis` option (set with POST /options, override_settings or the `infotext` field) encodes
    the prompt; the infotext names a mode other than "Original" when a prompt has "(" or "["; a bad mode is a
    422 naming the modes."""
    client = fresh
    kw = dict(seed=3, prompt="a (cat:1.5)", sampler_name="Euler a")

    def pixels(**more):
        body = txt2img(client, **kw, **more)
        return np.asarray(decode(body["images"][0])), body["info"]["infotexts"][0]

    original, text = pixels()
    assert "Emphasis" not in text
    assert client.post(f"{API}/options", json={"emphasis": "No norm"}).status_code == 200
    no_norm, text = pixels()
    assert not np.array_equal(no_norm, original) and ", Emphasis: No norm, " in text
    assert np.array_equal(pixels(override_settings={"emphasis": "Original"})[0], original)
    assert client.post(f"{API}/options", json={"emphasis": "Original"}).status_code == 200
    assert np.array_equal(pixels(override_settings={"emphasis": "No norm"})[0], no_norm)
    assert np.array_equal(pixels(infotext="a (cat:1.5)\nSteps: 2, Seed: 3, Emphasis: No norm")[0], no_norm)
    r = client.post(f"{API}/options", json={"emphasis": "Loud"})
    assert r.status_code == 422 and "must be one of: Original, No norm, Ignore, None" in r.text, r.text
    r = client.post(f"{API}/txt2img", json={**SMALL, "override_settings": {"emphasis": "Loud"}})
    assert r.status_code == 422 and "must be one of: Original, No norm, Ignore, None" in r.text, r.text


@pytest.mark.parametrize("option, entry", [
    ({"sigma_max": 5.0}, "Schedule max sigma: 5.0"), ({"rho": 3.0}, "Schedule rho: 3.0"),
    ({"always_discard_next_to_last_sigma": True}, "Discard penultimate sigma: True"),
    ({"skip_early_cond": 0.5}, "Skip Early CFG: 0.5"),
    ({"s_min_uncond": 100.0, "s_min_uncond_all": True}, "NGMS: 100.0, NGMS all steps: True"),
])
def test_schedule_and_cfg_skip_options_change_the_image_and_are_written(fresh, option, entry):
    """A1111's schedule and CFG-skip options, set with override_settings, POST /options or the `infotext`
    field, change the numbers and are written as A1111 writes them."""
    client = fresh
    kw = dict(seed=3, prompt="a cat", sampler_name="Euler", scheduler="Karras")

    def pixels(**more):
        body = txt2img(client, **kw, **more)
        return np.asarray(decode(body["images"][0])), body["info"]["infotexts"][0]

    plain, text = pixels()
    assert entry.split(":")[0] not in text
    changed, text = pixels(override_settings=option)
    assert not np.array_equal(changed, plain) and f", {entry}, Version" in text, text
    assert np.array_equal(pixels(infotext=f"a cat\nSteps: 2, Seed: 3, {entry}")[0], changed)
    assert client.post(f"{API}/options", json=option).status_code == 200
    assert np.array_equal(pixels()[0], changed)


def test_every_settings_field_is_read_from_its_option():
    """`to_request` takes each schema settings field from A1111's option of that name (clip skip's is
    CLIP_stop_at_last_layers); a bad value is the schema's 422."""
    settings = {"sigma_min": 0.1, "sigma_max": 9.0, "rho": 2.0, "beta_dist_alpha": 0.3, "beta_dist_beta": 0.4,
                "always_discard_next_to_last_sigma": True, "skip_early_cond": 0.2, "s_min_uncond_all": True,
                "comma_padding_backtrack": 5, "CLIP_stop_at_last_layers": 2}
    req = a1111.to_request(a1111.Txt2ImgRequest.from_json({}), settings)
    assert {name: getattr(req, name) for name in a1111.SETTING_OPTIONS if a1111.SETTING_OPTIONS[name] in settings} \
        == {**{k: v for k, v in settings.items() if k != "CLIP_stop_at_last_layers"}, "clip_skip": 2}
    with pytest.raises(a1111.ValidationError, match="skip_early_cond"):
        a1111.check(a1111.Txt2ImgRequest.from_json({}), Limits(), {"skip_early_cond": 1.5})


def test_vae_listing_and_switching(fresh, folders):
    client = fresh
    assert client.get(f"{API}/sd-vae").json() == [
        {"model_name": "tiny-vae.safetensors", "filename": os.path.join(folders["vae_dir"], "tiny-vae.safetensors")}]
    assert client.post(f"{API}/options", json={"sd_vae": "tiny-vae.safetensors"}).status_code == 200
    assert client.get(f"{API}/options").json()["sd_vae"] == "tiny-vae.safetensors"
    info = txt2img(client, seed=1)["info"]
    assert info["sd_vae_name"] == "tiny-vae.safetensors" and "VAE: tiny-vae.safetensors" in info["infotexts"][0]
    for bad in ("nope.pt", "../VAE/tiny-vae.safetensors", folders["vae_dir"] + "/tiny-vae.safetensors"):
        assert client.post(f"{API}/options", json={"sd_vae": bad}).status_code == 400
    assert client.post(f"{API}/options", json={"sd_vae": "Automatic"}).status_code == 200
    info = txt2img(client, seed=1)["info"]
    assert info["sd_vae_name"] is None and "VAE:" not in info["infotexts"][0]
    # override_settings: a VAE that is not there and a read-only key are dropped (and logged), the rest applies
    info = txt2img(client, seed=1, override_settings={"sd_vae": "nope.pt", "sd_checkpoint_hash": "x",
                                                      "CLIP_stop_at_last_layers": 2})["info"]
    assert info["sd_vae_name"] is None and "Clip skip: 2" in info["infotexts"][0]
    info = txt2img(client, seed=1, override_settings={"sd_vae": "tiny-vae.safetensors"})["info"]
    assert info["sd_vae_name"] == "tiny-vae.safetensors"


def test_options_get_and_set(fresh):
    client = fresh
    opts = client.get(f"{API}/options").json()
    assert opts["CLIP_stop_at_last_layers"] == 1.0 and isinstance(opts["CLIP_stop_at_last_layers"], float)
    assert opts["eta_noise_seed_delta"] == 0 and isinstance(opts["eta_noise_seed_delta"], int)
    assert opts["sd_vae"] == "Automatic" and opts["samples_format"] == "png"
    r = client.post(f"{API}/options", json={"CLIP_stop_at_last_layers": 2.0, "randn_source": "CPU",
                                            "sd_checkpoint_hash": "ignored"})
    assert r.status_code == 200 and r.json() is None
    assert client.get(f"{API}/options").json()["CLIP_stop_at_last_layers"] == 2.0
    text = txt2img(client, seed=1)["info"]["infotexts"][0]
    assert "Clip skip: 2" in text and "RNG: CPU" in text
    # posting the whole GET answer back is fine
    assert client.post(f"{API}/options", json=client.get(f"{API}/options").json()).status_code == 200


def test_refresh_checkpoints_sees_new_files(fresh, folders):
    client = fresh
    path = os.path.join(folders["ckpt_dir"], "late.safetensors")
    os.link(os.path.join(folders["ckpt_dir"], "sub", "other.safetensors"), path)
    try:
        assert "late" not in [m["model_name"] for m in client.get(f"{API}/sd-models").json()]
        assert client.post(f"{API}/refresh-checkpoints").json() is None
        assert "late" in [m["model_name"] for m in client.get(f"{API}/sd-models").json()]
    finally:
        os.remove(path)
        client.post(f"{API}/refresh-checkpoints")


def test_switch_to_a_broken_file_is_400_and_keeps_the_model(fresh, folders):
    client = fresh
    path = os.path.join(folders["ckpt_dir"], "broken.safetensors")
    with open(path, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    try:
        client.post(f"{API}/refresh-checkpoints")
        before = client.get(f"{API}/options").json()["sd_model_checkpoint"]
        r = client.post(f"{API}/options", json={"sd_model_checkpoint": "broken.safetensors"})
        assert r.status_code == 400 and "not a safetensors file" in r.json()["detail"]
        assert client.get(f"{API}/options").json()["sd_model_checkpoint"] == before
        assert txt2img(client, seed=1)["info"]["sd_model_name"] == "v1-5-pruned-emaonly"
    finally:
        os.remove(path)
        client.post(f"{API}/refresh-checkpoints")


def test_setting_the_loaded_model_does_not_wait_for_the_queue(client):
    """The seed client posts the current model before every job: that must not queue behind a long job,
    while a real switch waits for it."""
    out = {}
    t = threading.Thread(target=lambda: out.update(r=client.post(f"{API}/txt2img", json={**SMALL, "steps": 400})))
    t.start()
    try:
        wait_for(lambda: client.get(f"{API}/progress").json()["state"]["sampling_step"] >= 1, what="step 1")
        r = client.post(f"{API}/options", json={"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors"})
        assert r.status_code == 200
        assert client.get(f"{API}/progress").json()["state"]["job_count"] == 1  # still running
    finally:
        client.post(f"{API}/interrupt")
        t.join(120)
    assert out["r"].status_code == 200


def test_unload_and_reload_checkpoint(client):
    assert client.post(f"{API}/unload-checkpoint").json() == {}
    txt2img(client, seed=1)  # loads it again
    assert client.post(f"{API}/reload-checkpoint").json() == {}


# --------------------------------------------------------------------------------------------------
# listings
# --------------------------------------------------------------------------------------------------

def test_samplers_and_schedulers(client):
    samplers = client.get(f"{API}/samplers").json()
    assert [s["name"] for s in samplers] == list(SAMPLERS)  # only what runs
    assert samplers[0] == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}
    assert {"name": "Heun", "aliases": ["k_heun"], "options": {"second_order": "True"}} in samplers
    schedulers = client.get(f"{API}/schedulers").json()
    assert schedulers[0] == {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
                             "need_inner_model": False}
    assert [s["name"] for s in schedulers][:3] == ["automatic", "uniform", "karras"]


@pytest.mark.parametrize("sampler", ["LCM", "DDIM CFG++"])
def test_every_listed_sampler_runs(client, sampler):
    body = txt2img(client, sampler_name=sampler, seed=3)
    assert f"Sampler: {sampler}, " in body["info"]["infotexts"][0]


def test_upscalers_and_latent_modes(client):
    ups = client.get(f"{API}/upscalers").json()
    assert [u["name"] for u in ups] == ["None", "Lanczos", "Nearest"]
    assert set(ups[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    modes = client.get(f"{API}/latent-upscale-modes").json()
    assert modes[0] == {"name": "Latent"} and len(modes) == 6


def test_loras_and_embeddings(client, folders):
    loras = client.get(f"{API}/loras").json()
    path = os.path.join(folders["lora_dir"], "style.safetensors")
    assert loras == [{"name": "style", "alias": "my_style", "path": path,
                      "metadata": {"ss_output_name": "my_style", "ss_tag_frequency": {"cat": 3}}}]
    assert client.post(f"{API}/refresh-loras").json() is None
    emb = client.get(f"{API}/embeddings").json()
    assert emb == {"loaded": {"neg": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                      "shape": 64, "vectors": 2},
                              "old": {"step": 500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model",
                                      "shape": 64, "vectors": 3}}, "skipped": {}}
    assert client.post(f"{API}/refresh-embeddings").json() is None


@pytest.mark.parametrize("name,shape", [("prompt-styles", []), ("face-restorers", []), ("realesrgan-models", []),
                                        ("hypernetworks", []), ("extensions", [])])
def test_empty_endpoints(client, name, shape):
    r = client.get(f"{API}/{name}")
    assert r.status_code == 200 and r.json() == shape


def test_memory_and_cmd_flags(client):
    mem = client.get(f"{API}/memory").json()
    assert set(mem) == {"ram", "cuda"}
    assert mem["ram"]["total"] >= mem["ram"]["used"] > 0
    if not torch.cuda.is_available():
        assert mem["cuda"] == {"error": "unavailable"}
    assert client.get(f"{API}/cmd-flags").json() == {"port": 7860, "api_auth": None}


def test_png_info(client):
    body = txt2img(client, prompt="a (cat:1.2)", seed=42)
    r = client.post(f"{API}/png-info", json={"image": "data:image/png;base64," + body["images"][0]})
    assert r.status_code == 200
    out = r.json()
    assert out["info"] == body["info"]["infotexts"][0]
    assert out["parameters"]["Seed"] == "42" and out["parameters"]["Prompt"] == "a (cat:1.2)"
    assert out["parameters"]["Size-1"] == "64" and out["items"] == {}
    request = out["request"]  # the fields the infotext restores (not in A1111)
    assert (request["prompt"], request["seed"], request["width"]) == ("a (cat:1.2)", 42, 64)
    # an image without infotext, with another text chunk
    from PIL.PngImagePlugin import PngInfo
    meta = PngInfo()
    meta.add_text("Comment", "hello")
    out = client.post(f"{API}/png-info", json={"image": png_b64(pnginfo=meta)}).json()
    assert out["info"] == "" and out["items"] == {"Comment": "hello"} and out["parameters"]["Prompt"] == ""
    assert client.post(f"{API}/png-info", json={"image": ""}).json() == {"info": "", "items": {}, "parameters": {}}


def test_png_info_override_settings(client):
    """The settings an infotext carries, typed as their options, as A1111's "Override settings" offers them;
    A1111's parse adds Clip skip 1, RNG GPU and Schedule min/max sigma 0 when the text has none."""
    from PIL.PngImagePlugin import PngInfo
    meta = PngInfo()
    meta.add_text("parameters", "a cat\nSteps: 2, Seed: 1, Schedule rho: 3, ENSD: 31337, Eta DDIM: 0.25, "
                                "Emphasis: No norm, Discard penultimate sigma: True, NGMS all steps: True")
    out = client.post(f"{API}/png-info", json={"image": png_b64(pnginfo=meta)}).json()
    assert out["override_settings"] == {
        "rho": 3.0, "eta_noise_seed_delta": 31337, "eta_ddim": 0.25, "emphasis": "No norm",
        "always_discard_next_to_last_sigma": True, "s_min_uncond_all": True,
        "CLIP_stop_at_last_layers": 1, "randn_source": "GPU", "sigma_min": 0.0, "sigma_max": 0.0}
    assert [type(out["override_settings"][k]) for k in ("rho", "eta_noise_seed_delta")] == [float, int]
    labels = out["override_labels"]
    assert labels["rho"] == "Schedule rho" and labels["eta_ddim"] == "Eta DDIM"
    assert labels["sigma_min"] == "Schedule min sigma"
    assert set(out["override_labels"]) == set(out["override_settings"])


def test_png_info_reads_jpeg_exif_user_comment(client):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + "a cat\nSteps: 20, Sampler: Euler, Seed: 9".encode("utf-16-be")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="JPEG", exif=exif)
    out = client.post(f"{API}/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()}).json()
    assert out["info"] == "a cat\nSteps: 20, Sampler: Euler, Seed: 9" and out["parameters"]["Seed"] == "9"


def test_png_info_prefers_a_non_empty_exif_user_comment_to_the_png_text(client):
    """A1111's `read_info_from_image`: the EXIF UserComment, when there is one, wins over `parameters`."""
    from PIL.PngImagePlugin import PngInfo
    meta = PngInfo()
    meta.add_text("parameters", "from the text chunk")
    for comment, want in [("from exif", "from exif"), ("", "from the text chunk")]:
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + comment.encode("utf-16-be")
        buf = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buf, format="PNG", pnginfo=meta, exif=exif.tobytes())
        out = client.post(f"{API}/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()}).json()
        assert out["info"] == want


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_samples_format_encodes_the_images_with_the_infotext(fresh):
    png = txt2img(fresh, prompt="a cat", seed=5)
    assert decoded(png["images"][0]).format == "PNG"
    pixels = np.asarray(decoded(png["images"][0]).convert("RGB"))
    sizes = {}
    for fmt, quality, lossless, kind in [("jpg", 30, False, "JPEG"), ("jpeg", 95, False, "JPEG"),
                                         ("webp", 80, True, "WEBP"), ("webp", 80, False, "WEBP")]:
        opts = {"samples_format": fmt, "jpeg_quality": quality, "webp_lossless": lossless}
        assert fresh.post(f"{API}/options", json=opts).status_code == 200
        body = txt2img(fresh, prompt="a cat", seed=5)
        image = decoded(body["images"][0])
        assert image.format == kind
        sizes[fmt, quality, lossless] = len(base64.b64decode(body["images"][0]))
        if kind == "WEBP":  # lossless keeps every pixel, lossy does not
            assert np.array_equal(np.asarray(image.convert("RGB")), pixels) == lossless
        out = fresh.post(f"{API}/png-info", json={"image": body["images"][0]}).json()
        assert out["info"] == body["info"]["infotexts"][0] == png["info"]["infotexts"][0]
    assert sizes["jpg", 30, False] < sizes["jpeg", 95, False]
    r = fresh.post(f"{API}/options", json={"samples_format": "gif"})
    assert r.status_code == 422 and "must be one of: png, jpg, jpeg, webp" in r.text


def test_openapi(client):
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    assert set(paths[f"{API}/options"]) == {"get", "post"}
    assert f"{API}/loras" in paths and f"{API}/scripts" in paths and f"{API}/memory" in paths
    ref = paths[f"{API}/txt2img"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    props = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    assert props["steps"] == {"type": "integer", "default": 50, "minimum": 1, "maximum": Limits().max_steps}
    sampler = props["sampler_name"]
    assert sampler["type"] == "string" and sampler["nullable"] and sampler["default"] is None
    assert {"Euler a", "DPM++ 2M", "k_euler_a", None} <= set(sampler["enum"])
    assert props["styles"]["items"] == {"type": "string"}
    img = schema["components"]["schemas"]["Img2ImgRequest"]["properties"]
    assert img["denoising_strength"]["default"] == 0.75 and img["init_images"]["type"] == "array"


# --------------------------------------------------------------------------------------------------
# bad input: always a 4xx with a JSON body, and the server still answers
# --------------------------------------------------------------------------------------------------

T, I, O, P = f"{API}/txt2img", f"{API}/img2img", f"{API}/options", f"{API}/png-info"
BAD = [
    (T, {"steps": "abc"}, 422), (T, {"steps": 0}, 422), (T, {"steps": 100000}, 422), (T, {"steps": False}, 422),
    (T, {"width": 7}, 422), (T, {"width": 100000}, 422), (T, {"width": 4096, "height": 4096}, 422),
    (T, {"batch_size": 0}, 422), (T, {"batch_size": 1000}, 422), (T, {"n_iter": 0}, 422),
    (T, {"n_iter": 100, "batch_size": 16}, 422), (T, {"cfg_scale": "NaN"}, 422), (T, {"cfg_scale": "inf"}, 422),
    (T, {"seed": -2}, 422), (T, {"seed": 2**70}, 422), (T, {"subseed_strength": 2}, 422),
    (T, {"enable_hr": True, "denoising_strength": 1.5}, 422), (T, {"enable_hr": True, "hr_scale": 100}, 422),
    (T, {"enable_hr": True, "hr_scale": 8, "width": 512, "height": 512}, 422),
    (T, {"enable_hr": True, "hr_resize_x": -5}, 422), (T, {"enable_hr": True, "hr_second_pass_steps": 10**6}, 422),
    (T, {"sampler_name": "Nope"}, 400), (T, {"sampler_index": "Nope"}, 400), (T, {"scheduler": "nope"}, 400),
    (T, {"enable_hr": True, "hr_sampler_name": "Nope"}, 400), (T, {"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, 400),
    (T, {"script_name": "loopback"}, 422), (T, {"script_name": "x/y/z plot", "script_args": [33, "a"]}, 400),
    (T, {"alwayson_scripts": {"ControlNet": {"args": []}}}, 422),
    (T, {"prompt": ["a", "list"]}, 422), (T, {"styles": "not a list"}, 422), (T, {"override_settings": "x"}, 422),
    (T, {"override_settings": {"CLIP_stop_at_last_layers": 99}}, 422), (T, {"restore_faces": True}, 422),
    (T, {"eta": -1}, 422), (T, [1, 2], 422), (T, "a string", 422),
    (I, {}, 404), (I, {"init_images": []}, 404), (I, {"init_images": "not a list"}, 422),
    (I, {"init_images": ["!!!not base64!!!"]}, 400), (I, {"init_images": ["aGVsbG8gd29ybGQ="]}, 400),
    (I, {"init_images": ["http://127.0.0.1:1/x.png"]}, 400), (I, {"init_images": [png_claiming(100000, 100000)]}, 400),
    (I, {"init_images": [png_claiming(5000, 5000)]}, 400), (I, {"init_images": [png_b64()], "mask": "%%%"}, 400),
    (I, {"init_images": [png_b64()] * 3, "batch_size": 2}, 422),
    (I, {"init_images": [png_b64()], "resize_mode": 9}, 422),
    (I, {"init_images": [png_b64()], "denoising_strength": -0.1}, 422),
    (I, {"init_images": [png_b64()], "inpainting_fill": 4}, 422),
    (P, {}, 422), (P, {"image": "zzz"}, 400), (P, {"image": png_claiming(100000, 100000)}, 400), (P, {"image": 5}, 400),
    (O, {"nope": 1}, 400), (O, {"CLIP_stop_at_last_layers": "x"}, 422), (O, {"CLIP_stop_at_last_layers": 13}, 422),
    (O, {"randn_source": "XYZ"}, 422), (O, {"samples_format": "gif"}, 422), (O, {"sd_vae": "../../x"}, 400),
    (O, {"sd_model_checkpoint": 5}, 400), (O, ["sd_model_checkpoint"], 422), (O, {"eta_noise_seed_delta": -1}, 422),
]


@pytest.mark.parametrize("path,body,status", BAD, ids=[f"{i}-{p.rsplit('/', 1)[1]}" for i, (p, _, _) in enumerate(BAD)])
def test_bad_request(client, path, body, status):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    detail = r.json()
    assert detail["detail"]
    if status == 422 and isinstance(detail["detail"], list):
        assert all(set(p) == {"loc", "msg", "type"} and p["loc"][0] == "body" for p in detail["detail"])
    else:
        assert set(detail) == {"error", "detail", "body", "errors"}
    assert client.get(f"{API}/progress").status_code == 200


def test_bad_request_messages_name_the_valid_choices(client):
    r = client.post(f"{API}/txt2img", json={"sampler_name": "Eulr"})
    assert r.status_code == 400 and "Eulr" in r.json()["detail"] and "DPM++ 2M" in r.json()["detail"]
    r = client.post(f"{API}/txt2img", json={"scheduler": "karass"})
    assert "karras" in r.json()["detail"]
    r = client.post(f"{API}/txt2img", json={"steps": "x", "width": "y"})
    assert [p["loc"] for p in r.json()["detail"]] == [["body", "steps"], ["body", "width"]]
    assert r.json()["detail"][0] == {"loc": ["body", "steps"], "msg": "value is not a valid integer",
                                     "type": "type_error.integer"}


@pytest.mark.parametrize("body", [b"", b"{bad json", b"\xff\xfe", b"[" * 100000 + b"]" * 100000])
def test_malformed_bodies(client, body):
    r = client.post(f"{API}/txt2img", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and isinstance(r.json()["detail"], list)


def test_body_size_limit(client):
    r = client.post(f"{API}/txt2img", json={"prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 65536
    r = client.post(f"{API}/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get(f"{API}/progress").status_code == 200


def test_routing_errors_in_fastapi_shape(client):
    r = client.get(f"{API}/nope")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = client.get(f"{API}/txt2img")
    assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed"}


# --------------------------------------------------------------------------------------------------
# auth and CORS
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_client(folders):
    config = make_config(folders, api_auth=[("admin", "s3cret"), ("bot", "pa:ss")],
                         cors_allow_origins=["http://good.example"])
    with TestClient(create_app(config)) as c:
        yield c


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize("headers,detail", [
    ({}, "Not authenticated"), ({"Authorization": "Bearer abc"}, "Not authenticated"),
    ({"Authorization": "Basic !!!"}, "Invalid authentication credentials"),
    ({"Authorization": "Basic " + base64.b64encode(b"nocolon").decode()}, "Invalid authentication credentials"),
    (basic("admin", "wrong"), "Incorrect username or password"),
    (basic("nobody", "s3cret"), "Incorrect username or password"),
    (basic("bot", "s3cret"), "Incorrect username or password"),
])
@pytest.mark.parametrize("path", [f"{API}/sd-models", f"{API}/loras", f"{API}/refresh-loras", "/openapi.json",
                                  f"{API}/nope"])
def test_auth_refused(auth_client, headers, detail, path):
    method = auth_client.post if "refresh" in path else auth_client.get
    r = method(path, headers=headers)
    assert r.status_code == 401
    assert r.json() == {"error": "HTTPException", "detail": detail, "body": "", "errors": ""}
    assert r.headers["www-authenticate"] == "Basic"


def test_auth_accepted(auth_client):
    for user, password in (("admin", "s3cret"), ("bot", "pa:ss")):
        assert auth_client.get(f"{API}/loras", headers=basic(user, password)).status_code == 200
    r = auth_client.post(f"{API}/txt2img", json={**SMALL, "seed": 3}, auth=("admin", "s3cret"))
    assert r.status_code == 200 and json.loads(r.json()["info"])["seed"] == 3


def test_cors(auth_client, client):
    pre = {"Origin": "http://good.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = auth_client.options(f"{API}/txt2img", headers=pre)  # preflight: no credentials needed
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://good.example"
    r = auth_client.get(f"{API}/samplers", headers={"Origin": "http://good.example", **basic("admin", "s3cret")})
    assert r.headers["access-control-allow-origin"] == "http://good.example"
    r = auth_client.options(f"{API}/txt2img", headers={**pre, "Origin": "http://evil.example"})
    assert r.status_code == 400
    # by default no origin is allowed (A1111)
    r = client.options(f"{API}/txt2img", headers=pre)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


def test_parse_auth_flag():
    from server.__main__ import parse_auth

    assert parse_auth("a:b,c:d:e") == [("a", "b"), ("c", "d:e")]
    assert parse_auth(None) == []
    for bad in ("nocolon", ":pw", "user:"):
        with pytest.raises(ValueError):
            parse_auth(bad)
