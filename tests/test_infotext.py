"""A1111 infotext and info JSON from a resolved request (sd15/a1111/infotext.py), the infotext parser, and the
sampler / scheduler tables and name resolution (sd15/samplers/table.py). Expected strings are A1111 v1.10's."""
import json
import random

import pytest

from PIL import Image

from sd15 import samplers
from sd15.a1111 import infotext as it
from sd15.a1111.infotext import format_hashes, info_json, parse_infotext, quote, unquote
from sd15.schema import GenerationRequest, fixed_seed, job_seeds, resolve

MODEL = dict(sd_model_name="v1-5-pruned-emaonly", sd_model_hash="6ce0161689")
IMAGE = Image.new("RGB", (8, 8))


class Job:
    """A resolved request with what the pipeline adds to its infotext (model entries, extras, mask use)."""

    def __init__(self, r, model, extra, has_mask):
        self.r, self.model, self.extra, self.has_mask = r, model, extra, has_mask

    def kw(self):
        return dict(model=self.model, extra=self.extra, has_mask=self.has_mask)


def job(prompt="a cat", negative_prompt="", *, is_img2img=False, has_mask=False, extra_generation_params=None,
        sd_vae_name=None, sd_vae_hash=None, **kw):
    kw.setdefault("seed", 123)
    kw.setdefault("subseed", 456)
    model = {**MODEL, **({"sd_vae_name": sd_vae_name, "sd_vae_hash": sd_vae_hash} if sd_vae_name else {})}
    if is_img2img:
        kw.update(init_images=[IMAGE], mask=IMAGE if has_mask else None)
    r = resolve(GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, **kw))
    return Job(r, model, extra_generation_params or {}, has_mask)


def create_infotext(p, index=0):
    return it.create_infotext(p.r, index, **p.kw())


def create_info(p, infotexts, **kw):
    return it.create_info(p.r, infotexts, **p.kw(), **kw)


def extra_generation_params(p):
    return create_info(p, [], job_timestamp="")["extra_generation_params"]


def resolve_sampler(name, scheduler=None):
    sampler, sched = samplers.resolve_sampler(name, scheduler)
    return sampler.name, sched.label


def schedule_type(p):
    recorded = samplers.recorded_schedule(p.r.sampler, p.r.scheduler)
    return recorded.label if recorded else p.r.scheduler.label


def params_line(params, index=0):
    return create_infotext(params, index).split("\n")[-1]


# =============================================================================================
# The spec's examples, reproduced exactly
# =============================================================================================

SPEC_INFO_A_CAT = {
    "prompt": "a cat", "all_prompts": ["a cat"], "negative_prompt": "", "all_negative_prompts": [""],
    "seed": 3170487337, "all_seeds": [3170487337], "subseed": 2091751405, "all_subseeds": [2091751405],
    "subseed_strength": 0, "width": 512, "height": 512, "sampler_name": "Euler", "cfg_scale": 7.0, "steps": 50,
    "batch_size": 1, "restore_faces": False, "face_restoration_model": None, "sd_model_name": "v1-5-pruned-emaonly",
    "sd_model_hash": "6ce0161689", "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
    "seed_resize_from_h": -1, "denoising_strength": None, "extra_generation_params": {}, "index_of_first_image": 0,
    "infotexts": ["a cat\nSteps: 50, Sampler: Euler, Schedule type: Automatic, CFG scale: 7.0, Seed: 3170487337, "
                  "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"],
    "styles": [], "job_timestamp": "20240801120000", "clip_skip": 1, "is_using_inpainting_conditioning": False,
    "version": "v1.10.1"}


def test_spec_info_example_minimal_txt2img():
    # {"prompt": "a cat"} with API defaults: Euler (sampler_index), 50 steps, cfg 7.0, no scheduler
    p = job("a cat", seed=3170487337, subseed=2091751405)
    infotexts = [create_infotext(p, 0)]
    info = create_info(p, infotexts, job_timestamp="20240801120000")
    assert info == SPEC_INFO_A_CAT
    assert list(info) == list(SPEC_INFO_A_CAT)
    assert info_json(info) == json.dumps(SPEC_INFO_A_CAT)
    assert info_json(info).startswith('{"prompt": "a cat", "all_prompts": ["a cat"], "negative_prompt": "", ')
    assert type(info["subseed_strength"]) is int and type(info["cfg_scale"]) is float


def test_spec_infotext_example_dpmpp_2m_karras():
    p = job("a cat", "blurry", steps=20, sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=7.0)
    assert create_infotext(p) == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 123, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")


def test_spec_quoted_examples():
    lora = format_hashes([("add_detail", "7c6bad76eb54"), ("foo", "0123456789ab")])
    ti = format_hashes([("easynegative", "c74b4e810b03")])
    p = job(steps=20, sampler_name="Euler", extra_generation_params={"Lora hashes": lora, "TI hashes": ti})
    line = params_line(p)
    assert 'Lora hashes: "add_detail: 7c6bad76eb54, foo: 0123456789ab"' in line
    assert 'TI hashes: "easynegative: c74b4e810b03"' in line
    assert line.endswith('Lora hashes: "add_detail: 7c6bad76eb54, foo: 0123456789ab", '
                         'TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1')


def test_spec_schedule_type_examples():
    # "Sampler: Euler, Schedule type: Automatic" / "Sampler: DPM++ 2M, Schedule type: Karras"
    assert "Sampler: Euler, Schedule type: Automatic, " in params_line(job(sampler_name="Euler"))
    assert "Sampler: DPM++ 2M, Schedule type: Karras, " in params_line(job(sampler_name="DPM++ 2M"))


SPEC_SAMPLERS = [
    ("DPM++ 2M", ["k_dpmpp_2m"], {"scheduler": "karras"}),
    ("DPM++ SDE", ["k_dpmpp_sde"], {"scheduler": "karras", "second_order": "True", "brownian_noise": "True"}),
    ("DPM++ 2M SDE", ["k_dpmpp_2m_sde"], {"scheduler": "exponential", "brownian_noise": "True"}),
    ("DPM++ 2M SDE Heun", ["k_dpmpp_2m_sde_heun"],
     {"scheduler": "exponential", "brownian_noise": "True", "solver_type": "heun"}),
    ("DPM++ 2S a", ["k_dpmpp_2s_a"], {"scheduler": "karras", "uses_ensd": "True", "second_order": "True"}),
    ("DPM++ 3M SDE", ["k_dpmpp_3m_sde"],
     {"scheduler": "exponential", "discard_next_to_last_sigma": "True", "brownian_noise": "True"}),
    ("Euler a", ["k_euler_a", "k_euler_ancestral"], {"uses_ensd": "True"}),
    ("Euler", ["k_euler"], {}),
    ("LMS", ["k_lms"], {}),
    ("Heun", ["k_heun"], {"second_order": "True"}),
    ("DPM2", ["k_dpm_2"], {"scheduler": "karras", "discard_next_to_last_sigma": "True", "second_order": "True"}),
    ("DPM2 a", ["k_dpm_2_a"], {"scheduler": "karras", "discard_next_to_last_sigma": "True", "uses_ensd": "True",
                               "second_order": "True"}),
    ("DPM fast", ["k_dpm_fast"], {"uses_ensd": "True"}),
    ("DPM adaptive", ["k_dpm_ad"], {"uses_ensd": "True"}),
    ("Restart", ["restart"], {"scheduler": "karras", "second_order": "True"}),
    ("DDIM", ["ddim"], {}),
    ("DDIM CFG++", ["ddim_cfgpp"], {}),
    ("PLMS", ["plms"], {}),
    ("UniPC", ["unipc"], {}),
    ("LCM", ["k_lcm"], {}),
]

SPEC_SCHEDULERS = [
    ("automatic", "Automatic", None, -1, False),
    ("uniform", "Uniform", None, -1, True),
    ("karras", "Karras", None, 7, False),
    ("exponential", "Exponential", None, -1, False),
    ("polyexponential", "Polyexponential", None, 1, False),
    ("sgm_uniform", "SGM Uniform", ["SGMUniform"], -1, True),
    ("kl_optimal", "KL Optimal", None, -1, False),
    ("align_your_steps", "Align Your Steps", None, -1, False),
    ("simple", "Simple", None, -1, True),
    ("normal", "Normal", None, -1, True),
    ("ddim", "DDIM", None, -1, True),
    ("beta", "Beta", None, -1, True),
]


def test_samplers_endpoint_table():
    expected = [{"name": n, "aliases": a, "options": o} for n, a, o in SPEC_SAMPLERS]
    assert samplers.samplers_api() == expected
    assert json.dumps(samplers.samplers_api()) == json.dumps(expected)  # option order too
    assert list(samplers.SAMPLERS) == [n for n, _, _ in SPEC_SAMPLERS]  # every listed sampler runs


def test_schedulers_endpoint_table():
    expected = [{"name": n, "label": lab, "aliases": al, "default_rho": float(rho), "need_inner_model": inner}
                for n, lab, al, rho, inner in SPEC_SCHEDULERS]
    got = samplers.schedulers_api()
    assert got == expected
    assert json.dumps(got) == json.dumps(expected)
    assert all(type(x["default_rho"]) is float for x in got)  # pydantic float: -1 -> -1.0


def test_sampler_flags_match_generation_spec():
    s = {x.name: x for x in samplers.SAMPLER_TABLE}
    assert {n for n in s if s[n].timesteps} == {"DDIM", "DDIM CFG++", "PLMS", "UniPC"}
    assert {n for n in s if s[n].uses_ensd} == {"Euler a", "DPM2 a", "DPM++ 2S a", "DPM fast", "DPM adaptive"}
    assert {n for n in s if s[n].second_order} == {"DPM++ SDE", "DPM++ 2S a", "Heun", "DPM2", "DPM2 a", "Restart"}
    defaults = {n: s[n].scheduler for n in s}
    assert defaults["DPM++ 2M"] == "Karras" and defaults["DPM++ 3M SDE"] == "Exponential"
    assert defaults["Euler"] is None and defaults["DDIM"] is None and defaults["Restart"] == "Karras"


# =============================================================================================
# Key order and omission rules
# =============================================================================================

def test_every_positional_key_in_order():
    p = job("p", "n", sampler_name="Euler a", scheduler="Karras", steps=20, cfg_scale=7.5, width=640, height=448,
            sd_vae_name="vae-ft-mse-840000-ema-pruned.safetensors", sd_vae_hash="735e4c3a44",
            subseed_strength=0.25, seed_resize_from_w=512, seed_resize_from_h=384,
            is_img2img=True, denoising_strength=0.5, clip_skip=2, eta_noise_seed_delta=31337,
            randn_source="CPU", eta=0.667, extra_generation_params={"Emphasis": "No norm"})
    assert params_line(p) == (
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 123, Size: 640x448, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
        "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Variation seed: 456, Variation seed strength: 0.25, "
        "Seed resize from: 512x384, Denoising strength: 0.5, Clip skip: 2, ENSD: 31337, RNG: CPU, "
        "Emphasis: No norm, Eta: 0.667, Version: v1.10.1")


def test_negative_prompt_line_only_when_non_empty():
    assert create_infotext(job("a", "")).split("\n")[:1] == ["a"]
    assert "Negative prompt" not in create_infotext(job("a", ""))
    assert create_infotext(job("a", "b")).split("\n")[1] == "Negative prompt: b"


def test_empty_prompt_makes_params_the_first_line():
    text = create_infotext(job("", ""))
    assert text.startswith("Steps: 50, Sampler: Euler")
    assert create_infotext(job("", "bad")).startswith("Negative prompt: bad\nSteps: 50")


def test_whole_text_is_stripped():
    assert create_infotext(job("  a cat  ")).startswith("a cat  \nSteps")


@pytest.mark.parametrize("clip_skip, shown", [(1, False), (0, False), (2, True), (12, True)])
def test_clip_skip_only_above_one(clip_skip, shown):
    assert (f"Clip skip: {clip_skip}" in params_line(job(clip_skip=clip_skip))) is shown


@pytest.mark.parametrize("sampler, eta, shown", [
    ("Euler a", None, True), ("DPM2 a", None, True), ("DPM++ 2S a", 1.0, True), ("DPM fast", None, True),
    ("DPM adaptive", None, True), ("Euler a", 0.0, False), ("Euler", None, False), ("DPM++ 2M", None, False),
    ("DDIM", None, False), ("DPM++ SDE", None, False)])
def test_ensd_only_for_samplers_using_it(sampler, eta, shown):
    line = params_line(job(sampler_name=sampler, eta=eta, eta_noise_seed_delta=31337))
    assert ("ENSD: 31337" in line) is shown
    assert "ENSD" not in params_line(job(sampler_name=sampler, eta=eta))


@pytest.mark.parametrize("source, text", [("GPU", None), ("CPU", "RNG: CPU"), ("NV", "RNG: NV")])
def test_rng_only_when_not_gpu(source, text):
    line = params_line(job(randn_source=source))
    assert ("RNG" in line) is (text is not None)
    if text:
        assert text in line


def test_variation_seed_per_image_and_only_with_strength():
    p = job(subseed_strength=0.5, batch_size=3, seed=10, subseed=20)
    assert p.r.seeds == [10, 10, 10] and p.r.subseeds == [20, 21, 22]
    for i in range(3):
        line = params_line(p, i)
        assert "Seed: 10, " in line and f"Variation seed: {20 + i}, Variation seed strength: 0.5" in line
    p = job(seed=10, subseed=20, batch_size=2, n_iter=2)
    assert [params_line(p, i).split("Seed: ")[1].split(",")[0] for i in range(4)] == ["10", "11", "12", "13"]
    assert "Variation" not in params_line(p, 1)
    assert "Variation" not in params_line(job(subseed_strength=0.0))


@pytest.mark.parametrize("w, h, shown", [(-1, -1, None), (0, 0, None), (512, 0, None), (0, 512, None),
                                         (512, 384, "Seed resize from: 512x384")])
def test_seed_resize_only_when_both_positive(w, h, shown):
    line = params_line(job(seed_resize_from_w=w, seed_resize_from_h=h))
    assert ("Seed resize from" in line) is (shown is not None)
    if shown:
        assert shown in line


def test_model_and_vae_entries():
    p = job(sd_vae_name="vae.pt", sd_vae_hash="0123456789")
    assert "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 0123456789, VAE: vae.pt, " in params_line(p)
    p = job()
    p.model = {"sd_model_name": "v1-5-pruned-emaonly"}  # no hash given: none written (the library hashes nothing)
    assert "Model hash" not in params_line(p) and "Model: v1-5-pruned-emaonly" in params_line(p)
    assert "VAE" not in params_line(job())


def test_denoising_strength_not_written_for_plain_txt2img():
    # webuiapi sends denoising_strength 0.7 on every txt2img call: not echoed without hires
    p = job(denoising_strength=0.7)
    assert "Denoising" not in params_line(p)
    info = create_info(p, [create_infotext(p)], job_timestamp="x")
    assert info["denoising_strength"] is None and info["extra_generation_params"] == {}  # null since A1111 v1.7


def test_cfg_scale_number_formatting():
    assert "CFG scale: 7.0, " in params_line(job(cfg_scale=7.0))   # API (float field)
    assert "CFG scale: 7, " in params_line(job(cfg_scale=7))       # UI-style int
    assert "CFG scale: 4.5, " in params_line(job(cfg_scale=4.5))


# =============================================================================================
# Schedule type
# =============================================================================================

@pytest.mark.parametrize("sampler, scheduler, shown, recorded", [
    ("Euler", None, "Automatic", None),
    ("Euler", "Automatic", "Automatic", None),
    ("Euler", "automatic", "Automatic", None),
    ("Euler a", "Karras", "Karras", "Karras"),
    ("Euler", "uniform", "Uniform", "Uniform"),
    ("LMS", "SGMUniform", "SGM Uniform", "SGM Uniform"),
    ("DPM++ 2M", None, "Karras", "Karras"),
    ("DPM++ 2M", "Exponential", "Exponential", "Exponential"),
    ("DPM++ SDE", None, "Karras", "Karras"),
    ("DPM++ 2M SDE", None, "Exponential", "Exponential"),
    ("DPM++ 3M SDE", "Automatic", "Exponential", "Exponential"),
    ("DPM2 a", None, "Karras", "Karras"),
    ("Restart", None, "Karras", "Karras"),
    ("DPM fast", None, "Automatic", None),
    ("LCM", None, "Automatic", None),
    ("DDIM", None, "Automatic", None),
    ("DDIM", "Karras", "Karras", None),       # timestep samplers ignore it but the request's label is printed
    ("UniPC", "beta", "Beta", None),
    ("DPM++ 2M Karras", None, "Karras", "Karras"),
    ("LMS Karras", None, "Karras", "Karras"),
    ("DPM++ 2M SDE Exponential", None, "Exponential", "Exponential"),
])
def test_schedule_type_shown_and_recorded(sampler, scheduler, shown, recorded):
    p = job(sampler_name=sampler, scheduler=scheduler)
    assert f", Schedule type: {shown}, CFG scale" in params_line(p)
    assert schedule_type(p) == shown
    assert extra_generation_params(p).get("Schedule type") == recorded


def test_old_combined_name_is_split_in_params():
    p = job(sampler_name="DPM++ 2M SDE Karras")
    assert (p.r.sampler.name, p.r.scheduler.label) == ("DPM++ 2M SDE", "Karras")
    assert "Sampler: DPM++ 2M SDE, Schedule type: Karras, " in params_line(p)


# =============================================================================================
# Hires fix
# =============================================================================================

def hires(**kw):
    base = dict(steps=20, sampler_name="DPM++ 2M", enable_hr=True, denoising_strength=0.7, hr_upscaler="Latent")
    base.update(kw)
    return job("a cat", "blurry", **base)


def test_hires_basic_exact():
    assert params_line(hires()) == (
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 123, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Hires upscale: 2.0, "
        "Hires upscaler: Latent, Version: v1.10.1")


def test_hires_full_exact():
    p = hires(sampler_name="Euler", hr_scale=1.5, hr_second_pass_steps=10, hr_upscaler="Lanczos",
              hr_sampler_name="DPM++ 2M", hr_scheduler=None,
              hr_prompt="a dog, sharp", hr_negative_prompt="ugly", clip_skip=2,
              extra_generation_params={"Lora hashes": "x: 0123456789ab"})
    assert params_line(p) == (
        "Steps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7.0, Seed: 123, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Clip skip: 2, "
        "Hires sampler: DPM++ 2M, Hires prompt: \"a dog, sharp\", "
        "Hires negative prompt: ugly, "
        "Hires schedule type: Karras, Hires upscale: 1.5, Hires steps: 10, Hires upscaler: Lanczos, "
        "Lora hashes: \"x: 0123456789ab\", Version: v1.10.1")
    assert extra_generation_params(p) == {
        "Denoising strength": 0.7, "Hires sampler": "DPM++ 2M",
        "Hires prompt": None, "Hires negative prompt": None, "Hires schedule type": "Karras", "Hires upscale": 1.5,
        "Hires steps": 10, "Hires upscaler": "Lanczos", "Lora hashes": "x: 0123456789ab"}


def test_hires_info_extra_params_order_and_nulls():
    p = hires()
    assert list(extra_generation_params(p).items()) == [
        ("Denoising strength", 0.7), ("Hires prompt", None), ("Hires negative prompt", None),
        ("Hires schedule type", None), ("Hires upscale", 2.0), ("Hires upscaler", "Latent"),
        ("Schedule type", "Karras")]
    info = json.loads(info_json(create_info(p, [create_infotext(p)], job_timestamp="t")))
    assert info["extra_generation_params"]["Hires prompt"] is None
    assert info["denoising_strength"] == 0.7


def test_hires_resize_instead_of_upscale():
    line = params_line(hires(hr_resize_x=1024, hr_resize_y=0))
    assert "Hires resize: 1024x0, " in line and "Hires upscale:" not in line


def test_hires_upscaler_default_written_and_steps_zero_omitted():
    line = params_line(hires(hr_upscaler=None, hr_second_pass_steps=0))
    assert "Hires steps" not in line and "Hires upscale: 2.0, Hires upscaler: Latent, Version" in line


def test_hires_sampler_same_as_first_or_use_same_is_omitted():
    for name in ("DPM++ 2M", "Use same sampler", None, ""):
        assert "Hires sampler" not in params_line(hires(hr_sampler_name=name))
    assert "Hires sampler: Euler a" in params_line(hires(hr_sampler_name="k_euler_a"))


def test_hires_prompts_only_when_different():
    line = params_line(hires(hr_prompt="a cat", hr_negative_prompt="blurry"))
    assert "Hires prompt" not in line and "Hires negative prompt" not in line
    line = params_line(hires(hr_prompt="a cat, 4k"))
    assert 'Hires prompt: "a cat, 4k", Hires upscale' in line and "Hires negative prompt" not in line
    line = params_line(hires(hr_negative_prompt="blurry\nugly"))
    assert 'Hires negative prompt: "blurry\\nugly"' in line


@pytest.mark.parametrize("first, hr_sampler, hr_sched, shown", [
    ("DPM++ 2M", None, None, None),                  # same schedule in both passes
    ("DPM++ 2M", "Euler a", None, None),             # Euler a's Automatic: the model's schedule, not recorded
    ("DPM++ 2M", "DPM++ 2M SDE", None, "Exponential"),
    ("DPM++ 2M", None, "Exponential", "Exponential"),
    ("DPM++ 2M", None, "karras", None),
    ("Euler", None, "Karras", "Karras"),             # first pass recorded nothing
    ("Euler", "DDIM", "Karras", None),               # timestep sampler records nothing
    ("DDIM", "Euler", "Uniform", "Uniform"),
    ("Euler", None, "Use same scheduler", None),
])
def test_hires_schedule_type(first, hr_sampler, hr_sched, shown):
    p = hires(sampler_name=first, hr_sampler_name=hr_sampler, hr_scheduler=hr_sched)
    line = params_line(p)
    if shown is None:
        assert "Hires schedule type" not in line
    else:
        assert f"Hires schedule type: {shown}, " in line
    assert extra_generation_params(p)["Hires schedule type"] == shown


def test_hires_denoising_default():
    line = params_line(hires(denoising_strength=None))
    assert "Denoising strength: 0.75, " in line and "Hires upscale: 2.0" in line


# =============================================================================================
# img2img
# =============================================================================================

def test_img2img_plain():
    p = job("a cat", is_img2img=True, denoising_strength=0.75, steps=20, sampler_name="Euler a", cfg_scale=7.0)
    assert params_line(p) == (
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 123, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Version: v1.10.1")
    info = create_info(p, [create_infotext(p)], job_timestamp="t")
    assert info["denoising_strength"] == 0.75 and info["extra_generation_params"] == {"Denoising strength": 0.75}


def test_img2img_inpaint_api_defaults():
    # API defaults: mask_blur 4, inpainting_fill 0, inpaint_full_res true, padding 0
    p = job(is_img2img=True, denoising_strength=0.75, steps=20, has_mask=True)
    assert params_line(p).endswith(
        "Denoising strength: 0.75, Mask blur: 4, Inpaint area: Only masked, Masked area padding: 0, "
        "Masked content: fill, Version: v1.10.1")


@pytest.mark.parametrize("kw, fragment, absent", [
    (dict(inpainting_mask_invert=1), "Denoising strength: 0.75, Mask mode: Inpaint not masked, Mask blur: 4", ()),
    (dict(mask_blur_x=4, mask_blur_y=8), None, ("Mask blur",)),
    (dict(mask_blur_x=0, mask_blur_y=0), None, ("Mask blur",)),
    (dict(inpainting_fill=1), None, ("Masked content",)),
    (dict(inpainting_fill=2), "Masked content: latent noise", ()),
    (dict(inpainting_fill=3), "Masked content: latent nothing", ()),
    (dict(inpaint_full_res=False, inpaint_full_res_padding=32), None, ("Inpaint area", "Masked area padding")),
])
def test_img2img_mask_entries(kw, fragment, absent):
    line = params_line(job(is_img2img=True, denoising_strength=0.75, has_mask=True, **kw))
    if fragment:
        assert fragment in line
    for key in absent:
        assert key not in line


def test_img2img_noise_multiplier_and_eta_order():
    p = job(is_img2img=True, denoising_strength=0.5, initial_noise_multiplier=0.9, sampler_name="DPM++ 2M SDE",
            eta=0.8, extra_generation_params={"Lora hashes": "a: 0123456789ab"})
    assert list(extra_generation_params(p)) == ["Denoising strength", "Lora hashes", "Noise multiplier",
                                                "Schedule type", "Eta"]
    assert params_line(p).endswith('Denoising strength: 0.5, Lora hashes: "a: 0123456789ab", Noise multiplier: 0.9, '
                                   'Eta: 0.8, Version: v1.10.1')
    assert "Noise multiplier" not in params_line(job(is_img2img=True, denoising_strength=0.5,
                                                     initial_noise_multiplier=1.0))
    assert "Noise multiplier" not in params_line(job(initial_noise_multiplier=0.9))  # txt2img: not used


def test_ngms_follows_the_first_pass_schedule_and_eta():
    """A1111's CFG denoiser adds "NGMS" at the first step that skips the uncond: after the entries added at
    init (hires), the caller's (networks, emphasis) and the first pass's schedule and eta; before a hires
    sampler's own eta."""
    extra = {"Lora hashes": "a: 0123456789ab", "Emphasis": "No norm", "NGMS": 2.0}
    p = hires(sampler_name="Euler a", scheduler="Karras", hr_scale=1.5, eta=0.8, eta_noise_seed_delta=31337,
              hr_sampler_name="DDIM", eta_ddim=0.3, extra_generation_params=extra)
    assert params_line(p) == (
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.0, Seed: 123, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, ENSD: 31337, "
        "Hires sampler: DDIM, Hires upscale: 1.5, Hires upscaler: Latent, "
        'Lora hashes: "a: 0123456789ab", Emphasis: No norm, Eta: 0.8, NGMS: 2.0, Eta DDIM: 0.8, '
        "Version: v1.10.1")
    assert list(extra_generation_params(p))[-4:] == ["Schedule type", "Eta", "NGMS", "Eta DDIM"]
    p = job(is_img2img=True, denoising_strength=0.5, initial_noise_multiplier=0.9, extra_generation_params=extra)
    assert params_line(p).endswith('Denoising strength: 0.5, Lora hashes: "a: 0123456789ab", Emphasis: No norm, '
                                   "Noise multiplier: 0.9, NGMS: 2.0, Version: v1.10.1")


def test_schedule_and_cfg_skip_entries_in_a1111s_order():
    """A1111's `get_sigmas` / `get_timesteps` add "Discard penultimate sigma", the schedule type, the σ, ρ and
    Beta options of each pass as it starts; its CFG denoiser "Skip Early CFG" and "NGMS" at their first skip.
    A timestep first pass records no schedule: the hires pass's entries come after its eta and the skips."""
    extra = {"Emphasis": "No norm", "Skip Early CFG": 0.3, "NGMS": 2.0, "NGMS all steps": True}
    p = hires(sampler_name="DDIM", eta_ddim=0.2, hr_sampler_name="Euler", hr_scheduler="Beta", hr_scale=1.5,
              always_discard_next_to_last_sigma=True, sigma_min=0.1, sigma_max=10.0, rho=3.0,
              beta_dist_alpha=0.5, extra_generation_params=extra)
    assert params_line(p) == (
        "Steps: 20, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7.0, Seed: 123, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Hires sampler: Euler, "
        "Hires schedule type: Beta, Hires upscale: 1.5, Hires upscaler: Latent, Emphasis: No norm, "
        "Discard penultimate sigma: True, Eta DDIM: 0.2, Skip Early CFG: 0.3, NGMS: 2.0, NGMS all steps: True, "
        "Schedule min sigma: 0.1, Schedule max sigma: 10.0, Beta schedule alpha: 0.5, Beta schedule beta: 0.6, "
        "Version: v1.10.1")
    p = job(sampler_name="DPM2", scheduler="Karras", always_discard_next_to_last_sigma=True, rho=7.0,
            sigma_max=10.0)  # DPM2 discards on its own; Karras's own ρ
    assert params_line(p).endswith("Model: v1-5-pruned-emaonly, Schedule max sigma: 10.0, Version: v1.10.1")
    p = job(sampler_name="Euler", scheduler="Polyexponential", rho=7.0)
    assert params_line(p).endswith("Model: v1-5-pruned-emaonly, Schedule rho: 7.0, Version: v1.10.1")


def test_no_mask_entries_without_mask():
    line = params_line(job(is_img2img=True, denoising_strength=0.75, inpainting_mask_invert=1))
    assert "Mask" not in line and "Inpaint" not in line


# =============================================================================================
# Eta
# =============================================================================================

@pytest.mark.parametrize("sampler, eta, entry", [
    ("Euler a", None, None), ("Euler a", 1.0, None), ("Euler a", 0.5, "Eta: 0.5"), ("Euler a", 0, "Eta: 0"),
    ("DPM++ SDE", 0.3, "Eta: 0.3"), ("DPM++ 2M SDE Heun", 0.0, "Eta: 0.0"), ("DPM fast", 0.2, "Eta: 0.2"),
    ("Euler", 0.5, None), ("DPM++ 2M", 0.5, None), ("Restart", 0.5, None), ("LCM", 0.5, None),
    ("DDIM", None, None), ("DDIM", 0.0, None), ("DDIM", 1.0, "Eta DDIM: 1.0"), ("DDIM CFG++", 0.5, "Eta DDIM: 0.5"),
    ("PLMS", 1.0, None), ("UniPC", 1.0, None)])
def test_eta_entries(sampler, eta, entry):
    line = params_line(job(sampler_name=sampler, eta=eta))
    if entry is None:
        assert "Eta" not in line
    else:
        assert f", {entry}, Version" in line


def test_hires_sampler_eta_recorded():
    p = hires(sampler_name="Euler", hr_sampler_name="Euler a", eta=0.5)
    assert list(extra_generation_params(p))[-1] == "Eta"


@pytest.mark.parametrize("sampler, options, entry", [
    ("Euler a", {"eta_ancestral": 0.6}, "Eta: 0.6"), ("Euler a", {"eta_ddim": 0.3}, None),
    ("DDIM", {"eta_ddim": 0.3}, "Eta DDIM: 0.3"), ("DDIM", {"eta_ancestral": 0.6}, None),
    ("UniPC", {"eta_ddim": 0.3}, None), ("Euler", {"eta_ancestral": 0.6}, None)])
def test_eta_options_entries(sampler, options, entry):
    line = params_line(job(sampler_name=sampler, **options))
    if entry is None:
        assert "Eta" not in line
    else:
        assert f", {entry}, Version" in line


def test_hires_passes_record_their_own_eta_option():
    """A1111: each pass's sampler takes the option of its kind and writes its own entry (`Eta DDIM` while
    the first pass samples, `Eta` while the hires pass does)."""
    p = hires(sampler_name="DDIM", hr_sampler_name="Euler a", eta_ddim=0.3, eta_ancestral=0.6)
    assert params_line(p) == (
        "Steps: 20, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7.0, Seed: 123, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, "
        "Hires sampler: Euler a, Hires upscale: 2.0, Hires upscaler: Latent, Eta DDIM: 0.3, Eta: 0.6, "
        "Version: v1.10.1")


def test_ensd_follows_the_eta_option():
    line = params_line(job(sampler_name="Euler a", eta_ancestral=0.0, eta_noise_seed_delta=31337))
    assert "ENSD" not in line and "Eta: 0.0" in line


@pytest.mark.parametrize("first, hr_sampler, shown", [
    ("Euler a", "DDIM", False),     # Euler a uses ENSD, but the hires sampler's eta (DDIM: 0) is the one read
    ("Euler a", "Euler", True),     # Euler has no eta option: A1111's eta_ancestral (1) is read
    ("Euler a", "Euler a", True), ("DDIM", "Euler a", False)])  # DDIM never uses ENSD
def test_ensd_reads_the_eta_of_the_last_pass(first, hr_sampler, shown):
    """A1111's `is_sampler_using_eta_noise_seed_delta` takes `uses_ensd` from the first pass's sampler and the
    eta from `p.sampler`, which after a hires pass is the hires sampler."""
    line = params_line(hires(sampler_name=first, hr_sampler_name=hr_sampler, eta_noise_seed_delta=31337))
    assert ("ENSD: 31337" in line) is shown


# =============================================================================================
# Quoting
# =============================================================================================

@pytest.mark.parametrize("value, written", [
    ("plain", "plain"), ("a, b", '"a, b"'), ("a: b", '"a: b"'), ("a\nb", '"a\\nb"'), ('say "hi"', 'say "hi"'),
    ('say, "hi"', '"say, \\"hi\\""'), ("日本, 語", '"日本, 語"'), ("tab\there", "tab\there"),
    (7.0, "7.0"), (20, "20"), (True, "True")])
def test_quote(value, written):
    assert str(quote(value)) == written
    if isinstance(value, str) and written.startswith('"'):
        assert unquote(written) == value


def test_unquote_leaves_non_json_alone():
    assert unquote('"not \\json"') == '"not \\json"'
    assert unquote('x"') == 'x"' and unquote("") == ""


def test_bare_key_when_value_equals_key_and_none_omitted():
    line = params_line(job(extra_generation_params={"Tiled Diffusion": "Tiled Diffusion", "Skip": None}))
    assert ", Tiled Diffusion, Version" in line and "Skip" not in line


def test_format_hashes_strips_separators_from_names():
    assert format_hashes([("a:b,c", "0123456789ab")]) == "abc: 0123456789ab"


# =============================================================================================
# Round trips create -> parse
# =============================================================================================

ROUND_TRIP_PROMPTS = [
    ("a cat", ""),
    ("", ""),
    ("", "lowres"),
    ("masterpiece, best quality, 1girl, (smile:1.2), [blue|red] hair", "lowres, bad anatomy, (worst quality:1.4)"),
    ('a sign saying "hello, world": neon', 'text, "watermark"'),
    ("line one,\nline two: with colon\nline three", "neg one\nneg two, more"),
    ("日本語のプロンプト, 猫 🐱, café", "ぼやけた, ugly"),
    ("word " * 300 + "end", "bad, " * 80 + "worse"),
    ("Steps: 20, Sampler: x, not params", "neg"),
    ("a <lora:add_detail:0.8> cat BREAK a dog", ""),
]


@pytest.mark.parametrize("prompt, negative", ROUND_TRIP_PROMPTS)
@pytest.mark.parametrize("variant", ["txt2img", "img2img", "hires", "variation", "everything"])
def test_round_trip(prompt, negative, variant):
    kw = dict(steps=25, sampler_name="Euler a", cfg_scale=6.5, width=640, height=448)
    if variant == "img2img":
        kw.update(is_img2img=True, denoising_strength=0.6, has_mask=True, inpainting_fill=2, mask_blur_x=8,
                  mask_blur_y=8, inpaint_full_res_padding=16)
    elif variant == "hires":
        kw.update(enable_hr=True, denoising_strength=0.45, hr_scale=1.5, hr_upscaler="Latent (bicubic)",
                  hr_second_pass_steps=12, hr_sampler_name="DPM++ 2M", hr_scheduler="Exponential",
                  hr_prompt=prompt + ", extra detail", hr_negative_prompt="bad\nworse")
    elif variant == "variation":
        kw.update(subseed_strength=0.35, seed_resize_from_w=512, seed_resize_from_h=512)
    elif variant == "everything":
        kw.update(sampler_name="DPM++ 2M SDE Karras", clip_skip=2, eta_noise_seed_delta=31337, randn_source="NV",
                  sd_vae_name="vae-ft-mse-840000-ema-pruned.safetensors", sd_vae_hash="735e4c3a44",
                  eta=0.9, extra_generation_params={
                      "Lora hashes": format_hashes([("add_detail", "7c6bad76eb54")]),
                      "TI hashes": format_hashes([("easynegative", "c74b4e810b03"), ("x", "0123456789ab")])})
    p = job(prompt, negative, seed=3000000000, subseed=42, **kw)
    text = create_infotext(p)
    d = parse_infotext(text)
    assert d["Prompt"] == prompt
    assert d["Negative prompt"] == negative
    assert d["Steps"] == "25" and d["CFG scale"] == "6.5" and d["Seed"] == "3000000000"
    assert (d["Size-1"], d["Size-2"]) == ("640", "448")
    assert d["Model hash"] == "6ce0161689" and d["Model"] == "v1-5-pruned-emaonly" and d["Version"] == "v1.10.1"
    assert (d["Sampler"], d["Schedule type"]) == (p.r.sampler.name, schedule_type(p))
    assert it.request_from_infotext(d)["sampler_name"] == p.r.sampler.name
    if variant == "img2img":
        assert d["Denoising strength"] == "0.6" and d["Mask blur"] == "8"
        assert d["Masked content"] == "latent noise" and d["Inpaint area"] == "Only masked"
        assert d["Masked area padding"] == "16"
    if variant == "hires":
        assert d["Denoising strength"] == "0.45" and d["Hires upscale"] == "1.5" and d["Hires steps"] == "12"
        assert d["Hires upscaler"] == "Latent (bicubic)" and d["Hires sampler"] == "DPM++ 2M"
        assert d["Hires schedule type"] == "Exponential"
        assert d["Hires prompt"] == prompt + ", extra detail" and d["Hires negative prompt"] == "bad\nworse"
        request = it.request_from_infotext(d)
        assert (request["hr_sampler_name"], request["hr_scheduler"]) == ("DPM++ 2M", "exponential")
    if variant == "variation":
        assert d["Variation seed"] == "42" and d["Variation seed strength"] == "0.35"
        assert (d["Seed resize from-1"], d["Seed resize from-2"]) == ("512", "512")
    if variant == "everything":
        assert d["Clip skip"] == "2" and d["RNG"] == "NV" and d["Eta"] == "0.9"
        assert d["VAE"] == "vae-ft-mse-840000-ema-pruned.safetensors" and d["VAE hash"] == "735e4c3a44"
        assert d["Lora hashes"] == "add_detail: 7c6bad76eb54"
        assert d["TI hashes"] == "easynegative: c74b4e810b03, x: 0123456789ab"
        assert "ENSD" not in d  # DPM++ 2M SDE does not use ENSD
    else:
        assert d["Clip skip"] == "1" and d["RNG"] == "GPU"


def test_round_trip_ensd_and_every_sampler():
    for s in samplers.SAMPLERS:
        p = job("x, y", "z", sampler_name=s, eta_noise_seed_delta=31337)
        d = parse_infotext(create_infotext(p))
        assert d["Sampler"] == s
        assert ("ENSD" in d) is samplers.find_sampler(s).uses_ensd
        assert it.request_from_infotext(d)["sampler_name"] == s


# =============================================================================================
# Parsing rules
# =============================================================================================

PARSE_DEFAULTS = {
    "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler", "Hires checkpoint": "Use same checkpoint", "Hires prompt": "",
    "Hires negative prompt": "", "Mask mode": "Inpaint masked", "Masked content": "original",
    "Inpaint area": "Whole picture", "Masked area padding": 32, "RNG": "GPU", "Schedule type": "Automatic",
    "Schedule max sigma": 0, "Schedule min sigma": 0, "Schedule rho": 0, "VAE Encoder": "Full",
    "VAE Decoder": "Full", "FP8 weight": "Disable", "Refiner switch by sampling steps": False}


def test_parse_empty_gives_defaults():
    d = parse_infotext("")
    assert d == {"Prompt": "", "Negative prompt": "", **PARSE_DEFAULTS}
    assert list(d) == ["Prompt", "Negative prompt", *PARSE_DEFAULTS]


def test_parse_spec_example_exact_dict():
    text = ("a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, "
            "Seed: 123, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")
    d = parse_infotext(text)
    expected = {"Steps": "20", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7.0", "Seed": "123",
                "Size-1": "512", "Size-2": "512", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly",
                "Version": "v1.10.1", "Prompt": "a cat", "Negative prompt": "blurry"}
    expected.update({k: v for k, v in PARSE_DEFAULTS.items() if k not in expected})
    assert d == expected
    assert list(d)[:12] == list(expected)[:12]


def test_parse_needs_three_pairs_on_last_line():
    d = parse_infotext("a cat\nSteps: 20, Sampler: Euler")
    assert d["Prompt"] == "a cat\nSteps: 20, Sampler: Euler" and "Steps" not in d
    d = parse_infotext("Steps: 20, Sampler: Euler, Seed: 1")
    assert d["Prompt"] == "" and d["Steps"] == "20"


def test_parse_multiline_prompts_are_line_stripped():
    d = parse_infotext("  first  \n second\nNegative prompt:   neg a \n neg b\nSteps: 1, Sampler: Euler, Seed: 2")
    assert d["Prompt"] == "first\nsecond" and d["Negative prompt"] == "neg a\nneg b"


def test_parse_quoted_values_and_size_split():
    d = parse_infotext('p\nSteps: 1, Seed: 2, Hires prompt: "a, \\"b\\"\\nc", Hires resize: 1024x768, '
                       'Seed resize from: 320x256, Lora hashes: "a: 1, b: 2", Odd: 12x, Size: "640x480"')
    assert d["Hires prompt"] == 'a, "b"\nc' and d["Lora hashes"] == "a: 1, b: 2"
    assert (d["Hires resize-1"], d["Hires resize-2"]) == ("1024", "768")
    assert (d["Seed resize from-1"], d["Seed resize from-2"]) == ("320", "256")
    assert d["Odd"] == "12x" and (d["Size-1"], d["Size-2"]) == ("640", "480")


def test_parse_key_rules():
    d = parse_infotext("p\nSteps: 1, A: single, Key-with/slash and space: v, Empty: , Seed: 3")
    assert d["Key-with/slash and space"] == "v" and d["Seed"] == "3"
    assert "A" not in d and "Empty" not in d  # a one-character key does not match; an empty value is skipped


def test_parse_hires_prompt_equal_to_prompt_becomes_empty():
    d = parse_infotext("a cat\nSteps: 1, Seed: 2, Hires prompt: a cat, Version: v1.10.1")
    assert d["Hires prompt"] == "" and d["Hires negative prompt"] == ""
    d = parse_infotext("a cat\nSteps: 1, Seed: 2, Hires prompt: a dog, Version: v1.10.1")
    assert d["Hires prompt"] == "a dog"


def test_parse_emphasis_default_only_with_emphasis():
    assert parse_infotext("a (cat:1.2)\nSteps: 1, Seed: 2, Sampler: Euler")["Emphasis"] == "Original"
    assert parse_infotext("a cat\nNegative prompt: [ugly]\nSteps: 1, Seed: 2, Sampler: Euler")["Emphasis"] == "Original"
    assert "Emphasis" not in parse_infotext("a cat BREAK dog\nSteps: 1, Seed: 2, Sampler: Euler")
    assert "Emphasis" not in parse_infotext("a (cat:1.0) \\(x\\)\nSteps: 1, Seed: 2, Sampler: Euler")
    assert parse_infotext("a (cat)\nSteps: 1, Seed: 2, Emphasis: No norm")["Emphasis"] == "No norm"


def test_parse_old_first_pass_size_and_hypernet():
    d = parse_infotext("p\nSteps: 1, Size: 1024x768, First pass size: 0x0, Hypernet: anime, Hypernet strength: 0.5")
    assert (d["Size-1"], d["Size-2"]) == (640, 448) and (d["Hires resize-1"], d["Hires resize-2"]) == (1024, 768)
    assert d["Prompt"] == "p<hypernet:anime:0.5>"
    d = parse_infotext("p\nSteps: 1, Size: 1024x1024, First pass size: 512x512, Seed: 1")
    assert (d["Size-1"], d["Size-2"], d["Hires resize-1"], d["Hires resize-2"]) == (512, 512, 1024, 1024)


def test_parse_fp8_cache_default_and_skip_fields():
    d = parse_infotext("p\nSteps: 1, Seed: 1, FP8 weight: Enable")
    assert d["Cache FP16 weight for LoRA"] is False
    d = parse_infotext("p\nSteps: 1, Seed: 1, Model hash: abc", skip_fields=["Model hash", "Seed"])
    assert "Model hash" not in d and "Seed" not in d and d["Steps"] == "1"


# What a bare infotext ("p" and three keys) restores: parse_infotext's defaults, then the schema's
BARE_REQUEST = {
    "prompt": "p", "negative_prompt": "", "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "DPM++ 2M", "scheduler": "automatic",
    "steps": 50, "cfg_scale": 7.0, "tiling": False, "width": 512, "height": 512,
    "denoising_strength": None, "mask_blur": None, "inpainting_fill": 1, "inpaint_full_res": False,
    "inpaint_full_res_padding": 32, "inpainting_mask_invert": 0, "enable_hr": False, "hr_scale": 2.0,
    "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "",
    "randn_source": "GPU", "eta_noise_seed_delta": 0, "clip_skip": 1, "eta_ddim": 0.0, "eta_ancestral": 1.0,
    "emphasis": "Original", "s_min_uncond": None, "sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0,
    "beta_dist_alpha": 0.6, "beta_dist_beta": 0.6, "always_discard_next_to_last_sigma": False,
    "skip_early_cond": 0.0, "s_min_uncond_all": False}

PASTED = [  # (infotext as A1111 wrote it, the request fields A1111's paste gives)
    ("p\nModel: x, Model hash: 0123456789, Version: v1.10.1", {}),
    # txt2img with hires (v1.10): the strength is the hires pass's
    ("masterpiece, a castle\nNegative prompt: lowres, bad anatomy\nSteps: 20, Sampler: DPM++ 2M, "
     "Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, Model hash: 6ce0161689, "
     "Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Clip skip: 2, Hires upscale: 2, Hires steps: 10, "
     "Hires upscaler: R-ESRGAN 4x+, Version: v1.10.1",
     {"prompt": "masterpiece, a castle", "negative_prompt": "lowres, bad anatomy", "steps": 20,
      "scheduler": "karras", "seed": 1234567890, "height": 768, "denoising_strength": 0.5, "clip_skip": 2,
      "enable_hr": True, "hr_second_pass_steps": 10, "hr_upscaler": "R-ESRGAN 4x+"}),
    # img2img inpainting (v1.10)
    ("a cat on a sofa\nNegative prompt: blurry\nSteps: 30, Sampler: Euler a, Schedule type: Automatic, "
     "CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
     "Denoising strength: 0.75, Mask blur: 8, Inpaint area: Only masked, Masked area padding: 16, "
     "Masked content: latent noise, Mask mode: Inpaint not masked, RNG: CPU, Version: v1.10.1",
     {"prompt": "a cat on a sofa", "negative_prompt": "blurry", "steps": 30, "sampler_name": "Euler a",
      "cfg_scale": 7.5, "seed": 42, "denoising_strength": 0.75, "mask_blur": 8, "inpaint_full_res": True,
      "inpaint_full_res_padding": 16, "inpainting_fill": 2, "inpainting_mask_invert": 1,
      "randn_source": "CPU"}),
    # old combined sampler names (v1.5), a variation seed, ENSD; hires by its resize, with an old
    # combined name
    ("a photo of an astronaut\nSteps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6, Seed: 3456, Size: 640x448, "
     "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Variation seed: 99, Variation seed strength: 0.3, "
     "Seed resize from: 512x384, Denoising strength: 0.55, ENSD: 31337, Hires resize: 1280x896, "
     "Hires sampler: DPM++ SDE Exponential, Hires prompt: \"a photo, detailed\", Eta: 0.9, Tiling: True, "
     "Version: v1.5.1",
     {"prompt": "a photo of an astronaut", "steps": 28, "scheduler": "karras", "cfg_scale": 6.0, "seed": 3456,
      "width": 640, "height": 448, "subseed": 99, "subseed_strength": 0.3, "seed_resize_from_w": 512,
      "seed_resize_from_h": 384, "denoising_strength": 0.55, "eta_noise_seed_delta": 31337, "enable_hr": True,
      "hr_resize_x": 1280, "hr_resize_y": 896, "hr_sampler_name": "DPM++ SDE", "hr_scheduler": "exponential",
      "hr_prompt": "a photo, detailed", "eta_ancestral": 0.9, "tiling": True}),
    # a strength without hires keys is img2img's; an unknown sampler is A1111's first; bad numbers keep
    # their defaults
    ("p\nSteps: many, Sampler: Euler Dy, Schedule type: Weird, Seed: 7, Denoising strength: 0.3, "
     "Hires prompt: q, Hires schedule type: Beta",
     {"seed": 7, "denoising_strength": 0.3, "hr_prompt": "q", "hr_scheduler": "beta"}),
    ("p\nSteps: 9, Sampler: euler a, Schedule type: sgmuniform, Seed: 8",
     {"steps": 9, "sampler_name": "Euler a", "scheduler": "sgm_uniform", "seed": 8}),
    # A1111's sd_hijack_clip writes the emphasis mode when it is not "Original"
    ("a (cat:1.2)\nSteps: 9, Sampler: Euler, Seed: 8, Emphasis: No norm, Version: v1.10.1",
     {"prompt": "a (cat:1.2)", "steps": 9, "sampler_name": "Euler", "seed": 8, "emphasis": "No norm"}),
    # the schedule and CFG-skip options by their options' infotext keys; A1111 writes "Beta schedule beta"
    # but pastes only its option's "Beta scheduler beta"
    ("p\nSteps: 9, Sampler: Euler, Schedule type: Beta, Seed: 8, Discard penultimate sigma: True, "
     "Schedule min sigma: 0.1, Schedule max sigma: 10.0, Schedule rho: 5.0, Beta scheduler alpha: 0.5, "
     "Beta schedule beta: 0.4, Skip Early CFG: 0.2, NGMS: 1.5, NGMS all steps: True, Version: v1.10.1",
     {"steps": 9, "sampler_name": "Euler", "scheduler": "beta", "seed": 8,
      "always_discard_next_to_last_sigma": True, "sigma_min": 0.1, "sigma_max": 10.0, "rho": 5.0,
      "beta_dist_alpha": 0.5, "skip_early_cond": 0.2, "s_min_uncond": 1.5, "s_min_uncond_all": True}),
]


@pytest.mark.parametrize("text, changed", PASTED,
                         ids=["bare", "hires", "inpaint", "old-names", "odd", "lenient", "emphasis", "schedule"])
def test_request_from_infotext(text, changed):
    assert set(changed) <= set(BARE_REQUEST)
    request = it.request_from_infotext(parse_infotext(text))
    assert request == {**BARE_REQUEST, **changed}
    GenerationRequest(**request)  # every key is a schema field


def test_request_from_infotext_named_only():
    """A1111's `infotext` request field: the fields the infotext names (a parser fill-in such as "Inpaint
    area: Whole picture" is not named), and those A1111's paste functions always set."""
    always = {"sampler_name": "DPM++ 2M", "scheduler": "automatic", "hr_sampler_name": None,
              "hr_scheduler": None, "enable_hr": False}
    assert it.request_from_infotext(parse_infotext(PASTED[0][0]), named_only=True) == {
        "prompt": "p", "negative_prompt": "", **always}
    assert it.request_from_infotext(parse_infotext(PASTED[2][0]), named_only=True) == {
        **always, "prompt": "a cat on a sofa", "negative_prompt": "blurry", "seed": 42,
        "sampler_name": "Euler a", "steps": 30, "cfg_scale": 7.5, "width": 512, "height": 512,
        "denoising_strength": 0.75, "mask_blur": 8, "randn_source": "CPU", "inpainting_fill": 2,
        "inpaint_full_res": True, "inpaint_full_res_padding": 16, "inpainting_mask_invert": 1}


# =============================================================================================
# Sampler / scheduler name resolution
# =============================================================================================

@pytest.mark.parametrize("name", [n for n, _, _ in SPEC_SAMPLERS])
def test_resolve_every_name_and_alias(name):
    aliases = next(a for n, a, _ in SPEC_SAMPLERS if n == name)
    assert resolve_sampler(name) == (name, "Automatic")
    for alias in aliases:
        assert resolve_sampler(alias) == (name, "Automatic")
        assert resolve_sampler(alias.upper())[0] == name
    assert resolve_sampler(name.lower())[0] == name
    assert resolve_sampler(name.upper())[0] == name


@pytest.mark.parametrize("sampler", [n for n, _, _ in SPEC_SAMPLERS])
@pytest.mark.parametrize("sched", [s for s in SPEC_SCHEDULERS if s[0] != "automatic"], ids=lambda s: s[0])
def test_resolve_every_combined_name(sampler, sched):
    name, label, aliases, _, _ = sched
    for suffix in (label, name, *(aliases or ())):
        assert resolve_sampler(f"{sampler} {suffix}") == (sampler, label)


@pytest.mark.parametrize("old, expected", [
    ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")), ("DPM++ SDE Karras", ("DPM++ SDE", "Karras")),
    ("DPM++ 2M SDE Karras", ("DPM++ 2M SDE", "Karras")), ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "Exponential")),
    ("DPM++ 2M SDE Heun Karras", ("DPM++ 2M SDE Heun", "Karras")),
    ("DPM++ 2M SDE Heun Exponential", ("DPM++ 2M SDE Heun", "Exponential")),
    ("DPM++ 3M SDE Karras", ("DPM++ 3M SDE", "Karras")), ("DPM++ 3M SDE Exponential", ("DPM++ 3M SDE", "Exponential")),
    ("DPM++ 2S a Karras", ("DPM++ 2S a", "Karras")), ("DPM2 Karras", ("DPM2", "Karras")),
    ("DPM2 a Karras", ("DPM2 a", "Karras")), ("LMS Karras", ("LMS", "Karras")),
    ("dpm++ 2m karras", ("DPM++ 2M", "Karras")), ("DPM++ 2M KARRAS", ("DPM++ 2M", "Karras")),
    ("Euler a SGMUniform", ("Euler a", "SGM Uniform")), ("Euler SGM Uniform", ("Euler", "SGM Uniform")),
    ("euler a sgm_uniform", ("Euler a", "SGM Uniform")),
])
def test_resolve_old_combined_names(old, expected):
    assert resolve_sampler(old) == expected


@pytest.mark.parametrize("sched, label", [(None, "Automatic"), ("", "Automatic"), ("automatic", "Automatic"),
                                          ("Automatic", "Automatic"), ("karras", "Karras"), ("Karras", "Karras"),
                                          ("KARRAS", "Karras"), ("sgm_uniform", "SGM Uniform"),
                                          ("SGMUniform", "SGM Uniform"), ("align_your_steps", "Align Your Steps"),
                                          ("KL Optimal", "KL Optimal"), ("beta", "Beta")])
def test_resolve_scheduler_names(sched, label):
    assert resolve_sampler("Euler", sched) == ("Euler", label)


def test_explicit_scheduler_wins_over_suffix():
    assert resolve_sampler("DPM++ 2M Karras", "Exponential") == ("DPM++ 2M", "Exponential")
    assert resolve_sampler("DPM++ 2M Karras", "automatic") == ("DPM++ 2M", "Automatic")
    assert resolve_sampler("DPM++ 2M Karras", None) == ("DPM++ 2M", "Karras")


def test_resolve_defaults_and_fallbacks():
    # an empty sampler is A1111's API default ("Euler", its sampler_index); pasting falls back like A1111's UI
    assert resolve_sampler(None) == ("Euler", "Automatic") == resolve_sampler("")
    assert samplers.DEFAULT_SAMPLER == "Euler" and GenerationRequest().sampler_name is None
    pasted = it.request_from_infotext({"Sampler": "No such sampler"})
    assert (pasted["sampler_name"], pasted["scheduler"]) == ("DPM++ 2M", "automatic")
    pasted = it.request_from_infotext({"Sampler": "Euler", "Schedule type": "nonsense"})
    assert (pasted["sampler_name"], pasted["scheduler"]) == ("Euler", "automatic")
    assert resolve_sampler("Euler Karras Uniform") == ("Euler", "Karras")  # A1111 cuts each suffix once, in order


@pytest.mark.parametrize("bad", ["Euler b", "DPM++ 4M", "k_euler_x", "Karras", "Foo Karras", " "])
def test_resolve_unknown_sampler_lists_valid_ones(bad):
    with pytest.raises(ValueError) as e:
        resolve_sampler(bad)
    msg = str(e.value)
    assert repr(bad) in msg or repr(bad.strip()) in msg
    for n, _, _ in SPEC_SAMPLERS:
        assert n in msg


def test_resolve_unknown_scheduler_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        resolve_sampler("Euler", "Karas")
    msg = str(e.value)
    assert "'Karas'" in msg
    for name, label, *_ in SPEC_SCHEDULERS:
        assert name in msg and label in msg


# =============================================================================================
# Seeds, info
# =============================================================================================

def test_fixed_seed_and_job_seeds():
    rng = random.Random(5)
    expected = random.Random(5).randrange(4294967294)
    assert fixed_seed(-1, rng) == expected
    assert 0 <= fixed_seed(None) <= 4294967293 and 0 <= fixed_seed("") <= 4294967293
    assert 0 <= fixed_seed("abc") <= 4294967293
    assert fixed_seed("42") == 42 and fixed_seed(7) == 7 and fixed_seed(2 ** 40) == 2 ** 40
    assert job_seeds(10, 20, 0, 3) == ([10, 11, 12], [20, 21, 22])
    assert job_seeds(10, 20, 0.3, 3) == ([10, 10, 10], [20, 21, 22])
    assert it.job_timestamp(__import__("datetime").datetime(2024, 8, 1, 12, 0, 0)) == "20240801120000"


def test_info_batch_grid_and_unicode():
    p = job("猫, cute", "bad", batch_size=2, n_iter=2, seed=5, subseed=9, clip_skip=2,
            sampler_name="DPM++ 2M", steps=20)
    texts = [create_infotext(p, i) for i in range(4)]
    info = create_info(p, [create_infotext(p, 0)] + texts, job_timestamp="20240101000000", index_of_first_image=1)
    assert info["all_seeds"] == [5, 6, 7, 8] and info["all_subseeds"] == [9, 10, 11, 12]
    assert info["seed"] == 5 and info["subseed"] == 9 and info["batch_size"] == 2
    assert info["infotexts"][0] == info["infotexts"][1] and len(info["infotexts"]) == 5
    assert info["styles"] == [] and info["clip_skip"] == 2 and info["index_of_first_image"] == 1
    assert info["extra_generation_params"] == {"Schedule type": "Karras"}
    s = info_json(info)
    assert "\\u732b, cute" in s and json.loads(s) == info
    assert "Seed: 8," in texts[3]


def test_info_json_nulls_unserialisable_values():
    assert info_json({"a": object(), "b": [1, 2]}) == '{"a": null, "b": [1, 2]}'


def test_request_is_frozen_and_replace():
    q = GenerationRequest()
    with pytest.raises(Exception):
        q.steps = 3
    r = q.replace(steps=3, sampler_name="k_dpmpp_2m")
    assert r.steps == 3 and q.steps == 50 and resolve(r).sampler.name == "DPM++ 2M"
