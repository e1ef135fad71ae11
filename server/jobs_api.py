"""The page's job endpoints under `/sd15/v1` (queue, jobs, server-sent events) and `GET /metrics`.

    POST   /sd15/v1/jobs          {"kind", "request", "save"} -> 202 {"id", "position"}
    GET    /sd15/v1/jobs          every job the server remembers (queued, running, the last finished)
    GET    /sd15/v1/jobs/{id}     the job; finished: with "result" (the A1111 body) and "files"
    DELETE /sd15/v1/jobs/{id}     cancel a queued job / interrupt the running one
    GET    /sd15/v1/queue         {"running", "active", "queued", "recent", "max_size"}
    GET    /sd15/v1/events        text/event-stream: queue, progress (with new previews), done
    GET    /metrics               Prometheus text
"""
from __future__ import annotations

import asyncio
import json
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from server import a1111, runner
from server.a1111 import ApiError, ValidationError
from server.inputs import read_json

PREFIX = "/sd15/v1"
PROGRESS_EVERY = 0.25  # seconds between progress events
PING_EVERY = 15.0


def _job(request: Request) -> tuple:
    """(the queue, the job the path names); 404 when there is none."""
    queue = request.state.engine.queue
    job = queue.get(request.path_params["job_id"])
    if job is None:
        raise ApiError(404, f"no job {request.path_params['job_id']!r} (finished jobs are kept for the last "
                            f"{queue.keep})", error="NotFound")
    return queue, job


async def submit_job(request: Request):
    """Queue a txt2img/img2img job; answers at once with its id and place in the queue."""
    engine = request.state.engine
    body = await read_json(request, engine.limits.max_body_bytes)
    if not isinstance(body, dict):
        raise ValidationError.one(None, "value is not a valid dict", "type_error.dict")
    kind = body.get("kind")
    if kind not in ("txt2img", "img2img"):
        raise ValidationError.one("kind", "value is not a valid enumeration member; permitted: 'txt2img', "
                                          "'img2img'", "type_error.enum")
    save = a1111.convert("save", body["save"], bool) if body.get("save") is not None else True
    cls = a1111.Txt2ImgRequest if kind == "txt2img" else a1111.Img2ImgRequest
    try:
        req = cls.from_json(body.get("request") if body.get("request") is not None else {})
        prepared = await run_in_threadpool(runner.prepare, engine, req)  # a script: its plan
    except ValidationError as e:  # the fields are inside "request"
        for p in e.problems:
            p["loc"] = ["body", "request", *p["loc"][1:]]
        raise
    job = engine.submit(req, prepared, source="page", save=save)
    return JSONResponse({"id": job.id, "position": engine.queue.position(job)}, status_code=202)


async def list_jobs(request: Request):
    """Every job the server remembers, newest first."""
    q = request.state.engine.queue
    jobs = sorted(q.jobs.values(), key=lambda j: j.created, reverse=True)
    return JSONResponse([j.json(q.position(j)) for j in jobs])


async def get_job(request: Request):
    """One job; a finished one carries its result and saved files."""
    q, job = _job(request)
    return JSONResponse(job.json(q.position(job), with_result=job.finished.is_set()))


async def delete_job(request: Request):
    """Cancel a queued job or interrupt the running one."""
    q, job = _job(request)
    q.cancel(job, "cancelled")
    return JSONResponse(job.json(q.position(job)))


async def get_queue(request: Request):
    """The running job, the queued ones, the last finished ones."""
    return JSONResponse(request.state.engine.queue.snapshot())


def _sse(event: str, data) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def event_stream(queue, closed=lambda: False) -> StreamingResponse:
    """Server-sent events of a `jobs.JobQueue` (also the Ray ingress's): `queue` first and on every change,
    `progress` of each running job at most every 250 ms (a preview only when a new one was made), `done` when
    a job finishes (both published into the stream's inbox in `queue.listeners`), a comment line every 15 s.
    Ends when `closed()` and nothing is left to send, or when the inbox was dropped for not being read."""
    inbox: asyncio.Queue = asyncio.Queue(maxsize=256)
    queue.listeners.add(inbox)

    async def stream():
        try:
            yield _sse("queue", queue.snapshot())
            last_ping = last_progress = time.monotonic()
            last_sent, sent_preview = {}, {}  # job id -> what was sent of it
            while inbox in queue.listeners:
                wait = max(0.0, last_progress + PROGRESS_EVERY - time.monotonic())
                try:
                    event, data = await asyncio.wait_for(inbox.get(), wait)
                    yield _sse(event, data)
                    continue
                except asyncio.TimeoutError:
                    pass
                if closed():
                    return
                last_progress = time.monotonic()
                for job in queue.running_jobs():
                    p = job.progress
                    if p is None or last_sent.get(job.id) == (p["step"], p["job_no"], job.preview_step):
                        continue
                    new_preview = job.preview is not None and sent_preview.get(job.id) != job.preview_step
                    preview = job.preview if new_preview else None
                    yield _sse("progress", {"id": job.id, **p, "preview": preview,
                                            "preview_step": job.preview_step})
                    if new_preview:
                        sent_preview[job.id] = job.preview_step
                    last_sent[job.id] = (p["step"], p["job_no"], job.preview_step)
                if time.monotonic() - last_ping > PING_EVERY:
                    last_ping = time.monotonic()
                    yield b": ping\n\n"
        finally:  # the client left or did not read
            queue.listeners.discard(inbox)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def events(request: Request):
    """The event stream of this server's queue."""
    q = request.state.engine.queue
    return event_stream(q, lambda: q.closed and q.running is None)


async def metrics(request: Request):
    """Prometheus metrics."""
    engine = request.state.engine
    text = engine.metrics.render(len(engine.queue.waiting), len(engine.queue.active), engine.queue.max_size)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


routes = [
    Route(f"{PREFIX}/jobs", submit_job, methods=["POST"]),
    Route(f"{PREFIX}/jobs", list_jobs, methods=["GET"]),
    Route(f"{PREFIX}/jobs/{{job_id}}", get_job, methods=["GET"]),
    Route(f"{PREFIX}/jobs/{{job_id}}", delete_job, methods=["DELETE"]),
    Route(f"{PREFIX}/queue", get_queue, methods=["GET"]),
    Route(f"{PREFIX}/events", events, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
