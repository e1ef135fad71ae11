"""Samplers against k-diffusion's own functions, A1111's Restart rules, toy regressions with values
recorded from A1111's flow, and A1111's per-sampler entry rules (`modules/sd_samplers_kdiffusion.py`)."""

import inspect

import pytest
import torch

from _kdiff import TorchWithNoise, load
from sd15.rng import ImageRNG, brownian_noise_sampler
from sd15.samplers import (A1111_DEFAULTS, SAMPLERS, CFGDenoiser, EpsDenoiser, ddim_timesteps, get_sigmas,
                           sample, sd15_alphas_cumprod)

AC = sd15_alphas_cumprod()
SHAPE = (2, 4, 8, 8)
TOL = 1e-5  # max |ours − reference| / max |reference|; same float32 maths, so usually ~1e-7 or 0


@pytest.fixture(scope="module")
def kd():
    pkg, reason = load()
    if pkg is None:
        pytest.skip(reason)
    return pkg.sampling


def toy_denoiser(x, sigma):
    """A nonlinear, σ-dependent stand-in for D(x, σ)."""
    s = sigma[:, None, None, None]
    return 0.9 * torch.tanh(x / (1 + s ** 2) ** 0.5) + 0.05 * torch.sin(2 * x) / (1 + s)


def counted(model):
    def wrapped(x, s):
        wrapped.calls.append(s.clone())
        return model(x, s)
    wrapped.calls = []
    return wrapped


def noise_stream(seed, shape=SHAPE):
    """A noise_sampler(σ, σ_next) that returns successive draws of its own generator."""
    gen = torch.Generator().manual_seed(seed)
    return lambda *args: torch.randn(shape, generator=gen)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def run_kd(kd, fn_name, *args, draw, **kwargs):
    """A k-diffusion sampler with its torch.randn_like draws taken from `draw` (as A1111 does)."""
    saved, kd.torch = kd.torch, TorchWithNoise(draw)
    try:
        return getattr(kd, fn_name)(*args, disable=True, **kwargs)
    finally:
        kd.torch = saved


def start(sigmas, seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * sigmas[0]


# ---------------------------------------------------------------------------------------------
# Every k-diffusion sampler against k-diffusion, same model, same injected noise
# ---------------------------------------------------------------------------------------------

CHURN = {"s_churn": 2.0, "s_tmin": 0.3, "s_tmax": 8.0, "s_noise": 1.003}
KD_CASES = [
    # (A1111 name, k-diffusion function, options, schedule)
    ("Euler", "sample_euler", {}, "Uniform"),
    ("Euler", "sample_euler", CHURN, "Uniform"),
    ("Euler a", "sample_euler_ancestral", {}, "Uniform"),
    ("Euler a", "sample_euler_ancestral", {"eta": 0.6, "s_noise": 0.9}, "Karras"),
    ("Euler a", "sample_euler_ancestral", {"eta": 3.0}, "Karras"),  # ... but noise here
    ("LMS", "sample_lms", {}, "Uniform"),
    ("LMS", "sample_lms", {}, "Karras"),
    ("Heun", "sample_heun", {}, "Uniform"),
    ("Heun", "sample_heun", CHURN, "Karras"),
    ("DPM2", "sample_dpm_2", {}, "Automatic"),
    ("DPM2", "sample_dpm_2", CHURN, "Automatic"),
    ("DPM2 a", "sample_dpm_2_ancestral", {}, "Automatic"),
    ("DPM2 a", "sample_dpm_2_ancestral", {"eta": 0.5, "s_noise": 1.1}, "Automatic"),
    ("DPM2 a", "sample_dpm_2_ancestral", {"eta": 3.0}, "Karras"),  # σ_down = 0 before σ = 0: no noise there
    ("DPM++ 2S a", "sample_dpmpp_2s_ancestral", {}, "Automatic"),
    ("DPM++ 2S a", "sample_dpmpp_2s_ancestral", {"eta": 0.0}, "Automatic"),
    ("DPM++ 2M", "sample_dpmpp_2m", {}, "Automatic"),
    ("DPM++ 2M", "sample_dpmpp_2m", {}, "Beta"),
    ("DPM++ SDE", "sample_dpmpp_sde", {}, "Automatic"),
    ("DPM++ SDE", "sample_dpmpp_sde", {"eta": 0.7, "s_noise": 0.95}, "Exponential"),
    ("DPM++ 2M SDE", "sample_dpmpp_2m_sde", {}, "Automatic"),
    ("DPM++ 2M SDE", "sample_dpmpp_2m_sde", {"eta": 0.5, "solver_type": "heun"}, "Karras"),
    ("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", {}, "Automatic"),
    ("DPM++ 3M SDE", "sample_dpmpp_3m_sde", {}, "Automatic"),
    ("DPM++ 3M SDE", "sample_dpmpp_3m_sde", {"eta": 0.4, "s_noise": 0.9}, "Karras"),
]


@pytest.mark.parametrize("name,kd_name,options,schedule", KD_CASES)
def test_matches_kdiffusion(kd, name, kd_name, options, schedule):
    sigmas = get_sigmas(schedule, 12, AC, sampler=name)
    x = start(sigmas)
    kd_options = dict(options, solver_type="heun") if name == "DPM++ 2M SDE Heun" else options
    takes_noise_sampler = "noise_sampler" in inspect.signature(getattr(kd, kd_name)).parameters
    kd_stream = noise_stream(1)
    ref = run_kd(kd, kd_name, toy_denoiser, x, sigmas, draw=kd_stream, **kd_options,
                 **({"noise_sampler": kd_stream} if takes_noise_sampler else {}))
    ours = SAMPLERS[name](toy_denoiser, x, sigmas, noise_sampler=noise_stream(1), **options)
    assert rel_err(ours, ref) <= TOL


@pytest.mark.filterwarnings("ignore:Should have")  # torchsde clamps σ_min/σ_max to its 1e-6 grid, as in A1111
@pytest.mark.parametrize("name,kd_name", [("DPM++ SDE", "sample_dpmpp_sde"), ("DPM++ 2M SDE", "sample_dpmpp_2m_sde"),
                                          ("DPM++ 3M SDE", "sample_dpmpp_3m_sde")])
def test_sde_samplers_with_brownian_trees_match_kdiffusion_and_torchsde(kd, name, kd_name):
    """Our Brownian trees against k-diffusion's BrownianTreeNoiseSampler (torchsde), seeded per image."""
    sigmas = get_sigmas("Automatic", 10, AC, sampler=name)
    x = start(sigmas, seed=3)
    seeds = [1234, 99]
    ref_ns = kd.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
    ref = run_kd(kd, kd_name, toy_denoiser, x, sigmas, draw=None, noise_sampler=ref_ns)
    ours = SAMPLERS[name](toy_denoiser, x, sigmas, noise_sampler=brownian_noise_sampler(x, sigmas, seeds, source="cpu"))
    assert rel_err(ours, ref) <= TOL


@pytest.mark.parametrize("n", [9, 10, 11])
def test_dpm_fast_matches_kdiffusion(kd, n):
    sigmas = get_sigmas("Uniform", n, AC)
    x = start(sigmas, seed=4)
    smin, smax = sigmas[-2].item(), sigmas[0].item()
    for eta in (1.0, 0.0):
        ref = run_kd(kd, "sample_dpm_fast", toy_denoiser, x, smin, smax, n, draw=None, eta=eta, s_noise=0.97,
                     noise_sampler=noise_stream(5))
        ours = SAMPLERS["DPM fast"](toy_denoiser, x, sigmas, noise_sampler=noise_stream(5), eta=eta, s_noise=0.97)
        assert rel_err(ours, ref) <= TOL


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_dpm_adaptive_matches_kdiffusion(kd, eta):
    sigmas = get_sigmas("Uniform", 10, AC)
    x = start(sigmas, seed=6)
    smin, smax = sigmas[-2].item(), sigmas[0].item()
    model_ref, model_ours = counted(toy_denoiser), counted(toy_denoiser)
    ref = run_kd(kd, "sample_dpm_adaptive", model_ref, x, smin, smax, draw=None, eta=eta,
                 noise_sampler=noise_stream(7))
    ours = SAMPLERS["DPM adaptive"](model_ours, x, sigmas, noise_sampler=noise_stream(7), eta=eta)
    assert len(model_ours.calls) == len(model_ref.calls)
    assert rel_err(ours, ref) <= TOL


def test_stochastic_samplers_refuse_to_draw_from_the_global_rng():
    sigmas = get_sigmas("Uniform", 4, AC)
    with pytest.raises(ValueError, match="noise_sampler"):
        SAMPLERS["Euler a"](toy_denoiser, start(sigmas), sigmas)
    # eta = 0 needs no noise at all, and equals Euler on the same schedule
    a = SAMPLERS["Euler a"](toy_denoiser, start(sigmas), sigmas, eta=0.0)
    assert torch.equal(a, SAMPLERS["Euler"](toy_denoiser, start(sigmas), sigmas))


# ---------------------------------------------------------------------------------------------
# Restart: A1111's restart_sampler rules, rebuilt from k-diffusion pieces
# ---------------------------------------------------------------------------------------------

def restart_reference(kd, model, x, sigmas, stream):
    """A1111's Restart (`restart_sampler` in `modules/sd_samplers_extra.py`): the step list, then one k-diffusion Heun step per pair."""
    steps = len(sigmas) - 1
    pairs = list(zip(sigmas[:-1], sigmas[1:]))
    if steps >= 20:
        restart_steps, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        main = kd.get_sigmas_karras(steps - restart_steps * times, sigmas[-2].item(), sigmas[0].item())
        lo = int((main - 0.1).abs().argmin())
        hi = int((main - 2.0).abs().argmin())
        up = kd.get_sigmas_karras(restart_steps + 1, main[lo].item(), main[hi].item())[:-1]
        before, restarts = list(zip(main[:lo], main[1:lo + 1])), list(zip(up[:-1], up[1:])) * times
        pairs = before + restarts + list(zip(main[lo:-1], main[lo + 1:]))
    last = None
    for old, new in pairs:
        if last is not None and last < old:
            x = x + stream() * (old ** 2 - last ** 2) ** 0.5
        x = run_kd(kd, "sample_heun", model, x, torch.stack([old, new]), draw=lambda: torch.zeros(SHAPE))
        last = new
    return x, pairs


@pytest.mark.parametrize("steps", [10, 20, 40])
def test_restart_matches_a1111_rules(kd, steps):
    sigmas = get_sigmas("Automatic", steps, AC, sampler="Restart")
    x = start(sigmas, seed=8)
    ref, pairs = restart_reference(kd, toy_denoiser, x, sigmas, noise_stream(9))
    model = counted(toy_denoiser)
    ours = SAMPLERS["Restart"](model, x, sigmas, noise_sampler=noise_stream(9))
    assert rel_err(ours, ref) <= TOL
    assert len(model.calls) == 2 * len(pairs) - 1  # Heun everywhere but the final Euler step onto 0
    if steps == 20:  # 11 main steps + 9 restart steps, restarting from σ ≈ 0.1 up to σ ≈ 2
        assert len(pairs) == 20


# ---------------------------------------------------------------------------------------------
# Toy regressions (values recorded from A1111's flow): CPU ImageRNG, seeds [1234, 1235], 4×8×8
# ---------------------------------------------------------------------------------------------

A4_KDIFF = [
    ("Euler", "Uniform", [-0.1038, -0.461393, 0.151516], -0.215772, 0.913991),
    ("Euler a", "Uniform", [-0.268389, -1.680338, 0.381625], -0.394346, 0.899062),
    ("Heun", "Uniform", [-0.112033, -0.497987, 0.163532], -0.232885, 0.986480),
    ("LMS", "Uniform", [-0.111255, -0.494532, 0.162398], -0.231270, 0.979635),
    ("DPM++ 2M", "Karras", [-0.112791, -0.501357, 0.164639], -0.234462, 0.993157),
    ("DPM++ SDE", "Karras", [0.087518, -0.526153, -1.237692], -0.320188, 0.948918),
    ("DPM++ 2M SDE", "Exponential", [0.250663, -0.917918, -1.45555], -0.376073, 0.974678),
]
A4_ATOL = 2e-6  # values printed to 6 significant digits; CPU randn itself may differ by ≤ 5e-7


def close(value, expected):
    return abs(value - expected) <= A4_ATOL + 1e-6 * abs(expected)


@pytest.mark.parametrize("name,schedule,first3,second,std", A4_KDIFF)
def test_appendix_a4_kdiffusion_toys(name, schedule, first3, second, std):
    rng = ImageRNG((4, 8, 8), [1234, 1235], source="cpu")
    sigmas = get_sigmas(schedule, 20, AC, sampler=name)
    x = rng.next() * sigmas[0]
    if A1111_DEFAULTS[name].brownian:
        noise_sampler = brownian_noise_sampler(x, sigmas, rng.seeds, source="cpu")
    else:
        noise_sampler = rng.noise_sampler()
    out = SAMPLERS[name](lambda x, s: x / (1 + s[:, None, None, None] ** 2), x, sigmas, noise_sampler=noise_sampler)
    assert all(close(v, e) for v, e in zip(out[0, 0, 0, :3].tolist(), first3))
    assert close(out[1, 0, 0, 0].item(), second) and close(out.std().item(), std)


def toy_eps(x, t):
    """ε(x, t) = sqrt(1 − ā(t))·x, ā linearly interpolated at fractional t (the timestep toy)."""
    lo, hi = t.floor().long(), t.ceil().long()
    a = AC[lo] * (1 - (t - lo)) + AC[hi] * (t - lo)
    return (1 - a).sqrt()[:, None, None, None] * x


A4_TIMESTEPS = [
    ("DDIM", 20, [-0.104672, -0.465269, 0.152788], 0.921668),
    ("PLMS", 20, [-0.111193, -0.494254, 0.162306], 0.979085),
    ("UniPC", 20, [-0.110137, -0.489561, 0.160766], 0.969790),
    ("DDIM", 30, [-0.106954, -0.475414, 0.15612], 0.941764),
    ("PLMS", 30, [-0.111403, -0.495188, 0.162613], 0.980935),
    ("UniPC", 30, [-0.110764, -0.492349, 0.161681], 0.975312),
]


@pytest.mark.parametrize("name,steps,first3,std", A4_TIMESTEPS)
def test_appendix_a4_timestep_toys_and_model_calls(name, steps, first3, std):
    rng = ImageRNG((4, 8, 8), [1234, 1235], source="cpu")
    timesteps = ddim_timesteps(steps)
    assert len(timesteps) == {20: 20, 30: 31}[steps] and timesteps[-1] == {20: 951, 30: 991}[steps]
    model = counted(toy_eps)
    out = SAMPLERS[name](model, rng.next(), timesteps, alphas_cumprod=AC)
    assert all(close(v, e) for v, e in zip(out[0, 0, 0, :3].tolist(), first3))
    assert close(out.std().item(), std)
    n = len(timesteps)
    assert len(model.calls) == {"DDIM": n - 1, "PLMS": n, "UniPC": n}[name]
    first_t = [c[0].item() for c in model.calls[:2]]
    if name == "DDIM":  # from the top timestep down to timesteps[1]
        assert [c[0].item() for c in model.calls] == timesteps.flip(0)[:-1].tolist()
    elif name == "PLMS":  # pseudo improved Euler: the top timestep, then the next one
        assert first_t == timesteps.flip(0)[:2].tolist()
    else:  # UniPC model time (t − 1/1000)·1000 on linspace(1, 1/1000, n + 1)
        assert first_t[0] == pytest.approx(999.0) and first_t[1] == pytest.approx(999 - 999 / n, abs=1e-3)


def test_ddim_eta_against_the_formula():
    """DDIM with eta: σ_t = eta·sqrt((1−a_prev)/(1−a)·(1−a/a_prev)), noise every step (float64 reference)."""
    timesteps, eta = ddim_timesteps(10), 0.8
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    ours = SAMPLERS["DDIM"](toy_eps, x0, timesteps, alphas_cumprod=AC, eta=eta, noise_sampler=noise_stream(12))
    stream, x, a = noise_stream(12), x0.double(), AC.double()
    for k in range(len(timesteps) - 1, 0, -1):
        at, ap = a[timesteps[k]], a[timesteps[k - 1]]
        e = toy_eps(x.float(), timesteps[k].float().expand(2)).double()
        sigma = eta * ((1 - ap) / (1 - at) * (1 - at / ap)).sqrt()
        x0 = (x - (1 - at).sqrt() * e) / at.sqrt()
        x = ap.sqrt() * x0 + (1 - ap - sigma ** 2).sqrt() * e + sigma * stream().double()
    assert rel_err(ours.double(), x) <= TOL
    with pytest.raises(ValueError, match="noise_sampler"):
        SAMPLERS["DDIM"](toy_eps, x0, timesteps, alphas_cumprod=AC, eta=eta)


def test_unipc_needs_as_many_steps_as_its_order():
    with pytest.raises(ValueError):
        SAMPLERS["UniPC"](toy_eps, torch.zeros(SHAPE), ddim_timesteps(2), alphas_cumprod=AC)


# ---------------------------------------------------------------------------------------------
# A1111's entry: sample(name, CFGDenoiser, ImageRNG, steps, ...)
# ---------------------------------------------------------------------------------------------

def toy_unet(x, t, context):
    """ε depending on x, t and the conditioning, so that CFG and timestep plumbing show up in the result."""
    c = context.mean(dim=(1, 2))[:, None, None, None]
    return 0.4 * torch.tanh(x) + 0.05 * c + 1e-4 * t[:, None, None, None]


def make_cfg():
    cond = torch.linspace(-1, 1, 2 * 77 * 8).reshape(2, 77, 8)
    return CFGDenoiser(EpsDenoiser(toy_unet, AC), cond, torch.zeros(2, 77, 8), 7.0)


def make_rng(**kwargs):
    return ImageRNG((4, 8, 8), [1234, 1235], source="cpu", **kwargs)


def test_entry_txt2img_kdiffusion():
    """x_T = first draw · σ_0; in-loop draws are the images' next draws; s_noise is not passed to Euler a."""
    sigmas = get_sigmas("Automatic", 8, AC, sampler="Euler a")
    rng = make_rng()
    expected = SAMPLERS["Euler a"](make_cfg(), rng.next() * sigmas[0], sigmas, noise_sampler=rng.noise_sampler())
    assert torch.equal(sample("Euler a", make_cfg(), make_rng(), 8), expected)
    assert torch.equal(sample("Euler a", make_cfg(), make_rng(), 8, s_noise=0.5), expected)
    assert not torch.equal(sample("Euler a", make_cfg(), make_rng(), 8, eta=0.5), expected)


def test_entry_img2img_kdiffusion_and_brownian_trees_over_the_full_schedule():
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(13))
    sigmas = get_sigmas("Automatic", 10, AC, sampler="DPM++ 2M SDE")
    rng = make_rng()
    sched = sigmas[10 - 5 - 1:]  # strength 0.5 of 10 steps: t_enc = 5, so 6 steps
    x = init + rng.next() * sched[0]
    model = make_cfg()
    trees = brownian_noise_sampler(x, sigmas, rng.seeds, source="cpu")
    expected = SAMPLERS["DPM++ 2M SDE"](model, x, sched, noise_sampler=trees)
    assert model.step == 6
    ours = sample("DPM++ 2M SDE", make_cfg(), make_rng(), 10, init_latent=init, denoising_strength=0.5)
    assert torch.equal(ours, expected)


def test_entry_img2img_initial_noise_multiplier():
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(15))
    sigmas = get_sigmas("Automatic", 10, AC, sampler="Euler")
    rng = make_rng()
    x = init + rng.next() * 0.5 * sigmas[2]  # strength 0.75: t_enc = 7, schedule from index 2
    expected = SAMPLERS["Euler"](make_cfg(), x, sigmas[2:])
    ours = sample("Euler", make_cfg(), make_rng(), 10, init_latent=init, initial_noise_multiplier=0.5)
    assert torch.equal(ours, expected)
    txt2img = sample("Euler", make_cfg(), make_rng(), 10)  # txt2img never applies it
    assert torch.equal(sample("Euler", make_cfg(), make_rng(), 10, initial_noise_multiplier=0.5), txt2img)


def test_entry_dpm_fast_uses_the_model_sigma_range_in_txt2img():
    cfg = make_cfg()
    sigmas = get_sigmas("Automatic", 7, AC, sampler="DPM fast")
    rng = make_rng()
    expected = SAMPLERS["DPM fast"](cfg, rng.next() * sigmas[0], sigmas, noise_sampler=rng.noise_sampler(),
                                    sigma_min=cfg.inner.sigma_min, sigma_max=cfg.inner.sigma_max, n=7)
    assert torch.equal(sample("DPM fast", make_cfg(), make_rng(), 7), expected)


@pytest.mark.parametrize("name", ["DDIM", "UniPC"])
def test_entry_img2img_timesteps(name):
    """Noise added at ā[ts[t_enc]], the sampler run on ts[:t_enc] (DDIM: t_enc − 1 model calls)."""
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(14))
    ts = ddim_timesteps(20)
    t_enc = 15  # int(0.75 · 20)
    rng = make_rng()
    a = AC[ts[t_enc]]
    x = init * a.sqrt() + rng.next() * (1 - a).sqrt()
    model = make_cfg()
    extra = {"img2img": True} if name == "UniPC" else {}
    expected = SAMPLERS[name](model.eps, x, ts[:t_enc], alphas_cumprod=AC, **extra)
    assert model.step == (t_enc - 1 if name == "DDIM" else t_enc)
    assert torch.equal(sample(name, make_cfg(), make_rng(), 20, init_latent=init, denoising_strength=0.75), expected)
    if name == "UniPC":  # img2img starts from t_T = ts[t_enc − 1]/1000 + 1/1000, not from 1
        assert not torch.equal(SAMPLERS[name](make_cfg().eps, x, ts[:t_enc], alphas_cumprod=AC), expected)


def test_entry_timestep_txt2img_starts_from_unscaled_noise():
    rng = make_rng()
    expected = SAMPLERS["PLMS"](make_cfg().eps, rng.next(), ddim_timesteps(10), alphas_cumprod=AC)
    assert torch.equal(sample("PLMS", make_cfg(), make_rng(), 10), expected)


def test_every_required_sampler_is_listed():
    required = ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE",
                "DPM++ 2M SDE", "DPM++ 3M SDE", "DPM fast", "DPM adaptive", "Restart", "DDIM", "PLMS", "UniPC"]
    assert set(required) <= set(SAMPLERS) and set(SAMPLERS) == set(A1111_DEFAULTS)
    assert list(SAMPLERS)[0] == "DPM++ 2M"  # A1111's default sampler
