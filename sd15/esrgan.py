"""ESRGAN / Real-ESRGAN super-resolution networks (the files of A1111's `models/ESRGAN`, `models/RealESRGAN`).

- `RRDBNet`: Wang et al. 2018, "ESRGAN" (Residual-in-Residual Dense Blocks, nearest x2 + conv upsampling),
  with Real-ESRGAN's (Wang et al. 2021) pixel-unshuffle input for its x2 / x1 models: `RealESRGAN_x4plus.pth`,
  `RealESRGAN_x2plus.pth`, `ESRGAN_4x.pth`, `4x-UltraSharp.pth`, ...
- `SRVGGNetCompact`: Real-ESRGAN's compact net (convs + PReLU, one pixel-shuffle, plus the nearest-upsampled
  input): `realesr-general-x4v3.pth`, `realesr-animevideov3.pth`.

Module names are BasicSR's key names; the original ESRGAN layout (`model.0`, `model.1.sub.N.RDB1.conv1.0`,
...) and the 2019 one (`RRDB_trunk`, `trunk_conv`, `upconv1`, `HRconv`) are renamed at load time. The
architecture is read off the tensor shapes. Images in [0, 1], (B, C, H, W).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sd15.checkpoint import assign_strict, load_network_file


class UpscalerModelError(ValueError):
    """A file that is not a usable ESRGAN / Real-ESRGAN model; the message names the file."""


@dataclass(frozen=True)
class RRDBConfig:
    in_ch: int = 3  # image channels (conv_first sees in_ch * unshuffle**2)
    out_ch: int = 3
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    num_up: int = 2  # nearest x2 + conv stages (conv_up1, conv_up2, ...)
    unshuffle: int = 1  # pixel-unshuffle factor of the input: Real-ESRGAN x2 models 2, x1 models 4

    @property
    def scale(self) -> int:
        return 2 ** self.num_up // self.unshuffle

    @staticmethod
    def from_state_dict(sd: dict) -> "RRDBConfig":
        """Read the architecture off the shapes of a state dict in the BasicSR layout."""
        feat, first_in = sd["conv_first.weight"].shape[:2]
        out_ch = sd["conv_last.weight"].shape[0]
        num_block = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
        num_up = sum(1 for k in sd if re.fullmatch(r"conv_up\d+\.weight", k))
        return RRDBConfig(in_ch=out_ch, out_ch=out_ch, num_feat=feat, num_block=num_block,
                          num_grow_ch=sd["body.0.rdb1.conv1.weight"].shape[0], num_up=num_up,
                          unshuffle=math.isqrt(first_in // out_ch))


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier output; residual scaled by 0.2."""

    def __init__(self, feat: int, grow: int):
        super().__init__()
        self.conv1 = nn.Conv2d(feat, grow, 3, padding=1)
        self.conv2 = nn.Conv2d(feat + grow, grow, 3, padding=1)
        self.conv3 = nn.Conv2d(feat + 2 * grow, grow, 3, padding=1)
        self.conv4 = nn.Conv2d(feat + 3 * grow, grow, 3, padding=1)
        self.conv5 = nn.Conv2d(feat + 4 * grow, feat, 3, padding=1)

    def forward(self, x):
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual in Residual Dense Block: three dense blocks, residual scaled by 0.2."""

    def __init__(self, feat: int, grow: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(feat, grow)
        self.rdb2 = ResidualDenseBlock(feat, grow)
        self.rdb3 = ResidualDenseBlock(feat, grow)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    def __init__(self, cfg: RRDBConfig = RRDBConfig()):
        super().__init__()
        self.cfg = cfg
        f = cfg.num_feat
        self.conv_first = nn.Conv2d(cfg.in_ch * cfg.unshuffle ** 2, f, 3, padding=1)
        self.body = nn.Sequential(*[RRDB(f, cfg.num_grow_ch) for _ in range(cfg.num_block)])
        self.conv_body = nn.Conv2d(f, f, 3, padding=1)
        for i in range(1, cfg.num_up + 1):
            setattr(self, f"conv_up{i}", nn.Conv2d(f, f, 3, padding=1))
        self.conv_hr = nn.Conv2d(f, f, 3, padding=1)
        self.conv_last = nn.Conv2d(f, cfg.out_ch, 3, padding=1)

    def forward(self, x):
        h, w = x.shape[-2:]
        s = self.cfg.unshuffle
        if s > 1:  # Real-ESRGAN x2 / x1: fold s x s pixel blocks into channels; reflect-pad to a multiple of s
            x = F.pad(x, (0, -w % s, 0, -h % s), mode="reflect")
            x = F.pixel_unshuffle(x, s)  # (B, C*s*s, H/s, W/s)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(1, self.cfg.num_up + 1):
            up = getattr(self, f"conv_up{i}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        return out[..., : h * self.cfg.scale, : w * self.cfg.scale]  # drop the padding again


@dataclass(frozen=True)
class SRVGGConfig:
    in_ch: int = 3
    out_ch: int = 3
    num_feat: int = 64
    num_conv: int = 32  # body convs between the first and the last conv (general-x4v3: 32, animevideov3: 16)
    upscale: int = 4

    @staticmethod
    def from_state_dict(sd: dict) -> "SRVGGConfig":
        """body.0 conv, then (PReLU, conv) pairs; the last conv has out_ch * upscale**2 outputs."""
        convs = sorted(int(k.split(".")[1]) for k in sd if k.startswith("body.") and sd[k].ndim == 4)
        feat, in_ch = sd["body.0.weight"].shape[:2]
        upscale = math.isqrt(sd[f"body.{convs[-1]}.weight"].shape[0] // in_ch)
        return SRVGGConfig(in_ch=in_ch, out_ch=in_ch, num_feat=feat, num_conv=len(convs) - 2, upscale=upscale)


class SRVGGNetCompact(nn.Module):
    def __init__(self, cfg: SRVGGConfig = SRVGGConfig()):
        super().__init__()
        self.cfg = cfg
        f = cfg.num_feat
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_ch, f, 3, padding=1), nn.PReLU(f)]
        for _ in range(cfg.num_conv):
            layers += [nn.Conv2d(f, f, 3, padding=1), nn.PReLU(f)]
        layers.append(nn.Conv2d(f, cfg.out_ch * cfg.upscale ** 2, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        out = F.pixel_shuffle(self.body(x), self.cfg.upscale)  # (B, out_ch, H*s, W*s)
        return out + F.interpolate(x, scale_factor=float(self.cfg.upscale), mode="nearest")  # learns the residual


def convert_esrgan_keys(sd: dict) -> dict:
    """Any RRDBNet layout seen in the wild -> the BasicSR key names of `RRDBNet` (unknown keys are kept, for
    the strict load to name them)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    renames = [(r"RRDB_trunk\.(\d+)\.RDB(\d)\.", r"body.\1.rdb\2."), (r"trunk_conv\.", "conv_body."),
               (r"upconv(\d+)\.", r"conv_up\1."), (r"HRconv\.", "conv_hr."),
               (r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.", r"body.\1.rdb\2.conv\3."),
               (r"model\.1\.sub\.\d+\.", "conv_body.")]
    # The original layout's other convs are `model.N` in order: conv_first, the x2 upsampling convs, conv_hr
    # and conv_last (x4: model.0, 3, 6, 8, 10; x2: model.0, 3, 5, 7; x8: model.0, 3, 6, 9, 11, 13).
    tail = sorted({int(m[1]) for k in sd if (m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", k))})
    names = ["conv_first", *(f"conv_up{i}" for i in range(1, len(tail) - 2)), "conv_hr", "conv_last"]
    renames += [(rf"model\.{n}\.", f"{name}.") for n, name in zip(tail, names)]
    out = {}
    for k, v in sd.items():
        for pattern, repl in renames:
            k, n = re.subn("^" + pattern, repl, k)
            if n:
                break
        out[k] = v
    return out


def build_upscaler(sd: dict) -> nn.Module:
    """State dict (any supported layout, wrappers removed) -> RRDBNet or SRVGGNetCompact with the weights loaded
    strictly. Raises ValueError saying what is wrong."""
    sd = convert_esrgan_keys(sd)
    if "body.0.rdb1.conv1.weight" in sd:
        cls, cfg = RRDBNet, RRDBConfig.from_state_dict(sd)
    elif "body.0.weight" in sd:
        cls, cfg = SRVGGNetCompact, SRVGGConfig.from_state_dict(sd)
    else:
        raise ValueError("not an ESRGAN, Real-ESRGAN or SRVGGNetCompact model")
    return assign_strict(cls, sd, cfg)


def load_upscaler(path, device="cpu", dtype=torch.float32) -> nn.Module:
    """Read an upscaler file (weights only); UpscalerModelError with one line naming the file otherwise."""
    return load_network_file(path, build_upscaler, "cannot load upscaler model", device, dtype,
                             UpscalerModelError)
