"""Scale-out on Ray Serve: one HTTP ingress in front of N workers, each the complete single-process server.

    sd15-server --ray --replicas 2 --ckpt-dir weights          # one machine, one worker per GPU

Each worker (server/ray_worker.py) is a plain Ray actor hosting `create_app(config)` with its model loaded
once; the ingress hands it each request as an in-process ASGI call, so validation, errors and pixels are the
single server's by construction. Workers are actors, not Serve replicas, because the ingress must reach a
given worker (its job's progress and interrupt). The ingress, one Serve deployment, owns what must be in one
place:

- the queue: one bounded FIFO (503 with `Retry-After` when full); each free worker takes the next job;
- the options: a POST reaches every worker while jobs are held back and is replayed on a restarted worker;
  kept `override_settings` are copied to the other workers;
- job -> worker: `progress`, `interrupt` and `skip` go to the oldest running job's worker (A1111's current
  job), `/sd15/v1/jobs/{id}` to that job's; the event stream covers every worker;
- failures: a worker that dies mid-job fails that job with a 502 naming it; Ray restarts the actor
  (`max_restarts=-1`), which is given the options before it takes another job.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server import jobs
from server.a1111 import ApiError
from server.jobs_api import PROGRESS_EVERY, event_stream
from server.middleware import BasicAuth, error_body
from server.ray_worker import STALE, Worker

log = logging.getLogger("server.ray")

GENERATE = {"/sdapi/v1/txt2img": "txt2img", "/sdapi/v1/img2img": "img2img"}
OPTIONS = "/sdapi/v1/options"
BROADCAST = {OPTIONS, "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-vae", "/sdapi/v1/refresh-loras",
             "/sdapi/v1/refresh-embeddings", "/sdapi/v1/unload-checkpoint", "/sdapi/v1/reload-checkpoint"}
TO_CURRENT_JOB = {"/sdapi/v1/progress", "/sdapi/v1/interrupt", "/sdapi/v1/skip"}
WORKER_DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
NAMESPACE, WORKER_NAME = "sd15", "sd15-worker-"  # the workers' Ray names: sd15-worker-<ingress>-<index>


def _failure(status: int, error: str, detail: str, headers: Optional[dict] = None) -> tuple:
    """A reply (status, raw headers, body) with A1111's error body."""
    raw = [(b"content-type", b"application/json")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, raw, error_body(detail, error, detail)


def _response(reply: tuple, job: Optional[Job] = None) -> Response:
    """A worker's reply (or `_failure`) as the ingress's response; a job's carries its id and worker."""
    status, headers, body = reply
    response = Response(body, status)
    response.raw_headers = [(k, v) for k, v in headers if k.lower() != b"content-length"] \
        + [(b"content-length", str(len(body)).encode())]
    if job is not None:
        response.raw_headers += [(b"x-sd15-job", job.id.encode()),
                                 (b"x-sd15-worker", str(job.worker).encode())]
    return response


@dataclass
class Slot:
    index: int
    actor: object
    incarnation: Optional[str] = None  # None: (re)started and not yet given the options
    pid: Optional[int] = None
    node: Optional[str] = None
    restarts: int = -1  # counts the incarnations seen, the first included
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(eq=False)
class Job(jobs.Job):
    """A job of the ingress: `request` is the HTTP request for a worker, (path, raw headers, body)."""
    worker: Optional[int] = None
    reply: Optional[tuple] = None  # the worker's answer: (status, raw headers, body)
    preview_key: Optional[list] = None  # the worker's key of `preview`: asked for only when newer

    def json(self, position: Optional[int] = None, with_result: bool = False) -> dict:
        out = {**super().json(position), "worker": self.worker}
        if with_result and self.reply is not None and self.reply[0] == 200:
            out["result"], out["files"] = _json_body(self.reply), []
        return out


def _json_body(reply: tuple):
    """The JSON of a worker's answer, gzipped or not (the worker compresses for clients that accept it)."""
    status, headers, body = reply
    if (b"content-encoding", b"gzip") in [(k.lower(), v) for k, v in headers]:
        body = gzip.decompress(body)
    return json.loads(body)


def _summary(request: dict) -> dict:
    keys = {"prompt": "", "width": 512, "height": 512, "steps": 50, "sampler_name": None, "batch_size": 1,
            "n_iter": 1}
    return {k: request.get(k, default) for k, default in keys.items()}


class Ingress:
    """The HTTP face of the cluster: the one replica of a Ray Serve deployment (see `start`)."""

    def __init__(self, config, workers: int, worker_options: dict, max_queued: int):
        self.auth = BasicAuth(None, config.api_auth) if config.api_auth else None
        auth = [(b"authorization", b"Basic " + base64.b64encode(":".join(config.api_auth[0]).encode()))] \
            if config.api_auth else []
        self.internal_headers = auth + [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
        actor = ray.remote(Worker)
        name = f"{WORKER_NAME}{uuid.uuid4().hex[:8]}-"  # named so that `stop` finds them; unique per ingress
        self.slots = [Slot(i, actor.options(max_restarts=-1, max_task_retries=0, name=f"{name}{i}",
                                            namespace=NAMESPACE, **worker_options).remote(config, i))
                      for i in range(workers)]
        for slot, info in zip(self.slots, ray.get([s.actor.ready.remote() for s in self.slots])):
            self._seen(slot, info)  # every model is loaded before the deployment reports healthy
        self.queue = jobs.JobQueue(self._run, lanes=workers, max_size=max_queued)  # lane i: worker i
        self.lanes: list[asyncio.Task] = []  # the queue's worker tasks, started by the first request
        self.options_set: dict = {}  # every option POSTed so far, merged: what a replaced worker is given
        self.options_lock = asyncio.Lock()
        self.next_any = 0
        self.poller: Optional[asyncio.Task] = None  # asks the workers for progress while someone listens

    def __del__(self):
        """Serve's shutdown hook: stop the workers for good (none is restarted while the cluster goes away)."""
        for slot in getattr(self, "slots", []):
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def _seen(self, slot: Slot, info: dict) -> None:
        if info["incarnation"] != slot.incarnation:
            slot.restarts += 1
        slot.incarnation, slot.pid, slot.node = info["incarnation"], info["pid"], info["node"]

    async def __call__(self, request: Request) -> Response:
        if not self.lanes:
            loop = asyncio.get_running_loop()
            self.lanes = [loop.create_task(self.queue.worker(slot.index)) for slot in self.slots]
        path, method, headers = request.url.path, request.method, request.headers.raw
        if self.auth is not None and method != "OPTIONS":  # the queue is not for strangers
            problem = self.auth.check(request.headers.get("authorization"))
            if problem is not None:
                return _response(_failure(401, "HTTPException", problem, {"WWW-Authenticate": "Basic"}))
        body = await request.body()
        if method == "POST" and path in GENERATE:
            job = self._submit(GENERATE[path], path, headers, body, "api")
            if isinstance(job, Response):
                return job
            try:
                await job.finished.wait()
            except asyncio.CancelledError:  # the client went away: a job still waiting is dropped
                if job.state == "queued":
                    self.queue.cancel(job, "client")
                raise
            if job.reply is None:  # cancelled before it ran, or the ingress failed it
                job.reply = _failure(job.error.status, job.error.error, str(job.error))
            return _response(job.reply, job)
        if path.startswith("/sd15/v1/"):
            own = await self._own(path[len("/sd15/v1/"):], method, body)
            if own is not None:
                return own
        if method == "POST" and path in BROADCAST:  # every worker; answered with the first failure, if any
            replies = await self._broadcast(method, path, headers, body)
            if not replies:
                return _response(_failure(503, "Unavailable", "no worker is up"))
            if path == OPTIONS and any(r[0] == 200 for r in replies):
                self.options_set.update(json.loads(body))
            return _response(next((r for r in replies if r[0] != 200), replies[0]))
        slot = self._pick(request, path)
        if path == "/sdapi/v1/interrupt" and slot.index in self.queue.active:
            self.queue.active[slot.index].stop_reason = "interrupted"
        return _response(await self._call(slot, method, path, request.url.query.encode(), headers, body))

    def _pick(self, request: Request, path: str) -> Slot:
        """The worker for a forwarded request: `X-Sd15-Worker: i` pins it; progress/interrupt/skip go to the
        oldest running job's worker; anything else to the next worker in turn."""
        pinned = request.headers.get("x-sd15-worker", "")
        if pinned.isdigit() and int(pinned) < len(self.slots):
            return self.slots[int(pinned)]
        if path in TO_CURRENT_JOB and self.queue.running is not None:
            return self.slots[self.queue.running.worker]
        n = len(self.slots)
        for k in range(1, n + 1):  # the next worker that is up, else the next one
            slot = self.slots[(self.next_any + k) % n]
            if slot.incarnation is not None or k == n:
                self.next_any = slot.index
                return slot

    async def _call(self, slot: Slot, method, path, query, headers, body) -> tuple:
        """A non-job request to one worker; a dead one answers 502."""
        try:
            return await slot.actor.call.remote(method, path, query, list(headers), body, None)
        except WORKER_DIED as e:
            return self._died(slot, e)

    def _died(self, slot: Slot, e: Exception) -> tuple:
        """A worker died under a request -> the 502 reply. Ray restarts the actor; it is given the options
        as soon as it is back."""
        slot.incarnation = None

        async def resync():
            try:
                await self._sync(slot)
            except Exception:  # noqa: BLE001 - the next job tries again
                log.exception("worker %d: not back yet", slot.index)
        asyncio.get_running_loop().create_task(resync())
        return _failure(502, "WorkerDied", f"worker {slot.index} (pid {slot.pid}) died while handling this "
                        f"request; the request was not finished and is not retried; the worker is being "
                        f"restarted: {type(e).__name__}")

    def _submit(self, kind: str, path: str, headers, body: bytes, source: str):
        """Queue a job, or the 503 that says the queue is full."""
        try:
            request = json.loads(body)
        except ValueError:
            request = None  # the worker answers the 422
        request = request if isinstance(request, dict) else {}
        job_id = request.get("force_task_id")
        if not job_id or not isinstance(job_id, str) or job_id in self.queue.jobs:
            job_id = uuid.uuid4().hex[:12]
        try:
            return self.queue.put(Job(job_id, kind, (path, list(headers), body), _summary(request), source))
        except jobs.QueueFull as e:
            return _response(_failure(e.status, e.error, e.detail, e.headers))

    async def _run(self, job: Job, lane: int) -> None:
        """The queue's `run`: `job` on worker `lane`, whose reply goes to the client as it is; a reply that is
        not a 200, or a worker that died, fails the job."""
        slot, job.worker = self.slots[lane], lane
        try:
            for _ in range(2):  # a worker restarted since it was last seen is given the options first
                if slot.incarnation is None:
                    await self._sync(slot)
                path, headers, body = job.request
                job.reply = await slot.actor.call.remote("POST", path, b"", headers, body, slot.incarnation)
                if job.reply != STALE:
                    break
                slot.incarnation = None
            else:
                raise RuntimeError(f"worker {lane} restarted twice while starting the job")
        except WORKER_DIED as e:
            job.reply = self._died(slot, e)
        if job.reply[0] != 200:
            try:
                detail = str(_json_body(job.reply).get("detail", ""))
            except (ValueError, AttributeError, OSError):
                detail = ""
            raise ApiError(job.reply[0], detail)
        await self._keep_overrides(slot, job)

    async def _sync(self, slot: Slot) -> None:
        """A (re)started worker: wait for its model (Ray may still be restarting it, at most 10 minutes), then
        give it the options POSTed so far."""
        async with slot.lock:
            if slot.incarnation is not None:
                return
            deadline = time.time() + 600
            while True:
                try:
                    info = await slot.actor.ready.remote()
                    break
                except ray.exceptions.ActorUnavailableError:
                    if time.time() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            if self.options_set:
                body = json.dumps(self.options_set).encode()
                reply = await slot.actor.call.remote("POST", OPTIONS, b"", self.internal_headers, body,
                                                     info["incarnation"])
                if reply == STALE or reply[0] != 200:
                    raise RuntimeError(f"worker {slot.index}: replaying the options failed: {reply}")
            self._seen(slot, info)

    async def _broadcast(self, method: str, path: str, headers, body: bytes) -> list:
        """The same request to every worker, jobs held back meanwhile -> the replies; a worker being restarted
        is skipped (it gets the options when it is back)."""
        async with self.options_lock:
            self.queue.paused = True
            try:
                slots = [s for s in self.slots if s.incarnation is not None]
                return await asyncio.gather(*[self._call(s, method, path, b"", headers, body) for s in slots])
            finally:
                self.queue.resume()

    async def _keep_overrides(self, slot: Slot, job: Job) -> None:
        """`override_settings` without `override_settings_restore_afterwards` stay set (A1111): copy the values
        the worker kept to the other workers."""
        try:
            request = json.loads(job.request[2])
        except ValueError:
            return
        overrides = request.get("override_settings") or {}
        if not overrides or request.get("override_settings_restore_afterwards", True):
            return
        status, _, body = await self._call(slot, "GET", OPTIONS, b"", self.internal_headers, b"")
        if status != 200:
            return
        kept = {k: v for k, v in json.loads(body).items() if k in overrides}
        self.options_set.update(kept)
        others = [s for s in self.slots if s is not slot and s.incarnation is not None]
        body = json.dumps(kept).encode()
        await asyncio.gather(*[self._call(s, "POST", OPTIONS, b"", self.internal_headers, body)
                               for s in others])

    async def _own(self, rest: str, method: str, body: bytes) -> Optional[Response]:
        """/sd15/v1: the queue, jobs and workers as the ingress sees them; None: not the ingress's own."""
        if rest == "queue" and method == "GET":
            return JSONResponse(self.queue.snapshot())
        if rest == "workers" and method == "GET":
            active = {lane: job.id for lane, job in self.queue.active.items()}
            return JSONResponse([{"index": s.index, "pid": s.pid, "node": s.node, "up": s.incarnation is not None,
                                  "restarts": s.restarts, "job": active.get(s.index)} for s in self.slots])
        if rest == "jobs" and method == "POST":
            try:
                body = json.loads(body)
                kind, inner = body["kind"], body["request"]
                assert kind in ("txt2img", "img2img") and isinstance(inner, dict)
            except (ValueError, KeyError, TypeError, AssertionError):
                return JSONResponse({"detail": [{"loc": ["body"], "msg": "expected {\"kind\": \"txt2img\"|"
                                                 "\"img2img\", \"request\": {...}}", "type": "value_error"}]}, 422)
            if body.get("save", True):  # the page's default: saved like A1111's page, on the worker's machine
                inner = {**inner, "save_images": True}
            job = self._submit(kind, f"/sdapi/v1/{kind}", self.internal_headers, json.dumps(inner).encode(), "page")
            if isinstance(job, Response):
                return job
            return JSONResponse({"id": job.id, "position": self.queue.position(job)}, 202)
        if rest == "events" and method == "GET":  # the single server's stream; a poller feeds it the progress
            if self.poller is None or self.poller.done():
                self.poller = asyncio.get_running_loop().create_task(self._poll())
            return event_stream(self.queue)
        if rest.startswith("jobs/") and method in ("GET", "DELETE"):
            job = self.queue.get(rest[len("jobs/"):])
            if job is None:
                return JSONResponse({"detail": "Not Found"}, 404)
            if method == "DELETE":  # queued: dropped; running: marked, then interrupted on its worker
                self.queue.cancel(job, "interrupted")
                if job.state == "running":
                    slot = self.slots[job.worker]
                    await self._call(slot, "POST", "/sdapi/v1/interrupt", b"", self.internal_headers, b"")
            if job.state == "running":
                await self.refresh(job)
            return JSONResponse(job.json(self.queue.position(job), with_result=True))
        return None

    async def _poll(self) -> None:
        """While someone listens to the events: every 250 ms, the progress and new previews of every running
        job from its worker (Ray calls awaited concurrently, so the ingress's loop serves on meanwhile)."""
        while self.queue.listeners:
            await asyncio.gather(*[self.refresh(job) for job in self.queue.running_jobs()])
            await asyncio.sleep(PROGRESS_EVERY)

    async def refresh(self, job: Job) -> None:
        """The running `job`'s progress and newest preview, asked of its worker (a worker that does not answer
        within 5 s leaves them as they were)."""
        slot = self.slots[job.worker]
        try:
            p = await asyncio.wait_for(slot.actor.progress.remote(job.preview_key), 5)
        except Exception:  # noqa: BLE001 - dying or busy: nothing new
            return
        if p is None or self.queue.active.get(job.worker) is not job:  # idle, or the job finished meanwhile
            return
        job.progress, job.preview_step, preview, key = p
        if preview is not None:
            job.preview, job.preview_key = preview, key


def start(config, workers: int, *, host: str = "127.0.0.1", port: int = 7860, worker_cpus: float = 1.0,
          worker_gpus: Optional[float] = None, max_queued: Optional[int] = None,
          address: Optional[str] = None):
    """Join (`address`, e.g. "auto") or start a Ray cluster and serve the app on host:port; returns once every
    worker has loaded its model. `worker_gpus` None: one GPU per worker when the cluster has GPUs."""
    # folders as absolute paths: a worker runs in Ray's own working directory, maybe on another machine
    folders = {f.name: os.path.abspath(getattr(config, f.name)) for f in dataclasses.fields(config)
               if (f.name.endswith("_dir") or f.name == "outdir") and isinstance(getattr(config, f.name), str)}
    if config.ckpt and os.path.isfile(config.ckpt):
        folders["ckpt"] = os.path.abspath(config.ckpt)
    config = dataclasses.replace(config, **folders)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    if worker_gpus is None:
        worker_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    serve.start(http_options={"host": host, "port": port})
    ingress = serve.deployment(Ingress, name="sd15", num_replicas=1, max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0})  # one replica: it holds the queue
    options = {"num_cpus": worker_cpus, "num_gpus": worker_gpus}
    queued = max_queued if max_queued is not None else 16 * workers
    serve.run(ingress.bind(config, workers, options, queued), name="sd15", route_prefix="/")


def stop() -> None:
    """Stop the workers for good, then remove the app and Serve, and leave the Ray cluster (a local one started
    by `start` is shut down). The workers go first and are waited for: one that Ray is restarting at that moment
    would otherwise come back after its owner, the ingress, is gone and outlive the cluster."""
    try:
        if ray.is_initialized():
            def workers():
                return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                        if a["namespace"] == NAMESPACE and a["name"].startswith(WORKER_NAME)]
            for name in workers():
                try:
                    ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
                except ValueError:  # gone meanwhile
                    pass
            deadline = time.time() + 20
            while workers() and time.time() < deadline:  # a dead actor's name is released
                time.sleep(0.1)
        serve.shutdown()
    finally:
        ray.shutdown()


def main(config, args, host: str) -> int:
    """`sd15-server --ray ...`: serve until Ctrl-C or SIGTERM."""
    import signal
    import threading

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        start(config, args.replicas, host=host, port=args.port, worker_cpus=args.ray_worker_cpus,
              worker_gpus=args.ray_worker_gpus, max_queued=args.ray_max_queued, address=args.ray_address)
        print(f"sd15-server: {args.replicas} worker(s) on Ray behind http://{host}:{args.port}", flush=True)
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0
