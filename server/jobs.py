"""The job queue: one FIFO of txt2img/img2img jobs shared by every client, run in order by its lanes (the
single server has one, on the GPU; the Ray ingress one per worker).

A job keeps its parsed request with the images still base64 (decoded when it starts), so a full queue holds
at most `max_size` request bodies. The single server runs a job on a worker thread holding the GPU limiter,
the one checkpoint switches take too, so both are served first come first served. States: queued -> running
-> done | failed | interrupted, or queued -> cancelled; the last `keep` finished jobs are remembered.
Listeners (the event streams) get every queue change and finished job; progress is read off running jobs.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import anyio

from server.a1111 import ApiError

log = logging.getLogger("server")


def publish(listeners: set, event: str, data: Callable[[], dict]) -> None:
    """Hand `(event, data())` to every event stream's inbox (data is made only when someone listens); an inbox
    that is not read is dropped rather than grown."""
    if listeners:
        item = (event, data())
        for inbox in list(listeners):
            try:
                inbox.put_nowait(item)
            except asyncio.QueueFull:
                listeners.discard(inbox)


class QueueFull(ApiError):
    """The queue holds `max_size` jobs already: 503 with Retry-After."""

    def __init__(self, max_size: int, retry_after: int):
        detail = f"the job queue is full ({max_size} jobs waiting); retry in about {retry_after} s"
        super().__init__(503, detail, error="QueueFull", headers={"Retry-After": str(retry_after)})


@dataclass(eq=False)
class Job:
    id: str
    kind: str  # "txt2img" | "img2img"
    request: Any  # the parsed A1111 request (images still base64)
    summary: dict
    source: str = "api"  # "page" | "api"
    save: bool = False
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished_at: Optional[float] = None
    state: str = "queued"
    error: Optional[ApiError] = None
    result: Optional[dict] = None  # the A1111 response body
    files: list = field(default_factory=list)  # saved images, relative to the output folder
    control: Any = None  # sd15.pipeline.JobState while running
    progress: Optional[dict] = None
    preview: Optional[str] = None  # base64 PNG of the latest preview
    preview_step: int = 0
    cell: tuple = (0, 1)  # a script's generations: (the running one, how many); progress counts over all
    steps_done: int = 0
    sampling_seconds: float = 0.0
    stop_reason: Optional[str] = None  # why it was interrupted: "client", "timeout", "shutdown", "limit", None
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def interrupt(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.control is not None:
            self.control.interrupt()

    def json(self, position: Optional[int] = None, with_result: bool = False) -> dict:
        error = None if self.error is None else {"status": self.error.status, "detail": str(self.error)}
        out = {"id": self.id, "kind": self.kind, "state": self.state, "position": position,
               "created": self.created, "started": self.started, "finished": self.finished_at,
               "source": self.source, "summary": self.summary, "progress": self.progress, "error": error}
        if with_result:
            out["result"] = self.result
            out["files"] = list(self.files)
        return out


class JobQueue:
    """FIFO of jobs, bounded at `max_size` waiting jobs, run in order by `worker(lane)` tasks, one job at a
    time each. `run(job)` runs on a worker thread holding `limiter` (the single server: one lane, the GPU);
    without a limiter, `await run(job, lane)` (the Ray ingress: one lane per worker process)."""

    def __init__(self, run: Callable, limiter: Optional[anyio.CapacityLimiter] = None, *, lanes: int = 1,
                 max_size: int = 64, keep: int = 50, on_finish: Optional[Callable[[Job], None]] = None):
        self.run, self.limiter, self.lanes, self.max_size, self.keep = run, limiter, lanes, max_size, keep
        self.on_finish = on_finish
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: dict[int, Job] = {}  # lane -> the job it runs
        self.history: collections.OrderedDict[str, Job] = collections.OrderedDict()  # finished, oldest first
        self.jobs: dict[str, Job] = {}  # every job not yet forgotten, by id
        self.closed = False  # shutting down: no new jobs, queued ones failed
        self.paused = False  # no job starts (the Ray ingress applies options to every worker meanwhile)
        self._wake = asyncio.Event()
        self.listeners: set[asyncio.Queue] = set()  # the event streams' inboxes
        self._counter = itertools.count(1)
        self._seconds = collections.deque(maxlen=20)  # recent job durations, for Retry-After

    def submit(self, kind: str, request, summary: dict, *, source: str = "api", save: bool = False) -> Job:
        job_id = f"{next(self._counter):06d}-{secrets.token_hex(4)}"
        return self.put(Job(job_id, kind, request, summary, source, save))

    def put(self, job: Job) -> Job:
        """Queue `job`; QueueFull when `max_size` jobs wait already."""
        if self.closed:
            raise ApiError(503, "the server is shutting down; no new jobs are accepted",
                           error="ServiceUnavailable")
        if len(self.waiting) >= self.max_size:
            raise QueueFull(self.max_size, self.retry_after())
        self.waiting.append(job)
        self.jobs[job.id] = job
        self._wake.set()
        self.changed()
        return job

    def get(self, job_id: str) -> Optional[Job]:
        return self.jobs.get(job_id)

    @property
    def running(self) -> Optional[Job]:
        """The oldest running job (the single server's only one; A1111's current job)."""
        return min(self.active.values(), key=lambda j: j.started, default=None)

    def running_jobs(self) -> list[Job]:
        return sorted(self.active.values(), key=lambda j: j.started)

    def position(self, job: Job) -> Optional[int]:
        """0 for a running job, then the waiting ones from len(active) on."""
        if job.state == "running":
            return 0
        if job in self.waiting:
            return self.waiting.index(job) + len(self.active)
        return None

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """A queued job is dropped (state cancelled); the running one is interrupted (it returns what it has)."""
        if job.state == "queued":
            self.waiting.remove(job)
            self._finish(job, "cancelled", ApiError(499 if reason == "client" else 409,
                                                    f"job {job.id} was cancelled before it started"))
        elif job.state == "running":
            job.interrupt(reason)

    def retry_after(self) -> int:
        per_job = sum(self._seconds) / len(self._seconds) if self._seconds else 5.0
        return max(1, min(3600, int(per_job * (len(self.waiting) + 1) / 2 / self.lanes + 0.999)))

    def snapshot(self) -> dict:
        """GET /sd15/v1/queue: "running" is the oldest of the "active" jobs."""
        active = [job.json(0) for job in self.running_jobs()]
        queued = [job.json(self.position(job)) for job in self.waiting]
        recent = [job.json() for job in reversed(list(self.history.values())[-10:])]
        return {"running": active[0] if active else None, "active": active, "queued": queued,
                "recent": recent, "max_size": self.max_size}

    def changed(self) -> None:
        publish(self.listeners, "queue", self.snapshot)

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    async def worker(self, lane: int = 0) -> None:
        """Run queued jobs one by one in `lane`, forever (cancelled at shutdown)."""
        while True:
            while not self.waiting or self.paused:
                self._wake.clear()
                await self._wake.wait()
            job = self.waiting.popleft()
            self.active[lane], job.state, job.started = job, "running", time.time()
            self.changed()
            try:
                if self.limiter is None:
                    await self.run(job, lane)
                else:
                    async with self.limiter:  # model switches queue on the same limiter
                        await anyio.to_thread.run_sync(self.run, job, abandon_on_cancel=True)
            except ApiError as e:
                self._finish(job, "failed", e)
            except Exception as e:  # a bug or out of memory in the job: a JSON 500, and the server goes on
                log.exception("job %s failed", job.id)
                self._finish(job, "failed", ApiError(500, error=type(e).__name__, errors=str(e)))
            else:  # job.error: set by the run only when it was stopped (504 timeout, 422 step limit)
                self._finish(job, "done" if job.stop_reason is None else "interrupted", job.error)
            finally:
                if job.state == "running":  # cancelled while running (forced shutdown)
                    self._finish(job, "failed", ApiError(503, "the server shut down while the job ran",
                                                         error="ServiceUnavailable"))
                del self.active[lane]
                self.changed()

    def _finish(self, job: Job, state: str, error: Optional[ApiError]) -> None:
        job.state, job.error, job.finished_at = state, error, time.time()
        job.control = None
        job.request = None  # the request body (maybe large images) is not kept once the job is over
        if job.started is not None:
            self._seconds.append(job.finished_at - job.started)
        self.history[job.id] = job
        while len(self.history) > self.keep:
            old_id, _ = self.history.popitem(last=False)
            self.jobs.pop(old_id, None)
        job.finished.set()
        if self.on_finish is not None:
            self.on_finish(job)
        publish(self.listeners, "done", job.json)
        self.changed()

    def close(self, reason: str = "the server is shutting down") -> None:
        """No new jobs; every queued job fails with 503 at once (the running one is left to finish)."""
        self.closed = True
        while self.waiting:
            self._finish(self.waiting.popleft(), "failed",
                         ApiError(503, f"{reason}; the job was not started", error="ServiceUnavailable"))

    async def drain(self, grace: float) -> bool:
        """Shutdown: close the queue, let the running job finish for `grace` seconds, then interrupt it and
        give it a few more seconds to return what it has. -> True when nothing was left running."""
        self.close()
        job = self.running
        if job is None:
            return True
        with anyio.move_on_after(grace):
            await job.finished.wait()
        if not job.finished.is_set():
            log.warning("job %s still running after the %.0f s grace period: interrupting it", job.id, grace)
            job.interrupt("shutdown")
            with anyio.move_on_after(10):
                await job.finished.wait()
        return job.finished.is_set()
