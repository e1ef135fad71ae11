"""A1111's "Prompt matrix", "Prompts from file or textbox" and "SD upscale" scripts (v1.10.1's
`scripts/prompt_matrix.py`, `scripts/prompts_from_file.py`, `scripts/sd_upscale.py`) on A1111 request dicts."""
from __future__ import annotations

import copy
import math
import random
import shlex
from typing import Callable, Optional

from PIL import Image

from sd15.upscale import combine_grid, split_grid

from server.scripts import grid as g
from server.scripts.common import Plan, ScriptError, ScriptResult, as_bool, as_float, as_int, base_request, \
    encode_png, fix_seed, with_params


def _merge(results: list) -> dict:
    """The lists of several generations, concatenated."""
    out = {"images": [], "infotexts": [], "seeds": [], "subseeds": [], "prompts": [], "negative_prompts": [],
           "warnings": []}
    for r in results:
        out["images"] += list(r.images)
        out["infotexts"] += list(r.infotexts)
        out["seeds"] += list(getattr(r, "seeds", []) or [])
        out["subseeds"] += list(getattr(r, "subseeds", []) or [])
        out["prompts"] += list(getattr(r, "prompts", None) or r.info.get("all_prompts") or [])
        negatives = getattr(r, "negative_prompts", None) or r.info.get("all_negative_prompts") or []
        out["negative_prompts"] += list(negatives)
        out["warnings"] += list(getattr(r, "warnings", []) or [])
    return out


def _interrupted(results: list, planned: int) -> bool:
    return len(results) < planned or any(getattr(r, "interrupted", False) for r in results)


# =============================================================================================
# Prompt matrix
# =============================================================================================

PROMPT_MATRIX = "Prompt matrix"
PROMPT_MATRIX_DEFAULTS = [False, False, "positive", "comma", 0]


def matrix_prompts(prompt: str, put_at_start: bool = False, delimiter: str = ", ") -> list:
    """Every combination of the `|`-separated parts after the first: combination k has part n+1 when bit n
    of k is set; the first part is kept at the start (or the end with `put_at_start`)."""
    parts = prompt.split("|")
    out = []
    for k in range(2 ** (len(parts) - 1)):
        selected = [text.strip().strip(",") for n, text in enumerate(parts[1:]) if k & (1 << n)]
        selected = selected + [parts[0]] if put_at_start else [parts[0]] + selected
        out.append(delimiter.join(selected))
    return out


def plan_prompt_matrix(args: list, request: dict, kind: str, *, rng: random.Random) -> Plan:
    args = list(args) + PROMPT_MATRIX_DEFAULTS[len(args):]
    put_at_start, different_seeds, prompt_type, delimiter, margin = args[:5]
    put_at_start, different_seeds = as_bool(put_at_start), as_bool(different_seeds)
    margin = as_int(margin, f"{PROMPT_MATRIX}: Grid margins (px)")
    if prompt_type not in ("positive", "negative"):
        raise ScriptError(f"{PROMPT_MATRIX}: Unknown prompt type {prompt_type}; use 'positive' or 'negative'")
    if delimiter not in ("comma", "space"):
        raise ScriptError(f"{PROMPT_MATRIX}: Unknown variations delimiter {delimiter}; use 'comma' or 'space'")
    base = base_request(request)
    fix_seed(base, rng)
    key = "prompt" if prompt_type == "positive" else "negative_prompt"
    original = base.get(key) or ""
    parts = original.split("|")
    prompts = matrix_prompts(original, put_at_start, ", " if delimiter == "comma" else " ")
    if len(prompts) > 4096:
        raise ScriptError(f"{PROMPT_MATRIX}: {len(parts) - 1} variable parts make {len(prompts)} images; "
                          f"at most 12 parts are allowed")
    requests = []
    for i, text in enumerate(prompts):  # one image per request: its own prompt, seed and variation seed
        req = copy.deepcopy(base)
        req.update({key: text, "seed": base["seed"] + (i if different_seeds else 0), "batch_size": 1, "n_iter": 1})
        if isinstance(base["subseed"], int):
            req["subseed"] = base["subseed"] + i
        requests.append(req)

    def combine(results: list) -> ScriptResult:
        m = _merge(results)
        images, infotexts = m["images"], m["infotexts"]
        if not images:
            raise ScriptError(f"{PROMPT_MATRIX}: no image was generated", 409)
        while len(images) < len(prompts):  # interrupted: the grid keeps its shape
            images.append(Image.new(images[0].mode, images[0].size))
        sub = g.image_grid(images, rows=1 << ((len(parts) - 1) // 2))
        sub = g.draw_prompt_matrix(sub, images[0].width, images[0].height, parts, margin)
        images.insert(0, sub)
        infotexts.insert(0, infotexts[0])
        info = dict(results[0].info)
        info.update(all_prompts=m["prompts"], all_negative_prompts=m["negative_prompts"], all_seeds=m["seeds"],
                    all_subseeds=m["subseeds"], infotexts=infotexts, index_of_first_image=1)
        if prompt_type == "positive":
            info["prompt"] = base.get("prompt") or ""  # A1111's prompt_for_display: the prompt as typed
        return ScriptResult(images=images, infotexts=infotexts, info=info, seeds=m["seeds"], subseeds=m["subseeds"],
                            prompts=m["prompts"], negative_prompts=m["negative_prompts"], warnings=m["warnings"],
                            interrupted=_interrupted(results, len(requests)))
    return Plan(requests, combine)


# =============================================================================================
# Prompts from file or textbox
# =============================================================================================

PROMPTS_FROM_FILE = "Prompts from file or textbox"
PROMPTS_FROM_FILE_DEFAULTS = [False, False, "start", ""]


def _bool_tag(v: str) -> bool:
    return v == "true"  # A1111: only the exact word "true" is true


#: The `--tag value` options a line may set, with A1111's value types. `sd_model` picks a checkpoint;
#: outpath_samples, outpath_grids, prompt_for_display and sampler_index are accepted and have no effect here.
PROMPT_TAGS = {
    "sd_model": str, "outpath_samples": str, "outpath_grids": str, "prompt_for_display": str,
    "prompt": str, "negative_prompt": str, "styles": str, "seed": int, "subseed_strength": float,
    "subseed": int, "seed_resize_from_h": int, "seed_resize_from_w": int, "sampler_index": int,
    "sampler_name": str, "batch_size": int, "n_iter": int, "steps": int, "cfg_scale": float, "width": int,
    "height": int, "restore_faces": _bool_tag, "tiling": _bool_tag, "do_not_save_samples": _bool_tag,
    "do_not_save_grid": _bool_tag,
}
_IGNORED_TAGS = {"outpath_samples", "outpath_grids", "prompt_for_display", "sampler_index"}


def parse_prompt_line(line: str) -> dict:
    """One line of options, A1111's `cmdargs`: shell-quoted `--tag value` pairs; `--prompt` and
    `--negative_prompt` take every word up to the next `--tag`. Raises ValueError naming the problem."""
    try:
        args = shlex.split(line)
    except ValueError as e:
        raise ValueError(f"cannot split the line into arguments ({e})") from None
    pos, out = 0, {}
    while pos < len(args):
        arg = args[pos]
        if not arg.startswith("--"):
            raise ValueError(f'must start with "--": {arg}')
        if pos + 1 >= len(args):
            raise ValueError(f"missing argument for command line option {arg}")
        tag = arg[2:]
        if tag in ("prompt", "negative_prompt"):
            pos += 1
            words = [args[pos]]
            pos += 1
            while pos < len(args) and not args[pos].startswith("--"):
                words.append(args[pos])
                pos += 1
            out[tag] = " ".join(words)
            continue
        kind = PROMPT_TAGS.get(tag)
        if kind is None:
            raise ValueError(f"unknown commandline option: {arg}; known: --" + ", --".join(PROMPT_TAGS))
        value = args[pos + 1]
        try:
            out[tag] = kind(value)
        except ValueError:
            raise ValueError(f"{arg}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None
        pos += 2
    return out


def plan_prompts_from_file(args: list, request: dict, kind: str, *, choices: Optional[dict],
                           rng: random.Random) -> Plan:
    """One generation per non-empty line. A line that starts with `--` is a line of options (above); any
    other line is a prompt. The line's prompt goes before (position "start") or after ("end") the request's
    prompt, joined by a space. Iterate seed: each line starts batch_size x n_iter seeds after the last."""
    from server.scripts.xyz import closest_checkpoint, find_sampler

    args = list(args) + PROMPTS_FROM_FILE_DEFAULTS[len(args):]
    iterate, same_seed, position, text = args[:4]
    iterate, same_seed = as_bool(iterate), as_bool(same_seed)
    if position not in ("start", "end"):
        raise ScriptError(f"{PROMPTS_FROM_FILE}: prompt position must be 'start' or 'end', not {position!r}")
    if not isinstance(text, str):
        raise ScriptError(f"{PROMPTS_FROM_FILE}: the list of prompt inputs (4th script arg) must be a string")
    base = base_request(request)
    lines = [x for x in (x.strip() for x in text.splitlines()) if x]
    if not lines:
        raise ScriptError(f"{PROMPTS_FROM_FILE}: the list of prompt inputs is empty")
    jobs = []
    for number, line in enumerate(lines, 1):
        if not line.startswith("--"):
            jobs.append({"prompt": line})
            continue
        try:
            jobs.append(parse_prompt_line(line))
        except ValueError as e:
            raise ScriptError(f"{PROMPTS_FROM_FILE}: line {number} ({line!r}): {e}") from None

    seed = base.get("seed", -1)
    if (iterate or same_seed) and (seed is None or seed == -1):
        seed = rng.randrange(4294967294)
    batch_size, n_iter = int(base.get("batch_size") or 1), int(base.get("n_iter") or 1)
    checkpoints = (choices or {}).get("checkpoints")
    requests = []
    for number, job in enumerate(jobs, 1):
        req = copy.deepcopy(base)
        req["seed"] = seed
        for tag, value in job.items():
            if tag in _IGNORED_TAGS:
                continue
            if tag == "sd_model":
                name = closest_checkpoint(value, checkpoints) if checkpoints is not None else value
                if name is None:
                    raise ScriptError(f"{PROMPTS_FROM_FILE}: line {number}: Unknown checkpoint: {value}")
                req["override_settings"]["sd_model_checkpoint"] = name
            elif tag == "sampler_name":
                req[tag] = find_sampler(value, choices)
                if req[tag] is None:
                    raise ScriptError(f"{PROMPTS_FROM_FILE}: line {number}: unknown sampler {value!r}")
            elif tag == "styles":
                req["styles"] = [value]
            else:
                req[tag] = value
        for key in ("prompt", "negative_prompt"):
            if job.get(key) and base.get(key):
                req[key] = f"{job[key]} {base[key]}" if position == "start" else f"{base[key]} {job[key]}"
        requests.append(req)
        if iterate:
            seed = seed + batch_size * n_iter

    def combine(results: list) -> ScriptResult:
        m = _merge(results)
        info = dict(results[0].info) if results else {}
        info.update(all_prompts=m["prompts"], all_negative_prompts=m["negative_prompts"], all_seeds=m["seeds"],
                    all_subseeds=m["subseeds"], infotexts=m["infotexts"], index_of_first_image=0)
        return ScriptResult(images=m["images"], infotexts=m["infotexts"], info=info, seeds=m["seeds"],
                            subseeds=m["subseeds"], prompts=m["prompts"], negative_prompts=m["negative_prompts"],
                            warnings=m["warnings"], interrupted=_interrupted(results, len(requests)))
    return Plan(requests, combine)


# =============================================================================================
# SD upscale
# =============================================================================================

SD_UPSCALE = "SD upscale"
SD_UPSCALE_DEFAULTS = ["", 64, "None", 2.0]


def plan_sd_upscale(args: list, request: dict, kind: str, *, upscale: Optional[Callable], choices: Optional[dict],
                    rng: random.Random, decode_image: Callable, max_megapixels: float = 200) -> Plan:
    """Upscale the init image by `scale` with the named upscaler, cut it into tiles of the request's
    width x height overlapping by `overlap`, img2img every tile (batch_size tiles a batch; batch i of
    upscale n starts at seed + n + i, as A1111 counts), and blend the tiles back together. n_iter upscales."""
    if kind != "img2img":
        raise ScriptError(f"Script '{SD_UPSCALE.lower()}' not found", 422)  # A1111 shows it on img2img only
    args = list(args) + SD_UPSCALE_DEFAULTS[len(args):]
    _, overlap, upscaler, scale = args[:4]
    overlap = as_int(overlap, f"{SD_UPSCALE}: Tile overlap")
    scale = as_float(scale, f"{SD_UPSCALE}: Scale Factor")
    if not 0 < scale <= 16:
        raise ScriptError(f"{SD_UPSCALE}: Scale Factor must be above 0 and at most 16, not {scale}")
    names = list((choices or {}).get("upscalers") or [])
    if isinstance(upscaler, (int, float)) and not isinstance(upscaler, bool):
        if not names or not 0 <= int(upscaler) < len(names):
            raise ScriptError(f"{SD_UPSCALE}: upscaler index {upscaler} is out of range; upscalers: {', '.join(names)}")
        upscaler = names[int(upscaler)]
    upscaler = str(upscaler)
    if names:
        match = next((n for n in names if n.lower() == upscaler.lower()), None)
        if match is None:
            raise ScriptError(f"{SD_UPSCALE}: unknown upscaler {upscaler!r}; valid: {', '.join(names)}")
        upscaler = match
    base = base_request(request)
    init_images = base.get("init_images") or []
    if not init_images:
        raise ScriptError("Init image not found", 404)
    if base.get("mask"):
        raise ScriptError(f"{SD_UPSCALE}: an inpainting mask cannot be used with SD upscale")
    fix_seed(base, rng)
    width, height = int(base.get("width") or 512), int(base.get("height") or 512)
    image = decode_image(init_images[0])
    megapixels = round(int(image.width * scale) * int(image.height * scale) / 1_000_000)
    if megapixels >= max_megapixels:  # A1111's img_max_size_mp
        raise ScriptError(f"{SD_UPSCALE}: the upscaled image would be too large ({megapixels} megapixels; "
                          f"the limit is {max_megapixels})")
    if upscaler != "None":
        if upscale is None:
            raise ScriptError(f"{SD_UPSCALE}: no upscaler is available here")
        image = upscale(image, upscaler, scale)
    try:
        tiles = split_grid(image, tile_w=width, tile_h=height, overlap=overlap)
    except ValueError as e:
        raise ScriptError(f"{SD_UPSCALE}: {e}") from None
    work = tiles.images
    batch_size, upscale_count = int(base.get("batch_size") or 1), int(base.get("n_iter") or 1)
    batches = math.ceil(len(work) / batch_size)
    requests, spans = [], []
    for n in range(upscale_count):
        for i in range(batches):
            batch = work[i * batch_size:(i + 1) * batch_size]
            req = copy.deepcopy(base)
            req.update(init_images=[encode_png(t) for t in batch], batch_size=len(batch), n_iter=1,
                       seed=base["seed"] + n + i, resize_mode=0, width=width, height=height)
            requests.append(req)
            spans.append((n, len(batch)))
    extra = {"SD upscale overlap": overlap, "SD upscale upscaler": upscaler}

    def combine(results: list) -> ScriptResult:
        if not results:
            raise ScriptError(f"{SD_UPSCALE}: no image was generated", 409)
        first_info = with_params(results[0].infotexts[0] if results[0].infotexts else "", extra)
        outputs = []
        for n in range(upscale_count):
            done = [im for (m, count), r in zip(spans, results) if m == n for im in list(r.images)[:count]]
            if not done:
                break
            tiles.replace(done)
            outputs.append(combine_grid(tiles))
        infotexts = [first_info] * len(outputs)
        info = dict(results[0].info)
        info["extra_generation_params"] = {**(info.get("extra_generation_params") or {}), **extra}
        seeds = [base["seed"] + n for n in range(len(outputs))]
        info.update(infotexts=infotexts, index_of_first_image=0, all_seeds=seeds)
        return ScriptResult(images=outputs, infotexts=infotexts, info=info, seeds=info["all_seeds"],
                            warnings=_merge(results)["warnings"], interrupted=_interrupted(results, len(requests)))
    return Plan(requests, combine)
