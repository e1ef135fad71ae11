"""`GET /openapi.json`: OpenAPI 3 description of every route, complete enough for a generated client or a
property-based tester (schemathesis): request bodies from the request dataclasses with their ranges, the
error responses each route can give (400/401/404/408/413/421/422/503) in their real shapes, HTTP Basic as
the security scheme when --api-auth is set, and the page's `/sd15/v1` job endpoints.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing

from server import a1111, options

A1111_ERROR = {"type": "object", "required": ["error", "detail", "body", "errors"], "properties": {
    "error": {"type": "string"}, "detail": {"type": "string"}, "body": {"type": "string"}, "errors": {"type": "string"}}}
VALIDATION_ERROR = {"type": "object", "required": ["detail"], "properties": {"detail": {"oneOf": [
    {"type": "string"},
    {"type": "array", "items": {"type": "object", "required": ["loc", "msg", "type"], "properties": {
        "loc": {"type": "array", "items": {"oneOf": [{"type": "string"}, {"type": "integer"}]}},
        "msg": {"type": "string"}, "type": {"type": "string"}}}}]}}}
JOB = {"type": "object", "required": ["id", "kind", "state", "created", "source", "summary"], "properties": {
    "id": {"type": "string"}, "kind": {"type": "string", "enum": ["txt2img", "img2img"]},
    "state": {"type": "string", "enum": ["queued", "running", "done", "failed", "cancelled", "interrupted"]},
    "position": {"type": "integer", "nullable": True}, "created": {"type": "number"},
    "started": {"type": "number", "nullable": True}, "finished": {"type": "number", "nullable": True},
    "source": {"type": "string", "enum": ["page", "api"]}, "summary": {"type": "object"},
    "progress": {"type": "object", "nullable": True}, "error": {"type": "object", "nullable": True},
    "result": {"type": "object", "nullable": True}, "files": {"type": "array", "items": {"type": "string"}}}}
QUEUE = {"type": "object", "required": ["running", "active", "queued", "recent", "max_size"], "properties": {
    "running": {**JOB, "nullable": True}, "active": {"type": "array", "items": JOB},
    "queued": {"type": "array", "items": JOB},
    "recent": {"type": "array", "items": JOB}, "max_size": {"type": "integer"}}}
IMAGE_RESPONSE = {"type": "object", "required": ["images", "parameters", "info"], "properties": {
    "images": {"type": "array", "items": {"type": "string"}}, "parameters": {"type": "object"},
    "info": {"type": "string"}}}


def _api_bounds(limits) -> dict:
    """JSON-schema bounds of what `sd15.schema` does not say: the server's limits on top of the schema fields'
    own ranges, prompt lengths, the names the server knows, and the API-only fields."""
    from sd15.a1111.images import LATENT_UPSCALE_MODES, PIXEL_UPSCALERS
    from sd15.samplers.table import samplers_api, schedulers_api

    samplers = [n for s in samplers_api() for n in [s["name"], *(s["aliases"] or [])]]
    schedulers = [s["name"] for s in schedulers_api()]
    # the schema's side is the square root of the pixel limit, so a generated width × height always fits
    side = min(limits.max_side, math.isqrt(limits.max_pixels))
    text = {"maxLength": limits.max_prompt_chars}
    return {
        "batch_size": {"maximum": limits.max_batch_size}, "n_iter": {"maximum": limits.max_n_iter},
        "steps": {"maximum": limits.max_steps}, "hr_second_pass_steps": {"maximum": limits.max_steps},
        "width": {"maximum": side}, "height": {"maximum": side},
        "prompt": text, "negative_prompt": text, "hr_prompt": text, "hr_negative_prompt": text,
        **{name: {"maximum": limits.max_side} for name in (
            "hr_resize_x", "hr_resize_y", "inpaint_full_res_padding", "seed_resize_from_h", "seed_resize_from_w")},
        "firstphase_width": {"minimum": 0, "maximum": limits.max_side},
        "firstphase_height": {"minimum": 0, "maximum": limits.max_side},
        # names the server knows (A1111's older "<sampler> <schedule>" names, e.g. "DPM++ 2M Karras", are
        # accepted too but not listed); anything else is a 400 naming the valid ones
        "sampler_name": {"enum": [*samplers, None]}, "sampler_index": {"enum": samplers},
        "hr_sampler_name": {"enum": [*samplers, "Use same sampler", None]},
        "scheduler": {"enum": [*schedulers, None]}, "hr_scheduler": {"enum": [*schedulers, "Use same scheduler", None]},
        "hr_upscaler": {"enum": [*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS, None]},
        # what this server does not do (face restoration, refiner): only "off" is valid
        "restore_faces": {"enum": [False, None]},
        "alwayson_scripts": {"maxProperties": 0},
        "refiner_checkpoint": {"enum": [None, ""]}, "hr_checkpoint_name": {"enum": [None, "", "Use same checkpoint"]},
    }


def _json_schema(tp) -> dict:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if type(None) in typing.get_args(tp):
        return {**_json_schema(args[0]), "nullable": True}
    origin = typing.get_origin(tp)
    if origin is list or tp is list:
        return {"type": "array", "items": _json_schema(args[0]) if args else {}}
    if origin is dict or tp is dict:
        return {"type": "object"}
    if tp is typing.Any:
        return {}
    return {"type": {int: "integer", float: "number", bool: "boolean", str: "string"}[tp]}


def _bounds(metadata) -> dict:
    """A field's bounds in its metadata (`sd15.schema`'s and server/extras.py's: lo, hi, gt, enum) in OpenAPI
    3.0's words, where an exclusive bound is `minimum` plus `exclusiveMinimum: true`."""
    out = {}
    if metadata.get("lo") is not None:
        out["minimum"] = metadata["lo"]
    if metadata.get("gt") is not None:
        out.update(minimum=metadata["gt"], exclusiveMinimum=True)
    if metadata.get("hi") is not None:
        out["maximum"] = metadata["hi"]
    if metadata.get("enum"):
        out["enum"] = list(metadata["enum"])
    return out


def dataclass_schema(cls, limits) -> dict:
    """A request body's JSON schema. A generation body (server/a1111.py) lists the `sd15.schema` fields it
    shares, with their ranges, then its API-only fields; the server's limits tighten both."""
    api = _api_bounds(limits)
    props = {}
    if issubclass(cls, a1111._GenerationRequest):
        hints = {**a1111._SCHEMA_HINTS, **a1111._API_TYPES}
        for f in cls.shared_fields():
            bounds = _bounds(f.metadata)
            for key, value in api.get(f.name, {}).items():  # a limit only ever narrows the field's range
                bounds[key] = min(bounds[key], value) if key == "maximum" and key in bounds else value
            props[f.name] = {**_json_schema(hints[f.name]), **bounds,
                             "default": cls.DEFAULTS.get(f.name, f.default)}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "shared":
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        bounds = _bounds(f.metadata)
        # a field's own bounds win over the table by name (extras' resize_mode is not img2img's)
        props[f.name] = {**_json_schema(hints[f.name]), **(bounds or api.get(f.name, {})), "default": default}
    schema = {"title": cls.__name__, "type": "object", "properties": props}
    if getattr(cls, "REQUIRED", ()):
        schema["required"] = list(cls.REQUIRED)
    return schema


def _json(schema) -> dict:
    return {"application/json": {"schema": schema}}


def _error(description: str) -> dict:
    return {"description": description, "content": _json(A1111_ERROR)}


_PATH_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")  # Starlette's {name} / {name:converter}
_RESPONSE_SCHEMAS = {"txt2img": "ImageResponse", "img2img": "ImageResponse", "get_job": "Job",
                     "delete_job": "Job", "get_queue": "Queue"}
_RESPONSE_TYPES = {"events": "text/event-stream", "metrics": "text/plain"}


def openapi_schema(routes, request_bodies: dict, limits, auth: bool) -> dict:
    """OpenAPI 3.0 of `routes`; `request_bodies`: endpoint -> request dataclass."""
    schemas = {cls.__name__: dataclass_schema(cls, limits) for cls in request_bodies.values()}
    schemas.update(A1111Error=A1111_ERROR, ValidationError=VALIDATION_ERROR, Job=JOB, Queue=QUEUE,
                   ImageResponse=IMAGE_RESPONSE)
    ref = {name: {"$ref": f"#/components/schemas/{name}"} for name in schemas}
    schemas["JobRequest"] = {"type": "object", "required": ["kind"], "properties": {
        "kind": {"type": "string", "enum": ["txt2img", "img2img"]},
        "request": {"oneOf": [ref["Txt2ImgRequest"], ref["Img2ImgRequest"]]},
        "save": {"type": "boolean", "default": True}}}
    bodies = {ep.__name__: ref[cls.__name__] for ep, cls in request_bodies.items()}
    bodies["submit_job"] = {"$ref": "#/components/schemas/JobRequest"}
    bodies["set_options"] = {"type": "object", "additionalProperties": True, "properties": {
        k: {**_json_schema(o.type), **_bounds({"lo": o.lo, "hi": o.hi, "enum": o.choices})}
        for k, o in options.OPTIONS.items()}}
    paths: dict = {}
    for route in routes:
        if not getattr(route, "include_in_schema", True):
            continue
        name = route.endpoint.__name__
        for method in sorted(route.methods - {"HEAD"}):
            if name in _RESPONSE_TYPES:
                content = {_RESPONSE_TYPES[name]: {"schema": {"type": "string"}}}
            else:
                content = _json(ref[_RESPONSE_SCHEMAS[name]] if name in _RESPONSE_SCHEMAS else {})
            r = {"200": {"description": "Successful Response", "content": content}}
            op = {"summary": (route.endpoint.__doc__ or "").strip().split("\n")[0],
                  "operationId": f"{name}_{method.lower()}", "responses": r}
            if name in bodies:
                op["requestBody"] = {"required": True, "content": _json(bodies[name])}
            params = _PATH_PARAM.findall(route.path)
            if params:
                op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                    for p in params]
            if "{job_id}" in route.path:
                r["404"] = _error("No such job")
            if name == "submit_job":
                links = {to: {"operationId": f"{to}_{m}", "parameters": {"job_id": "$response.body#/id"}}
                         for to, m in (("get_job", "get"), ("delete_job", "delete"))}
                r["202"] = {"description": "Queued", "links": links, "content": _json({
                    "type": "object", "required": ["id", "position"],
                    "properties": {"id": {"type": "string"}, "position": {"type": "integer"}}})}
                del r["200"]
            if "requestBody" in op:
                r["400"] = _error("Bad request (unknown name, bad image, ...)")
                r["408"] = _error("The body was not received in time")
                r["413"] = _error("Body or image too large")
                r["422"] = {"description": "Validation Error", "content": _json(ref["ValidationError"])}
            if name in ("txt2img", "img2img", "submit_job", "set_options", "reload_checkpoint"):
                r["503"] = _error("Queue full (Retry-After), no checkpoint, or shutting down")
            if name in ("txt2img", "img2img"):
                r["404"] = _error("Init image not found")
            r["421"] = _error("Host header not allowed")
            if auth:
                r["401"] = _error("Not authenticated")
            paths.setdefault(_PATH_PARAM.sub(r"{\1}", route.path), {})[method.lower()] = op
    spec = {"openapi": "3.0.2", "info": {"title": "sd15 (AUTOMATIC1111-compatible API)", "version": "0.2.0"},
            "paths": paths, "components": {"schemas": schemas}}
    if auth:
        spec["components"]["securitySchemes"] = {"HTTPBasic": {"type": "http", "scheme": "basic"}}
        spec["security"] = [{"HTTPBasic": []}]
    return spec
