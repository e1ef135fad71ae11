"""Live previews of a running generation, as A1111 makes them (`modules/sd_samplers_common.py`
`samples_to_images_tensor`, `modules/sd_vae_approx.py`, `modules/sd_vae_taesd.py`).

A preview shows the sampler's current x0 estimate (`denoised`), by A1111's `show_progress_type`: "Approx
cheap" (a fixed 4x3 latent-to-RGB map, one pixel per latent cell, no weights), "Approx NN" (A1111's small conv
net, `VAE-approx/model.pt`, 2x the latent size), "TAESD" (the tiny decoder, full size) and "Full" (the VAE).
Without its file "Approx NN" or "TAESD" falls back to "Approx cheap" (A1111 would download it; we never do),
so A1111's default "Approx NN" gives cheap previews out of the box. Pixels are A1111's `x·0.5 + 0.5`,
clamped, `uint8(255·x)`.
"""
from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd15.vae.approx import load_vae_approx
from sd15.vae.taesd import load_taesd_decoder
from sd15.vae.vae import SCALE_FACTOR

PREVIEW_TYPES = ("Full", "Approx NN", "Approx cheap", "TAESD")  # A1111's show_progress_type choices

#: A1111's "Approx cheap" coefficients for SD 1.x latents: rows = latent channels 0..3, columns = R, G, B.
SD1_CHEAP_COEFFS = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)


def image_grid(images: list[Image.Image], rows: int | None = None, background="black") -> Image.Image:
    """A1111's `images.image_grid`: the images row-major in `rows` rows (None: A1111's default,
    round(sqrt(n))), each cell the largest image's size (a smaller image centred in it), on `background`."""
    rows = min(rows or max(1, round(math.sqrt(len(images)))), len(images))
    cols = math.ceil(len(images) / rows)
    w, h = map(max, zip(*(im.size for im in images)))
    grid = Image.new("RGB", (cols * w, rows * h), background)
    for i, im in enumerate(images):
        grid.paste(im, (i % cols * w + (w - im.width) // 2, i // cols * h + (h - im.height) // 2))
    return grid


class PreviewDecoders:
    """The optional preview networks of a models folder, each loaded once on first use: `taesd_decoder.pth` /
    `.safetensors` in a folder or its `VAE-taesd` subfolder, and `VAE-approx/model.pt` (A1111's places). A
    file that fails to load is reported once in `errors` and treated as absent, so a bad file never breaks a
    generation."""

    NETS = {  # kind -> (loader, the file's places in a folder)
        "TAESD": (load_taesd_decoder, ("taesd_decoder.pth", "taesd_decoder.safetensors",
                                       "VAE-taesd/taesd_decoder.pth", "VAE-taesd/taesd_decoder.safetensors")),
        "Approx NN": (load_vae_approx, ("VAE-approx/model.pt",)),
    }

    def __init__(self, *dirs, device="cpu", dtype=torch.float32):
        self.dirs = [Path(d) for d in dirs if d]
        self.device, self.dtype = device, dtype
        self.errors: dict[str, str] = {}
        self._cache: dict[str, torch.nn.Module | None] = {}
        self._lock = threading.Lock()

    def path(self, kind: str) -> Path | None:
        return next((d / rel for d in self.dirs for rel in self.NETS[kind][1] if (d / rel).is_file()), None)

    def net(self, kind: str) -> torch.nn.Module | None:
        """The network of "TAESD" or "Approx NN", or None without a (usable) file."""
        with self._lock:
            if kind not in self._cache:
                path, net = self.path(kind), None
                if path is not None:
                    try:
                        net = self.NETS[kind][0](path, self.device, self.dtype)
                    except ValueError as e:
                        self.errors[kind] = str(e)
                self._cache[kind] = net
            return self._cache[kind]


def effective_preview_type(kind: str, decoders: PreviewDecoders | None = None) -> str:
    """The kind that actually runs: "Approx NN" and "TAESD" fall back to "Approx cheap" without their weights."""
    if kind not in PREVIEW_TYPES:
        raise ValueError(f"unknown preview type {kind!r}; choose one of {', '.join(PREVIEW_TYPES)}")
    if kind in PreviewDecoders.NETS and (decoders is None or decoders.net(kind) is None):
        return "Approx cheap"
    return kind


@torch.no_grad()
def preview_tensor(model, latent: torch.Tensor, kind: str = "Approx cheap",
                   decoders: PreviewDecoders | None = None) -> torch.Tensor:
    """(B, 4, h, w) scaled x0 latent -> (B, 3, H, W) preview in about [-1, 1] (H = h, 2h or 8h by kind).

    `model` is the loaded SD model (anything with a `.vae`) or the VAE itself; it is only used for "Full"."""
    kind = effective_preview_type(kind, decoders)
    if kind == "Approx cheap":
        m = torch.tensor(SD1_CHEAP_COEFFS, dtype=torch.float32, device=latent.device)  # (4, 3)
        return torch.einsum("blhw,lr->brhw", latent.float(), m)  # rgb[r] = sum_l latent[l]·M[l][r]
    net = getattr(model, "vae", model) if kind == "Full" else decoders.net(kind)
    p = next(net.parameters())
    x = latent.to(p.device, p.dtype)
    if kind == "Full":
        return net.decode(x / SCALE_FACTOR).float()
    out = net(x).float()
    return out * 2 - 1 if kind == "TAESD" else out  # TAESD's [0, 1] -> [-1, 1], as A1111


def preview(model, denoised_latent: torch.Tensor, kind: str = "Approx cheap", decoders: PreviewDecoders | None = None,
            grid: bool = False):
    """Preview images of a batch of x0 latents: a list of PIL images, or one A1111-style grid with `grid=True`
    (A1111's `show_progress_grid`). Pixels as A1111's `single_sample_to_image` (truncating)."""
    x = torch.clamp(preview_tensor(model, denoised_latent, kind, decoders) * 0.5 + 0.5, 0.0, 1.0)
    arr = (255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)  # (B, H, W, 3)
    images = [Image.fromarray(a) for a in arr]
    return image_grid(images) if grid else images
