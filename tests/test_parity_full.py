"""Full-size parity on a random-weight checkpoint in the exact layout of v1-5-pruned-emaonly.safetensors:
sd15.load against diffusers' LDM converters + UNet2DConditionModel / AutoencoderKL and transformers'
CLIPTextModel, fp32, relative error <= 1e-5. Marked `fullsize` (a few minutes on 2 CPU cores); CI runs them."""
import gc

import pytest
import torch
from safetensors.torch import load_file

import sd15
from reference import clip_hidden, diffusers_unet, diffusers_vae, rel_err, transformers_clip

pytestmark = pytest.mark.fullsize
TOL = 1e-5


@pytest.fixture(scope="module")
def ours(full_ckpt):
    model = sd15.load(full_ckpt, device="cpu", dtype=torch.float32)
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="module")
def raw(full_ckpt):
    sd = load_file(full_ckpt)
    yield sd
    del sd
    gc.collect()


def test_architecture_read_from_shapes(ours):
    assert ours.unet.cfg == sd15.unet.UNetConfig()
    assert ours.vae.cfg == sd15.vae.VAEConfig()
    assert ours.text_encoder.cfg == sd15.clip.CLIPTextConfig()
    counts = [sum(p.numel() for p in m.parameters()) for m in (ours.unet, ours.vae, ours.text_encoder)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]  # the published SD 1.5 parameter counts


def test_alphas_cumprod_from_file(ours, raw):
    assert torch.equal(ours.alphas_cumprod, raw["alphas_cumprod"])
    assert ours.alphas_cumprod.dtype == torch.float32


def test_unet(ours, raw):
    ref = diffusers_unet(raw, ours.unet.cfg)
    x = torch.randn(2, 4, 32, 32)
    t = torch.tensor([999.0, 20.25])
    ctx = torch.randn(2, 77, 768)
    out = ours.unet(x, t, ctx)
    expected = ref(x, t, encoder_hidden_states=ctx).sample
    assert rel_err(out, expected) <= TOL


def test_vae(ours, raw):
    ref = diffusers_vae(raw, ours.vae.cfg)
    z = torch.randn(1, 4, 16, 16)
    assert rel_err(ours.vae.decode(z), ref.decode(z).sample) <= TOL
    img = torch.rand(1, 3, 128, 128) * 2 - 1
    mean, logvar = ours.vae.encode(img)
    dist = ref.encode(img).latent_dist
    assert rel_err(mean, dist.mean) <= TOL and rel_err(logvar, dist.logvar) <= TOL


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip(ours, raw, clip_skip):
    ref = transformers_clip(raw, ours.text_encoder.cfg)
    tokens = torch.full((2, 77), 49407)
    tokens[:, 0] = 49406
    tokens[:, 1:9] = torch.randint(0, 49406, (2, 8))
    assert rel_err(ours.text_encoder(tokens, clip_skip=clip_skip), clip_hidden(ref, tokens, clip_skip)) <= TOL


def test_external_vae(full_ckpt, full_vae):
    model = sd15.load(full_ckpt, vae=full_vae, device="cpu", dtype=torch.float32)
    ref = diffusers_vae(load_file(full_vae), model.vae.cfg)
    z = torch.randn(1, 4, 8, 8)
    out = model.vae.decode(z)
    assert rel_err(out, ref.decode(z).sample) <= TOL
    assert model.vae_path == full_vae
