"""A1111's "X/Y/Z plot" script (`scripts/xyz_grid.py`, v1.10.1) on A1111 request dicts.

script_args, in A1111's order (missing trailing ones take A1111's UI defaults):
    [x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
     z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
     vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode]
An axis type is an index into the axis list of the tab (`AXES` filtered by txt2img / img2img, as A1111's
dropdown numbers them) or an axis label. Axes with a fixed list of choices (Sampler, Checkpoint name, ...)
read the `*_values_dropdown` list unless `csv_mode` is on or the list is empty. The 11-argument layout
before A1111 v1.3 (no dropdowns) is recognised by its third argument, an axis type. Checkboxes given as
strings read "False" as false (A1111 would take any non-empty string as true).
"""
from __future__ import annotations

import copy
import csv
import io
import itertools
import os
import random
import re
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image

from sd15.pipeline import Result
from sd15.preview import image_grid
from sd15.samplers.table import SAMPLER_TABLE, SCHEDULER_TABLE, find_sampler
from sd15.schema import RANDN_SOURCES, fixed_seed
from server.scripts import grid as g
from server.scripts.common import Plan, ScriptError, as_bool, as_float, as_int, base_request, \
    with_params

TITLE = "X/Y/Z plot"


def _prompt_sr(req, x, xs):
    """Prompt S/R: the first value is the search term; every value replaces it in both prompts."""
    prompt, negative = req.get("prompt") or "", req.get("negative_prompt") or ""
    if xs[0] not in prompt and xs[0] not in negative:
        raise ScriptError(f"{TITLE}: Prompt S/R did not find {xs[0]} in prompt or negative prompt.")
    req["prompt"], req["negative_prompt"] = prompt.replace(xs[0], x), negative.replace(xs[0], x)


def _prompt_order(req, x, xs):
    """Prompt order: the values, found in the prompt, are put back in the order of this permutation."""
    prompt = req.get("prompt") or ""
    order = sorted((prompt.find(token), token) for token in x)
    parts = []
    for _, token in order:
        n = prompt.find(token)
        parts.append(prompt[:n])
        prompt = prompt[n + len(token):]
    req["prompt"] = "".join(part + x[i] for i, part in enumerate(parts)) + prompt


def _size(req, x, xs):
    width, _, height = x.partition("x")
    try:
        req["width"], req["height"] = int(width.strip()), int(height.strip())
    except ValueError:
        raise ScriptError(f"{TITLE}: Size value {x!r} is not WIDTHxHEIGHT") from None


@dataclass(frozen=True)
class Axis:
    label: str
    type: object  # int, float, str, or "permutations"
    apply: Union[str, Callable, None]  # a request field, "override_settings.<option>", or
    # (request, value, all values) -> None; None: not supported here
    fmt: str = "label"  # "label" ("Steps: 20") | "value" | "join" | "basename" | "nothing"
    kind: Optional[str] = None  # only in the "txt2img" or "img2img" tab
    cost: float = 0.0  # the costliest axis is the outer loop (a checkpoint switch is slow)
    choices: Optional[str] = None  # name of the list of valid values in `choices`


#: A1111 v1.10.1's axis list, in its order (the index an API client sends counts in this order, after
#: dropping the other tab's axes). Axes whose setting sd15 does not have are listed but refused.
AXES = [
    Axis("Nothing", str, lambda req, x, xs: None, fmt="nothing"),
    Axis("Seed", int, "seed"),
    Axis("Var. seed", int, "subseed"),
    Axis("Var. strength", float, "subseed_strength"),
    Axis("Steps", int, "steps"),
    Axis("Hires steps", int, "hr_second_pass_steps", kind="txt2img"),
    Axis("CFG Scale", float, "cfg_scale"),
    Axis("Image CFG Scale", float, None, kind="img2img"),
    Axis("Prompt S/R", str, _prompt_sr, fmt="value"),
    Axis("Prompt order", "permutations", _prompt_order, fmt="join"),
    Axis("Sampler", str, "sampler_name", fmt="value", kind="txt2img", choices="samplers"),
    Axis("Hires sampler", str, "hr_sampler_name", kind="txt2img", choices="samplers"),
    Axis("Sampler", str, "sampler_name", fmt="value", kind="img2img", choices="samplers"),
    Axis("Checkpoint name", str, "override_settings.sd_model_checkpoint", fmt="basename", cost=1.0,
         choices="checkpoints"),
    Axis("Negative Guidance minimum sigma", float, "s_min_uncond"),
    Axis("Sigma Churn", float, "s_churn"),
    Axis("Sigma min", float, "s_tmin"),
    Axis("Sigma max", float, "s_tmax"),
    Axis("Sigma noise", float, "s_noise"),
    Axis("Schedule type", str, "scheduler", choices="schedulers"),
    Axis("Schedule min sigma", float, "override_settings.sigma_min"),
    Axis("Schedule max sigma", float, "override_settings.sigma_max"),
    Axis("Schedule rho", float, "override_settings.rho"),
    Axis("Beta schedule alpha", float, "override_settings.beta_dist_alpha"),
    Axis("Beta schedule beta", float, "override_settings.beta_dist_beta"),
    Axis("Eta", float, "eta"),
    Axis("Clip skip", int, "override_settings.CLIP_stop_at_last_layers"),
    Axis("Denoising", float, "denoising_strength"),
    Axis("Initial noise multiplier", float, "initial_noise_multiplier"),
    Axis("Extra noise", float, None),
    Axis("Hires upscaler", str, "hr_upscaler", kind="txt2img", choices="hr_upscalers"),
    Axis("Cond. Image Mask Weight", float, None, kind="img2img"),
    Axis("VAE", str, "override_settings.sd_vae", cost=0.7, choices="vaes"),
    Axis("Styles", str, None),
    Axis("UniPC Order", int, None, cost=0.5),
    Axis("Face restore", str, None, fmt="value"),
    Axis("Token merging ratio", float, None),
    Axis("Token merging ratio high-res", float, None),
    Axis("Always discard next-to-last sigma", str, "override_settings.always_discard_next_to_last_sigma"),
    Axis("SGM noise multiplier", str, None),
    Axis("Refiner checkpoint", str, None, fmt="basename", cost=1.0),
    Axis("Refiner switch at", float, None),
    Axis("RNG source", str, "override_settings.randn_source", choices="rng"),
    Axis("FP8 mode", str, None, cost=0.9),
    Axis("Size", str, _size),
]

DEFAULT_ARGS = [1, "", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, False]


def axes_for(kind: str) -> list:
    return [a for a in AXES if a.kind in (None, kind)]


def supported_labels(kind: str) -> list:
    return [a.label for a in axes_for(kind) if a.apply is not None]


def _ranges(number: str, step: str) -> tuple:
    """A1111's `re_range` (`1-5 (+2)`) and `re_range_count` (`1-10 [5]`) for one number syntax."""
    return (re.compile(rf"\s*{number}\s*-\s*{number}(?:\s*\(([+-]{step})\s*\))?\s*"),
            re.compile(rf"\s*{number}\s*-\s*{number}(?:\s*\[({step})\s*\])?\s*"))


RANGES = {int: _ranges(r"([+-]?\s*\d+)", r"\d+"),
          float: _ranges(r"([+-]?\s*\d+(?:\.\d*)?)", r"\d+(?:\.\d*)?")}


def split_values(text: str) -> list:
    """A comma-separated list as A1111 reads it: CSV (double quotes protect commas), each value stripped."""
    return [v.strip() for v in itertools.chain.from_iterable(csv.reader(io.StringIO(text), skipinitialspace=True))]


def parse_values(axis: Axis, values: list) -> list:
    """Expand ranges and convert: for int axes `1-5` (1..5), `1-5 (+2)` (step), `1-10 [5]` (5 values,
    evenly spaced, truncated); for float axes the same with `1.0-2.0 (+0.5)` and `0-1 [5]`; Prompt order
    gives every permutation of its values. Blank numbers are skipped."""
    what = f"{TITLE}: {axis.label} value"
    if axis.type == "permutations":
        return [list(p) for p in itertools.permutations(values)]
    if axis.type not in (int, float):
        return [str(v) for v in values]
    kind, out = axis.type, []
    for val in filter(str.strip, values):
        m, mc = (r.fullmatch(val) for r in RANGES[kind])
        if m:
            start, end = (kind(v.replace(" ", "")) for v in m.groups()[:2])
            step = kind(m.group(3) or 1)
            if step == 0:
                raise ScriptError(f"{what} {val!r}: the step must not be 0")
            stop = end + (1 if kind is int else step)
            out += list(range(start, stop, step)) if kind is int else np.arange(start, stop, step).tolist()
        elif mc:
            start, end = (kind(v.replace(" ", "")) for v in mc.groups()[:2])
            out += [kind(x) for x in np.linspace(start, end, int(float(mc.group(3) or 1))).tolist()]
        else:
            out.append(val)
    return [as_int(v, what) if kind is int else as_float(v, what) for v in out]


def format_label(axis: Axis, x) -> str:
    if isinstance(x, float):
        x = round(x, 8)
    if axis.fmt == "nothing":
        return ""
    if axis.fmt == "value":
        return str(x)
    if axis.fmt == "join":
        return ", ".join(x)
    if axis.fmt == "basename":
        return os.path.basename(str(x))
    return f"{axis.label}: {x}"


def closest_checkpoint(name: str, titles: list) -> Optional[str]:
    """A1111's `get_closet_checkpoint_match` -> the checkpoint's name: an exact title, name or name without
    extension; else the shortest title that contains `name`; else the same without a " [hash]" at its end."""
    if not name:
        return None
    for t in titles:
        bare = t.rsplit(" [", 1)[0]
        if name in (t, bare, os.path.splitext(bare)[0]):
            return bare
    for search in (name, re.sub(r"\s\[[^]]+]\s*$", "", name)):
        found = sorted((t for t in titles if search in t), key=len)
        if found:
            return found[0].rsplit(" [", 1)[0]
    return None


def _confirm(axis: Axis, values: list, choices: Optional[dict]) -> list:
    """Check (and canonicalise) the values of an axis that has a list of valid choices: samplers (any case,
    aliases), schedule types and RNG sources are sd15's; checkpoints, VAEs and hires upscalers are checked
    when `choices` names them."""
    own = {"rng": list(RANDN_SOURCES), "samplers": [s.name for s in SAMPLER_TABLE],
           "schedulers": [n for c in SCHEDULER_TABLE for n in (c.name, c.label)]}
    valid = (choices or {}).get(axis.choices) or own.get(axis.choices)
    if valid is None:
        return values
    out = []
    for v in values:
        if axis.choices == "checkpoints":
            match = closest_checkpoint(v, valid)
        elif axis.choices == "samplers":
            match = getattr(find_sampler(v), "name", None)
        elif axis.choices == "vaes":
            lowered = {c.lower(): c for c in ["Automatic", "None", *valid]}
            match = {"auto": "Automatic"}.get(v.strip().lower()) or lowered.get(v.strip().lower())
        else:
            match = next((c for c in valid if c.lower() == v.strip().lower()), None)
        if match is None:
            raise ScriptError(f"{TITLE}: unknown {axis.label} {v!r}; valid: {', '.join(map(str, valid))}")
        out.append(match)
    return out


def _axis(type_arg, options: list, which: str, kind: str) -> Axis:
    """The axis an X/Y/Z type argument names: an index into the tab's axes (A1111's dropdown) or a label."""
    if isinstance(type_arg, str) and type_arg.strip() and not type_arg.strip().lstrip("-").isdigit():
        index = next((i for i, a in enumerate(options) if a.label.lower() == type_arg.strip().lower()), -1)
    else:
        index = as_int(type_arg or 0, f"{TITLE}: {which} type")
    if not 0 <= index < len(options):
        raise ScriptError(f"{TITLE}: {which} type {type_arg!r} is out of range; the {kind} axes are: "
                          + ", ".join(f"{i} {a.label}" for i, a in enumerate(options)), 422)
    axis = options[index]
    if axis.apply is None:
        raise ScriptError(f"{TITLE}: the {which} axis {axis.label!r} is not supported by this server; supported: "
                          + ", ".join(supported_labels(kind)))
    return axis


def _axis_values(axis: Axis, text, drop, csv_mode: bool, choices: Optional[dict]) -> tuple:
    """(values text, values, values as typed) of an axis: its text, or its dropdown list if it has choices."""
    if axis.label == "Nothing":
        return "", [0], [0]
    if isinstance(text, list):  # lenient: a list where A1111 wants the comma-separated text
        text = ",".join(f'"{v}"' if "," in str(v) else str(v) for v in text)
    text = "" if text is None else str(text)
    if axis.choices is not None and not csv_mode and drop:
        values = [str(v) for v in drop]
        line = io.StringIO()
        csv.writer(line).writerow(values)
        text = line.getvalue().strip()
    else:
        values = split_values(text)
    typed = parse_values(axis, values)
    if not typed:
        raise ScriptError(f"{TITLE}: the {axis.label} axis has no values")
    return text, _confirm(axis, typed, choices), typed


def plan(args: list, request: dict, kind: str, *, choices: Optional[dict], rng: random.Random,
         max_megapixels: float) -> Plan:
    """The cells of the plot as request dicts, in the order A1111 runs them, and the grid builder."""
    if len(args) > 2 and not isinstance(args[2], (list, tuple, type(None))):
        # the layout before A1111 v1.3 added the value dropdowns, which old client scripts still send:
        # [x_type, x_values, y_type, y_values, z_type, z_values, draw_legend, include_lone_images,
        #  include_sub_grids, no_fixed_seeds, margin_size]
        old = args + [0, "", 0, "", True, False, False, False, 0][len(args) - 2:]
        args = [old[0], old[1], [], old[2], old[3], [], old[4], old[5], [], *old[6:10], False, False, False, old[10],
                True]
    args = args + DEFAULT_ARGS[len(args):]
    draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_x, vary_y, vary_z = map(
        as_bool, args[9:16])
    margin, csv_mode = as_int(args[16], f"{TITLE}: Grid margins (px)"), as_bool(args[17])
    if not 0 <= margin <= 500:
        raise ScriptError(f"{TITLE}: Grid margins (px) must be 0-500, not {margin}")
    base = base_request(request, None if no_fixed_seeds else rng)
    base.setdefault("prompt", "")
    base.setdefault("negative_prompt", "")
    axes = []  # X, Y, Z: (name, axis, values text, values, labels)
    for which, (type_arg, text, drop) in zip("XYZ", (args[0:3], args[3:6], args[6:9])):
        axis = _axis(type_arg, axes_for(kind), which, kind)
        text, values, typed = _axis_values(axis, text, drop, csv_mode, choices)
        if axis.label in ("Seed", "Var. seed") and not no_fixed_seeds:
            values = [fixed_seed(v, rng) for v in values]
        labels = [format_label(axis, v) for v in (typed if axis.choices else values)]  # choices: as typed
        axes.append((which, axis, text, values, labels))
    (_, x, _, xs, _), (_, y, _, ys, _), (_, z, _, zs, _) = axes
    width, height = int(base.get("width") or 512), int(base.get("height") or 512)
    grid_mp = round(len(xs) * len(ys) * len(zs) * width * height / 1_000_000)
    if grid_mp >= max_megapixels:
        raise ScriptError(f"{TITLE}: the grid would be too large ({grid_mp} megapixels; the limit is {max_megapixels})")

    def cell_request(ix, iy, iz) -> dict:
        req = copy.deepcopy(base)
        for (_, axis, _, values, _), i in zip(axes, (ix, iy, iz)):
            if callable(axis.apply):
                axis.apply(req, values[i], values)
            elif axis.apply.startswith("override_settings."):
                req["override_settings"][axis.apply.partition(".")[2]] = values[i]
            else:
                req[axis.apply] = values[i]
        xdim, ydim = (len(xs) if vary_x else 1), (len(ys) if vary_y else 1)
        offset = (ix if vary_x else 0) + (iy * xdim if vary_y else 0) + (iz * xdim * ydim if vary_z else 0)
        req["seed"] = (-1 if req.get("seed") is None else req["seed"]) + offset
        return req

    def params(with_z: bool) -> dict:
        out = {"Script": TITLE}
        for which, axis, text, values, _ in axes[:3 if with_z else 2]:
            if axis.label != "Nothing":
                out[f"{which} Type"], out[f"{which} Values"] = axis.label, text
                if axis.label in ("Seed", "Var. seed") and not no_fixed_seeds:
                    out[f"Fixed {which} Values"] = ", ".join(str(v) for v in values)
        return out

    order = cell_order(x.cost, y.cost, z.cost, len(xs), len(ys), len(zs))
    requests = [cell_request(*c) for c in order]  # every cell is built (and checked) before any runs

    def combine(results: list) -> Result:
        return _combine(results, order, axes, (params(True), params(False)), draw_legend, include_lone_images,
                        include_sub_grids, margin)
    return Plan(requests, combine)


def cell_order(cx: float, cy: float, cz: float, nx: int, ny: int, nz: int) -> list:
    """(ix, iy, iz) in A1111's run order: the costliest axis outermost, then the next costliest; with equal
    costs z, then y, then x (so a plain X/Y plot runs row by row)."""
    first, second = "z", "y"
    if cx > cy and cx > cz:
        first, second = "x", ("y" if cy > cz else "z")
    elif cy > cx and cy > cz:
        first, second = "y", ("x" if cx > cz else "z")
    elif cz > cx and cz > cy:
        first, second = "z", ("x" if cx > cy else "y")
    loops = (first, second, ({"x", "y", "z"} - {first, second}).pop())
    sizes = {"x": nx, "y": ny, "z": nz}
    cells = [dict(zip(loops, i)) for i in itertools.product(*(range(sizes[a]) for a in loops))]
    return [(c["x"], c["y"], c["z"]) for c in cells]


def _combine(results, order, axes, params, draw_legend, include_lone_images, include_sub_grids,
             margin) -> Result:
    """A1111's `draw_xyz_grid` and what `run` does after it: a grid per Z value, the Z grid of them first,
    the cells (blank where never generated), and A1111's list layout (no prompt / seed for the main grid)."""
    (_, _, _, xs, x_labels), (_, _, _, ys, y_labels), (_, _, _, zs, z_labels) = axes
    nx, ny, nz = len(xs), len(ys), len(zs)
    images, prompts, seeds, infotexts = ([None] * (nx * ny * nz) for _ in range(4))
    for (ix, iy, iz), res in zip(order, results):
        if res.images:
            idx = ix + iy * nx + iz * nx * ny
            images[idx], prompts[idx], seeds[idx] = res.images[0], res.prompts[0], res.seeds[0]
            infotexts[idx] = res.infotexts[0]
    template = next((im for im in images if im is not None), None)
    if template is None:
        raise ScriptError(f"{TITLE}: no image was generated", 409)
    blank = Image.new(template.mode, template.size)  # an interrupted cell: blank, as A1111 leaves it
    images = [blank if im is None else im for im in images]

    starts = [i * nx * ny for i in range(nz)]  # the first cell of each Z value's grid
    hor, ver = [[g.GridAnnotation(t)] for t in x_labels], [[g.GridAnnotation(t)] for t in y_labels]
    subs = []
    for s in starts:
        cells = images[s:s + nx * ny]
        sub = image_grid(cells, ny, g.BACKGROUND)
        if draw_legend:
            sub = g.draw_grid_annotations(sub, *map(max, zip(*(im.size for im in cells))), hor, ver, margin)
        subs.append(sub)
    z_grid = image_grid(subs, 1, g.BACKGROUND)
    if draw_legend:
        z_grid = g.draw_grid_annotations(z_grid, *map(max, zip(*(im.size for im in subs))),
                                         [[g.GridAnnotation(t)] for t in z_labels], [[g.GridAnnotation()]])
    heads = [infotexts[0], *(infotexts[s] for s in starts)]  # the cells whose infotexts the grids take
    grid_params = [params[0], *[params[1]] * nz]
    grid_texts = [None if t is None else with_params(t, p) for t, p in zip(heads, grid_params)]
    infotexts = grid_texts + infotexts
    prompts, seeds = [prompts[s] for s in starts] + prompts, [seeds[s] for s in starts] + seeds
    images = [z_grid, *subs, *(images if include_lone_images else [])]
    if not include_sub_grids:
        del images[1:1 + nz], prompts[1:1 + nz], seeds[1:1 + nz], infotexts[1:1 + nz]

    info = dict(results[0].info)
    info.update(all_prompts=prompts, all_seeds=seeds, infotexts=infotexts, index_of_first_image=1)
    return Result(images=images, seeds=seeds, subseeds=list(info.get("all_subseeds") or []),
                  infotexts=infotexts, info=info, prompts=prompts,
                  negative_prompts=list(info.get("all_negative_prompts") or []))
