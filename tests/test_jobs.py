"""The job queue, the page's /sd15/v1 endpoints, output saving, /metrics and the per-job limits, through
Starlette's TestClient on the tiny synthetic checkpoint (64×64, 2 steps)."""
from __future__ import annotations

import base64
import datetime
import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from server.a1111 import Limits, Txt2ImgRequest
from server.app import Engine, create_app
from test_server import make_config, png_b64, write_model_folders

API = "/sdapi/v1"
JOBS = "/sd15/v1"
SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_model_folders(tmp_path_factory.mktemp("jobs"))


def make_engine(folders, **kw):
    engine = Engine(make_config(folders, **kw))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine_client(folders, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("outputs")
    engine = make_engine(folders, outdir=str(outdir), save=True, queue_size=3)
    with TestClient(create_app(engine.config, engine)) as c:
        yield engine, c


class Gate:
    """Holds the queue's worker before each job until `open()`: jobs pile up in the queue meanwhile."""

    def __init__(self, engine):
        self.engine, self.event, self.real = engine, threading.Event(), engine.queue.run
        self.started = threading.Event()

    def __enter__(self):
        def run(job):
            self.started.set()
            assert self.event.wait(60), "gate never opened"
            return self.real(job)
        self.engine.queue.run = run
        return self

    def open(self):
        self.event.set()

    def __exit__(self, *exc):
        self.event.set()
        self.engine.queue.run = self.real


def wait_state(client, job_id, states=("done", "failed", "cancelled", "interrupted"), timeout=60):
    deadline = time.time() + timeout
    while True:
        job = client.get(f"{JOBS}/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        assert time.time() < deadline, job
        time.sleep(0.02)


def test_page_job_lifecycle_and_saving(engine_client):
    engine, client = engine_client
    r = client.post(f"{JOBS}/jobs", json={"kind": "txt2img", "request": {"prompt": "a cat", "seed": 7, **SMALL}})
    assert r.status_code == 202 and r.json()["position"] in (0, 1)
    job = wait_state(client, r.json()["id"])
    assert job["state"] == "done" and job["error"] is None and job["source"] == "page"
    assert job["summary"] == {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "sampler_name": "Euler",
                              "batch_size": 1, "n_iter": 1}
    day = datetime.date.today().isoformat()
    [path] = job["files"]
    assert path.startswith(f"txt2img-images/{day}/") and path.endswith("-7.png")
    number = int(path.rsplit("/", 1)[1].split("-")[0])
    saved = Image.open(os.path.join(engine.config.outdir, path))
    assert saved.info["parameters"] == json.loads(job["result"]["info"])["infotexts"][0]
    assert base64.b64decode(job["result"]["images"][0]) == open(os.path.join(engine.config.outdir, path), "rb").read()
    # A1111 API request with save_images: saved too, numbered on from the highest number in the folder
    r = client.post(f"{API}/txt2img", json={"prompt": "x", "seed": 8, "save_images": True, **SMALL})
    assert r.status_code == 200
    assert sorted(os.listdir(os.path.join(engine.config.outdir, "txt2img-images", day)))[-1] == f"{number + 1:05d}-8.png"
    # ... and without it, nothing is written
    before = os.listdir(os.path.join(engine.config.outdir, "txt2img-images", day))
    assert client.post(f"{API}/txt2img", json={"prompt": "x", "seed": 9, **SMALL}).status_code == 200
    assert os.listdir(os.path.join(engine.config.outdir, "txt2img-images", day)) == before


def test_saved_files_and_images_follow_the_options(engine_client):
    """A1111 saves inside `process_images`, with override_settings applied, and encodes the response after it
    has restored the options (unless `override_settings_restore_afterwards` is false)."""
    engine, client = engine_client

    def run(seed, **kw):
        body = {"prompt": "x", "seed": seed, "save_images": True, **SMALL, **kw}
        r = client.post(f"{API}/txt2img", json=body)
        assert r.status_code == 200, r.text
        [path] = client.get(f"{JOBS}/jobs/{r.headers['x-sd15-job']}").json()["files"]
        data = open(os.path.join(engine.config.outdir, path), "rb").read()
        answer = r.json()
        return path, data, base64.b64decode(answer["images"][0]), json.loads(answer["info"])["infotexts"][0]

    path, data, answer, text = run(31, override_settings={"samples_format": "webp", "webp_lossless": True})
    assert path.endswith("-31.webp") and data[:4] == b"RIFF" and answer[:4] == b"\x89PNG"
    with Image.open(io.BytesIO(data)) as saved, Image.open(io.BytesIO(answer)) as png:
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(png.convert("RGB")))
        assert saved.getexif().get_ifd(0x8769)[0x9286] == b"UNICODE\0" + text.encode("utf-16-be")
    assert run(32)[0].endswith("-32.png")  # the override was for that request only
    try:
        path, data, answer, _ = run(33, override_settings={"samples_format": "jpg"},
                                    override_settings_restore_afterwards=False)
        assert path.endswith("-33.jpg") and data[:3] == answer[:3] == b"\xff\xd8\xff"
        assert client.get(f"{API}/options").json()["samples_format"] == "jpg"
    finally:
        assert client.post(f"{API}/options", json={"samples_format": "png"}).status_code == 200


def test_no_save_writes_nothing(folders, tmp_path):
    engine = make_engine(folders, outdir=str(tmp_path / "out"), save=False)
    with TestClient(create_app(engine.config, engine)) as client:
        r = client.post(f"{API}/txt2img", json={"seed": 1, "save_images": True, **SMALL})
        assert r.status_code == 200
        job = client.get(f"{JOBS}/jobs/{r.headers['x-sd15-job']}").json()
        assert job["files"] == [] and job["state"] == "done"
    assert not (tmp_path / "out").exists()


def test_fifo_queue_visible_cancel_and_full(engine_client):
    engine, client = engine_client
    with Gate(engine) as gate:
        first = client.post(f"{JOBS}/jobs", json={"kind": "txt2img", "request": {"seed": 1, **SMALL}}).json()
        assert gate.started.wait(30)
        ids = [client.post(f"{JOBS}/jobs", json={"kind": "txt2img", "request": {"seed": 2 + i, **SMALL}}).json()["id"]
               for i in range(3)]
        q = client.get(f"{JOBS}/queue").json()
        assert q["running"]["id"] == first["id"] and q["max_size"] == 3
        assert [j["id"] for j in q["queued"]] == ids and [j["position"] for j in q["queued"]] == [1, 2, 3]
        # full: 503 with Retry-After, and nothing queued
        r = client.post(f"{JOBS}/jobs", json={"kind": "txt2img", "request": {"seed": 9, **SMALL}})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and r.json()["error"] == "QueueFull"
        r = client.post(f"{API}/txt2img", json={"seed": 9, **SMALL})
        assert r.status_code == 503 and "retry-after" in r.headers
        # cancel the middle one
        r = client.delete(f"{JOBS}/jobs/{ids[1]}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        assert client.delete(f"{JOBS}/jobs/nope").status_code == 404
        gate.open()
        done = [wait_state(client, i) for i in [first["id"], ids[0], ids[2]]]
    assert [j["state"] for j in done] == ["done"] * 3
    assert done[0]["finished"] <= done[1]["started"] and done[1]["finished"] <= done[2]["started"]  # FIFO
    assert [json.loads(j["result"]["info"])["seed"] for j in done] == [1, 2, 4]
    cancelled = client.get(f"{JOBS}/jobs/{ids[1]}").json()
    assert cancelled["state"] == "cancelled" and cancelled["started"] is None and cancelled["result"] is None
    recent = client.get(f"{JOBS}/queue").json()["recent"]
    assert recent[0]["id"] == ids[2]  # newest first


def test_delete_interrupts_running_job_with_partial_result(engine_client):
    engine, client = engine_client
    job_id = client.post(f"{JOBS}/jobs", json={"kind": "txt2img", "request": {"seed": 1, "width": 64, "height": 64,
                                                                             "steps": 1000}}).json()["id"]
    deadline = time.time() + 60
    while (client.get(f"{JOBS}/jobs/{job_id}").json()["progress"] or {}).get("step", 0) < 2:
        assert time.time() < deadline
        time.sleep(0.02)
    client.delete(f"{JOBS}/jobs/{job_id}")
    job = wait_state(client, job_id)
    assert job["state"] == "interrupted" and len(job["result"]["images"]) == 1
    assert job["progress"]["step"] < 1000


def test_images_decoded_when_the_job_starts(engine_client, monkeypatch):
    """D2: a queued img2img job holds its base64 text, not decoded pixels."""
    from server import inputs

    engine, client = engine_client
    decoded = []
    real = inputs.imgs.load_image
    monkeypatch.setattr(inputs.imgs, "load_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    with Gate(engine) as gate:
        blocker = client.post(f"{JOBS}/jobs", json={"kind": "txt2img", "request": {"seed": 1, **SMALL}}).json()["id"]
        assert gate.started.wait(30)
        body = {"init_images": [png_b64((512, 512))], "seed": 3, **SMALL}
        job_id = client.post(f"{JOBS}/jobs", json={"kind": "img2img", "request": body}).json()["id"]
        assert decoded == []
        assert isinstance(engine.queue.get(job_id).request[0].init_images[0], str)
        gate.open()
        assert wait_state(client, job_id)["state"] == "done"
        wait_state(client, blocker)
    assert decoded == [1]
    assert engine.queue.get(job_id).request is None  # not kept after the job


def test_job_validation_is_immediate(engine_client):
    engine, client = engine_client
    r = client.post(f"{JOBS}/jobs", json={"kind": "txt2img", "request": {"steps": 0}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "request", "steps"]
    assert client.post(f"{JOBS}/jobs", json={"kind": "paint"}).status_code == 422
    r = client.post(f"{JOBS}/jobs", json={"kind": "img2img", "request": {"init_images": ["bm90IGFuIGltYWdl"]}})
    assert r.status_code == 400
    assert client.get(f"{JOBS}/queue").json()["queued"] == []


def test_dpm_adaptive_is_bounded(folders):
    """D3: DPM adaptive ignores `steps`; its sampler steps are capped at max(--max-steps, 2 × steps)."""
    limits_engine = make_engine(folders)
    limits_engine.limits = Limits(max_steps=6, max_body_bytes=1 << 20, max_image_pixels=1024 * 1024)
    with TestClient(create_app(limits_engine.config, limits_engine)) as client:
        r = client.post(f"{API}/txt2img", json={"sampler_name": "DPM adaptive", "steps": 2, "width": 64,
                                                "height": 64, "seed": 1, "cfg_scale": 30})
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        job = limits_engine.queue.get(r.headers["x-sd15-job"])
        assert job.steps_done == 7  # stopped after the first step beyond the cap of 6
        assert job.state == "interrupted" and job.error.status == 422


def test_max_job_seconds(folders):
    """D3: a job that runs past --max-job-seconds is stopped with what it made and a clear status."""
    engine = make_engine(folders, max_job_seconds=0.3)
    with TestClient(create_app(engine.config, engine)) as client:
        t = time.time()
        r = client.post(f"{API}/txt2img", json={"steps": 1000, "width": 64, "height": 64, "seed": 1})
        assert time.time() - t < 30
        assert r.status_code == 200 and r.headers["x-sd15-job-state"] == "interrupted"
        assert len(r.json()["images"]) == 1
        job = client.get(f"{JOBS}/jobs/{r.headers['x-sd15-job']}").json()
        assert job["error"]["status"] == 504 and "--max-job-seconds" in job["error"]["detail"]
        assert 0 < job["progress"]["step"] < 1000


def test_metrics(engine_client):
    engine, client = engine_client
    assert client.post(f"{API}/txt2img", json={"seed": 1, **SMALL}).status_code == 200
    text = client.get("/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines['sd15_jobs_total{kind="txt2img",result="done"}']) >= 1
    assert lines["sd15_queue_depth"] == "0" and lines["sd15_queue_max_size"] == "3"
    assert float(lines['sd15_model_loads_total{result="ok"}']) >= 1
    assert float(lines['sd15_http_responses_total{status="200"}']) >= 1
    assert float(lines["sd15_job_seconds_count"]) >= 1 and float(lines["sd15_sampling_steps_total"]) >= 2
    assert float(lines['sd15_job_seconds_bucket{le="+Inf"}']) == float(lines["sd15_job_seconds_count"])


def test_openapi_lists_jobs_errors_and_security(folders):
    engine = make_engine(folders)
    engine.config.api_auth = [("u", "p")]
    with TestClient(create_app(engine.config, engine)) as client:
        assert client.get("/openapi.json").status_code == 401
        spec = client.get("/openapi.json", auth=("u", "p")).json()
    assert spec["components"]["securitySchemes"] == {"HTTPBasic": {"type": "http", "scheme": "basic"}}
    assert spec["security"] == [{"HTTPBasic": []}]
    post = spec["paths"][f"{API}/txt2img"]["post"]
    assert {"200", "400", "401", "404", "413", "422", "503"} <= set(post["responses"])
    assert post["responses"]["503"]["content"]["application/json"]["schema"]["required"] == [
        "error", "detail", "body", "errors"]
    assert set(spec["paths"][f"{JOBS}/jobs"]) == {"get", "post"}
    assert set(spec["paths"][f"{JOBS}/jobs/{{job_id}}"]) == {"get", "delete"}
    assert f"{JOBS}/queue" in spec["paths"] and f"{JOBS}/events" in spec["paths"] and "/metrics" in spec["paths"]
    assert "202" in spec["paths"][f"{JOBS}/jobs"]["post"]["responses"]


@pytest.mark.parametrize("keep", [False, True])
def test_disconnect_cancels_unless_keep_abandoned(folders, keep):
    """D1 (in process): the A1111 handler's client goes away while its job waits in the queue."""
    import anyio

    from server import runner

    engine = make_engine(folders, keep_abandoned_jobs=keep)
    with TestClient(create_app(engine.config, engine)) as client:
        with Gate(engine) as gate:
            blocker = client.post(f"{JOBS}/jobs", json={"kind": "txt2img", "request": {"seed": 1, **SMALL}}).json()
            assert gate.started.wait(30)

            class GoneClient:  # a request whose client has disconnected
                async def receive(self):
                    return {"type": "http.disconnect"}

            async def submit_and_wait():
                req = Txt2ImgRequest.from_json(SMALL)
                job = engine.submit(req, engine.prepare(req), source="api", save=False)
                with anyio.move_on_after(0.5):
                    await runner.wait_for_job(GoneClient(), engine, job)
                return job
            job = client.portal.call(submit_and_wait)
            assert job.state == ("queued" if keep else "cancelled")
            gate.open()
            wait_state(client, blocker["id"])
            if keep:
                assert wait_state(client, job.id)["state"] == "done"
