"""`GET /sd15/v1/events` at the Ray ingress (server/ray_serve.py): the single server's event stream
(`server.jobs_api.event_stream`) over every worker. The ingress's queue publishes `queue` and `done`; one
poller, running while someone listens, asks the worker of each running job for its progress and previews."""
from __future__ import annotations

import asyncio

from starlette.responses import StreamingResponse

from server.jobs_api import PROGRESS_EVERY, event_stream


def stream(ingress) -> StreamingResponse:
    """The event stream of the ingress's queue; starts the poller if it is not running."""
    queue = ingress.queue
    response = event_stream(queue.listeners, queue.snapshot, queue.running_jobs)
    if ingress.poller is None or ingress.poller.done():
        ingress.poller = asyncio.get_running_loop().create_task(poll(ingress))
    return response


async def poll(ingress) -> None:
    """While someone listens: every 250 ms, the progress and new previews of every running job from its worker
    (Ray calls awaited concurrently, so the ingress's loop serves on meanwhile)."""
    while ingress.queue.listeners:
        await asyncio.gather(*[ingress.refresh(job) for job in ingress.queue.running_jobs()])
        await asyncio.sleep(PROGRESS_EVERY)
