"""ASGI middleware of the server, outermost first as `create_app` stacks them: `JsonErrors`, `HostCheck`,
CORS (Starlette's), `BasicAuth` (`--api-auth`) and GZip."""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import time
from typing import Optional

from starlette.datastructures import Headers, MutableHeaders

log = logging.getLogger("server")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def error_body(detail: str, error: str = "HTTPException", errors: str = "") -> bytes:
    return json.dumps({"error": error, "detail": detail, "body": "", "errors": errors}).encode()


async def send_json(send, status: int, body: bytes, headers: Optional[dict] = None) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class JsonErrors:
    """Whatever escapes the app before the response started (a bug, a request cancelled by a forced
    shutdown) -> a JSON 500/503 in A1111's shape, not a plain-text 500. Also counts responses by status and
    adds `X-Process-Time` (seconds) to every response, as A1111 does."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, start = False, time.perf_counter()

        async def send_counted(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.responses[message["status"]] += 1
                seconds = round(time.perf_counter() - start, 4)
                MutableHeaders(scope=message).append("X-Process-Time", str(seconds))
            await send(message)
        try:
            await self.app(scope, receive, send_counted)
        except asyncio.CancelledError:  # uvicorn cancels open requests on a forced shutdown
            if not started:
                try:
                    body = error_body("the server is shutting down", "ServiceUnavailable")
                    await send_json(send_counted, 503, body, {"Connection": "close"})
                except Exception:  # the connection is gone too
                    pass
            raise
        except Exception as e:
            if started:
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await send_json(send_counted, 500, error_body("", type(e).__name__, str(e)))


def host_name(host_header: str) -> str:
    """"example.com:7860" -> "example.com"; "[::1]:7860" -> "::1"."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.split(":")[0]
    return h.rstrip(".")


class HostCheck:
    """Refuse requests whose Host header is not in `allowed` (421 in A1111's error shape), so that a page on
    another site cannot drive a local server through DNS rebinding. `"*"` allows any name, "*.example.com"
    its subdomains; IP addresses are always allowed (a rebinding page's Host is a name)."""

    def __init__(self, app, allowed, metrics):
        self.app, self.metrics = app, metrics
        self.allowed = {a.strip().lower().rstrip(".") for a in allowed}

    def ok(self, host_header: Optional[str]) -> bool:
        if "*" in self.allowed:
            return True
        if not host_header:
            return False
        name = host_name(host_header)
        if name in self.allowed:
            return True
        if any(a.startswith("*.") and name.endswith(a[1:]) for a in self.allowed):
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.ok(Headers(scope=scope).get("host")):
            self.metrics.rejected["host"] += 1
            await send_json(send, 421, error_body(
                "Host header not allowed; start the server with --allowed-hosts to add this name"))
            return
        await self.app(scope, receive, send)


class BasicAuth:
    """HTTP Basic on every route (A1111 leaves /loras open; this does not), constant-time comparison, 401
    with A1111's three messages."""

    def __init__(self, app, credentials: list):
        self.app = app
        self.credentials = [(u.encode(), p.encode()) for u, p in credentials]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            problem = self.check(Headers(scope=scope).get("authorization"))
            if problem is not None:
                await send_json(send, 401, error_body(problem), {"WWW-Authenticate": "Basic"})
                return
        await self.app(scope, receive, send)

    def check(self, header: Optional[str]) -> Optional[str]:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return "Not authenticated"
        try:
            user, colon, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            return "Invalid authentication credentials"
        if not colon:
            return "Invalid authentication credentials"
        ok = False
        for u, p in self.credentials:  # every pair is compared, whatever matched
            ok |= hmac.compare_digest(user.encode(), u) & hmac.compare_digest(password.encode(), p)
        return None if ok else "Incorrect username or password"
