"""The SD 1.5 denoising UNet (860M parameters), read top to bottom.

Mirrors LDM's `ldm/modules/diffusionmodules/openaimodel.py` (UNetModel, ResBlock, Downsample,
Upsample) and `ldm/modules/attention.py` (SpatialTransformer, BasicTransformerBlock,
CrossAttention, GEGLU) for the configuration in `configs/stable-diffusion/v1-inference.yaml`.
Paper: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models".

Checkpoint prefix: `model.diffusion_model.`; every attribute name below *is* the key name in
the checkpoint, so loading is `load_state_dict(strict=True)` after removing the prefix.

SD 1.5 sizes: 320 base channels, multipliers (1, 2, 4, 4) -> 320/640/1280/1280, two ResBlocks per
level, cross-attention at downsample factors 1, 2, 4 with 8 heads (head size 40/80/160),
context width 768 (CLIP ViT-L/14), latent (B, 4, H/8, W/8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sd15.attention import attention


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsample factors that get a SpatialTransformer
    num_heads: int = 8  # SD 1.x fixes the head count, so head size grows with width (40/80/160)
    transformer_depth: int = 1
    context_dim: int = 768

    @staticmethod
    def from_state_dict(sd: dict) -> "UNetConfig":
        """Read the architecture off the tensor shapes (keys without the checkpoint prefix)."""
        mc, cin = sd["input_blocks.0.0.weight"].shape[:2]
        mult, attn_ds, res_per_level = [], [], [0]
        ds, i = 1, 1
        while f"input_blocks.{i}.0.op.weight" in sd or f"input_blocks.{i}.0.in_layers.2.weight" in sd:
            if f"input_blocks.{i}.0.op.weight" in sd:  # a Downsample closes a level
                ds, res_per_level = ds * 2, res_per_level + [0]
            else:
                res_per_level[-1] += 1
                if len(res_per_level) > len(mult):
                    mult.append(sd[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0] // mc)
                if f"input_blocks.{i}.1.proj_in.weight" in sd and ds not in attn_ds:
                    attn_ds.append(ds)
            i += 1
        depth = sum(1 for k in sd if k.startswith("middle_block.1.transformer_blocks.") and k.endswith(".norm1.weight"))
        return UNetConfig(
            in_channels=cin, out_channels=sd["out.2.weight"].shape[0], model_channels=mc,
            channel_mult=tuple(mult), num_res_blocks=res_per_level[0],
            attention_resolutions=tuple(sorted(attn_ds, reverse=True)),
            transformer_depth=depth, context_dim=sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        )


# Tiny preset for fast tests: 32 base channels keep the GroupNorm(32, ·) of the real model valid.
# Like SD 1.5, the last level has no attention.
UNET_TINY = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2, 1), context_dim=64)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype, as LDM's `normalization()`; eps 1e-5."""

    def __init__(self, channels: int):
        super().__init__(32, channels, eps=1e-5)

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps t: (B,) -> (B, dim). LDM order is [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    # Index contract (LDM nn.Sequential): in_layers 0 norm, 1 act, 2 conv; emb_layers 0 act, 1 linear;
    # out_layers 0 norm, 1 act, 2 dropout slot, 3 conv.
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when context is None (attn1), cross-attention otherwise (attn2)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(0.0))  # to_out.1 is a dropout slot

    def forward(self, x, context=None):
        context = x if context is None else context
        b, lq, c = x.shape
        h = self.heads
        q = self.to_q(x).view(b, lq, h, c // h).transpose(1, 2)  # (B, H, Lq, D)
        k = self.to_k(context).view(b, -1, h, c // h).transpose(1, 2)  # (B, H, Lk, D)
        v = self.to_v(context).view(b, -1, h, c // h).transpose(1, 2)  # (B, H, Lk, D)
        out = attention(q, k, v)  # (B, H, Lq, D)
        return self.to_out(out.transpose(1, 2).reshape(b, lq, c))  # (B, Lq, C)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): project to 2x the width, then x * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    # Index contract: net 0 GEGLU, 1 dropout slot, 2 linear.
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features as a token sequence through transformer blocks. SD 1.x projects with 1x1 convs."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)  # eps 1e-6 here, unlike the UNet's GroupNorm32
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = y.transpose(1, 2).reshape(b, c, h, w)  # (B, H*W, C) -> (B, C, H, W)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """An `input_blocks.N` / `output_blocks.N` entry: routes emb to ResBlocks and context to transformers."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    # Index contract: input_blocks.0 is the stem conv; each later input_blocks.N is [ResBlock,
    # SpatialTransformer?] or [Downsample]; output_blocks.N is [ResBlock, SpatialTransformer?, Upsample?];
    # time_embed 0 linear, 1 act, 2 linear; out 0 norm, 1 act, 2 conv.
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def level_block(ch_in, ch_out, ds):
            layers = [ResBlock(ch_in, emb_dim, ch_out)]
            if ds in cfg.attention_resolutions:
                layers.append(SpatialTransformer(ch_out, cfg.num_heads, cfg.transformer_depth, cfg.context_dim))
            return layers

        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(TimestepSequential(*level_block(ch, mc * mult, ds)))
                ch = mc * mult
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(
            ResBlock(ch, emb_dim, ch),
            SpatialTransformer(ch, cfg.num_heads, cfg.transformer_depth, cfg.context_dim),
            ResBlock(ch, emb_dim, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = level_block(ch + skip_channels.pop(), mc * mult, ds)
                ch = mc * mult
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, 4, h, w) noisy latent, t: (B,) float timesteps, context: (B, 77k, 768) -> eps (B, 4, h, w)."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))  # (B, 1280)
        context = context.to(x.dtype)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)  # (B, 1280, h/8, w/8)
        for block in self.output_blocks:
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                # Sizes that are not multiples of 64 px: an odd size halves down and doubles back up one
                # larger, so A1111 resizes to the skip's size (nearest) before concatenating.
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = torch.cat([h, skip], dim=1)  # skip connection along channels
            h = block(h, emb, context)
        return self.out(h)  # (B, 4, h, w)
