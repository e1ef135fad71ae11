"""EpsDenoiser against k-diffusion's DiscreteEpsDDPMDenoiser and recorded anchor values; CFGDenoiser
against A1111's batching and combination rules (`modules/sd_samplers_cfg_denoiser.py`)."""

import numpy as np
import pytest
import torch
from torch import nn

from _kdiff import load
from sd15.samplers import CFGDenoiser, EpsDenoiser, discrete_sigmas, sd15_alphas_cumprod, sigma_to_t, t_to_sigma

AC = sd15_alphas_cumprod()


def f32(v):
    return float(np.float32(v))


@pytest.fixture(scope="module")
def kd():
    pkg, reason = load()
    if pkg is None:
        pytest.skip(reason)
    return pkg


def recording_unet(x, t, context):
    recording_unet.calls.append((x, t, context))
    c = context.float().mean(dim=(1, 2))[:, None, None, None]
    return (0.3 * torch.tanh(x.float()) + 0.1 * c + 1e-3 * t[:, None, None, None]).to(x.dtype)


recording_unet.calls = []


# ---------------------------------------------------------------------------------------------
# ā, the σ table, σ <-> t (anchor values)
# ---------------------------------------------------------------------------------------------

def test_appendix_a1_anchors():
    assert AC.dtype == torch.float32
    assert AC[0].item() == f32(0.99915) and AC[999].item() == f32(0.0046600983)
    sigmas = discrete_sigmas(AC)
    for i, v in [(0, 0.029167535), (1, 0.04131448), (500, 1.6182789), (998, 14.526276), (999, 14.614642)]:
        assert sigmas[i].item() == f32(v)
    assert (sigmas[0].item(), sigmas[-1].item()) == (0.02916753478348255, 14.614642143249512)
    log_sigmas = sigmas.log()
    t = sigma_to_t(torch.tensor([1.0, 0.5, sigmas[-1].item(), sigmas[0].item()]), log_sigmas)
    assert t.tolist() == pytest.approx([353.89038, 169.31476, 999.0, 0.0], rel=1e-7, abs=1e-6)
    assert t_to_sigma(torch.tensor(500.5), log_sigmas).item() == pytest.approx(1.6209832, rel=1e-7)


def test_sigma_t_maps_match_kdiffusion(kd):
    ref = kd.external.DiscreteEpsDDPMDenoiser(None, AC, quantize=False)
    den = EpsDenoiser(recording_unet, AC)
    gen = torch.Generator().manual_seed(0)
    sigma = torch.exp(torch.empty(500).uniform_(-5, 3.5, generator=gen))  # includes σ outside the table
    assert torch.equal(sigma_to_t(sigma, den.log_sigmas), ref.sigma_to_t(sigma))
    assert torch.equal(sigma_to_t(sigma, den.log_sigmas, quantize=True), ref.sigma_to_t(sigma, quantize=True))
    t = torch.empty(500).uniform_(0, 999, generator=gen)
    assert torch.equal(t_to_sigma(t, den.log_sigmas), ref.t_to_sigma(t))
    assert torch.equal(den.sigmas, ref.sigmas)


def test_forward_matches_kdiffusion_compvis_denoiser(kd):
    ref = kd.external.DiscreteEpsDDPMDenoiser(recording_unet, AC, quantize=False)
    den = EpsDenoiser(recording_unet, AC)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 5
    sigma = torch.tensor([14.6, 1.0, 0.05])
    context = torch.randn(3, 154, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(den(x, sigma, context), ref(x, sigma, context=context))


# ---------------------------------------------------------------------------------------------
# Half precision: A1111 casts the UNet input and t to fp16
# ---------------------------------------------------------------------------------------------

def test_half_precision_rounds_t_to_fp16():
    recording_unet.calls.clear()
    den = EpsDenoiser(recording_unet, AC, unet_dtype=torch.float16)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out = den(x, torch.tensor([1.0, 0.5]), torch.zeros(2, 77, 8))
    x_in, t_in, _ = recording_unet.calls[-1]
    assert x_in.dtype == torch.float16 and t_in.dtype == torch.float32
    assert t_in.tolist() == [354.0, 169.375]  # 353.89038 and 169.31476 on the fp16 grid (steps 0.25, 0.125)
    assert out.dtype == torch.float32
    full = EpsDenoiser(recording_unet, AC)
    full(x, torch.tensor([1.0, 0.5]), torch.zeros(2, 77, 8))
    assert recording_unet.calls[-1][1].tolist() == pytest.approx([353.89038, 169.31476], rel=1e-7)
    # the timestep samplers' path: UniPC's fractional t = 949.05 becomes 949.0 (fp16 step 0.5)
    den.eps(x, torch.tensor([949.05, 1.0]), torch.zeros(2, 77, 8))
    assert recording_unet.calls[-1][1].tolist() == [949.0, 1.0]


def test_unet_dtype_defaults_to_the_modules_parameters():
    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones((), dtype=torch.float16))

        def forward(self, x, t, context):
            return x * self.w

    assert EpsDenoiser(Half(), AC).unet_dtype == torch.float16
    assert EpsDenoiser(recording_unet, AC).unet_dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------

def make_inner():
    """A stand-in for EpsDenoiser (both call conventions) that records every UNet batch."""
    calls = []

    def inner(x, s, context):
        calls.append(("x0", x.clone(), s.clone(), context.clone()))
        return x * context.mean(dim=(1, 2))[:, None, None, None] + s[:, None, None, None]

    def eps(x, t, context):
        calls.append(("eps", x.clone(), t.clone(), context.clone()))
        return x * context.mean(dim=(1, 2))[:, None, None, None] - t[:, None, None, None]

    inner.eps, inner.calls = eps, calls
    return inner


def rows(x, s, context):
    """Per-row reference outputs of the stand-in."""
    return x * context.mean(dim=(1, 2))[:, None, None, None] + s[:, None, None, None]


X = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(4))
S = torch.tensor([2.0, 2.0])
COND = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(5))
UNCOND = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(6)) * 0.1


def test_cond_and_uncond_in_one_batch():
    inner = make_inner()
    out = CFGDenoiser(inner, COND, UNCOND, 7.0)(X, S)
    assert len(inner.calls) == 1
    _, x_in, s_in, ctx = inner.calls[0]
    assert torch.equal(x_in, torch.cat([X, X])) and torch.equal(s_in, torch.cat([S, S]))
    assert torch.equal(ctx, torch.cat([COND, UNCOND]))  # conds first, unconds last
    c, u = rows(X, S, COND), rows(X, S, UNCOND)
    assert torch.allclose(out, u + 7.0 * (c - u), rtol=1e-6, atol=1e-6)


def test_and_subprompts_with_weights_and_prompt_schedules():
    inner = make_inner()
    tensor = torch.randn(3, 77, 8, generator=torch.Generator().manual_seed(7))
    seen = []

    def cond(step):
        seen.append(step)
        return tensor, [[(0, 1.0), (1, 0.5)], [(2, 0.8)]]  # image 0: "a AND b :0.5", image 1: one prompt

    model = CFGDenoiser(inner, cond, lambda step: UNCOND, 5.0)
    out = model(X, S)
    model(X, S)
    assert seen == [0, 1] and model.step == 2
    _, x_in, _, ctx = inner.calls[0]
    assert torch.equal(x_in, torch.cat([X[:1], X[:1], X[1:], X]))  # image i repeated per subprompt, then uncond
    c = rows(x_in[:3], torch.full((3,), 2.0), tensor)
    u = rows(X, S, UNCOND)
    assert torch.allclose(out[0], u[0] + 5.0 * (c[0] - u[0]) + 2.5 * (c[1] - u[0]), atol=1e-5)
    assert torch.allclose(out[1], u[1] + 4.0 * (c[2] - u[1]), atol=1e-5)


def test_long_prompts_run_cond_and_uncond_as_separate_batches():
    inner = make_inner()
    cond = torch.randn(2, 154, 8, generator=torch.Generator().manual_seed(8))  # a 76-150 token prompt
    out = CFGDenoiser(inner, cond, UNCOND, 7.0)(X, S)
    assert [call[3].shape[1] for call in inner.calls] == [154, 77]
    c, u = rows(X, S, cond), rows(X, S, UNCOND)
    assert torch.allclose(out, u + 7.0 * (c - u), rtol=1e-6, atol=1e-6)


def test_pad_cond_uncond_with_the_empty_prompt():
    empty = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(9))
    cond = torch.randn(2, 154, 8, generator=torch.Generator().manual_seed(8))
    inner = make_inner()
    CFGDenoiser(inner, cond, UNCOND, 7.0, pad_cond_uncond=True, empty_cond=empty)(X, S)
    (_, _, _, ctx), = inner.calls
    assert torch.equal(ctx, torch.cat([cond, torch.cat([UNCOND, empty.expand(2, 77, 8)], dim=1)]))
    inner = make_inner()  # the cond is the shorter one
    CFGDenoiser(inner, COND, cond, 7.0, pad_cond_uncond=True, empty_cond=empty)(X, S)
    assert torch.equal(inner.calls[0][3][:2], torch.cat([COND, empty.expand(2, 77, 8)], dim=1))
    with pytest.raises(ValueError):
        CFGDenoiser(inner, COND, cond, 7.0, pad_cond_uncond=True)


def test_pad_cond_uncond_v0_repeats_or_truncates_the_uncond():
    cond = torch.randn(2, 154, 8, generator=torch.Generator().manual_seed(8))
    inner = make_inner()
    CFGDenoiser(inner, cond, UNCOND, 7.0, pad_cond_uncond_v0=True)(X, S)
    padded = torch.cat([UNCOND, UNCOND[:, -1:].expand(2, 77, 8)], dim=1)
    assert torch.equal(inner.calls[0][3], torch.cat([cond, padded]))
    inner = make_inner()
    CFGDenoiser(inner, COND, cond, 7.0, pad_cond_uncond_v0=True)(X, S)
    assert torch.equal(inner.calls[0][3], torch.cat([COND, cond[:, :77]]))


def test_s_min_uncond_skips_the_uncond_on_odd_calls_below_the_threshold():
    inner = make_inner()
    model = CFGDenoiser(inner, COND, UNCOND, 7.0, s_min_uncond=3.0)
    outs = [model(X, S) for _ in range(3)]  # σ = 2 < 3
    assert [call[1].shape[0] for call in inner.calls] == [4, 2, 4]
    assert torch.equal(outs[1], rows(X, S, COND))  # the cond output, unguided
    assert torch.allclose(outs[0], outs[2])
    inner = make_inner()
    model = CFGDenoiser(inner, COND, UNCOND, 7.0, s_min_uncond=3.0, s_min_uncond_all=True)
    model(X, S), model(X, S)
    assert [call[1].shape[0] for call in inner.calls] == [2, 2]
    inner = make_inner()
    model = CFGDenoiser(inner, COND, UNCOND, 7.0, s_min_uncond=1.5)  # σ = 2 is above: never skipped
    model(X, S), model(X, S)
    assert [call[1].shape[0] for call in inner.calls] == [4, 4]


def test_skip_early_cond_skips_the_first_fraction_then_ngms_and_notes_each_at_its_first_skip():
    """A1111 v1.10's `CFGDenoiser.forward`: calls with step / total_steps <= skip_early_cond run the cond
    rows only ("Skip Early CFG"); NGMS's entries appear only once it has skipped."""
    inner, notes = make_inner(), {}
    model = CFGDenoiser(inner, COND, UNCOND, 7.0, skip_early_cond=0.25, infotext=notes)
    model.total_steps = 10
    outs = [model(X, S) for _ in range(5)]
    assert [call[1].shape[0] for call in inner.calls] == [2, 2, 2, 4, 4]  # 0, 0.1, 0.2 <= 0.25 < 0.3
    assert torch.equal(outs[2], rows(X, S, COND)) and notes == {"Skip Early CFG": 0.25}
    inner, notes = make_inner(), {}
    model = CFGDenoiser(inner, COND, UNCOND, 7.0, s_min_uncond=1.5, infotext=notes)  # σ = 2: never below
    model(X, S), model(X, S)
    assert notes == {}
    model = CFGDenoiser(inner, COND, UNCOND, 7.0, s_min_uncond=3.0, infotext=notes)
    model(X, S)
    assert notes == {}  # step 0 is even: nothing skipped yet
    model(X, S)
    assert notes == {"NGMS": 3.0}
    model = CFGDenoiser(inner, COND, UNCOND, 7.0, s_min_uncond=3.0, s_min_uncond_all=True, skip_early_cond=0.1,
                        infotext=notes)
    model.total_steps = 4
    model(X, S), model(X, S)  # step 0 skipped early, step 1 by NGMS
    assert list(notes.items()) == [("NGMS", 3.0), ("Skip Early CFG", 0.1), ("NGMS all steps", True)]


def test_eps_mode_guides_the_timestep_path():
    inner = make_inner()
    t = torch.tensor([951.0, 951.0])
    out = CFGDenoiser(inner, COND, UNCOND, 7.0).eps(X, t)
    assert [call[0] for call in inner.calls] == ["eps"]
    c = X * COND.mean(dim=(1, 2))[:, None, None, None] - 951.0
    u = X * UNCOND.mean(dim=(1, 2))[:, None, None, None] - 951.0
    assert torch.allclose(out, u + 7.0 * (c - u), rtol=1e-6, atol=1e-4)


def test_inpainting_blend_after_denoising_for_kdiffusion_and_before_for_timesteps():
    init = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(10))
    keep = (torch.arange(9).reshape(3, 3) % 2).float().expand(2, 4, 3, 3)  # 1 = keep the init latent
    inner = make_inner()
    model = CFGDenoiser(inner, COND, UNCOND, 7.0)
    model.set_mask(keep, 1 - keep, init)
    c, u = rows(X, S, COND), rows(X, S, UNCOND)
    assert torch.allclose(model(X, S), (u + 7.0 * (c - u)) * (1 - keep) + init * keep, rtol=1e-6, atol=1e-6)
    assert torch.equal(inner.calls[0][1], torch.cat([X, X]))  # the model saw the unblended x
    model.eps(X, S)
    blended = X * (1 - keep) + init * keep
    assert torch.equal(inner.calls[1][1], torch.cat([blended, blended]))  # timestep samplers: blended input


def test_preview_latent_is_the_live_preview_content_of_the_last_call():
    """A1111's `live_preview_content`: each image's first cond row, the uncond rows (the cond's when NGMS
    skipped them) or the guided result after the inpainting blend; the sampler's numbers are untouched."""
    init = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(10))
    keep = (torch.arange(9).reshape(3, 3) % 2).float().expand(2, 4, 3, 3)
    inner = make_inner()
    model = CFGDenoiser(inner, COND, UNCOND, 7.0, s_min_uncond=3.0)
    model.set_mask(keep, 1 - keep, init)
    out = model(X, S)
    ref = rows(*inner.calls[0][1:])  # the UNet batch's outputs: 2 cond rows, 2 uncond rows
    assert torch.equal(model.preview_latent("Prompt"), ref[:2]) and torch.equal(model.preview_latent(), ref[:2])
    assert torch.equal(model.preview_latent("Negative prompt"), ref[2:])
    assert torch.equal(model.preview_latent("Combined"), out) and not torch.equal(out, ref[:2])
    model(X, S)  # σ = 2 < 3 on an odd call: the uncond is skipped, its rows are the cond's
    ref = rows(*inner.calls[1][1:])
    assert torch.equal(model.preview_latent("Negative prompt"), ref) and torch.equal(model.preview_latent(), ref)

    tensor = torch.randn(3, 77, 8, generator=torch.Generator().manual_seed(7))
    inner = make_inner()
    model = CFGDenoiser(inner, lambda step: (tensor, [[(0, 1.0), (1, 0.5)], [(2, 0.8)]]), UNCOND, 5.0)
    out = model(X, S)
    ref = rows(*inner.calls[0][1:])  # rows: image 0's two subprompts, image 1's, then 2 uncond rows
    assert torch.equal(model.preview_latent("Prompt"), ref[[0, 2]])
    assert torch.equal(model.preview_latent("Negative prompt"), ref[3:])
    assert torch.equal(model.preview_latent("Combined"), out)


def test_preview_latent_of_timestep_samplers_is_x0_from_eps():
    """A1111's `CFGDenoiserTimesteps.get_pred_x0`: x₀ = (x − sqrt(1 − ā_t)·ε) / sqrt(ā_t), t truncated, x the
    blended model input."""
    init = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(10))
    keep = (torch.arange(9).reshape(3, 3) % 2).float().expand(2, 4, 3, 3)
    inner = make_inner()
    inner.alphas_cumprod = AC
    model = CFGDenoiser(inner, COND, UNCOND, 7.0)
    model.set_mask(keep, 1 - keep, init)
    eps = model.eps(X, torch.tensor([951.7, 951.7]))
    _, x_in, t_in, ctx = inner.calls[0]
    e = x_in * ctx.mean(dim=(1, 2))[:, None, None, None] - t_in[:, None, None, None]
    x, a = X * (1 - keep) + init * keep, AC[951]
    for content, want in [("Prompt", e[:2]), ("Negative prompt", e[2:]), ("Combined", eps)]:
        assert torch.equal(model.preview_latent(content), (x - (1 - a).sqrt() * want) / a.sqrt())
