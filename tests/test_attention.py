"""Every attention backend equals the `math` reference: SD 1.5's head sizes (40/80/160, CLIP's 64, the
VAE's single 512-wide head), self and cross (Lk = 77), causal and not, fp32 / bf16."""
import threading

import pytest
import torch

import sd15.attention as A


def _qkv(b, h, lq, lk, d, dtype=torch.float32):
    g = torch.Generator().manual_seed(lq * 7 + d)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for n in (lq, lk, lk)]


CASES = [  # (B, H, Lq, Lk, D)
    (2, 8, 256, 256, 40), (2, 8, 64, 77, 80), (1, 8, 16, 154, 160),  # UNet attn1 / attn2, long prompt
    (2, 12, 77, 77, 64),  # CLIP
    (1, 1, 256, 256, 512),  # VAE mid-block
]


@pytest.mark.parametrize("backend", ["sdpa", "chunked"])
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_backend_matches_math(backend, shape, causal):
    b, h, lq, lk, d = shape
    if causal and lq != lk:
        pytest.skip("causal attention is only used for self-attention")
    q, k, v = _qkv(b, h, lq, lk, d)
    ref = A.attention(q, k, v, causal=causal, backend="math")
    out = A.attention(q, k, v, causal=causal, backend=backend)
    assert out.shape == (b, h, lq, d)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_math_is_softmax_attention():
    q, k, v = _qkv(1, 2, 5, 7, 4, torch.float64)
    w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # D = 4 -> scale 1/2
    assert torch.allclose(A.attention_math(q, k, v), w @ v, atol=1e-12)
    mask = torch.ones(5, 7, dtype=torch.bool).triu(1)
    wc = torch.softmax((q @ k.transpose(-1, -2) / 2.0).masked_fill(mask, float("-inf")), dim=-1)
    assert torch.allclose(A.attention_math(q, k, v, causal=True), wc @ v, atol=1e-12)


def test_chunked_really_chunks(monkeypatch):
    monkeypatch.setattr(A, "CHUNK_ELEMENTS", 4 * 77 * 3)  # forces 3-query slices
    q, k, v = _qkv(1, 4, 50, 77, 8)
    for causal in (False,):
        ref = A.attention_math(q, k, v, causal=causal)
        assert (A.attention_chunked(q, k, v, causal=causal) - ref).abs().max() <= 1e-6
    q, k, v = _qkv(1, 4, 77, 77, 8)
    ref = A.attention_math(q, k, v, causal=True)
    assert (A.attention_chunked(q, k, v, causal=True) - ref).abs().max() <= 1e-6


def test_bf16_close_to_fp32():
    q, k, v = _qkv(2, 8, 64, 77, 40)
    ref = A.attention_math(q, k, v)
    for backend in ("sdpa", "math", "chunked"):
        out = A.attention(*(t.bfloat16() for t in (q, k, v)), backend=backend)
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).abs().max() <= 3e-2 * ref.abs().max()


def test_selection_context_manager_and_custom_backend():
    seen = []

    def capture(q, k, v, causal=False):
        seen.append((q.shape, causal))
        return A.attention_math(q, k, v, causal)

    q, k, v = _qkv(1, 2, 3, 3, 4)
    assert A.get_attention_backend() == "sdpa"
    with A.use_attention_backend(capture):
        A.attention(q, k, v, causal=True)
        with A.use_attention_backend("math"):
            A.attention(q, k, v)
    A.attention(q, k, v)
    assert seen == [(torch.Size([1, 2, 3, 4]), True)]
    assert A.get_attention_backend() == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.attention(q, k, v, backend="xformers")


def test_setting_is_per_thread():
    A.set_attention_backend("math")
    try:
        seen = []
        t = threading.Thread(target=lambda: seen.append(A.get_attention_backend()))
        t.start()
        t.join()
        assert seen == ["sdpa"] and A.get_attention_backend() == "math"
    finally:
        A.set_attention_backend("sdpa")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("d", [40, 64, 80, 160, 512])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_sdpa_matches_math(d, dtype):
    q, k, v = (t.cuda().to(dtype) for t in _qkv(2, 8 if d < 512 else 1, 1024, 77 if d != 512 else 1024, d))
    ref = A.attention_math(q.float(), k.float(), v.float())
    out = A.attention(q, k, v, backend="sdpa")
    assert (out.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
