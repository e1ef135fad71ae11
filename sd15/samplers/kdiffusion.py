"""k-diffusion's samplers (crowsonkb/k-diffusion `sampling.py` @ab527a9, with the options A1111 v1.10 passes)
and A1111's Restart, written from the published algorithms.

`sample_x(model, x, sigmas, *, noise_sampler=None, callback=None, **options) -> x`: `model(x, sigma)` returns
the denoised x₀ for a [B] σ; x starts at noise · sigmas[0]; `noise_sampler(sigma, sigma_next)` returns fresh
unit noise shaped like x (nothing here draws from the global RNG); `callback` gets k-diffusion's dict.
The scalar maths runs on 0-d float32 CPU tensors (`_host`: one device read per run), so the rounding matches
k-diffusion's and no step waits for the device. Noise that k-diffusion only multiplies by zero is not drawn.
"""

import math

import numpy as np
import torch

from .schedules import sigmas_karras


def ones_for(model, x):
    """Ones [B] that turn a σ into the model's input `σ · ones`: on the host for a model with
    `host_sigma = True` (sd15's CFGDenoiser, which prepares what it needs once per σ), else on x's device."""
    if getattr(getattr(model, "__self__", model), "host_sigma", False):
        return torch.ones(x.shape[0], dtype=x.dtype)
    return x.new_ones([x.shape[0]])


def _host(sigmas):
    """The schedule as a list of 0-d CPU tensors: one device read for the whole run."""
    return list(sigmas.detach().cpu().unbind())


def to_d(x, sigma, denoised):
    """Karras ODE derivative dx/dσ = (x − D(x, σ)) / σ."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split an ancestral step into a deterministic step to σ_down and fresh noise of std σ_up."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _t(sigma):
    return sigma.log().neg()  # λ = −log σ, the DPM-Solver time


def _sigma(t):
    return t.neg().exp()


def need_noise(noise_sampler, who):
    if noise_sampler is None:
        raise ValueError(f"{who} adds noise: pass noise_sampler (sd15.rng.ImageRNG.noise_sampler() "
                         "or sd15.rng.brownian_noise_sampler)")
    return noise_sampler


def report(callback, x, i, sigma, sigma_hat, denoised):
    """The per-step callback of every sampler here and in `timesteps.py`."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


# ---------------------------------------------------------------------------------------------
# Karras et al. (2022) Algorithm 2 (Euler, Heun, DPM2) and the ancestral samplers
# ---------------------------------------------------------------------------------------------

def _euler_step(model, x, denoised, sigma, sigma_next, s_in):
    """Euler's step from σ to σ_next. The step functions share one signature, taken by the loops below."""
    return x + to_d(x, sigma, denoised) * (sigma_next - sigma)


def _heun_step(model, x, denoised, sigma, sigma_next, s_in):
    """Heun's 2nd-order step (Karras et al. 2022, Algorithm 2, lines 8-11); an Euler step onto σ = 0."""
    d, dt = to_d(x, sigma, denoised), sigma_next - sigma
    x_2 = x + d * dt
    if sigma_next == 0:
        return x_2
    d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next * s_in))
    return x + (d + d_2) / 2 * dt


def _dpm2_step(model, x, denoised, sigma, sigma_next, s_in):
    """DPM-Solver-2's midpoint step in log σ (Lu et al. 2022); an Euler step onto σ = 0."""
    d = to_d(x, sigma, denoised)
    if sigma_next == 0:
        return x + d * (sigma_next - sigma)
    sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in))
    return x + d_2 * (sigma_next - sigma)


@torch.no_grad()
def _alg2(step, model, x, sigmas, noise_sampler, callback, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. (2022) Algorithm 2: churn σ up to σ̂ = σ(1 + γ) with fresh noise (lines 5-7), then
    `step` from σ̂ to σ_next. A1111 draws the noise every step once churn is on, even where γ = 0."""
    sigmas = _host(sigmas)
    s_in = ones_for(model, x)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        sigma_hat = sigma
        if s_churn > 0:
            gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
            sigma_hat = sigma * (gamma + 1)
            eps = need_noise(noise_sampler, "s_churn > 0")(sigma, sigma_next) * s_noise
            if gamma > 0:
                x = x + eps * (sigma_hat ** 2 - sigma ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        report(callback, x, i, sigma, sigma_hat, denoised)
        x = step(model, x, denoised, sigma_hat, sigma_next, s_in)
    return x


def sample_euler(model, x, sigmas, *, noise_sampler=None, callback=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler steps, Algorithm 2 of Karras et al. (2022)."""
    return _alg2(_euler_step, model, x, sigmas, noise_sampler, callback, s_churn, s_tmin, s_tmax, s_noise)


def sample_heun(model, x, sigmas, *, noise_sampler=None, callback=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun steps (2nd order), Algorithm 2 of Karras et al. (2022)."""
    return _alg2(_heun_step, model, x, sigmas, noise_sampler, callback, s_churn, s_tmin, s_tmax, s_noise)


def sample_dpm_2(model, x, sigmas, *, noise_sampler=None, callback=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2 midpoint steps in log σ (Lu et al. 2022) inside Karras et al.'s Algorithm 2."""
    return _alg2(_dpm2_step, model, x, sigmas, noise_sampler, callback, s_churn, s_tmin, s_tmax, s_noise)


def _dpmpp_2s_step(model, x, denoised, sigma, sigma_next, s_in):
    """DPM-Solver++(2S)'s single-step 2nd-order update in λ (midpoint r = 1/2); an Euler step onto σ = 0."""
    if sigma_next == 0:
        return _euler_step(model, x, denoised, sigma, sigma_next, s_in)
    t, t_next = _t(sigma), _t(sigma_next)
    h = t_next - t
    s = t + 0.5 * h
    x_2 = (_sigma(s) / _sigma(t)) * x - (-h * 0.5).expm1() * denoised
    denoised_2 = model(x_2, _sigma(s) * s_in)
    return (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2


@torch.no_grad()
def _ancestral(step, model, x, sigmas, noise_sampler, callback, eta, s_noise, renoise_at_0=True):
    """Ancestral sampling: `step` from σ down to σ_down, then fresh noise of std σ_up back up to σ_next > 0.
    Without `renoise_at_0` (DPM2 a) a step that lands on σ_down = 0 (eta > 1 can) gets no noise."""
    sigmas = _host(sigmas)
    s_in = ones_for(model, x)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = model(x, sigma * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        report(callback, x, i, sigma, sigma, denoised)
        x = step(model, x, denoised, sigma, sigma_down, s_in)
        if eta and (sigma_down > 0 or renoise_at_0 and sigma_next > 0):
            x = x + need_noise(noise_sampler, "eta > 0")(sigma, sigma_next) * s_noise * sigma_up
    return x


def sample_euler_ancestral(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with Euler steps (Euler a)."""
    return _ancestral(_euler_step, model, x, sigmas, noise_sampler, callback, eta, s_noise)


def sample_dpm_2_ancestral(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver-2 midpoint steps (DPM2 a)."""
    return _ancestral(_dpm2_step, model, x, sigmas, noise_sampler, callback, eta, s_noise, renoise_at_0=False)


def sample_dpmpp_2s_ancestral(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, arXiv:2211.01095)."""
    return _ancestral(_dpmpp_2s_step, model, x, sigmas, noise_sampler, callback, eta, s_noise)


def _lms_coeff(order, ts, i, j):
    """∫_{t_i}^{t_i+1} of the Lagrange basis polynomial ℓ_j through t_i, t_i-1, …, t_i-order+1.

    The integrand has degree order − 1, so `order`-point Gauss-Legendre quadrature is exact (k-diffusion
    uses scipy's quad, exact on these polynomials up to rounding). The knot differences are float32
    subtractions, as in k-diffusion, whose σ array is numpy float32.
    """
    def basis(tau):
        return math.prod((tau - float(ts[i - k])) / float(ts[i - j] - ts[i - k])
                         for k in range(order) if k != j)
    nodes, weights = np.polynomial.legendre.leggauss(order)
    a, b = float(ts[i]), float(ts[i + 1])
    half, mid = (b - a) / 2, (a + b) / 2
    return half * sum(w * basis(mid + half * node) for node, w in zip(nodes, weights))


@torch.no_grad()
def sample_lms(model, x, sigmas, *, noise_sampler=None, callback=None, order=4):
    """Linear multistep (Adams-Bashforth in σ) on the Karras ODE, order 4 (LMS)."""
    s_in = ones_for(model, x)
    ts = sigmas.detach().cpu().numpy()  # float32 knots
    sigmas = list(torch.from_numpy(ts).unbind())
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        report(callback, x, i, sigmas[i], sigmas[i], denoised)
        cur_order = min(i + 1, order)
        coeffs = [_lms_coeff(cur_order, ts, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


# ---------------------------------------------------------------------------------------------
# DPM-Solver++ family (Lu et al. 2022, arXiv:2211.01095), in λ = −log σ
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++ (stochastic): two SDE sub-steps per step, the second from the data estimate at the
    midpoint λ + h/2 (k-diffusion's r = 1/2, whose blend (1 − 1/2r)·D + 1/2r·D₂ is then D₂ alone)."""
    sigmas = _host(sigmas)
    s_in = ones_for(model, x)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = model(x, sigma * s_in)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = _euler_step(model, x, denoised, sigma, sigma_next, s_in)
            continue
        t, t_next = _t(sigma), _t(sigma_next)
        h = t_next - t
        s = t + h * 0.5
        # step 1: to λ = s, with ancestral noise
        sd, su = get_ancestral_step(_sigma(t), _sigma(s), eta)
        s_ = _t(sd)
        x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
        if eta:  # the tree is queried at the float32 σ = exp(−λ), which is what fixes the noise
            x_2 = x_2 + need_noise(noise_sampler, "eta > 0")(_sigma(t), _sigma(s)) * s_noise * su
        denoised_2 = model(x_2, _sigma(s) * s_in)
        # step 2: to λ = t_next, from the midpoint's data estimate
        sd, su = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
        t_next_ = _t(sd)
        x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_2
        if eta:
            x = x + noise_sampler(_sigma(t), _sigma(t_next)) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, *, noise_sampler=None, callback=None):
    """DPM-Solver++(2M): second-order multistep on the data prediction; first and last steps first order."""
    sigmas = _host(sigmas)
    s_in = ones_for(model, x)
    old_denoised = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = model(x, sigma * s_in)
        report(callback, x, i, sigma, sigma, denoised)
        t, t_next = _t(sigma), _t(sigma_next)
        h = t_next - t
        denoised_d = denoised
        if old_denoised is not None and sigma_next != 0:
            r = (t - _t(sigmas[i - 1])) / h  # h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0,
                        solver_type="midpoint"):
    """DPM-Solver++(2M) SDE, with the midpoint or (solver_type "heun") Heun second-order correction."""
    sigmas = _host(sigmas)
    s_in = ones_for(model, x)
    old_denoised, h_last = None, None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = model(x, sigma * s_in)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = _t(sigma_next) - _t(sigma)
            eta_h = eta * h
            one_minus = (-h - eta_h).expm1().neg()  # 1 − e^(−h − ηh)
            x = sigma_next / sigma * (-eta_h).exp() * x + one_minus * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (one_minus / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * one_minus * (1 / r) * (denoised - old_denoised)
            if eta:
                noise = need_noise(noise_sampler, "eta > 0")(sigma, sigma_next)
                x = x + noise * sigma_next * (-2 * eta_h).expm1().neg().sqrt() * s_noise
            h_last = h
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde_heun(model, x, sigmas, **options):
    """DPM-Solver++(2M) SDE with the Heun correction (A1111's "DPM++ 2M SDE Heun")."""
    return sample_dpmpp_2m_sde(model, x, sigmas, solver_type="heun", **options)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: third-order multistep from the last three data estimates."""
    sigmas = _host(sigmas)
    s_in = ones_for(model, x)
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = model(x, sigma * s_in)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = _t(sigma_next) - _t(sigma)
        h_eta = h * (eta + 1)
        x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            d = (denoised - denoised_1) / (h_1 / h)
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            x = x + phi_2 * d
        if eta:
            noise = need_noise(noise_sampler, "eta > 0")(sigma, sigma_next)
            x = x + noise * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# ---------------------------------------------------------------------------------------------
# DPM-Solver (Lu et al. 2022, arXiv:2206.00927), noise-prediction form, fixed and adaptive steps
# ---------------------------------------------------------------------------------------------

def _dpm_eps(model, x, t):
    """ε = (x − D(x, σ)) / σ at λ = t."""
    sigma = _sigma(t)
    return (x - model(x, sigma * ones_for(model, x))) / sigma


def _dpm_eps_r1(model, x, t, h, eps, r1):
    """ε at s1 = t + r1·h, from the first-order predictor there (shared by the 2nd- and 3rd-order steps)."""
    return _dpm_eps(model, x - _sigma(t + r1 * h) * (r1 * h).expm1() * eps, t + r1 * h)


def _dpm_solver_2(x, t, t_next, eps, eps_r1, r1):
    """DPM-Solver-2 step (Algorithm 1), given ε at t and at t + r1·h."""
    h = t_next - t
    return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)


def _dpm_solver_3(model, x, t, t_next, eps, eps_r1, r1=1 / 3, r2=2 / 3):
    """DPM-Solver-3 step (Algorithm 2), given ε at t and t + r1·h; evaluates ε at t + r2·h."""
    h = t_next - t
    s2 = t + r2 * h
    u2 = (x - _sigma(s2) * (r2 * h).expm1() * eps
          - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
    eps_r2 = _dpm_eps(model, u2, s2)
    return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


def _dpm_ancestral(t, t_next, t_end, eta):
    """Where an ancestral sub-step really lands (λ ≤ t_end) and the noise std to add after it."""
    if not eta:
        return t_next, 0.0
    sd, _ = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_next_ = torch.minimum(t_end, _t(sd))
    return t_next_, (_sigma(t_next) ** 2 - _sigma(t_next_) ** 2) ** 0.5


def _lambda_range(sigmas, sigma_min, sigma_max):
    """(λ(σ_max), λ(σ_min)), with σ_max = sigmas[0] and σ_min = sigmas[-2] unless given."""
    sigma_min = float(sigmas[-2]) if sigma_min is None else sigma_min
    sigma_max = float(sigmas[0]) if sigma_max is None else sigma_max
    return _t(torch.tensor(sigma_max)), _t(torch.tensor(sigma_min))


@torch.no_grad()
def sample_dpm_fast(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0,
                    sigma_min=None, sigma_max=None, n=None):
    """DPM-Solver-fast (Lu et al. 2022, sec. 3.4): ⌊n/3⌋+1 uniform λ steps of orders 3, …, 3, then 2/1, from
    σ_max to σ_min (`_lambda_range`); n = len(sigmas) − 1 unless given (A1111's txt2img passes steps)."""
    t_start, t_end = _lambda_range(sigmas, sigma_min, sigma_max)
    n = len(sigmas) - 1 if n is None else n
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1)  # on the host
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, (order, t, t_next) in enumerate(zip(orders, ts[:-1], ts[1:])):
        t_next_, su = _dpm_ancestral(t, t_next, t_end, eta)
        eps = _dpm_eps(model, x, t)
        report(callback, x, i, _sigma(t), _sigma(t), x - _sigma(t) * eps)
        if order == 1:
            x = x - _sigma(t_next_) * (t_next_ - t).expm1() * eps  # DPM-Solver-1 (= DDIM)
        elif order == 2:
            x = _dpm_solver_2(x, t, t_next_, eps, _dpm_eps_r1(model, x, t, t_next_ - t, eps, 1 / 2), 1 / 2)
        else:
            x = _dpm_solver_3(model, x, t, t_next_, eps, _dpm_eps_r1(model, x, t, t_next_ - t, eps, 1 / 3))
        if eta:
            x = x + su * s_noise * need_noise(noise_sampler, "eta > 0")(_sigma(t), _sigma(t_next))
    return x


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0,
                        sigma_min=None, sigma_max=None):
    """DPM-Solver-23 with adaptive step size (Lu et al. 2022, sec. 3.4) and k-diffusion's defaults, which
    A1111 keeps: the embedded 2nd-order solution estimates the error (rtol 0.05, atol 0.0078); h starts at
    0.05 and is rescaled by the integral controller's factor 1 + atan(err⁻¹^(1/order) − 1), accepting a step
    at ≥ 0.81.
    """
    s, t_end = _lambda_range(sigmas, sigma_min, sigma_max)
    atol, rtol = torch.tensor(0.0078), torch.tensor(0.05)
    ctrl_order = 1.5 if eta else 3  # the SDE's order when noise is added
    h, x_prev, steps = 0.05, x, 0
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + h)
        t_, su = _dpm_ancestral(s, t, t_end, eta)
        eps = _dpm_eps(model, x, s)
        denoised = x - _sigma(s) * eps
        eps_r1 = _dpm_eps_r1(model, x, s, t_ - s, eps, 1 / 3)  # the 2nd-order estimate also uses r1 = 1/3
        x_low = _dpm_solver_2(x, s, t_, eps, eps_r1, 1 / 3)
        x_high = _dpm_solver_3(model, x, s, t_, eps, eps_r1)
        delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        factor = 1 + math.atan((1 / (float(error) + 1e-8)) ** (1 / ctrl_order) - 1)
        if factor >= 0.81:
            x_prev, x = x_low, x_high
            if eta:
                x = x + su * s_noise * need_noise(noise_sampler, "eta > 0")(_sigma(s), _sigma(t))
            s = t
        h *= factor
        report(callback, x, steps, _sigma(s), _sigma(s), denoised)
        steps += 1
    return x


# ---------------------------------------------------------------------------------------------
# Restart (Xu et al. 2023), A1111's restart_sampler; LCM (Luo et al. 2023), A1111's sample_lcm
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_restart(model, x, sigmas, *, noise_sampler=None, callback=None, s_noise=1.0):
    """Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes") with A1111's
    `restart_list` {0.1: [restart steps + 1, restart times, 2]}: Heun steps on a Karras schedule, jumping back
    from σ ≈ 0.1 up to σ ≈ 2 with fresh noise. None below 20 steps; else 9 restart steps once (steps // 4
    twice from 36 steps), taken out of the main schedule, rebuilt as Karras(the rest, sigmas[-2], sigmas[0]).
    """
    s_in = ones_for(model, x)
    sigmas = sigmas.detach().cpu()  # the schedule on the host (one device read)
    steps = len(sigmas) - 1
    pairs = list(zip(sigmas[:-1], sigmas[1:]))  # (σ_from, σ_to) in execution order
    if steps >= 20:
        restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item())
        pairs = list(zip(sigmas[:-1], sigmas[1:]))
        min_idx, max_idx = (int(torch.argmin((sigmas - level).abs())) for level in (0.1, 2))
        if max_idx < min_idx:  # after the step onto sigmas[min_idx]: the restart steps without their final 0
            up = sigmas_karras(restart_steps + 1, sigmas[min_idx].item(), sigmas[max_idx].item())[:-1]
            pairs[min_idx:min_idx] = list(zip(up[:-1], up[1:])) * restart_times

    last_sigma = None
    for step_id, (old_sigma, new_sigma) in enumerate(pairs):
        if last_sigma is not None and last_sigma < old_sigma:  # restart: renoise from σ_last up to σ_old
            noise = need_noise(noise_sampler, "Restart")(old_sigma, last_sigma)
            x = x + noise * s_noise * (old_sigma ** 2 - last_sigma ** 2) ** 0.5
        denoised = model(x, old_sigma * s_in)
        report(callback, x, step_id, old_sigma, old_sigma, denoised)
        x = _heun_step(model, x, denoised, old_sigma, new_sigma, s_in)
        last_sigma = new_sigma
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, *, noise_sampler=None, callback=None):
    """LCM multistep sampling: jump to the model's x₀, then re-noise to the next σ with fresh noise.
    `model` is the LCM denoiser (`sd15.samplers.sampling.LCMDenoiser` under CFG)."""
    sigmas = _host(sigmas)
    s_in = ones_for(model, x)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = model(x, sigma * s_in)
        report(callback, x, i, sigma, sigma, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + sigma_next * need_noise(noise_sampler, "LCM")(sigma, sigma_next)
    return x
