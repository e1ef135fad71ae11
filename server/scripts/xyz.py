"""A1111's "X/Y/Z plot" script (`scripts/xyz_grid.py`, v1.10.1) on A1111 request dicts.

script_args, in A1111's order (missing trailing ones take A1111's UI defaults):
    [x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
     z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
     vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode]
An axis type is an index into the axis list of the tab (`AXES` filtered by txt2img / img2img, as A1111's
dropdown numbers them); an axis label is accepted too. Axes with a fixed list of choices (Sampler,
Checkpoint name, Schedule type, ...) read the `*_values_dropdown` list unless `csv_mode` is on, as A1111
does; here an empty dropdown list falls back to the text values. The older 11-argument layout without the
dropdowns (which client scripts written for A1111 before v1.3 send) is recognised by its third argument,
an axis type where the dropdown list would be. Checkboxes given as strings read "False" as false (A1111
would take any non-empty string as true).
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
from typing import Callable, Optional

import numpy as np
from PIL import Image

from server.scripts import grid as g
from server.scripts.common import Plan, ScriptError, ScriptResult, as_bool, as_int, fix_seed, fixed_seed, \
    with_params

TITLE = "X/Y/Z plot"


def _field(name):
    def apply(req, x, xs):
        req[name] = x
    return apply


def _override(name):
    def apply(req, x, xs):
        req["override_settings"][name] = x
    return apply


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
    apply: Optional[Callable]  # (request, value, all values) -> None; None: not supported here
    fmt: str = "label"  # "label" ("Steps: 20") | "value" | "join" | "basename" | "nothing"
    kind: Optional[str] = None  # only in the "txt2img" or "img2img" tab
    cost: float = 0.0  # the costliest axis is the outer loop (a checkpoint switch is slow)
    choices: Optional[str] = None  # name of the list of valid values in `choices`

    @property
    def supported(self) -> bool:
        return self.apply is not None


#: A1111 v1.10.1's axis list, in its order (the index an API client sends counts in this order, after
#: dropping the other tab's axes). Axes whose setting sd15 does not have are listed but refused.
AXES = [
    Axis("Nothing", str, lambda req, x, xs: None, fmt="nothing"),
    Axis("Seed", int, _field("seed")),
    Axis("Var. seed", int, _field("subseed")),
    Axis("Var. strength", float, _field("subseed_strength")),
    Axis("Steps", int, _field("steps")),
    Axis("Hires steps", int, _field("hr_second_pass_steps"), kind="txt2img"),
    Axis("CFG Scale", float, _field("cfg_scale")),
    Axis("Image CFG Scale", float, None, kind="img2img"),
    Axis("Prompt S/R", str, _prompt_sr, fmt="value"),
    Axis("Prompt order", "permutations", _prompt_order, fmt="join"),
    Axis("Sampler", str, _field("sampler_name"), fmt="value", kind="txt2img", choices="samplers"),
    Axis("Hires sampler", str, _field("hr_sampler_name"), kind="txt2img", choices="samplers"),
    Axis("Sampler", str, _field("sampler_name"), fmt="value", kind="img2img", choices="samplers"),
    Axis("Checkpoint name", str, _override("sd_model_checkpoint"), fmt="basename", cost=1.0, choices="checkpoints"),
    Axis("Negative Guidance minimum sigma", float, _field("s_min_uncond")),
    Axis("Sigma Churn", float, _field("s_churn")),
    Axis("Sigma min", float, _field("s_tmin")),
    Axis("Sigma max", float, _field("s_tmax")),
    Axis("Sigma noise", float, _field("s_noise")),
    Axis("Schedule type", str, _field("scheduler"), choices="schedulers"),
    Axis("Schedule min sigma", float, None),
    Axis("Schedule max sigma", float, None),
    Axis("Schedule rho", float, None),
    Axis("Beta schedule alpha", float, None),
    Axis("Beta schedule beta", float, None),
    Axis("Eta", float, _field("eta")),
    Axis("Clip skip", int, _override("CLIP_stop_at_last_layers")),
    Axis("Denoising", float, _field("denoising_strength")),
    Axis("Initial noise multiplier", float, _field("initial_noise_multiplier")),
    Axis("Extra noise", float, None),
    Axis("Hires upscaler", str, _field("hr_upscaler"), kind="txt2img", choices="hr_upscalers"),
    Axis("Cond. Image Mask Weight", float, None, kind="img2img"),
    Axis("VAE", str, _override("sd_vae"), cost=0.7, choices="vaes"),
    Axis("Styles", str, None),
    Axis("UniPC Order", int, None, cost=0.5),
    Axis("Face restore", str, None, fmt="value"),
    Axis("Token merging ratio", float, None),
    Axis("Token merging ratio high-res", float, None),
    Axis("Always discard next-to-last sigma", str, None),
    Axis("SGM noise multiplier", str, None),
    Axis("Refiner checkpoint", str, None, fmt="basename", cost=1.0),
    Axis("Refiner switch at", float, None),
    Axis("RNG source", str, _override("randn_source"), choices="rng"),
    Axis("FP8 mode", str, None, cost=0.9),
    Axis("Size", str, _size),
]

DEFAULT_ARGS = [1, "", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, False]
ARG_LABELS = ["X type", "X values", "X values", "Y type", "Y values", "Y values", "Z type", "Z values", "Z values",
              "Draw legend", "Include Sub Images", "Include Sub Grids", "Keep -1 for seeds", "Vary seeds for X",
              "Vary seeds for Y", "Vary seeds for Z", "Grid margins (px)", "Use text inputs instead of dropdowns"]
RNG_SOURCES = ["GPU", "CPU", "NV"]


def axes_for(kind: str) -> list:
    return [a for a in AXES if a.kind in (None, kind)]


def supported_labels(kind: str) -> list:
    return [a.label for a in axes_for(kind) if a.supported]


# =============================================================================================
# Values
# =============================================================================================

_NUM_INT = r"([+-]?\s*\d+)"
_NUM_FLOAT = r"([+-]?\s*\d+(?:\.\d*)?)"
RANGE_INT = re.compile(rf"\s*{_NUM_INT}\s*-\s*{_NUM_INT}(?:\s*\(([+-]\d+)\s*\))?\s*")
RANGE_FLOAT = re.compile(rf"\s*{_NUM_FLOAT}\s*-\s*{_NUM_FLOAT}(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
COUNT_INT = re.compile(rf"\s*{_NUM_INT}\s*-\s*{_NUM_INT}(?:\s*\[(\d+)\s*\])?\s*")
COUNT_FLOAT = re.compile(rf"\s*{_NUM_FLOAT}\s*-\s*{_NUM_FLOAT}(?:\s*\[(\d+(?:\.\d*)?)\s*\])?\s*")


def split_values(text: str) -> list:
    """A comma-separated list as A1111 reads it: CSV (double quotes protect commas), each value stripped."""
    return [v.strip() for v in itertools.chain.from_iterable(csv.reader(io.StringIO(text), skipinitialspace=True))]


def _num(text: str) -> str:
    return text.replace(" ", "")


def parse_values(axis: Axis, values: list) -> list:
    """Expand ranges and convert: for int axes `1-5` (1..5), `1-5 (+2)` (step), `1-10 [5]` (5 values,
    evenly spaced, truncated); for float axes the same with `1.0-2.0 (+0.5)` and `0-1 [5]`; Prompt order
    gives every permutation of its values. Blank numbers are skipped."""
    what = f"{TITLE}: {axis.label} value"
    if axis.type == "permutations":
        return [list(p) for p in itertools.permutations(values)]
    if axis.type not in (int, float):
        return [str(v) for v in values]
    out = []
    for val in values:
        if not isinstance(val, str):
            out.append(val)
            continue
        if val.strip() == "":
            continue
        if axis.type is int:
            m, mc = RANGE_INT.fullmatch(val), COUNT_INT.fullmatch(val)
            if m:
                start, end = int(_num(m.group(1))), int(_num(m.group(2)))
                step = int(m.group(3)) if m.group(3) is not None else 1
                if step == 0:
                    raise ScriptError(f"{what} {val!r}: the step must not be 0")
                out += list(range(start, end + 1, step))
            elif mc:
                start, end = int(_num(mc.group(1))), int(_num(mc.group(2)))
                num = int(mc.group(3)) if mc.group(3) is not None else 1
                out += [int(x) for x in np.linspace(start, end, num).tolist()]
            else:
                out.append(val)
        else:
            m, mc = RANGE_FLOAT.fullmatch(val), COUNT_FLOAT.fullmatch(val)
            if m:
                start, end = float(_num(m.group(1))), float(_num(m.group(2)))
                step = float(m.group(3)) if m.group(3) is not None else 1.0
                if step == 0:
                    raise ScriptError(f"{what} {val!r}: the step must not be 0")
                out += np.arange(start, end + step, step).tolist()
            elif mc:
                start, end = float(_num(mc.group(1))), float(_num(mc.group(2)))
                num = int(float(mc.group(3))) if mc.group(3) is not None else 1
                out += np.linspace(start, end, num).tolist()
            else:
                out.append(val)
    if axis.type is int:
        return [as_int(v, what) for v in out]
    try:
        return [float(v) for v in out]
    except (TypeError, ValueError):
        bad = next(v for v in out if not _is_float(v))
        raise ScriptError(f"{what}: {bad!r} is not a number") from None


def _is_float(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


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


def find_sampler(name: str, choices: Optional[dict]) -> Optional[str]:
    """A sampler name in any case, or an alias (A1111's scripts look names up case-insensitively with the
    aliases) -> the sampler's name; None when unknown. Without a list of samplers, `name` as it is."""
    names = (choices or {}).get("samplers")
    if names is None:
        return name
    lowered = {n.lower(): n for n in names}
    lowered.update({a.lower(): n for a, n in ((choices or {}).get("sampler_aliases") or {}).items()})
    return lowered.get(name.strip().lower())


def _confirm(axis: Axis, values: list, choices: dict) -> list:
    """Check (and canonicalise) the values of an axis that has a list of valid choices."""
    if axis.choices is None:
        return values
    if axis.choices == "rng":
        valid = RNG_SOURCES
    elif choices is None or choices.get(axis.choices) is None:
        return values
    else:
        valid = list(choices[axis.choices])
    out = []
    for v in values:
        if axis.choices == "checkpoints":
            match = closest_checkpoint(v, valid)
        elif axis.choices == "samplers":
            match = find_sampler(v, choices)
        elif axis.choices == "vaes":
            lowered = {c.lower(): c for c in ["Automatic", "None", *valid]}
            match = {"auto": "Automatic"}.get(v.strip().lower()) or lowered.get(v.strip().lower())
        else:
            match = next((c for c in valid if c.lower() == v.strip().lower()), None)
        if match is None:
            raise ScriptError(f"{TITLE}: unknown {axis.label} {v!r}; valid: {', '.join(map(str, valid))}")
        out.append(match)
    return out


# =============================================================================================
# Plan and combine
# =============================================================================================

def _axis(type_arg, options: list, which: str, kind: str) -> Axis:
    if type_arg is None or type_arg == "":
        type_arg = 0
    if isinstance(type_arg, str) and not type_arg.strip().lstrip("-").isdigit():
        axis = next((a for a in options if a.label.lower() == type_arg.strip().lower()), None)
        if axis is None:
            raise ScriptError(f"{TITLE}: unknown {which} type {type_arg!r}; the {kind} axes are: "
                              + ", ".join(a.label for a in options), 422)
    else:
        index = as_int(type_arg, f"{TITLE}: {which} type")
        if not 0 <= index < len(options):
            raise ScriptError(f"{TITLE}: {which} type {index} is out of range; the {kind} axes are "
                              f"0-{len(options) - 1}: "
                              + ", ".join(f"{i} {a.label}" for i, a in enumerate(options)), 422)
        axis = options[index]
    if not axis.supported:
        raise ScriptError(f"{TITLE}: the {which} axis {axis.label!r} is not supported by this server; supported: "
                          + ", ".join(supported_labels(kind)))
    return axis


def plan(args: list, request: dict, kind: str, *, choices: Optional[dict] = None,
         rng: Optional[random.Random] = None, max_megapixels: float = 200) -> Plan:
    """The cells of the plot as request dicts, in the order A1111 runs them, and the grid builder."""
    rng = rng or random.Random()
    args = list(args)
    if len(args) > 2 and not isinstance(args[2], (list, tuple, type(None))):
        # the layout before A1111 v1.3 added the value dropdowns, which old client scripts still send:
        # [x_type, x_values, y_type, y_values, z_type, z_values, draw_legend, include_lone_images,
        #  include_sub_grids, no_fixed_seeds, margin_size]
        old = args + [0, "", 0, "", True, False, False, False, 0][len(args) - 2:]
        args = [old[0], old[1], [], old[2], old[3], [], old[4], old[5], [], *old[6:10], False, False, False, old[10],
                True]
    args = args + DEFAULT_ARGS[len(args):]
    (x_type, x_text, x_drop, y_type, y_text, y_drop, z_type, z_text, z_drop, draw_legend, include_lone_images,
     include_sub_grids, no_fixed_seeds, vary_x, vary_y, vary_z, margin, csv_mode) = args[:18]
    flags = (draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_x, vary_y, vary_z, csv_mode)
    draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_x, vary_y, vary_z, csv_mode = map(
        as_bool, flags)
    margin = as_int(margin, f"{TITLE}: Grid margins (px)")
    if not 0 <= margin <= 500:
        raise ScriptError(f"{TITLE}: Grid margins (px) must be 0-500, not {margin}")
    options = axes_for(kind)
    base = dict(request)
    if not no_fixed_seeds:
        fix_seed(base, rng)

    def axis_values(axis: Axis, text, drop):
        if axis.label == "Nothing":
            return [0], "", [0]
        if isinstance(text, list):  # lenient: a list where A1111 wants the comma-separated text
            text = ",".join(f'"{v}"' if "," in str(v) else str(v) for v in text)
        text = "" if text is None else str(text)
        if axis.choices is not None and not csv_mode and drop:
            values = [str(v) for v in drop]
            text = _csv_line(values)
        else:
            values = split_values(text)
        typed = parse_values(axis, values)
        if not typed:
            raise ScriptError(f"{TITLE}: the {axis.label} axis has no values")
        return _confirm(axis, typed, choices), text, typed  # labels show the values as typed, as A1111's do

    x_opt, y_opt, z_opt = (_axis(t, options, w, kind) for t, w in ((x_type, "X"), (y_type, "Y"), (z_type, "Z")))
    (xs, x_text, x_typed), (ys, y_text, y_typed), (zs, z_text, z_typed) = (
        axis_values(a, t, d) for a, t, d in ((x_opt, x_text, x_drop), (y_opt, y_text, y_drop), (z_opt, z_text, z_drop)))
    width, height = int(base.get("width") or 512), int(base.get("height") or 512)
    grid_mp = round(len(xs) * len(ys) * len(zs) * width * height / 1_000_000)
    if grid_mp >= max_megapixels:
        raise ScriptError(f"{TITLE}: the grid would be too large ({grid_mp} megapixels; the limit is {max_megapixels})")

    if not no_fixed_seeds:
        def fix(axis, vals):
            return [fixed_seed(v, rng) for v in vals] if axis.label in ("Seed", "Var. seed") else vals
        xs, ys, zs = fix(x_opt, xs), fix(y_opt, ys), fix(z_opt, zs)

    def cell_request(ix, iy, iz) -> dict:
        req = copy.deepcopy(base)
        req["script_name"], req["script_args"] = None, []
        req["override_settings"] = dict(req.get("override_settings") or {})
        req.setdefault("prompt", "")
        req.setdefault("negative_prompt", "")
        for opt, vals, i in ((x_opt, xs, ix), (y_opt, ys, iy), (z_opt, zs, iz)):
            opt.apply(req, vals[i], vals)
        xdim, ydim = (len(xs) if vary_x else 1), (len(ys) if vary_y else 1)
        seed = req.get("seed", -1)
        seed = -1 if seed is None else seed
        if vary_x:
            seed += ix
        if vary_y:
            seed += iy * xdim
        if vary_z:
            seed += iz * xdim * ydim
        req["seed"] = seed
        return req

    order = cell_order(x_opt.cost, y_opt.cost, z_opt.cost, len(xs), len(ys), len(zs))
    requests = [cell_request(*c) for c in order]  # every cell is built (and checked) before any runs

    def params_for(iz_main: bool) -> dict:
        out = {"Script": TITLE}
        for name, opt, text, vals in (("X", x_opt, x_text, xs), ("Y", y_opt, y_text, ys)) + (
                (("Z", z_opt, z_text, zs),) if iz_main else ()):
            if opt.label != "Nothing":
                out[f"{name} Type"], out[f"{name} Values"] = opt.label, text
                if opt.label in ("Seed", "Var. seed") and not no_fixed_seeds:
                    out[f"Fixed {name} Values"] = ", ".join(str(v) for v in vals)
        return out

    def combine(results: list) -> ScriptResult:
        labels = tuple([format_label(opt, v) for v in (typed if opt.choices else vals)]
                       for opt, vals, typed in ((x_opt, xs, x_typed), (y_opt, ys, y_typed), (z_opt, zs, z_typed)))
        return _combine(order, results, (len(xs), len(ys), len(zs)), labels, draw_legend, include_lone_images,
                        include_sub_grids, margin, params_for, (width, height))
    return Plan(requests, combine)


def _csv_line(values: list) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue().strip()


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
    third = ({"x", "y", "z"} - {first, second}).pop()
    sizes = {"x": nx, "y": ny, "z": nz}
    out = []
    for a in range(sizes[first]):
        for b in range(sizes[second]):
            for c in range(sizes[third]):
                idx = {first: a, second: b, third: c}
                out.append((idx["x"], idx["y"], idx["z"]))
    return out


def _combine(order, results, dims, labels, draw_legend, include_lone_images, include_sub_grids, margin,
             params_for, size) -> ScriptResult:
    nx, ny, nz = dims
    n = nx * ny * nz
    images, prompts, seeds, infotexts = [None] * n, [None] * n, [None] * n, [None] * n
    grid_infotexts = [None] * (1 + nz)
    first = None
    for (ix, iy, iz), res in zip(order, results):
        idx = ix + iy * nx + iz * nx * ny
        first = first or res
        if res.images:
            images[idx] = res.images[0]
            prompts[idx] = (getattr(res, "prompts", None) or res.info.get("all_prompts") or [None])[0]
            seeds[idx] = res.seeds[0] if res.seeds else None
            infotexts[idx] = res.infotexts[0] if res.infotexts else ""
            if ix == 0 and iy == 0:
                grid_infotexts[1 + iz] = with_params(infotexts[idx], params_for(False))
                if iz == 0:
                    grid_infotexts[0] = with_params(infotexts[idx], params_for(True))
    if first is None or not any(images):
        raise ScriptError(f"{TITLE}: no image was generated", 409)
    template = next(im for im in images if im is not None)
    for i, im in enumerate(images):
        if im is None:  # an interrupted cell: blank, as A1111 leaves it
            images[i] = Image.new(template.mode, template.size)

    x_labels, y_labels, z_labels = labels
    hor = [[g.GridAnnotation(x)] for x in x_labels]
    ver = [[g.GridAnnotation(y)] for y in y_labels]
    for i in range(nz):
        start = i * nx * ny + i
        cells = images[start:start + nx * ny]
        sub = g.image_grid(cells, rows=ny)
        if draw_legend:
            w, h = map(max, zip(*(im.size for im in cells)))
            sub = g.draw_grid_annotations(sub, w, h, hor, ver, margin)
        images.insert(i, sub)
        prompts.insert(i, prompts[start])
        seeds.insert(i, seeds[start])
        infotexts.insert(i, infotexts[start])
    z_grid = g.image_grid(images[:nz], rows=1)
    if draw_legend:
        w, h = map(max, zip(*(im.size for im in images[:nz])))
        titles = [[g.GridAnnotation(z)] for z in z_labels]
        z_grid = g.draw_grid_annotations(z_grid, w, h, titles, [[g.GridAnnotation()]])
    images.insert(0, z_grid)
    infotexts.insert(0, infotexts[0])  # A1111 inserts no prompt / seed for the main grid
    infotexts[:1 + nz] = [t if t is not None else infotexts[k] for k, t in enumerate(grid_infotexts)]

    if not include_lone_images:
        images = images[:nz + 1]
    if not include_sub_grids:
        for _ in range(nz):
            del images[1], prompts[1], seeds[1], infotexts[1]

    info = dict(first.info)
    info.update(all_prompts=prompts, all_seeds=seeds, infotexts=infotexts, index_of_first_image=1)
    return ScriptResult(images=images, infotexts=infotexts, info=info, seeds=seeds, prompts=prompts,
                        subseeds=list(info.get("all_subseeds") or []),
                        negative_prompts=list(info.get("all_negative_prompts") or []),
                        warnings=[w for r in results for w in getattr(r, "warnings", [])],
                        interrupted=any(getattr(r, "interrupted", False) for r in results) or len(results) < len(order))
