"""Pipeline features around the sampler: seamless tiling, hires fix with model upscalers, skip, and the batched
CLIP / VAE calls (one CLIP forward for cond and uncond, one VAE decode per batch)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sd15
import sd15.pipeline as pipeline
from sd15.a1111 import images as imgs
from sd15.a1111 import infotext
from sd15.a1111.conditioning import batch_conditioning, encode_texts
from sd15.esrgan import SRVGGConfig, SRVGGNetCompact
from sd15.pipeline import JobState, decode_latents, generate
from sd15.rng import ImageRNG
from sd15.schema import GenerationRequest as Params
from sd15.schema import resolve
from sd15.upscale import Upscalers

SIZE = dict(width=96, height=64)  # latent 12 x 8; the tiny UNet downsamples twice, so shifts by 4 commute


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return sd15.load(tiny_ckpt, device="cpu", dtype=torch.float32)


def pixels(result):
    return np.stack([np.asarray(im) for im in result.images]).astype(np.int16)


# --- tiling --------------------------------------------------------------------------------------------------

SHIFT = (4, 8)  # latent pixels (rows, columns): multiples of the UNet's total downsampling (4)


class RolledRNG(ImageRNG):
    """The pipeline's RNG with its initial noise rolled circularly by SHIFT."""

    def first(self):
        return torch.roll(super().first(), SHIFT, dims=(-2, -1))


def _run_rolled(model, monkeypatch, **kw):
    with monkeypatch.context() as m:
        m.setattr(pipeline, "ImageRNG", RolledRNG)
        return generate(model, Params(**kw))


@pytest.mark.parametrize("tiling", [True, False])
def test_tiling_makes_the_sampled_latent_periodic(model, monkeypatch, tiling):
    """Circular convolutions commute with a circular shift: with tiling, rolling the initial noise rolls the
    sampled latent (Euler, CPU noise) and the decoded image (by 8x the shift). Without tiling the zero padding
    sees the edges, and the rolled run is a different picture."""
    kw = dict(prompt="a brick wall", seed=3, steps=4, sampler_name="Euler", randn_source="CPU", tiling=tiling, **SIZE)
    plain = generate(model, Params(**kw))
    rolled = _run_rolled(model, monkeypatch, **kw)
    expected = torch.roll(plain.latents, SHIFT, dims=(-2, -1))
    img_expected = np.roll(pixels(plain), (8 * SHIFT[0], 8 * SHIFT[1]), axis=(1, 2))
    if tiling:
        # equal up to float rounding (attention and GroupNorm sum in another order), amplified by the sampler:
        # measured 4e-6 of the latents' range here, against 1.3 (the latents' own size) without tiling
        scale = plain.latents.abs().max()
        torch.testing.assert_close(rolled.latents, expected, rtol=0, atol=1e-5 * scale)
        assert np.abs(pixels(rolled) - img_expected).max() <= 1
        assert plain.infotexts[0].endswith("RNG: CPU, Tiling: True, Version: v1.10.1")  # A1111's place for it
        assert infotext.parse_infotext(plain.infotexts[0])["Tiling"] == "True"
    else:
        assert (rolled.latents - expected).abs().max() > 1e-2
        assert np.abs(pixels(rolled) - img_expected).max() > 10
        assert "Tiling" not in plain.infotexts[0]


def test_tiling_edges_continue_each_other(model):
    """The seam between the right and the left edge is as smooth as the image inside, and smoother than
    without tiling."""
    def seam_ratio(tiling):
        im = pixels(generate(model, Params(prompt="moss", seed=9, steps=4, tiling=tiling, **SIZE)))[0]
        inner = np.abs(np.diff(im, axis=1)).mean()
        seam = np.abs(im[:, 0] - im[:, -1]).mean()
        return seam / inner

    assert seam_ratio(True) < 1.5 < seam_ratio(False)


def test_tiling_bypasses_compiled_forwards_and_tiled_vae_and_restores_them(model, monkeypatch):
    """A compiled / graph-captured forward (an instance attribute, as sd15.fast installs it) would replay
    the zero-padded graph: a tiling job runs the eager class methods, and never the tiled VAE (its tiles
    would wrap around themselves). Everything is back in place afterwards."""
    calls = []

    def fake_forward(*a, **k):
        calls.append("unet")
        return type(model.unet).forward(model.unet, *a, **k)

    def fake_decode(*a, **k):
        calls.append("vae")
        return type(model.vae).decode(model.vae, *a, **k)

    def no_tiles(*a, **k):
        raise AssertionError("tiled VAE used in a tiling job")

    monkeypatch.setattr(model.unet, "forward", fake_forward, raising=False)
    monkeypatch.setattr(model.vae, "decode", fake_decode, raising=False)
    monkeypatch.setattr(pipeline, "TILED_VAE_LATENT_PIXELS", 4)  # 12 x 8 latents would go through tiles
    monkeypatch.setattr(pipeline, "tiled_decode", no_tiles)
    convs = [c for net in (model.unet, model.vae) for c in net.modules() if isinstance(c, torch.nn.Conv2d)]
    generate(model, Params(prompt="x", seed=1, steps=2, tiling=True, **SIZE))
    assert calls == []
    assert model.unet.__dict__["forward"] is fake_forward and model.vae.__dict__["decode"] is fake_decode
    assert {c.padding_mode for c in convs} == {"zeros"}
    with pytest.raises(AssertionError, match="tiled VAE"):  # a plain job still uses them
        generate(model, Params(prompt="x", seed=1, steps=2, **SIZE))
    assert calls and calls[0] == "unet"


# --- hires fix with a model upscaler ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def upscalers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ESRGAN")
    net = SRVGGNetCompact(SRVGGConfig(num_feat=4, num_conv=1, upscale=4))
    g = torch.Generator().manual_seed(5)
    net.load_state_dict({k: torch.randn(v.shape, generator=g) * 0.3 for k, v in net.state_dict().items()})
    torch.save({"params": net.state_dict()}, folder / "4x-Tiny.pth")
    return Upscalers(folder, tile=16, tile_overlap=4)


class Recording:
    """An upscaler list that records what the pipeline asks of it and answers with `answer(...)`."""

    def __init__(self, real, answer=None):
        self.real, self.answer, self.calls = real, answer, []

    def names(self):
        return self.real.names()

    def resize(self, im, name, w, h, interrupted=None):
        self.calls.append((im.copy(), name, w, h))
        return (self.answer or self.real.resize)(im, name, w, h)


def test_hires_with_a_model_upscaler_uses_its_resize(model, upscalers):
    kw = dict(prompt="a tree", seed=2, steps=3, enable_hr=True, hr_scale=2.0, denoising_strength=0.5, **SIZE)
    first = generate(model, Params(**{**kw, "enable_hr": False}))  # the first pass alone
    by_hand = upscalers.resize(first.images[0], "4x-Tiny", 192, 128)  # what the hires pass must start from
    rec = Recording(upscalers)
    out = generate(model, Params(hr_upscaler="4x-Tiny", **kw), upscalers=rec)
    assert len(rec.calls) == 1
    im, name, w, h = rec.calls[0]
    assert (name, w, h) == ("4x-Tiny", 192, 128) and np.array_equal(np.asarray(im), np.asarray(first.images[0]))
    fed = generate(model, Params(hr_upscaler="4x-Tiny", **kw), upscalers=Recording(upscalers, lambda *a: by_hand))
    assert np.array_equal(pixels(out), pixels(fed)) and out.images[0].size == (192, 128)
    lanczos = generate(model, Params(hr_upscaler="Lanczos", **kw), upscalers=upscalers)
    assert np.abs(pixels(lanczos) - pixels(out)).max() > 10  # the model upscaler made a difference
    assert "Hires upscaler: 4x-Tiny" in out.infotexts[0]


def test_hires_upscaler_names_come_from_the_list(model, upscalers):
    req = Params(prompt="x", enable_hr=True, hr_upscaler="4x-Tiny", **SIZE)
    with pytest.raises(ValueError, match="could not find upscaler named 4x-Tiny"):
        resolve(req)  # not among the built-ins
    assert resolve(req, upscalers=upscalers.names()).hires.upscaler == "4x-Tiny"
    with pytest.raises(ValueError, match="Valid upscalers: .*4x-Tiny"):
        resolve(req.replace(hr_upscaler="4x-Nope"), upscalers=upscalers.names())
    with pytest.raises(ValueError, match="4x-Tiny"):
        generate(model, req.replace(steps=1))  # generate without a list knows only the built-ins


# --- skip -------------------------------------------------------------------------------------------------------

def _skip_at(state, step, seen):
    """A callback that records the denoised estimates and skips once, after step `step` of the first batch."""
    def cb(i, sigma, x, denoised):
        seen.append(denoised.clone())
        if i == step and len(seen) == step + 1:
            state.skip()
    return cb


def test_skip_single_batch_returns_the_partial_image(model):
    state, seen = JobState(), []
    r = generate(model, Params(prompt="x", seed=1, steps=6, **SIZE), state=state, callback=_skip_at(state, 1, seen))
    assert len(seen) == 2 and len(r.images) == 1 and not r.interrupted
    assert torch.equal(r.latents, seen[1])  # A1111 keeps the last denoised estimate
    assert np.array_equal(pixels(r)[0], np.asarray(imgs.tensor_to_pil(decode_latents(model, seen[1]))[0]))


def test_skip_moves_on_to_the_next_batch(model):
    state, seen = JobState(), []
    r = generate(model, Params(prompt="x", seed=1, steps=4, n_iter=2, **SIZE), state=state,
                 callback=_skip_at(state, 0, seen))
    assert len(r.images) == 2 and r.seeds == [1, 2] and len(seen) == 1 + 4
    assert torch.equal(r.latents[:1], seen[0])
    alone = generate(model, Params(prompt="x", seed=2, steps=4, **SIZE))
    assert torch.equal(r.latents[1:], alone.latents)  # the second batch ran in full


def test_skip_in_the_first_pass_of_hires_returns_the_upscaled_partial_latent(model):
    """As A1111: the hires pass still runs, its sampler stops before the first step and returns its init
    latent (the upscaled partial first pass)."""
    state, seen = JobState(), []
    r = generate(model, Params(prompt="x", seed=1, steps=4, enable_hr=True, denoising_strength=0.5, **SIZE),
                 state=state, callback=_skip_at(state, 1, seen))
    assert len(seen) == 2 and r.images[0].size == (192, 128)
    torch.testing.assert_close(r.latents, F.interpolate(seen[1], size=(16, 24), mode="bilinear"), rtol=0, atol=0)


# --- one CLIP forward for cond and uncond, one VAE decode per batch ---------------------------------------------

def test_cond_and_uncond_share_one_clip_forward(model, monkeypatch):
    calls = []
    forward = model.text_encoder.forward

    def counting(tokens, **kw):
        calls.append(tuple(tokens.shape))
        return forward(tokens, **kw)

    monkeypatch.setattr(model.text_encoder, "forward", counting)
    cond, uncond = batch_conditioning(model, ["a (red:1.3) cat", "a dog"], ["blurry", "blurry"], steps=4, cache={})
    assert calls == [(3, 77)]  # "a (red:1.3) cat", "a dog", "blurry": one forward
    monkeypatch.undo()
    c, _ = cond(0)
    expected = torch.cat([encode_texts(model, ["a (red:1.3) cat"]), encode_texts(model, ["a dog"])])
    torch.testing.assert_close(c, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond(0), encode_texts(model, ["blurry"]).expand(2, -1, -1), rtol=0, atol=1e-6)
    # one prompt alone gives the same rows
    alone, alone_uncond = batch_conditioning(model, ["a dog"], ["blurry"], 4)
    torch.testing.assert_close(alone(0)[0], expected[1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(alone_uncond(0), uncond(0)[:1], rtol=0, atol=1e-6)


def test_batched_decode_equals_one_by_one(model):
    z = torch.randn(3, 4, 8, 12)
    batched = decode_latents(model, z)
    single = torch.cat([decode_latents(model, z[i:i + 1]) for i in range(3)])
    # not bit for bit on the CPU: convolutions sum in another order for another batch size (measured: 1.2e-5
    # at most, 8 of 55296 values above 1e-5, on outputs of size ~3)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5 * single.abs().max())
    assert batched.shape == (3, 3, 64, 96)
