"""`GET /sd15/v1/events` at the Ray ingress (server/ray_serve.py): the single server's event stream
(server/jobs_api.py) over every worker. The ingress announces `queue` and `done` itself; one poller, running
while someone listens, asks the worker of each running job for its progress and new previews every 250 ms
(awaited Ray calls: the ingress's event loop serves on meanwhile), and each stream sends what is new to it."""
from __future__ import annotations

import asyncio
import time

from starlette.responses import StreamingResponse

from server.jobs_api import PING_EVERY, PROGRESS_EVERY, _sse


def stream(ingress) -> StreamingResponse:
    """`queue` first and on every change, `progress` of each running job at most every 250 ms (a preview
    only when a new one was made), `done` when a job ends, a comment line every 15 s (server/jobs_api.py's
    stream, over every worker)."""
    inbox: asyncio.Queue = asyncio.Queue(maxsize=256)
    ingress.listeners.add(inbox)
    if ingress.poller is None or ingress.poller.done():
        ingress.poller = asyncio.get_running_loop().create_task(poll(ingress, PROGRESS_EVERY))

    async def events():
        try:
            yield _sse("queue", ingress.queue_json())
            last_ping = last_progress = time.monotonic()
            last_sent, sent_preview = {}, {}  # job id -> what was sent of it
            while inbox in ingress.listeners:
                wait = max(0.0, last_progress + PROGRESS_EVERY - time.monotonic())
                try:
                    event, data = await asyncio.wait_for(inbox.get(), wait)
                    yield _sse(event, data)
                    continue
                except asyncio.TimeoutError:
                    pass
                last_progress = time.monotonic()
                for job in ingress.running_jobs():
                    p = job.progress
                    if p is None or last_sent.get(job.id) == (p["step"], p["job_no"], job.preview_step):
                        continue
                    new_preview = job.preview is not None and sent_preview.get(job.id) != job.preview_step
                    yield _sse("progress", {"id": job.id, **p, "preview": job.preview if new_preview else None,
                                            "preview_step": job.preview_step})
                    if new_preview:
                        sent_preview[job.id] = job.preview_step
                    last_sent[job.id] = (p["step"], p["job_no"], job.preview_step)
                if time.monotonic() - last_ping > PING_EVERY:
                    last_ping = time.monotonic()
                    yield b": ping\n\n"
        finally:  # the client left (Serve cancels the request) or did not read
            ingress.listeners.discard(inbox)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

async def poll(ingress, every: float) -> None:
    """While someone listens: every `every` s, the progress and new previews of every running job from its
    worker (Ray calls awaited concurrently, so the ingress's loop serves on meanwhile)."""
    while ingress.listeners:
        running = [(ingress.slots[j.worker], j) for j in ingress.running_jobs()]
        replies = await asyncio.gather(*[asyncio.wait_for(_await(s.actor.progress.remote(j.preview_key)), 5)
                                         for s, j in running], return_exceptions=True)
        for (slot, job), p in zip(running, replies):
            if not isinstance(p, dict) or slot.job is not job:  # idle, dying or already finished
                continue
            preview, key = p.pop("preview"), p.pop("key")
            job.preview_step = p.pop("preview_step")
            job.progress = p
            if preview is not None:
                job.preview, job.preview_key = preview, key
        await asyncio.sleep(every)


async def _await(ref):
    return await ref
