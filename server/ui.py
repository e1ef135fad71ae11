"""The web page at `/` (server/static: plain files, no build step) and its helpers under `/sd15/v1`: token
counts and the history of saved images. Everything the page does goes through HTTP endpoints a script could
call too, behind the same Basic auth. Static answers carry an ETag and `Cache-Control: no-cache`, so a reload
costs one 304 per file.
"""
from __future__ import annotations

import hashlib
import math
import mimetypes
import os
import threading
from typing import Optional

from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from server.a1111 import ApiError, ValidationError, png_info
from server.inputs import read_json
from server.models import scan

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PREFIX = "/sd15/v1"
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon"}


async def static(request: Request):
    """The web page (at /) and its assets: files under server/static, none outside it, with a content ETag
    (304 when the browser already has the file)."""
    path = _inside(STATIC, request.path_params.get("path", "index.html"))
    if path is None or not os.path.isfile(path):
        return JSONResponse({"detail": "Not Found"}, status_code=404)
    with open(path, "rb") as f:
        data = f.read()
    etag = '"' + hashlib.sha1(data).hexdigest()[:20] + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    ext = os.path.splitext(path)[1].lower()
    media = TYPES.get(ext) or mimetypes.guess_type(path)[0] or "application/octet-stream"
    return Response(data, media_type=media, headers=headers)


def _inside(root: str, rel: str) -> Optional[str]:
    """`root/rel` when it stays inside `root` (symlinks resolved), else None."""
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, rel))
    return path if path.startswith(root + os.sep) else None


_counters: dict = {}  # embeddings folder -> (tokenizer, embedding database) used while no model is loaded
_counters_lock = threading.Lock()


def _tokenizer_and_embeddings(engine):
    """The loaded model's tokenizer and embeddings, else a tokenizer and a database of the embeddings folder."""
    model = engine.models.model
    if model is not None:
        return model.tokenizer, getattr(model, "embeddings", None)
    folder = engine.library.embeddings_dir
    with _counters_lock:
        if folder not in _counters:
            from sd15.clip.tokenizer import Tokenizer
            from sd15.embeddings import EmbeddingDatabase

            _counters[folder] = (Tokenizer(), EmbeddingDatabase(folder))
        return _counters[folder]


def count_tokens(text: str, steps: int, tokenizer, embeddings=None, positive: bool = True) -> dict:
    """A1111's token counter (`modules/ui.py` update_token_counter): network tags removed, the prompt split on
    AND (positive prompts), every prompt-editing schedule built for `steps`, and the longest tokenised text
    counted as `tokenize_line` does (BREAK closes a 75-token chunk; an embedding counts its vectors)."""
    from sd15.a1111 import prompt as syntax

    finder = embeddings.finder(tokenizer) if embeddings is not None else None
    try:
        text, _ = syntax.extract_networks(text)
        parts = [t for t, _ in syntax.split_and(text)] if positive else [text]
        texts = [t for part in parts for _, t in syntax.prompt_schedules(part, steps)]
    except Exception:  # A1111 falls back to the text as it is
        texts = [text]
    tokens = max(syntax.tokenize_prompt(t, tokenizer.encode, embeddings=finder)[1] for t in texts)
    chunks = math.ceil(max(tokens, 1) / syntax.CHUNK_LENGTH)
    return {"tokens": tokens, "chunks": chunks, "limit": chunks * syntax.CHUNK_LENGTH}


async def tokens(request: Request):
    """Count a prompt's tokens as A1111's token counter does: {"prompt", "steps"?, "negative"?}."""
    engine = request.state.engine
    body = await read_json(request, engine.limits.max_body_bytes)
    if not isinstance(body, dict):
        raise ValidationError.one(None, "value is not a valid dict", "type_error.dict")
    text, steps = body.get("prompt", ""), body.get("steps", 20)
    if not isinstance(text, str):
        raise ValidationError.one(("prompt",), "str type expected", "type_error.str")
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or not 1 <= steps <= 10_000:
        raise ValidationError.one(("steps",), "steps must be a number from 1 to 10000", "value_error.number")
    tokenizer, embeddings = _tokenizer_and_embeddings(engine)
    return JSONResponse(await run_in_threadpool(count_tokens, text, int(steps), tokenizer, embeddings,
                                                not body.get("negative", False)))


def list_history(outdir: str) -> list[tuple[float, str, str]]:
    """(mtime, path relative to outdir with "/", absolute path) of every saved image, newest first."""
    found = []
    for path, rel in scan(outdir, tuple(IMAGE_TYPES)):
        try:
            found.append((os.stat(path).st_mtime, rel, path))
        except OSError:  # deleted meanwhile
            pass
    return sorted(found, reverse=True)


def history_item(mtime: float, rel: str, path: str) -> dict:
    """One history entry: the image's size and infotext (its `parameters` chunk), read from the file header."""
    width = height = None
    text = ""
    try:
        with Image.open(path) as image:
            width, height = image.size
            text = png_info(image)["info"]
    except Exception:  # a half-written or foreign file is listed without its details
        pass
    return {"path": rel, "url": f"{PREFIX}/history/file/{rel}", "infotext": text, "mtime": mtime,
            "width": width, "height": height}


def _query_int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    try:
        value = int(request.query_params.get(name, default))
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise ValidationError([{"loc": ["query", name], "msg": f"{name} must be an integer from {lo} to {hi}",
                                 "type": "value_error.number"}])
    return value


async def history(request: Request):
    """The images saved under the output folder, newest first: {"total", "items"}."""
    offset = _query_int(request, "offset", 0, 0, 10**9)
    limit = _query_int(request, "limit", 50, 1, 500)
    outdir = request.state.engine.config.outdir

    def read():
        files = list_history(outdir)
        return {"total": len(files), "items": [history_item(*f) for f in files[offset:offset + limit]]}
    return JSONResponse(await run_in_threadpool(read))


async def history_file(request: Request):
    """One saved image (paths never leave the output folder)."""
    rel = request.path_params["path"]
    outdir = request.state.engine.config.outdir
    path = _inside(outdir, rel) if outdir else None
    ext = os.path.splitext(rel)[1].lower()
    if path is None or ext not in IMAGE_TYPES or not os.path.isfile(path):
        raise ApiError(404, f"no saved image {rel!r}")
    return FileResponse(path, media_type=IMAGE_TYPES[ext], headers={"Cache-Control": "private, max-age=3600"})


routes = [
    Route("/", static, methods=["GET"], include_in_schema=False),
    Route("/static/{path:path}", static, methods=["GET"], include_in_schema=False),
    Route(f"{PREFIX}/tokens", tokens, methods=["POST"]),
    Route(f"{PREFIX}/history", history, methods=["GET"]),
    Route(PREFIX + "/history/file/{path:path}", history_file, methods=["GET"]),
]
