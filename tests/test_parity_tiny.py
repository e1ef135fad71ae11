"""Tiny-config parity: sd15's networks, loaded by sd15.load, against diffusers / transformers loaded from
the same file through diffusers' LDM converters. fp32, relative error <= 1e-5."""
import pytest
import torch
from safetensors.torch import load_file

import sd15
from reference import clip_hidden, diffusers_unet, diffusers_vae, rel_err, transformers_clip
from sd15.attention import use_attention_backend

TOL = 1e-5  # fp32: same maths, only summation order differs


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    sd = load_file(tiny_ckpt)
    ours = sd15.load(tiny_ckpt, device="cpu", dtype=torch.float32)
    ref = dict(unet=diffusers_unet(sd, ours.unet.cfg), vae=diffusers_vae(sd, ours.vae.cfg),
               clip=transformers_clip(sd, ours.text_encoder.cfg))
    return ours, ref


@pytest.mark.parametrize("backend", ["sdpa", "math", "chunked"])
def test_unet(models, backend):
    ours, ref = models
    x = torch.randn(2, 4, 16, 24)
    t = torch.tensor([999.0, 1.5])  # A1111 passes fractional timesteps
    ctx = torch.randn(2, 154, 64)  # two 77-token chunks: a long prompt
    with use_attention_backend(backend):
        out = ours.unet(x, t, ctx)
    expected = ref["unet"](x, t, encoder_hidden_states=ctx).sample
    assert out.shape == (2, 4, 16, 24)
    assert rel_err(out, expected) <= TOL


def test_vae_decode_and_encode(models):
    ours, ref = models
    z = torch.randn(1, 4, 4, 6)
    assert rel_err(ours.vae.decode(z), ref["vae"].decode(z).sample) <= TOL
    img = torch.rand(2, 3, 32, 48) * 2 - 1
    mean, logvar = ours.vae.encode(img)
    dist = ref["vae"].encode(img).latent_dist
    assert mean.shape == (2, 4, 4, 6)
    assert rel_err(mean, dist.mean) <= TOL
    assert rel_err(logvar, dist.logvar) <= TOL


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip(models, clip_skip):
    ours, ref = models
    tokens = torch.randint(0, 49406, (2, 77))
    tokens[:, 0] = 49406
    out = ours.text_encoder(tokens, clip_skip=clip_skip)
    assert out.shape == (2, 77, 64)
    assert rel_err(out, clip_hidden(ref["clip"], tokens, clip_skip)) <= TOL


def test_clip_skip_changes_output(models):
    ours, _ = models
    tokens = torch.randint(0, 49406, (1, 77))
    assert rel_err(ours.text_encoder(tokens, clip_skip=2), ours.text_encoder(tokens)) > 1e-2
    with pytest.raises(ValueError, match="clip_skip"):
        ours.text_encoder(tokens, clip_skip=0)


def test_unet_latent_sizes_not_multiple_of_8(models):
    """Pixel sizes that are multiples of 8 but not 64 (e.g. 520 px -> 65 latents) work as in A1111: the
    upsampled features are resized (nearest) to the skip connection's size before concatenation."""
    ours, _ = models
    x = torch.randn(1, 4, 13, 9)
    out = ours.unet(x, torch.tensor([500.0]), torch.randn(1, 77, 64))
    assert out.shape == x.shape and torch.isfinite(out).all()
