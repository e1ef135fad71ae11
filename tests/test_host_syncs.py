"""The sampling loop never waits for the device: no device -> host read per step.

On the CPU, latents, schedule, conditioning and the denoiser's buffers are `DeviceTensor`s
(tests/devicesim.py), which count every `.item()` / `bool()` / `float()` / `.tolist()` / `.cpu()` of a
"device" value. A run of 2n steps must make exactly as many reads as a run of n steps (the schedule is read
once, before the loop), and the results must equal the plain-tensor run. On CUDA the same loop runs under
`torch.cuda.set_sync_debug_mode("warn")` and the synchronising calls are counted the same way.
"""
import warnings

import pytest
import torch

from devicesim import DeviceTensor, count_reads, to_device
from sd15.samplers.sampling import LCMDenoiser
from sd15.samplers import (A1111_DEFAULTS, SAMPLERS, CFGDenoiser, EpsDenoiser, ddim_timesteps, get_sigmas,
                           sd15_alphas_cumprod)

AC = sd15_alphas_cumprod()
SHAPE = (2, 4, 8, 8)
NO_SYNC = ["Euler", "Euler a", "DPM++ 2M", "DDIM"]  # the acceptance list
ALSO = ["Heun", "DPM2", "DPM2 a", "LMS", "DPM++ 2S a", "DPM++ 2M SDE", "DPM++ 3M SDE", "Restart", "PLMS", "UniPC",
        "LCM", "DDIM CFG++"]


def stub_unet(x, t, ctx):
    """A cheap UNet stand-in that uses all three inputs (so t and the context must be right)."""
    return torch.tanh(x) * 0.3 + (t / 1000.0)[:, None, None, None] + ctx.mean(dim=(1, 2))[:, None, None, None]


def run(name, steps, device_fn, device="cpu"):
    """One txt2img loop of sampler `name` with CFG; `device_fn` puts a tensor "on the device"."""
    inner = EpsDenoiser(stub_unet, AC, unet_dtype=torch.float32).to(device)
    for key in ("alphas_cumprod", "sigmas", "log_sigmas"):
        setattr(inner, key, device_fn(getattr(inner, key)))
    g = torch.Generator().manual_seed(0)
    cond = device_fn(torch.randn(2, 77, 8, generator=g).to(device))
    uncond = device_fn(torch.randn(2, 77, 8, generator=g).to(device))
    noise = device_fn(torch.randn(SHAPE, generator=g).to(device))
    draws = torch.Generator().manual_seed(1)
    noise_sampler = lambda *a: device_fn(torch.randn(SHAPE, generator=draws).to(device))  # noqa: E731
    options = dict(A1111_DEFAULTS[name].options)
    guided = inner
    if name == "LCM":  # LCM's own denoiser, as sd15.samplers.make_denoiser builds it
        guided = LCMDenoiser(inner)
        for key in ("alphas_cumprod", "log_sigmas"):
            setattr(guided, key, device_fn(getattr(guided, key)))
    elif name == "DDIM CFG++":  # the unconditional rows of the last guided call
        options["last_noise_uncond"] = lambda: model.last_uncond
    model = CFGDenoiser(guided, cond, uncond, 7.5)
    if "s_tmax" in options:
        options["s_tmax"] = options["s_tmax"] or float("inf")
    steps_seen = []
    callback = lambda d: steps_seen.append(d["i"])  # noqa: E731
    if A1111_DEFAULTS[name].timesteps:
        ts = device_fn(ddim_timesteps(steps).to(device))
        out = SAMPLERS[name](model.eps, noise, ts, alphas_cumprod=inner.alphas_cumprod, noise_sampler=noise_sampler,
                             callback=callback, **options)
    else:
        sigmas = device_fn(get_sigmas("Automatic", steps, AC, sampler=name).to(device))
        out = SAMPLERS[name](model, noise * sigmas[0], sigmas, noise_sampler=noise_sampler, callback=callback,
                             **options)
    return out, len(steps_seen)


def reads(name, steps):
    with count_reads(trace=True) as c:
        out, n = run(name, steps, to_device)
    return c.reads, n, out


@pytest.mark.parametrize("name", NO_SYNC + ALSO)
def test_no_device_reads_per_step(name):
    r1, n1, out = reads(name, 6)
    r2, n2, _ = reads(name, 12)
    assert n2 > n1
    assert (r2 - r1) / (n2 - n1) == 0, f"{name}: {r1} reads in {n1} steps, {r2} in {n2}"
    assert r1 <= 3  # the schedule / tables, once
    ref, _ = run(name, 6, lambda t: t)
    assert torch.equal(out.as_subclass(torch.Tensor), ref)


def test_the_counter_catches_a_read():
    """A loop that branches on a device σ (what k-diffusion does) is counted: the test can fail."""
    sigmas = to_device(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    with count_reads() as c:
        for i in range(3):
            if sigmas[i + 1] == 0:
                pass
    assert c.reads == 3
    assert isinstance(sigmas * 2, DeviceTensor) and not isinstance(sigmas.cpu(), DeviceTensor)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NO_SYNC + ["Heun", "PLMS", "UniPC"])
def test_no_cuda_syncs_per_step(name):
    def syncs(steps):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _, n = run(name, steps, lambda t: t.cuda(), device="cuda")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught), n

    run(name, 3, lambda t: t.cuda(), device="cuda")  # CUDA context and kernels loaded
    (s1, n1), (s2, n2) = syncs(6), syncs(12)
    print(f"{name}: {s1} synchronising calls in {n1} steps, {s2} in {n2}")
    assert s2 == s1 and s1 <= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_sigma_path_equals_device_sigma_path_on_cuda():
    """CFGDenoiser's host-σ path (σ scalings prepared on the CPU) gives the device path's result on CUDA."""
    inner = EpsDenoiser(stub_unet, AC, unet_dtype=torch.float32).cuda()
    g = torch.Generator().manual_seed(0)
    cond, uncond = (torch.randn(2, 77, 8, generator=g).cuda() for _ in range(2))
    sigmas = get_sigmas("Karras", 10, AC).cuda()
    x = (torch.randn(SHAPE, generator=g) * 14.6).cuda()
    host = CFGDenoiser(inner, cond, uncond, 7.5)
    device = CFGDenoiser(inner, cond, uncond, 7.5)
    a = SAMPLERS["DPM++ 2M"](host, x, sigmas)
    b = SAMPLERS["DPM++ 2M"](lambda x, s: device(x, s), x, sigmas)  # a plain callable: σ on the device
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
