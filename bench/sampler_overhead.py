"""Per-step CPU overhead of the sampling loop, with a stub UNet that costs (almost) nothing.

What a step costs besides the UNet: the CFG denoiser (c_in, c_out, t(σ), cond/uncond batching, guidance)
and the sampler's own maths, as Python + dispatcher time and as small tensor ops. Each row runs a
`--steps`-step txt2img loop on (2 x batch, 4, size/8, size/8) latents with CFG and reports:

  us/step     wall time per sampler step (best of `--repeats` runs: this measures overhead, not noise)
  ops/step    torch calls per step seen by a TorchFunctionMode (the stub UNet's one op included)
  reads/step  device -> host reads per step (tests/devicesim.py: latents, schedule and denoiser buffers are
              `DeviceTensor`s, as on a GPU; a read is `.item()`, `bool()`, `float()`, `.tolist()`, `.cpu()`)

and, when diffusers is importable, the same loop written the diffusers way (`scheduler.scale_model_input`,
the UNet on the concatenated batch, guidance, `scheduler.step`) with its scheduler for that sampler, timed
in the same run. Ratios are sd15 / diffusers.

    python bench/sampler_overhead.py                     # CPU, 512x512 latents, 20 steps
    SD15_ROOT=/tmp/before python bench/sampler_overhead.py   # the sd15 package found at SD15_ROOT instead
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.environ.get("SD15_ROOT", ROOT))

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from devicesim import count_reads, to_device  # noqa: E402

SAMPLERS = ("Euler", "Euler a", "DPM++ 2M", "DDIM", "Heun", "DPM++ 2M SDE", "PLMS", "UniPC")
DIFFUSERS = {"Euler": "EulerDiscreteScheduler", "Euler a": "EulerAncestralDiscreteScheduler",
             "DPM++ 2M": "DPMSolverMultistepScheduler", "DDIM": "DDIMScheduler", "Heun": "HeunDiscreteScheduler",
             "PLMS": "PNDMScheduler", "UniPC": "UniPCMultistepScheduler"}


class OpCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def stub_unet(x, t, ctx):
    return x * 0.5  # one op: the loop's own cost is what is measured


def sd15_loop(name, steps, shape, device, wrap):
    """A closure running sd15's sampler `name` once (the denoiser is built outside, as a job does)."""
    from sd15.samplers import A1111_DEFAULTS, SAMPLERS as FNS, CFGDenoiser, EpsDenoiser, get_sigmas
    from sd15.samplers import ddim_timesteps, sd15_alphas_cumprod

    ac = sd15_alphas_cumprod()
    inner = EpsDenoiser(stub_unet, ac, unet_dtype=torch.float32).to(device)
    b = shape[0]
    cond = torch.randn(b, 77, 768, device=device)
    uncond = torch.randn(b, 77, 768, device=device)
    noise = torch.randn(shape, device=device)
    if wrap:  # buffers, conditioning and latents live "on the device"
        for key in ("alphas_cumprod", "sigmas", "log_sigmas"):
            setattr(inner, key, to_device(getattr(inner, key)))
        cond, uncond, noise = to_device(cond), to_device(uncond), to_device(noise)
    gen = torch.Generator(device=device).manual_seed(0)
    noise_sampler = lambda *a: torch.randn(shape, generator=gen, device=device)  # noqa: E731
    defaults = A1111_DEFAULTS[name]
    options = dict(defaults.options)
    if "s_tmax" in options:
        options["s_tmax"] = options["s_tmax"] or float("inf")
    fn = FNS[name]
    if defaults.timesteps:
        timesteps = ddim_timesteps(steps).to(device)
        acd = inner.alphas_cumprod
        if wrap:
            timesteps = to_device(timesteps)

        def go():
            model = CFGDenoiser(inner, cond, uncond, 7.0)
            return fn(model.eps, noise, timesteps, alphas_cumprod=acd, noise_sampler=noise_sampler, **options)
        calls = len(timesteps) - 1
    else:
        sigmas = get_sigmas("Automatic", steps, ac, sampler=name).to(device)
        if wrap:
            sigmas = to_device(sigmas)

        def go():
            model = CFGDenoiser(inner, cond, uncond, 7.0)
            return fn(model, noise * sigmas[0], sigmas, noise_sampler=noise_sampler, **options)
        calls = steps
    return go, calls


def diffusers_loop(name, steps, shape, device):
    import diffusers

    cls = getattr(diffusers, DIFFUSERS[name])
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if name == "DPM++ 2M":
        kw.update(use_karras_sigmas=True, algorithm_type="dpmsolver++")
    if name == "PLMS":
        kw.update(skip_prk_steps=True)
    sched = cls(**kw)
    b = shape[0]
    ctx = torch.randn(2 * b, 77, 768, device=device)
    noise = torch.randn(shape, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def go():
        sched.set_timesteps(steps, device=device)
        latents = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents] * 2), t)
            eps = stub_unet(inp, t, ctx)
            u, c = eps.chunk(2)
            eps = u + 7.0 * (c - u)
            extra = {"generator": gen} if name == "Euler a" else {}
            latents = sched.step(eps, t, latents, **extra).prev_sample
        return latents
    return go, steps


def timed(go, calls, repeats):
    go()  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        go()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    counter = OpCounter()
    with counter:
        go()
    return min(runs), counter.ops / calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shape = (args.batch, 4, args.size // 8, args.size // 8)
    try:
        import diffusers
        dver = diffusers.__version__
    except ImportError:
        dver = None
    import sd15
    print(f"sd15 from {os.path.dirname(os.path.dirname(sd15.__file__))}; torch {torch.__version__}; diffusers "
          f"{dver}; device {args.device}; latents {shape}, CFG, {args.steps} steps, stub UNet; 1 torch thread")
    print("| sampler | sd15 us/step | sd15 ops/step | sd15 reads/step | diffusers us/step | diffusers ops/step "
          "| sd15/diffusers |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for name in args.samplers.split(","):
            go, calls = sd15_loop(name, args.steps, shape, args.device, wrap=False)
            us, ops = timed(go, calls, args.repeats)
            n_reads = []
            for steps in (args.steps, 2 * args.steps):  # reads per step: the difference over extra steps
                go_w, calls_w = sd15_loop(name, steps, shape, args.device, wrap=True)
                with count_reads() as c:
                    go_w()
                n_reads.append((c.reads, calls_w))
            per_step = (n_reads[1][0] - n_reads[0][0]) / (n_reads[1][1] - n_reads[0][1])
            row = f"| {name} | {us:.0f} | {ops:.1f} | {per_step:.2f} (+{n_reads[0][0] - per_step * n_reads[0][1]:.0f} setup) |"
            if dver and name in DIFFUSERS:
                try:
                    dgo, dcalls = diffusers_loop(name, args.steps, shape, args.device)
                    dus, dops = timed(dgo, dcalls, args.repeats)
                    row += f" {dus:.0f} | {dops:.1f} | {us / dus:.2f} |"
                except Exception as e:  # a scheduler this diffusers version lacks
                    row += f" error: {type(e).__name__} | | |"
            else:
                row += " - | - | - |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
