"""A1111's selectable scripts (server/scripts): X/Y/Z plot, prompt matrix, prompts from file, SD upscale.

A fake generator makes a deterministic image from the request dict, so these check the scripts' own work
(requests, order, grids, infotexts) fast; tests/test_scripts_server.py runs them through the real server.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.testclient import TestClient

from server import scripts
from sd15.upscale import combine_grid, split_grid
from server.scripts import ScriptError, grid, others, plan_script, run_script, xyz

# --------------------------------------------------------------------------------------------------
# a fake generator
# --------------------------------------------------------------------------------------------------


@dataclass
class FakeResult:
    images: list
    infotexts: list
    seeds: list
    info: dict
    subseeds: list = field(default_factory=list)
    prompts: list = field(default_factory=list)
    negative_prompts: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    interrupted: bool = False


def colour(req: dict, k: int = 0) -> tuple:
    key = json.dumps({k2: req.get(k2) for k2 in ("prompt", "negative_prompt", "seed", "subseed", "steps",
                                                   "cfg_scale", "sampler_name", "scheduler", "override_settings")},
                     sort_keys=True) + str(k)
    d = hashlib.sha256(key.encode()).digest()
    return d[0], d[1], d[2]


def fake_image(req: dict, k: int = 0) -> Image.Image:
    """A width x height image: a colour from the request, and a 4x4 checker so positions matter."""
    w, h = req.get("width", 512), req.get("height", 512)
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = colour(req, k)
    a[::4, ::4] = 255 - a[::4, ::4]
    return Image.fromarray(a)


def infotext_of(req: dict, seed: int) -> str:
    return f"{req.get('prompt', '')}\nSteps: {req.get('steps', 50)}, Seed: {seed}, Version: v1.10.1"


class FakeGenerator:
    """txt2img: one image per batch item with seeds seed + k; img2img: the init images back, inverted."""

    def __init__(self, interrupt_after=None):
        self.requests = []
        self.interrupt_after = interrupt_after

    def __call__(self, req: dict) -> FakeResult:
        self.requests.append(req)
        n = int(req.get("batch_size", 1)) * int(req.get("n_iter", 1))
        seed = req.get("seed", -1)
        seeds = [seed + k for k in range(n)]
        if req.get("init_images"):
            tiles = [Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB") for s in req["init_images"]]
            images = [Image.fromarray(255 - np.asarray(t)) for t in tiles]
        else:
            images = [fake_image(req, k) for k in range(n)]
        infotexts = [infotext_of(req, s) for s in seeds]
        info = {"prompt": req.get("prompt", ""), "all_prompts": [req.get("prompt", "")] * n, "seed": seeds[0],
                "all_seeds": seeds, "infotexts": infotexts, "index_of_first_image": 0, "extra_generation_params": {}}
        interrupted = self.interrupt_after is not None and len(self.requests) >= self.interrupt_after
        return FakeResult(images, infotexts, seeds, info, prompts=[req.get("prompt", "")] * n, interrupted=interrupted)


BASE = {"prompt": "a red cat", "negative_prompt": "blurry red", "seed": 100, "subseed": 7, "steps": 20,
        "cfg_scale": 7.0, "width": 32, "height": 24, "batch_size": 1, "n_iter": 1}
TXT = {a.label: i for i, a in enumerate(xyz.axes_for("txt2img"))}
IMG = {a.label: i for i, a in enumerate(xyz.axes_for("img2img"))}


def xyz_args(x=("Nothing", ""), y=("Nothing", ""), z=("Nothing", ""), legend=True, lone=False, sub=False,
             keep=False, margin=0, kind="txt2img"):
    idx = TXT if kind == "txt2img" else IMG
    return [idx[x[0]], x[1], [], idx[y[0]], y[1], [], idx[z[0]], z[1], [], legend, lone, sub, keep, False, False,
            False, margin, False]


def pixels(im):
    return np.asarray(im.convert("RGB"))


# --------------------------------------------------------------------------------------------------
# X/Y/Z plot: values
# --------------------------------------------------------------------------------------------------

def values(label, text):
    axis = next(a for a in xyz.AXES if a.label == label)
    return xyz.parse_values(axis, xyz.split_values(text))


def test_value_syntax_a1111_wiki_examples():
    # the examples of A1111's wiki page "Features", X/Y/Z plot
    assert values("Steps", "1-5") == [1, 2, 3, 4, 5]
    assert values("Steps", "1-5 (+2)") == [1, 3, 5]
    assert values("Steps", "10-5 (-3)") == [10, 7]
    assert values("CFG Scale", "1-3 (+0.5)") == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert values("Steps", "1-10 [5]") == [1, 3, 5, 7, 10]
    assert values("CFG Scale", "0.0-1.0 [6]") == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert values("Steps", "8, 12,  20-22, ,30") == [8, 12, 20, 21, 22, 30]
    assert values("Seed", "-1, 5") == [-1, 5]  # a lone negative number is a value, not a range
    assert values("Prompt S/R", 'cat, "dog, big", bird') == ["cat", "dog, big", "bird"]
    assert values("Prompt order", "a, b, c")[:2] == [["a", "b", "c"], ["a", "c", "b"]]
    assert len(values("Prompt order", "a, b, c")) == 6


@pytest.mark.parametrize("label,text,needle", [("Steps", "10, x", "'x' is not an integer"),
                                               ("CFG Scale", "7, high", "'high' is not a number"),
                                               ("Steps", "1.5", "not an integer")])
def test_bad_values_are_400_naming_the_axis(label, text, needle):
    with pytest.raises(ScriptError) as e:
        values(label, text)
    assert e.value.status == 400 and label in str(e.value) and needle in str(e.value)


# --------------------------------------------------------------------------------------------------
# X/Y/Z plot: cells, order, seeds
# --------------------------------------------------------------------------------------------------

def test_cells_are_row_by_row_with_each_value_applied():
    plan = plan_script("X/Y/Z PLOT", xyz_args(("Steps", "10,20,30"), ("CFG Scale", "5, 7.5")), BASE, "txt2img")
    got = [(r["steps"], r["cfg_scale"]) for r in plan.requests]
    assert got == [(10, 5.0), (20, 5.0), (30, 5.0), (10, 7.5), (20, 7.5), (30, 7.5)]
    assert all(r["script_name"] is None and r["script_args"] == [] for r in plan.requests)
    assert all(r["seed"] == 100 for r in plan.requests)


def test_old_eleven_argument_layout():
    # what client scripts written for A1111 before v1.3 (and webuiapi's README) send: no dropdown lists
    args = [TXT["Steps"], "10,20", TXT["CFG Scale"], "5,7", 0, "", "True", "False", "False", "False", 0]
    plan = plan_script("x/y/z plot", args, BASE, "txt2img")
    assert [(r["steps"], r["cfg_scale"]) for r in plan.requests] == [(10, 5.0), (20, 5.0), (10, 7.0), (20, 7.0)]
    res = run_script("x/y/z plot", args[:4], BASE, "txt2img", FakeGenerator())
    assert len(res.images) == 1 and res.images[0].width > 64 and res.images[0].height > 48  # with the legend


def test_costly_axis_is_the_outer_loop():
    # a checkpoint switch is slow: with Checkpoint name on X, X changes slowest
    choices = {"checkpoints": ["v1-5-pruned-emaonly.safetensors [6ce0161689]", "sub/other.safetensors"]}
    plan = plan_script("x/y/z plot", xyz_args(("Checkpoint name", "other, v1-5"), ("Steps", "1,2,3")), BASE,
                       "txt2img", choices=choices)
    got = [(r["override_settings"]["sd_model_checkpoint"], r["steps"]) for r in plan.requests]
    assert got == [("sub/other.safetensors", 1), ("sub/other.safetensors", 2), ("sub/other.safetensors", 3),
                   ("v1-5-pruned-emaonly.safetensors", 1), ("v1-5-pruned-emaonly.safetensors", 2),
                   ("v1-5-pruned-emaonly.safetensors", 3)]
    assert xyz.cell_order(0, 0, 1, 2, 1, 2) == [(0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1)]
    # the labels show the values as typed (the file name without its folder), the cells the matched names
    res = run_script("x/y/z plot", xyz_args(("Checkpoint name", "sub/other"), legend=True), BASE, "txt2img",
                     FakeGenerator(), choices=choices)
    cell = fake_image({**BASE, "override_settings": {"sd_model_checkpoint": "sub/other.safetensors"}})
    expected = grid.draw_grid_annotations(cell, 32, 24, [[grid.GridAnnotation("other")]], [[grid.GridAnnotation()]])
    assert np.array_equal(pixels(res.images[0]), pixels(expected))


def test_random_seeds_are_fixed_once_unless_keep_minus_one():
    req = {**BASE, "seed": -1, "subseed": -1}
    plan = plan_script("x/y/z plot", xyz_args(("Seed", "-1, 5, -1"), ("Steps", "1,2")), req, "txt2img",
                       rng=random.Random(3))
    seeds = [r["seed"] for r in plan.requests]
    r = random.Random(3)
    base_seed, base_sub = r.randrange(4294967294), r.randrange(4294967294)
    fixed = [r.randrange(4294967294), 5, r.randrange(4294967294)]
    assert seeds == fixed * 2 and fixed[0] != fixed[2]
    assert all(q["subseed"] == base_sub for q in plan.requests)
    plan = plan_script("x/y/z plot", xyz_args(("Steps", "1,2")), req, "txt2img", rng=random.Random(3))
    assert [q["seed"] for q in plan.requests] == [base_seed] * 2  # one random seed for every cell
    plan = plan_script("x/y/z plot", xyz_args(("Seed", "-1, 5"), keep=True), req, "txt2img")
    assert [q["seed"] for q in plan.requests] == [-1, 5]


def test_prompt_sr_first_value_is_the_search_term():
    plan = plan_script("x/y/z plot", xyz_args(("Prompt S/R", "red, blue, green")), BASE, "txt2img")
    assert [(r["prompt"], r["negative_prompt"]) for r in plan.requests] == [
        ("a red cat", "blurry red"), ("a blue cat", "blurry blue"), ("a green cat", "blurry green")]
    with pytest.raises(ScriptError) as e:
        plan_script("x/y/z plot", xyz_args(("Prompt S/R", "dog, bird")), BASE, "txt2img")
    assert e.value.status == 400 and "did not find dog" in str(e.value)


def test_other_axes_set_their_fields():
    req = dict(BASE)
    plan = plan_script("x/y/z plot", xyz_args(("Size", "64x32, 16 x 8"), ("Clip skip", "1,2")), req, "txt2img")
    assert [(r["width"], r["height"], r["override_settings"]["CLIP_stop_at_last_layers"]) for r in plan.requests] == [
        (64, 32, 1), (16, 8, 1), (64, 32, 2), (16, 8, 2)]
    choices = {"samplers": ["Euler a", "DPM++ 2M"], "sampler_aliases": {"k_euler_a": "Euler a"},
               "schedulers": ["karras", "Karras"]}
    plan = plan_script("x/y/z plot", xyz_args(("Sampler", "euler a, DPM++ 2M, K_Euler_A"), ("Schedule type", "Karras")),
                       req, "txt2img", choices=choices)
    got = [(r["sampler_name"], r["scheduler"]) for r in plan.requests]
    assert got == [("Euler a", "karras"), ("DPM++ 2M", "karras"), ("Euler a", "karras")]
    plan = plan_script("x/y/z plot", xyz_args(("Schedule rho", "3, 5"), ("Beta schedule alpha", "0.5")), req,
                       "txt2img")
    assert [(r["override_settings"]["rho"], r["override_settings"]["beta_dist_alpha"]) for r in plan.requests] == [
        (3.0, 0.5), (5.0, 0.5)]
    plan = plan_script("x/y/z plot", xyz_args(("Always discard next-to-last sigma", "True, False")), req, "txt2img")
    assert [r["override_settings"]["always_discard_next_to_last_sigma"] for r in plan.requests] == ["True", "False"]
    plan = plan_script("x/y/z plot", xyz_args(("Denoising", "0.25,0.5"), kind="img2img"), req, "img2img")
    assert [r["denoising_strength"] for r in plan.requests] == [0.25, 0.5]
    # an axis with choices reads the dropdown list (A1111's default, csv_mode off)
    args = xyz_args(("Sampler", "ignored")); args[2] = ["DPM++ 2M"]
    assert [r["sampler_name"] for r in plan_script("x/y/z plot", args, req, "txt2img").requests] == ["DPM++ 2M"]


def test_closest_checkpoint_as_a1111():
    titles = ["v1-5-pruned-emaonly.safetensors [6ce0161689]", "sub/other.safetensors [1234567890]",
              "sub/other-inpainting.safetensors [abcdef0123]"]
    assert xyz.closest_checkpoint("v1-5-pruned-emaonly", titles) == "v1-5-pruned-emaonly.safetensors"
    assert xyz.closest_checkpoint("other", titles) == "sub/other.safetensors"  # the shortest title containing it
    assert xyz.closest_checkpoint("inpainting", titles) == "sub/other-inpainting.safetensors"
    assert xyz.closest_checkpoint("other.safetensors [ffffffffff]", titles) == "sub/other.safetensors"
    assert xyz.closest_checkpoint("OTHER", titles) is None and xyz.closest_checkpoint("", titles) is None


def test_unsupported_or_unknown_axes_are_refused_by_name():
    for label in ("Styles", "Face restore", "Token merging ratio"):
        with pytest.raises(ScriptError) as e:
            plan_script("x/y/z plot", xyz_args((label, "1")), BASE, "txt2img")
        assert e.value.status == 400 and repr(label) in str(e.value) and "supported: Nothing, Seed" in str(e.value)
    with pytest.raises(ScriptError) as e:
        plan_script("x/y/z plot", [999, "1"], BASE, "txt2img")
    assert e.value.status == 422 and "X type 999 is out of range" in str(e.value)
    with pytest.raises(ScriptError) as e:
        plan_script("x/y/z plot", xyz_args(("Sampler", "Foo")), BASE, "txt2img", choices={"samplers": ["Euler"]})
    assert "unknown Sampler 'Foo'; valid: Euler" in str(e.value)
    with pytest.raises(ScriptError) as e:
        plan_script("no such script", [], BASE, "txt2img")
    assert e.value.status == 422 and str(e.value) == "Script 'no such script' not found"
    with pytest.raises(ScriptError):  # an img2img-only axis index on txt2img is another axis; by label it is refused
        plan_script("x/y/z plot", ["Denoising strength"], BASE, "txt2img")
    # indices count in the tab's own list, as A1111's dropdown does: Hires steps/sampler only on txt2img,
    # Image CFG Scale only on img2img
    assert (TXT["Steps"], TXT["CFG Scale"], TXT["Sampler"], TXT["Checkpoint name"]) == (4, 6, 9, 11)
    assert (IMG["Steps"], IMG["CFG Scale"], IMG["Sampler"], IMG["Checkpoint name"]) == (4, 5, 9, 10)
    assert len(TXT) == 42 and len(IMG) == 41 and TXT["Size"] == 41 and IMG["Size"] == 40


# --------------------------------------------------------------------------------------------------
# X/Y/Z plot: grids
# --------------------------------------------------------------------------------------------------

def cell_images(gen):
    return [fake_image(r) for r in gen.requests]


def test_grid_without_legend_is_the_cells_pixel_for_pixel():
    gen = FakeGenerator()
    res = run_script("x/y/z plot", xyz_args(("Steps", "1,2,3"), ("CFG Scale", "4,5"), legend=False), BASE,
                     "txt2img", gen)
    assert len(gen.requests) == 6 and len(res.images) == 1 and res.info["index_of_first_image"] == 1
    g0 = res.images[0]
    assert g0.size == (3 * 32, 2 * 24)
    cells = cell_images(gen)
    for k, req in enumerate(gen.requests):
        ix, iy = [1, 2, 3].index(req["steps"]), [4.0, 5.0].index(req["cfg_scale"])
        tile = g0.crop((ix * 32, iy * 24, ix * 32 + 32, iy * 24 + 24))
        assert np.array_equal(pixels(tile), pixels(cells[k]))


@pytest.mark.parametrize("margin", [0, 6])
def test_legend_adds_label_margins_and_keeps_the_cells(margin):
    gen = FakeGenerator()
    req = {**BASE, "width": 64, "height": 48}
    res = run_script("x/y/z plot", xyz_args(("Steps", "1,2,3"), ("CFG Scale", "4,5"), margin=margin, lone=True),
                     req, "txt2img", gen)
    g0 = res.images[0]
    pad_left = 64 * 3 // 4  # A1111: three quarters of a cell when there are row labels
    pad_top = g0.height - 2 * 48 - margin
    assert g0.width == pad_left + 3 * 64 + 2 * margin and pad_top > 0
    cells = cell_images(gen)
    assert len(res.images) == 1 + 6  # grid, then the sub images in grid order
    for k, req_k in enumerate(gen.requests):
        ix, iy = [1, 2, 3].index(req_k["steps"]), [4.0, 5.0].index(req_k["cfg_scale"])
        x, y = pad_left + ix * (64 + margin), pad_top + iy * (48 + margin)
        assert np.array_equal(pixels(g0.crop((x, y, x + 64, y + 48))), pixels(cells[k]))
        assert np.array_equal(pixels(res.images[1 + ix + 3 * iy]), pixels(cells[k]))
    top, left = pixels(g0)[:pad_top, pad_left:], pixels(g0)[pad_top:, :pad_left]
    assert (top < 128).any() and (left < 128).any()  # labels are drawn in both margins
    assert (pixels(g0)[:pad_top, :pad_left] == 255).all()  # the corner stays empty


def test_z_axis_makes_a_grid_per_value_and_a_super_grid():
    gen = FakeGenerator()
    res = run_script("x/y/z plot", xyz_args(("Steps", "1,2"), ("Nothing", ""), ("CFG Scale", "3,4,5"), legend=False,
                                            sub=True, lone=True), BASE, "txt2img", gen)
    assert len(gen.requests) == 6
    main, subs, lone = res.images[0], res.images[1:4], res.images[4:]
    assert [s.size for s in subs] == [(64, 24)] * 3 and main.size == (3 * 64, 24) and len(lone) == 6
    for iz, sub in enumerate(subs):
        assert np.array_equal(pixels(main.crop((iz * 64, 0, iz * 64 + 64, 24))), pixels(sub))
        cells = [fake_image(r) for r in gen.requests if r["cfg_scale"] == [3.0, 4.0, 5.0][iz]]
        assert np.array_equal(pixels(sub), np.concatenate([pixels(c) for c in cells], axis=1))
    # main grid + sub grids + cells; infotexts keep A1111's layout (grid ones carry the script's entries)
    assert len(res.infotexts) == 1 + 3 + 6
    assert "Z Type: CFG Scale" in res.infotexts[0] and "Z Type" not in res.infotexts[1]
    res = run_script("x/y/z plot", xyz_args(("Steps", "1,2"), ("Nothing", ""), ("CFG Scale", "3,4,5")), BASE,
                     "txt2img", FakeGenerator())
    assert len(res.images) == 1 and res.images[0].height > 24  # z labels on top


def test_grid_infotext_names_the_script_and_axes():
    res = run_script("x/y/z plot", xyz_args(("Seed", "1,2"), ("Steps", "10,20")), BASE, "txt2img", FakeGenerator())
    assert res.infotexts[0] == ('a red cat\nSteps: 10, Seed: 1, Script: X/Y/Z plot, X Type: Seed, X Values: "1,2", '
                                'Fixed X Values: "1, 2", Y Type: Steps, Y Values: "10,20", Version: v1.10.1')
    # A1111's lists: the grid's infotext leads, while all_seeds / all_prompts have no grid entry
    assert res.info["infotexts"] == res.infotexts and len(res.infotexts) == 5
    assert res.info["all_seeds"] == [1, 2, 1, 2] and res.infotexts[1] == infotext_of({**BASE, "steps": 10}, 1)


def test_interrupted_cells_are_blank():
    gen = FakeGenerator(interrupt_after=2)
    res = run_script("x/y/z plot", xyz_args(("Steps", "1,2,3"), legend=False, lone=True), BASE, "txt2img", gen)
    assert len(gen.requests) == 2 and res.interrupted and len(res.images) == 4
    assert (pixels(res.images[3]) == 0).all() and (pixels(res.images[0])[:, 64:] == 0).all()


# --------------------------------------------------------------------------------------------------
# Prompt matrix
# --------------------------------------------------------------------------------------------------

def test_prompt_matrix_prompts():
    assert others.matrix_prompts("a cat|red|big") == ["a cat", "a cat, red", "a cat, big", "a cat, red, big"]
    assert others.matrix_prompts("a cat| red,| big", put_at_start=True, delimiter=" ") == [
        "a cat", "red a cat", "big a cat", "red big a cat"]
    plan = plan_script("prompt matrix", [False, True, "negative", "space"], {**BASE, "negative_prompt": "x|y"},
                       "txt2img")
    assert [(r["negative_prompt"], r["seed"], r["subseed"]) for r in plan.requests] == [("x", 100, 7), ("x y", 101, 8)]
    with pytest.raises(ScriptError):
        plan_script("prompt matrix", [False, False, "neutral"], BASE, "txt2img")


def test_prompt_matrix_grid():
    gen = FakeGenerator()
    res = run_script("prompt matrix", [], {**BASE, "prompt": "a cat|red|big|old", "width": 64, "height": 48},
                     "txt2img", gen)
    assert [r["prompt"] for r in gen.requests][:3] == ["a cat", "a cat, red", "a cat, big"]
    assert len(gen.requests) == 8 and all(r["seed"] == 100 for r in gen.requests)
    assert len(res.images) == 9 and res.info["index_of_first_image"] == 1 and len(res.infotexts) == 9
    g0 = res.images[0]  # 3 parts: 4 columns (red, big), 2 rows (old), labels on top and left
    pad_left = 64 * 3 // 4
    pad_top = g0.height - 2 * 48
    assert g0.width == pad_left + 4 * 64 and pad_top > 0
    for i, im in enumerate(res.images[1:]):
        x, y = pad_left + (i % 4) * 64, pad_top + (i // 4) * 48
        assert np.array_equal(pixels(g0.crop((x, y, x + 64, y + 48))), pixels(im))
    assert res.info["prompt"] == "a cat|red|big|old" and res.info["all_prompts"][3] == "a cat, red, big"


# --------------------------------------------------------------------------------------------------
# Prompts from file or textbox
# --------------------------------------------------------------------------------------------------

def test_prompt_line_parser():
    line = '--prompt "a cat" on a mat --negative_prompt ugly --steps 12 --cfg_scale 6.5 --width 64 --tiling true'
    assert others.parse_prompt_line(line) == {"prompt": "a cat on a mat", "negative_prompt": "ugly", "steps": 12,
                                              "cfg_scale": 6.5, "width": 64, "tiling": True}
    assert others.parse_prompt_line("--restore_faces yes --seed -5") == {"restore_faces": False, "seed": -5}
    for bad, needle in [("--steps ten", "--steps: 'ten' is not an integer"),
                        ("--stepz 10", "unknown commandline option: --stepz"),
                        ("--steps", "missing argument for command line option --steps"),
                        ('--prompt "unclosed', "cannot split"),
                        ("--steps 10 extra", 'must start with "--": extra')]:
        with pytest.raises(ValueError, match=needle):
            others.parse_prompt_line(bad)


def test_prompts_from_file_requests():
    text = "a dog\n\n  --prompt tree --steps 5 --n_iter 2\n--negative_prompt grey --sd_model other\n"
    plan = plan_script("prompts from file or textbox", [True, False, "end", text], {**BASE, "batch_size": 2},
                       "txt2img", choices={"checkpoints": ["sub/other.safetensors [abc]"]})
    got = [(r["prompt"], r["negative_prompt"], r["steps"], r["seed"], r.get("n_iter")) for r in plan.requests]
    # iterate seed: each line starts batch_size x n_iter (of the request: 2 x 1) after the previous one
    assert got == [("a red cat a dog", "blurry red", 20, 100, 1), ("a red cat tree", "blurry red", 5, 102, 2),
                   ("a red cat", "blurry red grey", 20, 104, 1)]
    assert plan.requests[2]["override_settings"] == {"sd_model_checkpoint": "sub/other.safetensors"}
    plan = plan_script("prompts from file or textbox", [False, True, "start", "x\ny"], {**BASE, "seed": -1},
                       "txt2img", rng=random.Random(1))
    assert [r["prompt"] for r in plan.requests] == ["x a red cat", "y a red cat"]
    assert plan.requests[0]["seed"] == plan.requests[1]["seed"] == random.Random(1).randrange(4294967294)
    plan = plan_script("prompts from file or textbox", [False, False, "start", "x\ny"], {**BASE, "seed": -1}, "txt2img")
    assert [r["seed"] for r in plan.requests] == [-1, -1]  # each line draws its own


def test_prompts_from_file_errors_and_result():
    with pytest.raises(ScriptError) as e:
        plan_script("prompts from file or textbox", [False, False, "start", "ok\n--steps many"], BASE, "txt2img")
    assert e.value.status == 400 and "line 2 ('--steps many'): --steps: 'many' is not an integer" in str(e.value)
    with pytest.raises(ScriptError, match="empty"):
        plan_script("prompts from file or textbox", [False, False, "start", "  \n"], BASE, "txt2img")
    gen = FakeGenerator()
    res = run_script("prompts from file or textbox", [False, False, "start", "a\n--prompt b --batch_size 2"],
                     {**BASE, "prompt": ""}, "txt2img", gen)
    assert len(res.images) == 3 and res.info["all_prompts"] == ["a", "b", "b"] and res.info["index_of_first_image"] == 0
    assert res.infotexts[2].startswith("b\n") and res.seeds == [100, 100, 101]


# --------------------------------------------------------------------------------------------------
# SD upscale: split / combine, the script
# --------------------------------------------------------------------------------------------------

def random_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_split_grid_positions_and_identity():
    im = random_image(1024, 700)
    tiles = split_grid(im, 512, 512, 64)
    # cols = ceil((1024-64)/448) = 3, spread by (1024-512)/2 = 256; rows = ceil(636/448) = 2, second at 700-512
    assert [[x for x, _, _ in row] for _, _, row in tiles.tiles] == [[0, 256, 512]] * 2
    assert [y for y, _, _ in tiles.tiles] == [0, 188]
    assert np.array_equal(pixels(tiles.tiles[1][2][1][2]), pixels(im)[188:700, 256:768])
    assert np.array_equal(pixels(combine_grid(tiles)), pixels(im))
    for w, h, tw, th, ov in [(100, 60, 40, 30, 8), (64, 64, 64, 64, 16), (90, 70, 32, 32, 0)]:
        img = random_image(w, h, 1)
        assert np.array_equal(pixels(combine_grid(split_grid(img, tw, th, ov))), pixels(img))


def test_combine_grid_blends_the_overlap_with_a_linear_ramp():
    # 96x64 in 64x64 tiles with overlap 32: tiles at x=0 and x=32; left tile black, right tile 200
    tiles = split_grid(Image.new("RGB", (96, 64)), 64, 64, 32)
    assert [x for x, _, _ in tiles.tiles[0][2]] == [0, 32]
    tiles.replace([Image.new("RGB", (64, 64), (0, 0, 0)), Image.new("RGB", (64, 64), (200, 100, 50))])
    out = pixels(combine_grid(tiles)).astype(float)
    for j in range(32):  # the mask in column 32+j is uint8(j*255/32); the blend is the right tile's weight
        m = int(j * 255 / 32) / 255
        assert np.abs(out[:, 32 + j] - np.array([200, 100, 50]) * m).max() <= 1, j
    assert (out[:, :32] == 0).all() and (out[:, 64:] == [200, 100, 50]).all()
    # vertically: 64x96 in 64x64 tiles, the lower tile fades in over rows 32..63
    tiles = split_grid(Image.new("RGB", (64, 96)), 64, 64, 32)
    tiles.replace([Image.new("RGB", (64, 64), (255, 255, 255)), Image.new("RGB", (64, 64), (55, 55, 55))])
    col = pixels(combine_grid(tiles))[:, 5, 0].astype(float)
    expected = [255] * 32 + [255 + (55 - 255) * int(j * 255 / 32) / 255 for j in range(32)] + [55] * 32
    assert np.abs(col - expected).max() <= 1


def b64png(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_sd_upscale_script():
    init = random_image(40, 30, 2)
    calls = []

    def upscale(im, name, scale):
        calls.append((im.size, name, scale))
        return im.resize((int(im.width * scale), int(im.height * scale)), Image.NEAREST)

    gen = FakeGenerator()
    req = {**BASE, "init_images": [b64png(init)], "width": 32, "height": 32, "batch_size": 2, "n_iter": 2, "seed": 10}
    res = run_script("SD upscale", ["", 8, "Nearest", 2.0], req, "img2img", gen, upscale,
                     choices={"upscalers": ["None", "Lanczos", "Nearest"]})
    assert calls == [((40, 30), "Nearest", 2.0)]
    up = init.resize((80, 60), Image.NEAREST)
    tiles = split_grid(up, 32, 32, 8)  # 3 x 3 tiles, 2 per batch: 5 batches per upscale, 2 upscales
    assert len(tiles.images) == 9
    assert [(r["seed"], r["batch_size"]) for r in gen.requests] == [
        (10, 2), (11, 2), (12, 2), (13, 2), (14, 1), (11, 2), (12, 2), (13, 2), (14, 2), (15, 1)]
    sent = [Image.open(io.BytesIO(base64.b64decode(s))) for s in gen.requests[0]["init_images"]]
    assert np.array_equal(pixels(sent[1]), pixels(tiles.images[1]))
    # the fake img2img inverts its tiles, so each upscale is the upscaled image inverted
    assert len(res.images) == 2 and res.seeds == [10, 11]
    for im in res.images:
        assert np.array_equal(pixels(im), 255 - pixels(up))
    assert "SD upscale overlap: 8, SD upscale upscaler: Nearest, Version" in res.infotexts[0]
    res = run_script("sd upscale", ["", 8, 0, 1.0], req, "img2img", FakeGenerator(),
                     choices={"upscalers": ["None", "Lanczos"]})  # an index picks "None": no upscale
    assert res.images[0].size == (40, 30)
    for args, needle in [(["", 8, "ESRGAN_4x", 2], "unknown upscaler 'ESRGAN_4x'"), (["", 32, "None", 2], "overlap")]:
        with pytest.raises(ScriptError, match=needle):
            plan_script("sd upscale", args, req, "img2img", choices={"upscalers": ["None"]})
    with pytest.raises(ScriptError, match=r"too large \(4 megapixels; the limit is 3\)"):
        plan_script("sd upscale", ["", 8, "None", 2], {**req, "init_images": [b64png(random_image(1000, 1000))]},
                    "img2img", max_megapixels=3)
    with pytest.raises(ScriptError, match=r"grid would be too large \(1 megapixels; the limit is 1\)"):
        plan_script("x/y/z plot", xyz_args(("Steps", "1-4")), {**BASE, "width": 512, "height": 512}, "txt2img",
                    max_megapixels=1)
    with pytest.raises(ScriptError, match="too large"):
        plan_script("sd upscale", ["", 8, "None", 16], {**req, "init_images": [b64png(random_image(1000, 1000))]},
                    "img2img")
    with pytest.raises(ScriptError) as e:
        plan_script("sd upscale", [], BASE, "txt2img")
    assert e.value.status == 422


# --------------------------------------------------------------------------------------------------
# /sdapi/v1/scripts, /sdapi/v1/script-info
# --------------------------------------------------------------------------------------------------

def test_scripts_listing_routes():
    with TestClient(Starlette(routes=scripts.routes)) as c:
        assert c.get("/sdapi/v1/scripts").json() == {
            "txt2img": ["prompt matrix", "prompts from file or textbox", "x/y/z plot"],
            "img2img": ["prompt matrix", "prompts from file or textbox", "sd upscale", "x/y/z plot"]}
        info = c.get("/sdapi/v1/script-info").json()
    assert [(i["name"], i["is_img2img"]) for i in info] == [
        ("prompt matrix", False), ("prompts from file or textbox", False), ("x/y/z plot", False),
        ("prompt matrix", True), ("prompts from file or textbox", True), ("sd upscale", True), ("x/y/z plot", True)]
    for i in info:
        assert i["is_alwayson"] is False
        for a in i["args"]:
            assert set(a) == {"label", "value", "minimum", "maximum", "step", "choices"}
    x = next(i for i in info if i["name"] == "x/y/z plot" and not i["is_img2img"])
    assert len(x["args"]) == 18 and x["args"][0]["choices"][:3] == ["Nothing", "Seed", "Var. seed"]
    assert x["args"][0]["value"] == "Seed" and x["args"][16] == {"label": "Grid margins (px)", "value": 0, "minimum": 0,
                                                                 "maximum": 500, "step": 2, "choices": None}

