"""Scale-out on Ray Serve: one HTTP ingress in front of N workers, each the complete single-process server.

    sd15-server --ray --replicas 2 --ckpt-dir weights          # one machine, one worker per GPU

Each worker is a Ray actor hosting `server.app.create_app(config)` and loading the model once; the ingress
hands it a request as an in-process ASGI call, so validation, errors and pixels are the single server's by
construction; of the server this module knows `create_app`, `ServerConfig.api_auth`, `BasicAuth`, the HTTP
API and, for the event stream, the running job's progress and preview on a worker's engine, nothing else.
Workers are plain Ray actors, not Serve replicas, because Serve picks a replica itself and the ingress must
reach a given worker (its job's progress and interrupt, options for a replaced one). The
ingress (one Ray Serve deployment) owns what must be in one place:

- the queue: one FIFO for the whole cluster (bounded; 503 with `Retry-After` when full) from which every free
  worker takes the next job, at most one at a time per worker (a worker's own queue is bounded at one);
- the options: a POST is applied to every worker (jobs are held back while it is), remembered, and replayed on
  a worker that was replaced; `override_settings` kept after a job are copied to the other workers;
- job -> worker: `/sdapi/v1/progress`, `interrupt` and `skip` go to the worker of the oldest running job (what
  A1111's single queue would call the current job), `/sd15/v1/jobs/{id}` to that job's worker;
- the event stream `/sd15/v1/events` (server/ray_events.py): the single server's, over every worker;
- failures: a worker that dies mid-job makes that job fail with a 502 naming the worker, Ray restarts the actor
  (`max_restarts=-1`), and the options are replayed before it takes another job.
"""
from __future__ import annotations

import asyncio
import base64
import collections
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

from server import ray_events
from server.ray_worker import STALE, Worker

log = logging.getLogger("server.ray")

GENERATE = {"/sdapi/v1/txt2img": "txt2img", "/sdapi/v1/img2img": "img2img"}
BROADCAST = {"/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-vae", "/sdapi/v1/refresh-loras",
             "/sdapi/v1/refresh-embeddings", "/sdapi/v1/unload-checkpoint", "/sdapi/v1/reload-checkpoint"}
TO_CURRENT_JOB = {"/sdapi/v1/progress", "/sdapi/v1/interrupt", "/sdapi/v1/skip"}
WORKER_DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
RECENT = 50
NAMESPACE, WORKER_NAME = "sd15", "sd15-worker-"  # the workers' Ray names: sd15-worker-<ingress>-<index>


def _error(status: int, detail: str, error: str, headers: Optional[dict] = None) -> JSONResponse:
    """A1111's error body."""
    return JSONResponse({"error": error, "detail": detail, "body": "", "errors": detail}, status, headers=headers)


# =============================================================================================
# The ingress: queue, options, job -> worker
# =============================================================================================

@dataclass
class Slot:
    index: int
    actor: object
    incarnation: Optional[str] = None  # None: (re)started and not yet given the options
    pid: Optional[int] = None
    node: Optional[str] = None
    job: Optional["Job"] = None
    restarts: int = -1  # counts the incarnations seen, the first included
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Job:
    id: str
    kind: str
    path: str
    headers: list
    body: bytes
    source: str  # "api" | "page"
    summary: dict
    created: float = field(default_factory=time.time)
    state: str = "queued"
    started: Optional[float] = None
    finished: Optional[float] = None
    worker: Optional[int] = None
    stop: Optional[str] = None  # "interrupted" when interrupt/DELETE reached it
    error: Optional[dict] = None
    reply: Optional[tuple] = None  # (status, raw headers, body)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    progress: Optional[dict] = None  # the last progress its worker reported (while someone listens)
    preview: Optional[str] = None  # base64 PNG of the latest preview, made at `preview_step`
    preview_step: int = 0
    preview_key: Optional[list] = None  # the worker's key of that preview: asked for only when newer

    def json(self, position: Optional[int] = None, result: bool = False) -> dict:
        out = {"id": self.id, "kind": self.kind, "state": self.state, "position": position,
               "created": self.created, "started": self.started, "finished": self.finished, "source": self.source,
               "summary": self.summary, "progress": self.progress, "error": self.error, "worker": self.worker}
        if result and self.reply is not None and self.reply[0] == 200:
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
    """The HTTP face of the cluster (a Ray Serve deployment; see `deployment`)."""

    def __init__(self, config, workers: int, worker_options: dict, max_queued: int):
        from server.app import BasicAuth

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
        self.max_queued = max_queued
        self.waiting: collections.deque = collections.deque()
        self.jobs: dict = {}  # id -> Job: queued, running and the last RECENT finished
        self.options_set: dict = {}  # every option POSTed so far, merged: what a replaced worker is given
        self.options_lock = asyncio.Lock()
        self.broadcasting = False  # jobs wait while options are being applied everywhere
        self.durations: collections.deque = collections.deque(maxlen=20)
        self.next_any = 0
        self.listeners: set = set()  # the event streams' inboxes
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

    # --- HTTP ----------------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        if self.auth is not None and method != "OPTIONS":  # the queue is not for strangers
            problem = self.auth.check(request.headers.get("authorization"))
            if problem is not None:
                return _error(401, problem, "HTTPException", {"WWW-Authenticate": "Basic"})
        if method == "POST" and path in GENERATE:
            body = await request.body()
            job = self._submit(GENERATE[path], path, request.headers.raw, body, "api")
            if isinstance(job, Response):
                return job
            try:
                await job.done.wait()
            except asyncio.CancelledError:  # the client went away: a job still waiting is dropped
                if job in self.waiting:
                    self.waiting.remove(job)
                    job.state, job.finished = "cancelled", time.time()
                    self._publish("done", job.json())
                    self._changed()
                raise
            return self._reply(job.reply, job)
        if path.startswith("/sd15/v1/"):
            own = await self._own(request, path[len("/sd15/v1/"):], method)
            if own is not None:
                return own
        if method == "POST" and path == "/sdapi/v1/options":
            return await self._set_options(request.headers.raw, await request.body())
        if method == "POST" and path in BROADCAST:
            replies = await self._broadcast(method, path, request.headers.raw, await request.body())
            return self._reply(replies[0][1]) if replies else _error(503, "no worker is up", "Unavailable")
        slot = self._pick(request, path)
        if path == "/sdapi/v1/interrupt" and slot.job is not None:
            slot.job.stop = "interrupted"
        reply = await self._call(slot, method, path, request.url.query.encode(), request.headers.raw,
                                 await request.body())
        return self._reply(reply)

    def _reply(self, reply, job: Optional[Job] = None) -> Response:
        status, headers, body = reply
        response = Response(body, status)
        response.raw_headers = [(k, v) for k, v in headers if k.lower() != b"content-length"] \
            + [(b"content-length", str(len(body)).encode())]
        if job is not None:
            response.raw_headers += [(b"x-sd15-job", job.id.encode()), (b"x-sd15-worker", str(job.worker).encode())]
        return response

    def _pick(self, request: Request, path: str) -> Slot:
        """The worker for a forwarded request: `X-Sd15-Worker: i` pins it; progress/interrupt/skip go to the
        oldest running job's worker; anything else to the next worker in turn."""
        pinned = request.headers.get("x-sd15-worker", "")
        if pinned.isdigit() and int(pinned) < len(self.slots):
            return self.slots[int(pinned)]
        running = self.running_jobs()
        if path in TO_CURRENT_JOB and running:
            return self.slots[running[0].worker]
        n = len(self.slots)
        for k in range(1, n + 1):  # the next worker that is up, else the next one
            slot = self.slots[(self.next_any + k) % n]
            if slot.incarnation is not None or k == n:
                self.next_any = slot.index
                return slot

    async def _call(self, slot: Slot, method, path, query, headers, body) -> tuple:
        """A non-job request to one worker; a dead one answers 502."""
        try:
            reply = await slot.actor.call.remote(method, path, query, list(headers), body, None)
        except WORKER_DIED as e:
            self._replace(slot)
            return 502, [(b"content-type", b"application/json")], json.dumps(self._died(slot, e)).encode()
        return reply

    def _replace(self, slot: Slot) -> None:
        """A worker died: Ray restarts the actor; give it the options as soon as it is back."""
        slot.incarnation = None

        async def resync():
            try:
                await self._sync(slot)
            except Exception:  # noqa: BLE001 - the next job tries again
                log.exception("worker %d: not back yet", slot.index)
        asyncio.get_running_loop().create_task(resync())

    def _died(self, slot: Slot, e: Exception) -> dict:
        detail = (f"worker {slot.index} (pid {slot.pid}) died while handling this request; the request was not "
                  f"finished and is not retried; the worker is being restarted: {type(e).__name__}")
        return {"error": "WorkerDied", "detail": detail, "body": "", "errors": detail}

    # --- queue ---------------------------------------------------------------------------------

    def _submit(self, kind: str, path: str, headers, body: bytes, source: str):
        """Queue a job, or the 503 that says the queue is full."""
        if len(self.waiting) >= self.max_queued:
            busy = len(self.waiting) + len(self.running_jobs())
            mean = sum(self.durations) / len(self.durations) if self.durations else 10.0
            retry = max(1, round(mean * busy / len(self.slots)))
            return _error(503, f"the queue is full ({self.max_queued} jobs waiting); retry in {retry} s",
                          "QueueFull", {"Retry-After": str(retry)})
        try:
            request = json.loads(body)
        except ValueError:
            request = None  # the worker gives the 422
        request = request if isinstance(request, dict) else {}
        job_id = request.get("force_task_id") or uuid.uuid4().hex[:12]
        if not isinstance(job_id, str) or job_id in self.jobs:
            job_id = uuid.uuid4().hex[:12]
        job = Job(job_id, kind, path, list(headers), body, source, _summary(request))
        self.jobs[job.id] = job
        self.waiting.append(job)
        if not self._pump():
            self._changed()
        return job

    def running_jobs(self) -> list:
        return sorted((s.job for s in self.slots if s.job is not None), key=lambda j: j.started)

    def _pump(self) -> bool:
        """Give every free worker the next waiting job (none while options are being applied) -> whether one
        started (the queue changed and was announced)."""
        started = False
        while self.waiting and not self.broadcasting:
            slot = next((s for s in self.slots if s.job is None), None)
            if slot is None:
                break
            job = self.waiting.popleft()
            job.state, job.started, job.worker, slot.job = "running", time.time(), slot.index, job
            asyncio.get_running_loop().create_task(self._run(slot, job))
            started = True
        if started:
            self._changed()
        return started

    async def _run(self, slot: Slot, job: Job) -> None:
        try:
            for _ in range(2):
                if slot.incarnation is None:
                    await self._sync(slot)
                reply = await slot.actor.call.remote("POST", job.path, b"", job.headers, job.body, slot.incarnation)
                if reply != STALE:
                    break
                slot.incarnation = None
            job.reply = reply
            if reply[0] == 200:
                job.state = job.stop or "done"
                await self._keep_overrides(slot, job)
            else:
                job.state = "failed"
                try:
                    detail = _json_body(reply).get("detail", "")
                except (ValueError, AttributeError, OSError):
                    detail = ""
                job.error = {"status": reply[0], "detail": str(detail)}
        except WORKER_DIED as e:
            self._replace(slot)
            body = self._died(slot, e)
            job.state, job.error = "failed", {"status": 502, "detail": body["detail"]}
            job.reply = 502, [(b"content-type", b"application/json")], json.dumps(body).encode()
        except Exception as e:  # noqa: BLE001 - never leave a caller waiting
            log.exception("job %s", job.id)
            job.state, job.error = "failed", {"status": 500, "detail": f"{type(e).__name__}: {e}"}
            job.reply = 500, [(b"content-type", b"application/json")], json.dumps(
                {"error": type(e).__name__, "detail": str(e), "body": "", "errors": str(e)}).encode()
        finally:
            job.finished, slot.job = time.time(), None
            self.durations.append(job.finished - job.started)
            job.done.set()
            self._forget_old()
            self._publish("done", job.json())
            if not self._pump():
                self._changed()

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.finished is not None]
        for job in sorted(finished, key=lambda j: j.finished)[:-RECENT]:
            del self.jobs[job.id]

    # --- options: one place, every worker --------------------------------------------------------

    async def _sync(self, slot: Slot) -> None:
        """A (re)started worker: wait for its model, give it the options POSTed so far."""
        async with slot.lock:
            if slot.incarnation is not None:
                return
            info = await self._ready(slot)
            if self.options_set:
                body = json.dumps(self.options_set).encode()
                reply = await slot.actor.call.remote("POST", "/sdapi/v1/options", b"", self.internal_headers, body,
                                                     info["incarnation"])
                if reply == STALE or reply[0] != 200:
                    raise RuntimeError(f"worker {slot.index}: replaying the options failed: {reply}")
            self._seen(slot, info)

    async def _ready(self, slot: Slot, patience: float = 600.0) -> dict:
        """`ready()` of a worker Ray may still be restarting (calls then fail with ActorUnavailableError)."""
        deadline = time.time() + patience
        while True:
            try:
                return await slot.actor.ready.remote()
            except ray.exceptions.ActorUnavailableError:
                if time.time() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def _broadcast(self, method: str, path: str, headers, body: bytes) -> list:
        """The same request to every worker, jobs held back meanwhile -> [(slot, reply)]; a worker being
        restarted is skipped (it gets the options when it is back)."""
        async with self.options_lock:
            self.broadcasting = True
            try:
                slots = [s for s in self.slots if s.incarnation is not None]
                replies = await asyncio.gather(*[self._call(s, method, path, b"", headers, body) for s in slots])
            finally:
                self.broadcasting = False
                self._pump()  # announces the queue when a job started
        return list(zip(slots, replies))

    async def _set_options(self, headers, body: bytes) -> Response:
        replies = await self._broadcast("POST", "/sdapi/v1/options", headers, body)
        if not replies:
            return _error(503, "no worker is up", "Unavailable")
        if any(r[0] == 200 for _, r in replies):
            self.options_set.update(json.loads(body))
        failed = [(s, r) for s, r in replies if r[0] != 200]
        return self._reply(failed[0][1] if failed else replies[0][1])

    async def _keep_overrides(self, slot: Slot, job: Job) -> None:
        """`override_settings` without `override_settings_restore_afterwards` stay set (A1111): copy the values
        the worker kept to the other workers."""
        try:
            request = json.loads(job.body)
        except ValueError:
            return
        overrides = request.get("override_settings") or {}
        if not overrides or request.get("override_settings_restore_afterwards", True):
            return
        status, _, body = await self._call(slot, "GET", "/sdapi/v1/options", b"", self.internal_headers, b"")
        if status != 200:
            return
        kept = {k: v for k, v in json.loads(body).items() if k in overrides}
        self.options_set.update(kept)
        others = [s for s in self.slots if s is not slot and s.incarnation is not None]
        await asyncio.gather(*[self._call(s, "POST", "/sdapi/v1/options", b"", self.internal_headers,
                                          json.dumps(kept).encode()) for s in others])

    # --- /sd15/v1: the queue, jobs and workers as the ingress sees them ----------------------------

    async def _own(self, request: Request, rest: str, method: str) -> Optional[Response]:
        if rest == "queue" and method == "GET":
            return JSONResponse(self.queue_json())
        if rest == "workers" and method == "GET":
            return JSONResponse([{"index": s.index, "pid": s.pid, "node": s.node, "up": s.incarnation is not None,
                                  "restarts": s.restarts, "job": s.job.id if s.job else None} for s in self.slots])
        if rest == "jobs" and method == "POST":
            try:
                body = json.loads(await request.body())
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
            return JSONResponse({"id": job.id, "position": self._position(job)}, 202)
        if rest == "events" and method == "GET":
            return ray_events.stream(self)
        if rest.startswith("jobs/") and method in ("GET", "DELETE"):
            job = self.jobs.get(rest[len("jobs/"):])
            if job is None:
                return JSONResponse({"detail": "Not Found"}, 404)
            if method == "DELETE":
                await self._stop(job)
            out = job.json(self._position(job), result=True)
            if job.state == "running":
                out["progress"] = await self._progress(job)
            return JSONResponse(out)
        return None

    def _position(self, job: Job) -> Optional[int]:
        return list(self.waiting).index(job) if job in self.waiting else (0 if job.state == "running" else None)

    def queue_json(self) -> dict:
        running = self.running_jobs()
        recent = sorted((j for j in self.jobs.values() if j.finished), key=lambda j: -j.finished)[:10]
        return {"running": running[0].json(0) if running else None, "active": [j.json(0) for j in running],
                "queued": [j.json(i) for i, j in enumerate(self.waiting)], "recent": [j.json() for j in recent],
                "max_size": self.max_queued}

    async def _stop(self, job: Job) -> None:
        """DELETE: a queued job is cancelled, a running one interrupted on its worker."""
        if job in self.waiting:
            self.waiting.remove(job)
            job.state, job.finished = "cancelled", time.time()
            job.reply = 409, [(b"content-type", b"application/json")], json.dumps(
                {"error": "Cancelled", "detail": "the job was cancelled before it ran", "body": "",
                 "errors": ""}).encode()
            job.done.set()
            self._publish("done", job.json())
            self._changed()
        elif job.state == "running":
            job.stop = "interrupted"
            await self._call(self.slots[job.worker], "POST", "/sdapi/v1/interrupt", b"", self.internal_headers, b"")

    async def _progress(self, job: Job) -> Optional[dict]:
        status, _, body = await self._call(self.slots[job.worker], "GET", "/sdapi/v1/progress",
                                           b"skip_current_image=true", self.internal_headers, b"")
        if status != 200:
            return None
        p = json.loads(body)
        state = p.get("state") or {}
        return {"progress": p.get("progress", 0), "eta_relative": p.get("eta_relative", 0),
                "step": state.get("sampling_step", 0), "steps": state.get("sampling_steps", 0),
                "job_no": state.get("job_no", 0), "job_count": state.get("job_count", 0)}


    # --- /sd15/v1/events: the single server's event stream over the whole cluster --------------------

    def _publish(self, event: str, data: dict) -> None:
        for inbox in list(self.listeners):
            try:
                inbox.put_nowait((event, data))
            except asyncio.QueueFull:  # a listener that does not read: dropped rather than grown
                self.listeners.discard(inbox)

    def _changed(self) -> None:
        if self.listeners:
            self._publish("queue", self.queue_json())


# =============================================================================================
# Starting and stopping
# =============================================================================================

def deployment(config, workers: int, worker_options: dict, max_queued: int):
    """The bound Serve application: one ingress replica (it holds the queue) that starts the workers."""
    ingress = serve.deployment(Ingress, name="sd15", num_replicas=1, max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(config, workers, worker_options, max_queued)


def start(config, workers: int, *, host: str = "127.0.0.1", port: int = 7860, worker_cpus: float = 1.0,
          worker_gpus: Optional[float] = None, max_queued: Optional[int] = None, address: Optional[str] = None,
          log_to_driver: bool = True):
    """Join (`address`, e.g. "auto") or start a Ray cluster and serve the app on host:port; returns once every
    worker has loaded its model. `worker_gpus` None: one GPU per worker when the cluster has GPUs."""
    # folders as absolute paths: a worker runs in Ray's own working directory, maybe on another machine
    folders = {f.name: os.path.abspath(getattr(config, f.name)) for f in dataclasses.fields(config)
               if (f.name.endswith("_dir") or f.name == "outdir") and isinstance(getattr(config, f.name), str)}
    if getattr(config, "ckpt", None) and os.path.isfile(config.ckpt):
        folders["ckpt"] = os.path.abspath(config.ckpt)
    config = dataclasses.replace(config, **folders)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver)
    if worker_gpus is None:
        worker_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    serve.start(http_options={"host": host, "port": port})
    options = {"num_cpus": worker_cpus, "num_gpus": worker_gpus}
    queued = max_queued if max_queued is not None else 16 * workers
    serve.run(deployment(config, workers, options, queued), name="sd15", route_prefix="/")


def stop(patience: float = 20.0) -> None:
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
            deadline = time.time() + patience
            while workers() and time.time() < deadline:  # a dead actor's name is released
                time.sleep(0.1)
        serve.shutdown()
    finally:
        ray.shutdown()


def main(config, args) -> int:
    """`sd15-server --ray ...`: serve until Ctrl-C or SIGTERM."""
    import signal
    import threading

    host = args.server_name or ("0.0.0.0" if args.listen else "127.0.0.1")
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
