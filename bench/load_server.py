"""Load test of `python -m server` on 127.0.0.1: concurrent clients, throughput, latency, memory, a full
queue, and clients that disconnect.

    python bench/load_server.py [--clients 8] [--jobs 200] [--burst 100] [--abandon 400 --keep 100]
                                [--steps 2 --size 64] [--ckpt-dir DIR]

Without --ckpt-dir it writes a tiny random-weight checkpoint (tests/synthetic.py) into a temp folder.
It starts its own server (--api-auth, --queue-size, --max-connections set for the phases) on a free
loopback port, and runs, in order:

1. load: `--clients` threads send `--jobs` txt2img requests in all -> throughput, p50/p95 latency, server
   RSS after the first 10 %, and after all (the target: within 10 %).
2. queue full: `--burst` requests at once on plain sockets against a queue of `--burst // 2` -> how many got
   503 with Retry-After, how long the refusals took; then the sockets are closed (their jobs cancelled).
3. disconnects: `--abandon + --keep` requests queued, `--abandon` clients leave -> how many jobs ran
   (from /metrics), how long the server took to be idle.
Nothing leaves 127.0.0.1. Prints a Markdown block for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTH = ("bench", "bench-pw")
BASIC = "Basic " + base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def metrics(url: str) -> dict:
    text = requests.get(f"{url}/metrics", auth=AUTH, timeout=30).text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")}


def wait_idle(url: str, timeout: float = 3600) -> float:
    t = time.time()
    while time.time() - t < timeout:
        q = requests.get(f"{url}/sd15/v1/queue", auth=AUTH, timeout=30).json()
        if q["running"] is None and not q["queued"]:
            return time.time() - t
        time.sleep(0.1)
    raise TimeoutError("server never became idle")


def raw_request(port: int, body: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall((f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {BASIC}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--abandon", type=int, default=400)
    ap.add_argument("--keep", type=int, default=100)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ckpt-dir", default=None)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="sd15-load-")
    ckpt_dir = args.ckpt_dir
    if ckpt_dir is None:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import synthetic

        ckpt_dir = os.path.join(tmp, "models")
        os.makedirs(ckpt_dir)
        synthetic.write_tiny_checkpoint(os.path.join(ckpt_dir, "tiny.safetensors"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    queue_size = max(args.burst // 2, args.abandon + args.keep, args.clients)
    cmd = [sys.executable, "-m", "server", "--ckpt-dir", ckpt_dir, "--port", str(port), "--no-download",
           "--api-auth", f"{AUTH[0]}:{AUTH[1]}", "--queue-size", str(queue_size), "--no-save",
           "--max-connections", str(args.burst + args.abandon + args.keep + 64)]
    log = open(os.path.join(tmp, "server.log"), "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    body = json.dumps({"prompt": "a cat", "steps": args.steps, "width": args.size, "height": args.size}).encode()
    out = {}
    try:
        deadline = time.time() + 300
        while True:
            try:
                if requests.get(f"{url}/sdapi/v1/progress", auth=AUTH, timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"server did not start; see {log.name}")
            time.sleep(0.2)
        out["rss_idle"] = rss_mb(proc.pid)

        # 1. load
        latencies, statuses, lock = [], [], threading.Lock()
        todo = iter(range(args.jobs))
        early = {}

        def client():
            with requests.Session() as s:
                for i in todo:
                    t = time.perf_counter()
                    r = s.post(f"{url}/sdapi/v1/txt2img", data=body, auth=AUTH, timeout=3600,
                               headers={"Content-Type": "application/json"})
                    with lock:
                        latencies.append(time.perf_counter() - t)
                        statuses.append(r.status_code)
                        if len(statuses) == max(1, args.jobs // 10):
                            early["rss"] = rss_mb(proc.pid)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        q = statistics.quantiles(latencies, n=20)
        out.update(load_ok=statuses.count(200), load_other=len(statuses) - statuses.count(200),
                   throughput=statuses.count(200) / elapsed, p50=statistics.median(latencies), p95=q[18],
                   rss_early=early.get("rss", float("nan")), rss_after=rss_mb(proc.pid), load_seconds=elapsed)

        # 2. queue full: a burst twice the free room; count the 503s
        before = metrics(url)
        room = queue_size
        n = room + args.burst
        socks = [raw_request(port, body) for _ in range(n)]
        refused, retry_after, t = 0, set(), time.perf_counter()
        for s in socks:
            s.settimeout(0.05)
        deadline = time.time() + 60
        pending = list(socks)
        while pending and time.time() < deadline:
            still = []
            for s in pending:
                try:
                    data = s.recv(4096)
                except socket.timeout:
                    still.append(s)
                    continue
                if data.startswith(b"HTTP/1.1 503"):
                    refused += 1
                    for line in data.split(b"\r\n"):
                        if line.lower().startswith(b"retry-after:"):
                            retry_after.add(int(line.split(b":")[1]))
            pending = still
            if refused >= n - room - 1:
                break
        out.update(burst=n, burst_room=room, burst_503=refused, burst_refuse_s=time.perf_counter() - t,
                   retry_after=sorted(retry_after)[:3])
        for s in socks:
            s.close()
        wait_idle(url)
        mid = metrics(url)

        # 3. disconnects: abandon + keep queued, the first `abandon` clients leave
        blocker = raw_request(port, json.dumps({"steps": 200, "width": args.size, "height": args.size}).encode())
        time.sleep(0.5)
        socks = [raw_request(port, body) for _ in range(args.abandon + args.keep)]
        while len(requests.get(f"{url}/sd15/v1/queue", auth=AUTH, timeout=30).json()["queued"]) < len(socks):
            time.sleep(0.1)
        for s in socks[:args.abandon]:
            s.close()
        blocker.close()
        t = time.time()
        idle = wait_idle(url)
        for s in socks[args.abandon:]:
            s.close()
        after = metrics(url)
        key = 'sd15_jobs_total{kind="txt2img",result="%s"}'
        out.update(disc_ran=after.get(key % "done", 0) - mid.get(key % "done", 0),
                   disc_cancelled=after.get(key % "cancelled", 0) - mid.get(key % "cancelled", 0),
                   disc_interrupted=after.get(key % "interrupted", 0) - mid.get(key % "interrupted", 0),
                   disc_idle_s=idle, burst_cancelled=mid.get(key % "cancelled", 0) - before.get(key % "cancelled", 0),
                   rss_end=rss_mb(proc.pid), its=after.get("sd15_iterations_per_second", 0))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out["exit"] = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out["exit"] = "killed"
    print(f"""
| phase | figure |
|---|---|
| load | {args.clients} clients, {args.jobs} txt2img {args.size}x{args.size} {args.steps} steps: {out['load_ok']} ok, {out['load_other']} other, {out['throughput']:.2f} jobs/s, p50 {out['p50']:.2f} s, p95 {out['p95']:.2f} s |
| server RSS (MB) | idle {out['rss_idle']:.0f}, after {max(1, args.jobs // 10)} jobs {out['rss_early']:.0f}, after {args.jobs} jobs {out['rss_after']:.0f} ({(out['rss_after'] / out['rss_early'] - 1) * 100:+.1f} %), end {out['rss_end']:.0f} |
| queue full | {out['burst']} requests at once, room {out['burst_room']}: {out['burst_503']} answered 503 (Retry-After {out['retry_after']}) within {out['burst_refuse_s']:.2f} s; closing the rest cancelled {out['burst_cancelled']:.0f} queued jobs |
| disconnects | {args.abandon + args.keep} queued, {args.abandon} clients left: {out['disc_ran']:.0f} jobs ran, {out['disc_cancelled']:.0f} cancelled, {out['disc_interrupted']:.0f} interrupted; idle after {out['disc_idle_s']:.1f} s |
| exit | SIGTERM -> exit status {out['exit']} |
""")


if __name__ == "__main__":
    main()
