"""Serving over TCP with uvicorn, hardened: a header read timeout and a connection limit
(`guarded_protocol`), floods logged once a minute (`flood_log`), and a shutdown that lets the running job
finish (`Server`). The body read timeout is in the app (`read_json`).
"""
from __future__ import annotations

import asyncio
import logging
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("server")


_floods: dict = {}  # what -> [start of its minute, events not logged since]


def flood_log(what: str, message: str, *args) -> None:
    """Log the first `what` at once, then at most one summary line a minute."""
    now = time.monotonic()
    entry = _floods.get(what)
    if entry is None or now - entry[0] > 60:
        if entry is not None and entry[1]:
            log.warning("%s: %d more in the last %.0f s", what, entry[1], now - entry[0])
        _floods[what] = [now, 0]
        log.warning(message, *args)
    else:
        entry[1] += 1


def loop_exception_handler(loop, context) -> None:
    """asyncio's errors (e.g. "socket.accept() out of system resource" at the file limit, once per incoming
    connection) logged once a minute per message instead of once per event."""
    flood_log(str(context.get("message")), "asyncio: %s (%s)", context.get("message"), context.get("exception"))


def guarded_protocol(header_timeout: float, max_connections: int, metrics):
    """uvicorn's h11 protocol, plus: a connection that has not sent a complete request head within
    `header_timeout` seconds is closed (uvicorn only times out idle keep-alive connections), and beyond
    `max_connections` open connections a new one is closed at once, before any work (uvicorn's own
    `limit_concurrency` answers with a plain-text 503 instead)."""

    class GuardedH11Protocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            if len(self.server_state.connections) >= max_connections:
                metrics.rejected["connections"] += 1
                flood_log("connection limit", "more than %d open connections: closing new ones "
                                              "(--max-connections)", max_connections)
                transport.abort()
                return
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                flood_log("header timeout", "closing a connection that sent no complete request head within "
                                            "%g s (--header-timeout)", header_timeout)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._arm()  # a new request head is starting: it must be complete in time
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self.transport is None:  # refused in connection_made
                return
            super().connection_lost(exc)

    return GuardedH11Protocol


class Server(uvicorn.Server):
    """uvicorn's server whose first SIGINT/SIGTERM closes the job queue (queued jobs fail with 503 at once)
    and lets the running job finish for `grace` seconds before interrupting it; a second signal is a forced
    quit (`forced` is then True and `python -m server` exits with status 1)."""

    def __init__(self, config: uvicorn.Config, engine, grace: float):
        super().__init__(config)
        self.engine, self.grace, self.forced, self._loop = engine, grace, False, None
        self._drain_task = None  # held so that it is not collected while it runs

    async def serve(self, sockets=None) -> None:
        with self.capture_signals():
            await self._serve(sockets)
            # uvicorn re-raises the signals it caught once it is done, so the process would die of SIGTERM;
            # a graceful shutdown exits 0 instead, a forced one 1 (python -m server)
            self._captured_signals.clear()

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(loop_exception_handler)
        await super().startup(sockets=sockets)

    def handle_exit(self, sig, frame) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if self._loop is None:
            return
        if first:
            log.warning("shutting down: queued jobs fail now; the running job has %g s to finish "
                        "(signal again to force)", self.grace)
            self._loop.call_soon_threadsafe(self._start_drain)
        else:
            self.forced = self.force_exit = True
            log.error("forced quit: interrupting the running job")
            self._loop.call_soon_threadsafe(self._force)

    def _start_drain(self) -> None:
        queue = self.engine.queue
        if queue is not None:
            self._drain_task = asyncio.ensure_future(queue.drain(self.grace))

    def _force(self) -> None:
        queue = self.engine.queue
        if queue is not None:
            queue.close("the server was forced to quit")
            if queue.running is not None:
                queue.running.interrupt("shutdown")
