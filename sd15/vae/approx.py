"""A1111's "Approx NN" live-preview decoder (`modules/sd_vae_approx.py`, weights `models/VAE-approx/model.pt`).

A small conv net from the scaled SD 1.x latent to an image in about [-1, 1] at twice the latent size: nearest x2
upsample, zero pad 11, then eight unpadded convs (kernels 7, 5, 3, 3, 3, 3, 3, 3; channels 4-8-16-32-64-32-16-8-3),
each followed by leaky ReLU 0.1 (the last one too). Module names are the keys of A1111's `model.pt`.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from sd15.checkpoint import assign_strict, load_network_file


class VAEApprox(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 7)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.conv4 = nn.Conv2d(32, 64, 3)
        self.conv5 = nn.Conv2d(64, 32, 3)
        self.conv6 = nn.Conv2d(32, 16, 3)
        self.conv7 = nn.Conv2d(16, 8, 3)
        self.conv8 = nn.Conv2d(8, 3, 3)

    def forward(self, x):
        x = F.interpolate(x, (x.shape[2] * 2, x.shape[3] * 2))  # nearest
        x = F.pad(x, (11, 11, 11, 11))  # the eight valid convs remove 6+4+2*6 = 22 pixels
        for layer in self.children():  # conv1 .. conv8, in order
            x = F.leaky_relu(layer(x), 0.1)
        return x  # (B, 3, 2h, 2w)


def load_vae_approx(path, device="cpu", dtype=torch.float32) -> VAEApprox:
    """Read A1111's `VAE-approx/model.pt` (weights only); ValueError with one line naming the file otherwise."""
    return load_network_file(path, partial(assign_strict, VAEApprox), "not an Approx NN (VAE-approx) model",
                             device, dtype)
