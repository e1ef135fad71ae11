"""Samplers, schedules and the denoiser wrappers, reproducing AUTOMATIC1111 v1.10.

- `table`: the one sampler table and scheduler table, and A1111's name resolution (`resolve_sampler`).
- `sampling`: `SAMPLERS` (A1111 name -> `fn(model, x, sigmas, *, noise_sampler, callback, **options)`),
  `get_sigmas` (A1111's twelve schedule types), `make_denoiser` and `sample` (one batch as A1111 runs it).
- `denoiser`: `EpsDenoiser` (UNet ε -> x₀) and `CFGDenoiser` (classifier-free guidance).
- `kdiffusion` / `timesteps`: the sampler functions. k-diffusion samplers take `model(x, sigma) -> x₀` and a σ
  schedule; DDIM, DDIM CFG++, PLMS and UniPC take `model(x, t) -> ε` and an integer timestep grid.

The submodules' names read through this package (`sd15.samplers.get_sigmas`), imported on first use (PEP 562),
so that the sampler table, and with it the request schema and `sd15 --help`, does not import torch.
"""
import importlib

_SUBMODULES = ("table", "sampling", "denoiser", "schedules", "timesteps")


def __getattr__(name: str):
    if not name.startswith("__"):
        for sub in _SUBMODULES:
            module = importlib.import_module(f"{__name__}.{sub}")
            if hasattr(module, name):
                return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
