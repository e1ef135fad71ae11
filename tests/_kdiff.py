"""Test helper: k-diffusion's `sampling.py` and `external.py` as reference implementations.

Importing `k_diffusion` runs its package `__init__`, which pulls in torchvision, PIL, safetensors and
more. We load only the two files under a stub package `_kdiff_ref`, whose `utils` module provides the
single helper they use (`append_dims`). Their own needs are scipy, torchsde, torchdiffeq and tqdm.
"""

import importlib.util
import os
import sys
import types

import torch

PKG = "_kdiff_ref"


def _append_dims(x, target_dims):
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load():
    """The `_kdiff_ref` package with `.sampling` and `.external`, or None (with the reason) if unavailable."""
    if PKG in sys.modules:
        return sys.modules[PKG], None
    spec = importlib.util.find_spec("k_diffusion")  # finds the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        return None, "k-diffusion is not installed (pip install --no-deps k-diffusion)"
    pkg_dir = list(spec.submodule_search_locations)[0]
    pkg = types.ModuleType(PKG)
    pkg.__path__ = [pkg_dir]
    utils = types.ModuleType(PKG + ".utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    sys.modules[PKG], sys.modules[PKG + ".utils"] = pkg, utils
    try:
        for sub in ("sampling", "external"):
            file_spec = importlib.util.spec_from_file_location(f"{PKG}.{sub}", os.path.join(pkg_dir, f"{sub}.py"))
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[file_spec.name] = module
            file_spec.loader.exec_module(module)
            setattr(pkg, sub, module)
    except ImportError as e:  # scipy / torchsde / torchdiffeq missing
        for name in (PKG, PKG + ".utils", PKG + ".sampling", PKG + ".external"):
            sys.modules.pop(name, None)
        return None, f"k-diffusion's sampling code cannot be imported: {e}"
    return pkg, None


class TorchWithNoise:
    """Stands in for `torch` inside k-diffusion's sampling module, with `randn_like` returning injected
    noise: the same substitution A1111 makes (its TorchHijack) so that Euler/Heun/DPM2 churn noise comes
    from the image generators."""

    def __init__(self, draw):
        self._draw = draw

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x, *args, **kwargs):
        return self._draw()
