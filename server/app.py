"""The A1111-compatible HTTP API (`/sdapi/v1/*`) on Starlette: `create_app(ServerConfig(ckpt_dir="weights"))`.

Plain async endpoints, one `routes` list, and a lifespan that loads the checkpoint once and yields the
shared `Engine`. Generations are jobs of one bounded FIFO queue (server/jobs.py, run by server/runner.py);
they and model switches run one at a time behind one `anyio.CapacityLimiter(1)` (A1111's queue_lock), while
progress, interrupt and the listings answer at once. Bad input is a 4xx in A1111's or FastAPI's shape;
anything unexpected is a 500 with A1111's body, and the server keeps serving.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple, Optional

import anyio
import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sd15.checkpoint import CheckpointError
from sd15.pipeline import JobState, generate
from sd15.samplers.table import samplers_api, schedulers_api
from sd15.schema import ResolvedRequest
from server import a1111, admin, extras, inputs, jobs, jobs_api, options, runner, scripts, ui
from server.a1111 import ApiError, Limits, ValidationError
from server.download import DEFAULT_MODEL
from server.inputs import read_json
from server.metrics import Metrics
from server.middleware import LOOPBACK_HOSTS, BasicAuth, HostCheck, JsonErrors
from server.models import Checkpoint, Library, ModelManager
from server.openapi import openapi_schema

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
    outdir: str = "outputs"  # where saved images go (A1111's layout)
    save: bool = True  # False (--no-save): nothing is ever written
    queue_size: int = 64  # jobs waiting at most; beyond: 503 + Retry-After
    max_job_seconds: Optional[float] = None  # a running job is stopped after this long (partial result)
    keep_abandoned_jobs: bool = False  # True: A1111's behaviour, a job runs although its client left
    allowed_hosts: Optional[list] = None  # Host names accepted; None: loopback names (any with --api-auth)
    body_timeout: float = 60.0  # seconds to receive a request body
    shutdown_grace: float = 30.0  # seconds the running job may take to finish at shutdown


class Prepared(NamedTuple):
    """A checked request, ready to queue: its checked `override_settings` and its resolved request."""
    overrides: dict
    resolved: ResolvedRequest


class Engine:
    def __init__(self, config: ServerConfig, metrics: Optional[Metrics] = None):
        self.config, self.limits = config, config.limits
        self.library = Library(config.ckpt_dir, config.vae_dir, config.lora_dir, config.embeddings_dir,
                               extra_checkpoint=config.ckpt if config.ckpt and os.path.isfile(config.ckpt) else None)
        # CUDA when present, in fp16 there unless --precision says otherwise (A1111's default); else fp32
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
            config.precision, torch.float16 if device.type == "cuda" else torch.float32)
        self.models = ModelManager(self.library, device, dtype, optimize=config.optimize)
        self.options = options.defaults()  # fresh copies: a list option is never shared with the table
        self.job: Optional[runner.Run] = None
        self.last_timestamp = "0"
        self.preview: Optional[str] = None  # base64 PNG of the running job's latest preview
        self.preview_wanted = False  # set by /progress: previews are only decoded when someone looks
        self.gpu: Optional[anyio.CapacityLimiter] = None  # made in the lifespan, inside the event loop
        self.upscalers = extras.make_upscalers(config, device, dtype)  # ESRGAN / RealESRGAN folders
        self.queue: Optional[jobs.JobQueue] = None  # likewise
        self.metrics = metrics or Metrics()
        self.models.loads = self.metrics.model_loads

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

    def submit(self, req, prepared: "Prepared", *, source: str, save: bool) -> jobs.Job:
        """Queue a prepared request -> the job (503 with Retry-After when the queue is full)."""
        try:
            return self.queue.submit("img2img" if req.is_img2img else "txt2img", (req, prepared),
                                     runner.job_summary(req), source=source, save=save)
        except jobs.QueueFull:
            self.metrics.rejected["queue_full"] += 1
            raise

    async def on_gpu(self, fn, *args):
        """Run `fn(*args)` on a worker thread once the GPU is free (FIFO); the slot is held until it returns."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.gpu)

    def options_json(self) -> dict:
        values = dict(self.options)
        checkpoint = self.library.find_checkpoint(values["sd_model_checkpoint"])
        if checkpoint is not None:
            values["sd_model_checkpoint"] = checkpoint.title
        loaded = self.models.checkpoint
        values["sd_checkpoint_hash"] = (loaded.sha256 or "") if loaded else ""
        return options.options_json(values)

    def check_options(self, body, *, strict: bool = True) -> dict:
        """Option values -> checked values, the checkpoint as its title; nothing is applied, so a bad key or
        value leaves every option as it was. POST /options (`strict`): an unknown key, model or VAE is a 400.
        `override_settings`: as in A1111, those (and read-only keys) are dropped and logged."""
        if not isinstance(body, dict):
            raise ValidationError.one(None, "value is not a valid dict", "type_error.dict")
        values, lib = {}, self.library
        for key, value in body.items():
            if key in options.READ_ONLY_OPTIONS or (key not in options.OPTIONS and not strict):
                if not strict:
                    log.warning("override_settings: ignoring %r", key)
                continue
            value, problem = options.validate(key, value), None  # an unknown key is a 400 naming it
            if key == "sd_model_checkpoint":
                checkpoint = lib.find_checkpoint(value)
                if checkpoint is None:
                    problem = f"model '{value}' not found; valid: " + ", ".join(lib.checkpoint_titles())
                else:
                    value = checkpoint.title
            elif key == "sd_vae" and value not in ("Automatic", "None") and lib.find_vae(value) is None:
                problem = lib.vae_missing(value)
            if problem and strict:
                raise ApiError(400, problem)
            if problem:
                log.warning("override_settings: %s; ignored", problem)
            else:
                values[key] = value
        return values

    def prepare(self, req) -> "Prepared":
        """Everything that can fail on the request alone, before it queues: overrides, ranges, names, prompt
        length, and the init images' and mask's headers (format, sides, aspect ratio; no pixel is decoded
        here). The request is resolved here, once (`sd15.schema.resolve`): its sampler, seeds and hires size
        are what the job runs with."""
        overrides = self.check_options(req.override_settings or {}, strict=False)
        settings = {**self.options, **overrides}
        upscalers = extras.sync_options(self.upscalers, settings).names()
        resolved = a1111.check(req, self.limits, settings, upscalers)
        inputs.check_prompts(req, self.limits)
        if req.is_img2img:
            for i, s in enumerate(req.init_images):
                inputs.probe_image(s, f"init_images[{i}]", self.limits, resize_mode=req.resize_mode)
            if req.mask:
                inputs.probe_image(req.mask, "mask", self.limits)
        return Prepared(overrides, resolved)

    def run(self, req, prepared: "Prepared", job: jobs.Job):
        """(GPU worker) One txt2img/img2img job with the options as they are now -> (Result, settings).
        The choices `prepare` made stay (sampler, seeds, hires size); the request is rebuilt with the
        decoded images and the options of this moment, neither of which changes a choice."""
        settings = {**self.options, **prepared.overrides}
        init_images = mask = None
        if req.is_img2img:  # decoded now, when the job starts: the queue holds only the request bodies
            init_images = [inputs.decode_image(s, f"init_images[{i}]", self.limits, req.resize_mode)
                           for i, s in enumerate(req.init_images)]
            mask = inputs.decode_image(req.mask, "mask", self.limits) if req.mask else None
        request = a1111.to_request(req, settings, init_images, mask)
        request = dataclasses.replace(prepared.resolved, request=request)
        del init_images, mask
        run = runner.Run("img2img" if req.is_img2img else "txt2img", JobState(), request.n_iter,
                         2 if request.hires else 1)
        job.control = run.state
        if job.stop_reason is not None:  # cancelled between leaving the queue and starting
            run.state.interrupt()
        self.job, self.preview = run, None
        try:
            self.ensure_model(settings)
            result = generate(self.models.model, request, state=run.state,
                              callback=runner.make_callback(self, run, job, settings),
                              upscalers=extras.sync_options(self.upscalers, settings),
                              **self.models.infotext_hashes())
        finally:
            self.job, self.last_timestamp = None, run.timestamp
            job.steps_done, job.sampling_seconds = run.steps_done, time.time() - run.started
        if not req.override_settings_restore_afterwards:
            self.options.update(prepared.overrides)
        return result, settings

    def folders(self) -> list[str]:
        lib = self.library
        return [d for d in (lib.ckpt_dir, lib.vae_dir, lib.lora_dir, lib.embeddings_dir, self.config.outdir) if d]


def _engine(request: Request) -> Engine:
    return request.state.engine


async def txt2img(request: Request):
    """Text to image."""
    return await _generate(request, a1111.Txt2ImgRequest)


async def img2img(request: Request):
    """Image to image and inpainting."""
    return await _generate(request, a1111.Img2ImgRequest)


async def _generate(request: Request, cls):
    engine = _engine(request)
    req = cls.from_json(await read_json(request, engine.limits.max_body_bytes))
    prepared = await run_in_threadpool(runner.prepare, engine, req)  # a script (script_name): its plan
    job = engine.submit(req, prepared, source="api", save=req.save_images)
    await runner.wait_for_job(request, engine, job)
    return runner.job_response(job)


async def png_info(request: Request):
    """Read the infotext and other metadata of an image."""
    engine = _engine(request)
    req = a1111.PngInfoRequest.from_json(await read_json(request, engine.limits.max_body_bytes))
    if not req.image.strip():
        return JSONResponse({"info": "", "items": {}, "parameters": {}})
    image = await run_in_threadpool(inputs.decode_image, req.image, "image", engine.limits)
    return JSONResponse(a1111.png_info(image))


async def get_options(request: Request):
    """All options."""
    return JSONResponse(_engine(request).options_json())


async def set_options(request: Request):
    """Set options; `sd_model_checkpoint` / `sd_vae` switch the model once the running jobs are done."""
    engine = _engine(request)
    values = engine.check_options(await read_json(request, engine.limits.max_body_bytes))
    title, vae = values.pop("sd_model_checkpoint", None), values.pop("sd_vae", None)
    if title is not None or vae is not None:
        loaded = engine.models.checkpoint
        checkpoint = engine.library.find_checkpoint(title) if title else None
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
                raise ApiError(400, f"could not load {target.name}: "
                                    f"{inputs.public_message(str(e), engine.folders())}") from None
    engine.options.update(values)
    return JSONResponse(None)


async def progress(request: Request):
    """Progress of the running job (global, as in A1111)."""
    engine = _engine(request)
    skip = request.query_params.get("skip_current_image", "false").lower() in ("1", "true", "yes", "on")
    watching = engine.job is not None and not skip
    if watching:
        engine.preview_wanted = True  # previews are only made while someone watches
    preview = engine.preview if watching else None
    return JSONResponse(a1111.progress_json(engine.job, engine.last_timestamp, preview))


async def interrupt(request: Request):
    """Stop the running job; it returns what it has."""
    running = _engine(request).queue.running
    if running is not None:
        running.interrupt("interrupted")  # the job's JobState, or, not yet started, its first check
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


async def embeddings(request: Request):
    """Textual-inversion embeddings."""
    engine = _engine(request)
    return JSONResponse(await run_in_threadpool(engine.library.embeddings_api, engine.models.model))


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


async def memory(request: Request):
    """RAM (this process's resident memory, as A1111 reports it) and CUDA allocator figures, in bytes."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[1]) * page
        ram = {"free": total - used, "used": used, "total": total}
    except (OSError, ValueError, AttributeError) as e:
        ram = {"error": str(e)}
    if not torch.cuda.is_available():
        return JSONResponse({"ram": ram, "cuda": {"error": "unavailable"}})
    free, total = torch.cuda.mem_get_info()
    s = torch.cuda.memory_stats()
    cuda = {"system": {"free": free, "used": total - free, "total": total}}
    for name, key in [("active", "active_bytes"), ("allocated", "allocated_bytes"),
                      ("reserved", "reserved_bytes"), ("inactive", "inactive_split_bytes")]:
        cuda[name] = {"current": s.get(f"{key}.all.current", 0), "peak": s.get(f"{key}.all.peak", 0)}
    cuda["events"] = {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)}
    return JSONResponse({"ram": ram, "cuda": cuda})


async def cmd_flags(request: Request):
    """Command-line flags (credentials masked)."""
    return JSONResponse(_engine(request).config.flags)


def _constant(method: str, name: str, answer, doc: str) -> Route:
    """A route that always answers `answer`: the fixed tables (samplers, ...), A1111's listings that have
    nothing behind them here, and the refreshes of listings that are read fresh each time."""
    async def endpoint(request: Request):
        return JSONResponse(answer)
    endpoint.__name__, endpoint.__doc__ = name.replace("-", "_"), doc
    return Route(f"{API}/{name}", endpoint, methods=[method])


async def openapi(request: Request):
    """This schema."""
    engine = _engine(request)
    auth = bool(engine.config.api_auth)
    return JSONResponse(openapi_schema(routes, REQUEST_BODIES, engine.limits, auth=auth))


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
    _constant("GET", "samplers", samplers_api(), "Samplers."),
    _constant("GET", "schedulers", schedulers_api(), "Schedulers."),
    _constant("GET", "latent-upscale-modes", a1111.latent_upscale_modes(), "Latent upscale modes."),
    Route(f"{API}/sd-models", sd_models, methods=["GET"]),
    Route(f"{API}/sd-vae", sd_vae, methods=["GET"]),
    Route(f"{API}/refresh-checkpoints", refresh_checkpoints, methods=["POST"]),
    Route(f"{API}/refresh-vae", refresh_vae, methods=["POST"]),
    Route(f"{API}/loras", loras, methods=["GET"]),
    _constant("POST", "refresh-loras", None, "Rescan the LoRA folder (listings are read fresh)."),
    Route(f"{API}/embeddings", embeddings, methods=["GET"]),
    _constant("POST", "refresh-embeddings", None, "Rescan the embeddings folder (listings are read fresh)."),
    Route(f"{API}/unload-checkpoint", unload_checkpoint, methods=["POST"]),
    Route(f"{API}/reload-checkpoint", reload_checkpoint, methods=["POST"]),
    Route(f"{API}/memory", memory, methods=["GET"]),
    *scripts.routes,  # /scripts and /script-info (before the empty listings)
    *[_constant("GET", name, [], f"Nothing behind this here: A1111's empty {name} answer.")
      for name in ("prompt-styles", "face-restorers", "hypernetworks", "extensions")],
    Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
    *ui.routes,  # the web page at / and its helpers under /sd15/v1
    *jobs_api.routes,  # the page's jobs, queue and events under /sd15/v1, and /metrics
]
REQUEST_BODIES = {txt2img: a1111.Txt2ImgRequest, img2img: a1111.Img2ImgRequest, png_info: a1111.PngInfoRequest,
                  **extras.REQUEST_BODIES}


async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(request: Request, exc: ValidationError):
    return JSONResponse({"detail": exc.problems}, status_code=422)


async def _http_error(request: Request, exc: HTTPException):  # routing: 404, 405 in FastAPI's words
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def cors_options(config: ServerConfig) -> dict:
    """Starlette's CORS settings. Credentials are allowed only with named origins: with a wildcard ("*")
    Starlette would echo any origin together with `Allow-Credentials: true`, which lets every site read
    authenticated answers."""
    origins = list(config.cors_allow_origins)
    wildcard = "*" in origins or config.cors_allow_origins_regex in (".*", "^.*$", ".+", "^.+$")
    return dict(allow_origins=origins, allow_origin_regex=config.cors_allow_origins_regex, allow_methods=["*"],
                allow_headers=["*"], allow_credentials=not wildcard)


def allowed_hosts(config: ServerConfig) -> Optional[list]:
    """Host names the server answers to (None: any). With --allowed-hosts, those (plus loopback names);
    otherwise loopback names, and any host when --api-auth is set (a DNS-rebinding page cannot send the
    credentials). IP addresses are always accepted."""
    if config.allowed_hosts:
        return [*LOOPBACK_HOSTS, *config.allowed_hosts]
    return None if config.api_auth else list(LOOPBACK_HOSTS)


def create_app(config: ServerConfig, engine: Optional[Engine] = None) -> Starlette:
    """The Starlette app. `engine` may be made (and its model loaded) beforehand, as `python -m server` does
    to report a bad file before serving; otherwise the lifespan makes it."""
    metrics = engine.metrics if engine is not None else Metrics()

    @asynccontextmanager
    async def lifespan(app):
        eng = engine or await run_in_threadpool(Engine, config, metrics)
        eng.gpu = anyio.CapacityLimiter(1)
        eng.queue = jobs.JobQueue(partial(runner.execute, eng), eng.gpu, max_size=config.queue_size,
                                  on_finish=partial(runner.job_finished, eng))
        if eng.models.model is None:
            await eng.on_gpu(eng.start)
        async with anyio.create_task_group() as tg:
            tg.start_soon(eng.queue.worker)
            try:
                yield {"engine": eng}
            finally:
                await eng.queue.drain(config.shutdown_grace)
                tg.cancel_scope.cancel()

    # JSON errors outermost (also around the host check and CORS); CORS before auth, so preflights (which
    # carry no credentials) are answered as A1111 does: with no --cors-allow-origins, no origin is allowed.
    middleware = [Middleware(JsonErrors, metrics=metrics)]
    hosts = allowed_hosts(config)
    if hosts is not None:
        middleware.append(Middleware(HostCheck, allowed=hosts, metrics=metrics))
    middleware.append(Middleware(CORSMiddleware, **cors_options(config)))
    if config.api_auth:
        middleware.append(Middleware(BasicAuth, credentials=config.api_auth))
    middleware.append(Middleware(GZipMiddleware, minimum_size=1000))
    # anything else a route raises becomes A1111's JSON 500 in JsonErrors
    handlers = {ApiError: _api_error, ValidationError: _validation_error, HTTPException: _http_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
