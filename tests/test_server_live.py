"""`python -m server` as a real uvicorn process on 127.0.0.1 (a free port), driven over HTTP by `requests`
and, when installed, the `webuiapi` PyPI client. Tiny synthetic checkpoints, 64×64, 2 steps."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

requests = pytest.importorskip("requests")

from test_server import png_b64, write_model_folders  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APIKEY = "k3y-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    folders = write_model_folders(root)
    port = free_port()
    log_path = root / "server.log"
    cmd = [sys.executable, "-m", "server", "--ckpt-dir", folders["ckpt_dir"], "--port", str(port),
           "--api-auth", f"admin:{APIKEY}", "--no-download"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if requests.get(f"{url}/sdapi/v1/progress", auth=("admin", APIKEY), timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not start:\n{log_path.read_text()}")
            time.sleep(0.2)
        assert f"Uvicorn running on http://127.0.0.1:{port}" in log_path.read_text()  # loopback by default
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_seed_document_client(base_url, tmp_path):
    """The seed document's client, unchanged but for a tiny size and step count."""
    requests.post(f"{base_url}/sdapi/v1/options", json={"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors"},
                  auth=("admin", APIKEY)).raise_for_status()
    auth = ("admin", APIKEY)
    result = requests.post(f"{base_url}/sdapi/v1/txt2img",
                           json={"prompt": "a beautiful cat", "steps": 2, "width": 64, "height": 64},
                           auth=auth).json()
    with open(tmp_path / "cat.png", "wb") as f:
        f.write(base64.b64decode(result["images"][0]))
    image = Image.open(tmp_path / "cat.png")
    assert image.size == (64, 64)
    assert image.info["parameters"].startswith("a beautiful cat\nSteps: 2, Sampler: Euler")
    assert json.loads(result["info"])["sd_model_name"] == "v1-5-pruned-emaonly"


def test_auth_over_http(base_url):
    r = requests.get(f"{base_url}/sdapi/v1/loras")
    assert r.status_code == 401 and r.json()["detail"] == "Not authenticated"
    assert requests.get(f"{base_url}/sdapi/v1/loras", auth=("admin", "nope")).status_code == 401
    r = requests.get(f"{base_url}/sdapi/v1/sd-models", auth=("admin", APIKEY), headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and "x-process-time" in r.headers


def test_concurrent_requests_over_http(base_url):
    seeds = [101, 102, 103]
    results = {}

    def run(seed):
        with requests.Session() as s:
            results[seed] = s.post(f"{base_url}/sdapi/v1/txt2img", auth=("admin", APIKEY), timeout=300,
                                   json={"prompt": "x", "seed": seed, "steps": 2, "width": 64, "height": 64})
    threads = [threading.Thread(target=run, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for seed in seeds:
        assert results[seed].status_code == 200
        assert json.loads(results[seed].json()["info"])["all_seeds"] == [seed]


def test_interrupt_over_http(base_url):
    auth = ("admin", APIKEY)
    out = {}
    t = threading.Thread(target=lambda: out.update(r=requests.post(
        f"{base_url}/sdapi/v1/txt2img", auth=auth, timeout=300,
        json={"seed": 1, "steps": 400, "width": 64, "height": 64})))
    t.start()
    try:
        deadline = time.time() + 120
        while requests.get(f"{base_url}/sdapi/v1/progress", auth=auth).json()["state"]["sampling_step"] < 1:
            assert time.time() < deadline
            time.sleep(0.05)
        assert requests.post(f"{base_url}/sdapi/v1/interrupt", auth=auth).json() == {}
    finally:
        t.join(300)
    assert out["r"].status_code == 200 and len(out["r"].json()["images"]) == 1


def test_webuiapi_client(base_url):
    webuiapi = pytest.importorskip("webuiapi")
    host, port = base_url.rsplit(":", 1)
    api = webuiapi.WebUIApi(host=host.split("//")[1], port=int(port), sampler="Euler a", steps=2,
                            username="admin", password=APIKEY)
    r = api.txt2img(prompt="a cat", width=64, height=64, seed=5)
    assert r.image.size == (64, 64) and r.info["seed"] == 5 and r.info["sampler_name"] == "Euler a"
    assert r.parameters["prompt"] == "a cat" and r.parameters["scheduler"] == "automatic"

    r2 = api.img2img(images=[r.image], prompt="a dog", width=64, height=64, denoising_strength=0.5, seed=6)
    assert r2.image.size == (64, 64) and r2.info["denoising_strength"] == 0.5
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 32))
    r3 = api.img2img(images=[r.image], mask_image=mask, width=64, height=64, seed=7)
    assert r3.image.size == (64, 64)

    info = api.png_info(r.image)
    assert info.info.startswith("a cat\nSteps: 2, Sampler: Euler a") and info.parameters["Seed"] == "5"

    names = api.util_get_model_names()
    assert len(names) == 2 and any(n.startswith("sub/other.safetensors") for n in names)
    api.util_set_model("other")
    assert api.util_get_current_model().startswith("sub/other.safetensors [")
    assert api.txt2img(prompt="x", width=64, height=64, seed=1).info["sd_model_name"] == "other"
    api.util_set_model("v1-5-pruned-emaonly")
    assert api.util_get_current_model().startswith("v1-5-pruned-emaonly.safetensors [")

    assert [s["name"] for s in api.get_samplers()][:2] == ["DPM++ 2M", "DPM++ SDE"]
    assert api.get_schedulers()[0]["name"] == "automatic"
    assert api.get_scripts()["txt2img"] == ["prompt matrix", "prompts from file or textbox", "x/y/z plot"]
    assert api.get_loras()[0]["alias"] == "my_style" and api.get_sd_vae()[0]["model_name"] == "tiny-vae.safetensors"
    assert api.get_embeddings()["loaded"]["neg"]["vectors"] == 2
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert "ram" in api.get_memory() and api.get_cmd_flags()["api_auth"] == "<set>"
    assert api.get_progress()["state"]["job_count"] == 0
    api.interrupt()
    api.skip()
    api.refresh_checkpoints()
    api.util_wait_for_ready()  # idle: returns at once
    assert api.get_options()["sd_vae"] == "Automatic"
    api.set_options({"CLIP_stop_at_last_layers": 1})


def test_img2img_with_data_url_over_http(base_url):
    r = requests.post(f"{base_url}/sdapi/v1/img2img", auth=("admin", APIKEY),
                      json={"init_images": ["data:image/png;base64," + png_b64()], "steps": 2, "width": 64,
                            "height": 64, "seed": 3})
    assert r.status_code == 200
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (64, 64)
