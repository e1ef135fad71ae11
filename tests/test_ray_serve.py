"""`server/ray_serve.py` on a local Ray (2 CPUs, no dashboard): two workers at half a CPU each on tiny checkpoints,
driven over HTTP on 127.0.0.1 by `webuiapi` and `requests`, compared with the single-process server (`python -m
server`, same checkpoints) for pixels. One Ray session for the module; the last test shuts it down and looks for
leftovers.

On the CPU, PyTorch's results depend on its thread count (OMP_NUM_THREADS=1 and 2 differ in the last bit of a few
pixels), so the workers and the single server both run with OMP_NUM_THREADS=1 (Ray's own default for an actor
with under 2 CPUs)."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "sd15[ray]")')
pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "sd15[ray]")')
psutil = pytest.importorskip("psutil", reason="psutil comes with Ray")
requests = pytest.importorskip("requests")
webuiapi = pytest.importorskip("webuiapi")

from server import ray_serve  # noqa: E402
from test_server import make_config, write_model_folders  # noqa: E402
from test_server_live import free_port  # noqa: E402

pytestmark = pytest.mark.ray
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(width=64, height=64, steps=4, sampler_name="Euler a", cfg_scale=7)


class Cluster:
    def __init__(self, ray_url: str, single_url: str, single_pid: int):
        self.url, self.single, self.single_pid = ray_url, single_url, single_pid
        host, port = ray_url.split("//")[1].split(":")
        self.api = webuiapi.WebUIApi(host=host, port=int(port))
        host, port = single_url.split("//")[1].split(":")
        self.ref = webuiapi.WebUIApi(host=host, port=int(port))

    def get(self, path, **kw):
        r = requests.get(self.url + path, timeout=60, **kw)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    folders = write_model_folders(root)
    env = {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}  # this checkout's server/, one thread (see above)
    single_port = free_port()
    with open(root / "single.log", "wb") as log:  # the single-process server, for reference pixels
        single = subprocess.Popen([sys.executable, "-m", "server", "--ckpt-dir", folders["ckpt_dir"], "--port",
                                   str(single_port), "--no-download"], cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        port = free_port()
        ray_serve.start(make_config(folders), 2, port=port, worker_cpus=0.5, worker_gpus=0, max_queued=2)
        single_url = f"http://127.0.0.1:{single_port}"
        wait_for(lambda: _up(single_url), what=f"the single server: {(root / 'single.log').read_text()}")
        yield Cluster(f"http://127.0.0.1:{port}", single_url, single.pid)
    finally:
        single.terminate()
        single.wait(20)
        if ray.is_initialized():
            ray_serve.stop()


def _up(url: str) -> bool:
    try:
        return requests.get(url + "/sdapi/v1/progress", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def in_threads(*calls):
    """Run the calls at once -> their results (or exceptions) in order."""
    out = [None] * len(calls)

    def run(i, fn):
        try:
            out[i] = fn()
        except Exception as e:  # noqa: BLE001 - reported by the caller
            out[i] = e
    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def wait_for(predicate, timeout=60.0, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_concurrent_jobs_run_on_both_workers_with_single_server_pixels(cluster):
    seeds = [11, 12]
    results = in_threads(*[lambda s=s: cluster.api.txt2img(prompt="a red fox", seed=s, **FAST) for s in seeds])
    recent = cluster.get("/sd15/v1/queue")["recent"][:2]
    assert sorted(j["worker"] for j in recent) == [0, 1], recent
    assert all(j["state"] == "done" for j in recent)
    kept = cluster.get(f"/sd15/v1/jobs/{recent[0]['id']}")  # an A1111 request is a job like any other
    assert kept["source"] == "api" and kept["summary"]["prompt"] == "a red fox"
    seed = json.loads(kept["result"]["info"])["seed"]
    image = Image.open(io.BytesIO(base64.b64decode(kept["result"]["images"][0])))
    assert np.array_equal(pixels(image), pixels(results[seeds.index(seed)].image))
    a, b = sorted(recent, key=lambda j: j["started"])
    assert b["started"] < a["finished"]  # they ran at the same time
    for seed, result in zip(seeds, results):
        reference = cluster.ref.txt2img(prompt="a red fox", seed=seed, **FAST)
        assert np.array_equal(pixels(result.image), pixels(reference.image))
        assert result.info["infotexts"] == reference.info["infotexts"]


def read_events(response):
    """The (name, data) events of a server-sent event stream, comments skipped."""
    name = data = None
    for line in response.iter_lines(chunk_size=1, decode_unicode=True):  # no read-ahead
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "" and name:
            yield name, data
            name = data = None


def test_event_stream_through_the_ingress(cluster):
    """The single server's event stream, at the ingress: `queue` first, the job's `progress` from its worker
    (each preview once), `done` at the end."""
    with requests.get(cluster.url + "/sd15/v1/events", stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_events(r)
        first = next(events)
        assert first[0] == "queue" and first[1]["max_size"] == 2 and first[1]["running"] is None
        job_id = submit(cluster, dict(FAST, steps=200, prompt="streamed", seed=4, force_task_id="job-ev"))
        seen, deadline = [], time.time() + 60
        for event in events:
            seen.append(event)
            if event[0] == "done" and event[1]["id"] == job_id or time.time() > deadline:
                break
    assert seen[-1][0] == "done" and seen[-1][1]["state"] == "done" and "result" not in seen[-1][1]
    assert any(name == "queue" and d["running"] and d["running"]["id"] == job_id for name, d in seen)
    progress = [d for name, d in seen if name == "progress" and d["id"] == job_id]
    assert progress and all(0 < p["progress"] <= 1 and p["steps"] == 200 for p in progress), progress
    assert [p["step"] for p in progress] == sorted(p["step"] for p in progress)
    previews = [p["preview_step"] for p in progress if p["preview"] is not None]
    assert previews and len(previews) == len(set(previews))  # each preview sent once
    image = Image.open(io.BytesIO(base64.b64decode(next(p["preview"] for p in progress if p["preview"]))))
    assert image.format == "PNG" and image.size == (8, 8)  # the tiny model's cheap preview: one pixel a latent


def test_other_routes_answer_as_the_single_server(cluster):
    """Listings, the page, errors: forwarded to a worker, so byte for byte the single server's answer."""
    for method, path, body in [("GET", "/", None), ("GET", "/sdapi/v1/samplers", None),
                               ("GET", "/sdapi/v1/sd-models", None), ("GET", "/sdapi/v1/no-such-route", None),
                               ("POST", "/sdapi/v1/txt2img", {"steps": "many"}),
                               ("POST", "/sdapi/v1/txt2img", {"width": 7}),
                               ("POST", "/sdapi/v1/png-info", {"image": ""})]:
        ours = requests.request(method, cluster.url + path, json=body, timeout=60)
        theirs = requests.request(method, cluster.single + path, json=body, timeout=60)
        assert (ours.status_code, ours.content) == (theirs.status_code, theirs.content), path
        assert ours.headers.get("content-type") == theirs.headers.get("content-type")


def test_options_reach_every_worker_and_match_the_single_server(cluster):
    change = {"eta_noise_seed_delta": 31337, "sd_model_checkpoint": "sub/other.safetensors"}
    cluster.api.set_options(change)
    cluster.ref.set_options(change)
    title = cluster.ref.get_options()["sd_model_checkpoint"]
    assert title.startswith("sub/other.safetensors [")  # with the hash once loaded
    for i in (0, 1):
        options = cluster.get("/sdapi/v1/options", headers={"X-Sd15-Worker": str(i)})
        assert options["eta_noise_seed_delta"] == 31337 and options["sd_model_checkpoint"] == title
    assert cluster.get("/sdapi/v1/options")["eta_noise_seed_delta"] == 31337
    results = in_threads(*[lambda s=s: cluster.api.txt2img(prompt="a blue bird", seed=s, **FAST) for s in (5, 6)])
    assert sorted(j["worker"] for j in cluster.get("/sd15/v1/queue")["recent"][:2]) == [0, 1]
    for seed, result in zip((5, 6), results):
        reference = cluster.ref.txt2img(prompt="a blue bird", seed=seed, **FAST)
        assert "ENSD: 31337" in reference.info["infotexts"][0]
        assert np.array_equal(pixels(result.image), pixels(reference.image))


def test_bad_options_change_nothing(cluster):
    r = requests.post(cluster.url + "/sdapi/v1/options", json={"eta_noise_seed_delta": 1, "no_such": 1}, timeout=30)
    assert r.status_code == 400 and "no_such" in r.json()["detail"]
    for i in (0, 1):
        assert cluster.get("/sdapi/v1/options", headers={"X-Sd15-Worker": str(i)})["eta_noise_seed_delta"] == 31337


def submit(cluster, request: dict) -> str:
    r = requests.post(cluster.url + "/sd15/v1/jobs", json={"kind": "txt2img", "request": request}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def job_at_step(cluster, job_id: str, step: int = 2) -> dict:
    def reached():
        job = cluster.get(f"/sd15/v1/jobs/{job_id}")
        assert job["state"] in ("queued", "running"), job
        return job if (job.get("progress") or {}).get("step", 0) >= step else None
    return wait_for(reached, what=f"{job_id} to run")


def job_finished(cluster, job_id: str) -> dict:
    return wait_for(lambda: (lambda j: j if j["state"] not in ("queued", "running") else None)(
        cluster.get(f"/sd15/v1/jobs/{job_id}")), what=f"{job_id} to finish")


def test_interrupt_hits_the_right_job(cluster):
    """DELETE /sd15/v1/jobs/{id} stops that job; A1111's /sdapi/v1/interrupt stops the oldest running one; the
    job on the other worker runs to the end in both cases."""
    long = dict(FAST, steps=300)
    assert submit(cluster, dict(long, prompt="a cat", seed=1, force_task_id="job-a")) == "job-a"
    other = {}
    thread = threading.Thread(target=lambda: other.update(r=cluster.api.txt2img(prompt="a dog", seed=2, **long)))
    thread.start()
    job_at_step(cluster, "job-a")
    running = cluster.get("/sd15/v1/queue")["active"]
    assert len(running) == 2 and {j["worker"] for j in running} == {0, 1}
    assert requests.delete(cluster.url + "/sd15/v1/jobs/job-a", timeout=30).json()["state"] == "running"
    job_a = job_finished(cluster, "job-a")
    assert job_a["state"] == "interrupted" and len(job_a["result"]["images"]) == 1  # what it had
    dog = next(j for j in cluster.get("/sd15/v1/queue")["active"] if j["summary"]["prompt"] == "a dog")
    assert dog["state"] == "running"  # untouched
    short = dict(FAST, steps=30, prompt="a cow", seed=3)
    submit(cluster, dict(short, force_task_id="job-c"))
    job_at_step(cluster, "job-c")
    assert requests.post(cluster.url + "/sdapi/v1/interrupt", timeout=30).status_code == 200  # hits "a dog"
    thread.join(120)
    assert len(other["r"].images) == 1
    assert cluster.get(f"/sd15/v1/jobs/{dog['id']}")["state"] == "interrupted"
    job_c = job_finished(cluster, "job-c")
    assert job_c["state"] == "done" and job_c["worker"] == job_a["worker"] != dog["worker"]
    reference = cluster.ref.txt2img(**short)  # ran to the end: the single server's pixels
    image = Image.open(io.BytesIO(base64.b64decode(job_c["result"]["images"][0])))
    assert np.array_equal(pixels(image), pixels(reference.image))


def test_a_worker_killed_mid_job_fails_that_job_and_is_replaced(cluster):
    before = {w["index"]: w for w in cluster.get("/sd15/v1/workers")}
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=requests.post(
        cluster.url + "/sdapi/v1/txt2img", json=dict(FAST, steps=900, prompt="doomed", seed=3), timeout=120)))
    thread.start()
    job = wait_for(lambda: next((j for j in cluster.get("/sd15/v1/queue")["active"]
                                 if j["summary"]["prompt"] == "doomed"), None), what="the job to start")
    victim = before[job["worker"]]
    time.sleep(0.5)
    os.kill(victim["pid"], signal.SIGKILL)
    thread.join(120)
    r = out["r"]
    assert r.status_code == 502
    body = r.json()
    assert body["error"] == "WorkerDied" and f"worker {victim['index']}" in body["detail"]
    assert r.headers["x-sd15-worker"] == str(victim["index"])
    failed = next(j for j in cluster.get("/sd15/v1/queue")["recent"] if j["summary"]["prompt"] == "doomed")
    assert failed["state"] == "failed" and failed["error"]["status"] == 502
    # the next requests succeed, on both workers, the restarted one with the options set before it died
    results = in_threads(*[lambda s=s: cluster.api.txt2img(prompt="after", seed=s, **FAST) for s in (7, 8)])
    assert all(not isinstance(x, Exception) for x in results), results
    workers = {w["index"]: w for w in cluster.get("/sd15/v1/workers")}
    replaced = workers[victim["index"]]
    assert replaced["up"] and replaced["pid"] != victim["pid"] and replaced["restarts"] == 1
    options = cluster.get("/sdapi/v1/options", headers={"X-Sd15-Worker": str(victim["index"])})
    assert options["eta_noise_seed_delta"] == 31337 and options["sd_model_checkpoint"].startswith("sub/other.")
    reference = cluster.ref.txt2img(prompt="after", seed=7, **FAST)
    assert np.array_equal(pixels(results[0].image), pixels(reference.image))


def test_kept_override_settings_reach_every_worker(cluster):
    result = cluster.api.txt2img(prompt="kept", seed=9, override_settings={"eta_noise_seed_delta": 7},
                                 override_settings_restore_afterwards=False, **FAST)
    assert "ENSD: 7" in result.info["infotexts"][0]
    for i in (0, 1):
        assert cluster.get("/sdapi/v1/options", headers={"X-Sd15-Worker": str(i)})["eta_noise_seed_delta"] == 7
    cluster.api.txt2img(prompt="restored", seed=9, override_settings={"eta_noise_seed_delta": 8}, **FAST)
    for i in (0, 1):  # restored afterwards (webuiapi's default): nothing changes
        assert cluster.get("/sdapi/v1/options", headers={"X-Sd15-Worker": str(i)})["eta_noise_seed_delta"] == 7


def test_full_queue_answers_503_with_retry_after(cluster):
    long = dict(FAST, steps=300, prompt="busy")
    ids = []
    for i in range(4):  # two running, two waiting (max_queued=2)
        ids.append(submit(cluster, long))
        if i < 2:
            wait_for(lambda: len(cluster.get("/sd15/v1/queue")["active"]) == i + 1, what="a job to start")
    r = requests.post(cluster.url + "/sdapi/v1/txt2img", json=long, timeout=30)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and r.json()["error"] == "QueueFull"
    for job_id in reversed(ids):  # queued ones are cancelled, running ones interrupted
        requests.delete(f"{cluster.url}/sd15/v1/jobs/{job_id}", timeout=30)
    states = [job_finished(cluster, i)["state"] for i in ids]
    assert states == ["interrupted", "interrupted", "cancelled", "cancelled"]


def test_shutdown_leaves_no_ray_process(cluster):
    """Even with a worker being restarted at that moment."""
    started = min(p.create_time() for p in psutil.Process().children(recursive=True))
    os.kill(cluster.get("/sd15/v1/workers")[0]["pid"], signal.SIGKILL)
    time.sleep(1)
    children = [p for p in psutil.Process().children(recursive=True) if p.pid != cluster.single_pid]
    assert any("raylet" in " ".join(p.cmdline()) for p in children)
    ray_serve.stop()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], alive
    assert not ray.is_initialized()

    def ray_process(p):  # started by this module's Ray and still there, wherever it was reparented
        try:
            name = p.name()
            return p.create_time() >= started and p.status() != psutil.STATUS_ZOMBIE and (
                name.startswith("ray::") or name in ("raylet", "gcs_server"))
        except psutil.Error:
            return False
    assert not [p for p in psutil.process_iter() if ray_process(p)]
