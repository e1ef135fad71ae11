"""A1111's scripts through the real server on the tiny checkpoint: a script's images equal the plain
txt2img / img2img images of the same settings, errors are 4xx, the listings name the scripts."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from test_scripts import TXT, b64png, pixels, random_image, xyz_args

@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from server.app import create_app
    from test_server import make_config, write_model_folders

    folders = write_model_folders(tmp_path_factory.mktemp("scripts-server"))
    with TestClient(create_app(make_config(folders))) as c:
        yield c


SMALL = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 42, "sampler_name": "Euler"}


def post(client, path, body):
    r = client.post(f"/sdapi/v1/{path}", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    out["info"] = json.loads(out["info"])
    out["images"] = [Image.open(io.BytesIO(base64.b64decode(s))) for s in out["images"]]
    return out


def test_server_xyz_plot_cells_equal_plain_txt2img(client):
    args = [TXT["Steps"], "1,2", [], TXT["Checkpoint name"], "other, v1-5", [], 0, "", [], True, True]
    out = post(client, "txt2img", {**SMALL, "script_name": "X/Y/Z plot", "script_args": args})
    assert len(out["images"]) == 1 + 4 and out["info"]["index_of_first_image"] == 1
    assert out["parameters"]["script_name"] == "X/Y/Z plot"  # the request as sent
    g0 = out["images"][0]
    pad_top = g0.height - 2 * 64
    assert g0.width == 64 * 3 // 4 + 2 * 64 and pad_top > 0
    assert "Script: X/Y/Z plot, X Type: Steps" in out["info"]["infotexts"][0]
    # the cell (steps 2, checkpoint sub/other) is the plain txt2img image of those settings
    plain = post(client, "txt2img", {**SMALL, "steps": 2,
                                     "override_settings": {"sd_model_checkpoint": "sub/other.safetensors"}})
    assert np.array_equal(pixels(out["images"][2]), pixels(plain["images"][0]))
    x, y = 64 * 3 // 4 + 64, pad_top
    assert np.array_equal(pixels(g0.crop((x, y, x + 64, y + 64))), pixels(plain["images"][0]))
    other = post(client, "txt2img", {**SMALL, "steps": 2})
    assert not np.array_equal(pixels(other["images"][0]), pixels(plain["images"][0]))  # the checkpoint mattered


def test_server_script_errors_and_listings(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "script_name": "loopback"})
    assert r.status_code == 422 and r.json()["detail"] == "Script 'loopback' not found"
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "script_name": "x/y/z plot",
                                               "script_args": [TXT["Styles"], "a"]})
    assert r.status_code == 400 and "'Styles' is not supported" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "script_name": "x/y/z plot",
                                               "script_args": xyz_args(("Sampler", "Euler, Nope"))[:17] + [True]})
    assert r.status_code == 400 and "unknown Sampler 'Nope'" in r.json()["detail"]
    assert client.get("/sdapi/v1/scripts").json()["img2img"] == [
        "prompt matrix", "prompts from file or textbox", "sd upscale", "x/y/z plot"]
    info = client.get("/sdapi/v1/script-info").json()
    up = next(i for i in info if i["name"] == "sd upscale")
    assert up["args"][2]["choices"] == ["None", "Lanczos", "Nearest"]


def test_server_sd_upscale_and_prompt_matrix(client):
    init = b64png(random_image(48, 40, 5))
    out = post(client, "img2img", {**SMALL, "init_images": [init], "denoising_strength": 0.3,
                                   "script_name": "sd upscale", "script_args": ["", 16, "Lanczos", 2.0]})
    assert len(out["images"]) == 1 and out["images"][0].size == (96, 80)
    assert "SD upscale overlap: 16, SD upscale upscaler: Lanczos" in out["info"]["infotexts"][0]
    out = post(client, "txt2img", {**SMALL, "prompt": "a cat|red", "script_name": "prompt matrix", "script_args": []})
    assert len(out["images"]) == 3 and out["info"]["all_prompts"] == ["a cat", "a cat, red"]
    plain = post(client, "txt2img", {**SMALL, "prompt": "a cat, red"})
    assert np.array_equal(pixels(out["images"][2]), pixels(plain["images"][0]))


def test_server_img2img_xyz_and_prompts_from_file(client):
    init = b64png(random_image(64, 64, 6))
    req = {**SMALL, "init_images": [init], "denoising_strength": 0.5}
    args = xyz_args(("Denoising", "0.3, 0.6"), legend=False, lone=True, kind="img2img")
    out = post(client, "img2img", {**req, "script_name": "x/y/z plot", "script_args": args})
    assert out["images"][0].size == (128, 64) and len(out["images"]) == 3
    plain = post(client, "img2img", {**req, "denoising_strength": 0.6})
    assert np.array_equal(pixels(out["images"][2]), pixels(plain["images"][0]))
    assert np.array_equal(pixels(out["images"][0])[:, 64:], pixels(plain["images"][0]))
    out = post(client, "txt2img", {**SMALL, "script_name": "prompts from file or textbox",
                                   "script_args": [False, False, "start", "a dog\n--prompt a bird --steps 1"]})
    assert out["info"]["all_prompts"] == ["a dog a cat", "a bird a cat"] and len(out["images"]) == 2
    plain = post(client, "txt2img", {**SMALL, "prompt": "a bird a cat", "steps": 1})
    assert np.array_equal(pixels(out["images"][1]), pixels(plain["images"][0]))
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "script_name": "prompts from file or textbox",
                                               "script_args": [False, False, "start", "--steps x"]})
    assert r.status_code == 400 and "line 1 ('--steps x'): --steps: 'x' is not an integer" in r.json()["detail"]
