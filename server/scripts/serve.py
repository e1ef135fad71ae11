"""The server's side of the scripts: run a txt2img / img2img request that names a `script_name` with the
server's own generation (`Engine.prepare` + `Engine.run` per generation). server/runner.py runs a script as one
job of the queue (visible, cancellable; it holds the GPU from its first generation to its last, as A1111's
queue lock does).

This file is the only place that knows the server's request classes and engine; `server/scripts/*` else
works on plain A1111 request dicts.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from server.scripts import Plan, ScriptError, plan_script

log = logging.getLogger("server")


def engine_choices(engine) -> dict:
    """The names this server accepts, for checking script values before anything runs."""
    from sd15.samplers.table import samplers_api, schedulers_api
    from server import a1111

    samplers = [s["name"] for s in samplers_api()]
    aliases = {a: s["name"] for s in samplers_api() for a in s["aliases"]}
    schedulers = [n for c in schedulers_api() for n in (c["name"], c["label"])]
    upscalers = engine.upscalers.names()
    return {"samplers": samplers, "sampler_aliases": aliases, "schedulers": schedulers,
            "checkpoints": engine.library.checkpoint_titles(),
            "vaes": [v["model_name"] for v in engine.library.vae_api()], "upscalers": upscalers,
            "hr_upscalers": [m["name"] for m in a1111.latent_upscale_modes()] + upscalers}


def upscaler(engine) -> Callable:
    """A1111's `Upscaler.upscale(img, scale)` with the engine's upscalers (built-in and ESRGAN files)."""
    def upscale(image, name: str, scale: float):
        if name not in engine.upscalers.names():
            raise ScriptError(f"could not find upscaler named {name}")
        return engine.upscalers.upscale(image, name, scale)
    return upscale


def script_plan(engine, req) -> Plan:
    """(any thread) The plan of a parsed txt2img/img2img request that names a `script_name`: its arguments
    checked against what this server has, SD upscale's upscale done. Raises ScriptError (4xx)."""
    kind = "img2img" if req.is_img2img else "txt2img"
    fields = [*req.shared_fields(), *(f for f in dataclasses.fields(req) if f.name != "shared")]
    request = {f.name: getattr(req, f.name) for f in fields}  # coerced, infotext merged
    request["infotext"] = None
    return plan_script(req.script_name, req.script_args, request, kind, upscale=upscaler(engine),
                       choices=engine_choices(engine), max_megapixels=engine.options.get("img_max_size_mp", 200))


def cell_generator(engine, cls, job=None) -> Callable[[dict], object]:
    """(GPU worker) `generate` for run_plan: one request dict -> the engine's Result, as a plain request of
    class `cls` (Txt2ImgRequest / Img2ImgRequest) would run, under the queue's `job` (its progress, previews
    and interrupt) when given."""
    def generate(cell: dict):
        cell_req = cls.from_json(cell)
        result, _ = engine.run(cell_req, engine.prepare(cell_req), job)
        for warning in result.warnings:
            log.warning("%s", warning)
        return result
    return generate
