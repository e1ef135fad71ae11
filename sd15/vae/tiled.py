"""Tiled VAE decoding and encoding: large images without the VAE's full-resolution activations in memory.

Where the memory goes: at 1024x1024 the decoder's last levels hold 128-256 channels at full resolution
(256 MiB per fp16 tensor at 128 channels); the latent-resolution part (post_quant_conv, conv_in and the
mid-block with its attention, 512 channels at 128x128) is 16 MiB. The encoder is the mirror image.

So both entry points run the latent-resolution part on the *whole* latent, exactly as `vae.decode` /
`vae.encode` do (global self-attention, exact GroupNorm), and tile only the full-resolution part: the up
path (`decoder.up`, `norm_out`, `conv_out`) when decoding, the down path (`conv_in`, `encoder.down`) when
encoding.

GroupNorm is the difficulty: every GroupNorm normalises with statistics over the *whole* image, and a tile
that computes them over itself changes the result (brighter or darker tiles, seams). Two modes:

mode="exact" (default) runs the tiled part stage by stage (each ResnetBlock, Upsample / Downsample, the
  output head), each stage over all tiles before the next. A tile is its core (the cores partition the
  image) plus HALO pixels of context, enough for the stage's convolutions, and keeps only its core's output,
  so there are no seams to blend. A stage's GroupNorms get exact global statistics from sub-passes: for
  the j-th GroupNorm every tile runs up to it (the first j-1 already knowing theirs), its input is
  accumulated over the core (per sample and group: count, mean, M2, combined with Chan's formula in
  float64), and the tile stops there. Result: `vae.decode` up to float rounding (measured rel 2e-6), for
  about 1.5x the convolution work. Memory: one tile's activations on the device, plus one stage's input
  and output maps at full size on `storage` (the device by default: about half the untiled peak;
  "cpu": device memory bounded by the tile size).

mode="blend" runs every tile through the whole tiled part; tiles overlap by `overlap` and are blended with
  linear feathering (the weights of overlapping tiles sum to one). GroupNorm statistics are estimated by
  `stats_passes` passes over all tiles that accumulate each GroupNorm's input over the tile cores (pass 1
  normalises with tile-local statistics; 0 passes = tile-local statistics, the naive method). Memory is
  independent of the image size, but the result deviates: the estimate is exact only for the first
  GroupNorm, and further passes do not converge reliably (each layer's estimate comes from a pass whose
  earlier layers used other statistics; measured: worse after 2 passes), so `stats_passes` > 1 is not
  recommended. Measured deviations are in tests/test_tiled_vae.py.

Units: decode tiles are in latent pixels (`tile=64` = 512 image pixels), encode tiles in image pixels
(`tile=512`), overlaps likewise. A latent (or image) that fits in one tile gives exactly `vae.decode`
(`vae.encode`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# Tiles and blending weights
# ------------------------------------------------------------------------------------------------


def tile_spans(n: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int, int, int]]:
    """Cover [0, n) with tiles of length `tile` overlapping by at least `overlap`, evenly spaced.

    Returns (start, end, core_start, core_end) per tile; the cores partition [0, n), each boundary in the
    middle of an overlap. Every tile has the same length (good for compiled or graph-captured code), and
    all positions are multiples of `align` (8 for the encoder, so its stride-2 grid lines up).
    """
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
        ramp = (spans[i - 1][1] - start) * scale
        w = w * (j / ramp).clamp(max=1.0)
    if i < len(spans) - 1:
        ramp = (end - spans[i + 1][0]) * scale
        w = w * ((length - j) / ramp).clamp(max=1.0)
    return w


# ------------------------------------------------------------------------------------------------
# GroupNorm with statistics over the whole image
# ------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the GroupNorm being measured, to skip the rest of a stage."""


class GlobalGroupNorm:
    """Context manager that overrides the forward of the given GroupNorm modules (instance attribute,
    removed on exit) so that they can accumulate statistics over tile cores and normalise with an estimate.

    `core` = (y0, y1, x0, x1, th, tw): the running tile's core in the tile's own input coordinates and the
    tile's input size; an activation of size (ah, aw) maps it by ah/th, aw/tw (exact: the decoder upsamples
    by 2, the encoder's tiles are multiples of 8).
    """

    def __init__(self, norms: list[nn.GroupNorm]):
        self.norms = norms
        self.estimate: dict = {}  # GroupNorm -> (mean, var), each (B, G) float64
        self.sums: dict = {}  # GroupNorm -> (n, mean, M2) of the pass in progress
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

    def start_pass(self, collect: bool) -> None:
        self.collect, self.sums = collect, {}

    def end_pass(self) -> None:
        if self.collect:
            self.estimate = {gn: (mean, m2 / n) for gn, (n, mean, m2) in self.sums.items()}

    def measure(self, gn: nn.GroupNorm | None) -> None:
        """Start measuring `gn` alone (None: stop, and keep what was measured as its statistics)."""
        if gn is None and self.measuring is not None:
            n, mean, m2 = self.sums.pop(self.measuring)
            self.estimate[self.measuring] = (mean, m2 / n)
        self.measuring = gn

    def _forward(self, gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if self.collect or gn is self.measuring:
            self._accumulate(gn, x)
        if gn is self.measuring:
            raise _Stop
        if gn not in self.estimate:
            return type(gn).forward(gn, x)  # tile-local statistics
        mean, var = self.estimate[gn]
        b, c = x.shape[:2]
        per_group = c // gn.num_groups
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


# ------------------------------------------------------------------------------------------------
# mode="exact": stage by stage over all tiles
# ------------------------------------------------------------------------------------------------

HALO = 2  # input pixels of context per side: a ResnetBlock has two 3x3 convs, Upsample/Downsample one


def _run_stages(stages, x, cores_y, cores_x, storage):
    """Run `stages` [(module, scale)] one after another over the whole map x (B, C, H, W), each stage tile
    by tile: crop the tile's core plus HALO pixels, run, keep the output of the core (`scale` = output /
    input size: 1, 2 for Upsample, 1/2 for Downsample). The crop holds every input pixel the core's outputs
    depend on, so the result is exact. The stage's GroupNorms get global statistics first: for the j-th,
    every tile runs up to it, with the statistics of the first j-1 known, accumulates its input over the
    core and stops. `cores_*` partition x's rows / columns; they scale with the stages."""
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
                gn.measure(target)
                for (cy0, cy1, cx0, cx1), (y0, y1, x0, x1) in crops:
                    gn.core = (cy0 - y0, cy1 - y0, cx0 - x0, cx1 - x0, y1 - y0, x1 - x0)
                    try:
                        stage(x[:, :, y0:y1, x0:x1].to(device))
                    except _Stop:
                        pass
                gn.measure(None)
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


# ------------------------------------------------------------------------------------------------
# mode="blend": every tile through the whole tiled part, feathered
# ------------------------------------------------------------------------------------------------


def _run_blended(path, x, spans_y, spans_x, norms, scale: float, out_channels: int, stats_passes: int):
    """Run `path` over overlapping tiles of x (B, C, H, W) and blend its outputs (`scale` times the tile
    size) into (B, out_channels, H*scale, W*scale) float32 with linear feathering."""
    b, _, h, w = x.shape
    oh, ow = round(h * scale), round(w * scale)
    single = len(spans_y) == 1 and len(spans_x) == 1
    with GlobalGroupNorm([] if single else norms) as gn:
        for _ in range(0 if single else stats_passes):
            gn.start_pass(collect=True)
            for y0, y1, cy0, cy1 in spans_y:
                for x0, x1, cx0, cx1 in spans_x:
                    gn.core = (cy0 - y0, cy1 - y0, cx0 - x0, cx1 - x0, y1 - y0, x1 - x0)
                    path(x[:, :, y0:y1, x0:x1])
            gn.end_pass()
        gn.start_pass(collect=False)
        out = torch.zeros(b, out_channels, oh, ow, device=x.device, dtype=torch.float32)
        weight = torch.zeros(oh, ow, device=x.device, dtype=torch.float32)
        for i, (y0, y1, _, _) in enumerate(spans_y):
            wy = _feather(spans_y, i, scale, x.device)
            for j, (x0, x1, _, _) in enumerate(spans_x):
                wx = _feather(spans_x, j, scale, x.device)
                tile_w = wy[:, None] * wx[None, :]  # (th*scale, tw*scale)
                oy, ox = round(y0 * scale), round(x0 * scale)
                sl = (slice(oy, oy + tile_w.shape[0]), slice(ox, ox + tile_w.shape[1]))
                out[:, :, sl[0], sl[1]] += path(x[:, :, y0:y1, x0:x1]).float() * tile_w
                weight[sl] += tile_w
    return out / weight


def _group_norms(modules) -> list[nn.GroupNorm]:
    return [m for mod in modules for m in mod.modules() if isinstance(m, nn.GroupNorm)]


def _cores(n: int, tile: int, align: int = 1) -> list[tuple[int, int]]:
    return [(a, e) for _, _, a, e in tile_spans(n, tile, 0, align)]


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------

MODES = ("exact", "blend")


def _chain(stages):
    """The stages run one after another on one crop: the whole up (or down) path of a tile."""
    def run(t):
        for module, _ in stages:
            t = module(t)
        return t
    return run


@torch.no_grad()
def tiled_decode(vae, z: torch.Tensor, tile: int = 64, overlap: int = 16, *, mode: str = "exact",
                 storage=None, stats_passes: int = 1) -> torch.Tensor:
    """`vae.decode(z)` in tiles. z: raw latent (B, 4, h, w) (sampler output / 0.18215) in the VAE dtype ->
    image (B, 3, 8h, 8w) in the same dtype. `tile`/`overlap` in latent pixels (64/16 = 512/128 image px).

    mode="exact": the up path stage by stage (each ResnetBlock, Upsample, the output head), every stage
      tile by tile with a HALO-pixel margin and global GroupNorm statistics: equal to `vae.decode` up to
      float rounding. Holds one stage's input and output maps at full size on `storage` (default: z's
      device; "cpu" bounds device memory by the tile size). `overlap` is not used.
    mode="blend": each tile through the whole up path, tiles overlapping by `overlap`, blended with linear
      feathering; GroupNorm statistics estimated by `stats_passes` passes (0: per tile). Memory independent
      of the image size, 1 + stats_passes runs of the up path, not exact (see the module docstring).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dec = vae.decoder
    x = dec.mid(dec.conv_in(vae.post_quant_conv(z)))  # (B, 512, h, w): whole latent, exact
    h, w = z.shape[-2:]
    stages = []
    for level in reversed(dec.up):  # Decoder.forward after `mid` (sd15/vae/vae.py), lowest resolution first
        stages += [(block, 1) for block in level.block]
        if hasattr(level, "upsample"):
            stages.append((level.upsample, 2))
    stages.append((nn.Sequential(dec.norm_out, nn.SiLU(), dec.conv_out), 1))
    if mode == "exact":
        return _run_stages(stages, x, _cores(h, tile), _cores(w, tile), storage or z.device).to(z.device)
    scale = 2 ** (len(dec.up) - 1)
    norms = _group_norms(list(dec.up) + [dec.norm_out])
    out = _run_blended(_chain(stages), x, tile_spans(h, tile, overlap), tile_spans(w, tile, overlap), norms, scale,
                       dec.conv_out.out_channels, stats_passes)
    return out.to(z.dtype)


@torch.no_grad()
def tiled_encode(vae, img: torch.Tensor, tile: int = 512, overlap: int = 64, *, mode: str = "exact",
                 storage=None, stats_passes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`vae.encode(img)` in tiles. img: (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> (mean, logvar),
    each (B, 4, H/8, W/8). `tile`/`overlap` in image pixels, rounded down to multiples of 8; `mode`,
    `storage`, `stats_passes` as in `tiled_decode` (here the down path is tiled)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    enc = vae.encoder
    factor = 2 ** (len(enc.down) - 1)
    tile, overlap = tile // factor * factor, overlap // factor * factor
    h, w = img.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} must be a multiple of {factor}")
    stages = [(enc.conv_in, 1)]
    for level in enc.down:  # Encoder.forward before `mid` (sd15/vae/vae.py)
        stages += [(block, 1) for block in level.block]
        if hasattr(level, "downsample"):
            stages.append((level.downsample, 0.5))
    if mode == "exact":
        feats = _run_stages(stages, img, _cores(h, tile, factor), _cores(w, tile, factor), storage or img.device)
    else:
        channels = enc.mid.block_1.conv1.in_channels
        feats = _run_blended(_chain(stages), img, tile_spans(h, tile, overlap, factor),
                             tile_spans(w, tile, overlap, factor), _group_norms(enc.down), 1 / factor, channels,
                             stats_passes)
    hid = enc.conv_out(F.silu(enc.norm_out(enc.mid(feats.to(img.device, img.dtype)))))  # whole, exact
    mean, logvar = vae.quant_conv(hid).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)  # as AutoencoderKL.encode
