"""A1111's selectable scripts over the API (`script_name` + `script_args` on txt2img / img2img), and the
`/sdapi/v1/scripts` and `/sdapi/v1/script-info` routes that list them.

    result = run_script("x/y/z plot", [4, "10,20", [], 6, "5,7", []], request, "txt2img", generate)

A script turns one A1111 request dict into the request dicts it runs (`plan_script`) and their results
into one response (`Plan.combine`): a grid first where A1111 returns one, then the images, with `info` /
`infotexts` in A1111's shape. `generate` (request -> sd15 `pipeline.Result`) and SD upscale's `upscale`
are injected, so the server and tests (with a fake generator) run the same code.
"""
from __future__ import annotations

import random
from typing import Callable, Optional

from starlette.responses import JSONResponse
from starlette.routing import Route

from sd15.a1111.images import LATENT_UPSCALE_MODES
from sd15.pipeline import Result
from server.scripts import others, xyz
from server.scripts.common import Plan, ScriptError

#: A1111's titles, in the order A1111 lists them, with the tabs that show them
TITLES = {
    others.PROMPT_MATRIX: ("txt2img", "img2img"),
    others.PROMPTS_FROM_FILE: ("txt2img", "img2img"),
    others.SD_UPSCALE: ("img2img",),
    xyz.TITLE: ("txt2img", "img2img"),
}


def plan_script(name: str, args: list, request: dict, kind: str, *, upscale: Optional[Callable] = None,
                choices: Optional[dict] = None, rng: Optional[random.Random] = None,
                max_megapixels: float = 200) -> Plan:
    """The request dicts script `name` (any case) will run on the `kind` tab, in order, and how their results
    combine. Raises ScriptError (4xx) for a bad name, bad arguments or a request the script cannot run.

    `choices` (optional) names what is valid here, so that bad values are refused before anything runs:
    {"checkpoints": [titles], "vaes": [...], "hr_upscalers": [...], "upscalers": [...]} (the last also maps
    SD upscale's upscaler index to a name); samplers and schedule types are sd15's. `max_megapixels` bounds
    an X/Y/Z grid and an SD upscale's image (A1111's img_max_size_mp)."""
    found = [t for t, kinds in TITLES.items() if t.lower() == str(name).strip().lower() and kind in kinds]
    if not found:
        raise ScriptError(f"Script '{name}' not found", 422)
    title = found[0]
    rng = rng or random.Random()
    if title == xyz.TITLE:
        return xyz.plan(list(args), request, kind, choices=choices, rng=rng, max_megapixels=max_megapixels)
    if title == others.PROMPT_MATRIX:
        return others.plan_prompt_matrix(list(args), request, rng=rng)
    if title == others.PROMPTS_FROM_FILE:
        return others.plan_prompts_from_file(list(args), request, choices=choices, rng=rng)
    return others.plan_sd_upscale(list(args), request, upscale=upscale, choices=choices, rng=rng,
                                  max_megapixels=max_megapixels)


def run_script(name: str, args: list, request: dict, kind: str, generate: Callable,
               upscale: Optional[Callable] = None, *, choices: Optional[dict] = None,
               rng: Optional[random.Random] = None) -> Result:
    """Plan script `name` and run it with `generate`."""
    return run_plan(plan_script(name, args, request, kind, upscale=upscale, choices=choices, rng=rng), generate)


def run_plan(plan: Plan, generate: Callable) -> Result:
    """Generate the plan's requests in order and combine the results. After a result that says it was
    interrupted nothing more is generated (A1111 leaves the remaining grid cells blank)."""
    results = []
    for req in plan.requests:
        results.append(generate(req))
        if results[-1].interrupted:
            break
    out = plan.combine(results)
    out.warnings = [w for r in results for w in r.warnings]
    out.interrupted = len(results) < len(plan.requests) or any(r.interrupted for r in results)
    return out


def _arg(label, value, minimum=None, maximum=None, step=None, choices=None) -> dict:
    return {"label": label, "value": value, "minimum": minimum, "maximum": maximum, "step": step, "choices": choices}


def _args(title: str, kind: str, choices: dict) -> list:
    """A script's arguments as A1111's script-info lists them."""
    if title == xyz.TITLE:
        labels = [a.label for a in xyz.axes_for(kind)]
        out = []
        for axis, default in (("X", labels[1]), ("Y", labels[0]), ("Z", labels[0])):
            out += [_arg(f"{axis} type", default, choices=labels), _arg(f"{axis} values", ""),
                    _arg(f"{axis} values", None, choices=[])]
        checkboxes = ["Draw legend", "Include Sub Images", "Include Sub Grids", "Keep -1 for seeds",
                      "Vary seeds for X", "Vary seeds for Y", "Vary seeds for Z"]
        return out + [_arg(label, value) for label, value in zip(checkboxes, xyz.DEFAULT_ARGS[9:])] + [
            _arg("Grid margins (px)", 0, 0, 500, 2), _arg("Use text inputs instead of dropdowns", False)]
    if title == others.PROMPT_MATRIX:
        return [_arg("Put variable parts at start of prompt", False),
                _arg("Use different seed for each picture", False),
                _arg("Select prompt", "positive", choices=["positive", "negative"]),
                _arg("Select joining char", "comma", choices=["comma", "space"]),
                _arg("Grid margins (px)", 0, 0, 500, 2)]
    if title == others.PROMPTS_FROM_FILE:
        return [_arg("Iterate seed every line", False), _arg("Use same random seed for all lines", False),
                _arg("Insert prompts at the", "start", choices=["start", "end"]), _arg("List of prompt inputs", "")]
    upscalers = list(choices.get("upscalers") or ["None"])
    return [_arg(None, "<p style=\"margin-bottom:0.75em\">Will upscale the image by the selected scale factor; use "
                       "width and height sliders to set tile size</p>"),
            _arg("Tile overlap", 64, 0, 256, 16), _arg("Upscaler", upscalers[0], choices=upscalers),
            _arg("Scale Factor", 2.0, 1.0, 4.0, 0.05)]


def engine_choices(engine) -> dict:
    """The names a server's `engine` accepts, for checking script values before anything runs."""
    upscalers = engine.upscalers.names()
    return {"checkpoints": engine.library.checkpoint_titles(),
            "vaes": [v["model_name"] for v in engine.library.vae_api()], "upscalers": upscalers,
            "hr_upscalers": [*LATENT_UPSCALE_MODES, *upscalers]}


async def list_scripts(request):
    """Selectable scripts (lower-cased titles) per tab."""
    return JSONResponse({kind: [t.lower() for t, kinds in TITLES.items() if kind in kinds]
                         for kind in ("txt2img", "img2img")})


async def get_script_info(request):
    """Script arguments in A1111's shape: every script of the txt2img tab, then of the img2img tab."""
    engine = getattr(request.state, "engine", None)
    choices = engine_choices(engine) if engine is not None else {}
    return JSONResponse([{"name": title.lower(), "is_alwayson": False, "is_img2img": kind == "img2img",
                          "args": _args(title, kind, choices)}
                         for kind in ("txt2img", "img2img") for title, kinds in TITLES.items()
                         if kind in kinds])


#: Routes for the server's route list (they replace the empty `scripts` / `script-info` answers).
routes = [Route("/sdapi/v1/scripts", list_scripts, methods=["GET"]),
          Route("/sdapi/v1/script-info", get_script_info, methods=["GET"])]
