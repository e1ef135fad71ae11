"""Bounds on what a request may make the server hold or compute, checked before a job queues; every answer
is a 4xx. Prompt lengths (a 2,000,000-token prompt took 33 s and 3.3 GB on the tiny model); init images and
masks probed from their header alone, with both sides, the pixel count and the aspect ratio bounded (a
1×60,000,000 PNG passes a pixel limit); the JSON body bounded in size, arrival time and nesting depth (deep
nesting broke the response's JSON encoder); error text without absolute paths.
"""
from __future__ import annotations

import io
import json
import os
import re

import anyio
from starlette.concurrency import run_in_threadpool

from PIL import Image

from sd15.a1111 import images as imgs
from server.a1111 import ApiError, Limits, ValidationError

MAX_JSON_DEPTH = 32
# What A1111 reads (it calls Image.open with no list); formats this Pillow does not register are left out
# (Pillow 13 reads MPO through its JPEG plugin and has no "MPO" entry, so naming it would fail every image).
FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


def formats() -> list[str]:
    Image.init()
    return [f for f in FORMATS if f in Image.OPEN]


def check_prompts(req, limits: Limits) -> None:
    problems = []
    for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
        value = getattr(req, name, None)
        if isinstance(value, str) and len(value) > limits.max_prompt_chars:
            problems.append(ValidationError.problem(
                name, f"ensure this value has at most {limits.max_prompt_chars} characters (has {len(value)})",
                "value_error.any_str.max_length"))
    if problems:
        raise ValidationError(problems)


async def read_json(request, limit: int):
    """The JSON body, at most `limit` bytes (413 beyond), read within the server's --body-timeout (408
    beyond); malformed JSON or JSON nested deeper than MAX_JSON_DEPTH -> 422 as FastAPI words it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is larger than the {limit:,}-byte limit")
    timeout = request.state.engine.config.body_timeout
    chunks, size = [], 0
    with anyio.move_on_after(timeout) as scope:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is larger than the {limit:,}-byte limit")
            chunks.append(chunk)
    if scope.cancelled_caught:
        raise ApiError(408, f"the request body was not received within {timeout:g} s", error="RequestTimeout")
    body = b"".join(chunks)
    del chunks
    if not body.strip():
        raise ValidationError.one(None, "field required", "value_error.missing")
    try:
        data = await run_in_threadpool(json.loads, body)  # a large body would hold up the event loop
    except (ValueError, RecursionError) as e:
        pos = getattr(e, "pos", 0)
        raise ValidationError.one((pos,), str(getattr(e, "msg", e)), "value_error.jsondecode") from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise ValidationError.one(None, f"JSON nested deeper than {MAX_JSON_DEPTH} levels",
                                  "value_error.jsondepth")
    return data


def json_depth(value) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, `[]` is 1), without recursion."""
    depth, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            d += 1
            depth = max(depth, d)
            if d <= MAX_JSON_DEPTH:
                stack.extend((x, d) for x in v if isinstance(x, (list, dict)))
    return depth


def probe_image(data: str, name: str, limits: Limits, resize_mode: int = 0) -> tuple[int, int]:
    """Format and size of a request image from its header -> (width, height); 4xx when it is not an image
    the server accepts or is out of bounds. Nothing is decoded and nothing is kept."""
    if data.strip().startswith(("http://", "https://")):
        raise ApiError(400, f"{name}: image URLs are not fetched by this server; send the image as base64")
    try:
        raw = imgs.decode_base64(data)
    except ValueError as e:  # binascii.Error is one
        raise ApiError(400, f"{name}: {e}") from None
    try:
        with Image.open(io.BytesIO(raw), formats=formats()) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise ApiError(400, f"{name}: image too large: {e}") from None
    except Exception as e:
        raise ApiError(400, f"{name}: Invalid encoded image: {e}") from None
    if w <= 0 or h <= 0:
        raise ApiError(400, f"{name}: invalid image size {w}x{h}")
    if w * h > limits.max_image_pixels or max(w, h) > limits.max_image_side:
        raise ApiError(400, f"{name}: image is {w}x{h}; the limits are {limits.max_image_side} px a side and "
                            f"{limits.max_image_pixels} pixels")
    if max(w, h) / min(w, h) > limits.max_image_aspect:
        raise ApiError(400, f"{name}: image is {w}x{h}; the aspect ratio may be at most "
                            f"{limits.max_image_aspect:g}:1")
    if resize_mode == 3:  # encoded at its own size before the latent resize: the VAE needs 64 px (8 latent)
        if min(w, h) < 64:
            raise ApiError(400, f"{name}: image is {w}x{h}; resize_mode 3 (latent upscale) needs at least "
                                f"64 px a side")
        if w * h > limits.max_pixels:
            raise ApiError(400, f"{name}: image is {w}x{h}; resize_mode 3 encodes it at that size, and the limit "
                                f"is {limits.max_pixels} pixels")
    return w, h


def decode_image(data: str, name: str, limits: Limits, resize_mode: int = 0):
    """A request image -> PIL image as decoded (every format A1111 reads: PNG, JPEG, MPO, WEBP, GIF, BMP,
    TIFF), with the bounds of `probe_image`."""
    probe_image(data, name, limits, resize_mode)
    try:
        return imgs.load_image(data, max_pixels=limits.max_image_pixels, mode=None, formats=formats())
    except ValueError as e:
        raise ApiError(400, f"{name}: {e}") from None


_ADVICE = re.compile(r"[^.\n]*weights_only\s*=\s*False[^.\n]*\.?", re.I)


def public_message(text: str, folders) -> str:
    """`text` with each folder's absolute path replaced by the folder's name and PyTorch's advice to load
    with weights_only=False removed."""
    for folder in sorted({os.path.abspath(f) for f in folders if f}, key=len, reverse=True):
        text = text.replace(folder + os.sep, os.path.basename(folder) + "/").replace(folder, os.path.basename(folder))
    text = _ADVICE.sub("", text)
    return re.sub(r"\s{2,}", " ", text).strip()
