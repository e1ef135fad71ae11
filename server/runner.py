"""Running one queued job on the GPU worker: the A1111 request -> generation -> response body (+ saved
files), the sampler callback that carries progress, previews and the per-job limits, and the per-job log
line and metrics. `self` below is the server's `Engine` (server/app.py). Only the server writes files; the
library (`sd15/`) writes nothing."""
from __future__ import annotations

import base64
import dataclasses
import datetime
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse

from sd15.a1111 import infotext
from sd15.a1111.images import encode_image, next_sequence_number, png_bytes
from sd15.schema import RequestError
from server import a1111, inputs, jobs, preview, scripts
from server.a1111 import ApiError, ValidationError

log = logging.getLogger("server")
_save_lock = threading.Lock()  # file numbering is read-then-write: one writer at a time


@dataclass
class Run:
    """The running generation, as /sdapi/v1/progress reports it (`a1111.progress_json`)."""
    kind: str  # "txt2img" | "img2img"
    state: Any  # sd15.pipeline.JobState
    n_iter: int
    passes: int  # 2 with hires fix
    started: float = field(default_factory=time.time)
    timestamp: str = field(default_factory=infotext.job_timestamp)
    steps_done: int = 0
    preview_at: int = 0


def prepare(engine, req):
    """(any thread) Check a request before it queues -> what its job runs with: `engine.prepare`'s checked and
    resolved request, or, for a request naming a `script_name`, the script's plan whose `requests` are its cells
    as (request, prepared) pairs, each checked and resolved here, once, as a plain request is."""
    if not req.script_name:
        return engine.prepare(req)
    kind = "img2img" if req.is_img2img else "txt2img"
    names = [f.name for f in (*req.shared_fields(), *dataclasses.fields(req)) if f.name != "shared"]
    request = {**{name: getattr(req, name) for name in names}, "infotext": None}  # coerced, infotext merged
    try:
        plan = scripts.plan_script(req.script_name, req.script_args, request, kind, upscale=engine.upscalers.upscale,
                                   choices=scripts.engine_choices(engine),
                                   max_megapixels=engine.options.get("img_max_size_mp", 200))
    except (ValueError, LookupError) as e:
        raise ApiError(400, inputs.public_message(str(e), engine.folders())) from None
    cells = [type(req).from_json(cell) for cell in plan.requests]
    plan.requests = [(cell, engine.prepare(cell)) for cell in cells]
    return plan


def execute(self, job: jobs.Job) -> None:  # self: the Engine
    """(GPU worker) Run a queued job: generate (a script: all its generations), build the A1111 response body,
    save the images when asked."""
    req, prepared = job.request
    try:
        if req.script_name:
            result, settings = _run_script(self, job, prepared)
        else:
            result, settings = self.run(req, prepared, job)
    except ApiError:  # a script's ScriptError too
        raise
    except (ValidationError, RequestError) as e:  # RequestError: what only the decoded images show
        raise ApiError(422, str(e)) from None
    except (ValueError, LookupError) as e:  # the pipeline's own checks, a bad checkpoint file
        raise ApiError(400, inputs.public_message(str(e), self.folders())) from None
    except Exception as e:  # a bug or out of memory: a JSON 500 (no absolute paths), and the server goes on
        log.exception("job %s failed", job.id)
        message = inputs.public_message(str(e), self.folders())
        raise ApiError(500, error=type(e).__name__, errors=message) from None
    for warning in result.warnings:
        log.warning("%s", warning)
    if job.save and self.config.save and result.images:
        job.files = _save(self, job.kind, result, settings)
    # A1111 encodes the response after `process_images` has restored the options override_settings changed
    job.result = a1111.image_response(req, result, settings["enable_pnginfo"], self.options)
    if job.stop_reason == "timeout":
        job.error = ApiError(504, f"the job ran longer than {self.config.max_job_seconds:g} s "
                                  f"(--max-job-seconds) and was stopped; the result holds what was made")
    elif job.stop_reason == "limit":
        job.error = ApiError(422, "the sampler made more steps than the server allows in one pass "
                                  "(--max-steps); the result holds what was made")


def _run_script(self, job: jobs.Job, plan) -> tuple:
    """A script's prepared cells one after another under one job: progress counts over all of them, an
    interrupt stops the script (what was made is combined, A1111 leaves the rest of a grid blank)."""
    counter = iter(range(len(plan.requests)))
    totals = [0, 0.0]  # steps, sampling seconds over all generations

    def generate(cell: tuple):
        job.cell = (next(counter), len(plan.requests))
        try:
            return self.run(*cell, job)[0]
        finally:
            totals[0] += job.steps_done
            totals[1] += job.sampling_seconds
    try:
        result = scripts.run_plan(plan, generate)
    finally:
        job.steps_done, job.sampling_seconds = totals
    return result, dict(self.options)


def _save(self, kind: str, result, settings: dict) -> list:
    """Save as A1111's `images.save_image` with its default patterns and the job's options (override_settings
    included): under the outdir, `<kind>-images/YYYY-MM-DD/NNNNN-SEED.<samples_format>` (a script's grids,
    the images before `index_of_first_image`, under `<kind>-grids` in `grid_format`), NNNNN counting on from
    the highest number in that folder, with the infotext (`enable_pnginfo`). -> the paths relative to the
    outdir."""
    images, texts = list(result.images), list(result.infotexts)
    grids = int(result.info.get("index_of_first_image") or 0)
    seeds = list(result.seeds)[-len(images):]
    seeds = [seeds[0] if seeds else 0] * (len(images) - len(seeds)) + seeds  # a script's grids carry no seed
    day, files = datetime.date.today().isoformat(), []
    fmt, pnginfo = a1111.image_format(settings), settings["enable_pnginfo"]
    parts = ((0, grids, f"{kind}-grids/{day}", {**fmt, "fmt": settings["grid_format"]}),
             (grids, len(images), f"{kind}-images/{day}", fmt))
    with _save_lock:
        for at, end, rel, encoding in parts:
            folder = os.path.join(self.config.outdir, *rel.split("/"))
            if at < end:
                os.makedirs(folder, exist_ok=True)
            numbers = itertools.count(next_sequence_number(folder))
            for n, image, text, seed in zip(numbers, images[at:end], texts[at:end], seeds[at:end]):
                name = f"{n:05d}-{seed}.{encoding['fmt']}"
                tmp = os.path.join(folder, f".{name}.tmp")
                with open(tmp, "wb") as f:
                    f.write(encode_image(image, {"parameters": text} if pnginfo else None, **encoding))
                os.replace(tmp, os.path.join(folder, name))  # never a half-written file under the real name
                files.append(f"{rel}/{name}")
    return files


def make_callback(self, run, job: jobs.Job, settings: dict):  # self: the Engine
    """The sampler callback: progress, the per-job time limit, the per-pass step cap (samplers whose step
    count is not fixed, DPM adaptive, are stopped after max(--max-steps, 2 × steps) steps), and a live
    preview (server/preview.py) every `show_progress_every_n_steps` steps, or after each batch with -1, while
    someone looks (/progress or the event stream). A script's generations (`job.cell` = (index, count)) count
    as one job."""
    every = settings["show_progress_every_n_steps"] if settings["live_previews_enable"] else 0
    deadline = run.started + self.config.max_job_seconds if self.config.max_job_seconds else None
    batch = {"job_no": None, "latent": None}  # the batch of the last step and its last x0s (for every = -1)

    def callback(step, sigma, x, denoised):
        s = run.state
        run.steps_done += 1
        cell, cells = job.cell
        done, elapsed = (cell + s.progress()) / cells, time.time() - job.started
        job.progress = {"progress": done, "eta_relative": elapsed / done - elapsed if done > 0 else 0.0,
                        "step": s.sampling_step, "steps": s.sampling_steps,
                        "job_no": cell * s.job_count + s.job_no, "job_count": cells * s.job_count}
        if deadline is not None and time.time() > deadline:
            job.interrupt("timeout")
        if step + 1 > max(self.limits.max_steps, 2 * s.sampling_steps):
            job.interrupt("limit")
        new_batch = batch["job_no"] is not None and batch["job_no"] != s.job_no
        # the running CFG denoiser's x0 by `live_preview_content` (`CFGDenoiser.preview_latent`)
        now = (s.preview_latent, denoised)
        estimates, latent = batch["latent"] if new_batch else now  # -1: the finished batch's last x0
        batch["job_no"], batch["latent"] = s.job_no, now
        wanted = self.preview_wanted or bool(self.queue.listeners)
        if wanted and preview.due(every, run.steps_done, run.preview_at, new_batch):
            at = run.steps_done - 1 if every == -1 else run.steps_done
            run.preview_at, self.preview_wanted = run.steps_done, False
            if estimates is not None:
                latent = estimates(settings["live_preview_content"])
            image = preview.make_preview(self.models.model, latent, settings, self.config.ckpt_dir)
            self.preview = job.preview = base64.b64encode(png_bytes(image)).decode("ascii")
            job.preview_step = at
    return callback


def job_summary(req) -> dict:
    """The `summary` of a job object (what the queue shows; `script` only for a script's job)."""
    out = {"prompt": req.prompt[:200], "width": req.width, "height": req.height, "steps": req.steps,
           "sampler_name": req.sampler_name or req.sampler_index, "batch_size": req.batch_size, "n_iter": req.n_iter}
    if req.script_name:
        out["script"] = req.script_name
    return out


async def wait_for_job(request: Request, engine, job: jobs.Job) -> None:
    """Wait until `job` finishes. A client that disconnects first gets its job cancelled (queued) or
    interrupted (running), unless --keep-abandoned-jobs keeps A1111's behaviour of running it anyway."""
    async def watch(scope):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if not engine.config.keep_abandoned_jobs and not job.finished.is_set():
                    log.info("client of job %s disconnected: %s it", job.id,
                             "cancelling" if job.state == "queued" else "interrupting")
                    engine.queue.cancel(job, "client")
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        await job.finished.wait()
        tg.cancel_scope.cancel()


def job_response(job: jobs.Job) -> JSONResponse:
    """The A1111 answer of a finished job: its body (also when interrupted: what was made), else its error."""
    headers = {"X-SD15-Job": job.id, "X-SD15-Job-State": job.state}
    if job.result is not None:
        return JSONResponse(job.result, headers=headers)
    e = job.error or ApiError(500, "the job ended without a result")
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def job_finished(self, job: jobs.Job) -> None:
    """One log line per job (kind, size, steps, sampler, seconds, it/s) and its metrics."""
    seconds = job.finished_at - job.started if job.started is not None else None
    its = job.steps_done / job.sampling_seconds if job.sampling_seconds > 0 else 0.0
    s = job.summary
    error = f" ({job.error.status}: {job.error})" if job.error is not None else ""
    log.info("job %s %s %dx%d steps=%d sampler=%s batch=%dx%d: %s%s in %.2f s, %.2f it/s", job.id, job.kind,
             s["width"], s["height"], s["steps"], s["sampler_name"], s["batch_size"], s["n_iter"], job.state, error,
             seconds or 0.0, its)
    self.metrics.job_finished(job.kind, job.state, seconds, job.steps_done, job.sampling_seconds)
