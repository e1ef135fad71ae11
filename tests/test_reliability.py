"""Hostile, odd or changing input through Starlette's TestClient on the tiny checkpoint: each test reproduces
one defect of issue 15 (D4, D5, D7-D11, D14, D15, error texts, JSON 5xx)."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil

import pytest
from PIL import Image
from starlette.testclient import TestClient

import synthetic
from server import inputs
from server.app import Engine, create_app
from test_server import decode, make_config, png_b64, write_model_folders

API = "/sdapi/v1"
SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_model_folders(tmp_path_factory.mktemp("rel"))


@pytest.fixture(scope="module")
def client(folders):
    engine = Engine(make_config(folders))
    engine.start()
    with TestClient(create_app(engine.config, engine)) as c:
        c.engine = engine
        yield c


def encoded(fmt: str, size=(64, 64), **kw) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt, **kw)
    return base64.b64encode(buf.getvalue()).decode()


# --- D7: every format A1111 reads, with this Pillow -----------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"])
def test_init_image_formats(client, fmt):
    if fmt == "MPO":  # a two-frame MPO (what phone cameras write)
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), "red").save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (64, 64))])
        data = base64.b64encode(buf.getvalue()).decode()
    else:
        data = encoded(fmt)
    r = client.post(f"{API}/img2img", json={"init_images": [data], "seed": 1, **SMALL})
    assert r.status_code == 200, r.text
    assert client.post(f"{API}/png-info", json={"image": data}).status_code == 200


# --- D8 / D10: sides, aspect ratio, resize_mode 3 ---------------------------------------------------

@pytest.mark.parametrize("size,field,extra", [
    ((5, 80), "init_images", {"resize_mode": 3}),  # latent resize of a 5-px-wide image: conv larger than input
    ((1, 100), "init_images", {}),  # aspect 100:1
    ((1, 100), "mask", {}),
    ((2000, 2000), "init_images", {}),  # over the test pixel limit
])
def test_image_bounds(client, size, field, extra):
    body = {"init_images": [png_b64((64, 64))], "seed": 1, **SMALL, **extra}
    if field == "mask":
        body["mask"] = png_b64(size, color=255, mode="L")
    else:
        body["init_images"] = [png_b64(size)]
    r = client.post(f"{API}/img2img", json=body)
    assert r.status_code == 400 and f"{size[0]}x{size[1]}" in r.json()["detail"], r.text


def test_resize_mode_3_smallest_accepted(client):
    r = client.post(f"{API}/img2img", json={"init_images": [png_b64((64, 100))], "resize_mode": 3, "seed": 1, **SMALL})
    assert r.status_code == 200


def test_resize_mode_3_with_a_mask_fill_and_another_size_is_a_422(client):
    """A1111 fails in `masking.fill` (an init image and a mask of two sizes): a 422 that says what works."""
    body = {"init_images": [png_b64((64, 64))], "mask": png_b64((64, 64), color=255, mode="L"), "resize_mode": 3,
            "inpaint_full_res": False, "seed": 1, **SMALL, "width": 96}
    r = client.post(f"{API}/img2img", json=body)
    assert r.status_code == 422 and "send inpainting_fill 1" in r.json()["detail"], r.text
    r = client.post(f"{API}/img2img", json={**body, "inpainting_fill": 1})
    assert r.status_code == 200 and decode(r.json()["images"][0]).size == (96, 64)


# --- D9: nesting; D11: prompt length ------------------------------------------------------------

def test_deep_json_refused_before_work(client):
    nested = '{"a":' * 960 + "{}" + "}" * 960  # the test's own json.dumps cannot write this
    before = len(client.engine.queue.history)
    r = client.post(f"{API}/txt2img", content='{"steps": 2, "width": 64, "height": 64, "comments": ' + nested + "}",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "value_error.jsondepth"
    r = client.post(f"{API}/txt2img", json={"script_args": json.loads("[" * 100 + "]" * 100), **SMALL})
    assert r.status_code == 422
    assert len(client.engine.queue.history) == before  # no job ran
    assert client.post(f"{API}/txt2img", json={"comments": {"a": {"b": [1, 2]}}, "seed": 1, **SMALL}).status_code == 200


def test_json_depth():
    assert inputs.json_depth(1) == 0 and inputs.json_depth([]) == 1 and inputs.json_depth({"a": [{"b": 1}]}) == 3


def test_prompt_length(client):
    limit = client.engine.limits.max_prompt_chars
    r = client.post(f"{API}/txt2img", json={"prompt": "cat " * (limit // 4 + 1), **SMALL})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]
    r = client.post(f"{API}/txt2img", json={"negative_prompt": "x" * (limit + 1), **SMALL})
    assert r.json()["detail"][0]["loc"] == ["body", "negative_prompt"]


# --- D4 / D5: files that change under a running server --------------------------------------------

@pytest.fixture
def own_folder(tmp_path):
    return write_model_folders(tmp_path)


def test_active_checkpoint_deleted_or_truncated(own_folder):
    engine = Engine(make_config(own_folder))
    engine.start()
    path = engine.models.checkpoint.path
    with TestClient(create_app(engine.config, engine)) as client:
        first = client.post(f"{API}/txt2img", json={"seed": 5, **SMALL}).json()
        with open(path, "r+b") as f:  # overwritten in place (cp over it): the model must not change or crash
            f.truncate(100)
        os.remove(path)
        r = client.post(f"{API}/txt2img", json={"seed": 5, **SMALL})
        assert r.status_code == 200, r.text
        assert r.json()["images"] == first["images"]
        assert json.loads(r.json()["info"])["sd_model_hash"] == json.loads(first["info"])["sd_model_hash"]


def test_touch_refresh_unload_reload(own_folder):
    engine = Engine(make_config(own_folder))
    engine.start()
    path = engine.models.checkpoint.path
    with TestClient(create_app(engine.config, engine)) as client:
        title = client.get(f"{API}/options").json()["sd_model_checkpoint"]
        assert title.endswith("]")
        os.utime(path, (1, 1))  # the hash cache no longer vouches for the file
        assert client.post(f"{API}/refresh-checkpoints").status_code == 200
        assert client.post(f"{API}/unload-checkpoint").status_code == 200
        assert client.post(f"{API}/reload-checkpoint").status_code == 200
        r = client.post(f"{API}/txt2img", json={"seed": 5, **SMALL})
        assert r.status_code == 200, r.text
        # moved: the model still works; reload finds the file by name again once it is back
        shutil.move(path, path + ".moved")
        assert client.post(f"{API}/txt2img", json={"seed": 5, **SMALL}).status_code == 200
        shutil.move(path + ".moved", path)
        assert client.post(f"{API}/refresh-checkpoints").status_code == 200
        assert client.post(f"{API}/unload-checkpoint").status_code == 200
        assert client.post(f"{API}/txt2img", json={"seed": 5, **SMALL}).status_code == 200


def test_failed_switch_keeps_old_model_and_says_no_path(own_folder):
    bad = os.path.join(own_folder["ckpt_dir"], "broken.safetensors")
    full = synthetic.write_tiny_checkpoint(os.path.join(own_folder["ckpt_dir"], "tmp.safetensors"))
    with open(full, "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read()[: 4000])  # truncated
    os.remove(full)
    pickle = os.path.join(own_folder["ckpt_dir"], "evil.ckpt")
    import torch
    torch.save({"state_dict": {"x": object()}}, pickle)  # needs the full unpickler: refused
    engine = Engine(make_config(own_folder))
    engine.start()
    model = engine.models.model
    with TestClient(create_app(engine.config, engine)) as client:
        for name in ("broken.safetensors", "evil.ckpt"):
            r = client.post(f"{API}/options", json={"sd_model_checkpoint": name})
            assert r.status_code == 400
            detail = r.json()["detail"]
            assert own_folder["ckpt_dir"] not in detail and "weights_only=False" not in detail, detail
            assert engine.models.model is model  # not released, not read again
        assert client.post(f"{API}/txt2img", json={"seed": 5, **SMALL}).status_code == 200
    assert engine.models.loads["failed"] == 2


def test_public_message():
    text = ("/srv/models/sub/x.ckpt: not loadable (Weights only load failed. Re-running `torch.load` with "
            "`weights_only` set to `False` will likely succeed. You can use weights_only=False if you trust it.)")
    out = inputs.public_message(text, ["/srv/models"])
    assert out.startswith("models/sub/x.ckpt:") and "weights_only=False" not in out and "/srv" not in out


# --- D14 / D15: Host header, CORS ---------------------------------------------------------------

def test_host_header_checked_without_auth(folders):
    with TestClient(create_app(make_config(folders, allowed_hosts=None))) as client:
        assert client.get(f"{API}/samplers", headers={"Host": "evil.example"}).status_code == 421
        assert client.get(f"{API}/samplers", headers={"Host": "evil.example:7860"}).json()["error"] == "HTTPException"
        for host in ("localhost:7860", "127.0.0.1", "[::1]:7860", "192.168.1.5:7860"):
            assert client.get(f"{API}/samplers", headers={"Host": host}).status_code == 200, host
    with TestClient(create_app(make_config(folders, allowed_hosts=["gpu.lan"]))) as client:
        assert client.get(f"{API}/samplers", headers={"Host": "gpu.lan:7860"}).status_code == 200
        assert client.get(f"{API}/samplers", headers={"Host": "evil.example"}).status_code == 421
    # with --api-auth a rebinding page cannot send the credentials: any Host
    with TestClient(create_app(make_config(folders, allowed_hosts=None, api_auth=[("u", "p")]))) as client:
        assert client.get(f"{API}/samplers", headers={"Host": "gpu.example"}, auth=("u", "p")).status_code == 200


def test_cors_wildcard_never_with_credentials(folders):
    with TestClient(create_app(make_config(folders, cors_allow_origins=["*"]))) as client:
        r = client.get(f"{API}/samplers", headers={"Origin": "https://evil.example"})
        assert r.headers.get("access-control-allow-origin") == "*"
        assert r.headers.get("access-control-allow-credentials") is None
        r = client.options(f"{API}/txt2img", headers={"Origin": "https://evil.example",
                                                      "Access-Control-Request-Method": "POST"})
        assert r.headers.get("access-control-allow-credentials") is None
    with TestClient(create_app(make_config(folders, cors_allow_origins=["https://good.example"]))) as client:
        r = client.get(f"{API}/samplers", headers={"Origin": "https://good.example"})
        assert r.headers.get("access-control-allow-credentials") == "true"


# --- every 5xx is JSON ----------------------------------------------------------------------------

def test_unexpected_errors_are_json(client, folders, monkeypatch):
    from server.models import Library

    def boom(*a, **k):
        raise RuntimeError("/secret/path exploded")
    with monkeypatch.context() as m:
        m.setattr(Library, "vae_api", boom)
        with TestClient(create_app(make_config(folders)), raise_server_exceptions=False) as c:
            r = c.get(f"{API}/sd-vae")
    assert r.status_code == 500 and r.json()["error"] == "RuntimeError"
    assert r.headers["content-type"] == "application/json"
    monkeypatch.setattr(client.engine, "run", boom)
    r = client.post(f"{API}/txt2img", json={"seed": 1, **SMALL})
    assert r.status_code == 500 and set(r.json()) == {"error", "detail", "body", "errors"}
    assert client.post(f"{API}/txt2img", json={"seed": 1, **SMALL}).status_code == 500  # and the server goes on
    monkeypatch.undo()
    assert client.post(f"{API}/txt2img", json={"seed": 1, **SMALL}).status_code == 200
