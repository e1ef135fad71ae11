"""Seamless tiling: with circular padding the UNet and the VAE decoder commute with a circular shift of their input
(shift by k latent pixels -> the output shifts by k, or 8k image pixels), which means the left and right (top and
bottom) edges of the result continue each other; leaving the block restores the exact previous outputs."""
import pytest
import torch
import torch.nn as nn

from sd15.pipeline import circular_padding
from sd15.unet.unet import UNET_TINY, UNetModel
from sd15.vae.vae import VAE_TINY, AutoencoderKL


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def unet():
    return _randomize(UNetModel(UNET_TINY), 0)


@pytest.fixture(scope="module")
def vae():
    return _randomize(AutoencoderKL(VAE_TINY), 1)


def _unet_call(unet, x):
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 77, UNET_TINY.context_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return unet(x, t, ctx)


def test_unet_commutes_with_circular_shift(unet):
    x = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    before = _unet_call(unet, x)
    # UNET_TINY halves the size twice, so shifts by multiples of 4 latent pixels commute exactly
    for dims, k in [((3,), 4), ((2, 3), 4)]:
        shifts = (k,) * len(dims)
        with circular_padding(unet):
            out = _unet_call(unet, x)
            shifted = _unet_call(unet, torch.roll(x, shifts, dims))
        torch.testing.assert_close(shifted, torch.roll(out, shifts, dims), rtol=1e-4, atol=1e-5)
        off = _unet_call(unet, torch.roll(x, shifts, dims))  # zero padding: the edges do not continue each other
        assert (off - torch.roll(before, shifts, dims)).abs().max() > 1e-2
    assert torch.equal(_unet_call(unet, x), before)  # restored exactly
    assert all(m.padding_mode == "zeros" for m in unet.modules() if isinstance(m, nn.Conv2d))


def test_vae_decoder_commutes_with_circular_shift(vae):
    z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = vae.decode(z)
        with circular_padding(vae):
            out = vae.decode(z)
            for dims, k in [((3,), 1), ((2, 3), 3)]:
                shifted = vae.decode(torch.roll(z, (k,) * len(dims), dims))
                torch.testing.assert_close(shifted, torch.roll(out, (8 * k,) * len(dims), dims), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(out, before, atol=1e-3)  # circular padding changes the result
        after = vae.decode(z)
    assert torch.equal(after, before)


def test_left_and_right_edges_continue_each_other(vae):
    """The decoded image, tiled twice side by side, has no seam: the columns across the joint differ no more than
    neighbouring columns inside the image do (circular case), unlike the zero-padded decode."""
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), circular_padding(vae):
        img = vae.decode(z)[0]
    with torch.no_grad():
        plain = vae.decode(z)[0]
    # decode of the latent repeated twice equals the image repeated twice: the edges continue each other
    with torch.no_grad(), circular_padding(vae):
        wide = vae.decode(torch.cat([z, z], dim=3))[0]
    torch.testing.assert_close(wide, torch.cat([img, img], dim=2), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        wide_plain = vae.decode(torch.cat([z, z], dim=3))[0]
    assert (wide_plain - torch.cat([plain, plain], dim=2)).abs().max() > 1e-2


def test_restored_after_an_error(vae):
    with pytest.raises(RuntimeError):
        with circular_padding(vae):
            raise RuntimeError("boom")
    assert all(m.padding_mode == "zeros" for m in vae.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_vae_decoder_commutes_with_circular_shift(vae):
    cuda = AutoencoderKL(VAE_TINY).cuda().eval()
    cuda.load_state_dict(vae.state_dict())
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6)).cuda()
    with torch.no_grad(), circular_padding(cuda):
        out = cuda.decode(z)
        shifted = cuda.decode(torch.roll(z, (3, 5), (2, 3)))
    torch.testing.assert_close(shifted, torch.roll(out, (24, 40), (2, 3)), rtol=1e-3, atol=1e-3)
