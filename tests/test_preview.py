"""Live previews: "Approx cheap" against the matrix worked by hand, TAESD's public layout and a functional
re-implementation, "Approx NN", "Full", and the fallbacks when weights are missing."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from sd15.preview import (PREVIEW_TYPES, PreviewDecoders, effective_preview_type, image_grid, preview,
                          preview_tensor)
from sd15.vae.approx import VAEApprox
from sd15.vae.taesd import TAESDDecoder, load_taesd_decoder
from sd15.vae.vae import VAE_TINY, AutoencoderKL

M = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]

# The public taesd_decoder.pth layout, from madebyollin/taesd's Decoder(): an nn.Sequential whose index 0 is the clamp,
# 1 the first conv, 3-5 / 8-10 / 13-15 / 18 Blocks (conv.0, conv.2, conv.4), 7 / 12 / 17 bias-free convs, 19 the
# last conv; 2, 6, 11, 16 are ReLU / Upsample without weights.
BLOCKS = [3, 4, 5, 8, 9, 10, 13, 14, 15, 18]
TAESD_KEYS = {"1.weight": (64, 4, 3, 3), "1.bias": (64,), "19.weight": (3, 64, 3, 3), "19.bias": (3,)}
for _b in BLOCKS:
    for _c in (0, 2, 4):
        TAESD_KEYS[f"{_b}.conv.{_c}.weight"] = (64, 64, 3, 3)
        TAESD_KEYS[f"{_b}.conv.{_c}.bias"] = (64,)
for _u in (7, 12, 17):
    TAESD_KEYS[f"{_u}.weight"] = (64, 64, 3, 3)


def test_approx_cheap_by_hand():
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, 3, 5, generator=g) * 2
    got = [np.asarray(im) for im in preview(None, lat)]
    for b in range(2):
        assert got[b].shape == (3, 5, 3)  # one pixel per latent cell
        for y in range(3):
            for x in range(5):
                for r in range(3):
                    v = sum(float(lat[b, c, y, x]) * M[c][r] for c in range(4))
                    v = min(max(v * 0.5 + 0.5, 0.0), 1.0)
                    want = int(255.0 * v)  # truncation, as numpy's astype(uint8)
                    assert abs(int(got[b][y, x, r]) - want) <= (1 if abs(255 * v - round(255 * v)) < 1e-3 else 0)


def test_taesd_parameter_count_and_public_layout(tmp_path):
    assert sum(p.numel() for p in TAESDDecoder().parameters()) == 1_222_531
    assert {k: tuple(v.shape) for k, v in TAESDDecoder().state_dict().items()} == TAESD_KEYS
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in TAESD_KEYS.items()}
    torch.save(sd, tmp_path / "taesd_decoder.pth")
    net = load_taesd_decoder(tmp_path / "taesd_decoder.pth")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in sd.items())
    # diffusers AutoencoderTiny: decoder.layers.N = TAESD's N+1 (no clamp module), encoder keys ignored
    diffusers = {f"decoder.layers.{int(k.split('.', 1)[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in sd.items()}
    diffusers["encoder.layers.0.weight"] = torch.zeros(64, 3, 3, 3)
    save_file(diffusers, tmp_path / "diffusion_pytorch_model.safetensors")
    net2 = load_taesd_decoder(tmp_path / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(net2.state_dict()[k], v) for k, v in sd.items())


def _taesd_by_hand(z, sd):
    def c(x, i, bias=True):
        return F.conv2d(x, sd[f"{i}.weight"], sd[f"{i}.bias"] if bias else None, padding=1)

    def block(x, i):
        h = c(F.relu(c(F.relu(c(x, f"{i}.conv.0")), f"{i}.conv.2")), f"{i}.conv.4")
        return F.relu(h + x)

    x = F.relu(c(torch.tanh(z / 3) * 3, 1))
    for blocks, up in [((3, 4, 5), 7), ((8, 9, 10), 12), ((13, 14, 15), 17)]:
        for i in blocks:
            x = block(x, i)
        x = c(x.repeat_interleave(2, 2).repeat_interleave(2, 3), up, bias=False)
    return c(block(x, 18), 19)


def test_taesd_decode_equals_functional_reimplementation():
    g = torch.Generator().manual_seed(2)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in TAESD_KEYS.items()}
    net = TAESDDecoder()
    net.load_state_dict(sd)
    z = torch.randn(1, 4, 4, 6, generator=g) * 4
    with torch.no_grad():
        out = net(z)
    assert out.shape == (1, 3, 32, 48)
    torch.testing.assert_close(out, _taesd_by_hand(z, sd), rtol=1e-4, atol=1e-5)


def _models_dir(tmp_path, taesd=True, nn=True):
    g = torch.Generator().manual_seed(3)
    if taesd:
        (tmp_path / "VAE-taesd").mkdir()
        torch.save({k: torch.randn(s, generator=g) * 0.05 for k, s in TAESD_KEYS.items()},
                   tmp_path / "VAE-taesd" / "taesd_decoder.pth")
    if nn:
        (tmp_path / "VAE-approx").mkdir()
        torch.save({k: torch.randn(v.shape, generator=g) * 0.2 for k, v in VAEApprox().state_dict().items()},
                   tmp_path / "VAE-approx" / "model.pt")
    return tmp_path


def test_preview_kinds(tmp_path):
    dec = PreviewDecoders(_models_dir(tmp_path), None)
    vae = AutoencoderKL(VAE_TINY).eval()
    lat = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(4))
    sizes = {"Approx cheap": (6, 4), "Approx NN": (12, 8), "TAESD": (48, 32), "Full": (48, 32)}
    for kind in PREVIEW_TYPES:
        ims = preview(vae, lat, kind, dec)
        assert len(ims) == 2 and ims[0].size == sizes[kind]
    with torch.no_grad():  # TAESD output is mapped from [0, 1] to [-1, 1]; Full divides by the scale factor
        torch.testing.assert_close(preview_tensor(vae, lat, "TAESD", dec), dec.net("TAESD")(lat) * 2 - 1)
        torch.testing.assert_close(preview_tensor(vae, lat, "Full", dec), vae.decode(lat / 0.18215))
        nn_out = preview_tensor(vae, lat, "Approx NN", dec)
        net = dec.net("Approx NN")
        x = F.pad(lat.repeat_interleave(2, 2).repeat_interleave(2, 3), (11, 11, 11, 11))
        for i in range(1, 9):
            conv = getattr(net, f"conv{i}")
            x = F.leaky_relu(F.conv2d(x, conv.weight, conv.bias), 0.1)
        torch.testing.assert_close(nn_out, x)
    assert dec.net("TAESD") is dec.net("TAESD")  # loaded once
    grid = preview(vae, lat, "Approx cheap", dec, grid=True)
    assert grid.size == (12, 4)  # 2 images: round(sqrt(2)) = 1 row, 2 columns


def test_fallbacks_without_weights_and_with_a_bad_file(tmp_path):
    empty = PreviewDecoders(tmp_path)
    assert effective_preview_type("Approx NN", empty) == "Approx cheap"
    assert effective_preview_type("TAESD", empty) == "Approx cheap"
    assert effective_preview_type("Full", empty) == "Full"
    assert effective_preview_type("Approx NN", None) == "Approx cheap"
    lat = torch.randn(1, 4, 4, 4)
    cheap = preview(None, lat, "Approx cheap")[0]
    assert np.array_equal(np.asarray(preview(None, lat, "TAESD", empty)[0]), np.asarray(cheap))
    (tmp_path / "taesd_decoder.pth").write_bytes(b"broken")
    bad = PreviewDecoders(tmp_path)
    assert effective_preview_type("TAESD", bad) == "Approx cheap"
    assert "taesd_decoder.pth" in bad.errors["TAESD"] and "\n" not in bad.errors["TAESD"]
    with pytest.raises(ValueError, match="unknown preview type"):
        effective_preview_type("Approx fancy", empty)


def test_image_grid_layout():
    ims = [preview(None, torch.full((1, 4, 2, 3), float(i)))[0] for i in range(5)]
    g = image_grid(ims)
    assert g.size == (3 * 3, 2 * 2)  # round(sqrt(5)) = 2 rows, 3 columns
    assert np.array_equal(np.asarray(g)[2:4, 3:6], np.asarray(ims[4]))
    assert np.asarray(g)[2:4, 6:9].max() == 0  # the empty spot stays black


def test_image_grid_centres_smaller_images_on_the_background():  # the scripts' grids: rows given, white
    big, small = Image.new("RGB", (4, 2), (10, 20, 30)), Image.new("RGB", (2, 1), (200, 0, 0))
    a = np.asarray(image_grid([big, small, small], rows=1, background=(255, 255, 255)))
    assert a.shape == (2, 12, 3)
    assert (a[:, :4] == (10, 20, 30)).all()
    assert (a[0, 5:7] == (200, 0, 0)).all() and (a[1, 4:8] == 255).all() and (a[0, [4, 7]] == 255).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_taesd_preview_matches_cpu(tmp_path):
    models = _models_dir(tmp_path)
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    cpu = np.asarray(preview(None, lat, "TAESD", PreviewDecoders(models))[0]).astype(int)
    gpu = np.asarray(preview(None, lat.cuda(), "TAESD", PreviewDecoders(models, device="cuda",
                                                                         dtype=torch.float16))[0]).astype(int)
    assert np.abs(gpu - cpu).max() <= 3
