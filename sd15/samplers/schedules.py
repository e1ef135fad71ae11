"""The LDM σ table and A1111 v1.10's twelve "Schedule type"s as plain functions (ldm `register_schedule`,
k-diffusion `external.DiscreteSchedule` and `sampling.get_sigmas_*`, A1111 `modules/sd_schedulers.py`).

Each returns a descending float32 CPU tensor of n + 1 values ending in 0, except KL Optimal (it ends at σ_min,
as in A1111) and DDIM (its length depends on 1000 // n).
"""

import math

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# ā and the discrete σ table
# ---------------------------------------------------------------------------------------------

def sd15_alphas_cumprod() -> torch.Tensor:
    """SD 1.5's ā: betas = linspace(√0.00085, √0.012, 1000)² and cumprod(1 − β) in float64, stored float32."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.from_numpy(np.cumprod(1.0 - betas.numpy())).float()


def discrete_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_i = sqrt((1 − ā_i) / ā_i) in float32, ascending (i = 0..999)."""
    ac = alphas_cumprod.float()
    return ((1 - ac) / ac) ** 0.5


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """Continuous timestep of σ: linear interpolation in log σ between neighbouring table entries."""
    log_sigma = sigma.log()
    dists = log_sigma - log_sigmas[:, None]  # (1000, N)
    if quantize:
        return dists.abs().argmin(dim=0).view(sigma.shape)
    # low = last index with log_sigmas[low] <= log σ (0 if none), kept below the last entry
    low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)


def t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """σ of a (fractional) timestep: exp of the linear interpolation of log σ."""
    t = t.float()
    low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp()


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# ---------------------------------------------------------------------------------------------
# The schedules (n = number of non-zero σ; A1111 passes steps, +1 when discarding the penultimate)
# ---------------------------------------------------------------------------------------------

def sigmas_uniform(n: int, log_sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion's DiscreteSchedule.get_sigmas(n): t = linspace(999, 0, n), mapped to σ."""
    t = torch.linspace(len(log_sigmas) - 1, 0, n, device=log_sigmas.device)
    return _append_zero(t_to_sigma(t, log_sigmas))


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: σ evenly spaced in σ^(1/ρ)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """σ evenly spaced in log σ."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """log σ following a polynomial ramp of degree ρ (ρ = 1 is Exponential)."""
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def sigmas_normal(n: int, sigma_min: float, sigma_max: float, log_sigmas: torch.Tensor,
                  sgm: bool = False) -> torch.Tensor:
    """n evenly spaced timesteps from t(σ_max) to t(σ_min) inclusive (in practice equal to Uniform); SGM
    Uniform (`sgm`) spaces n + 1 of them and drops the last."""
    start = sigma_to_t(torch.tensor(sigma_max), log_sigmas)
    end = sigma_to_t(torch.tensor(sigma_min), log_sigmas)
    ts = torch.linspace(start, end, n + 1)[:-1] if sgm else torch.linspace(start, end, n)
    return torch.tensor([float(t_to_sigma(t, log_sigmas)) for t in ts] + [0.0])


def sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """KL-optimal schedule (Sabour et al. 2024, "Align Your Steps"): evenly spaced in atan σ; no trailing 0."""
    alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    frac = torch.arange(n + 1) / n
    return torch.tan(frac * alpha_min + (1.0 - frac) * alpha_max)


AYS_SD1_SIGMAS = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]


def sigmas_align_your_steps(n: int) -> torch.Tensor:
    """NVIDIA's Align Your Steps list for SD 1.x, log-linearly interpolated to n points (float64 numpy)."""
    if n == len(AYS_SD1_SIGMAS):
        return torch.tensor(AYS_SD1_SIGMAS + [0.0])
    xs = np.linspace(0, 1, len(AYS_SD1_SIGMAS))
    ys = np.log(AYS_SD1_SIGMAS[::-1])  # ascending
    sigmas = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1]
    return torch.tensor(np.append(sigmas, 0.0), dtype=torch.float32)


def sigmas_simple(n: int, sigmas_table: torch.Tensor) -> torch.Tensor:
    """Every (1000/n)-th entry of the σ table, from the top."""
    ss = len(sigmas_table) / n
    return torch.tensor([float(sigmas_table[-(1 + int(x * ss))]) for x in range(n)] + [0.0])


def sigmas_ddim(n: int, sigmas_table: torch.Tensor) -> torch.Tensor:
    """The σ of DDIM's timesteps 1, 1+s, 1+2s, … (s = 1000 // n), descending; may hold more than n+1 values."""
    ss = max(len(sigmas_table) // n, 1)
    return torch.tensor([float(s) for s in sigmas_table[1::ss]][::-1] + [0.0])


def sigmas_beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Beta schedule (Lee et al. 2024, arXiv:2407.12173): σ = σ_min + q·(σ_max − σ_min), q the Beta(α, β)
    quantiles of 1 − linspace(0, 1, n); linear in σ, not mapped through timesteps."""
    q = [beta_ppf(u, alpha, beta) for u in 1 - np.linspace(0, 1, n)]
    return torch.tensor([sigma_min + x * (sigma_max - sigma_min) for x in q] + [0.0])


# ---------------------------------------------------------------------------------------------
# Beta-distribution quantile (scipy.stats.beta.ppf without scipy), float64
# ---------------------------------------------------------------------------------------------

def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), 0 < x < 1, by its continued fraction (modified Lentz;
    Numerical Recipes 6.4)."""
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean; use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * f / a


def beta_ppf(u: float, a: float, b: float) -> float:
    """Inverse of I_x(a, b): bisection to the last bit of a double (monotone, so always converges)."""
    if u <= 0.0:
        return 0.0
    if u >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _betainc(a, b, mid) < u:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
