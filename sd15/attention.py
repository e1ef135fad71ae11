"""One attention entry point for every attention site in sd15, with swappable backends.

The four call sites (UNet self-attention `attn1`, UNet cross-attention `attn2`, CLIP's causal
self-attention, the VAE mid-block attention) all call `attention(q, k, v)` with
q: (B, H, Lq, D) and k, v: (B, H, Lk, D), and get (B, H, Lq, D) back. Scale is D ** -0.5.

Backends (a literal dict below):
  "sdpa"    torch's scaled_dot_product_attention; on CUDA it picks the fused flash /
            memory-efficient / cuDNN kernels. The default.
  "math"    the reference: explicit q @ kᵀ, softmax in fp32, @ v. Tests compare against it.
  "chunked" the math path over slices of the queries, so the (Lq, Lk) score matrix never
            exceeds a memory budget; for very large images without fused kernels.

Choose per call (`attention(..., backend="math")`), per block of code
(`with use_attention_backend("math"): ...`), or for the current thread (`set_attention_backend`).
A backend may also be any callable with the signature of `attention_math`; that is how a
researcher captures or replaces attention (e.g. to record attention maps) without editing
the model files. The choice is per thread: it lives in a `threading.local` attribute, so a
setting made in one thread (one server job) is not seen by another, and every new thread
starts with "sdpa" whatever its parent chose. A plain attribute is what torch.compile can
read: a compiled UNet reads it while tracing and guards on it, so a different backend gets
its own graph, and no thread waits for another.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch
import torch.nn.functional as F


def attention_sdpa(q, k, v, causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def attention_math(q, k, v, causal=False):
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, H, Lq, Lk), softmax in fp32
    if causal:
        lq, lk = scores.shape[-2:]
        future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v  # (B, H, Lq, D)


# Largest score matrix (in elements, across B and H) the chunked backend materialises at once:
# 2**27 fp32 elements = 512 MiB.
CHUNK_ELEMENTS = 2**27


def attention_chunked(q, k, v, causal=False):
    b, h, lq, _ = q.shape
    lk = k.shape[-2]
    step = max(1, CHUNK_ELEMENTS // max(1, b * h * lk))
    if step >= lq:
        return attention_math(q, k, v, causal)
    out = torch.empty(b, h, lq, v.shape[-1], dtype=v.dtype, device=v.device)
    scale = q.shape[-1] ** -0.5
    for i in range(0, lq, step):
        scores = (q[:, :, i:i + step] @ k.transpose(-2, -1)).float() * scale  # (B, H, step, Lk)
        if causal:
            rows = torch.arange(i, min(i + step, lq), device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(lk, device=q.device)[None, :] > rows, float("-inf"))
        out[:, :, i:i + step] = scores.softmax(dim=-1).to(v.dtype) @ v
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
    try:
        return BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {sorted(BACKENDS)}") from None


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
    _resolve(backend)
    saved = _selection.backend
    _selection.backend = backend
    try:
        yield
    finally:
        _selection.backend = saved
