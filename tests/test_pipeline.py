"""txt2img / img2img end to end: equality with A1111's flow composed from reference parts (transformers CLIP,
k-diffusion samplers and CompVisDenoiser, diffusers UNet and VAE), seeds and batches, infotexts, img2img,
inpainting, hires fix, hooks, interrupt."""
import os
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sd15
import _kdiff
from reference import diffusers_unet, diffusers_vae, transformers_clip
from sd15.a1111 import infotext
from sd15 import hashing
from sd15.attention import attention_math, use_attention_backend
from sd15.a1111.conditioning import encode_texts
from sd15.pipeline import JobState, generate
from sd15.schema import EMPHASIS_MODES
from sd15.schema import GenerationRequest as Params

SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return sd15.load(tiny_ckpt, device="cpu", dtype=torch.float32)


def pixels(result):
    return np.stack([np.asarray(im) for im in result.images]).astype(np.int16)


# --- A1111's flow from reference parts ----------------------------------------------------------

def reference_txt2img(ckpt_path, tokenizer, prompt, negative, *, seed, steps, cfg_scale, sampler, width, height, cfgs):
    """A1111 txt2img for one image with the CPU noise source, built only from reference implementations."""
    K, why = _kdiff.load()
    if K is None:
        pytest.skip(why)
    sd = load_file(ckpt_path)
    unet, vae, clip = diffusers_unet(sd, cfgs[0]), diffusers_vae(sd, cfgs[1]), transformers_clip(sd, cfgs[2])

    class LDMWrapper(torch.nn.Module):  # what k-diffusion's CompVisDenoiser expects of an LDM model
        def __init__(self):
            super().__init__()
            self.register_buffer("alphas_cumprod", sd["alphas_cumprod"].float())

        def apply_model(self, x, t, cond):
            return unet(x, t, encoder_hidden_states=cond).sample

    denoiser = K.external.CompVisDenoiser(LDMWrapper(), quantize=False)
    cond = clip(input_ids=tokenizer.tokenize([prompt])).last_hidden_state  # all weights 1: no emphasis change
    uncond = clip(input_ids=tokenizer.tokenize([negative])).last_hidden_state

    def cfg_model(x, sigma):
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        c, u = out.chunk(2)
        return u + (c - u) * cfg_scale

    if sampler == "Euler":
        sigmas, fn = denoiser.get_sigmas(steps), K.sampling.sample_euler
    else:  # "DPM++ 2M" with its default Karras schedule
        sigmas = K.sampling.get_sigmas_karras(steps, denoiser.sigmas[0].item(), denoiser.sigmas[-1].item())
        fn = K.sampling.sample_dpmpp_2m
    noise = torch.randn((1, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(seed))
    latent = fn(cfg_model, noise * sigmas[0], sigmas, disable=True)
    img = vae.decode(latent / 0.18215).sample
    return (torch.clamp((img + 1) / 2, 0, 1) * 255).to(torch.uint8)[0].permute(1, 2, 0).numpy().astype(np.int16)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_txt2img_equals_a1111_flow_from_reference_parts(model, tiny_ckpt, sampler):
    kw = dict(seed=1234, steps=6, cfg_scale=7.5, **SIZE)
    ours = generate(model, Params(prompt="a photo of a cat", negative_prompt="blurry", sampler_name=sampler,
                                  randn_source="CPU", **kw))
    cfgs = (model.unet.cfg, model.vae.cfg, model.text_encoder.cfg)
    with torch.no_grad():
        ref = reference_txt2img(tiny_ckpt, model.tokenizer, "a photo of a cat", "blurry", sampler=sampler, cfgs=cfgs, **kw)
    diff = np.abs(pixels(ours)[0] - ref)
    assert ref.std() > 5  # the image is not flat, so the comparison means something
    assert diff.max() <= 3, diff.max()


@pytest.mark.fullsize
def test_txt2img_full_size_equals_reference(full_ckpt):
    m = sd15.load(full_ckpt, device="cpu", dtype=torch.float32)
    kw = dict(seed=7, steps=3, cfg_scale=7.0, width=256, height=256)
    ours = generate(m, Params(prompt="an astronaut riding a horse", sampler_name="DPM++ 2M Karras",
                              randn_source="CPU", **kw))
    cfgs = (m.unet.cfg, m.vae.cfg, m.text_encoder.cfg)
    with torch.no_grad():
        ref = reference_txt2img(full_ckpt, m.tokenizer, "an astronaut riding a horse", "", sampler="DPM++ 2M",
                                cfgs=cfgs, **kw)
    assert np.abs(pixels(ours)[0] - ref).max() <= 3


# --- seeds, batches ------------------------------------------------------------------------------

def test_seeds_and_batches(model):
    base = dict(prompt="a cat", steps=3, sampler_name="Euler a", **SIZE)
    a = generate(model, Params(seed=10, **base))
    b = generate(model, Params(seed=10, **base))
    c = generate(model, Params(seed=11, **base))
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))
    batch = generate(model, Params(seed=10, batch_size=2, n_iter=2, **base))
    assert batch.seeds == [10, 11, 12, 13] and batch.subseeds[:2] == [batch.subseeds[0], batch.subseeds[0] + 1]
    # Image k of a batch = a single image with seed + k. Not bit for bit: CPU convolutions pick other
    # summation orders for other batch sizes, which moves a few pixels by one level.
    single13 = generate(model, Params(seed=13, **base))
    for k, single in ((0, a), (1, c), (3, single13)):
        assert np.abs(pixels(batch)[k] - pixels(single)[0]).max() <= 1
        assert (pixels(batch)[k] != pixels(single)[0]).mean() < 0.01
    assert np.abs(pixels(batch)[0] - pixels(c)[0]).max() > 10  # while other seeds differ a lot
    assert batch.info["all_seeds"] == [10, 11, 12, 13] and batch.info["seed"] == 10


def test_random_seed_is_reported_and_reproducible(model):
    base = dict(prompt="a dog", steps=2, **SIZE)
    r = generate(model, Params(seed=-1, **base))
    assert 0 <= r.seeds[0] < 4294967295
    again = generate(model, Params(seed=r.seeds[0], **base))
    assert np.array_equal(pixels(r), pixels(again))
    assert f"Seed: {r.seeds[0]}," in r.infotexts[0]


def test_variation_seed_changes_image(model):
    base = dict(prompt="a dog", steps=2, seed=5, subseed=9, **SIZE)
    plain = generate(model, Params(**base))
    varied = generate(model, Params(subseed_strength=0.5, **base))
    assert not np.array_equal(pixels(plain), pixels(varied))
    assert "Variation seed: 9, Variation seed strength: 0.5" in varied.infotexts[0]


# --- infotext -----------------------------------------------------------------------------------

def test_infotext_format(model, tiny_ckpt):
    h = hashing.model_hash(tiny_ckpt)[:10]
    r = generate(model, Params(prompt="a (cat:1.2), sitting", negative_prompt="ugly", seed=42, steps=4,
                               sampler_name="DPM++ 2M Karras", cfg_scale=6.5, clip_skip=2, **SIZE), model_hash=h)
    assert r.infotexts[0] == ("a (cat:1.2), sitting\nNegative prompt: ugly\n"
                              "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 42, "
                              f"Size: 64x64, Model hash: {h}, Model: tiny, Clip skip: 2, Version: v1.10.1")
    parsed = infotext.parse_infotext(r.infotexts[0])
    assert parsed["Prompt"] == "a (cat:1.2), sitting" and parsed["Seed"] == "42" and parsed["Clip skip"] == "2"
    assert r.info["infotexts"] == r.infotexts and r.info["sampler_name"] == "DPM++ 2M"


def test_generate_writes_nothing_beside_the_weights(model, tiny_ckpt):
    folder = os.path.dirname(tiny_ckpt)
    before = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}
    r = model.txt2img(prompt="x", steps=1, **SIZE)
    after = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}
    assert after == before
    assert "Model: tiny," in r.infotexts[0] and "Model hash" not in r.infotexts[0]


def test_unknown_sampler_is_a_clear_error(model):
    with pytest.raises(ValueError, match="DPM\\+\\+ 2M"):
        generate(model, Params(prompt="x", sampler_name="Nope", steps=1, **SIZE))


# --- conditioning ---------------------------------------------------------------------------------

def test_emphasis_and_mean_restoration(model):
    z = encode_texts(model, ["a (red:1.5) cat"])
    tokens = model.tokenizer.tokenize(["a red cat"])
    plain = model.text_encoder(tokens)
    w = torch.ones(1, 77, 1)
    w[0, 2] = 1.5  # BOS, a, red, cat
    expected = plain * w
    expected = expected * (plain.mean() / expected.mean())
    assert torch.allclose(z, expected, atol=1e-6)


@pytest.mark.parametrize("mode", EMPHASIS_MODES)
def test_emphasis_option_encodes_every_prompt(model, monkeypatch, mode):
    """The request's `emphasis` (A1111's `opts.emphasis`) encodes the prompt, the negative prompt and both
    hires prompts: what reaches the denoiser is `encode_texts(..., emphasis=mode)` of each."""
    import sd15.pipeline as pipeline

    seen = []

    def spy(name, unet, alphas, cond, uncond, *args, **kw):
        seen.extend([cond(0)[0], uncond(0)])
        return real(name, unet, alphas, cond, uncond, *args, **kw)

    real = pipeline.make_denoiser
    monkeypatch.setattr(pipeline, "make_denoiser", spy)
    texts = ["a (red:1.5) cat", "(ugly:1.3) dog", "a ((tall)) tree", "blurry (dark:0.7)"]
    generate(model, Params(prompt=texts[0], negative_prompt=texts[1], hr_prompt=texts[2],
                           hr_negative_prompt=texts[3], enable_hr=True, hr_scale=1.5, denoising_strength=0.5,
                           seed=1, steps=2, emphasis=mode, **SIZE))
    assert len(seen) == 4
    for got, text in zip(seen, texts):
        assert torch.allclose(got, encode_texts(model, [text], emphasis=mode), rtol=0, atol=1e-6), text


def test_emphasis_modes_differ_and_are_written_as_a1111_does(model, tiny_ckpt):
    """"No norm" leaves out the mean restoration; A1111's `sd_hijack_clip` writes "Emphasis" (before the
    sampler's entries) only for a mode other than "Original" and an encoded text with "(" or "["."""
    original, no_norm = (encode_texts(model, ["a (word:1.5) cat"], emphasis=m)
                         for m in ("Original", "No norm"))
    assert not torch.allclose(original, no_norm, rtol=0, atol=1e-4)
    h = hashing.model_hash(tiny_ckpt)[:10]
    kw = dict(prompt="a (word:1.5) cat", seed=5, steps=2, sampler_name="Euler a", eta_ancestral=0.5, **SIZE)
    r = generate(model, Params(emphasis="No norm", **kw), model_hash=h)
    assert r.infotexts[0].split("\n")[1] == (
        f"Steps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 5, Size: 64x64, "
        f"Model hash: {h}, Model: tiny, Emphasis: No norm, Eta: 0.5, Version: v1.10.1")
    assert not np.array_equal(pixels(r), pixels(generate(model, Params(**kw))))
    assert "Emphasis" not in generate(model, Params(**kw)).infotexts[0]  # Original
    for prompt in ("a cat", "a [cat:dog:0.5]"):  # prompt editing is expanded first: no bracket is encoded
        r = generate(model, Params(**{**kw, "prompt": prompt}, emphasis="Ignore"))
        assert "Emphasis" not in r.infotexts[0]
    r = generate(model, Params(**{**kw, "prompt": "a cat", "negative_prompt": "[ugly]"}, emphasis="None"))
    assert ", Emphasis: None, Eta: 0.5, " in r.infotexts[0]
    assert r.info["extra_generation_params"]["Emphasis"] == "None"


def test_long_prompt_and_break_make_more_chunks(model):
    assert encode_texts(model, ["cat " * 80]).shape == (1, 154, 64)
    assert encode_texts(model, ["a cat BREAK a dog"]).shape == (1, 154, 64)
    r = generate(model, Params(prompt="cat " * 80, negative_prompt="", steps=2, **SIZE))  # cond 154, uncond 77
    assert len(r.images) == 1


# --- img2img, inpainting, hires --------------------------------------------------------------------

def test_img2img_and_inpainting(model):
    from PIL import Image

    init = generate(model, Params(prompt="a house", seed=3, steps=3, **SIZE)).images[0]
    kw = dict(prompt="a house at night", seed=4, steps=4, denoising_strength=0.6, init_images=[init], **SIZE)
    a, b = generate(model, Params(**kw)), generate(model, Params(**kw))
    assert a.images[0].size == (64, 64) and np.array_equal(pixels(a), pixels(b))
    assert "Denoising strength: 0.6" in a.infotexts[0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inp = generate(model, Params(mask=mask, mask_blur=0, inpaint_full_res=False, **kw))
    out, orig = pixels(inp)[0], np.asarray(init).astype(np.int16)
    assert np.array_equal(out[:8], orig[:8]) and np.array_equal(out[:, :8], orig[:, :8])  # unmasked: untouched
    assert np.abs(out[20:44, 20:44] - orig[20:44, 20:44]).max() > 0  # masked: repainted
    assert "Masked content: fill" in inp.infotexts[0] and "Inpaint area" not in inp.infotexts[0]


def test_latent_resize_mode_with_a_mask_as_a1111(model):
    """Resize mode 3 with a whole-picture mask, as A1111's img2img `init`: the answer has the requested size and
    the init image's overlay (its own size) is pasted unscaled at the top left; masked content but "original"
    fails in A1111 (`masking.fill` of images of two sizes): a RequestError."""
    from PIL import Image

    from sd15.a1111.images import tensor_to_pil
    from sd15.pipeline import decode_latents
    from sd15.schema import RequestError

    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # redraw the left half
    kw = dict(prompt="a", seed=1, steps=2, init_images=[init], mask=mask, mask_blur=0, resize_mode=3,
              inpaint_full_res=False, width=128, height=96, denoising_strength=0.5)
    r = generate(model, Params(inpainting_fill=1, **kw))
    out, sample = np.asarray(r.images[0]), np.asarray(tensor_to_pil(decode_latents(model, r.latents))[0])
    assert out.shape == (96, 128, 3) and r.latents.shape == (1, 4, 12, 16)
    assert np.array_equal(out[:, 64:], sample[:, 64:]) and np.array_equal(out[64:], sample[64:])  # no overlay
    assert np.array_equal(out[:, :24], sample[:, :24])  # the redrawn part
    assert np.array_equal(out[:64, 40:64], np.asarray(init)[:, 40:64])  # the kept part: the init, unscaled
    with pytest.raises(RequestError, match="inpainting_fill: resize_mode 3 with a mask"):
        generate(model, Params(inpainting_fill=0, **kw))


def test_latent_noise_fill_is_a1111s_plain_draw(model, monkeypatch):
    """A1111 fills "latent noise" with `create_random_tensors(shape, all_seeds[:batch])`: the first batch's seeds,
    without the request's variation seed or seed resize."""
    from PIL import Image

    import sd15.pipeline as pipeline
    from sd15.rng import ImageRNG

    drawn, real = [], pipeline.InitImages
    monkeypatch.setattr(pipeline, "InitImages", lambda r, encode, noise: real(
        r, encode, lambda shape: drawn.append(noise(shape)) or drawn[-1]))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    generate(model, Params(init_images=[Image.new("RGB", (64, 64), (90, 40, 200))], mask=mask, inpainting_fill=2,
                           seed=11, batch_size=2, n_iter=2, steps=1, subseed=5, subseed_strength=0.5,
                           seed_resize_from_w=96, seed_resize_from_h=96, randn_source="CPU", **SIZE))
    # with a variation seed every image keeps the seed 11 (A1111's all_seeds) and the subseeds count up
    assert len(drawn) == 1 and torch.equal(drawn[0], ImageRNG((4, 8, 8), [11, 11], source="cpu").first())


def test_hires_fix(model):
    r = generate(model, Params(prompt="a tree", seed=1, steps=3, enable_hr=True, hr_scale=2.0,
                               denoising_strength=0.5, **SIZE))
    assert r.images[0].size == (128, 128) and r.latents.shape == (1, 4, 16, 16)
    assert r.info["width"] == 64 and "Hires upscale: 2.0, Hires upscaler: Latent" in r.infotexts[0]
    px = generate(model, Params(prompt="a tree", seed=1, steps=3, enable_hr=True, hr_upscaler="Lanczos",
                                hr_resize_x=96, hr_resize_y=80, denoising_strength=0.5, **SIZE))
    assert px.images[0].size == (96, 80)


def test_each_pass_takes_the_eta_option_of_its_sampler(model, monkeypatch):
    """A1111 decides an empty eta per sampler (`Sampler.initialize`): a DDIM first pass takes `eta_ddim`,
    an Euler a hires pass `eta_ancestral`; each pass's infotext entry follows."""
    from sd15.samplers import kdiffusion, timesteps

    seen = []
    for module, name in ((timesteps, "sample_ddim"), (kdiffusion, "sample_euler_ancestral")):
        def wrapped(*args, _fn=getattr(module, name), _name=name, **kw):
            seen.append((_name, kw["eta"]))
            return _fn(*args, **kw)
        monkeypatch.setattr(module, name, wrapped)
    kw = dict(prompt="a tree", seed=1, steps=2, sampler_name="DDIM", enable_hr=True,
              hr_sampler_name="Euler a", hr_scale=1.5, denoising_strength=0.5, **SIZE)
    r = generate(model, Params(eta_ddim=0.3, eta_ancestral=0.6, **kw))
    assert seen == [("sample_ddim", 0.3), ("sample_euler_ancestral", 0.6)]
    assert r.infotexts[0].endswith(", Eta DDIM: 0.3, Eta: 0.6, Version: v1.10.1")
    seen.clear()
    r = generate(model, Params(eta=0.45, eta_ddim=0.3, eta_ancestral=0.6, **kw))  # an explicit eta wins
    assert seen == [("sample_ddim", 0.45), ("sample_euler_ancestral", 0.45)]
    assert r.infotexts[0].endswith(", Eta DDIM: 0.45, Eta: 0.45, Version: v1.10.1")


def _record(monkeypatch, module, name, seen):
    """Wrap sampler function `name` of `module` to append its third argument (σs or timesteps) to `seen`."""
    fn = getattr(module, name)

    def wrapped(model, x, schedule, **kw):
        seen.append(schedule.cpu())
        return fn(model, x, schedule, **kw)
    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("options, entries, changed", [
    (dict(scheduler="Karras", sigma_min=0.1, sigma_max=10.0, rho=5.0),
     ", Schedule min sigma: 0.1, Schedule max sigma: 10.0, Schedule rho: 5.0, Version", True),
    (dict(scheduler="Karras", rho=7.0), None, False),  # Karras's own ρ: not written
    (dict(scheduler="Exponential", rho=5.0), None, False),  # a schedule without ρ
    (dict(scheduler="Beta", beta_dist_alpha=0.5, beta_dist_beta=0.7),
     ", Beta schedule alpha: 0.5, Beta schedule beta: 0.7, Version", True),
    (dict(scheduler="Beta"), ", Beta schedule alpha: 0.6, Beta schedule beta: 0.6, Version", False),
    (dict(scheduler="Uniform", always_discard_next_to_last_sigma=True, sigma_min=0.5),  # Uniform ignores σ_min
     ", Discard penultimate sigma: True, Schedule min sigma: 0.5, Version", True),
    (dict(sigma_min=0.5), None, False),  # Automatic, the sampler without a schedule of its own: the model's σs
])
def test_schedule_options_reach_both_passes_and_the_infotext(model, monkeypatch, options, entries, changed):
    """A1111's `KDiffusionSampler.get_sigmas`: the σ options make each pass's schedule, and the infotext names
    those that differ from the schedule's own (after "Discard penultimate sigma" and "Schedule type")."""
    from sd15.samplers import get_sigmas, kdiffusion

    seen = []
    _record(monkeypatch, kdiffusion, "sample_euler", seen)
    r = generate(model, Params(prompt="a tree", seed=1, steps=4, sampler_name="Euler", enable_hr=True,
                               hr_scale=1.5, hr_second_pass_steps=3, denoising_strength=0.5, **options, **SIZE))
    scheduler = options.get("scheduler", "Automatic")
    kw = dict(sigma_min=options.get("sigma_min", 0.0), sigma_max=options.get("sigma_max", 0.0),
              rho=options.get("rho", 0.0), beta_alpha=options.get("beta_dist_alpha", 0.6),
              beta_beta=options.get("beta_dist_beta", 0.6),
              always_discard_penultimate=options.get("always_discard_next_to_last_sigma", False))
    first = get_sigmas(scheduler, 4, model.alphas_cumprod, sampler="Euler", **kw)
    hires = get_sigmas(scheduler, 6, model.alphas_cumprod, sampler="Euler", **kw)[3:]  # the last 3 of 6 steps
    assert torch.equal(seen[0], first) and torch.equal(seen[1], hires)
    assert changed != torch.equal(first, get_sigmas(scheduler, 4, model.alphas_cumprod, sampler="Euler"))
    if entries is None:
        assert r.infotexts[0].endswith(", Hires upscaler: Latent, Version: v1.10.1"), r.infotexts[0]
    else:
        assert entries in r.infotexts[0], r.infotexts[0]


def test_discard_penultimate_option_on_a_timestep_sampler(model, monkeypatch):
    """A1111's `CompVisSampler.get_timesteps`: DDIM's grid is made for steps + 1 (nothing is dropped)."""
    from sd15.samplers import timesteps

    seen = []
    _record(monkeypatch, timesteps, "sample_ddim", seen)
    r = generate(model, Params(prompt="a tree", seed=1, steps=4, sampler_name="DDIM",
                               always_discard_next_to_last_sigma=True, sigma_min=0.5, **SIZE))
    assert torch.equal(seen[0], timesteps.ddim_timesteps(5))
    assert r.infotexts[0].endswith(", Discard penultimate sigma: True, Version: v1.10.1"), r.infotexts[0]


def _unet_batches(model, monkeypatch):
    sizes, forward = [], model.unet.forward

    def counted(x, *args, **kw):
        sizes.append(x.shape[0])
        return forward(x, *args, **kw)
    monkeypatch.setattr(model.unet, "forward", counted)
    return sizes


def test_skip_early_cond_and_ngms_in_both_passes(model, monkeypatch):
    """A1111 v1.10's CFG denoiser: the first `skip_early_cond` of each pass's denoiser calls run without the
    uncond (one UNet row per image instead of two) and "Skip Early CFG" is written; "NGMS" (and "NGMS all
    steps") only when NGMS did skip, after the first pass's schedule."""
    sizes = _unet_batches(model, monkeypatch)
    kw = dict(prompt="a tree", seed=1, steps=4, sampler_name="Euler", enable_hr=True, hr_scale=1.5,
              hr_second_pass_steps=4, denoising_strength=0.5, **SIZE)
    r = generate(model, Params(skip_early_cond=0.5, s_min_uncond=0.001, **kw))  # NGMS below every σ
    assert sizes == [1, 1, 1, 2] * 2  # 0/4, 1/4, 2/4 <= 0.5 < 3/4, in each pass
    assert r.infotexts[0].endswith(", Hires upscaler: Latent, Skip Early CFG: 0.5, Version: v1.10.1")
    sizes.clear()
    r = generate(model, Params(s_min_uncond=100.0, s_min_uncond_all=True, **kw))
    assert sizes == [1] * 8
    assert r.infotexts[0].endswith(", NGMS: 100.0, NGMS all steps: True, Version: v1.10.1"), r.infotexts[0]
    sizes.clear()
    r = generate(model, Params(s_min_uncond=100.0, scheduler="Karras", sigma_min=0.1, **kw))
    assert sizes == [2, 1, 2, 1] * 2
    assert r.infotexts[0].endswith(", Hires upscaler: Latent, Schedule min sigma: 0.1, NGMS: 100.0, "
                                   "Version: v1.10.1"), r.infotexts[0]


@pytest.mark.parametrize("backtrack", [0, 20])
def test_comma_padding_backtrack_option_chunks_the_prompt(model, monkeypatch, backtrack):
    """A1111's `comma_padding_backtrack`: the text encoder sees the prompt's chunks as `chunk_tokens` makes
    them with the option (a comma 5 tokens before the chunk's end moves the rest on with 20, not with 0)."""
    from sd15.a1111.prompt import chunk_tokens, parse_prompt_attention

    prompt = "cat " * 70 + ", " + "dog " * 10
    seen, forward = [], model.text_encoder.forward

    def recorded(tokens=None, **kw):
        seen.append(tokens[0].tolist())  # the prompt's row (the negative prompt's comes after)
        return forward(tokens, **kw)
    monkeypatch.setattr(model.text_encoder, "forward", recorded)
    generate(model, Params(prompt=prompt, seed=1, steps=1, comma_padding_backtrack=backtrack, **SIZE))
    chunks, _ = chunk_tokens(parse_prompt_attention(prompt), model.tokenizer.encode,
                             comma_padding_backtrack=backtrack)
    assert seen == [c.tokens for c in chunks]
    other, _ = chunk_tokens(parse_prompt_attention(prompt), model.tokenizer.encode,
                            comma_padding_backtrack=20 - backtrack)
    assert seen != [c.tokens for c in other]


# --- hooks and control ------------------------------------------------------------------------------

def test_callback_attention_capture_and_latents(model):
    steps_seen, attn_calls = [], []

    def capture(q, k, v, causal=False):
        attn_calls.append(q.shape)
        return attention_math(q, k, v, causal)

    with use_attention_backend(capture):
        r = generate(model, Params(prompt="x", seed=1, steps=3, **SIZE),
                     callback=lambda i, sigma, x, denoised: steps_seen.append((i, float(sigma), tuple(x.shape))))
    assert [s[0] for s in steps_seen] == [0, 1, 2] and steps_seen[0][2] == (1, 4, 8, 8)
    assert steps_seen[0][1] > steps_seen[1][1] > steps_seen[2][1] > 0  # decreasing sigmas
    assert len(attn_calls) > 0 and r.latents.shape == (1, 4, 8, 8)


def test_interrupt_from_another_thread_keeps_what_it_has(model):
    state = JobState()
    started = threading.Event()

    def on_step(i, *_):
        started.set()
        if i == 1:
            threading.Thread(target=state.interrupt).start()
            threading.Event().wait(0.2)

    r = generate(model, Params(prompt="x", seed=1, steps=50, batch_size=1, n_iter=3, **SIZE), state=state,
                 callback=on_step)
    assert started.is_set() and r.interrupted
    assert len(r.images) == 1 and r.images[0].size == (64, 64)  # the running batch is decoded, later ones skipped
