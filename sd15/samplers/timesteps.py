"""A1111's timestep samplers: DDIM, PLMS and UniPC (A1111 `modules/sd_samplers_timesteps_impl.py`,
`modules/models/diffusion/uni_pc/uni_pc.py`).

`sample_x(model, x, timesteps, *, alphas_cumprod, noise_sampler=None, callback=None, **options)`:
`model(x, t)` is the guided ε of the raw latent (`CFGDenoiser.eps`); `timesteps` the ascending
`ddim_timesteps(steps)` (img2img: its first t_enc); x starts at the unscaled noise and ends at
ā[timesteps[0]], not at 0. The callback's 'sigma' is σ = sqrt((1 − ā)/ā) of each step's start. Per-step
coefficients are Python floats, as A1111 builds them.
"""

import torch
import torch.nn.functional as F

from .kdiffusion import need_noise, ones_for, report
from .schedules import discrete_sigmas


def ddim_timesteps(steps: int) -> torch.Tensor:
    """LDM's uniform DDIM grid (`make_ddim_timesteps`): 1, 1+s, 1+2s, … < 1000 with s = 1000 // steps.

    It has more than `steps` entries when 1000 % steps is large (30 steps -> 31 timesteps).
    """
    return (torch.arange(0, 1000, 1000 // steps) + 1).clamp(0, 999)


def _coeff(value, x):
    """A per-step coefficient as A1111 builds it: a Python float times x.new_ones((B, 1, 1, 1))."""
    return x.new_full((x.shape[0], 1, 1, 1), float(value))


def _ddim_tables(alphas_cumprod, timesteps):
    """Host tables, read once: ā_t (float32), ā of the previous timestep (float64), the timesteps, and the
    callback's σ_t = sqrt((1 − ā_t)/ā_t) (the k-diffusion σ of t)."""
    ac, ts = alphas_cumprod.detach().cpu(), timesteps.detach().cpu()
    alphas, alphas_prev = ac[ts], ac[F.pad(ts[:-1], pad=(1, 0))].double()
    return alphas, alphas_prev, ts, discrete_sigmas(alphas).unbind()


def _ddim_step(x, e_t, a_t, a_prev, sqrt_one_minus_at, sigma_t=None, e_dir=None):
    """DDIM's update (Song et al. 2021, eq. 12) before its noise, on per-step coefficients given as floats:
    (x_prev, the x₀ estimate). `e_dir` (CFG++) replaces ε in the direction pointing to x_prev."""
    a_t, a_prev, sqrt_one_minus_at = (_coeff(v, x) for v in (a_t, a_prev, sqrt_one_minus_at))
    pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
    dir_coeff = 1.0 - a_prev if sigma_t is None else 1.0 - a_prev - sigma_t ** 2
    dir_xt = dir_coeff.sqrt() * (e_t if e_dir is None else e_dir)
    return a_prev.sqrt() * pred_x0 + dir_xt, pred_x0


@torch.no_grad()
def sample_ddim(model, x, timesteps, *, alphas_cumprod, noise_sampler=None, callback=None, eta=0.0,
                last_noise_uncond=None):
    """DDIM (Song et al. 2021, eq. 12) on LDM's timestep grid, as A1111 ≥ 1.6 runs it: from the top
    timestep down to timesteps[0] (len(timesteps) − 1 model calls; the t=1 -> 0 step is not taken).
    With `last_noise_uncond` (DDIM CFG++), the direction to x_{t-1} uses the unconditional ε of each call."""
    alphas, alphas_prev, ts, sigma_report = _ddim_tables(alphas_cumprod, timesteps)
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))  # float64
    a_t, a_prev, s_t, t_f = (v.tolist() for v in (alphas, alphas_prev, sigmas, ts))
    one_minus = torch.sqrt(1 - alphas).tolist()
    s_in = ones_for(model, x)
    for i, k in enumerate(range(len(t_f) - 1, 0, -1)):  # from the top timestep down to timesteps[1]
        e_t = model(x, t_f[k] * s_in)
        e_dir = None if last_noise_uncond is None else last_noise_uncond()
        sigma_t = _coeff(s_t[k], x)
        x, pred_x0 = _ddim_step(x, e_t, a_t[k], a_prev[k], one_minus[k], sigma_t, e_dir)
        if eta:  # A1111 draws every step; with eta = 0 the draw is multiplied by 0, so we skip it
            x = x + sigma_t * need_noise(noise_sampler, "DDIM with eta > 0")(ts[k], ts[k - 1])
        report(callback, x, i, sigma_report[k], sigma_report[k], pred_x0)
    return x


def sample_ddim_cfgpp(model, x, timesteps, *, last_noise_uncond, **options):
    """DDIM CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance"), as A1111's
    `ddim_cfgpp`: the x₀ estimate uses the guided ε (guidance scale divided by 12.5 by the caller), the
    direction to x_{t-1} the unconditional ε, `last_noise_uncond()`, of the same model call."""
    return sample_ddim(model, x, timesteps, last_noise_uncond=last_noise_uncond, **options)


@torch.no_grad()
def sample_plms(model, x, timesteps, *, alphas_cumprod, noise_sampler=None, callback=None):
    """PLMS, pseudo linear multistep (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"):
    a pseudo improved-Euler first step (2 model calls), then Adams-Bashforth on ε of orders 2, 3, 4."""
    alphas, alphas_prev, ts, sigma_report = _ddim_tables(alphas_cumprod, timesteps)
    a_t, a_prev, one_minus, t_f = (v.tolist() for v in (alphas, alphas_prev, torch.sqrt(1 - alphas), ts))
    s_in = ones_for(model, x)
    old_eps = []
    for i, k in enumerate(range(len(t_f) - 1, 0, -1)):  # from the top timestep down to timesteps[1]
        e_t = model(x, t_f[k] * s_in)
        if not old_eps:  # pseudo improved Euler
            x_next, _ = _ddim_step(x, e_t, a_t[k], a_prev[k], one_minus[k])
            e_t_prime = (e_t + model(x_next, t_f[max(k - 1, 0)] * s_in)) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, pred_x0 = _ddim_step(x, e_t_prime, a_t[k], a_prev[k], one_minus[k])
        old_eps = (old_eps + [e_t])[-3:]
        report(callback, x, i, sigma_report[k], sigma_report[k], pred_x0)
    return x


def _solve(a, b):
    """torch.linalg.solve without its error check, which waits for the device (a Vandermonde system in
    distinct λ ratios is never singular)."""
    return torch.linalg.solve_ex(a, b)[0]


def _interp(x, xp, yp):
    """Piecewise-linear y(x) through (xp, yp), xp ascending, extended linearly beyond both ends."""
    k = (torch.searchsorted(xp, x.contiguous(), right=True) - 1).clamp(0, len(xp) - 2)
    x0, x1, y0, y1 = xp[k], xp[k + 1], yp[k], yp[k + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


@torch.no_grad()
def sample_unipc(model, x, timesteps, *, alphas_cumprod, noise_sampler=None, callback=None, order=3,
                 img2img=False):
    """UniPC multistep predictor-corrector (Zhao et al. 2023, arXiv:2302.04867), data prediction, B(h) = h
    (bh1), time-uniform steps, lower orders at the end, as A1111 runs it by default: len(timesteps) steps from
    t_T = 1 (img2img: timesteps[-1]/1000 + 1/1000) to t_0 = 1/1000, corrector on every step but the last,
    whose model evaluation is reused as the next step's history (len(timesteps) model calls)."""
    steps = len(timesteps)
    if steps < order:
        raise ValueError(f"UniPC order {order} needs at least {order} steps")
    # VP "discrete" noise schedule: log α(t) interpolated linearly at t_i = (i + 1) / 1000
    t_array = torch.linspace(0.0, 1.0, 1001, device=x.device)[1:]
    log_alpha_array = 0.5 * torch.log(alphas_cumprod.to(x.device).float())
    log_alpha = lambda t: _interp(t, t_array, log_alpha_array)
    sigma_of = lambda t: torch.sqrt(1.0 - torch.exp(2.0 * log_alpha(t)))
    lambda_of = lambda t: log_alpha(t) - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha(t)))

    def data_pred(x, t):  # x₀ = (x − σ_t ε) / α_t, ε at model time (t − 1/1000) · 1000
        eps = model(x, (t - 1.0 / 1000) * 1000.0)
        return (x - sigma_of(t)[:, None, None, None] * eps) / torch.exp(log_alpha(t))[:, None, None, None]

    def bh_update(x, model_prev_list, t_prev_list, t, order, use_corrector):
        """One UniPC step to t: predictor from the history, then corrector with the model at the prediction."""
        t_prev_0, model_prev_0 = t_prev_list[-1], model_prev_list[-1]
        lambda_prev_0 = lambda_of(t_prev_0)
        h = lambda_of(t) - lambda_prev_0
        rks = [((lambda_of(t_prev) - lambda_prev_0) / h)[0] for t_prev in reversed(t_prev_list[-order:-1])]
        D1s = [(m - model_prev_0) / rk for m, rk in zip(reversed(model_prev_list[-order:-1]), rks)]
        rks = torch.stack(rks + [h.new_ones(())])
        hh = -h[0]  # data prediction; also B(h), the bh1 variant
        h_phi_1 = torch.expm1(hh)  # h·φ1(h) = e^h − 1
        # R = Vandermonde rows rk^(k−1); b_k = φ_k(hh)·k!/B(h),
        # with φ_1 = expm1(hh)/hh − 1 and φ_k+1 = φ_k/hh − 1/(k+1)!
        R, b, h_phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
        for k in range(1, order + 1):
            R.append(torch.pow(rks, k - 1))
            b.append(h_phi_k * factorial / hh)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        R, b = torch.stack(R), torch.stack(b)

        alpha_t = torch.exp(log_alpha(t))
        scale = (alpha_t * hh)[:, None, None, None]
        x_t = x_t_ = ((sigma_of(t) / sigma_of(t_prev_0))[:, None, None, None] * x
                      - (alpha_t * h_phi_1)[:, None, None, None] * model_prev_0)  # first-order (DDIM) part
        if D1s:
            D1s = torch.stack(D1s, dim=1)  # (B, order − 1, C, H, W)
            rhos_p = b.new_full((1,), 0.5) if order == 2 else _solve(R[:-1, :-1], b[:-1])
            x_t = x_t_ - scale * torch.einsum("k,bkchw->bchw", rhos_p, D1s)
        if not use_corrector:
            return x_t, None
        model_t = data_pred(x_t, t)
        rhos_c = b.new_full((1,), 0.5) if order == 1 else _solve(R, b)
        corr_res = torch.einsum("k,bkchw->bchw", rhos_c[:-1], D1s) if order > 1 else 0
        return x_t_ - scale * (corr_res + rhos_c[-1] * (model_t - model_prev_0)), model_t

    t_T = float(timesteps[-1]) / 1000 + 1 / 1000 if img2img else 1.0
    ts_host = torch.linspace(t_T, 1.0 / 1000, steps + 1)  # time_uniform
    ts = ts_host.to(x.device)
    # the callback's σ = σ_t / α_t of each step's start, on the host
    log_alpha_host = _interp(ts_host, t_array.cpu(), log_alpha_array.cpu())
    sigma_report = (torch.sqrt(1.0 - torch.exp(2.0 * log_alpha_host)) / torch.exp(log_alpha_host)).unbind()
    vec_t = ts[0].expand(x.shape[0])
    model_prev_list, t_prev_list = [data_pred(x, vec_t)], [vec_t]
    for step in range(1, steps + 1):
        vec_t = ts[step].expand(x.shape[0])
        step_order = step if step < order else min(order, steps + 1 - step)  # warm-up, lower order at the end
        x, model_x = bh_update(x, model_prev_list, t_prev_list, vec_t, step_order, use_corrector=step < steps)
        # no corrector on the last step: its latest x₀ estimate is the history's
        denoised = model_x if model_x is not None else model_prev_list[-1]
        report(callback, x, step - 1, sigma_report[step - 1], sigma_report[step - 1], denoised)
        # the last `order` points; the corrector's model value is the new history entry
        model_prev_list, t_prev_list = (model_prev_list + [model_x])[-order:], (t_prev_list + [vec_t])[-order:]
    return x
