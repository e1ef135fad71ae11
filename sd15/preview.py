"""Live previews of a running generation, as A1111 makes them (`modules/sd_samplers_common.py`
`samples_to_images_tensor` / `single_sample_to_image`, `modules/sd_vae_approx.py`, `modules/sd_vae_taesd.py`).

A preview shows the sampler's current prediction of the final latent (x0, `denoised` in the step callback), not the
noisy latent. The kinds are A1111's `show_progress_type` choices:

- "Approx cheap": a fixed 4x3 linear map from the SD 1.x latent channels to RGB, one pixel per latent cell (64x64
  for a 512x512 image); no weights, almost free.
- "Approx NN": A1111's small conv net (`VAE-approx/model.pt`, 2x the latent size). **Without its weights this
  falls back to "Approx cheap"** (A1111 would download them; we never download), so A1111's default
  `show_progress_type = "Approx NN"` gives cheap previews out of the box.
- "TAESD": the 1.2M-parameter tiny decoder (`taesd_decoder.pth` / `.safetensors`), full size. Without its file it
  also falls back to "Approx cheap".
- "Full": the real VAE (`vae.decode(x0 / 0.18215)`), exact but as slow as the final decode.

Every kind yields an image in about [-1, 1] (TAESD's [0, 1] output is mapped by `2x - 1`, as A1111 does), turned
into 8-bit pixels by A1111's `x·0.5 + 0.5`, clamp to [0, 1], `uint8(255·x)` (truncation).
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


def approx_cheap_tensor(latent: torch.Tensor) -> torch.Tensor:
    """(B, 4, h, w) scaled latent -> (B, 3, h, w) image in about [-1, 1]: rgb[r] = sum_l latent[l]·M[l][r]."""
    m = torch.tensor(SD1_CHEAP_COEFFS, dtype=latent.dtype, device=latent.device)  # (4, 3)
    return torch.einsum("blhw,lr->brhw", latent, m)


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in about [-1, 1] -> PIL images, A1111's `single_sample_to_image` conversion (truncating)."""
    x = torch.clamp(x.float() * 0.5 + 0.5, 0.0, 1.0)
    arr = (255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)  # (B, H, W, 3)
    return [Image.fromarray(a) for a in arr]


def approx_cheap(latent: torch.Tensor) -> list[Image.Image]:
    """The "Approx cheap" preview of every latent of the batch, one pixel per latent cell."""
    return to_images(approx_cheap_tensor(latent))


def image_grid(images: list[Image.Image]) -> Image.Image:
    """A1111's `images.image_grid` with default options (`n_rows = -1`): round(sqrt(n)) rows, black background."""
    rows = min(max(1, round(math.sqrt(len(images)))), len(images))
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, im in enumerate(images):
        grid.paste(im, (i % cols * w, i // cols * h))
    return grid


class PreviewDecoders:
    """The optional preview networks of a models folder, each loaded once on first use.

    Looks for `taesd_decoder.pth` / `taesd_decoder.safetensors` in each folder or its `VAE-taesd` subfolder
    (A1111's place), and `VAE-approx/model.pt` (A1111's place) for "Approx NN". A file that fails
    to load is reported once in `errors` and treated as absent, so a bad file never breaks a generation.
    """

    TAESD_NAMES = ("taesd_decoder.pth", "taesd_decoder.safetensors")

    def __init__(self, *dirs, device="cpu", dtype=torch.float32):
        self.dirs = [Path(d) for d in dirs if d]
        self.device, self.dtype = device, dtype
        self.errors: dict[str, str] = {}
        self._cache: dict[str, torch.nn.Module | None] = {}
        self._lock = threading.Lock()

    def _find(self, candidates: list[str]) -> Path | None:
        for d in self.dirs:
            for rel in candidates:
                if (d / rel).is_file():
                    return d / rel
        return None

    def taesd_path(self) -> Path | None:
        return self._find([*self.TAESD_NAMES, *(f"VAE-taesd/{n}" for n in self.TAESD_NAMES)])

    def approx_nn_path(self) -> Path | None:
        return self._find(["VAE-approx/model.pt"])

    def _get(self, kind: str, find, load) -> torch.nn.Module | None:
        with self._lock:
            if kind not in self._cache:
                path, net = find(), None
                if path is not None:
                    try:
                        net = load(path, self.device, self.dtype)
                    except ValueError as e:
                        self.errors[kind] = str(e)
                self._cache[kind] = net
            return self._cache[kind]

    def taesd(self) -> torch.nn.Module | None:
        return self._get("TAESD", self.taesd_path, load_taesd_decoder)

    def approx_nn(self) -> torch.nn.Module | None:
        return self._get("Approx NN", self.approx_nn_path, load_vae_approx)


def effective_preview_type(kind: str, decoders: PreviewDecoders | None = None) -> str:
    """The kind that actually runs: "Approx NN" and "TAESD" fall back to "Approx cheap" without their weights."""
    if kind not in PREVIEW_TYPES:
        raise ValueError(f"unknown preview type {kind!r}; choose one of {', '.join(PREVIEW_TYPES)}")
    if kind == "Approx NN" and (decoders is None or decoders.approx_nn() is None):
        return "Approx cheap"
    if kind == "TAESD" and (decoders is None or decoders.taesd() is None):
        return "Approx cheap"
    return kind


@torch.no_grad()
def preview_tensor(model, latent: torch.Tensor, kind: str = "Approx cheap",
                   decoders: PreviewDecoders | None = None) -> torch.Tensor:
    """(B, 4, h, w) scaled x0 latent -> (B, 3, H, W) preview in about [-1, 1] (H = h, 2h or 8h by kind).

    `model` is the loaded SD model (anything with a `.vae`) or the VAE itself; it is only used for "Full"."""
    kind = effective_preview_type(kind, decoders)
    if kind == "Approx cheap":
        return approx_cheap_tensor(latent.float())
    if kind == "Approx NN":
        net = decoders.approx_nn()
        p = next(net.parameters())
        return net(latent.to(p.device, p.dtype)).float()
    if kind == "TAESD":
        net = decoders.taesd()
        p = next(net.parameters())
        return net(latent.to(p.device, p.dtype)).float() * 2 - 1
    vae = getattr(model, "vae", model)
    p = next(vae.parameters())
    return vae.decode(latent.to(p.device, p.dtype) / SCALE_FACTOR).float()


def preview(model, denoised_latent: torch.Tensor, kind: str = "Approx cheap", decoders: PreviewDecoders | None = None,
            grid: bool = False):
    """Preview images of a batch of x0 latents: a list of PIL images, or one A1111-style grid with `grid=True`
    (A1111's `show_progress_grid`, default on, shows the whole batch as a grid)."""
    images = to_images(preview_tensor(model, denoised_latent, kind, decoders))
    return image_grid(images) if grid else images
