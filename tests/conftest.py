import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/synthetic.py, tests/reference.py

import synthetic  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny SD checkpoint in the real key layout (fp32, with all the real file's extras)."""
    return synthetic.write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"))


@pytest.fixture(scope="session")
def full_ckpt(tmp_path_factory):
    """A full-size random-weight checkpoint in the exact layout of v1-5-pruned-emaonly.safetensors (4.3 GB)."""
    return synthetic.write_full_checkpoint(str(tmp_path_factory.mktemp("full") / "sd15-synth.safetensors"))


@pytest.fixture(scope="session")
def full_vae(tmp_path_factory):
    """A full-size random VAE in the exact layout of vae-ft-mse-840000-ema-pruned.safetensors."""
    return synthetic.write_full_vae(str(tmp_path_factory.mktemp("vae") / "vae-synth.safetensors"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
