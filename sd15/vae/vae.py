"""The SD 1.5 VAE (AutoencoderKL, 83.7M parameters), read top to bottom.

Mirrors LDM's `ldm/modules/diffusionmodules/model.py` (Encoder, Decoder, ResnetBlock, AttnBlock,
Downsample, Upsample) and `ldm/models/autoencoder.py` (AutoencoderKL: quant_conv, post_quant_conv,
DiagonalGaussianDistribution's logvar clamp). Paper: Rombach et al. 2022, §3.

Checkpoint prefix: `first_stage_model.` in the SD file; no prefix in a standalone VAE file such as
`vae-ft-mse-840000-ema-pruned.safetensors`. Attribute names are the checkpoint's key names.

SD 1.5 sizes: 128 base channels, multipliers (1, 2, 4, 4), two ResnetBlocks per level (three on the
way up), one single-head attention in each mid-block, 4 latent channels; an image (B, 3, H, W) in
[-1, 1] <-> a latent (B, 4, H/8, W/8). Callers scale latents by 0.18215 (see `SCALE_FACTOR`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sd15.attention import attention

SCALE_FACTOR = 0.18215  # latents are divided by this before decoding and multiplied after encoding


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3

    @staticmethod
    def from_state_dict(sd: dict) -> "VAEConfig":
        """Read the architecture off the tensor shapes (keys without the checkpoint prefix)."""
        ch, cin = sd["encoder.conv_in.weight"].shape[:2]
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
        mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        nres = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
        return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=nres, z_channels=sd["post_quant_conv.weight"].shape[0],
                         in_channels=cin, out_ch=sd["decoder.conv_out.weight"].shape[0])


VAE_TINY = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)  # four levels: still a factor 8


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)  # the VAE uses eps 1e-6 everywhere


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs, as in the checkpoint."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # contiguous (B, 1, HW, C): with the transposed view SDPA falls back to materialising all HW x HW scores
        q, k, v = (conv(y).view(b, 1, c, h * w).transpose(2, 3).contiguous() for conv in (self.q, self.k, self.v))
        y = attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(y.transpose(2, 3).reshape(b, c, h, w))  # (B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only before this stride-2 conv


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks); the Encoder/Decoder attach `downsample`/`upsample`."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()  # LDM's slot for attention at this level; empty in SD


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, cfg.ch * mult))
                ch = cfg.ch * mult
            level = Level(blocks)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(ch)
            self.down.append(level)
        self.mid = Mid(ch)
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2*z, H/8, W/8)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch)
        # `up` is indexed by resolution level: up[0] is the full-resolution level and runs *last*.
        # LDM builds the list from the lowest resolution and prepends, which gives the same indexing.
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, cfg.ch * cfg.ch_mult[i]))
                ch = cfg.ch * cfg.ch_mult[i]
            level = Level(blocks)
            if i != 0:
                level.upsample = Upsample(ch)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # lowest resolution first
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img: (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, 4, H/8, W/8), unscaled."""
        moments = self.quant_conv(self.encoder(img))  # (B, 8, H/8, W/8)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # the clamp of LDM's DiagonalGaussianDistribution

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: raw latent (B, 4, h, w), i.e. sampler output / 0.18215 -> image (B, 3, 8h, 8w), about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, img):
        return self.decode(self.encode(img)[0])
