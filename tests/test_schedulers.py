"""A1111's schedule types against recorded 20-step values, k-diffusion's get_sigmas_* and independent
float64 formulas, for several step counts."""

import math

import numpy as np
import pytest
import torch

from _kdiff import load
from sd15.samplers import A1111_DEFAULTS, get_sigmas, sd15_alphas_cumprod, split_sampler_name
from sd15.samplers.schedules import beta_ppf

AC = sd15_alphas_cumprod()
SIGMA_MIN, SIGMA_MAX = 0.02916753478348255, 14.614642143249512
STEPS = [1, 2, 3, 7, 10, 11, 20, 30, 50]
LABELS = ["Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal", "Align Your Steps",
          "Simple", "Normal", "DDIM", "Beta"]


@pytest.fixture(scope="module")
def kd():
    pkg, reason = load()
    if pkg is None:
        pytest.skip(reason)
    return pkg


@pytest.fixture(scope="module")
def table(kd):
    """k-diffusion's own DiscreteSchedule over SD 1.5's ā (σ table, σ<->t)."""
    return kd.external.DiscreteEpsDDPMDenoiser(None, AC, quantize=False)


# ---------------------------------------------------------------------------------------------
# Recorded A1111 schedules: 20 steps, 6 significant digits
# ---------------------------------------------------------------------------------------------

UNIFORM_20 = [14.6146, 10.7468, 8.08152, 6.20494, 4.85565, 3.86538, 3.12376, 2.55717, 2.11566, 1.76482, 1.48058,
              1.24581, 1.04814, 0.878428, 0.729719, 0.596434, 0.473585, 0.355545, 0.232164, 0.0291675, 0]
EXPONENTIAL_20 = [14.6146, 10.5363, 7.59608, 5.47634, 3.94812, 2.84637, 2.05207, 1.47942, 1.06658, 0.768942,
                  0.554363, 0.399664, 0.288135, 0.207729, 0.14976, 0.107969, 0.0778391, 0.0561175, 0.0404575,
                  0.0291675, 0]
A2 = {
    "Automatic": UNIFORM_20,
    "Uniform": UNIFORM_20,
    "Normal": UNIFORM_20,
    "Karras": [14.6146, 11.7254, 9.34021, 7.38363, 5.78942, 4.49984, 3.46475, 2.64085, 1.99092, 1.48322, 1.09079,
               0.790949, 0.564725, 0.396392, 0.27304, 0.184169, 0.121342, 0.0778608, 0.0484819, 0.0291675, 0],
    "Exponential": EXPONENTIAL_20,
    "Polyexponential": EXPONENTIAL_20,
    "SGM Uniform": [14.6146, 10.9073, 8.30717, 6.44769, 5.09241, 4.08608, 3.32507, 2.73908, 2.27973, 1.91321,
                    1.61558, 1.36964, 1.16286, 0.985955, 0.831884, 0.69515, 0.571189, 0.455736, 0.343705, 0.225452, 0],
    "KL Optimal": [14.6146, 6.99565, 4.56504, 3.35945, 2.63289, 2.14274, 1.78645, 1.51315, 1.29477, 1.11448,
                   0.961588, 0.828962, 0.711627, 0.606002, 0.50942, 0.419837, 0.335638, 0.255509, 0.178347,
                   0.103189, 0.0291675],
    "Align Your Steps": [14.615, 9.52171, 6.30118, 4.80002, 3.7179, 3.07814, 2.54891, 2.11152, 1.77025, 1.51101,
                         1.26604, 1.0413, 0.851409, 0.693412, 0.544092, 0.420168, 0.265765, 0.15992, 0.0693511,
                         0.029, 0],
    "Simple": [14.6146, 10.9042, 8.3028, 6.44296, 5.08776, 4.08173, 3.32108, 2.73547, 2.27646, 1.91025, 1.61289,
               1.36717, 1.16058, 0.983817, 0.82986, 0.693205, 0.569285, 0.453819, 0.341674, 0.223003, 0],
    "DDIM": [11.0283, 8.39069, 6.5064, 5.13443, 4.1167, 3.34776, 2.7562, 2.29285, 1.92344, 1.62369, 1.37618,
             1.16822, 0.990409, 0.835653, 0.698398, 0.57405, 0.458333, 0.346187, 0.228147, 0.0413145, 0],
    "Beta": [14.6146, 14.4152, 13.9863, 13.3927, 12.6674, 11.8355, 10.9186, 9.9368, 8.90907, 7.85399, 6.78982,
             5.73474, 4.70701, 3.72519, 2.80831, 1.97637, 1.25107, 0.657488, 0.228567, 0.0291675, 0],
}


@pytest.mark.parametrize("label", list(A2))
def test_appendix_a2_twenty_steps(label):
    sigmas = get_sigmas(label, 20, AC)
    assert sigmas.dtype == torch.float32 and len(sigmas) == 21
    for value, expected in zip(sigmas.tolist(), A2[label]):
        assert abs(value - expected) <= 6e-6 * abs(expected)  # printed to 6 significant digits


def test_karras_exact_first_values():
    assert get_sigmas("Karras", 20, AC)[:2].tolist() == [14.614643096923828, 11.72536849975586]


# ---------------------------------------------------------------------------------------------
# Several step counts, against k-diffusion and independent formulas
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", STEPS)
def test_kdiffusion_schedules(kd, table, n):
    s = kd.sampling
    assert torch.equal(get_sigmas("Uniform", n, AC), table.get_sigmas(n))
    assert torch.equal(get_sigmas("Karras", n, AC), s.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX))
    assert torch.equal(get_sigmas("Exponential", n, AC), s.get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX))
    assert torch.equal(get_sigmas("Polyexponential", n, AC), s.get_sigmas_polyexponential(n, SIGMA_MIN, SIGMA_MAX))
    assert torch.equal(get_sigmas("Karras", n, AC, rho=3.0), s.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX, rho=3.0))
    assert torch.equal(get_sigmas("Polyexponential", n, AC, rho=2.0),
                       s.get_sigmas_polyexponential(n, SIGMA_MIN, SIGMA_MAX, rho=2.0))
    assert torch.equal(get_sigmas("Karras", n, AC, sigma_min=0.1, sigma_max=10.0), s.get_sigmas_karras(n, 0.1, 10.0))


@pytest.mark.parametrize("n", STEPS)
def test_timestep_based_schedules(table, n):
    """SGM Uniform / Normal: σ of evenly spaced continuous timesteps; Simple / DDIM: σ-table entries."""
    t_max, t_min = table.sigma_to_t(torch.tensor(SIGMA_MAX)), table.sigma_to_t(torch.tensor(SIGMA_MIN))
    sgm = [table.t_to_sigma(t).item() for t in torch.linspace(t_max, t_min, n + 1)[:-1]] + [0.0]
    normal = [table.t_to_sigma(t).item() for t in torch.linspace(t_max, t_min, n)] + [0.0]
    sig = table.sigmas.tolist()
    simple = [sig[999 - int(x * 1000 / n)] for x in range(n)] + [0.0]
    ss = max(1000 // n, 1)
    ddim = [sig[x] for x in range(1, 1000, ss)][::-1] + [0.0]
    assert get_sigmas("SGM Uniform", n, AC).tolist() == sgm
    assert get_sigmas("Normal", n, AC).tolist() == normal
    assert get_sigmas("Simple", n, AC).tolist() == simple
    assert get_sigmas("DDIM", n, AC).tolist() == ddim
    assert len(ddim) == math.ceil(999 / ss) + 1


@pytest.mark.parametrize("n", STEPS)
def test_formula_schedules(n):
    """KL Optimal, Align Your Steps and Beta from float64 formulas."""
    i = np.arange(n + 1)
    kl = np.tan(i / n * math.atan(SIGMA_MIN) + (1 - i / n) * math.atan(SIGMA_MAX))
    assert np.allclose(get_sigmas("KL Optimal", n, AC).numpy(), kl, rtol=1e-6, atol=0)

    ays = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    if n == 11:
        expected = ays + [0.0]
    else:  # log σ (ascending list) interpolated at linspace(0, 1, n), written out by hand, then reversed
        logs = [math.log(v) for v in reversed(ays)]
        expected = []
        for k in range(n):
            pos = 10 * (k / (n - 1) if n > 1 else 0.0)
            j = min(int(pos), 9)
            expected.append(math.exp(logs[j] + (pos - j) * (logs[j + 1] - logs[j])))
        expected = expected[::-1] + [0.0]
    assert np.allclose(get_sigmas("Align Your Steps", n, AC).numpy(), expected, rtol=1e-6, atol=0)

    u = 1 - np.linspace(0, 1, n)
    q = [beta_ppf(v, 0.6, 0.6) for v in u]
    beta = [SIGMA_MIN + x * (SIGMA_MAX - SIGMA_MIN) for x in q] + [0.0]
    assert np.allclose(get_sigmas("Beta", n, AC).numpy(), beta, rtol=1e-7, atol=0)


def test_beta_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for a, b in [(0.6, 0.6), (0.5, 0.7), (2.0, 3.0), (1.0, 1.0)]:
        for u in [0.0, 1e-9, 0.01, 0.2, 0.5, 0.77, 0.999, 1.0]:
            assert beta_ppf(u, a, b) == pytest.approx(stats.beta.ppf(u, a, b), rel=1e-12, abs=1e-15)
    n = 20
    q = stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6)
    expected = torch.tensor([SIGMA_MIN + x * (SIGMA_MAX - SIGMA_MIN) for x in q] + [0.0], dtype=torch.float32)
    assert torch.equal(get_sigmas("Beta", n, AC), expected)
    assert not torch.equal(get_sigmas("Beta", n, AC, beta_alpha=0.5), expected)


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("n", STEPS)
def test_lengths_and_trailing_zero(label, n):
    sigmas = get_sigmas(label, n, AC)
    if label == "KL Optimal":  # A1111 appends no 0: the last step ends at σ_min
        assert len(sigmas) == n + 1 and sigmas[-1].item() == pytest.approx(SIGMA_MIN, rel=1e-6)
    else:
        assert sigmas[-1] == 0 and (len(sigmas) == n + 1 or label == "DDIM")
    assert bool((sigmas[:-1] > sigmas[1:]).all()) or n == 1 and label == "KL Optimal"


# ---------------------------------------------------------------------------------------------
# "Automatic", discarded penultimate σ, names
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n, d in A1111_DEFAULTS.items() if not d.timesteps])
def test_automatic_is_the_samplers_default(name):
    expected_label = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2S a": "Karras", "DPM2": "Karras",
                      "DPM2 a": "Karras", "Restart": "Karras", "DPM++ 2M SDE": "Exponential",
                      "DPM++ 2M SDE Heun": "Exponential", "DPM++ 3M SDE": "Exponential"}.get(name, "Uniform")
    discard = name in ("DPM2", "DPM2 a", "DPM++ 3M SDE")
    sigmas = get_sigmas("Automatic", 10, AC, sampler=name)
    plain = get_sigmas(expected_label, 11 if discard else 10, AC)
    if discard:  # made for 11 steps, then the last non-zero σ is dropped: still 10 steps
        plain = torch.cat([plain[:-2], plain[-1:]])
    assert torch.equal(sigmas, plain) and len(sigmas) == 11
    assert torch.equal(get_sigmas(None, 10, AC, sampler=name), sigmas)


def test_discard_applies_to_any_schedule_and_the_option():
    karras_11 = get_sigmas("Karras", 11, AC)
    assert torch.equal(get_sigmas("Karras", 10, AC, sampler="DPM2"), torch.cat([karras_11[:-2], karras_11[-1:]]))
    uniform_11 = get_sigmas("Uniform", 11, AC)
    assert torch.equal(get_sigmas("Uniform", 10, AC, always_discard_penultimate=True),
                       torch.cat([uniform_11[:-2], uniform_11[-1:]]))


def test_scheduler_and_sampler_names():
    assert torch.equal(get_sigmas("karras", 5, AC), get_sigmas("Karras", 5, AC))
    assert torch.equal(get_sigmas("SGMUniform", 5, AC), get_sigmas("sgm_uniform", 5, AC))
    with pytest.raises(ValueError):
        get_sigmas("Karras Exponential", 5, AC)
    assert split_sampler_name("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert split_sampler_name("DPM++ SDE Karras") == ("DPM++ SDE", "Karras")
    assert split_sampler_name("Euler a") == ("Euler a", None)
    assert split_sampler_name("DPM++ 2M SDE Exponential") == ("DPM++ 2M SDE", "Exponential")
    with pytest.raises(ValueError):
        split_sampler_name("Euler b")
