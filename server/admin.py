"""Process control as A1111 has it behind `--api-server-stop` (server-kill, server-stop, server-restart;
without the flag they answer 404 as A1111's absent routes do), and `/docs`: this server's `/openapi.json`
rendered as one plain HTML page (no scripts, nothing fetched from elsewhere), behind `--api-auth` like every
route.
"""
from __future__ import annotations

import html
import json
import logging
import os
import signal
import sys

from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

log = logging.getLogger("server")

API = "/sdapi/v1"


def _allowed(request: Request) -> None:
    if not (request.state.engine.config.flags or {}).get("api_server_stop"):
        raise HTTPException(404)  # A1111 adds these routes only with --api-server-stop


def _exit_now(code: int = 0) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # A1111 `restart.stop_program`: no cleanup, a running job is abandoned


async def server_kill(request: Request):
    """Exit the server process at once (only with --api-server-stop)."""
    _allowed(request)
    log.warning("server-kill: exiting now")
    _exit_now(0)


async def server_restart(request: Request):
    """Exit so that a supervisor restarts the server (only with --api-server-stop). As A1111's
    `modules/restart.py`: create the file SD_WEBUI_RESTART names (webui.sh: `tmp/restart`) and exit 0; the
    supervisor loop starts the server again when that file exists. Without SD_WEBUI_RESTART: 501."""
    _allowed(request)
    marker = os.environ.get("SD_WEBUI_RESTART")
    if not marker:
        return Response(status_code=501)
    os.makedirs(os.path.dirname(os.path.abspath(marker)), exist_ok=True)
    open(marker, "a").close()
    log.warning("server-restart: wrote %s, exiting now", marker)
    _exit_now(0)


async def server_stop(request: Request):
    """Finish the running and queued jobs, then shut down (only with --api-server-stop)."""
    _allowed(request)
    engine = request.state.engine
    log.warning("server-stop: the server shuts down once the jobs queued so far are done")

    async def stop():
        await engine.on_gpu(lambda: None)  # the GPU queue is first come first served: everything before is done
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown: open requests complete, then exit

    return Response("Stopping.", background=BackgroundTask(stop))


CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1em 2em; color: #1d2125; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 2px solid #d0d7de; }
nav a { margin-right: 1em; } code, pre { font: 13px/1.4 ui-monospace, monospace; }
details { border: 1px solid #d0d7de; border-radius: 6px; margin: .5em 0; padding: .3em .8em; }
summary { cursor: pointer; } .m { display: inline-block; width: 4.5em; font-weight: bold; border-radius: 4px;
text-align: center; color: #fff; margin-right: .6em; } .GET { background: #1f6feb; } .POST { background: #2da44e; }
.PUT, .PATCH { background: #bf8700; } .DELETE { background: #cf222e; } .d { color: #57606a; margin-left: .6em; }
table { border-collapse: collapse; width: 100%; margin: .5em 0; } td, th { border-bottom: 1px solid #eaeef2;
padding: .25em .5em; text-align: left; vertical-align: top; } th { background: #f6f8fa; }
pre { background: #f6f8fa; padding: .6em; overflow-x: auto; } .req { color: #cf222e; }
"""

# Operations are grouped by the first keyword found in their path.
GROUPS = (("Generation", ("txt2img", "img2img")), ("Extras and images", ("extra-", "png-info", "interrogate")),
          ("Progress and control", ("progress", "interrupt", "skip", "server-")),
          ("Options", ("options", "cmd-flags")))


def group_of(path: str) -> str:
    for name, words in GROUPS:
        if any(w in path for w in words):
            return name
    return "Models and listings" if path.startswith(API) else "Other"


def _resolve(doc: dict, schema: dict) -> dict:
    """`schema` with its `$ref` (to `#/components/schemas/<name>`) followed."""
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _type(doc: dict, s: dict) -> str:
    s = _resolve(doc, s)
    if "enum" in s and "type" not in s:
        return "enum"
    t = s.get("type", "any")
    if t == "array":
        t = f"array of {_type(doc, s.get('items', {}))}"
    elif "oneOf" in s:
        t = " | ".join(_type(doc, x) for x in s["oneOf"])
    if s.get("nullable"):
        t += " | null"
    return t


def _limits(s: dict) -> str:
    out = []
    for key, sym in (("minimum", ">="), ("maximum", "<="), ("minLength", "length >="), ("maxLength", "length <=")):
        if key in s:  # OpenAPI 3.0: an exclusive bound is minimum/maximum plus exclusiveMinimum/Maximum: true
            exclusive = s.get("exclusive" + key[:1].upper() + key[1:]) is True
            out.append(f"{sym[0] if exclusive else sym} {s[key]}")
    if "enum" in s:
        out.append("one of " + ", ".join(json.dumps(v) for v in s["enum"]))
    return "; ".join(out)


def _schema_table(doc: dict, schema: dict) -> str:
    s = _resolve(doc, schema)
    props = s.get("properties")
    if not props:
        return f"<p>JSON body: <code>{html.escape(_type(doc, s))}</code></p>"
    required = set(s.get("required", ()))
    rows = []
    for name, p in props.items():
        p = _resolve(doc, p)
        default = json.dumps(p["default"]) if "default" in p else ""
        req = ' <span class="req">required</span>' if name in required else ""
        rows.append(f"<tr><td><code>{html.escape(name)}</code>{req}</td><td>{html.escape(_type(doc, p))}</td>"
                    f"<td><code>{html.escape(default)}</code></td><td>{html.escape(_limits(p))}</td></tr>")
    example = {n: p.get("default") for n, p in props.items() if "default" in p or n in required}
    return ("<table><tr><th>field</th><th>type</th><th>default</th><th>range / choices</th></tr>"
            + "".join(rows) + "</table><p>Example body:</p><pre>"
            + html.escape(json.dumps(example, indent=2)) + "</pre>")


def _operation(doc: dict, path: str, method: str, op: dict) -> str:
    parts = [f'<details id="{html.escape(op["operationId"])}"><summary>'
             f'<span class="m {method.upper()}">{method.upper()}</span><code>{html.escape(path)}</code>'
             f'<span class="d">{html.escape(op["summary"])}</span></summary>']
    params = op.get("parameters") or []
    if params:
        parts.append("<p>Parameters:</p><table><tr><th>name</th><th>in</th><th>type</th></tr>")
        parts += [f"<tr><td><code>{html.escape(prm['name'])}</code></td><td>{html.escape(prm['in'])}</td>"
                  f"<td>{html.escape(_type(doc, prm['schema']))}</td></tr>" for prm in params]
        parts.append("</table>")
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if body is not None:
        parts.append(_schema_table(doc, body))
    codes = ", ".join(f"{c} {r['description']}" for c, r in op["responses"].items())
    return "".join(parts) + f"<p>Responses: {html.escape(codes)}</p></details>"


def render_docs(doc: dict) -> str:
    """The OpenAPI 3 document `doc` as a self-contained HTML page."""
    groups: dict[str, list[str]] = {name: [] for name, _ in GROUPS}
    groups.update({"Models and listings": [], "Other": []})
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            groups[group_of(path)].append(_operation(doc, path, method, op))
    groups = {g: ops for g, ops in groups.items() if ops}
    title = html.escape(f"{doc['info']['title']} {doc['info']['version']}")
    nav = "".join(f'<a href="#g{i}">{html.escape(g)}</a>' for i, g in enumerate(groups))
    sections = "".join(f'<h2 id="g{i}">{html.escape(g)}</h2>' + "".join(ops)
                       for i, (g, ops) in enumerate(groups.items()))
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{title}</title>"
            f"<meta name=viewport content='width=device-width'><style>{CSS}</style></head><body>"
            f"<h1>{title}</h1><p>Generated from <a href='/openapi.json'>/openapi.json</a>. Click an endpoint for "
            f"its fields.</p><nav>{nav}</nav>{sections}</body></html>")


async def docs(request: Request):
    """A readable page of the API, from /openapi.json."""
    from server.app import openapi

    return HTMLResponse(render_docs(json.loads((await openapi(request)).body)))


routes = [
    Route(f"{API}/server-kill", server_kill, methods=["POST"]),
    Route(f"{API}/server-restart", server_restart, methods=["POST"]),
    Route(f"{API}/server-stop", server_stop, methods=["POST"]),
    Route("/docs", docs, methods=["GET"], include_in_schema=False),
]
