"""TAESD decoder (Tiny AutoEncoder for Stable Diffusion, madebyollin/taesd, MIT licence), read top to bottom.

A 1.22M-parameter stand-in for the SD VAE decoder, for A1111's "TAESD" live previews. It takes the *scaled*
latent (the sampler's x0, not divided by 0.18215) and returns an image in [0, 1] at 8x the latent size:

    3·tanh(x/3) -> conv 4->64 -> ReLU -> 3 x [3 Blocks -> nearest x2 -> conv 64->64 (no bias)] -> Block -> conv 64->3

A Block is conv-ReLU-conv-ReLU-conv (3x3, 64 channels) plus the identity, then ReLU. The decoder is one
`nn.Sequential`, so the module names are the keys of `taesd_decoder.pth` (`1.weight`, `3.conv.0.weight`, ...,
`19.bias`; index 0 is the clamp); diffusers' `AutoencoderTiny` layout (`decoder.layers.N` = N+1) is accepted
too.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from sd15.checkpoint import assign_strict, load_network_file


def conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latent to (-3, 3)."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, ch: int = 64):
        super().__init__()
        self.conv = nn.Sequential(conv(ch, ch), nn.ReLU(), conv(ch, ch), nn.ReLU(), conv(ch, ch))
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + x)  # TAESD's skip is a 1x1 conv only where channels change; not here


class TAESDDecoder(nn.Sequential):
    """(B, 4, h, w) scaled latent -> (B, 3, 8h, 8w) image in about [0, 1]."""

    def __init__(self):
        layers: list[nn.Module] = [Clamp(), conv(4, 64), nn.ReLU()]  # 0, 1, 2
        for _ in range(3):  # 3-7, 8-12, 13-17
            layers += [Block(), Block(), Block(), nn.Upsample(scale_factor=2, mode="nearest"), conv(64, 64, bias=False)]
        layers += [Block(), conv(64, 3)]  # 18, 19
        super().__init__(*layers)


def load_taesd_decoder(path, device="cpu", dtype=torch.float32) -> TAESDDecoder:
    """Read `taesd_decoder.pth` or a `.safetensors` file (TAESD's own layout or diffusers' AutoencoderTiny).
    Raises ValueError with one line naming the file when it is not a TAESD decoder."""
    def build(sd):
        if any(k.startswith("decoder.layers.") for k in sd):  # diffusers: no clamp module, encoder dropped
            sd = {f"{int(m[1]) + 1}.{m[2]}": v for k, v in sd.items()
                  if (m := re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", k))}
        return assign_strict(TAESDDecoder, sd)

    return load_network_file(path, build, "not a TAESD decoder", device, dtype)
