"""The request schema (sd15/schema.py): validate, resolve, and what is generated from it (model.txt2img's
signature, the CLI's options, the server's bodies); the job's fp32 VAE fallback leaves the model alone."""
import inspect
import types

import pytest
import torch
from PIL import Image

import sd15
from sd15 import schema
from sd15.pipeline import Job, decode_latents
from sd15.schema import GenerationRequest, RequestError, resolve, validate


def test_validate_lists_every_problem_with_its_field():
    with pytest.raises(RequestError) as e:
        validate(GenerationRequest(steps=0, width=4, cfg_scale=200.0, randn_source="XPU", emphasis="Loud"))
    names = [name for name, _, _ in e.value.problems]
    assert sorted(names) == ["cfg_scale", "emphasis", "randn_source", "steps", "width"]  # each once
    assert ("emphasis", "must be one of Original, No norm, Ignore, None", "value_error") in e.value.problems
    assert ("steps", "ensure this value is greater than or equal to 1", "value_error.number.not_ge") in e.value.problems
    assert isinstance(e.value, ValueError)  # the CLI's one-line exit 2


def test_validate_limits_and_hires_target():
    limits = schema.Limits(max_pixels=512 * 512, max_side=1024, max_steps=30)
    validate(GenerationRequest(steps=30), limits)
    with pytest.raises(RequestError, match="steps"):
        validate(GenerationRequest(steps=31), limits)
    with pytest.raises(RequestError, match="hr_resize_x: 1024x1024 is 1048576 pixels"):
        validate(GenerationRequest(steps=20, enable_hr=True, hr_scale=2.0), limits)
    validate(GenerationRequest(steps=20, enable_hr=True, hr_scale=2.0, init_images=[Image.new("RGB", (8, 8))]), limits)


def test_resolve_makes_every_choice_once():
    r = resolve(GenerationRequest(seed=10, subseed=3, batch_size=2, n_iter=2, sampler_name="DPM++ 2M SDE Karras"))
    assert r.seeds == [10, 11, 12, 13] and r.subseeds == [3, 4, 5, 6]
    assert (r.sampler.name, r.scheduler.label, r.strength, r.hires) == ("DPM++ 2M SDE", "Karras", None, None)
    r = resolve(GenerationRequest(enable_hr=True, width=96, height=64, hr_resize_x=200, hr_resize_y=120,
                                  hr_sampler_name="Use same sampler", hr_scheduler="exponential"))
    # cover 200x120 from 96x64 (ratio 1.5 < 1.667): 200 x 200*64//96 = 200x133, crop (133-120)//8 = 1 latent row
    assert (r.hires.width, r.hires.height, r.hires.truncate_x, r.hires.truncate_y) == (200, 133, 0, 1)
    assert (r.sampler.name, r.hires.sampler.name, r.hires.scheduler.label) == ("Euler", "Euler", "Exponential")
    assert r.strength == schema.DEFAULT_DENOISING_STRENGTH and r.hires.upscaler == "Latent"
    images = [Image.new("RGB", (8, 8))] * 3
    r = resolve(GenerationRequest(init_images=images, batch_size=1, denoising_strength=0.3, mask_blur=2))
    assert r.batch_size == 3 and r.strength == 0.3 and (r.mask_blur_x, r.mask_blur_y) == (2, 2)
    with pytest.raises(ValueError, match="could not find upscaler named Bogus"):
        resolve(GenerationRequest(enable_hr=True, hr_upscaler="Bogus"))


@pytest.mark.parametrize("request_kw, first, hires", [
    ({}, 0.0, 1.0),  # A1111's option defaults
    ({"eta_ddim": 0.3, "eta_ancestral": 0.6}, 0.3, 0.6),
    ({"eta_ddim": 0.3, "eta_ancestral": 0.6, "eta": 0.45}, 0.45, 0.45),  # the request's eta wins
])
def test_each_pass_takes_the_eta_of_its_samplers_kind(request_kw, first, hires):
    r = resolve(GenerationRequest(sampler_name="DDIM", enable_hr=True, hr_sampler_name="Euler a",
                                  **request_kw))
    assert (r.eta_of(r.sampler), r.eta_of(r.hires.sampler)) == (first, hires)
    with pytest.raises(RequestError) as e:
        validate(GenerationRequest(eta_ddim=-0.1, eta_ancestral=1000.5))
    assert [p[0] for p in e.value.problems] == ["eta_ddim", "eta_ancestral"]


def test_model_methods_show_the_schema_fields():
    t2i = inspect.signature(sd15.StableDiffusion.txt2img).parameters
    i2i = inspect.signature(sd15.StableDiffusion.img2img).parameters
    assert t2i["steps"].default == 50 and t2i["sampler_name"].default is None and "enable_hr" in t2i
    assert "init_images" not in t2i and "mask" not in t2i
    assert i2i["init_images"].default is inspect.Parameter.empty and "mask" in i2i and "enable_hr" not in i2i
    for name in ("prompt", "seed", "clip_skip", "randn_source", "denoising_strength", "eta_ddim",
                 "eta_ancestral", "emphasis"):
        assert name in t2i and name in i2i


def test_cli_options_come_from_the_schema():
    from sd15.__main__ import _parser

    args = _parser().parse_args(["txt2img", "--ckpt", "x"])
    for f in schema.fields_of("prompt", "seeds", "sampling", "size", "hires", "settings"):
        assert getattr(args, f.name) == f.default, f.name
    args = _parser().parse_args(["img2img", "--ckpt", "x", "--init", "a.png", "--sampler", "LCM",
                                 "--no-inpaint-full-res", "--denoising-strength", "0.4"])
    assert (args.sampler_name, args.inpaint_full_res, args.denoising_strength) == ("LCM", False, 0.4)


def test_fp32_vae_fallback_is_the_jobs_not_the_models():
    seen = []

    class HalfVAE(torch.nn.Module):  # NaN in half precision, like an overflowing fp16 VAE
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1, dtype=torch.float16))

        def decode(self, z):
            seen.append(next(model.vae.parameters()).dtype)  # the shared model's VAE, at every decode
            out = z.float().repeat_interleave(8, -1).repeat_interleave(8, -2)[:, :3]
            return out * float("nan") if self.w.dtype == torch.float16 else out

    model = types.SimpleNamespace(vae=HalfVAE(), device=torch.device("cpu"))
    job = Job(model, resolve(GenerationRequest()))
    x = decode_latents(model, torch.ones(1, 4, 2, 2), job)
    assert torch.isfinite(x).all() and x.shape == (1, 3, 16, 16)
    assert seen == [torch.float16, torch.float16] and model.vae.w.dtype == torch.float16
    assert job.vae_fp32() is job.vae_fp32()  # made once per job
