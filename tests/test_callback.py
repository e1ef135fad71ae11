"""Every sampler reports every step the same way: i = 0, 1, …, the real σ the step starts from (a host
value) and a denoised tensor shaped like x (UniPC's last step included)."""
import math

import pytest
import torch

from sd15.samplers import A1111_DEFAULTS, SAMPLERS, EpsDenoiser, ddim_timesteps, get_sigmas, sd15_alphas_cumprod
from sd15.samplers.schedules import discrete_sigmas

AC = sd15_alphas_cumprod()
SHAPE = (1, 4, 8, 8)


def stub_unet(x, t, ctx):
    return torch.tanh(x) * 0.3 + (t / 1000.0)[:, None, None, None]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_step_reports_sigma_and_denoised(name):
    steps = 8
    den = EpsDenoiser(stub_unet, AC, unet_dtype=torch.float32)
    ctx = torch.zeros(1, 77, 8)
    g = torch.Generator().manual_seed(0)
    noise_sampler = lambda *a: torch.randn(SHAPE, generator=g)  # noqa: E731
    seen = []
    options = dict(A1111_DEFAULTS[name].options)
    if "s_tmax" in options:
        options["s_tmax"] = options["s_tmax"] or math.inf
    if name == "DDIM CFG++":  # the unconditional ε of the last call (here: a fixed stand-in)
        options["last_noise_uncond"] = lambda: torch.full(SHAPE, 0.1)
    if A1111_DEFAULTS[name].timesteps:
        ts = ddim_timesteps(steps)
        SAMPLERS[name](lambda x, t: den.eps(x, t, ctx), torch.randn(SHAPE, generator=g), ts, alphas_cumprod=AC,
                       noise_sampler=noise_sampler, callback=seen.append, **options)
    else:
        sigmas = get_sigmas("Automatic", steps, AC, sampler=name)
        SAMPLERS[name](lambda x, s: den(x, s, ctx), torch.randn(SHAPE, generator=g) * sigmas[0], sigmas,
                       noise_sampler=noise_sampler, callback=seen.append, **options)
    assert seen and [d["i"] for d in seen] == list(range(len(seen)))
    sig = [float(d["sigma"]) for d in seen]
    assert all(0 < s < 20 for s in sig), sig  # the real σ: SD 1.5's range is 0.029 .. 14.6
    if name not in ("DPM adaptive", "Restart"):  # adaptive repeats rejected steps, Restart jumps back up
        assert all(a > b for a, b in zip(sig, sig[1:])), sig
    for d in seen:
        assert isinstance(d["denoised"], torch.Tensor) and d["denoised"].shape == SHAPE
        assert torch.isfinite(d["denoised"]).all()
    if name in ("DDIM", "PLMS", "DDIM CFG++"):  # σ of each step's timestep, from the top
        table = discrete_sigmas(AC)
        expected = [float(table[t]) for t in ddim_timesteps(steps).flip(0)[:len(seen)]]
        assert sig == expected
    if name == "UniPC":  # starts at t = 1 (σ_max) and reports the last step too
        assert len(seen) == len(ddim_timesteps(steps))
        assert sig[0] == pytest.approx(float(discrete_sigmas(AC)[-1]), rel=1e-4)
