"""A worker of `server/ray_serve.py`: a Ray actor hosting the single-process server (`create_app(config)`), which
loads the model once; the ingress calls it with one HTTP request at a time, in-process, without a socket."""
from __future__ import annotations

import asyncio
import os
import uuid
from typing import Optional

import ray

STALE = "stale"  # a worker's answer to a call meant for an earlier incarnation of it


class Worker:
    """Hosts `create_app(config)`; `call` runs one HTTP request through it without a socket."""

    def __init__(self, config, index: int):
        from server.app import create_app

        self.index, self.incarnation = index, uuid.uuid4().hex  # a new one each time Ray restarts the actor
        self.app, self.state = create_app(config), {}
        self.started: Optional[asyncio.Future] = None

    async def ready(self) -> dict:
        """Start the app once (its lifespan loads the model); -> who this worker is."""
        if self.started is None:
            self.started = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._lifespan())
        await self.started
        return {"index": self.index, "incarnation": self.incarnation, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id()}

    async def _lifespan(self) -> None:
        """The app's lifespan, held open in a task of its own for the life of the actor."""
        try:
            async with self.app.router.lifespan_context(self.app) as state:
                self.state = state
                self.started.set_result(None)
                await asyncio.Future()
        except Exception as e:  # a startup that raised: every ready() says so
            if not self.started.done():
                error = RuntimeError(f"worker {self.index}: the server did not start: {e!r}")
                self.started.set_exception(error)

    async def call(self, method: str, path: str, query: bytes, headers: list, body: bytes,
                   incarnation: Optional[str]):
        """One HTTP request through the app -> (status, raw headers, body); STALE when `incarnation` names an
        earlier life of this actor (the ingress then replays the options first)."""
        if incarnation is not None and incarnation != self.incarnation:
            return STALE
        await self.ready()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query,
                 "headers": [(bytes(k), bytes(v)) for k, v in headers], "client": ("127.0.0.1", 0),
                 "server": ("127.0.0.1", 80), "state": dict(self.state)}
        request_sent, start, chunks = False, {}, []

        async def receive():
            nonlocal request_sent
            if not request_sent:
                request_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Future()  # the ingress holds the client's connection; no disconnect is reported here

        async def send(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        return start.get("status", 500), list(start.get("headers", [])), b"".join(chunks)

    async def progress(self, seen: Optional[list]) -> Optional[tuple]:
        """The running job's (progress, preview_step, preview, key): the single server's job `progress` object,
        the preview when its key ([job id here, preview_step]) is not `seen`, else None; None when idle.
        Asking makes the next due preview be made, as a /sdapi/v1/progress poll does (previews are decoded
        only while someone looks)."""
        engine = self.state.get("engine")
        job = engine.queue.running if engine is not None else None
        if job is None or job.progress is None:
            return None
        engine.preview_wanted = True
        key = [job.id, job.preview_step]
        return job.progress, job.preview_step, job.preview if key != seen else None, key
