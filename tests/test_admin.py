"""server-kill / server-stop / server-restart behind --api-server-stop, and the /docs page (server/admin.py).

The exits are checked on real `python -m server` processes on a free loopback port; the routes' absence without
the flag and /docs through Starlette's TestClient.
"""
from __future__ import annotations

import html
import os
import subprocess
import sys
import threading
import time

import pytest
import requests
from starlette.testclient import TestClient

from server.app import create_app
from test_server import make_config, write_model_folders
from test_server_live import ROOT, free_port

API = "/sdapi/v1"
ADMIN = ("server-kill", "server-restart", "server-stop")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_model_folders(tmp_path_factory.mktemp("admin"))


@pytest.fixture(scope="module")
def client(folders):
    with TestClient(create_app(make_config(folders))) as c:
        yield c


def test_routes_are_absent_without_the_flag(client):
    for name in ADMIN:
        r = client.post(f"{API}/{name}")
        assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


def test_restart_without_a_supervisor_is_501(folders, monkeypatch):
    monkeypatch.delenv("SD_WEBUI_RESTART", raising=False)
    config = make_config(folders)
    config.flags["api_server_stop"] = True
    with TestClient(create_app(config)) as c:
        r = c.post(f"{API}/server-restart")
        assert r.status_code == 501 and r.content == b""


def test_docs_lists_every_route_of_the_openapi_document(client):
    doc = client.get("/openapi.json").json()
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<script" not in page.lower() and "https://" not in page and "http://" not in page  # no CDN, no JS
    for path, ops in doc["paths"].items():
        for method in ops:
            assert f'<span class="m {method.upper()}">{method.upper()}</span><code>{html.escape(path)}</code>' in page
    assert sum(len(ops) for ops in doc["paths"].values()) == page.count("<details")
    # request fields with type, default and range, and an example body
    assert ("<tr><td><code>gfpgan_visibility</code></td><td>number</td><td><code>0.0</code></td>"
            "<td>&gt;= 0; &lt;= 1</td>") in page
    assert "<td><code>resize_mode</code></td><td>integer</td><td><code>0</code></td><td>one of 0, 1</td>" in page
    assert "<td><code>upscaling_resize</code></td><td>number</td><td><code>2.0</code></td><td>&gt; 0</td>" in page
    assert "<code>image</code> <span class=\"req\">required</span>" in page  # png-info's required field
    assert "&quot;upscaler_1&quot;: &quot;None&quot;" in page


def test_docs_needs_the_same_auth(folders):
    with TestClient(create_app(make_config(folders, api_auth=[("u", "p")]))) as c:
        assert c.get("/docs").status_code == 401
        assert c.get("/docs", auth=("u", "p")).status_code == 200


# ---- live processes ------------------------------------------------------------------------------------------

def start(folders, tmp_path, *extra, env=None):
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--ckpt-dir", folders["ckpt_dir"], "--port", str(port), "--no-download",
           "--api-server-stop", *extra]
    base = {k: v for k, v in os.environ.items() if k != "SD_WEBUI_RESTART"}
    env = {**base, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    log = open(tmp_path / f"server-{port}.log", "wb")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}")
        try:
            if requests.get(f"{url}{API}/progress", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail("server did not start")
        time.sleep(0.2)


def finish(proc, timeout=60) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the server did not exit")


def test_stop_finishes_the_running_job_then_exits_0(folders, tmp_path):
    proc, url = start(folders, tmp_path)
    result = {}

    def generate():
        result["r"] = requests.post(f"{url}{API}/txt2img", json={"width": 64, "height": 64, "steps": 12}, timeout=120)
    t = threading.Thread(target=generate)
    t.start()
    deadline = time.time() + 30
    while requests.get(f"{url}{API}/progress").json()["state"]["job_count"] == 0 and time.time() < deadline:
        time.sleep(0.02)  # the job has started
    r = requests.post(f"{url}{API}/server-stop", timeout=30)
    assert r.status_code == 200 and r.text == "Stopping."
    t.join(120)
    assert finish(proc) == 0
    assert result["r"].status_code == 200 and len(result["r"].json()["images"]) == 1  # the job was finished


def test_kill_exits_at_once(folders, tmp_path):
    proc, url = start(folders, tmp_path)
    with pytest.raises(requests.ConnectionError):  # A1111's kill answers nothing: the process is gone
        requests.post(f"{url}{API}/server-kill", timeout=30)
    assert finish(proc) == 0


def test_restart_writes_the_marker_and_exits_0(folders, tmp_path):
    proc, url = start(folders, tmp_path, env={"SD_WEBUI_RESTART": "tmp/restart"})
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{url}{API}/server-restart", timeout=30)
    assert finish(proc) == 0
    assert (tmp_path / "tmp" / "restart").is_file()  # relative to the server's working directory
