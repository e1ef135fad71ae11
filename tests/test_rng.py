"""A1111's noise: generator sources, ImageRNG (seeds, variation seeds, seed resize, ENSD) and the
Brownian trees, against A1111's values, an independent Philox reference and torchsde."""

import math
import struct

import numpy as np
import pytest
import torch

from sd15.rng import Generator, ImageRNG, brownian_noise_sampler, philox_randn, slerp
from sd15.samplers import get_sigmas, sd15_alphas_cumprod

LATENT = (4, 64, 64)
CPU_ATOL = 1e-6  # torch's vectorised log/sin/cos differ by ≤ 5e-7 across CPUs


def first4(t):
    return t.reshape(-1)[:4].tolist()


def f32(values):
    """Exact float32 values from their shortest printed form (how the spec lists them)."""
    return [float(np.float32(v)) for v in values]


# ---------------------------------------------------------------------------------------------
# CPU source: torch's CPU generator
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,shape,expected", [
    (1234, LATENT, [-0.11171857, -0.4965901, 0.1630737, -0.88168776]),
    (0, LATENT, [-1.1258398, -1.1523602, -0.25057858, -0.4338788]),
    (12345, LATENT, [-1.4798077, 0.487306, -3.0127938, 0.4438552]),
    (4294967293, (4, 8, 8), [-0.3122223, -0.49657878, 0.1118231, 1.677742]),
])
def test_cpu_first_draws(seed, shape, expected):
    assert first4(Generator(seed, "cpu").randn(shape)) == pytest.approx(expected, abs=CPU_ATOL)


def test_cpu_later_draws_continue_the_stream_and_gpu_on_cpu_is_cpu():
    g = Generator(1234, "cpu")
    g.randn(LATENT)
    assert first4(g.randn(LATENT)) == pytest.approx([-0.87845635, -0.28831822, -0.22015348, -0.04029859], abs=CPU_ATOL)
    a, b = Generator(77, "gpu", device="cpu"), Generator(77, "cpu")
    for _ in range(2):
        assert torch.equal(a.randn((3, 5)), b.randn((3, 5)))


# ---------------------------------------------------------------------------------------------
# NV source: bit-exact
# ---------------------------------------------------------------------------------------------

def philox_reference(seed, offset, index):
    """One NV value from the spec's description, with Python integers and math."""
    c = [offset & 0xFFFFFFFF, 0, index, 0]
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for r in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k1, p0 & 0xFFFFFFFF]
        if r < 9:
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    C = struct.unpack("f", struct.pack("f", 2.3283064e-10 * 6.2831855))[0]
    u = c[0] * 2.0 ** -32 + 2.0 ** -33
    v = c[1] * C + C / 2
    return struct.unpack("f", struct.pack("f", math.sqrt(-2.0 * math.log(u)) * math.sin(v)))[0]


def test_nv_matches_the_spec_bit_for_bit():
    expected = f32([-0.9246624, -0.42534396, -2.6438458, 0.14518388, -0.12086651, -0.5797257,
                    -0.6228513, -0.32838714, -1.074542, -0.3631441, -1.6710504, 2.265505])
    g = Generator(0, "nv")
    assert g.randn((3, 4)).reshape(-1).tolist() == expected
    assert g.randn((3, 4)).reshape(-1)[:4].tolist() == f32([0.18082589, -0.5522627, 0.9238134, -0.73497033])
    assert first4(Generator(1, "nv").randn((4,))) == f32([-0.29627782, 2.676448, -0.1408464, -0.84409505])
    assert Generator(2 ** 32 + 5, "nv").randn((2,)).tolist() == f32([-2.8427474, 1.3404924])  # all 64 key bits
    g = Generator(1234, "nv")
    assert first4(g.randn(LATENT)) == f32([-1.6164904, 0.5684552, -0.5102246, -0.9113394])
    assert first4(g.randn(LATENT)) == f32([0.6330828, 1.6358219, -0.34586293, 1.0195528])


@pytest.mark.parametrize("seed,offset", [(0, 0), (1234, 3), (2 ** 40 + 17, 1), (4294967295, 0)])
def test_nv_matches_an_independent_reference_everywhere(seed, offset):
    values = philox_randn(seed, offset, (4, 64, 64)).reshape(-1)
    for i in (0, 1, 2, 1000, 16383):
        assert float(values[i]) == philox_reference(seed, offset, i)


def test_nv_is_the_same_on_any_device_and_counts_calls_not_elements():
    g = Generator(5, "nv", device="cpu")
    g.randn((1,))  # one call of any size advances the offset by one
    assert torch.equal(g.randn((2, 3)), torch.from_numpy(philox_randn(5, 1, (2, 3))))
    assert g.randn((2,)).device.type == "cpu" and g.randn((2,)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# ImageRNG
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["cpu", "nv"])
def test_batch_image_k_uses_its_own_generator(source):
    rng = ImageRNG(LATENT, [1234, 1235], source=source)
    first, second = rng.next(), rng.next()
    for k, seed in enumerate([1234, 1235]):
        g = Generator(seed, source)
        assert torch.equal(first[k], g.randn(LATENT)) and torch.equal(second[k], g.randn(LATENT))
    if source == "cpu":
        assert first[1, 0, 0, :2].tolist() == pytest.approx([-0.23223224, -0.87013483], abs=CPU_ATOL)


def test_ensd_replaces_the_generators_after_the_first_draw():
    rng = ImageRNG(LATENT, [1234], eta_noise_seed_delta=31337, source="cpu")
    assert first4(rng.next()) == pytest.approx([-0.11171857, -0.4965901, 0.1630737, -0.88168776], abs=CPU_ATOL)
    assert first4(rng.next()) == pytest.approx([0.13459216, -0.35162407, -0.5950787, -1.2228273], abs=CPU_ATOL)
    rng = ImageRNG(LATENT, [1234], eta_noise_seed_delta=31337, source="nv")
    rng.next()
    assert first4(rng.next()) == f32([0.12240147, -0.55943704, 1.0171717, 0.9040467])
    sampler = ImageRNG(LATENT, [1234], eta_noise_seed_delta=31337, source="nv").noise_sampler()
    sampler(None, None)
    assert first4(sampler(1.0, 0.5)) == f32([0.12240147, -0.55943704, 1.0171717, 0.9040467])


def test_variation_seed_slerp():
    rng = ImageRNG(LATENT, [1234], subseeds=[99], subseed_strength=0.3, source="cpu")
    assert first4(rng.next()) == pytest.approx([0.0309369, -1.5345227, 0.485386, -0.4076511], abs=CPU_ATOL)
    # missing subseeds count as 0; strength 0 leaves the seed noise untouched
    two = ImageRNG((4, 8, 8), [7, 8], subseeds=[99], subseed_strength=0.5, source="cpu").next()
    sub0 = Generator(0, "cpu").randn((4, 8, 8))
    assert torch.allclose(two[1], slerp(0.5, Generator(8, "cpu").randn((4, 8, 8)), sub0))
    plain = ImageRNG((4, 8, 8), [7], subseeds=[99], subseed_strength=0.0, source="cpu").next()
    assert torch.equal(plain[0], Generator(7, "cpu").randn((4, 8, 8)))


def test_slerp_normalises_along_height_and_keeps_a1111s_fallback_weights():
    gen = torch.Generator().manual_seed(1)
    low, high = torch.randn(4, 6, 5, generator=gen), torch.randn(4, 6, 5, generator=gen)
    dot = ((low / low.norm(dim=1, keepdim=True)) * (high / high.norm(dim=1, keepdim=True))).sum(1)  # (C, W)
    omega = torch.acos(dot)[:, None, :]
    expected = torch.sin(0.7 * omega) / torch.sin(omega) * low + torch.sin(0.3 * omega) / torch.sin(omega) * high
    assert torch.allclose(slerp(0.3, low, high), expected, atol=1e-6)
    # nearly parallel: A1111 returns low·v + high·(1 − v), the "swapped" linear blend
    assert torch.equal(slerp(0.3, low, low * 2), low * 0.3 + low * 2 * 0.7)


def test_seed_resize_pastes_the_centre():
    out = ImageRNG(LATENT, [1234], seed_resize_from_h=384, seed_resize_from_w=384, source="cpu").next()[0]
    big, small = Generator(1234, "cpu").randn(LATENT), Generator(1234, "cpu").randn((4, 48, 48))
    expected = big.clone()
    expected[:, 8:56, 8:56] = small
    assert torch.equal(out, expected)
    # larger seed size: the centre of the seed noise is cropped into the whole latent
    out = ImageRNG((4, 8, 8), [3], seed_resize_from_h=128, seed_resize_from_w=96, source="cpu").next()[0]
    assert torch.equal(out, Generator(3, "cpu").randn((4, 16, 12))[:, 4:12, 2:10])


def test_resize_and_variation_together():
    """The variation noise is drawn at the seed-resize shape and slerped before pasting."""
    rng = ImageRNG((4, 8, 8), [3], subseeds=[4], subseed_strength=0.25, seed_resize_from_h=48,
                   seed_resize_from_w=48, source="cpu")
    small = slerp(0.25, Generator(3, "cpu").randn((4, 6, 6)), Generator(4, "cpu").randn((4, 6, 6)))
    expected = Generator(3, "cpu").randn((4, 8, 8))
    expected[:, 1:7, 1:7] = small
    assert torch.equal(rng.next()[0], expected)


# ---------------------------------------------------------------------------------------------
# Brownian trees
# ---------------------------------------------------------------------------------------------

def test_brownian_tree_values():
    sigmas = get_sigmas("Karras", 20, sd15_alphas_cumprod())
    x = torch.zeros(1, *LATENT)
    cpu = brownian_noise_sampler(x, sigmas, [1234], source="cpu")
    expected_01 = [-0.46936232, 0.33092108, -1.1076995, 0.24672449]
    expected_12 = [0.74849498, -0.13318013, -0.34002632, -0.13347052]
    assert first4(cpu(sigmas[0], sigmas[1])) == pytest.approx(expected_01, abs=CPU_ATOL)
    assert first4(cpu(sigmas[1], sigmas[2])) == pytest.approx(expected_12, abs=CPU_ATOL)
    nv = brownian_noise_sampler(x, sigmas, [1234], source="nv")
    assert first4(nv(sigmas[0], sigmas[1])) == pytest.approx([-1.5879831, 0.7686648, 0.0552625, -0.7776893], abs=1e-6)


@pytest.mark.filterwarnings("ignore:Should have")  # torchsde clamps to its rounded interval, as we do
@pytest.mark.parametrize("source", ["cpu", "nv"])
def test_brownian_tree_matches_torchsde(monkeypatch, source):
    torchsde = pytest.importorskip("torchsde")
    from torchsde._brownian import brownian_interval
    # A1111 replaces torchsde's leaf noise by its own seeded draw (replace_torchsde_browinan)
    monkeypatch.setattr(brownian_interval, "_randn",
                        lambda size, dtype, device, seed: Generator(int(seed), source).randn(size).to(dtype))
    sigmas = get_sigmas("Exponential", 15, sd15_alphas_cumprod())
    seeds, shape = [1234, 2 ** 33 + 7], (4, 16, 16)
    lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
    trees = [torchsde.BrownianTree(lo, torch.zeros(shape), hi, entropy=s, tol=1e-6, pool_size=24) for s in seeds]
    ours = brownian_noise_sampler(torch.zeros(2, *shape), sigmas, seeds, source=source)
    queries = list(zip(sigmas[:-2], sigmas[1:-1]))  # every step, then a long and an off-grid interval
    queries += [(sigmas[3], sigmas[9]), (sigmas[10] * 0.7 + sigmas[11] * 0.3, sigmas[12])]
    for s, s_next in reversed(queries):  # the tree is independent of the order of queries
        ref = torch.stack([tree(s_next, s) for tree in trees]) * -1 / (s_next - s).abs().sqrt()
        assert (ours(s, s_next) - ref).abs().max() <= 1e-6
