import os
import re
import sys

# Idle OpenMP threads sleep instead of spinning. On a busy machine (a shared box, a CI runner) a spinning
# thread burns the CPU its partner needs: measured on a loaded 2-core machine, test_tiled_vae's memory test
# took 170 s of CPU with the default policy and 19 s with this one. It must be set before torch loads
# OpenMP; a value set by the caller wins. Subprocesses (CLI, server, README tests) inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/synthetic.py, tests/reference.py

import synthetic  # noqa: E402

# Packages some test files need that a runtime-only machine (a GPU box with torch, safetensors, numpy,
# pillow, tokenizers, ftfy) may lack: such a file is reported as skipped, not as a collection error, so
# `python -m pytest -m gpu` collects there.
OPTIONAL = {"starlette", "uvicorn", "httpx", "requests", "webuiapi", "diffusers", "transformers", "accelerate",
            "k_diffusion", "scipy", "torchsde", "torchdiffeq", "regex", "tqdm"}
_MISSING = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.failed and isinstance(collector, pytest.Module):
        missing = _MISSING.search(str(report.longrepr))
        if missing and missing.group(1).split(".")[0] in OPTIONAL:
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0, f"Skipped: needs {missing.group(1)}, which is not installed")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny SD checkpoint in the real key layout (fp32, with all the real file's extras)."""
    return synthetic.write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"))


@pytest.fixture(scope="session")
def full_ckpt(tmp_path_factory):
    """A full-size random-weight checkpoint in the exact layout of v1-5-pruned-emaonly.safetensors (4.3 GB).
    SD15_FULL_CKPT names an existing one instead (bench/device.sh writes one file for every step)."""
    path = os.environ.get("SD15_FULL_CKPT")
    if path and os.path.exists(path):
        return path
    return synthetic.write_full_checkpoint(str(tmp_path_factory.mktemp("full") / "sd15-synth.safetensors"))


@pytest.fixture(scope="session")
def full_vae(tmp_path_factory):
    """A full-size random VAE in the exact layout of vae-ft-mse-840000-ema-pruned.safetensors."""
    return synthetic.write_full_vae(str(tmp_path_factory.mktemp("vae") / "vae-synth.safetensors"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
