"""ESRGAN / Real-ESRGAN networks: the public files' key layouts load strictly, and a tiny net's upscale equals a
hand computation written with plain torch.nn.functional ops."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sd15.esrgan import (RRDBConfig, RRDBNet, SRVGGConfig, SRVGGNetCompact, UpscalerModelError, build_upscaler,
                         load_upscaler)

LAYOUTS = json.loads((Path(__file__).parent / "data" / "upscaler-layouts.json").read_text())

# name -> (class, scale, blocks or body convs, parameter count worked out by hand from the architecture)
EXPECTED = {
    "RealESRGAN_x4plus.pth": (RRDBNet, 4, 23, 16_697_987),
    "RealESRGAN_x4plus_anime_6B.pth": (RRDBNet, 4, 6, 4_467_779),
    "RealESRGAN_x2plus.pth": (RRDBNet, 2, 23, 16_703_171),
    "realesr-general-x4v3.pth": (SRVGGNetCompact, 4, 32, 1_213_296),
    "realesr-animevideov3.pth": (SRVGGNetCompact, 4, 16, 621_424),
    "ESRGAN_4x.pth": (RRDBNet, 4, 23, 16_697_987),
    "4x-UltraSharp.pth": (RRDBNet, 4, 23, 16_697_987),
}


def _layout(name):
    entry = LAYOUTS[name]
    keys = LAYOUTS[entry["same_as"]]["keys"] if "same_as" in entry else entry["keys"]
    return entry["wrapper"], entry["scale"], keys


@pytest.mark.parametrize("name", list(EXPECTED))
def test_public_layout_loads_strictly(name, tmp_path):
    wrapper, scale, keys = _layout(name)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) * 0.01 for k, shape in keys.items()}
    path = tmp_path / name
    torch.save({wrapper: sd} if wrapper else sd, path)
    net = load_upscaler(path)
    cls, exp_scale, depth, nparams = EXPECTED[name]
    assert isinstance(net, cls) and scale == exp_scale
    assert sum(p.numel() for p in net.parameters()) == nparams
    if cls is RRDBNet:
        assert net.cfg.scale == scale and net.cfg.num_block == depth
    else:
        assert net.cfg.upscale == scale and net.cfg.num_conv == depth
    # every tensor of the file landed somewhere (renamed for the old layout): the multiset of values matches
    got = sorted(float(p.double().sum()) for p in net.state_dict().values())
    want = sorted(float(t.double().sum()) for t in sd.values())
    assert got == pytest.approx(want, abs=1e-9)
    x = torch.rand(1, 3, 6, 10)
    assert net(x).shape == (1, 3, 6 * scale, 10 * scale)


def _rand_sd(module, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * std for k, v in module.state_dict().items()}


# ---- hand computations (plain functional ops on the raw state dict) -------------------------------------------

def _conv(x, sd, name):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)


def _lrelu(x):
    return torch.where(x >= 0, x, 0.2 * x)


def _up2(x):  # nearest x2 by repetition
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def _unshuffle(x, s):  # (B, C, H, W) -> (B, C*s*s, H/s, W/s), channel index c*s*s + i*s + j
    b, c, h, w = x.shape
    return x.reshape(b, c, h // s, s, w // s, s).permute(0, 1, 3, 5, 2, 4).reshape(b, c * s * s, h // s, w // s)


def _rrdbnet_by_hand(x, sd, names, nb, unshuffle=1):
    if unshuffle > 1:
        x = _unshuffle(x, unshuffle)
    feat = _conv(x, sd, names["first"])
    h = feat
    for i in range(nb):
        block_in = h
        for r in (1, 2, 3):
            rin = h
            xs = [rin]
            for c in range(1, 5):
                xs.append(_lrelu(_conv(torch.cat(xs, 1), sd, names["rdb"](i, r, c))))
            h = _conv(torch.cat(xs, 1), sd, names["rdb"](i, r, 5)) * 0.2 + rin
        h = h * 0.2 + block_in
    feat = feat + _conv(h, sd, names["body"])
    for up in names["ups"]:
        feat = _lrelu(_conv(_up2(feat), sd, up))
    return _conv(_lrelu(_conv(feat, sd, names["hr"])), sd, names["last"])


BASICSR_NAMES = dict(first="conv_first", rdb=lambda i, r, c: f"body.{i}.rdb{r}.conv{c}", body="conv_body",
                     ups=["conv_up1", "conv_up2"], hr="conv_hr", last="conv_last")
OLD_NAMES = dict(first="model.0", rdb=lambda i, r, c: f"model.1.sub.{i}.RDB{r}.conv{c}.0", body="model.1.sub.1",
                 ups=["model.3", "model.6"], hr="model.8", last="model.10")


def test_tiny_rrdbnet_equals_hand_computation():
    cfg = RRDBConfig(num_feat=4, num_block=1, num_grow_ch=2)
    sd = _rand_sd(RRDBNet(cfg))
    net = build_upscaler(sd)
    assert net.cfg == cfg
    x = torch.rand(1, 3, 5, 7)
    torch.testing.assert_close(net(x), _rrdbnet_by_hand(x, sd, BASICSR_NAMES, 1), rtol=1e-5, atol=1e-6)


def test_tiny_old_esrgan_layout_equals_hand_computation_on_its_own_keys():
    basic = _rand_sd(RRDBNet(RRDBConfig(num_feat=4, num_block=1, num_grow_ch=2)), seed=1)
    old = {}
    for k, v in basic.items():  # write the same weights under the original ESRGAN names
        k = k.replace("conv_first", "model.0").replace("conv_body", "model.1.sub.1").replace("conv_up1", "model.3")
        k = k.replace("conv_up2", "model.6").replace("conv_hr", "model.8").replace("conv_last", "model.10")
        if k.startswith("body."):
            _, i, r, c, part = k.split(".")
            k = f"model.1.sub.{i}.RDB{r[-1]}.{c}.0.{part}"
        old[k] = v
    net = build_upscaler(old)
    x = torch.rand(2, 3, 4, 6)
    torch.testing.assert_close(net(x), _rrdbnet_by_hand(x, old, OLD_NAMES, 1), rtol=1e-5, atol=1e-6)


def test_tiny_realesrgan_x2_unshuffle_equals_hand_computation():
    cfg = RRDBConfig(num_feat=4, num_block=1, num_grow_ch=2, unshuffle=2)
    sd = _rand_sd(RRDBNet(cfg), seed=2)
    net = build_upscaler(sd)
    assert net.cfg.scale == 2 and net.cfg.unshuffle == 2
    x = torch.rand(1, 3, 6, 8)
    torch.testing.assert_close(net(x), _rrdbnet_by_hand(x, sd, BASICSR_NAMES, 1, unshuffle=2), rtol=1e-5, atol=1e-6)
    # odd sizes are reflect-padded to a multiple of 2 and cropped back
    y = torch.rand(1, 3, 5, 7)
    padded = F.pad(y, (0, 1, 0, 1), mode="reflect")
    torch.testing.assert_close(net(y), _rrdbnet_by_hand(padded, sd, BASICSR_NAMES, 1, unshuffle=2)[..., :10, :14],
                               rtol=1e-5, atol=1e-6)


def test_tiny_srvgg_equals_hand_computation():
    cfg = SRVGGConfig(num_feat=4, num_conv=2, upscale=2)
    sd = _rand_sd(SRVGGNetCompact(cfg), seed=3)
    net = build_upscaler({"body." + k.split(".", 1)[1]: v for k, v in sd.items()})
    assert net.cfg == cfg
    x = torch.rand(1, 3, 4, 5)
    h = x
    for i in (0, 2, 4):
        h = _conv(h, sd, f"body.{i}")
        a = sd[f"body.{i + 1}.weight"].view(1, -1, 1, 1)
        h = torch.where(h >= 0, h, a * h)  # PReLU, one slope per channel
    h = _conv(h, sd, "body.6")  # (1, 3*2*2, 4, 5)
    b, c, hh, ww = h.shape
    shuffled = h.reshape(b, 3, 2, 2, hh, ww).permute(0, 1, 4, 2, 5, 3).reshape(b, 3, hh * 2, ww * 2)
    torch.testing.assert_close(net(x), shuffled + _up2(x), rtol=1e-5, atol=1e-6)


def test_safetensors_file(tmp_path):
    sd = _rand_sd(SRVGGNetCompact(SRVGGConfig(num_feat=4, num_conv=1, upscale=4)))
    save_file(sd, tmp_path / "tiny.safetensors")
    net = load_upscaler(tmp_path / "tiny.safetensors")
    assert isinstance(net, SRVGGNetCompact) and net.cfg.upscale == 4


@pytest.mark.parametrize("content", ["garbage", "wrong_shape", "foreign", "missing"])
def test_bad_files_give_one_line_naming_the_file(content, tmp_path):
    path = tmp_path / "4x-Broken.pth"
    if content == "garbage":
        path.write_bytes(b"not a torch file at all")
    elif content == "wrong_shape":
        sd = _rand_sd(RRDBNet(RRDBConfig(num_feat=4, num_block=1, num_grow_ch=2)))
        sd["conv_hr.weight"] = torch.zeros(4, 4, 1, 1)
        torch.save(sd, path)
    elif content == "foreign":
        torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(UpscalerModelError) as e:
        load_upscaler(path)
    msg = str(e.value)
    assert "4x-Broken.pth" in msg and "\n" not in msg


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(UpscalerModelError, match="evil.pth"):
        load_upscaler(path)


def test_parameter_counts_by_hand():
    # RDB: convs 64->32, 96->32, 128->32, 160->32 and 192->64 (3x3 with bias); RRDB = 3 RDBs
    rdb = sum(9 * cin * cout + cout for cin, cout in [(64, 32), (96, 32), (128, 32), (160, 32), (192, 64)])
    total = 23 * 3 * rdb + (9 * 3 * 64 + 64) + 4 * (9 * 64 * 64 + 64) + (9 * 64 * 3 + 3)
    assert total == 16_697_987 == sum(p.numel() for p in RRDBNet().parameters())
    assert math.isclose(total * 4 / 1e6, 66.8, abs_tol=0.1)  # RealESRGAN_x4plus.pth is 67.0 MB on disk


@pytest.mark.parametrize("tail, scale", [((2, 4), 1), ((3, 5, 7), 2), ((3, 6, 8, 10), 4), ((3, 6, 9, 11, 13), 8)])
def test_original_layout_scale_from_the_number_of_upsample_convs(tail, scale):
    """Old ESRGAN files: after model.0 and the trunk, the model.N convs are the x2 upsampling convs, HR, last."""
    g = torch.Generator().manual_seed(5)
    sd = {"model.0.weight": torch.randn(4, 3, 3, 3, generator=g), "model.0.bias": torch.randn(4, generator=g),
          "model.1.sub.1.weight": torch.randn(4, 4, 3, 3, generator=g),
          "model.1.sub.1.bias": torch.randn(4, generator=g)}
    for r in (1, 2, 3):
        for c in range(1, 6):
            sd[f"model.1.sub.0.RDB{r}.conv{c}.0.weight"] = torch.randn(2 if c < 5 else 4, 4 + 2 * (c - 1), 3, 3,
                                                                       generator=g) * 0.1
            sd[f"model.1.sub.0.RDB{r}.conv{c}.0.bias"] = torch.randn(2 if c < 5 else 4, generator=g) * 0.1
    for i, n in enumerate(tail):
        last = i == len(tail) - 1
        sd[f"model.{n}.weight"] = torch.randn(3 if last else 4, 4, 3, 3, generator=g) * 0.1
        sd[f"model.{n}.bias"] = torch.randn(3 if last else 4, generator=g) * 0.1
    net = build_upscaler(sd)
    assert net.cfg.scale == scale
    names = dict(OLD_NAMES, ups=[f"model.{n}" for n in tail[:-2]], hr=f"model.{tail[-2]}", last=f"model.{tail[-1]}")
    x = torch.rand(1, 3, 3, 4)
    torch.testing.assert_close(net(x), _rrdbnet_by_hand(x, sd, names, 1), rtol=1e-5, atol=1e-6)
