"""Seamless tiling (A1111's "Tiling" checkbox, API field `tiling: true`).

A1111 (`modules/sd_hijack.py`, `apply_circular`) switches every `Conv2d` of the UNet and the VAE to
`padding_mode="circular"`: each convolution then sees the opposite edge of its input instead of zeros, so the
image wraps around and tiles like a texture. Convolutions without padding are unaffected, and so is the
explicit zero pad of the VAE encoder's stride-2 downsampling (as in A1111).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn


@contextmanager
def circular_padding(*modules: nn.Module):
    """Within the block every `nn.Conv2d` under `modules` pads circularly; each conv's mode is restored
    afterwards (also on error)."""
    saved = {m: m.padding_mode for mod in modules for m in mod.modules() if isinstance(m, nn.Conv2d)}
    try:
        for conv in saved:
            conv.padding_mode = "circular"  # Conv2d.forward then pads with F.pad(mode="circular"), padding=0 conv
        yield
    finally:
        for conv, mode in saved.items():
            conv.padding_mode = mode
