"""Seeded noise exactly as A1111 v1.10 draws it (`modules/rng.py`, `modules/rng_philox.py`, the per-image
Brownian trees of `modules/sd_samplers_common.py` over torchsde's `BrownianInterval`).

The sources (A1111's `randn_source`): "cpu" draws from a CPU `torch.Generator` and moves the result to the
device; "gpu" draws on the device (on a CPU device that is "cpu", as in A1111); "nv" is A1111's numpy
Philox4x32-10 + Box-Muller, CUDA's numbers on any device. The global torch RNG is never touched.
"""

import functools
import math
import operator
from collections import OrderedDict

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# NV source: Philox4x32-10 counter-based generator (Salmon et al. 2011), as curand uses it
# ---------------------------------------------------------------------------------------------

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key bumps (golden ratio, sqrt(3) - 1)
_MASK32 = np.uint64(0xFFFFFFFF)
# curand's Box-Muller constants: 2^-32 (exact in float32) and float32(2^-32 * 2pi)
_TWO_POW32_INV = 2.0 ** -32
_TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


def philox_randn(seed: int, offset: int, shape) -> np.ndarray:
    """Normal float32 draws of A1111's NV generator: element i uses counter (offset, 0, i, 0), key = seed."""
    n = math.prod(shape)
    c0 = np.full(n, offset & 0xFFFFFFFF, dtype=np.uint64)
    c1 = np.zeros(n, dtype=np.uint64)
    c2 = np.arange(n, dtype=np.uint64)
    c3 = np.zeros(n, dtype=np.uint64)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for r in range(10):
        p0 = np.uint64(_PHILOX_M[0]) * c0  # exact: both factors < 2^32
        p1 = np.uint64(_PHILOX_M[1]) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32
        if r < 9:
            k0 = (k0 + np.uint64(_PHILOX_W[0])) & _MASK32
            k1 = (k1 + np.uint64(_PHILOX_W[1])) & _MASK32
    # Box-Muller on the first two words, in float64 like A1111's numpy code, then rounded to float32
    u = c0.astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
    v = c1.astype(np.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32).reshape(shape)


class Generator:
    """One seeded stream of normal draws; `.randn(shape)` returns successive draws like A1111's generators."""

    def __init__(self, seed: int, source: str = "gpu", device="cpu"):
        self.seed, self.source, self.device = int(seed), source, torch.device(device)
        self.offset = 0  # NV: one counter step per randn call, whatever its size
        if source != "nv":
            # "gpu" on a CPU device falls back to the CPU generator (A1111 does the same)
            gen_device = self.device if source == "gpu" else torch.device("cpu")
            self._torch = torch.Generator(gen_device).manual_seed(self.seed)

    def randn(self, shape) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        if self.source == "nv":
            out = torch.from_numpy(philox_randn(self.seed, self.offset, shape))
            self.offset += 1
            return out.to(self.device)
        return torch.randn(shape, generator=self._torch, device=self._torch.device).to(self.device)


# ---------------------------------------------------------------------------------------------
# Per-image noise (A1111 ImageRNG)
# ---------------------------------------------------------------------------------------------

def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation-seed slerp on one (C, H, W) noise: normalised along H, per (channel, column)."""
    low_n = low / low.norm(dim=1, keepdim=True)
    high_n = high / high.norm(dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)  # (C, W)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)  # sic: A1111's near-parallel fallback swaps the weights
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


class ImageRNG:
    """A1111's per-image noise for one batch: image k has its own generator seeded with seeds[k].

    The first `next()` is the initial noise (variation seed, seed resize); later `next()` calls are the
    samplers' in-loop draws, from `seed + eta_noise_seed_delta` generators when ENSD is non-zero.
    """

    def __init__(self, shape, seeds, *, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0,
                 seed_resize_from_w=0, eta_noise_seed_delta=0, source="gpu", device="cpu"):
        self.shape = tuple(int(s) for s in shape)  # (C, H/8, W/8), per image
        self.seeds = [int(s) for s in seeds]
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        self.subseed_strength = subseed_strength
        self.seed_resize_from_h, self.seed_resize_from_w = seed_resize_from_h, seed_resize_from_w
        self.eta_noise_seed_delta = int(eta_noise_seed_delta or 0)
        self.source, self.device = source, torch.device(device)
        self.generators = [Generator(s, source, device) for s in self.seeds]
        self.is_first = True

    def _fresh_randn(self, seed, shape):
        return Generator(seed, self.source, self.device).randn(shape)

    def first(self) -> torch.Tensor:
        """The initial noise: A1111's `create_random_tensors` with variation seeds and seed resize."""
        C, H, W = self.shape
        noise_shape = self.shape
        if self.seed_resize_from_h > 0 and self.seed_resize_from_w > 0:
            noise_shape = (C, int(self.seed_resize_from_h) // 8, int(self.seed_resize_from_w) // 8)
        resized = noise_shape != self.shape
        xs = []
        for i, (seed, gen) in enumerate(zip(self.seeds, self.generators)):
            noise = self._fresh_randn(seed, noise_shape) if resized else gen.randn(self.shape)
            if self.subseeds is not None and self.subseed_strength != 0:
                sub = self._fresh_randn(self.subseeds[i] if i < len(self.subseeds) else 0, noise_shape)
                noise = slerp(self.subseed_strength, noise, sub)
            if resized:
                # paste the centre of the seed-sized noise into the centre of a full-size draw
                big = gen.randn(self.shape)
                dx, dy = (W - noise_shape[2]) // 2, (H - noise_shape[1]) // 2
                tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
                w, h = noise_shape[2] - 2 * sx, noise_shape[1] - 2 * sy
                big[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
                noise = big
            xs.append(noise)
        if self.eta_noise_seed_delta:
            self.generators = [Generator(s + self.eta_noise_seed_delta, self.source, self.device) for s in self.seeds]
        return torch.stack(xs)  # (B, C, H/8, W/8)

    def next(self) -> torch.Tensor:
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([g.randn(self.shape) for g in self.generators])  # (B, C, H/8, W/8)

    def noise_sampler(self):
        """A `noise_sampler(sigma, sigma_next)` for the samplers: each call is the next per-image draw."""
        return lambda sigma, sigma_next: self.next()


# ---------------------------------------------------------------------------------------------
# Brownian-tree noise for the SDE samplers (torchsde BrownianTree, halfway tree, tol 1e-6)
# ---------------------------------------------------------------------------------------------

def brownian_tree(t0: float, t1: float, entropy: int, shape, *, source="gpu", device="cpu", cache_size=192):
    """W(a, b) = W_b - W_a of one Brownian path on [t0, t1], a function of (entropy, a, b) only.

    The dyadic tree of torchsde's BrownianInterval(halfway_tree=True): the root holds
    W = leaf(s_W) * sqrt(t1 - t0); a node [a, b] splits at m = round((a + b) / 2, 6) with the Brownian
    bridge W_left = (m-a)/(b-a) W + sqrt((m-a)(b-m)/(b-a)) leaf(s), W_right = W - W_left, where s comes
    from numpy SeedSequence(entropy, spawn_key=(key, depth), pool_size=24); key_child = 2 key + (0|1).
    leaf(s) is the first draw of a fresh generator seeded with s (A1111 patches torchsde to do this).
    An [a, b] query sums the W of the maximal tree nodes that tile it, left to right.
    `cache_size` nodes are kept (LRU); 192 holds every node that later steps revisit (~12 MB at 512²).
    """
    start, end = round(t0, 6), round(t1, 6)  # torchsde quantises times to its tolerance 1e-6
    root_seed = np.random.SeedSequence(entropy=entropy, pool_size=24).generate_state(3)[0]
    root_w = Generator(int(root_seed), source, device).randn(shape) * math.sqrt(t1 - t0)
    cache = OrderedDict()  # (key, depth) -> W, least recently used first; recomputation is bit-identical

    def children(a, b, key, depth, w):
        """(m, W_left, W_right) of node [a, b]."""
        left, right = (2 * key, depth + 1), (2 * key + 1, depth + 1)
        m = round(0.5 * (b + a), 6)
        if left in cache and right in cache:
            cache.move_to_end(left)
            cache.move_to_end(right)
            return m, cache[left], cache[right]
        seed = np.random.SeedSequence(entropy=entropy, spawn_key=(key, depth), pool_size=24).generate_state(4)[0]
        left_diff, right_diff, h_inv = m - a, b - m, 1 / (b - a)
        noise = Generator(int(seed), source, device).randn(shape)
        w_left = left_diff * w * h_inv + math.sqrt(left_diff * right_diff * h_inv) * noise
        w_right = w - w_left
        cache[left], cache[right] = w_left, w_right
        while len(cache) > cache_size:
            cache.popitem(last=False)
        return m, w_left, w_right

    def pieces(a, b, key, depth, w, qa, qb):
        if (qa, qb) == (a, b):
            yield w
            return
        m, w_left, w_right = children(a, b, key, depth, w)
        if qa < m:
            yield from pieces(a, m, 2 * key, depth + 1, w_left, qa, min(qb, m))
        if qb > m:
            yield from pieces(m, b, 2 * key + 1, depth + 1, w_right, max(qa, m), qb)

    def increment(lo: float, hi: float) -> torch.Tensor:
        lo = min(max(round(float(lo), 6), start), end)
        hi = min(max(round(float(hi), 6), start), end)
        if lo >= hi:
            return torch.zeros(shape, device=device)
        return functools.reduce(operator.add, pieces(start, end, 0, 0, root_w, lo, hi))

    return increment


def brownian_noise_sampler(x: torch.Tensor, sigmas: torch.Tensor, seeds, *, source="gpu"):
    """k-diffusion's BrownianTreeNoiseSampler with one tree per image seed, as A1111 builds it.

    The trees span [min σ > 0, max σ] of the *full* schedule (also in img2img). A query (σ, σ_next)
    returns (W(σ_next) - W(σ)) / sqrt(|σ_next - σ|), i.e. unit-variance noise; the sign is -1 because σ
    decreases along the path.
    """
    sigma_lo, sigma_hi = sigmas[sigmas > 0].min(), sigmas.max()
    trees = [brownian_tree(float(sigma_lo), float(sigma_hi), s, x.shape[1:], source=source, device=x.device)
             for s in seeds]

    def noise_sampler(sigma, sigma_next):
        sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi = sorted((float(sigma), float(sigma_next)))
        w = torch.stack([tree(lo, hi) for tree in trees])  # (B, C, H, W)
        sign = -1 if float(sigma) > float(sigma_next) else 1
        return w * sign / (sigma_next - sigma).abs().sqrt()

    return noise_sampler
