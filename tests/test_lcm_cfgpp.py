"""LCM and DDIM CFG++ (A1111 v1.10's `sd_samplers_lcm` and `ddim_cfgpp`) against hand computations on a toy
ε model: every quantity is worked out here step by step in float64 from the definitions, not by calling the
code under test."""
import math

import numpy as np
import pytest
import torch

from sd15.rng import ImageRNG
from sd15.samplers import get_sigmas, make_denoiser, sample, sd15_alphas_cumprod

AC = sd15_alphas_cumprod()  # (1000,) float32
SHAPE = (4, 3, 3)


def toy_unet(x, t, context):
    """ε(x, t, c): depends on the input, the timestep and the conditioning, so every path is exercised."""
    return 0.3 * x + 1e-4 * t[:, None, None, None] + context.mean(dim=(1, 2))[:, None, None, None]


COND = torch.full((1, 77, 8), 0.2)
UNCOND = torch.full((1, 77, 8), -0.1)


def draws(seed, n):
    """The image RNG's first n draws for `seed` (the initial noise, then the sampler's noise), as float64."""
    rng = ImageRNG(SHAPE, [seed])
    return [rng.next().double() for _ in range(n)]


def eps64(x, t, context):
    return 0.3 * x + 1e-4 * t + float(context.mean())


# ---------------------------------------------------------------------------------------------
# LCM
# ---------------------------------------------------------------------------------------------

def lcm_table():
    """LCM's 50 "original" timesteps t_j = 20 j + 19 and their σ_j = sqrt((1 − ā)/ā), ascending."""
    ac = AC.double().numpy()
    ts = np.array([20 * j + 19 for j in range(50)])
    return ts, np.sqrt((1 - ac[ts]) / ac[ts])


def test_lcm_schedule_is_uniform_over_its_50_timesteps():
    _, table = lcm_table()
    steps = 4
    idx = np.linspace(49, 0, steps)  # A1111: linspace(sigma_to_t(σ_max), sigma_to_t(σ_min)) in LCM's t space
    expected = []
    for i in idx:
        lo, hi = int(math.floor(i)), int(math.ceil(i))
        w = i - lo
        expected.append(math.exp((1 - w) * math.log(table[lo]) + w * math.log(table[hi])))
    ac_lcm = AC[19::20]
    got = get_sigmas("Automatic", steps, ac_lcm, sampler="LCM")
    assert np.allclose(got[:-1].double().numpy(), expected, rtol=1e-5) and got[-1] == 0


def test_lcm_txt2img_matches_hand_computation():
    steps, cfg, seed = 4, 2.0, 11  # 4 steps: no σ halfway between two of the 50 (a tie for argmin)
    ts, table = lcm_table()
    sigmas = [float(s) for s in get_sigmas("Automatic", steps, AC[19::20])]  # checked by the test above
    noise = draws(seed, steps + 1)
    x = noise[0] * sigmas[0]

    def lcm_denoise(x, s):  # LCMCompVisDenoiser under CFG, from its definition
        j = int(np.argmin(np.abs(np.log(s) - np.log(table))))
        t = 20 * j + 19
        x_in = x / math.sqrt(s * s + 1)
        e_c, e_u = eps64(x_in, t, COND), eps64(x_in, t, UNCOND)
        outs = []
        for e in (e_c, e_u):
            x0 = x - s * e
            st = 10.0 * t
            outs.append(st / math.sqrt(st ** 2 + 0.25) * x0 + 0.25 / (st ** 2 + 0.25) * x)
        c, u = outs
        return u + cfg * (c - u)

    for i in range(steps):
        x = lcm_denoise(x, sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise[i + 1]

    rng = ImageRNG(SHAPE, [seed])
    denoiser = make_denoiser("LCM", toy_unet, AC, COND, UNCOND, cfg)
    got = sample("LCM", denoiser, rng, steps)
    assert torch.allclose(got.double(), x, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# DDIM CFG++
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [1.0, 7.5])
def test_ddim_cfgpp_txt2img_matches_hand_computation(cfg):
    steps, seed = 5, 3
    ac = AC.double().numpy()
    grid = [1 + k * (1000 // steps) for k in range(steps)]  # LDM's DDIM grid: 1, 201, 401, 601, 801
    x = draws(seed, 1)[0]
    scale = cfg / 12.5  # CFG++ maps the guidance scale [0, 12.5] onto [0, 1]
    for index in range(len(grid) - 1, 0, -1):
        t, t_prev = grid[index], grid[index - 1]
        e_c, e_u = eps64(x, t, COND), eps64(x, t, UNCOND)
        e = e_u + scale * (e_c - e_u)
        x0 = (x - math.sqrt(1 - ac[t]) * e) / math.sqrt(ac[t])
        x = math.sqrt(ac[t_prev]) * x0 + math.sqrt(1 - ac[t_prev]) * e_u  # the direction is the uncond ε

    rng = ImageRNG(SHAPE, [seed])
    denoiser = make_denoiser("DDIM CFG++", toy_unet, AC, COND, UNCOND, cfg)
    got = sample("DDIM CFG++", denoiser, rng, steps)
    assert torch.allclose(got.double(), x, rtol=1e-5, atol=1e-5)
    if cfg != 1.0:  # and it is not plain DDIM
        plain = sample("DDIM", make_denoiser("DDIM", toy_unet, AC, COND, UNCOND, cfg), ImageRNG(SHAPE, [seed]), steps)
        assert not torch.allclose(plain, got, atol=1e-3)
