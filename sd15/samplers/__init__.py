"""Samplers, schedules and the denoiser wrappers, reproducing AUTOMATIC1111 v1.10: `table` (the one
sampler and scheduler tables, A1111's name resolution), `sampling` (`SAMPLERS`, `get_sigmas`, `sample`),
`denoiser` (`EpsDenoiser`, `CFGDenoiser`), and the sampler functions in `kdiffusion` (on σ:
`model(x, sigma) -> x₀`) and `timesteps` (DDIM, PLMS, UniPC on LDM timesteps: `model(x, t) -> ε`).

Their names read through this package (`sd15.samplers.get_sigmas`), imported on first use (PEP 562), so that
the sampler table, and with it the request schema and `sd15 --help`, does not import torch.
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
