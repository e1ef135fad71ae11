"""ESRGAN / Real-ESRGAN super-resolution networks, read top to bottom.

Two architectures cover the upscaler files A1111 users put in `models/ESRGAN` and `models/RealESRGAN`:

- `RRDBNet`: Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks" (23
  Residual-in-Residual Dense Blocks, nearest x2 + conv upsampling), extended by Real-ESRGAN (Wang et al. 2021)
  with a pixel-unshuffle input for x2 / x1 models. Files: `RealESRGAN_x4plus.pth`,
  `RealESRGAN_x4plus_anime_6B.pth` (6 blocks), `RealESRGAN_x2plus.pth`, `ESRGAN_4x.pth`, `4x-UltraSharp.pth`, ...
- `SRVGGNetCompact`: Real-ESRGAN's compact VGG-style net (convs + PReLU, one pixel-shuffle at the end, plus the
  nearest-upsampled input). Files: `realesr-general-x4v3.pth`, `realesr-general-wdn-x4v3.pth`,
  `realesr-animevideov3.pth`.

Module names are the key names of BasicSR / Real-ESRGAN files (`conv_first`, `body.N.rdb1.conv1`, `conv_body`,
`conv_up1`, `conv_up2`, `conv_hr`, `conv_last`; SRVGG `body.N`). The two older ESRGAN layouts are renamed to these
at load time (`convert_esrgan_keys`): the original one (`model.0`, `model.1.sub.N.RDB1.conv1.0`, `model.1.sub.23`,
`model.3`, `model.6`, `model.8`, `model.10`, used by `ESRGAN_4x.pth` and most community models such as
`4x-UltraSharp.pth`) and the 2019 one (`RRDB_trunk.N.RDB1.conv1`, `trunk_conv`, `upconv1`, `HRconv`).

The architecture is read off the tensor shapes (`RRDBConfig.from_state_dict`, `SRVGGConfig.from_state_dict`).
Inputs and outputs are images in [0, 1], (B, C, H, W).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sd15.checkpoint import assign_strict


class UpscalerModelError(ValueError):
    """A file that is not a usable ESRGAN / Real-ESRGAN model; the message names the file."""


# =============================================================================================
# RRDBNet (ESRGAN, Real-ESRGAN)
# =============================================================================================

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
        unshuffle = {1: 1, 4: 2, 16: 4}.get(first_in // out_ch) if first_in % out_ch == 0 else None
        if unshuffle is None:
            raise ValueError(f"conv_first takes {first_in} channels, not 3, 12 or 48")
        return RRDBConfig(in_ch=out_ch, out_ch=out_ch, num_feat=feat, num_block=num_block,
                          num_grow_ch=sd["body.0.rdb1.conv1.weight"].shape[0], num_up=num_up, unshuffle=unshuffle)


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
        x1 = F.leaky_relu(self.conv1(x), 0.2)
        x2 = F.leaky_relu(self.conv2(torch.cat((x, x1), 1)), 0.2)
        x3 = F.leaky_relu(self.conv3(torch.cat((x, x1, x2), 1)), 0.2)
        x4 = F.leaky_relu(self.conv4(torch.cat((x, x1, x2, x3), 1)), 0.2)
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


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


# =============================================================================================
# SRVGGNetCompact (Real-ESRGAN compact models)
# =============================================================================================

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
        acts = [int(k.split(".")[1]) for k in sd if k.startswith("body.") and sd[k].ndim == 1 and k.endswith("weight")
                and int(k.split(".")[1]) % 2 == 1]
        if convs != list(range(0, 2 * len(convs), 2)) or len(acts) != len(convs) - 1:
            raise ValueError("body is not (conv, PReLU) pairs; only the PReLU variant is supported")
        feat, in_ch = sd["body.0.weight"].shape[:2]
        last = sd[f"body.{convs[-1]}.weight"].shape[0]
        upscale = round((last / in_ch) ** 0.5)
        if upscale * upscale * in_ch != last:
            raise ValueError(f"last conv has {last} outputs, not {in_ch} * upscale**2")
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


# =============================================================================================
# Loading
# =============================================================================================

def _rename_original_esrgan(sd: dict) -> dict:
    """`model.N` layout -> BasicSR names.

    model.0 = conv_first; model.1.sub.{i}.RDB{j}.conv{k}.0 = body.i.rdbj.convk; model.1.sub.{nb} = conv_body; the
    remaining `model.N` convs after the trunk, in order, are the upsampling convs, then conv_hr, then conv_last
    (x4: model.3, model.6, model.8, model.10; x2: model.3, model.5, model.7; x8: model.3, .6, .9, .11, .13).
    """
    if any("conv1x1" in k for k in sd):
        raise ValueError("ESRGAN+ ('plus', conv1x1 in the dense blocks) is not supported")
    out, tail = {}, {}
    trunk = max(int(m.group(1)) for k in sd if (m := re.fullmatch(r"model\.1\.sub\.(\d+)\.(weight|bias)", k)))
    for k, v in sd.items():
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", k):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = v
        elif m := re.fullmatch(r"model\.1\.sub\.(\d+)\.(weight|bias)", k):
            if int(m[1]) != trunk:
                raise ValueError(f"unexpected key {k}")
            out[f"conv_body.{m[2]}"] = v
        elif m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", k):
            tail.setdefault(int(m[1]), {})[m[2]] = v
        else:
            raise ValueError(f"unexpected key {k}")
    idx = sorted(tail)
    if len(idx) < 3 or idx[0] != 0:
        raise ValueError("missing model.0 or the conv_hr / conv_last convs")
    names = ["conv_first", *(f"conv_up{i}" for i in range(1, len(idx) - 2)), "conv_hr", "conv_last"]
    for name, i in zip(names, idx):
        for part, v in tail[i].items():
            out[f"{name}.{part}"] = v
    return out


def _rename_esrgan_2019(sd: dict) -> dict:
    """xinntao/ESRGAN's 2019 layout (`RRDB_trunk`, `trunk_conv`, `upconv1`, `HRconv`) -> BasicSR names."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^RRDB_trunk\.(\d+)\.RDB(\d)\.", r"body.\1.rdb\2.", k)
        k = re.sub(r"^trunk_conv\.", "conv_body.", k)
        k = re.sub(r"^upconv(\d+)\.", r"conv_up\1.", k)
        out[re.sub(r"^HRconv\.", "conv_hr.", k)] = v
    return out


def convert_esrgan_keys(sd: dict) -> dict:
    """Any RRDBNet layout seen in the wild -> the BasicSR key names of `RRDBNet`."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "model.0.weight" in sd:
        return _rename_original_esrgan(sd)
    if "RRDB_trunk.0.RDB1.conv1.weight" in sd:
        return _rename_esrgan_2019(sd)
    return sd


def _read(path: Path) -> dict:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError("not a state dict")
    for wrapper in ("params_ema", "params", "state_dict"):  # Real-ESRGAN / BasicSR training wrappers
        if isinstance(obj.get(wrapper), dict):
            return obj[wrapper]
    return obj


def build_upscaler(sd: dict) -> nn.Module:
    """State dict (any supported layout, wrappers removed) -> RRDBNet or SRVGGNetCompact with the weights loaded
    strictly. Raises ValueError saying what is wrong."""
    sd = convert_esrgan_keys(sd)
    if "conv_first.weight" in sd and "body.0.rdb1.conv1.weight" in sd:
        build = lambda: RRDBNet(RRDBConfig.from_state_dict(sd))  # noqa: E731
    elif "body.0.weight" in sd and "body.1.weight" in sd and sd["body.0.weight"].ndim == 4:
        build = lambda: SRVGGNetCompact(SRVGGConfig.from_state_dict(sd))  # noqa: E731
    else:
        raise ValueError("not an ESRGAN, Real-ESRGAN or SRVGGNetCompact model")
    with torch.device("meta"):  # no random init: the file's tensors are assigned below
        net = build()
    return assign_strict(net, sd)


def load_upscaler(path, device="cpu", dtype=torch.float32) -> nn.Module:
    """Read an upscaler file (`.pth`/`.pt` through `torch.load(weights_only=True)`, or `.safetensors`).

    Any failure (missing, truncated, foreign or pickled-code file, unknown layout, wrong shapes) raises
    `UpscalerModelError` with a one-line message that names the file.
    """
    path = Path(path)
    try:
        net = build_upscaler(_read(path))
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UpscalerModelError(f"{path.name}: cannot load upscaler model: {msg}") from e
    return net.to(device=device, dtype=dtype)
