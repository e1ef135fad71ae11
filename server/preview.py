"""The live preview of a running job: the one place that turns the sampler's current estimate into a picture.

Today this is a full VAE decode of the first image of the batch (A1111's "Full" preview). A cheaper source
(approximate decoder, TAESD) replaces the body of `make_preview`; its callers do not change.
"""
from __future__ import annotations


def make_preview(model, denoised, settings: dict):
    """`denoised`: the sampler's current x0 estimate (B, 4, h, w) -> a PIL image of the first one."""
    from sd15.a1111 import images as imgs
    from sd15.pipeline import decode_latents

    return imgs.tensor_to_pil(decode_latents(model, denoised[:1]))[0]
