"""Tiled VAE decoding and encoding: large images without the VAE's full-resolution activations in memory.

The latent-resolution part (post_quant_conv, conv_in, the mid-block with its attention) runs on the whole
latent, as in `vae.decode` / `vae.encode`; only the full-resolution part (the up path when decoding, the down
path when encoding; 256 MiB per fp16 map at 1024x1024) is tiled. GroupNorm normalises with statistics over the
whole image, and tile-local statistics make brighter or darker tiles and seams:

mode="exact" (default) runs the tiled part stage by stage (ResnetBlock, Up/Downsample, output head), each over
  all tiles (a core of a partition plus HALO pixels of context). Before each GroupNorm runs, its statistics
  are accumulated over the tile cores (Chan's formula in float64). Result: `vae.decode` up to float rounding
  (measured rel 2e-6) for about 1.5x the convolutions; one stage's input and output maps live on `storage`
  (default the device; "cpu" bounds device memory by the tile size).
mode="blend" runs each tile through the whole tiled part and feathers tiles overlapping by `overlap`;
  `stats_passes` passes over all tiles estimate the GroupNorm statistics (0: tile-local). Memory is
  independent of the image size but the result deviates (more passes do not converge: worse after 2).

Decode tiles are in latent pixels (`tile=64` = 512 image pixels), encode tiles in image pixels. An input that
fits in one tile gives exactly `vae.decode` (`vae.encode`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def tile_spans(n: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int, int, int]]:
    """Cover [0, n) with equal tiles of length `tile` overlapping by at least `overlap`, evenly spaced ->
    (start, end, core_start, core_end) per tile. The cores partition [0, n), each boundary in the middle of an
    overlap; all positions are multiples of `align` (8 for the encoder, so its stride-2 grid lines up)."""
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap})")
    if n <= tile:
        return [(0, n, 0, n)]
    if n % align or tile % align:
        raise ValueError(f"size {n} and tile {tile} must be multiples of {align}")
    n_u, tile_u, step_u = n // align, tile // align, max(1, (tile - overlap) // align)
    k = math.ceil((n_u - tile_u) / step_u)  # k + 1 tiles
    starts = [round(i * (n_u - tile_u) / k) for i in range(k + 1)]
    bounds = [0] + [(starts[i] + starts[i - 1] + tile_u) // 2 for i in range(1, k + 1)] + [n_u]
    return [(s * align, (s + tile_u) * align, bounds[i] * align, bounds[i + 1] * align)
            for i, s in enumerate(starts)]


def _feather(spans, i: int, scale: float, device) -> torch.Tensor:
    """1-D blending weights of tile i in output units (`scale` output pixels per input pixel): a linear
    ramp up across the overlap with the previous tile, down across the overlap with the next, 1 between."""
    start, end = spans[i][:2]
    length = round((end - start) * scale)
    j = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    w = torch.ones(length, device=device)
    if i > 0:
        w = w * (j / ((spans[i - 1][1] - start) * scale)).clamp(max=1.0)
    if i < len(spans) - 1:
        w = w * ((length - j) / ((end - spans[i + 1][0]) * scale)).clamp(max=1.0)
    return w


class _Stop(Exception):
    """Raised by the GroupNorm being measured, to skip the rest of a stage."""


class GlobalGroupNorm:
    """Overrides the forward of the given GroupNorms within the block (instance attribute) so that they
    accumulate statistics over tile cores and normalise with an estimate. `core` = (y0, y1, x0, x1, th, tw):
    the running tile's core in its own input coordinates and its input size; an activation of size (ah, aw)
    maps it by ah/th, aw/tw (exact: the decoder upsamples by 2, the encoder's tiles are multiples of 8)."""

    def __init__(self, norms: list[nn.GroupNorm]):
        self.norms = norms
        self.estimate: dict = {}  # GroupNorm -> (mean, var), each (B, G) float64
        self.sums: dict = {}  # GroupNorm -> (n, mean, M2) accumulated since the last keep()
        self.collect = False  # every GroupNorm accumulates (mode="blend")
        self.measuring = None  # only this GroupNorm accumulates, then stops the forward (mode="exact")
        self.core = None

    def __enter__(self):
        for gn in self.norms:
            gn.forward = lambda x, gn=gn: self._forward(gn, x)
        return self

    def __exit__(self, *exc):
        for gn in self.norms:
            gn.__dict__.pop("forward", None)

    def keep(self) -> None:
        """What was accumulated becomes those GroupNorms' statistics; the next accumulation starts empty."""
        self.estimate.update({gn: (mean, m2 / n) for gn, (n, mean, m2) in self.sums.items()})
        self.sums = {}

    def _forward(self, gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if self.collect or gn is self.measuring:
            self._accumulate(gn, x)
        if gn is self.measuring:
            raise _Stop
        if gn not in self.estimate:
            return type(gn).forward(gn, x)  # tile-local statistics
        mean, var = self.estimate[gn]
        per_group = x.shape[1] // gn.num_groups
        inv = torch.rsqrt(var + gn.eps).float().repeat_interleave(per_group, dim=1)  # (B, C)
        a = inv * gn.weight.float()  # (B, C) scale
        shift = gn.bias.float() - mean.float().repeat_interleave(per_group, dim=1) * a  # (B, C)
        return (x.float() * a[:, :, None, None] + shift[:, :, None, None]).to(x.dtype)  # in fp32, as GroupNorm

    def _accumulate(self, gn: nn.GroupNorm, x: torch.Tensor) -> None:
        y0, y1, x0, x1, th, tw = self.core
        ah, aw = x.shape[-2:]
        crop = x[:, :, y0 * ah // th:y1 * ah // th, x0 * aw // tw:x1 * aw // tw]
        b = crop.shape[0]
        var, mean = torch.var_mean(crop.float().reshape(b, gn.num_groups, -1), dim=2, correction=0)  # (B, G)
        n = crop.shape[1] // gn.num_groups * crop.shape[2] * crop.shape[3]  # elements per (sample, group)
        mean, m2 = mean.double(), var.double() * n
        if gn not in self.sums:
            self.sums[gn] = (n, mean, m2)
            return
        n0, mean0, m20 = self.sums[gn]  # Chan et al.'s pairwise combination of (count, mean, M2)
        delta = mean - mean0
        total = n0 + n
        self.sums[gn] = (total, mean0 + delta * (n / total), m20 + m2 + delta * delta * (n0 * n / total))


HALO = 2  # input pixels of context per side: a ResnetBlock has two 3x3 convs, Upsample/Downsample one


def _group_norms(modules) -> list[nn.GroupNorm]:
    return [m for mod in modules for m in mod.modules() if isinstance(m, nn.GroupNorm)]


def _run_stages(stages, x, cores_y, cores_x, storage):
    """mode="exact": run `stages` [(module, scale)] one after another over the whole map x (B, C, H, W), each
    stage tile by tile: the core plus HALO pixels in, the core's output kept (`scale` = output / input size).
    The stage's GroupNorms first get global statistics, one after another (see the module docstring)."""
    for stage, scale in stages:
        b, _, h, w = x.shape
        device = next(stage.parameters()).device
        crops = []
        for cy0, cy1 in cores_y:
            for cx0, cx1 in cores_x:
                y0, y1, x0, x1 = max(0, cy0 - HALO), min(h, cy1 + HALO), max(0, cx0 - HALO), min(w, cx1 + HALO)
                crops.append(((cy0, cy1, cx0, cx1), (y0, y1, x0, x1)))
        norms = _group_norms([stage]) if len(crops) > 1 else []  # one tile: native GroupNorm, = untiled
        with GlobalGroupNorm(norms) as gn:
            for target in norms:  # registration order = execution order (norm1, norm2; norm_out)
                gn.measuring = target
                for (cy0, cy1, cx0, cx1), (y0, y1, x0, x1) in crops:
                    gn.core = (cy0 - y0, cy1 - y0, cx0 - x0, cx1 - x0, y1 - y0, x1 - x0)
                    try:
                        stage(x[:, :, y0:y1, x0:x1].to(device))
                    except _Stop:
                        pass
                gn.keep()
            gn.measuring = None
            out = None
            for (cy0, cy1, cx0, cx1), (y0, y1, x0, x1) in crops:
                y = stage(x[:, :, y0:y1, x0:x1].to(device))
                if out is None:
                    out = torch.empty(b, y.shape[1], int(h * scale), int(w * scale), device=storage, dtype=y.dtype)
                oy, ox = int((cy0 - y0) * scale), int((cx0 - x0) * scale)
                ny, nx = int((cy1 - cy0) * scale), int((cx1 - cx0) * scale)
                out[:, :, int(cy0 * scale):int(cy0 * scale) + ny, int(cx0 * scale):int(cx0 * scale) + nx] = \
                    y[:, :, oy:oy + ny, ox:ox + nx].to(storage)
        x = out
        cores_y = [(int(a * scale), int(e * scale)) for a, e in cores_y]
        cores_x = [(int(a * scale), int(e * scale)) for a, e in cores_x]
    return x


def _run_blended(stages, x, spans_y, spans_x, stats_passes: int):
    """mode="blend": run all `stages` on each overlapping tile of x (B, C, H, W) and blend the outputs with
    linear feathering -> float32, H and W times the product of the stage scales."""
    def run(t):
        for module, _ in stages:
            t = module(t)
        return t

    b, _, h, w = x.shape
    scale = math.prod(s for _, s in stages)
    single = len(spans_y) == 1 and len(spans_x) == 1
    with GlobalGroupNorm([] if single else _group_norms([m for m, _ in stages])) as gn:
        gn.collect = True
        for _ in range(0 if single else stats_passes):
            for y0, y1, cy0, cy1 in spans_y:
                for x0, x1, cx0, cx1 in spans_x:
                    gn.core = (cy0 - y0, cy1 - y0, cx0 - x0, cx1 - x0, y1 - y0, x1 - x0)
                    run(x[:, :, y0:y1, x0:x1])
            gn.keep()
        gn.collect = False
        out = None
        weight = torch.zeros(round(h * scale), round(w * scale), device=x.device, dtype=torch.float32)
        for i, (y0, y1, _, _) in enumerate(spans_y):
            wy = _feather(spans_y, i, scale, x.device)
            for j, (x0, x1, _, _) in enumerate(spans_x):
                tile_w = wy[:, None] * _feather(spans_x, j, scale, x.device)[None, :]  # (th*scale, tw*scale)
                y = run(x[:, :, y0:y1, x0:x1]).float() * tile_w
                if out is None:
                    out = torch.zeros(b, y.shape[1], *weight.shape, device=x.device, dtype=torch.float32)
                oy, ox = round(y0 * scale), round(x0 * scale)
                sl = (slice(oy, oy + tile_w.shape[0]), slice(ox, ox + tile_w.shape[1]))
                out[:, :, sl[0], sl[1]] += y
                weight[sl] += tile_w
    return out / weight


def _tiled(stages, x, tile: int, overlap: int, align: int, mode: str, storage, stats_passes: int):
    h, w = x.shape[-2:]
    if mode == "exact":
        cores = [[(a, e) for _, _, a, e in tile_spans(n, tile, 0, align)] for n in (h, w)]
        return _run_stages(stages, x, *cores, storage or x.device)
    if mode == "blend":
        spans = [tile_spans(n, tile, overlap, align) for n in (h, w)]
        return _run_blended(stages, x, *spans, stats_passes)
    raise ValueError(f"mode must be one of ('exact', 'blend'), got {mode!r}")


@torch.no_grad()
def tiled_decode(vae, z: torch.Tensor, tile: int = 64, overlap: int = 16, *, mode: str = "exact",
                 storage=None, stats_passes: int = 1) -> torch.Tensor:
    """`vae.decode(z)` in tiles: raw latent (B, 4, h, w) (sampler output / 0.18215) in the VAE dtype ->
    image (B, 3, 8h, 8w). `tile`/`overlap` in latent pixels (64/16 = 512/128 image px); `overlap` only for
    "blend"; `storage` (exact) and `stats_passes` (blend) as in the module docstring."""
    dec = vae.decoder
    x = dec.mid(dec.conv_in(vae.post_quant_conv(z)))  # (B, 512, h, w): whole latent, exact
    stages = []
    for level in reversed(dec.up):  # Decoder.forward after `mid` (sd15/vae/vae.py), lowest resolution first
        stages += [(block, 1) for block in level.block]
        if hasattr(level, "upsample"):
            stages.append((level.upsample, 2))
    stages.append((nn.Sequential(dec.norm_out, nn.SiLU(), dec.conv_out), 1))
    return _tiled(stages, x, tile, overlap, 1, mode, storage, stats_passes).to(z.device, z.dtype)


@torch.no_grad()
def tiled_encode(vae, img: torch.Tensor, tile: int = 512, overlap: int = 64, *, mode: str = "exact",
                 storage=None, stats_passes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`vae.encode(img)` in tiles: (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> (mean, logvar), each
    (B, 4, H/8, W/8). `tile`/`overlap` in image pixels, rounded down to multiples of 8; the rest as in
    `tiled_decode` (here the down path is tiled)."""
    enc = vae.encoder
    factor = 2 ** (len(enc.down) - 1)
    h, w = img.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} must be a multiple of {factor}")
    stages = [(enc.conv_in, 1)]
    for level in enc.down:  # Encoder.forward before `mid` (sd15/vae/vae.py)
        stages += [(block, 1) for block in level.block]
        if hasattr(level, "downsample"):
            stages.append((level.downsample, 0.5))
    feats = _tiled(stages, img, tile // factor * factor, overlap // factor * factor, factor, mode, storage,
                   stats_passes)
    hid = enc.conv_out(F.silu(enc.norm_out(enc.mid(feats.to(img.device, img.dtype)))))  # whole, exact
    mean, logvar = vae.quant_conv(hid).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)  # as AutoencoderKL.encode
