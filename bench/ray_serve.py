"""Throughput and per-request overhead of `sd15-server --ray` against the single-process server, on the tiny
synthetic checkpoint (a CPU measurement of the serving layer, not of the model).

    python bench/ray_serve.py --requests 24 --steps 4

Runs, one after another: the single-process server (`python -m server`, OMP_NUM_THREADS=1), then Ray with 1
and 2 workers (one CPU and one thread each). For each: requests per second with 2 clients per worker sending
txt2img 64x64, and the mean latency of sequential requests (GET /sdapi/v1/samplers: routing only; txt2img with
one step); the time outside the app (the client's time less the app's `X-Process-Time`) is what the transport
costs: the socket for the single server, plus Serve's proxy, the ingress and two Ray calls behind Ray.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def load(url: str, n: int, clients: int, steps: int) -> float:
    """n txt2img requests from `clients` threads -> requests per second."""
    todo = list(range(n))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                if not todo:
                    return
                seed = todo.pop()
            r = requests.post(url + "/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": seed, "steps": steps,
                                                               "width": 64, "height": 64}, timeout=600)
            r.raise_for_status()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n / (time.perf_counter() - start)


def latency(url: str, repeat: int) -> dict:
    """Mean seconds of sequential cheap requests (after one warm-up each), at the client and inside the app."""
    gen = {"prompt": "a cat", "seed": 1, "steps": 1, "width": 64, "height": 64}
    out = {}
    for name, call in [("samplers", lambda: requests.get(url + "/sdapi/v1/samplers", timeout=60)),
                       ("txt2img_1step", lambda: requests.post(url + "/sdapi/v1/txt2img", json=gen, timeout=60))]:
        call().raise_for_status()
        times, inside = [], []
        for _ in range(repeat):
            t = time.perf_counter()
            r = call()
            times.append(time.perf_counter() - t)
            r.raise_for_status()
            inside.append(float(r.headers["x-process-time"]))  # the app's own time, set inside the server
        out[name], out[name + "_app"] = statistics.mean(times), statistics.mean(inside)
    return out


def wait_up(url: str, proc=None, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if requests.get(url + "/sdapi/v1/progress", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--ray-first", action="store_true", help="run the Ray configurations before the single server")
    args = ap.parse_args()
    from test_server import make_config, write_model_folders
    from test_server_live import free_port

    folders = write_model_folders(Path(tempfile.mkdtemp()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rows = []

    def single():
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "server", "--ckpt-dir", folders["ckpt_dir"], "--port",
                                 str(port), "--no-download"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_up(url, proc)
            rows.append(("single process", load(url, args.requests, 2, args.steps), latency(url, args.repeat)))
        finally:
            proc.terminate()
            proc.wait()

    def on_ray():
        import ray

        from server import ray_serve
        for workers in (1, 2):
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
            port = free_port()
            try:
                ray_serve.start(make_config(folders), workers, port=port, worker_cpus=1, worker_gpus=0,
                                max_queued=4 * args.requests)
                url = f"http://127.0.0.1:{port}"
                rows.append((f"ray, {workers} worker(s)", load(url, args.requests, 2 * workers, args.steps),
                             latency(url, args.repeat)))
            finally:
                ray_serve.stop()

    for part in ((on_ray, single) if args.ray_first else (single, on_ray)):
        part()
    print(f"| server | txt2img 64x64 {args.steps} steps, req/s | GET samplers, ms | txt2img 1 step, ms "
          f"| of which in the app, ms | outside the app, ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rps, lat in rows:
        app, total = lat["txt2img_1step_app"] * 1e3, lat["txt2img_1step"] * 1e3
        print(f"| {name} | {rps:.2f} | {lat['samplers'] * 1e3:.1f} | {total:.1f} | {app:.1f} | {total - app:.1f} |")


if __name__ == "__main__":
    main()
