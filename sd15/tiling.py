"""Seamless tiling (A1111's "Tiling" checkbox, API field `tiling: true`).

A1111 (`modules/sd_hijack.py`, `apply_circular`) switches every `Conv2d` of the loaded model - UNet and VAE - to
`padding_mode="circular"`: each convolution then sees the opposite edge of its input instead of zeros, so the
generated image wraps around left-right and top-bottom and can be tiled like a texture.

Applied from outside the model files: `circular_padding(unet, vae)` sets the padding mode of every Conv2d below the
given modules for the duration of a `with` block and restores each conv's previous mode afterwards (also on error).
Convolutions without padding are unaffected, and so is the explicit zero pad of the VAE encoder's stride-2
downsampling (also the case in A1111).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn


@contextmanager
def circular_padding(*modules: nn.Module, enabled: bool = True):
    """Within the block every `nn.Conv2d` under `modules` pads circularly (`enabled=False` changes nothing)."""
    convs = {id(m): m for mod in modules if mod is not None for m in mod.modules() if isinstance(m, nn.Conv2d)}
    saved = [(conv, conv.padding_mode) for conv in convs.values()] if enabled else []
    try:
        for conv, _ in saved:
            conv.padding_mode = "circular"  # Conv2d.forward then pads with F.pad(mode="circular"), padding=0 conv
        yield
    finally:
        for conv, mode in saved:
            conv.padding_mode = mode
