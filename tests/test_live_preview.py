"""Live previews of the server (server/preview.py through server/runner.py's sampler callback), on the tiny
checkpoint: the preview in /sdapi/v1/progress and over the event stream is sd15.preview's picture of the
denoised latent of that step (captured by wrapping the sampler callback), previews are made only while someone
looks, `live_previews_enable`, `show_progress_every_n_steps` (N and -1) and `live_preview_content` are honoured,
TAESD is used when its file is in the models folder."""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from starlette.testclient import TestClient

from sd15.preview import PreviewDecoders, image_grid, preview
from sd15.vae.taesd import TAESDDecoder
from server import runner
from server.app import Engine, create_app
from test_server import make_config, write_model_folders

REAL_CALLBACK = runner.make_callback
SMALL = {"width": 64, "height": 64, "prompt": "a cat", "seed": 5}
COMBINED = {"live_preview_content": "Combined"}  # the guided x0: the sampler callback's `denoised`
CONTENTS = ("Prompt", "Negative prompt", "Combined")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_model_folders(tmp_path_factory.mktemp("preview"))


def pixels(b64: str) -> np.ndarray:
    assert not b64.startswith("data:")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


class Capture:
    """Wraps the engine's sampler callback: records each step's denoised latent, the CFG denoiser's estimates
    by `live_preview_content` and the job's preview after it, and can hold the worker after given steps until
    the test lets it go."""

    def __init__(self, monkeypatch, hold=()):
        self.latents, self.estimates, self.previews, self.hold = [], [], [], set(hold)
        self.reached = {s: threading.Event() for s in self.hold}
        self.go = {s: threading.Event() for s in self.hold}
        self.after_preview = None  # called (step) after a step that made a new preview
        real = REAL_CALLBACK

        def make(engine, run, job, settings):
            inner = real(engine, run, job, settings)

            def callback(step, sigma, x, denoised):
                before = job.preview
                inner(step, sigma, x, denoised)
                self.latents.append(denoised.detach().clone())
                if getattr(run.state, "preview_latent", None) is not None:
                    self.estimates.append({c: run.state.preview_latent(c).clone() for c in CONTENTS})
                now = job.preview
                n = len(self.latents)
                if now is not before and now is not None:
                    self.previews.append((n, job.preview_step, now))
                    if self.after_preview is not None:
                        self.after_preview(n)
                if n in self.hold:
                    self.reached[n].set()
                    assert self.go[n].wait(30)
            return callback
        monkeypatch.setattr(runner, "make_callback", make)


def wait_done(client, job_id, timeout=60):
    deadline = time.time() + timeout
    while (job := client.get(f"/sd15/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.02)
    assert job["state"] == "done", job
    return job


def preview_after_step_one(client, monkeypatch, request: dict):
    """Run `request` as a job held after its 1st and 2nd sampler steps; the step-1 preview asked for at step 1
    is the one `/progress` shows at step 2 -> (the shown pixels, the Capture)."""
    cap = Capture(monkeypatch, hold=(1, 2))
    job = client.post("/sd15/v1/jobs", json={"kind": "txt2img", "save": False, "request": request}).json()
    assert cap.reached[1].wait(60)
    client.get("/sdapi/v1/progress")
    cap.go[1].set()
    assert cap.reached[2].wait(60)
    shown = pixels(client.get("/sdapi/v1/progress").json()["current_image"])
    cap.go[2].set()
    wait_done(client, job["id"])
    return shown, cap


def test_progress_preview_is_approx_cheap_of_that_step_and_only_when_polled(folders, monkeypatch):
    with TestClient(create_app(make_config(folders))) as client:
        assert client.post("/sdapi/v1/options", json={"show_progress_type": "Approx cheap",
                                                      "show_progress_every_n_steps": 1, **COMBINED}).status_code == 200
        cap = Capture(monkeypatch, hold=(2, 3))
        job = client.post("/sd15/v1/jobs", json={"kind": "txt2img", "save": False,
                                                 "request": {**SMALL, "steps": 5, "batch_size": 2}}).json()
        assert cap.reached[2].wait(60)
        first = client.get("/sdapi/v1/progress").json()
        assert first["current_image"] is None and cap.previews == []  # nobody looked before: nothing decoded
        cap.go[2].set()
        assert cap.reached[3].wait(60)
        shown = client.get("/sdapi/v1/progress").json()["current_image"]
        assert [p[0] for p in cap.previews] == [3]  # decoded once, at the first step after the poll
        expected = np.asarray(image_grid(preview(None, cap.latents[2])))  # the batch of 2 as A1111's grid
        assert expected.shape == (8, 16, 3) and np.array_equal(pixels(shown), expected)
        cap.go[3].set()
        wait_done(client, job["id"])
        assert client.get("/sdapi/v1/progress").json()["current_image"] is None  # idle: no image


def test_previews_disabled(folders, monkeypatch):
    with TestClient(create_app(make_config(folders))) as client:
        client.post("/sdapi/v1/options", json={"live_previews_enable": False, "show_progress_every_n_steps": 1})
        cap = Capture(monkeypatch, hold=(2,))
        job = client.post("/sd15/v1/jobs", json={"kind": "txt2img", "save": False,
                                                 "request": {**SMALL, "steps": 4}}).json()
        assert cap.reached[2].wait(60)
        assert client.get("/sdapi/v1/progress").json()["current_image"] is None
        cap.go[2].set()
        wait_done(client, job["id"])
        assert cap.previews == [] and len(cap.latents) == 4


def test_taesd_from_the_models_folder(folders, monkeypatch):
    g = torch.Generator().manual_seed(3)
    net = TAESDDecoder()
    save_file({k: torch.randn(v.shape, generator=g) * 0.05 for k, v in net.state_dict().items()},
              f"{folders['ckpt_dir']}/taesd_decoder.safetensors")
    try:
        with TestClient(create_app(make_config(folders))) as client:
            client.post("/sdapi/v1/options", json={"show_progress_type": "TAESD", "show_progress_every_n_steps": 1,
                                                   **COMBINED})
            shown, cap = preview_after_step_one(client, monkeypatch, {**SMALL, "steps": 3})
        want = np.asarray(preview(None, cap.latents[1], "TAESD", PreviewDecoders(folders["ckpt_dir"]), grid=True))
        assert shown.shape == (64, 64, 3) and np.array_equal(shown, want)  # full size: not the 8x8 cheap one
    finally:
        import os

        os.remove(f"{folders['ckpt_dir']}/taesd_decoder.safetensors")


def test_full_preview_is_the_vae_decode(folders, monkeypatch):
    engine = Engine(make_config(folders))
    engine.start()
    with TestClient(create_app(engine.config, engine)) as client:
        client.post("/sdapi/v1/options", json={"show_progress_type": "Full", "show_progress_every_n_steps": 1,
                                               "show_progress_grid": False, **COMBINED})
        shown, cap = preview_after_step_one(client, monkeypatch, {**SMALL, "steps": 3, "batch_size": 2})
        want = np.asarray(preview(engine.models.model, cap.latents[1][:1], "Full")[0])
    assert shown.shape == (64, 64, 3) and np.array_equal(shown, want)  # the first image only: no grid


def test_live_preview_content_picks_the_cfg_denoisers_estimate(folders, monkeypatch):
    """A1111's `live_preview_content`: the prompt's x0, the negative prompt's, or the guided one (the sampler
    callback's `denoised`); which rows each is, is tested on CFGDenoiser."""
    shown = {}
    with TestClient(create_app(make_config(folders))) as client:
        for content in CONTENTS:
            client.post("/sdapi/v1/options", json={"show_progress_type": "Approx cheap",
                                                   "show_progress_every_n_steps": 1, "live_preview_content": content})
            shown[content], cap = preview_after_step_one(client, monkeypatch, {**SMALL, "steps": 3,
                                                                               "negative_prompt": "a dog"})
            x0 = cap.estimates[1]
            assert np.array_equal(shown[content], np.asarray(preview(None, x0[content], grid=True)))
    assert torch.equal(x0["Combined"], cap.latents[1])
    assert not np.array_equal(shown["Prompt"], shown["Negative prompt"])
    assert not np.array_equal(shown["Prompt"], shown["Combined"])


@pytest.fixture
def live(folders):
    """The app under uvicorn in a thread of this process (so the sampler callback can be wrapped) and a
    reader of its event stream that collects the progress events carrying a preview."""
    import requests
    import uvicorn

    from test_server_live import free_port

    engine = Engine(make_config(folders, allowed_hosts=None))
    engine.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine.config, engine), host="127.0.0.1", port=port,
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline
        time.sleep(0.05)
    sent, seen, stop = [], threading.Event(), threading.Event()

    def read():
        with requests.get(f"{url}/sd15/v1/events", stream=True, timeout=60) as r:
            name = None
            for line in r.iter_lines(chunk_size=1, decode_unicode=True):  # no read-ahead
                if stop.is_set():
                    return
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: ") and name == "progress":
                    data = json.loads(line[6:])
                    if data["preview"] is not None:
                        sent.append(data)
                        seen.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not engine.queue.listeners:
        assert time.time() < deadline
        time.sleep(0.05)
    yield url, engine, sent, seen
    stop.set()
    server.should_exit = True
    thread.join(30)


def run_job(url, request, cap, seen, timeout=60):
    import requests

    def delivered(step):  # hold the worker until the event stream carried this preview
        assert seen.wait(10), f"the preview of step {step} never came over the event stream"
        seen.clear()
    cap.after_preview = delivered
    job = requests.post(f"{url}/sd15/v1/jobs", json={"kind": "txt2img", "save": False, "request": request}).json()
    deadline = time.time() + timeout
    while requests.get(f"{url}/sd15/v1/jobs/{job['id']}").json()["state"] in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.05)
    return job["id"]


def test_event_stream_previews_every_n_and_per_batch(live, monkeypatch):
    import requests

    url, engine, sent, seen = live
    requests.post(f"{url}/sdapi/v1/options", json={"show_progress_type": "Approx cheap",
                                                   "show_progress_every_n_steps": 3, **COMBINED})
    cap = Capture(monkeypatch)
    job_id = run_job(url, {**SMALL, "steps": 7}, cap, seen)
    assert [p[0] for p in cap.previews] == [3, 6]  # every 3 steps of 7
    assert [(s["id"], s["preview_step"]) for s in sent] == [(job_id, 3), (job_id, 6)]
    for s in sent:
        want = np.asarray(preview(None, cap.latents[s["preview_step"] - 1])[0])
        assert np.array_equal(pixels(s["preview"]), want)
    # -1: one preview per finished batch (the batch's last x0), made when the next batch starts
    sent.clear()
    requests.post(f"{url}/sdapi/v1/options", json={"show_progress_every_n_steps": -1})
    cap = Capture(monkeypatch)
    run_job(url, {**SMALL, "steps": 3, "n_iter": 3}, cap, seen)
    assert [p[1] for p in cap.previews] == [3, 6] and [s["preview_step"] for s in sent] == [3, 6]
    for s in sent:
        want = preview(None, cap.latents[s["preview_step"] - 1])[0]
        assert np.array_equal(pixels(s["preview"]), np.asarray(want))
