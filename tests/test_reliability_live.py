"""Connection-level defects of issue 15 against a real `python -m server` on 127.0.0.1 (tiny checkpoint):
disconnecting clients (D1), header/body timeouts and the connection limit (D12), shutdown (D13), the event
stream, the per-job log line. Each test is bounded in time and in the number of connections."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

requests = pytest.importorskip("requests")

from test_server import write_model_folders  # noqa: E402
from test_server_live import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTH = ("admin", "pw-for-tests")
BASIC = "Basic " + base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()


class LiveServer:
    """`python -m server` on a free 127.0.0.1 port over tiny checkpoints in `root`, ready when it answers
    `/progress`. `prepare(folders)` may add files before the start; `auth` is the --api-auth pair."""

    def __init__(self, root, *flags, max_files: int | None = None, auth=AUTH, prepare=None):
        folders = write_model_folders(root)
        if prepare is not None:
            prepare(folders)
        self.auth = auth
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        cmd = [sys.executable, "-m", "server", "--ckpt-dir", folders["ckpt_dir"], "--port", str(self.port),
               "--api-auth", f"{auth[0]}:{auth[1]}", "--no-download", "--outdir", str(root / "out"), *flags]
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        def limit():  # in the child, before exec
            if max_files is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=limit)
        deadline = time.time() + 120
        while True:
            assert self.proc.poll() is None, self.log()
            try:
                if requests.get(f"{self.url}/sdapi/v1/progress", auth=auth, timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, self.log()
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path):
        return requests.get(self.url + path, auth=self.auth, timeout=30)

    def raw(self, method: str, path: str, body: bytes = b"", declared: int | None = None) -> socket.socket:
        """A request sent on a plain socket (so the test can drop the connection)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {BASIC}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body) if declared is None else declared}\r\n\r\n")
        s.sendall(head.encode() + body)
        return s

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = LiveServer(tmp_path_factory.mktemp("live-rel"), "--header-timeout", "1", "--body-timeout", "1",
                   "--max-connections", "16")
    yield s
    s.stop()


def job_body(steps, seed=1) -> bytes:
    return json.dumps({"steps": steps, "width": 64, "height": 64, "seed": seed}).encode()


def wait_idle(server, timeout=120):
    deadline = time.time() + timeout
    while True:
        q = server.get("/sd15/v1/queue").json()
        if q["running"] is None and not q["queued"]:
            return q
        assert time.time() < deadline, q
        time.sleep(0.1)


def test_startup_lines(server):
    log = server.log()
    assert f"page and API at http://127.0.0.1:{server.port}/" in log


def test_disconnected_clients_waste_no_job(server):
    """D1: a client that leaves gets its queued job cancelled and its running job interrupted."""
    runner = server.raw("POST", "/sdapi/v1/txt2img", job_body(1000))
    deadline = time.time() + 60
    while server.get("/sd15/v1/queue").json()["running"] is None:
        assert time.time() < deadline
        time.sleep(0.05)
    waiting = [server.raw("POST", "/sdapi/v1/txt2img", job_body(2, seed=10 + i)) for i in range(5)]
    deadline = time.time() + 30
    while len(server.get("/sd15/v1/queue").json()["queued"]) < 5:
        assert time.time() < deadline
        time.sleep(0.05)
    for s in waiting + [runner]:
        s.close()
    t = time.time()
    wait_idle(server)
    assert time.time() - t < 30  # the 1000-step job did not run on
    jobs = {j["summary"]["steps"]: j for j in server.get("/sd15/v1/jobs").json()}
    states = [j["state"] for j in server.get("/sd15/v1/jobs").json() if j["summary"]["steps"] == 2]
    assert states == ["cancelled"] * 5
    assert jobs[1000]["state"] == "interrupted"
    # a loaded machine may interrupt the job before its first step reports progress (progress is then None)
    assert (jobs[1000]["progress"] or {"step": 0})["step"] < 1000


def test_header_and_body_timeouts(server):
    """D12: a request head or body that never completes is dropped (head) or answered 408 (body)."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    t = time.time()
    assert s.recv(1000) == b"" and time.time() - t < 8
    s.close()
    s = server.raw("POST", "/sdapi/v1/txt2img", b'{"prompt": ', declared=1000)
    t = time.time()
    answer = b""
    while b'"detail"' not in answer and time.time() - t < 10:  # head and body may come in separate reads
        chunk = s.recv(10000)
        if not chunk:
            break
        answer += chunk
    answer = answer.decode()
    assert time.time() - t < 8
    assert answer.startswith("HTTP/1.1 408") and '"detail"' in answer
    s.close()


def test_connection_limit_and_flood_logged_once(server):
    """D12: beyond --max-connections new connections are closed at once (and logged once), and the server
    still answers afterwards."""
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(40)]
    closed = 0
    for s in socks:
        s.settimeout(0.5)
        try:
            closed += s.recv(10) == b""
        except (socket.timeout, ConnectionResetError):
            closed += isinstance(sys.exc_info()[1], ConnectionResetError)
    for s in socks:
        s.close()
    assert closed >= 40 - 16
    assert server.log().count("open connections: closing new ones") == 1
    time.sleep(1.5)
    assert server.get("/sdapi/v1/progress").status_code == 200


def test_file_limit_flood_logged_once(tmp_path):
    """D12: at the process's file limit every refused accept was logged; now once a minute."""
    server = LiveServer(tmp_path, "--max-connections", "5000", max_files=150)
    try:
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(400)]
        time.sleep(3)
        for s in socks:
            s.close()
        time.sleep(1)
        assert server.get("/sdapi/v1/progress").status_code == 200  # serving again
    finally:
        server.stop()
    log = server.log()
    assert log.count("out of system resource") == 1 and len(log) < 20000, log[-3000:]


def test_event_stream(server):
    """The page's event stream: `queue` first, `progress` while the job runs (previews only when new),
    `done` at the end."""
    wait_idle(server)
    with requests.get(f"{server.url}/sd15/v1/events", auth=AUTH, stream=True, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines(decode_unicode=True)
        events = []

        def read_event():
            name = data = None
            for line in lines:
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                elif line == "" and name:
                    return name, data
        events.append(read_event())
        assert events[0][0] == "queue"
        job = requests.post(f"{server.url}/sd15/v1/jobs", auth=AUTH, timeout=30, json={
            "kind": "txt2img", "request": {"steps": 40, "width": 64, "height": 64, "seed": 3}, "save": False}).json()
        deadline = time.time() + 120
        while not (events[-1][0] == "done" and events[-1][1]["id"] == job["id"]):
            assert time.time() < deadline
            events.append(read_event())
    progress = [d for name, d in events if name == "progress" and d["id"] == job["id"]]
    assert progress and all(0 <= p["progress"] <= 1 for p in progress)
    previews = [p["preview_step"] for p in progress if p["preview"] is not None]
    assert previews and len(previews) == len(set(previews))  # each preview sent once
    assert events[-1][1]["state"] == "done" and "result" not in events[-1][1]
    assert any(name == "queue" and d["running"] and d["running"]["id"] == job["id"] for name, d in events)
    result = server.get(f"/sd15/v1/jobs/{job['id']}").json()
    assert len(result["result"]["images"]) == 1 and result["files"] == []
    assert f"job {job['id']} txt2img 64x64 steps=40 sampler=Euler batch=1x1: done in" in server.log()


def _post_in_thread(server, body: bytes, out: list):
    def run():
        try:
            r = requests.post(f"{server.url}/sdapi/v1/txt2img", data=body, auth=AUTH, timeout=120,
                              headers={"Content-Type": "application/json"})
            out.append((r.status_code, r.headers.get("content-type"), r.text))
        except requests.RequestException as e:
            out.append((None, None, repr(e)))
    t = threading.Thread(target=run)
    t.start()
    return t


def test_shutdown_grace_and_forced_quit(tmp_path):
    """D13: SIGTERM fails the queued jobs at once (503, JSON), lets the running one finish within the grace
    period (then interrupts it: 200 with what it made) and exits 0; a second signal exits non-zero."""
    server = LiveServer(tmp_path / "a", "--shutdown-grace", "1")
    out_running, out_queued = [], []
    threads = [_post_in_thread(server, job_body(1000), out_running)]
    deadline = time.time() + 60
    while server.get("/sd15/v1/queue").json()["running"] is None:
        assert time.time() < deadline
        time.sleep(0.05)
    threads += [_post_in_thread(server, job_body(2, seed=5 + i), out_queued) for i in range(2)]
    while len(server.get("/sd15/v1/queue").json()["queued"]) < 2:
        assert time.time() < deadline
        time.sleep(0.05)
    t = time.time()
    assert server.stop(signal.SIGTERM, timeout=60) == 0
    assert time.time() - t < 30
    for th in threads:
        th.join(60)
    assert [(s, ct) for s, ct, _ in out_queued] == [(503, "application/json")] * 2
    assert "shutting down" in json.loads(out_queued[0][2])["detail"]
    status, ct, text = out_running[0]
    assert status == 200 and len(json.loads(text)["images"]) == 1

    (tmp_path / "b").mkdir()
    server = LiveServer(tmp_path / "b", "--shutdown-grace", "60")
    out = []
    th = _post_in_thread(server, job_body(1000), out)
    while server.get("/sd15/v1/queue").json()["running"] is None:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    t = time.time()
    assert server.stop(signal.SIGINT, timeout=30) == 1
    assert time.time() - t < 20
    th.join(30)
    status, ct, text = out[0]
    assert status is None or ct == "application/json", text  # never a plain-text 500
    assert "forced quit" in server.log()


def test_startup_warnings():
    from server.__main__ import config_from_args, _parser, startup_warnings

    config = config_from_args(_parser().parse_args(["--listen"]))
    assert any("WITHOUT --api-auth" in line for line in startup_warnings("0.0.0.0", config))
    assert startup_warnings("127.0.0.1", config) == []
    config = config_from_args(_parser().parse_args(["--listen", "--api-auth", "a:b", "--cors-allow-origins", "*"]))
    lines = startup_warnings("0.0.0.0", config)
    assert len(lines) == 1 and "credentials" in lines[0]
