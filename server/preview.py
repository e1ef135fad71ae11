"""The live preview of a running job: the one place that turns the sampler's current x0 estimate into a picture,
with the library's decoders (sd15/preview.py) and A1111's options:

- `show_progress_type`: "Approx cheap" (A1111's fixed 4x3 latent-to-RGB matrix, no weights), "Approx NN"
  (`<ckpt-dir>/VAE-approx/model.pt`), "TAESD" (`taesd_decoder.pth|.safetensors` in `<ckpt-dir>` or
  `<ckpt-dir>/VAE-taesd`; never downloaded), "Full" (the loaded VAE). A kind whose file is missing falls back to
  "Approx cheap", so A1111's default ("Approx NN") gives cheap previews out of the box.
- `show_progress_grid`: the whole batch as one grid (A1111's default), else the first image.
- `live_preview_content`: sd15's CFG denoiser hands the sampler callback only the guided x0, so every choice
  ("Prompt", "Negative prompt", "Combined") shows the combined (CFG) estimate.

When a preview is due (`show_progress_every_n_steps`, `live_previews_enable`) is decided by the sampler callback
in server/runner.py; a preview is only made while someone looks (an event-stream listener or a /progress poll).
"""
from __future__ import annotations

import logging
import os
import threading

from sd15 import preview as lib

log = logging.getLogger("server")

_decoders: dict = {}  # (folder, device, dtype, files found) -> PreviewDecoders (networks loaded once)
_lock = threading.Lock()
_reported: set = set()


def decoders(folder: str, device, dtype) -> lib.PreviewDecoders:
    """The preview networks of the models folder on `device`; a file added later is picked up (the key holds
    the files found), a bad file is logged once and treated as absent."""
    probe = lib.PreviewDecoders(folder)
    key = (os.path.abspath(folder), str(device), dtype, probe.taesd_path(), probe.approx_nn_path())
    with _lock:
        if key not in _decoders:
            _decoders[key] = lib.PreviewDecoders(folder, device=device, dtype=dtype)
        return _decoders[key]


def preview_kind(settings: dict, found: lib.PreviewDecoders) -> str:
    """The kind that runs for these options (the fallback applied), logged once per change."""
    kind = lib.effective_preview_type(settings.get("show_progress_type", "Approx NN"), found)
    for what, error in found.errors.items():
        if (what, error) not in _reported:
            _reported.add((what, error))
            log.warning("live previews: %s file not used: %s", what, error)
    return kind


def make_preview(model, denoised, settings: dict, folder: str = ""):
    """`denoised`: the sampler's current x0 estimate (B, 4, h, w) -> one PIL image (a grid of the batch with
    A1111's `show_progress_grid`, else the first image)."""
    import torch

    found = decoders(folder or ".", getattr(model, "device", "cpu"), getattr(model, "dtype", torch.float32))
    kind = preview_kind(settings, found)
    grid = bool(settings.get("show_progress_grid", True))
    latent = denoised if grid else denoised[:1]
    out = lib.preview(model, latent.detach(), kind, found, grid=grid)
    return out if grid else out[0]


def due(every: int, steps_done: int, last_preview: int, new_batch: bool) -> bool:
    """Whether a preview is due after this step: every `every` steps (A1111's `show_progress_every_n_steps`),
    or with -1 once per finished batch (`new_batch`: the first step of the next batch)."""
    if every == -1:
        return new_batch
    return every > 0 and steps_done - last_preview >= every
