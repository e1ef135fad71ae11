"""The one attention entry point of sd15, with swappable backends.

Every attention site (UNet, CLIP, the VAE mid-block) calls `attention(q, k, v)`: q (B, H, Lq, D), k, v (B, H,
Lk, D) -> (B, H, Lq, D), scale D ** -0.5. Backends: "sdpa" (torch's fused kernels; the default), "math" (the
reference, softmax in fp32), "chunked" (math over query slices, bounding the score matrix's memory) or any
function with `attention_math`'s signature, which is how attention is captured or replaced without editing the
model files. The choice is per call, per block or per thread: a `threading.local` attribute, which
torch.compile guards on, so another backend gets its own graph and no thread waits for another.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch
import torch.nn.functional as F


def attention_sdpa(q, k, v, causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def attention_math(q, k, v, causal=False, first_row=0):
    """The reference. `first_row`: the position of q's first row in the sequence (for slices of causal
    attention)."""
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, H, Lq, Lk), softmax in fp32
    if causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1 + first_row)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v  # (B, H, Lq, D)


# The largest score matrix (elements, across B and H) the chunked backend builds at once: 512 MiB in fp32.
CHUNK_ELEMENTS = 2**27


def attention_chunked(q, k, v, causal=False):
    b, h, lq, _ = q.shape
    step = max(1, CHUNK_ELEMENTS // (b * h * k.shape[-2]))
    out = torch.empty(b, h, lq, v.shape[-1], dtype=v.dtype, device=v.device)
    for i in range(0, lq, step):
        out[:, :, i:i + step] = attention_math(q[:, :, i:i + step], k, v, causal, first_row=i)
    return out


BACKENDS: dict[str, Callable] = {
    "sdpa": attention_sdpa,
    "math": attention_math,
    "chunked": attention_chunked,
}


class _Selection(threading.local):
    """The current thread's backend; the class attribute is what a thread sees before it sets one."""
    backend = "sdpa"


_selection = _Selection()


def _resolve(backend) -> Callable:
    if callable(backend):
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend]


def attention(q, k, v, causal: bool = False, backend=None):
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D) -> (B, H, Lq, D). Scale = D ** -0.5."""
    return _resolve(backend if backend is not None else _selection.backend)(q, k, v, causal=causal)


def set_attention_backend(backend) -> None:
    """Set the backend for the current thread (other threads, and threads started later, keep theirs)."""
    _resolve(backend)
    _selection.backend = backend


def get_attention_backend():
    return _selection.backend


@contextlib.contextmanager
def use_attention_backend(backend):
    """`with use_attention_backend("math"): ...` runs the block (in this thread) with that backend."""
    saved = _selection.backend
    set_attention_backend(backend)
    try:
        yield
    finally:
        _selection.backend = saved
