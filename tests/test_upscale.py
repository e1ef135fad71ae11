"""A1111's upscaler list and application: names and order, tiles, the x4-repeat loop, bad files."""
import numpy as np
import pytest
import torch
from PIL import Image

from sd15.a1111 import images as imgs
from sd15.esrgan import RRDBConfig, RRDBNet, SRVGGConfig, SRVGGNetCompact
from sd15.upscale import Upscalers, combine_grid, list_upscalers, split_grid, upscale_patch, upscale_with_model


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _srvgg(upscale=2, pointwise=False, seed=0):
    net = SRVGGNetCompact(SRVGGConfig(num_feat=4, num_conv=1, upscale=upscale))
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in net.state_dict().items()}
    if pointwise:  # only the centre taps: every output pixel depends on its own input pixel alone
        for k, v in sd.items():
            if v.ndim == 4:
                centre = v[:, :, 1, 1].clone()
                v.zero_()
                v[:, :, 1, 1] = centre
    net.load_state_dict(sd)
    return net.eval()


def _save(net, path):
    torch.save({"params": net.state_dict()}, path)


def test_split_combine_is_identity_for_identity_tiles():
    img = _image(45, 31)
    for tile, overlap in [(16, 4), (20, 8), (64, 8)]:  # 64 > image: one tile at a negative offset
        assert np.array_equal(np.asarray(combine_grid(split_grid(img, tile, tile, overlap))), np.asarray(img))


def test_split_grid_positions_follow_a1111():
    # w=45, tile 16, overlap 4: cols = ceil(41/12) = 4, dx = 29/3 -> x = 0, 9, 19, then 29 (= 45-16)
    grid = split_grid(_image(45, 31), 16, 16, 4)
    assert [x for x, _, _ in grid.tiles[0][2]] == [0, 9, 19, 29]
    assert [y for y, _, _ in grid.tiles] == [0, 7, 15]  # rows = ceil(27/12) = 3, dy = 7.5 -> 0, 7, 15 (= 31-16)


def test_tiled_equals_untiled_for_a_pointwise_net():
    net = _srvgg(upscale=2, pointwise=True)
    img = _image(45, 31, seed=1)
    whole = np.asarray(upscale_with_model(net, img, tile_size=0)).astype(int)
    for tile, overlap in [(16, 4), (12, 8), (64, 8)]:
        tiled = np.asarray(upscale_with_model(net, img, tile_size=tile, tile_overlap=overlap)).astype(int)
        assert tiled.shape == whole.shape == (62, 90, 3)
        assert np.abs(tiled - whole).max() <= 1  # only the 8-bit blend of two equal values can round


def test_tiled_equals_untiled_away_from_the_seams():
    net = _srvgg(upscale=2, seed=2)  # three 3x3 convs: an input pixel sees 3 pixels around it
    img = _image(70, 50, seed=3)
    whole = np.asarray(upscale_with_model(net, img, tile_size=0)).astype(int)
    tiled = np.asarray(upscale_with_model(net, img, tile_size=24, tile_overlap=6)).astype(int)
    grid = split_grid(img, 24, 24, 6)
    xs = {e for x, w, _ in grid.tiles[0][2] for e in (x, x + w)} - {0, 70}  # inner tile borders (input pixels)
    ys = {e for y, h, _ in grid.tiles for e in (y, y + h)} - {0, 50}
    assert len(xs) >= 4 and len(ys) >= 2
    far = np.ones(whole.shape[:2], bool)
    for e in xs:
        far[:, 2 * (e - 3):2 * (e + 3)] = False
    for e in ys:
        far[2 * (e - 3):2 * (e + 3), :] = False
    assert far.sum() > 1000
    assert np.abs(tiled - whole)[far].max() <= 1
    assert np.abs(tiled - whole).max() > 1  # the seams differ: the comparison can fail


def test_upscale_patch_is_bgr_and_rounds():
    net = _srvgg(upscale=2, pointwise=True, seed=4)
    img = _image(7, 5, seed=5)
    x = torch.from_numpy(np.asarray(img)[:, :, ::-1].copy()).permute(2, 0, 1)[None].double() / 255
    with torch.no_grad():
        y = net.double()(x)[0].clamp(0, 1)
    want = (y * 255).round().byte().permute(1, 2, 0).numpy()[:, :, ::-1]
    got = np.asarray(upscale_patch(net.float(), img))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_names_as_a1111_lists_them(tmp_path):
    es, res = tmp_path / "ESRGAN", tmp_path / "RealESRGAN"
    (es / "sub").mkdir(parents=True)
    res.mkdir()
    for p in [es / "ESRGAN_4x.pth", es / "4x-UltraSharp.pth", es / "sub" / "lollypop.safetensors",
              res / "RealESRGAN_x4plus.pth", res / "RealESRGAN_x4plus_anime_6B.pth", res / "realesr-general-x4v3.pth",
              res / "unrelated.pth"]:
        p.write_bytes(b"")
    (es / "notes.txt").write_text("not a model")
    infos = list_upscalers(es, res)
    assert [u.name for u in infos] == ["None", "Lanczos", "Nearest", "4x-UltraSharp", "ESRGAN_4x", "lollypop",
                                       "R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B", "R-ESRGAN General 4xV3"]
    enabled = list_upscalers(es, res, realesrgan_enabled=["R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"])
    assert "R-ESRGAN General 4xV3" not in [u.name for u in enabled]
    api = {u.name: u.as_api() for u in infos}
    assert api["None"] == {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}
    assert api["ESRGAN_4x"]["model_name"] == "ESRGAN_4x" and api["ESRGAN_4x"]["model_path"].endswith("ESRGAN_4x.pth")
    assert [u.name for u in list_upscalers(tmp_path / "nope", None)] == ["None", "Lanczos", "Nearest"]


def test_x2_net_repeats_until_the_scale_then_lanczos(tmp_path):
    (tmp_path / "ESRGAN").mkdir()
    net = _srvgg(upscale=2, seed=6)
    _save(net, tmp_path / "ESRGAN" / "2x-tiny.pth")
    ups = Upscalers(tmp_path / "ESRGAN", tile=0)
    img = _image(10, 12, seed=7)
    out = ups.upscale(img, "2x-tiny", 3)
    # dest = (int(30)//8*8, int(36)//8*8) = (24, 32); 20x24 does not cover it, so the net runs twice (40x48)
    twice = upscale_patch(net, upscale_patch(net, img))
    assert out.size == (24, 32)
    assert np.array_equal(np.asarray(out), np.asarray(twice.resize((24, 32), resample=Image.Resampling.LANCZOS)))
    assert ups.model("2x-tiny") is ups.model("2x-tiny")  # loaded once


def test_hires_resize_with_a_model_and_builtins_match_images_module(tmp_path):
    (tmp_path / "RealESRGAN").mkdir()
    _save(_srvgg(upscale=4, seed=8), tmp_path / "RealESRGAN" / "realesr-general-x4v3.pth")
    ups = Upscalers(None, tmp_path / "RealESRGAN", tile=16, tile_overlap=4)
    img = _image(40, 24, seed=9)
    out = ups.resize(img, "R-ESRGAN General 4xV3", 100, 60)
    manual = upscale_with_model(ups.model("R-ESRGAN General 4xV3"), img, 16, 4)  # 160x96 covers (96, 56)
    manual = manual.resize((96, 56), resample=Image.Resampling.LANCZOS).resize((100, 60), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out), np.asarray(manual))
    for name in ("None", "Lanczos", "Nearest"):  # the built-ins agree with sd15.images' A1111 resize
        assert np.array_equal(np.asarray(ups.resize(img, name, 100, 60)),
                              np.asarray(imgs.upscale_image(img, name, 100, 60)))


def test_upscale_to_with_crop_centres_on_black(tmp_path):
    ups = Upscalers()
    img = _image(30, 20, seed=10)
    out = ups.upscale_to(img, "Lanczos", 70, 45, crop=True)
    # scale = max(70/30, 45/20) = 2.333..: Lanczos to (70, 46), then dest (70//8*8, 46//8*8) = (64, 40)
    inner = img.resize((70, 46), resample=Image.Resampling.LANCZOS).resize((64, 40), Image.Resampling.LANCZOS)
    want = Image.new("RGB", (70, 45))
    want.paste(inner, (70 // 2 - 32, 45 // 2 - 20))
    assert np.array_equal(np.asarray(out), np.asarray(want))


def test_unknown_name_and_bad_file(tmp_path):
    (tmp_path / "ESRGAN").mkdir()
    (tmp_path / "ESRGAN" / "4x-Broken.pth").write_bytes(b"\x00garbage")
    ups = Upscalers(tmp_path / "ESRGAN")
    with pytest.raises(ValueError, match="could not find upscaler named Nope"):
        ups.upscale(_image(8, 8), "Nope", 2)
    with pytest.raises(ValueError) as e:
        ups.upscale(_image(8, 8), "4x-Broken", 2)
    assert "4x-Broken.pth" in str(e.value) and "\n" not in str(e.value)


def test_full_size_rrdbnet_tiles_a_small_image():
    net = RRDBNet(RRDBConfig(num_block=1)).eval()  # real widths, one block: the tile path at real channel counts
    img = _image(20, 12, seed=11)
    out = upscale_with_model(net, img, tile_size=8, tile_overlap=2)
    assert out.size == (80, 48)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_upscale_matches_cpu_fp32(tmp_path):
    (tmp_path / "RealESRGAN").mkdir()
    net = SRVGGNetCompact(SRVGGConfig())  # realesr-general-x4v3's size: 64 features, 32 body convs
    g = torch.Generator().manual_seed(12)
    sd = {k: torch.randn(v.shape, generator=g) * (0.02 if v.ndim == 4 else 0.1) for k, v in net.state_dict().items()}
    torch.save({"params": sd}, tmp_path / "RealESRGAN" / "realesr-general-x4v3.pth")
    img = _image(200, 136, seed=13)  # two tiles across, one down
    cpu = Upscalers(None, tmp_path / "RealESRGAN").upscale(img, "R-ESRGAN General 4xV3", 4)
    gpu = Upscalers(None, tmp_path / "RealESRGAN", device="cuda", dtype=torch.float16).upscale(
        img, "R-ESRGAN General 4xV3", 4)
    assert gpu.size == cpu.size == (800, 544)
    assert np.abs(np.asarray(gpu).astype(int) - np.asarray(cpu).astype(int)).max() <= 2
