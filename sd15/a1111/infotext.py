"""A1111 v1.10's infotext (the PNG `parameters` text) and a response's `info` object, written from a
resolved request (A1111 `modules/processing.py`: `create_infotext`, `Processed.js`); the parser behind
png-info (`modules/infotext_utils.py`: `parse_generation_parameters`), and what a parsed infotext restores.
"""
from __future__ import annotations

import datetime
import json
import math
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

from sd15 import schema
from sd15.samplers.table import (SAMPLER_TABLE, SCHEDULER_TABLE, find_sampler, find_scheduler,
                                 recorded_schedule, split_sampler_name)

A1111_VERSION = "v1.10.1"  # what infotext "Version" and info "version" say
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # by inpainting_fill
# Caller entries that A1111's CFG denoiser adds at the first step that skips the uncond (its
# `sd_samplers_cfg_denoiser.py`): after the first pass's schedule and eta
_DENOISER_KEYS = ("Skip Early CFG", "NGMS", "NGMS all steps")


def job_timestamp(now: Optional[datetime.datetime] = None) -> str:
    """`YYYYMMDDhhmmss`, local time (info "job_timestamp")."""
    return (now or datetime.datetime.now()).strftime("%Y%m%d%H%M%S")


def _eta(r, sampler) -> dict:
    """A pass's {"Eta" or "Eta DDIM": eta} when its sampler takes eta and runs with another than its default
    (A1111's `eta_infotext_field`, `eta_default`), else {}."""
    eta = r.eta_of(sampler)
    if "eta" not in sampler.options or eta == sampler.options["eta"]:
        return {}
    return {"Eta DDIM" if sampler.timesteps else "Eta": eta}


def _sigmas(r, sampler, scheduler, out: dict, *, hires: bool) -> None:
    """Add a pass's schedule entries to `out` as A1111's `KDiffusionSampler.get_sigmas` does (timestep
    samplers: only "Discard penultimate sigma", its `CompVisSampler.get_timesteps`). A σ option equal to the
    model's own σ bound, which A1111 leaves out, is written here."""
    q = r.request
    if q.always_discard_next_to_last_sigma and not sampler.discard_penultimate:
        out["Discard penultimate sigma"] = True
    recorded = recorded_schedule(sampler, scheduler)
    if recorded is None:
        return
    if not hires:
        out["Schedule type"] = recorded.label
    elif recorded.label != out.get("Schedule type"):
        out["Hires schedule type"] = recorded.label
    if q.sigma_min:
        out["Schedule min sigma"] = q.sigma_min
    if q.sigma_max:
        out["Schedule max sigma"] = q.sigma_max
    if recorded.default_rho != -1 and q.rho and q.rho != recorded.default_rho:
        out["Schedule rho"] = q.rho
    if recorded.name == "beta":
        out["Beta schedule alpha"] = q.beta_dist_alpha
        out["Beta schedule beta"] = q.beta_dist_beta


def _extra_params(r, has_mask: bool, extra: Mapping[str, Any]) -> dict:
    """A1111's `p.extra_generation_params` at the end of a job, in insertion order: the entries added at init
    (strength, mask, hires), the caller's (extra networks, emphasis), then those added while sampling (the
    first pass's noise multiplier, schedule and eta, the CFG denoiser's skips, then the hires pass's)."""
    q, hr = r.request, r.hires
    out: dict = {}
    if q.is_img2img:
        out["Denoising strength"] = r.strength
        if has_mask:
            if q.inpainting_mask_invert:
                out["Mask mode"] = "Inpaint not masked"
            if r.mask_blur_x > 0 or r.mask_blur_y > 0:
                out["Mask blur"] = r.mask_blur_x if r.mask_blur_x == r.mask_blur_y else None
            if q.inpaint_full_res:
                out["Inpaint area"] = "Only masked"
                out["Masked area padding"] = q.inpaint_full_res_padding
            out["Masked content"] = None if q.inpainting_fill == 1 else MASKED_CONTENT[q.inpainting_fill]
    elif hr is not None:
        out["Denoising strength"] = r.strength
        if hr.sampler is not r.sampler:
            out["Hires sampler"] = hr.sampler.name
        out["Hires prompt"] = hr.prompt if hr.prompt != q.prompt else None
        out["Hires negative prompt"] = hr.negative_prompt if hr.negative_prompt != q.negative_prompt else None
        out["Hires schedule type"] = None
        if q.hr_resize_x == 0 and q.hr_resize_y == 0:
            out["Hires upscale"] = q.hr_scale
        else:
            out["Hires resize"] = f"{q.hr_resize_x}x{q.hr_resize_y}"
        if q.hr_second_pass_steps:
            out["Hires steps"] = q.hr_second_pass_steps
        out["Hires upscaler"] = hr.upscaler
    out.update({k: v for k, v in extra.items() if k not in _DENOISER_KEYS})
    if q.is_img2img and q.initial_noise_multiplier not in (None, 1.0):
        out["Noise multiplier"] = q.initial_noise_multiplier
    _sigmas(r, r.sampler, r.scheduler, out, hires=False)
    out.update(_eta(r, r.sampler))
    out.update({k: v for k, v in extra.items() if k in _DENOISER_KEYS})
    if hr is not None:
        _sigmas(r, hr.sampler, hr.scheduler, out, hires=True)
        out.update(_eta(r, hr.sampler))
    return out


def create_infotext(r, index: int = 0, *, model: Mapping[str, Any] = {}, extra: Mapping[str, Any] = {},
                    has_mask: Optional[bool] = None) -> str:
    """Image `index`'s infotext (index over the whole job) of a `sd15.schema.ResolvedRequest`. `model`:
    sd_model_name, sd_model_hash (10 hex digits), sd_vae_name, sd_vae_hash; `extra`: further entries ("Lora
    hashes", "Emphasis", "NGMS", ...); `has_mask`: an inpainting mask was used (default: one was given). Null
    values are left out, a value equal to its key is written bare."""
    q = r.request
    has_mask = q.mask is not None if has_mask is None else has_mask
    variation = q.subseed_strength != 0
    # A1111's `is_sampler_using_eta_noise_seed_delta`: the first pass's sampler decides whether ENSD applies, the
    # eta of the last sampler that ran (the hires pass's, when there was one) whether it was used
    eta = r.eta_of(r.hires.sampler if r.hires is not None else r.sampler)
    later = _extra_params(r, has_mask, extra)
    entries = {
        "Steps": q.steps,
        "Sampler": r.sampler.name,
        "Schedule type": r.scheduler.label,
        "CFG scale": q.cfg_scale,
        "Seed": r.seeds[index],
        "Size": f"{q.width}x{q.height}",
        "Model hash": model.get("sd_model_hash"),
        "Model": model.get("sd_model_name"),
        "VAE hash": model.get("sd_vae_hash"),
        "VAE": model.get("sd_vae_name"),
        "Variation seed": r.subseeds[index] if variation else None,
        "Variation seed strength": q.subseed_strength if variation else None,
        "Seed resize from": (None if q.seed_resize_from_w <= 0 or q.seed_resize_from_h <= 0
                             else f"{q.seed_resize_from_w}x{q.seed_resize_from_h}"),
        "Denoising strength": later.get("Denoising strength"),
        "Clip skip": None if q.clip_skip <= 1 else q.clip_skip,
        "ENSD": q.eta_noise_seed_delta if q.eta_noise_seed_delta and r.sampler.uses_ensd and eta != 0 else None,
        "RNG": q.randn_source if q.randn_source != "GPU" else None,
        "Tiling": "True" if q.tiling else None,
        **later,
        "Version": A1111_VERSION,
    }
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in entries.items() if v is not None)
    negative = f"\nNegative prompt: {q.negative_prompt}" if q.negative_prompt else ""
    return f"{q.prompt}{negative}\n{line}".strip()


def create_info(r, infotexts: Sequence[str], *, job_timestamp: str, model: Mapping[str, Any] = {},
                extra: Mapping[str, Any] = {}, has_mask: Optional[bool] = None, index_of_first_image: int = 0) -> dict:
    """The `info` object of a response, keys in A1111's order, for the returned images' `infotexts`. The
    hires prompts are null in `extra_generation_params`, as in A1111 (it stores functions there)."""
    q = r.request
    has_mask = q.mask is not None if has_mask is None else has_mask
    extra_params = _extra_params(r, has_mask, extra)
    extra_params.update({k: None for k in ("Hires prompt", "Hires negative prompt") if k in extra_params})
    n = len(r.seeds)
    return {
        "prompt": q.prompt, "all_prompts": [q.prompt] * n,
        "negative_prompt": q.negative_prompt, "all_negative_prompts": [q.negative_prompt] * n,
        "seed": r.seeds[0], "all_seeds": list(r.seeds), "subseed": r.subseeds[0], "all_subseeds": list(r.subseeds),
        "subseed_strength": q.subseed_strength, "width": q.width, "height": q.height,
        "sampler_name": r.sampler.name, "cfg_scale": q.cfg_scale, "steps": q.steps, "batch_size": r.batch_size,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model.get("sd_model_name"), "sd_model_hash": model.get("sd_model_hash"),
        "sd_vae_name": model.get("sd_vae_name"), "sd_vae_hash": model.get("sd_vae_hash"),
        "seed_resize_from_w": q.seed_resize_from_w, "seed_resize_from_h": q.seed_resize_from_h,
        "denoising_strength": r.strength, "extra_generation_params": extra_params,
        "index_of_first_image": index_of_first_image, "infotexts": list(infotexts), "styles": [],
        "job_timestamp": job_timestamp, "clip_skip": q.clip_skip, "is_using_inpainting_conditioning": False,
        "version": A1111_VERSION,
    }


def info_json(info: Mapping[str, Any]) -> str:
    """The `info` string: Python's default json.dumps, anything not serialisable as null (as A1111 does)."""
    return json.dumps(info, default=lambda o: None)


def quote(value: Any) -> Any:
    """A1111's infotext value quoting: a value whose text has a ",", ":" or newline becomes a JSON string
    literal (non-ASCII kept); anything else is written as is."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(value, ensure_ascii=False)


def unquote(text: str) -> str:
    """Inverse of `quote` for a double-quoted value; anything else (or invalid JSON) is returned unchanged."""
    if not (text.startswith('"') and text.endswith('"')):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_hashes(pairs: Iterable[tuple[str, str]]) -> str:
    """The value of "Lora hashes" / "TI hashes": "name: hash, name: hash", with ":" and "," removed from
    the names (A1111 does so, so that the value parses back)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in pairs)


# key: a word character, then one or more word characters, spaces, "-" or "/"; value: a JSON-style
# double-quoted string, or everything up to the next comma
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def _uses_emphasis(prompt: str, negative_prompt: str) -> bool:
    from sd15.a1111.prompt import parse_prompt_attention
    try:
        parts = parse_prompt_attention(prompt) + parse_prompt_attention(negative_prompt)
    except ValueError:  # a malformed weight such as "(a:1.2.3)": A1111 would fail here; treat as plain text
        return False
    return any(w != 1.0 and t != "BREAK" for t, w in parts)


# What A1111's parser fills in for absent keys, in its order
_PARSE_DEFAULTS = {
    "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler", "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "", "Hires negative prompt": "", "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture", "Masked area padding": 32, "RNG": "GPU", "Schedule type": "Automatic",
    "Schedule max sigma": 0, "Schedule min sigma": 0, "Schedule rho": 0, "VAE Encoder": "Full",
    "VAE Decoder": "Full", "FP8 weight": "Disable"}


def parse_infotext(text: str, *, skip_fields: Iterable[str] = ()) -> dict:
    """A1111's `parse_generation_parameters` (png-info `parameters`) with default options: the last line holds
    the parameters when at least 3 "key: value" pairs match on it; the lines before are the prompt, then,
    from one starting with "Negative prompt:", the negative prompt. Values are strings, JSON-unquoted, "WxH"
    split into "<Key>-1"/"<Key>-2"; empty ones are dropped. Then A1111's defaults for absent keys; no styles
    are defined, so none are extracted; `skip_fields` go last (A1111's `infotext_skip_pasting`)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt = negative_prompt = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        if in_negative:
            negative_prompt += ("\n" if negative_prompt else "") + line
        else:
            prompt += ("\n" if prompt else "") + line

    res: dict = {}
    for key, value in _PARAM.findall(last):
        if value == "":
            continue
        if value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        m = _SIZE.match(value)
        if m is not None:
            res[f"{key}-1"], res[f"{key}-2"] = m.groups()
        else:
            res[key] = value
    # A1111's style extraction, with no styles defined, only does this (infotexts newer than v1.8.0-139)
    if "Hires prompt" in res or "Hires negative prompt" in res:
        hr_prompt = res.get("Hires prompt", prompt)
        hr_negative = res.get("Hires negative prompt", negative_prompt)
        res["Hires prompt"] = "" if hr_prompt == prompt else hr_prompt
        res["Hires negative prompt"] = "" if hr_negative == negative_prompt else hr_negative
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    if "Hypernet" in res:
        res["Prompt"] += f"<hypernet:{res['Hypernet']}:{res.get('Hypernet strength', '1.0')}>"
    for key, value in _PARSE_DEFAULTS.items():
        res.setdefault(key, value)
    if "First pass size-1" in res:  # old hires infotexts: the first pass becomes Size, Size the hires target
        fw, fh = int(res["First pass size-1"]), int(res["First pass size-2"])
        width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
        if fw == 0 or fh == 0:  # A1111's old automatic first pass: about 512² pixels, multiples of 64
            scale = math.sqrt(512 * 512 / (width * height))
            fw, fh = math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64
        res["Size-1"], res["Size-2"] = fw, fh
        res["Hires resize-1"], res["Hires resize-2"] = width, height
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    if "Emphasis" not in res and _uses_emphasis(prompt, negative_prompt):
        res["Emphasis"] = "Original"
    res.setdefault("Refiner switch by sampling steps", False)
    for key in skip_fields:
        res.pop(key, None)
    return res


def _value(f, text: Any) -> Any:
    """An infotext value as schema field `f` takes it; the field's default when it does not convert."""
    kind = schema.value_type(f)
    try:
        return str(text) == "True" if kind is bool else kind(text)
    except ValueError:
        return f.default


def _sampler(name: Optional[str]) -> tuple[str, Optional[str]]:
    """A1111's `get_sampler_and_scheduler` as its paste calls it: (sampler, the schedule suffix of an old
    combined name such as "DPM++ 2M Karras", which wins over "Schedule type"); an unknown sampler is A1111's
    first."""
    try:
        name, suffix = split_sampler_name(name or SAMPLER_TABLE[0].name)
    except ValueError:
        name, suffix = SAMPLER_TABLE[0].name, None
    return find_sampler(name).name, suffix


def _schedule(label: Optional[str]) -> str:
    """The schedule's name ("Karras" -> "karras"); "automatic" for an unknown one."""
    return (find_scheduler(label) or SCHEDULER_TABLE[0]).name


# The request fields A1111's paste functions always set (its `get_sampler_from_infotext` & co.), and the
# inpainting fields, whose infotext values are words, with their keys
_ALWAYS_PASTED = ("sampler_name", "scheduler", "hr_sampler_name", "hr_scheduler", "enable_hr")
_WORD_KEYS = {"inpainting_fill": "Masked content", "inpaint_full_res": "Inpaint area",
              "inpaint_full_res_padding": "Masked area padding", "inpainting_mask_invert": "Mask mode"}


def request_from_infotext(p: Mapping[str, Any], *, named_only: bool = False) -> dict:
    """The request fields (`sd15.schema` names -> values) a parsed infotext (`parse_infotext`) restores, by
    A1111's paste rules (its `txt2img/img2img_paste_fields`): each schema field that names infotext keys gets
    the value, or its default when the infotext has none; then the samplers, the Hires. fix checkbox and the
    inpainting fields. The schedule stays named where A1111's UI shows "Automatic" for the sampler's own (the
    same numbers). `named_only`: only the fields whose keys the infotext names (a key at the value the parser
    fills in for an absent one counts as absent) and those A1111's paste functions always set, as A1111's
    `infotext` request field fills them (`modules/api/api.py`: `apply_infotext`)."""
    out = {}
    for f in schema.FIELDS.values():
        if f.metadata["infotext"]:
            text = next((p[key] for key in f.metadata["infotext"] if p.get(key) not in (None, "")), None)
            out[f.name] = f.default if text is None else _value(f, text)
    out["sampler_name"], suffix = _sampler(p.get("Sampler"))
    out["scheduler"] = _schedule(suffix or p.get("Schedule type"))
    out["hr_sampler_name"] = out["hr_scheduler"] = suffix = None
    if p.get("Hires sampler", "Use same sampler") != "Use same sampler":
        out["hr_sampler_name"], suffix = _sampler(p["Hires sampler"])
    if suffix or p.get("Hires schedule type", "Use same scheduler") != "Use same scheduler":
        out["hr_scheduler"] = _schedule(suffix or p["Hires schedule type"])
    out["enable_hr"] = "Denoising strength" in p and (
        "Hires upscale" in p or "Hires upscaler" in p or out["hr_resize_x"] > 0)
    content = p.get("Masked content")
    out["inpainting_fill"] = MASKED_CONTENT.index(content) if content in MASKED_CONTENT else 1
    out["inpaint_full_res"] = p.get("Inpaint area") == "Only masked"
    padding = p.get("Masked area padding", 32)
    out["inpaint_full_res_padding"] = _value(schema.FIELDS["inpaint_full_res_padding"], padding)
    out["inpainting_mask_invert"] = int(p.get("Mask mode") == "Inpaint not masked")
    if not named_only:
        return out
    named = {key for key, value in p.items() if key not in _PARSE_DEFAULTS or value != _PARSE_DEFAULTS[key]}
    return {name: value for name, value in out.items() if name in _ALWAYS_PASTED
            or named.intersection(schema.FIELDS[name].metadata["infotext"] or (_WORD_KEYS[name],))}
