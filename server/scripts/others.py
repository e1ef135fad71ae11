"""A1111's "Prompt matrix", "Prompts from file or textbox" and "SD upscale" scripts (v1.10.1's
`scripts/prompt_matrix.py`, `scripts/prompts_from_file.py`, `scripts/sd_upscale.py`) on A1111 request dicts."""
from __future__ import annotations

import base64
import copy
import math
import random
import shlex
from typing import Callable, Optional

from PIL import Image

from sd15.a1111.images import flatten, load_image, png_bytes
from sd15.pipeline import Result
from sd15.preview import image_grid
from sd15.samplers.table import find_sampler
from sd15.schema import fixed_seed
from sd15.upscale import combine_grid, split_grid
from server.scripts import grid as g
from server.scripts.common import Plan, ScriptError, as_bool, as_float, as_int, base_request, \
    with_params
from server.scripts.xyz import closest_checkpoint


def _merge(results: list) -> Result:
    """The lists of several generations concatenated, the first one's info with A1111's `all_*` lists."""
    info = dict(results[0].info) if results else {}
    out = Result(images=[], seeds=[], subseeds=[], infotexts=[], info=info)
    for name in ("images", "infotexts", "seeds", "subseeds", "prompts", "negative_prompts"):
        setattr(out, name, [x for r in results for x in getattr(r, name)])
    out.info.update(all_prompts=out.prompts, all_negative_prompts=out.negative_prompts, all_seeds=out.seeds,
                    all_subseeds=out.subseeds, infotexts=out.infotexts, index_of_first_image=0)
    return out


PROMPT_MATRIX = "Prompt matrix"


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


def plan_prompt_matrix(args: list, request: dict, *, rng: random.Random) -> Plan:
    """One image per combination of the prompt's `|` parts, and a grid labelled with the parts."""
    defaults = [False, False, "positive", "comma", 0]
    put_at_start, different_seeds, prompt_type, delimiter, margin = (args + defaults[len(args):])[:5]
    margin = as_int(margin, f"{PROMPT_MATRIX}: Grid margins (px)")
    if prompt_type not in ("positive", "negative"):
        raise ScriptError(f"{PROMPT_MATRIX}: Unknown prompt type {prompt_type}; use 'positive' or 'negative'")
    if delimiter not in ("comma", "space"):
        raise ScriptError(f"{PROMPT_MATRIX}: Unknown variations delimiter {delimiter}; use 'comma' or 'space'")
    base = base_request(request, rng)
    key = "prompt" if prompt_type == "positive" else "negative_prompt"
    parts = (base.get(key) or "").split("|")
    joiner = ", " if delimiter == "comma" else " "
    prompts = matrix_prompts(base.get(key) or "", as_bool(put_at_start), joiner)
    if len(prompts) > 4096:
        raise ScriptError(f"{PROMPT_MATRIX}: {len(parts) - 1} variable parts make {len(prompts)} images; "
                          f"at most 12 parts are allowed")
    requests = []
    for i, text in enumerate(prompts):  # one image per request: its own prompt, seed and variation seed
        req = copy.deepcopy(base)
        req.update({key: text, "seed": base["seed"] + (i if as_bool(different_seeds) else 0),
                    "subseed": base["subseed"] + i, "batch_size": 1, "n_iter": 1})
        requests.append(req)

    def combine(results: list) -> Result:
        out = _merge(results)
        if not out.images:
            raise ScriptError(f"{PROMPT_MATRIX}: no image was generated", 409)
        blank = Image.new(out.images[0].mode, out.images[0].size)  # interrupted: the grid keeps its shape
        cells = out.images + [blank] * (len(prompts) - len(out.images))
        grid = image_grid(cells, 1 << ((len(parts) - 1) // 2), g.BACKGROUND)
        out.images = [g.draw_prompt_matrix(grid, blank.width, blank.height, parts, margin), *cells]
        out.infotexts.insert(0, out.infotexts[0])
        out.info["index_of_first_image"] = 1
        if prompt_type == "positive":
            out.info["prompt"] = base.get("prompt") or ""  # A1111's prompt_for_display: the prompt as typed
        return out
    return Plan(requests, combine)


PROMPTS_FROM_FILE = "Prompts from file or textbox"


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
        arg, tag = args[pos], args[pos][2:]
        if not arg.startswith("--"):
            raise ValueError(f'must start with "--": {arg}')
        if pos + 1 >= len(args):
            raise ValueError(f"missing argument for command line option {arg}")
        if tag in ("prompt", "negative_prompt"):
            end = next((i for i in range(pos + 2, len(args)) if args[i].startswith("--")), len(args))
            out[tag] = " ".join(args[pos + 1:end])
            pos = end
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


def plan_prompts_from_file(args: list, request: dict, *, choices: Optional[dict], rng: random.Random) -> Plan:
    """One generation per non-empty line. A line that starts with `--` is a line of options (above); any
    other line is a prompt. The line's prompt goes before (position "start") or after ("end") the request's
    prompt, joined by a space. Iterate seed: each line starts batch_size x n_iter seeds after the last."""
    iterate, same_seed, position, text = (args + [False, False, "start", ""][len(args):])[:4]
    if position not in ("start", "end"):
        raise ScriptError(f"{PROMPTS_FROM_FILE}: prompt position must be 'start' or 'end', not {position!r}")
    if not isinstance(text, str):
        raise ScriptError(f"{PROMPTS_FROM_FILE}: the list of prompt inputs (4th script arg) must be a string")
    base = base_request(request)
    lines = [x for x in (x.strip() for x in text.splitlines()) if x]
    if not lines:
        raise ScriptError(f"{PROMPTS_FROM_FILE}: the list of prompt inputs is empty")
    seed = base.get("seed", -1)
    if as_bool(iterate) or as_bool(same_seed):
        seed = fixed_seed(seed, rng)
    checkpoints = (choices or {}).get("checkpoints")
    requests = []
    for number, line in enumerate(lines, 1):
        where = f"{PROMPTS_FROM_FILE}: line {number}"
        try:
            job = parse_prompt_line(line) if line.startswith("--") else {"prompt": line}
        except ValueError as e:
            raise ScriptError(f"{where} ({line!r}): {e}") from None
        req = copy.deepcopy(base)
        req["seed"] = seed
        for tag, value in job.items():
            if tag == "sd_model":
                name = closest_checkpoint(value, checkpoints) if checkpoints is not None else value
                if name is None:
                    raise ScriptError(f"{where}: Unknown checkpoint: {value}")
                req["override_settings"]["sd_model_checkpoint"] = name
            elif tag == "sampler_name":
                req[tag] = getattr(find_sampler(value), "name", None)  # any case, or an alias
                if req[tag] is None:
                    raise ScriptError(f"{where}: unknown sampler {value!r}")
            elif tag not in _IGNORED_TAGS:
                req[tag] = [value] if tag == "styles" else value
        for key in ("prompt", "negative_prompt"):
            if job.get(key) and base.get(key):
                req[key] = f"{job[key]} {base[key]}" if position == "start" else f"{base[key]} {job[key]}"
        requests.append(req)
        if as_bool(iterate):
            seed += int(base.get("batch_size") or 1) * int(base.get("n_iter") or 1)
    return Plan(requests, _merge)


SD_UPSCALE = "SD upscale"


def plan_sd_upscale(args: list, request: dict, *, upscale: Optional[Callable], choices: Optional[dict],
                    rng: random.Random, max_megapixels: float = 200) -> Plan:
    """Upscale the init image by `scale` with the named upscaler, cut it into tiles of the request's
    width x height overlapping by `overlap`, img2img every tile (batch_size tiles a batch; batch i of
    upscale n starts at seed + n + i, as A1111 counts), and blend the tiles back together. n_iter upscales."""
    _, overlap, upscaler, scale = (args + ["", 64, "None", 2.0][len(args):])[:4]
    overlap = as_int(overlap, f"{SD_UPSCALE}: Tile overlap")
    scale = as_float(scale, f"{SD_UPSCALE}: Scale Factor")
    if not 0 < scale <= 16:
        raise ScriptError(f"{SD_UPSCALE}: Scale Factor must be above 0 and at most 16, not {scale}")
    names = list((choices or {}).get("upscalers") or [])
    if isinstance(upscaler, (int, float)) and not isinstance(upscaler, bool):
        if not 0 <= int(upscaler) < len(names):
            raise ScriptError(f"{SD_UPSCALE}: upscaler index {upscaler} is out of range; upscalers: {', '.join(names)}")
        upscaler = names[int(upscaler)]
    upscaler = str(upscaler)
    if names:
        match = next((n for n in names if n.lower() == upscaler.lower()), None)
        if match is None:
            raise ScriptError(f"{SD_UPSCALE}: unknown upscaler {upscaler!r}; valid: {', '.join(names)}")
        upscaler = match
    base = base_request(request, rng)
    if not base.get("init_images"):
        raise ScriptError("Init image not found", 404)
    if base.get("mask"):
        raise ScriptError(f"{SD_UPSCALE}: an inpainting mask cannot be used with SD upscale")
    width, height = int(base.get("width") or 512), int(base.get("height") or 512)
    try:  # A1111's decoding and img2img_background_color
        image = flatten(load_image(base["init_images"][0], mode=None))
    except ValueError as e:
        raise ScriptError(f"init_images[0]: {e}") from None
    megapixels = round(int(image.width * scale) * int(image.height * scale) / 1_000_000)
    if megapixels >= max_megapixels:  # A1111's img_max_size_mp
        raise ScriptError(f"{SD_UPSCALE}: the upscaled image would be too large ({megapixels} megapixels; "
                          f"the limit is {max_megapixels})")
    if upscaler != "None":
        image = upscale(image, upscaler, scale)
    try:
        tiles = split_grid(image, tile_w=width, tile_h=height, overlap=overlap)
    except ValueError as e:
        raise ScriptError(f"{SD_UPSCALE}: {e}") from None
    batch_size, upscale_count = int(base.get("batch_size") or 1), int(base.get("n_iter") or 1)
    requests, spans = [], []
    for n in range(upscale_count):
        for i in range(math.ceil(len(tiles.images) / batch_size)):
            batch = tiles.images[i * batch_size:(i + 1) * batch_size]  # lossless PNG, so a tile stays exact
            req = copy.deepcopy(base)
            req.update(init_images=[base64.b64encode(png_bytes(t)).decode("ascii") for t in batch],
                       batch_size=len(batch), n_iter=1, seed=base["seed"] + n + i, resize_mode=0, width=width,
                       height=height)
            requests.append(req)
            spans.append((n, len(batch)))
    extra = {"SD upscale overlap": overlap, "SD upscale upscaler": upscaler}

    def combine(results: list) -> Result:
        if not results:
            raise ScriptError(f"{SD_UPSCALE}: no image was generated", 409)
        outputs = []
        for n in range(upscale_count):
            done = [im for (m, count), r in zip(spans, results) if m == n for im in r.images[:count]]
            if not done:
                break
            tiles.replace(done)
            outputs.append(combine_grid(tiles))
        infotexts = [with_params((results[0].infotexts or [""])[0], extra)] * len(outputs)
        info = dict(results[0].info)
        info["extra_generation_params"] = {**(info.get("extra_generation_params") or {}), **extra}
        seeds = [base["seed"] + n for n in range(len(outputs))]
        info.update(infotexts=infotexts, index_of_first_image=0, all_seeds=seeds)
        return Result(images=outputs, seeds=seeds, subseeds=[], infotexts=infotexts, info=info)
    return Plan(requests, combine)
