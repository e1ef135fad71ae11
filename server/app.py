"""The A1111-compatible HTTP API (`/sdapi/v1/*`, a1111-api.md) on Starlette.

    app = create_app(ServerConfig(ckpt_dir="weights"))      # uvicorn.run(app) / TestClient(app)

Plain async endpoints, one `routes` list, and a lifespan that loads the checkpoint once and yields the
shared `Engine` (read as `request.state.engine`). Model work runs on worker threads behind one
`anyio.CapacityLimiter(1)`, first come first served (A1111's queue_lock): generations, checkpoint/VAE
switches and unloads queue there, while progress, interrupt, skip and the listings answer at once.

Errors: `ApiError` -> A1111's body `{"error", "detail", "body", "errors"}`; bad types or ranges -> 422 in
FastAPI's shape; routing -> `{"detail": "Not Found"}`. Bad input is always a 4xx; anything unexpected inside
a generation is a 500 with A1111's body, and the server keeps serving.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import logging
import os
import time
import typing
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Optional

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sd15 import infotext
from sd15.checkpoint import CheckpointError
from sd15.pipeline import JobState, decode_latents, generate
from server import a1111, admin, extras, scripts, ui
from server.scripts import serve as scripts_serve
from server.a1111 import ApiError, Limits, ValidationError
from server.download import DEFAULT_MODEL
from server.models import Checkpoint, Library, ModelManager

log = logging.getLogger("server")


@dataclass
class ServerConfig:
    ckpt_dir: str = "weights"
    ckpt: Optional[str] = None  # the checkpoint to start with (name in ckpt_dir, alias or path)
    vae_dir: Optional[str] = None
    lora_dir: Optional[str] = None
    embeddings_dir: Optional[str] = None
    device: Optional[str] = None  # None: CUDA when present, else CPU
    precision: Optional[str] = None  # "fp16" | "bf16" | "fp32"; None: fp16 on CUDA, fp32 on CPU
    api_auth: list = field(default_factory=list)  # [(user, password)]; empty: no auth
    cors_allow_origins: list = field(default_factory=list)
    cors_allow_origins_regex: Optional[str] = None
    limits: Limits = field(default_factory=Limits)
    flags: dict = field(default_factory=dict)  # what GET /cmd-flags shows (secrets already masked)
    optimize: bool = False  # CUDA: sd15.fast.optimize (compile, CUDA graphs) and a 512x512 warm-up after each load
    outdir: str = "outputs"  # where saved images go; the page's history view (server/ui.py) reads it


@dataclass
class Job:
    """The running generation, as /progress reports it."""
    kind: str  # "txt2img" | "img2img"
    state: JobState
    n_iter: int
    passes: int  # 2 with hires fix
    started: float = field(default_factory=time.time)
    timestamp: str = field(default_factory=infotext.job_timestamp)
    steps_done: int = 0
    preview_at: int = 0


# =============================================================================================
# The engine: folders, loaded model, options, GPU queue, running job
# =============================================================================================

class Engine:
    def __init__(self, config: ServerConfig):
        import torch

        self.config, self.limits = config, config.limits
        self.library = Library(config.ckpt_dir, config.vae_dir, config.lora_dir, config.embeddings_dir,
                               extra_checkpoint=config.ckpt if config.ckpt and os.path.isfile(config.ckpt) else None)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, None: None}[config.precision]
        self.models = ModelManager(self.library, config.device, dtype, optimize=config.optimize)
        self.options = {key: opt.default for key, opt in a1111.OPTIONS.items()}
        self.job: Optional[Job] = None
        self.last_timestamp = "0"
        self.preview: Optional[str] = None  # base64 PNG of the running job's latest preview
        self.preview_wanted = False  # set by /progress: previews are only decoded when someone looks
        self.gpu: Optional[anyio.CapacityLimiter] = None  # made in the lifespan, inside the event loop
        self.upscalers = extras.make_upscalers(config)  # ESRGAN / RealESRGAN folders (server/extras.py)

    # --- model -------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the start checkpoint (--ckpt, else v1-5-pruned-emaonly.safetensors, else the first)."""
        lib, cfg = self.library, self.config
        if cfg.ckpt:
            checkpoint = lib.find_checkpoint(cfg.ckpt) or lib.find_checkpoint(os.path.abspath(cfg.ckpt))
            if checkpoint is None:
                raise CheckpointError(f"{cfg.ckpt}: no such checkpoint (looked in {os.path.abspath(cfg.ckpt_dir)})")
        else:
            checkpoint = lib.find_checkpoint(DEFAULT_MODEL) or (lib.checkpoints[0] if lib.checkpoints else None)
            if checkpoint is None:
                raise CheckpointError(f"no checkpoint (.safetensors, .ckpt) in {os.path.abspath(cfg.ckpt_dir)}")
        self.switch(checkpoint, self.options["sd_vae"])

    def switch(self, checkpoint: Checkpoint, vae_choice: str) -> None:
        """(GPU worker) Make `checkpoint` + `vae_choice` the loaded model and the options' choice."""
        self.models.ensure(checkpoint, self.library.vae_path(vae_choice, checkpoint))
        self.options["sd_model_checkpoint"] = checkpoint.title  # with the short hash, now that it is known
        self.options["sd_vae"] = vae_choice

    def ensure_model(self, settings: dict) -> None:
        """(GPU worker) Load what a job's settings name, if it is not what is loaded."""
        checkpoint = self.library.find_checkpoint(settings["sd_model_checkpoint"]) or self.models.checkpoint
        if checkpoint is None:
            raise ApiError(503, "no checkpoint is available; put one in the checkpoint folder and POST "
                                "/sdapi/v1/refresh-checkpoints")
        try:
            vae = self.library.vae_path(settings["sd_vae"], checkpoint)
        except LookupError as e:
            raise ApiError(400, str(e)) from None
        self.models.ensure(checkpoint, vae)

    async def on_gpu(self, fn, *args):
        """Run `fn(*args)` on a worker thread once the GPU is free (FIFO); the slot is held until it returns."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.gpu)

    # --- options -----------------------------------------------------------------------------

    def options_json(self) -> dict:
        values = dict(self.options)
        checkpoint = self.library.find_checkpoint(values["sd_model_checkpoint"])
        if checkpoint is not None:
            values["sd_model_checkpoint"] = checkpoint.title
        loaded = self.models.checkpoint
        values["sd_checkpoint_hash"] = (loaded.sha256 or "") if loaded else ""
        return a1111.options_json(values)

    def check_options(self, body) -> tuple[dict, Optional[Checkpoint], Optional[str]]:
        """POSTed options -> (checked values, checkpoint to switch to, VAE choice); nothing is applied, so a
        bad key or value leaves every option as it was."""
        if not isinstance(body, dict):
            raise ValidationError.one(None, "value is not a valid dict", "type_error.dict")
        values, checkpoint, vae = {}, None, None
        for key, value in body.items():
            if key not in a1111.OPTIONS:
                raise ApiError(400, f"unknown option {key!r}; GET /sdapi/v1/options lists the options this "
                                    f"server has")
            if key in a1111.READ_ONLY_OPTIONS:
                continue
            value = a1111.option_value(key, value)
            if key == "sd_model_checkpoint":
                checkpoint = self.library.find_checkpoint(value)
                if checkpoint is None:
                    raise ApiError(400, f"model '{value}' not found; valid: "
                                        + ", ".join(self.library.checkpoint_titles()))
                continue
            if key == "sd_vae":
                if value not in ("Automatic", "None") and self.library.find_vae(value) is None:
                    raise ApiError(400, f"VAE '{value}' not found; valid: Automatic, None"
                                        + "".join(f", {v['model_name']}" for v in self.library.vae_api()))
                vae = value
                continue
            values[key] = value
        return values, checkpoint, vae

    def check_overrides(self, overrides: dict) -> dict:
        """`override_settings` -> checked values. As in A1111, a checkpoint that is not an exact alias is
        dropped; keys this server does not have are ignored (and logged)."""
        out = {}
        for key, value in overrides.items():
            if key not in a1111.OPTIONS or key in a1111.READ_ONLY_OPTIONS:
                log.warning("override_settings: ignoring %r", key)
                continue
            value = a1111.option_value(key, value)
            if key == "sd_model_checkpoint":
                checkpoint = self.library.find_checkpoint(value)
                if checkpoint is None:
                    log.warning("override_settings: model %r not found; using the current one", value)
                    continue
                value = checkpoint.title
            if key == "sd_vae" and value not in ("Automatic", "None") and self.library.find_vae(value) is None:
                log.warning("override_settings: VAE %r not found; ignored", value)
                continue
            out[key] = value
        return out

    # --- generation ----------------------------------------------------------------------------

    def prepare(self, req) -> tuple:
        """Everything that can fail on the request alone, before it queues: ranges, names, overrides,
        image decoding (with the pixel limit) -> (init_images, mask, overrides)."""
        a1111.check(req, self.limits)
        a1111.resolve_names(req)
        overrides = self.check_overrides(req.override_settings or {})
        if req.save_images:
            log.warning("save_images: this server does not save images; they are only returned")
        init_images = mask = None
        if req.is_img2img:
            if not req.init_images:
                raise ApiError(404, "Init image not found")
            init_images = [a1111.decode_image(s, f"init_images[{i}]", self.limits)
                           for i, s in enumerate(req.init_images)]
            if req.mask:
                mask = a1111.decode_image(req.mask, "mask", self.limits)
        return init_images, mask, overrides

    def run(self, req, init_images, mask, overrides: dict):
        """(GPU worker) One txt2img/img2img job with the options as they are now -> (Result, settings)."""
        settings = {**self.options, **overrides}
        params = a1111.to_params(req, settings, init_images, mask)
        job = Job("img2img" if req.is_img2img else "txt2img", JobState(), params.n_iter, 2 if params.enable_hr else 1)
        self.job, self.preview = job, None
        try:
            self.ensure_model(settings)
            result = generate(self.models.model, params, state=job.state, callback=self._previewer(job, settings))
        finally:
            self.job, self.last_timestamp = None, job.timestamp
        if not req.override_settings_restore_afterwards:
            self.options.update(overrides)
        return result, settings

    def _previewer(self, job: Job, settings: dict):
        """The sampler callback that decodes a live preview every `show_progress_every_n_steps` steps, but
        only while someone polls /progress (a VAE decode is not free)."""
        every = settings["show_progress_every_n_steps"]
        if not settings["live_previews_enable"] or every <= 0:
            return None

        def callback(step, sigma, x, denoised):
            job.steps_done += 1
            if self.preview_wanted and job.steps_done - job.preview_at >= every:
                from sd15 import images as imgs
                from sd15.pipeline import png_bytes

                job.preview_at, self.preview_wanted = job.steps_done, False
                image = imgs.tensor_to_pil(decode_latents(self.models.model, denoised[:1]))[0]
                self.preview = base64.b64encode(png_bytes(image)).decode("ascii")
        return callback


# =============================================================================================
# Request helpers
# =============================================================================================

async def read_json(request: Request, limit: int):
    """The JSON body, at most `limit` bytes (413 beyond); malformed JSON -> 422 as FastAPI words it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is larger than the {limit:,}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is larger than the {limit:,}-byte limit")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise ValidationError.one(None, "field required", "value_error.missing")
    try:
        return await run_in_threadpool(json.loads, body)  # a large body would hold up the event loop
    except (ValueError, RecursionError) as e:
        pos = getattr(e, "pos", 0)
        raise ValidationError.one((pos,), str(getattr(e, "msg", e)), "value_error.jsondecode") from None


def _engine(request: Request) -> Engine:
    return request.state.engine


# =============================================================================================
# Endpoints
# =============================================================================================

async def txt2img(request: Request):
    """Text to image."""
    return await _generate(request, a1111.Txt2ImgRequest)


async def img2img(request: Request):
    """Image to image and inpainting."""
    return await _generate(request, a1111.Img2ImgRequest)


async def _generate(request: Request, cls):
    engine = _engine(request)
    req = cls.from_json(await read_json(request, engine.limits.max_body_bytes))
    if req.script_name:  # --- scripts hook: A1111's selectable scripts (server/scripts) ---
        return JSONResponse(await scripts_serve.generate(engine, req))
    init_images, mask, overrides = await run_in_threadpool(engine.prepare, req)
    try:
        result, settings = await engine.on_gpu(engine.run, req, init_images, mask, overrides)
    except (ApiError, ValidationError):
        raise
    except (ValueError, LookupError) as e:  # the pipeline's own checks, a bad checkpoint file
        raise ApiError(400, str(e)) from None
    except Exception as e:  # a bug or out of memory: a JSON 500, and the server goes on
        log.exception("generation failed")
        raise ApiError(500, error=type(e).__name__, errors=str(e)) from None
    for warning in result.warnings:
        log.warning("%s", warning)
    body = await run_in_threadpool(a1111.image_response, req, result, settings["enable_pnginfo"])
    return JSONResponse(body)


async def png_info(request: Request):
    """Read the infotext and other metadata of an image."""
    engine = _engine(request)
    req = a1111.PngInfoRequest.from_json(await read_json(request, engine.limits.max_body_bytes))
    if not req.image.strip():
        return JSONResponse({"info": "", "items": {}, "parameters": {}})
    image = await run_in_threadpool(a1111.decode_image, req.image, "image", engine.limits)
    return JSONResponse(a1111.png_info(image))


async def get_options(request: Request):
    """All options."""
    return JSONResponse(_engine(request).options_json())


async def set_options(request: Request):
    """Set options; `sd_model_checkpoint` / `sd_vae` switch the model once the running jobs are done."""
    engine = _engine(request)
    values, checkpoint, vae = engine.check_options(await read_json(request, engine.limits.max_body_bytes))
    if checkpoint is not None or vae is not None:
        loaded = engine.models.checkpoint
        target = checkpoint or loaded or engine.library.find_checkpoint(engine.options["sd_model_checkpoint"])
        vae = vae or engine.options["sd_vae"]
        if target is None:
            raise ApiError(400, "no checkpoint is available to load")
        if loaded is not None and target.path == loaded.path and vae == engine.options["sd_vae"]:
            engine.options["sd_model_checkpoint"] = loaded.title  # already loaded: nothing to queue
        else:
            try:
                await engine.on_gpu(engine.switch, target, vae)  # waits for the jobs ahead, as A1111 does
            except (ValueError, LookupError, OSError) as e:  # CheckpointError is a ValueError
                raise ApiError(400, f"could not load {target.name}: {e}") from None
    engine.options.update(values)
    return JSONResponse(None)


async def progress(request: Request):
    """Progress of the running job (global, as in A1111)."""
    engine = _engine(request)
    skip = request.query_params.get("skip_current_image", "false").lower() in ("1", "true", "yes", "on")
    job = engine.job
    if job is not None and not skip:
        engine.preview_wanted = True
    preview = engine.preview if job is not None and not skip else None
    return JSONResponse(a1111.progress_json(job, engine.last_timestamp, preview))


async def interrupt(request: Request):
    """Stop the running job; it returns what it has."""
    job = _engine(request).job
    if job is not None:
        job.state.interrupt()
    return JSONResponse({})


async def skip(request: Request):
    """Skip the running batch."""
    job = _engine(request).job
    if job is not None:
        job.state.skip()
    return JSONResponse(None)


async def sd_models(request: Request):
    """Checkpoints."""
    return JSONResponse([c.api() for c in _engine(request).library.checkpoints])


async def sd_vae(request: Request):
    """VAE files."""
    return JSONResponse(_engine(request).library.vae_api())


async def refresh_checkpoints(request: Request):
    """Rescan the checkpoint folder."""
    await run_in_threadpool(_engine(request).library.refresh_checkpoints)
    return JSONResponse(None)


async def refresh_vae(request: Request):
    """Rescan the VAE folder."""
    await run_in_threadpool(_engine(request).library.refresh_vae)
    return JSONResponse(None)


async def loras(request: Request):
    """LoRA files."""
    engine = _engine(request)
    return JSONResponse(await run_in_threadpool(engine.library.loras_api, engine.models.model))


async def refresh_loras(request: Request):
    """Rescan the LoRA folder (listings are read fresh each time)."""
    return JSONResponse(None)


async def embeddings(request: Request):
    """Textual-inversion embeddings."""
    engine = _engine(request)
    return JSONResponse(await run_in_threadpool(engine.library.embeddings_api, engine.models.model))


async def refresh_embeddings(request: Request):
    """Rescan the embeddings folder (listings are read fresh each time)."""
    return JSONResponse(None)


async def unload_checkpoint(request: Request):
    """Free the model's memory; the next job loads it again."""
    engine = _engine(request)
    await engine.on_gpu(engine.models.unload)
    return JSONResponse({})


async def reload_checkpoint(request: Request):
    """Load the selected model again after an unload."""
    engine = _engine(request)
    await engine.on_gpu(engine.ensure_model, dict(engine.options))
    return JSONResponse({})


async def samplers(request: Request):
    """Samplers."""
    return JSONResponse(infotext.samplers_api())


async def schedulers(request: Request):
    """Schedulers."""
    return JSONResponse(infotext.schedulers_api())


async def latent_upscale_modes(request: Request):
    """Latent upscale modes for hires fix."""
    return JSONResponse(a1111.latent_upscale_modes())


async def memory(request: Request):
    """RAM and CUDA memory (bytes)."""
    return JSONResponse(_memory())


async def cmd_flags(request: Request):
    """Command-line flags (credentials masked)."""
    return JSONResponse(_engine(request).config.flags)


def _empty(name: str):
    async def endpoint(request: Request):
        return JSONResponse(a1111.EMPTY_SHAPES[name])
    endpoint.__name__ = name.replace("-", "_")
    endpoint.__doc__ = f"Nothing behind this here: A1111's empty {name} answer."
    return endpoint


async def openapi(request: Request):
    """This schema."""
    return JSONResponse(openapi_schema())


API = "/sdapi/v1"
routes = [
    *extras.routes, *admin.routes,
    Route(f"{API}/txt2img", txt2img, methods=["POST"]),
    Route(f"{API}/img2img", img2img, methods=["POST"]),
    Route(f"{API}/png-info", png_info, methods=["POST"]),
    Route(f"{API}/progress", progress, methods=["GET"]),
    Route(f"{API}/interrupt", interrupt, methods=["POST"]),
    Route(f"{API}/skip", skip, methods=["POST"]),
    Route(f"{API}/options", get_options, methods=["GET"]),
    Route(f"{API}/options", set_options, methods=["POST"]),
    Route(f"{API}/cmd-flags", cmd_flags, methods=["GET"]),
    Route(f"{API}/samplers", samplers, methods=["GET"]),
    Route(f"{API}/schedulers", schedulers, methods=["GET"]),
    Route(f"{API}/latent-upscale-modes", latent_upscale_modes, methods=["GET"]),
    Route(f"{API}/sd-models", sd_models, methods=["GET"]),
    Route(f"{API}/sd-vae", sd_vae, methods=["GET"]),
    Route(f"{API}/refresh-checkpoints", refresh_checkpoints, methods=["POST"]),
    Route(f"{API}/refresh-vae", refresh_vae, methods=["POST"]),
    Route(f"{API}/loras", loras, methods=["GET"]),
    Route(f"{API}/refresh-loras", refresh_loras, methods=["POST"]),
    Route(f"{API}/embeddings", embeddings, methods=["GET"]),
    Route(f"{API}/refresh-embeddings", refresh_embeddings, methods=["POST"]),
    Route(f"{API}/unload-checkpoint", unload_checkpoint, methods=["POST"]),
    Route(f"{API}/reload-checkpoint", reload_checkpoint, methods=["POST"]),
    Route(f"{API}/memory", memory, methods=["GET"]),
    *scripts.routes,  # --- scripts hook: /scripts and /script-info (before the empty listings) ---
    *[Route(f"{API}/{name}", _empty(name), methods=["GET"]) for name in a1111.EMPTY_SHAPES],
    Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
    *ui.routes,  # the web page at / and its helpers under /sd15/v1
]
REQUEST_BODIES = {txt2img: a1111.Txt2ImgRequest, img2img: a1111.Img2ImgRequest, png_info: a1111.PngInfoRequest,
                  **extras.REQUEST_BODIES}


# =============================================================================================
# Errors and middleware
# =============================================================================================

async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status)


async def _validation_error(request: Request, exc: ValidationError):
    return JSONResponse({"detail": exc.problems}, status_code=422)


async def _http_error(request: Request, exc: HTTPException):  # routing: 404, 405 in FastAPI's words
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception):
    return JSONResponse(ApiError(500, error=type(exc).__name__, errors=str(exc)).body(), status_code=500)


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
                response = JSONResponse(ApiError(401, problem).body(), status_code=401,
                                        headers={"WWW-Authenticate": "Basic"})
                await response(scope, receive, send)
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


class ProcessTime:
    """`X-Process-Time` (seconds) on every response, as A1111 adds it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def send_timed(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Process-Time", str(round(time.perf_counter() - start, 4)))
            await send(message)
        await self.app(scope, receive, send_timed)


def create_app(config: ServerConfig, engine: Optional[Engine] = None) -> Starlette:
    """The Starlette app. `engine` may be made (and its model loaded) beforehand, as `python -m server` does
    to report a bad file before serving; otherwise the lifespan makes it."""

    @asynccontextmanager
    async def lifespan(app):
        eng = engine or await run_in_threadpool(Engine, config)
        eng.gpu = anyio.CapacityLimiter(1)
        if eng.models.model is None:
            await eng.on_gpu(eng.start)
        yield {"engine": eng}

    # CORS outermost, so preflights (which carry no credentials) are answered before auth, as A1111 does:
    # with no --cors-allow-origins, no origin is allowed.
    middleware = [Middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origins),
                             allow_origin_regex=config.cors_allow_origins_regex, allow_methods=["*"],
                             allow_headers=["*"], allow_credentials=True)]
    if config.api_auth:
        middleware.append(Middleware(BasicAuth, credentials=config.api_auth))
    middleware += [Middleware(GZipMiddleware, minimum_size=1000), Middleware(ProcessTime)]
    handlers = {ApiError: _api_error, ValidationError: _validation_error, HTTPException: _http_error,
                Exception: _server_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)


# =============================================================================================
# /sdapi/v1/memory and /openapi.json
# =============================================================================================

def _memory() -> dict:
    import torch

    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[1]) * page  # this process's resident memory, as A1111 reports it
        ram = {"free": total - used, "used": used, "total": total}
    except (OSError, ValueError, AttributeError) as e:
        ram = {"error": str(e)}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "unavailable"}}
    free, total = torch.cuda.mem_get_info()
    s = torch.cuda.memory_stats()

    def pair(name):
        return {"current": s.get(f"{name}.all.current", 0), "peak": s.get(f"{name}.all.peak", 0)}
    cuda = {"system": {"free": free, "used": total - free, "total": total}, "active": pair("active_bytes"),
            "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
            "inactive": pair("inactive_split_bytes"),
            "events": {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)}}
    return {"ram": ram, "cuda": cuda}


def _json_schema(tp) -> dict:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if type(None) in typing.get_args(tp):
        return {**_json_schema(args[0]), "nullable": True}
    origin = typing.get_origin(tp)
    if origin is list or tp is list:
        return {"type": "array", "items": _json_schema(args[0]) if args else {}}
    if origin is dict or tp is dict:
        return {"type": "object"}
    return {"type": {int: "integer", float: "number", bool: "boolean", str: "string"}[tp]}


_BOUNDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum", "enum": "enum"}


def _dataclass_schema(cls) -> dict:
    hints = typing.get_type_hints(cls)
    props = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        props[f.name] = {**_json_schema(hints[f.name]), "default": default}
        props[f.name].update({_BOUNDS[k]: list(v) if k == "enum" else v for k, v in f.metadata.items() if k in _BOUNDS})
    schema = {"title": cls.__name__, "type": "object", "properties": props}
    if getattr(cls, "REQUIRED", ()):
        schema["required"] = list(cls.REQUIRED)
    return schema


def openapi_schema() -> dict:
    """OpenAPI 3 description of the routes above; request bodies come from the request dataclasses."""
    paths: dict = {}
    for route in routes:
        if not route.include_in_schema:
            continue
        for method in sorted(route.methods - {"HEAD"}):
            op = {"summary": (route.endpoint.__doc__ or "").strip().split("\n")[0],
                  "operationId": f"{route.endpoint.__name__}_{method.lower()}",
                  "responses": {"200": {"description": "Successful Response",
                                        "content": {"application/json": {"schema": {}}}}}}
            body = REQUEST_BODIES.get(route.endpoint)
            if body is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}
                op["responses"]["422"] = {"description": "Validation Error"}
            elif route.endpoint is set_options:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
            paths.setdefault(route.path, {})[method.lower()] = op
    schemas = {cls.__name__: _dataclass_schema(cls) for cls in REQUEST_BODIES.values()}
    return {"openapi": "3.0.2", "info": {"title": "sd15 (AUTOMATIC1111-compatible API)", "version": "0.1.0"},
            "paths": paths, "components": {"schemas": schemas}}
