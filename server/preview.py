"""The live preview of a running job: the sampler's current x0 estimate as a picture, with the library's
decoders (sd15/preview.py) and A1111's options. `show_progress_type`: "Approx cheap" (A1111's fixed
latent-to-RGB matrix), "Approx NN" (`<ckpt-dir>/VAE-approx/model.pt`), "TAESD"
(`taesd_decoder.pth|.safetensors` in `<ckpt-dir>` or `<ckpt-dir>/VAE-taesd`; never downloaded) or "Full" (the
loaded VAE); a kind whose file is missing falls back to "Approx cheap", so A1111's default ("Approx NN") works
out of the box. `show_progress_grid`: the whole batch as one grid (A1111's default), else the first image.
`live_preview_content` picks the CFG denoiser's estimate shown: the prompt's, the negative prompt's or the
guided one (`CFGDenoiser.preview_latent`, chosen in server/runner.py's callback).
"""
from __future__ import annotations

import logging
import os

from sd15 import preview as lib

log = logging.getLogger("server")

_decoders: dict = {}  # (folder, device, dtype, files found) -> PreviewDecoders (networks loaded once)
_reported: set = set()


def make_preview(model, denoised, settings: dict, folder: str):
    """`denoised`: the sampler's x0 estimate (B, 4, h, w) -> one PIL image. The preview networks of `folder`
    are loaded once per device; a file added later is picked up (the cache key holds the files found), a bad
    file is logged once and treated as absent."""
    probe = lib.PreviewDecoders(folder)
    key = (os.path.abspath(folder), str(model.device), model.dtype, probe.path("TAESD"), probe.path("Approx NN"))
    found = _decoders.setdefault(key, lib.PreviewDecoders(folder, device=model.device, dtype=model.dtype))
    kind = lib.effective_preview_type(settings.get("show_progress_type", "Approx NN"), found)
    for what, error in found.errors.items():
        if (what, error) not in _reported:
            _reported.add((what, error))
            log.warning("live previews: %s file not used: %s", what, error)
    grid = bool(settings.get("show_progress_grid", True))
    out = lib.preview(model, (denoised if grid else denoised[:1]).detach(), kind, found, grid=grid)
    return out if grid else out[0]


def due(every: int, steps_done: int, last_preview: int, new_batch: bool) -> bool:
    """Whether a preview is due after this step: every `every` steps (A1111's `show_progress_every_n_steps`),
    or with -1 once per finished batch (`new_batch`: the first step of the next batch)."""
    if every == -1:
        return new_batch
    return every > 0 and steps_done - last_preview >= every
