"""A1111's scripts as jobs of the queue (server/runner.py): `/sdapi/v1/txt2img` with a `script_name` and
`/sd15/v1/jobs` with one are one visible, cancellable job; progress counts over all the script's generations;
an interrupt stops the script with what was made; a saved X/Y/Z grid lands under `txt2img-grids`."""
from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from server import runner
from server.app import Engine, create_app
from test_jobs import Gate, wait_state
from test_server import make_config, write_model_folders

SMALL = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 42, "sampler_name": "Euler"}
# X = Steps (txt2img axis 4) 1,2; Y = CFG Scale (axis 6) 5,9; no legend, so the grid is the four cells
XYZ = {"script_name": "x/y/z plot", "script_args": [4, "1,2", [], 6, "5,9", [], 0, "", [], False]}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("script-jobs")
    engine = Engine(make_config(write_model_folders(root), outdir=str(root / "out"), save=True))
    engine.start()
    with TestClient(create_app(engine.config, engine)) as client:
        yield engine, client


def image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_page_job_runs_a_script_and_saves_the_grid(env):
    engine, client = env
    r = client.post("/sd15/v1/jobs", json={"kind": "txt2img", "request": {**SMALL, **XYZ}})
    assert r.status_code == 202, r.text
    job = wait_state(client, r.json()["id"])
    assert job["state"] == "done" and job["summary"]["script"] == "x/y/z plot"
    grid = image(job["result"]["images"][0])
    assert len(job["result"]["images"]) == 1 and grid.shape == (128, 128, 3)
    # the grid's cells are the plain generations: row 1 (CFG 9), column 0 (1 step)
    plain = client.post("/sdapi/v1/txt2img", json={**SMALL, "steps": 1, "cfg_scale": 9})
    assert np.array_equal(grid[64:, :64], image(plain.json()["images"][0]))
    [path] = job["files"]
    assert path.startswith("txt2img-grids/") and path.endswith("-42.png")
    assert np.array_equal(np.asarray(Image.open(f"{engine.config.outdir}/{path}").convert("RGB")), grid)
    # script arguments are checked before anything queues: a 4xx at once
    bad = client.post("/sd15/v1/jobs", json={"kind": "txt2img", "request": {
        **SMALL, "script_name": "x/y/z plot", "script_args": [4, "1,x", []]}})
    assert bad.status_code == 400 and "not an integer" in bad.json()["detail"]


def test_saved_grid_follows_grid_format(env):
    engine, client = env
    opts = {"grid_format": "webp", "webp_lossless": True}
    assert client.post("/sdapi/v1/options", json=opts).status_code == 200
    try:
        job = wait_state(client, client.post("/sd15/v1/jobs", json={
            "kind": "txt2img", "request": {**SMALL, **XYZ}}).json()["id"])
    finally:
        client.post("/sdapi/v1/options", json={"grid_format": "png", "webp_lossless": False})
    [path] = job["files"]
    assert path.startswith("txt2img-grids/") and path.endswith("-42.webp")
    grid, answer = Image.open(f"{engine.config.outdir}/{path}"), job["result"]["images"][0]
    assert grid.format == "WEBP" and np.array_equal(np.asarray(grid.convert("RGB")), image(answer))
    assert Image.open(io.BytesIO(base64.b64decode(answer))).format == "PNG"  # the response: samples_format


def test_api_script_request_is_a_queued_cancellable_job(env):
    engine, client = env
    out = {}
    with Gate(engine) as gate:
        blocker = client.post("/sd15/v1/jobs", json={"kind": "txt2img", "request": SMALL}).json()
        assert gate.started.wait(30)
        t = threading.Thread(target=lambda: out.update(r=client.post("/sdapi/v1/txt2img", json={**SMALL, **XYZ})))
        t.start()
        deadline = time.time() + 30
        while not (queued := client.get("/sd15/v1/queue").json()["queued"]):
            assert time.time() < deadline
            time.sleep(0.02)
        [job] = queued
        assert job["source"] == "api" and job["summary"]["script"] == "x/y/z plot" and job["position"] == 1
        assert client.delete(f"/sd15/v1/jobs/{job['id']}").json()["state"] == "cancelled"
        t.join(30)
        gate.open()
    assert out["r"].status_code == 409 and out["r"].headers["x-sd15-job-state"] == "cancelled"
    wait_state(client, blocker["id"])


def test_interrupted_script_returns_what_was_made(env, monkeypatch):
    engine, client = env
    real, seen, calls = runner.make_callback, [], []

    def make(engine_, run, job, settings):
        inner = real(engine_, run, job, settings)

        def callback(step, sigma, x, denoised):
            inner(step, sigma, x, denoised)
            seen.append(dict(job.progress))
            if len(seen) == 3:  # the second cell (1 + 2 steps in): stop the script
                calls.append(client.delete(f"/sd15/v1/jobs/{job.id}").json()["state"])
        return callback
    monkeypatch.setattr(runner, "make_callback", make)
    r = client.post("/sd15/v1/jobs", json={"kind": "txt2img", "request": {**SMALL, **XYZ}, "save": False})
    job = wait_state(client, r.json()["id"])
    assert calls == ["running"] and job["state"] == "interrupted"
    # progress counts over the 4 cells: cell 0 (1 step) ends at 1/4, cell 1 (2 steps) goes on from there
    assert [(p["job_no"], p["job_count"]) for p in seen] == [(0, 4), (1, 4), (1, 4)]
    assert seen[0]["progress"] == pytest.approx(0.25) and seen[2]["progress"] == pytest.approx(0.5)
    grid = image(job["result"]["images"][0])
    assert grid.shape == (128, 128, 3) and not grid[64:].any()  # the cells never run stay blank


def test_each_cell_is_resolved_once(env, monkeypatch):
    """A script's cells are checked and resolved when the job is planned; the job runs those (issue 11)."""
    from sd15 import schema

    engine, client = env
    real, calls = schema.resolve, []

    def resolve(request, **kw):
        calls.append((request.steps, request.cfg_scale))
        return real(request, **kw)
    monkeypatch.setattr(schema, "resolve", resolve)
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, **XYZ})
    assert r.status_code == 200, r.text
    assert sorted(calls) == [(1, 5.0), (1, 9.0), (2, 5.0), (2, 9.0)]  # 4 cells: 4 resolves, not 8
