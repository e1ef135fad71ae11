"""The ε → x₀ wrapper and classifier-free guidance, with A1111's semantics (k-diffusion `external.py`
CompVisDenoiser, A1111 `modules/sd_hijack_unet.py` and `modules/sd_samplers_cfg_denoiser.py`).

k-diffusion samplers call `model(x, sigma) -> x₀` (`forward`), timestep samplers `model(x, t) -> ε` on the
raw latent (`eps`); `CFGDenoiser` guides either. The UNet is any `unet(x, t, context) -> eps`. Nothing here
reads a device value back: a host (CPU) σ, which sd15's samplers pass to a model with `host_sigma = True`,
has its c_in, c_out and t(σ) made on the host once per σ value and kept on the device (the same float32
operations).
"""

import torch
from torch import nn

from .schedules import discrete_sigmas, sigma_to_t


class EpsDenoiser(nn.Module):
    """k-diffusion's CompVisDenoiser: D(x, σ) = x − σ·ε(x / sqrt(σ² + 1), t(σ)), t continuous.

    `unet_dtype` is the dtype the UNet runs in (default: its parameters' dtype, else float32). A1111 casts
    both the UNet input and the timestep to it, so in half precision t is rounded to fp16 (steps of 0.5
    above 512, 0.25 above 256, ...). The result is combined with the float32 latent in float32.
    """

    def __init__(self, unet, alphas_cumprod: torch.Tensor, *, unet_dtype=None, quantize: bool = False):
        super().__init__()
        self.unet = unet
        if unet_dtype is None:
            param = next(unet.parameters(), None) if isinstance(unet, nn.Module) else None
            unet_dtype = param.dtype if param is not None else torch.float32
        self.unet_dtype = unet_dtype
        self.quantize = quantize  # A1111's `enable_quantization` (default off): integer t
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("sigmas", discrete_sigmas(alphas_cumprod), persistent=False)  # ascending, (1000,)
        self.register_buffer("log_sigmas", self.sigmas.log(), persistent=False)
        self._log_sigmas_host = self.log_sigmas.cpu()  # not a buffer: stays on the host
        self._cache = {}  # ("sigma" | "t", device, values...) -> prepared tensors on that device

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """ε(x, t) from the raw UNet, x and t cast to the UNet dtype (the fp16 rounding of t happens here).
        A host (CPU) t with x elsewhere is rounded on the host, once per value, and sent over once."""
        if t.device != x.device:
            t = self._prepared(("t", x.device, *t.tolist()), lambda: (t.to(self.unet_dtype).float(),), x.device)[0]
        else:
            t = t.to(self.unet_dtype).float()
        return self.unet(x.to(self.unet_dtype), t, context)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if sigma.device.type == "cpu":  # host σ: c_out, c_in and t(σ) are made once per σ value
            c_out, c_in, t = self._prepared(("sigma", x.device, *sigma.tolist()),
                                            lambda: self._scalings(sigma, self._log_sigmas_host), x.device)
        else:
            c_out, c_in, t = self._scalings(sigma, self.log_sigmas)
        return x + self.unet((x * c_in).to(self.unet_dtype), t, context) * c_out

    def _scalings(self, sigma, log_sigmas):
        """c_out = −σ and c_in = 1/sqrt(σ² + 1) (k-diffusion), (B, 1, 1, 1), and t(σ) in the UNet dtype."""
        c_out = -sigma[:, None, None, None]
        c_in = 1 / (sigma[:, None, None, None] ** 2 + 1.0) ** 0.5
        return c_out, c_in, sigma_to_t(sigma, log_sigmas, self.quantize).to(self.unet_dtype).float()

    def _prepared(self, key, make, device):
        """Per-value host preparations, moved to `device` once (a job meets each σ once or twice)."""
        entry = self._cache.get(key)
        if entry is None:
            if len(self._cache) > 256:
                self._cache.clear()
            entry = self._cache[key] = tuple(v.to(device, non_blocking=True) for v in make())
        return entry


class CFGDenoiser(nn.Module):
    """A1111's classifier-free guidance: cond rows and uncond rows in one UNet batch, then
    out_i = u_i + Σ_j w_ij · cfg_scale · (c_ij − u_i).

    `cond` is a tensor [B, 77k, 768] (one prompt per image, weight 1) or a callable
    `cond(step) -> (tensor [N, 77k, 768], conds_list)`, conds_list[i] the (row, weight) pairs of image i
    (AND-subprompts), `step` the model calls so far (prompt editing); `uncond` a tensor or `uncond(step)`.
    Cond and uncond of different lengths run as two UNet batches, unless `pad_cond_uncond` appends copies
    of `empty_cond` (the [1, 77, 768] encoding of "") to the shorter one or `pad_cond_uncond_v0` repeats
    the uncond's last vector or truncates it. The uncond is skipped (the first cond's output returned
    unguided) while the calls so far are at most a `skip_early_cond` fraction of `total_steps` (set by
    `sample`), and by NGMS on odd calls (every call with `s_min_uncond_all`) once σ (or t) is below
    `s_min_uncond`; a skip adds its entries to `infotext`, as A1111's to `p.extra_generation_params`.
    `host_sigma = True` asks sd15's samplers for a host σ (see the module docstring).
    """

    host_sigma = True

    def __init__(self, inner: EpsDenoiser, cond, uncond, cfg_scale: float, *, s_min_uncond: float = 0.0,
                 s_min_uncond_all: bool = False, skip_early_cond: float = 0.0, infotext: dict = None,
                 pad_cond_uncond: bool = False, pad_cond_uncond_v0: bool = False,
                 empty_cond: torch.Tensor = None):
        super().__init__()
        if pad_cond_uncond and empty_cond is None:
            raise ValueError("pad_cond_uncond needs empty_cond, the [1, 77, 768] encoding of the empty prompt")
        self.inner = inner
        self.cond, self.uncond, self.cfg_scale = cond, uncond, cfg_scale
        self.s_min_uncond, self.s_min_uncond_all = s_min_uncond, s_min_uncond_all
        self.skip_early_cond, self.total_steps = skip_early_cond, None
        self.infotext = {} if infotext is None else infotext
        self.pad_cond_uncond, self.pad_cond_uncond_v0, self.empty_cond = pad_cond_uncond, pad_cond_uncond_v0, empty_cond
        self.step = 0  # model calls so far
        self.mask = self.nmask = self.init_latent = None
        self._context = (None, None, None)  # (cond, uncond, cat([cond, uncond])) of the last call
        self._last = None  # (x_out, first cond rows, result, (x, t) for ε) of the last call: `preview_latent`
        self.last_uncond = None  # the uncond rows of the last output (A1111's last_noise_uncond, for CFG++)

    def set_mask(self, mask: torch.Tensor, nmask: torch.Tensor, init_latent: torch.Tensor):
        """Inpainting: blend as x·nmask + init_latent·mask, with mask = 1 − latmask (keep) and nmask = latmask."""
        self.mask, self.nmask, self.init_latent = mask, nmask, init_latent

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Guided x₀ for k-diffusion samplers (the inpainting blend is applied to the result)."""
        denoised, x_out, first = self._guided(self.inner, x, sigma)
        if self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask
        self._last = (x_out, first, denoised, None)
        return denoised

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Guided ε for timestep samplers (the inpainting blend is applied to the model input only)."""
        if self.mask is not None:
            x = x * self.nmask + self.init_latent * self.mask
        eps, x_out, first = self._guided(self.inner.eps, x, t)
        self._last = (x_out, first, eps, (x, t))
        return eps

    def preview_latent(self, content: str = "Prompt") -> torch.Tensor:
        """The last call's x₀ estimate that A1111's live preview shows, by its `live_preview_content` (A1111's
        `CFGDenoiser.forward`): "Prompt" each image's first cond row, "Negative prompt" the uncond rows (the
        cond's where NGMS skipped them), "Combined" the guided result (after the k-diffusion inpainting blend).
        Timestep samplers' ε becomes x₀ at the integer part of t, as A1111's `get_pred_x0`."""
        x_out, first, combined, eps_at = self._last
        out = {"Prompt": x_out[first], "Negative prompt": x_out[-len(first):], "Combined": combined}[content]
        if eps_at is None:
            return out
        x, t = eps_at
        a = self.inner.alphas_cumprod[t.long().to(x.device)][:, None, None, None]  # (B, 1, 1, 1)
        return (x - (1 - a).sqrt() * out) / a.sqrt()

    def _pad(self, cond, uncond):
        if self.pad_cond_uncond_v0:  # repeat the uncond's last token vector, or truncate it
            if uncond.shape[1] < cond.shape[1]:
                last = uncond[:, -1:].repeat(1, cond.shape[1] - uncond.shape[1], 1)
                return cond, torch.cat([uncond, last], dim=1)
            return cond, uncond[:, :cond.shape[1]]
        if self.pad_cond_uncond:  # append whole 77-token encodings of ""
            empty = self.empty_cond.to(cond)
            repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
            if repeats < 0:
                cond = torch.cat([cond, empty.repeat(cond.shape[0], -repeats, 1)], dim=1)
            elif repeats > 0:
                uncond = torch.cat([uncond, empty.repeat(uncond.shape[0], repeats, 1)], dim=1)
        return cond, uncond

    def _context_for(self, cond, uncond):
        """cat([cond, uncond]), made once for as long as the (cond, uncond) pair stays the same tensors."""
        if self._context[0] is not cond or self._context[1] is not uncond:
            self._context = (cond, uncond, torch.cat([cond, uncond]))
        return self._context[2]

    def _skip_uncond(self, s) -> bool:
        """A1111 v1.10's `CFGDenoiser.forward`: skip early CFG first, then NGMS."""
        if self.skip_early_cond != 0 and self.step / self.total_steps <= self.skip_early_cond:
            self.infotext["Skip Early CFG"] = self.skip_early_cond
            return True
        if (self.step % 2 or self.s_min_uncond_all) and 0 < self.s_min_uncond and s[0] < self.s_min_uncond:
            self.infotext["NGMS"] = self.s_min_uncond
            if self.s_min_uncond_all:
                self.infotext["NGMS all steps"] = True
            return True
        return False

    def _guided(self, fn, x, s):
        if callable(self.cond):
            cond, conds_list = self.cond(self.step)
        else:
            cond, conds_list = self.cond, [[(i, 1.0)] for i in range(self.cond.shape[0])]
        uncond = self.uncond(self.step) if callable(self.uncond) else self.uncond
        batch, first = len(conds_list), [c[0][0] for c in conds_list]  # each image's first cond row
        # one prompt per image, row i for image i: the batch is [x, x] and the guidance one expression
        simple = all(len(c) == 1 and c[0][0] == i for i, c in enumerate(conds_list))
        skip_uncond = self._skip_uncond(s)
        if simple and not skip_uncond and cond.shape[1] == uncond.shape[1] and cond.shape[0] == batch:
            x_out = fn(torch.cat([x, x]), torch.cat([s, s]), self._context_for(cond, uncond))
            denoised_cond, denoised_uncond = x_out[:batch], x_out[batch:]
            self.last_uncond = denoised_uncond
            weights = [c[0][1] * self.cfg_scale for c in conds_list]
            if all(w == weights[0] for w in weights):
                scale = weights[0]
            else:
                scale = torch.tensor(weights, dtype=x_out.dtype).to(x_out.device, non_blocking=True)
                scale = scale.view(-1, *[1] * (x_out.dim() - 1))  # per-image weights (B, 1, 1, 1)
            self.step += 1
            return denoised_uncond + (denoised_cond - denoised_uncond) * scale, x_out, first

        repeats = [len(c) for c in conds_list]
        # rows: image i repeated once per subprompt, then the B uncond rows
        x_in = torch.cat([x[i:i + 1].expand(n, *x.shape[1:]) for i, n in enumerate(repeats)] + [x])
        s_in = torch.cat([s[i:i + 1].expand(n) for i, n in enumerate(repeats)] + [s])
        if cond.shape[1] != uncond.shape[1]:
            cond, uncond = self._pad(cond, uncond)
        if skip_uncond:  # cond rows only: the first cond output stands in for the uncond, and the scale is 1
            x_out = fn(x_in[:-batch], s_in[:-batch], cond)
            x_out = torch.cat([x_out, x_out[first]])
        elif cond.shape[1] == uncond.shape[1]:
            x_out = fn(x_in, s_in, self._context_for(cond, uncond))
        else:  # different token lengths: cond rows and uncond rows as separate UNet batches
            n_cond = cond.shape[0]
            x_out = torch.cat([fn(x_in[:n_cond], s_in[:n_cond], cond), fn(x_in[n_cond:], s_in[n_cond:], uncond)])
        scale = 1.0 if skip_uncond else self.cfg_scale
        denoised_uncond = self.last_uncond = x_out[-batch:]
        denoised = denoised_uncond.clone()
        for i, conds in enumerate(conds_list):
            for row, weight in conds:
                denoised[i] += (x_out[row] - denoised_uncond[i]) * (weight * scale)
        self.step += 1
        return denoised, x_out, first
