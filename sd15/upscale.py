"""A1111's pixel upscalers: the list users pick from (hires fix, extras) and how each is applied.

After A1111 v1.10's `modules/upscaler.py` (`Upscaler.upscale`, the None / Lanczos / Nearest upscalers),
`modules/upscaler_utils.py` (`upscale_with_model`), `modules/images.py` (`split_grid`, `combine_grid`,
`resize_image`), `modules/realesrgan_model.py` (the Real-ESRGAN names), `modules/modelloader.py` (the list
order) and `scripts/postprocessing_upscale.py` (extras). A file in the `ESRGAN` folder is listed under its
stem, the Real-ESRGAN release files under A1111's names; unlike A1111, nothing is downloaded, so only present
files are listed.
"""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from sd15.a1111.images import PIXEL_UPSCALERS, resize, upscale
from sd15.esrgan import load_upscaler

#: A1111's names for Real-ESRGAN's release files (modules/realesrgan_model.py): name -> (file stem, scale).
REALESRGAN_NAMES = {
    "R-ESRGAN General 4xV3": ("realesr-general-x4v3", 4),
    "R-ESRGAN General WDN 4xV3": ("realesr-general-wdn-x4v3", 4),
    "R-ESRGAN AnimeVideo": ("realesr-animevideov3", 4),
    "R-ESRGAN 4x+": ("RealESRGAN_x4plus", 4),
    "R-ESRGAN 4x+ Anime6B": ("RealESRGAN_x4plus_anime_6B", 4),
    "R-ESRGAN 2x+": ("RealESRGAN_x2plus", 2),
}

#: A1111's options `ESRGAN_tile` / `ESRGAN_tile_overlap` (defaults 192 / 8; tile 0 = no tiling).
ESRGAN_TILE = 192
ESRGAN_TILE_OVERLAP = 8


@dataclass(frozen=True)
class UpscalerInfo:
    """One entry of the upscaler list; `as_api()` is its `/sdapi/v1/upscalers` item."""
    name: str
    kind: str  # "builtin", "ESRGAN" or "RealESRGAN"
    path: Path | None = None
    scale: int = 4  # A1111 reports 4 for every ESRGAN-folder file and for the built-ins

    def as_api(self) -> dict:
        return {"name": self.name, "model_name": "ESRGAN_4x" if self.kind == "ESRGAN" else None,
                "model_path": str(self.path) if self.path else None, "model_url": None, "scale": self.scale}


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def list_upscalers(esrgan_dir=None, realesrgan_dir=None,
                   realesrgan_enabled: Iterable[str] | None = None) -> list[UpscalerInfo]:
    """The upscaler list in A1111's order: built-ins first, then by lower-cased name (files in natural order).

    `realesrgan_enabled`: A1111's option `realesrgan_enabled_models`; None lists every Real-ESRGAN file
    present.
    """
    def files(folder, pattern):
        found = Path(folder).rglob(pattern) if folder and Path(folder).is_dir() else []
        return sorted((p for p in found if p.is_file()), key=lambda p: _natural_key(str(p)))

    models = [UpscalerInfo(p.stem, "ESRGAN", p, 4) for p in files(esrgan_dir, "*")
              if p.suffix.lower() in (".pth", ".pt", ".safetensors")]
    realesrgan = files(realesrgan_dir, "*.pth")
    for name, (stem, scale) in REALESRGAN_NAMES.items():
        path = next((p for p in realesrgan if p.name == f"{stem}.pth"), None)
        if path and (realesrgan_enabled is None or name in realesrgan_enabled):
            models.append(UpscalerInfo(name, "RealESRGAN", path, scale))
    models.sort(key=lambda u: u.name.lower())
    return [UpscalerInfo(n, "builtin") for n in PIXEL_UPSCALERS] + models


@dataclass
class Grid:
    """tiles: rows of `[y, tile_h, [[x, tile_w, tile_image], ...]]`, as A1111's `images.Grid`."""
    tiles: list
    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int

    @property
    def images(self) -> list:
        return [tile for _, _, row in self.tiles for _, _, tile in row]

    def replace(self, images: list) -> None:
        """Put new tile images in, in `images` order (row by row); missing ones become black."""
        it = iter(images)
        for _, _, row in self.tiles:
            for cell in row:
                cell[2] = next(it, None) or Image.new("RGB", (self.tile_w, self.tile_h))


def split_grid(image: Image.Image, tile_w: int = 512, tile_h: int = 512, overlap: int = 64) -> Grid:
    """Cut `image` into tiles of `tile_w x tile_h` that overlap by at least `overlap` pixels, spread evenly; the
    last row/column is pushed back to end at the border. An image smaller than a tile gives one tile at a
    negative offset (PIL pads the missing part with black), exactly as A1111's `images.split_grid`."""
    if not 0 <= overlap < min(tile_w, tile_h):
        raise ValueError(f"tile overlap {overlap} must be at least 0 and less than the tile size {tile_w}x{tile_h}")
    w, h = image.size
    cols = max(1, math.ceil((w - overlap) / (tile_w - overlap)))  # max(): A1111 gives no tile at all for w <= overlap
    rows = max(1, math.ceil((h - overlap) / (tile_h - overlap)))
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = Grid([], tile_w, tile_h, w, h, overlap)
    for row in range(rows):
        y = min(int(row * dy), h - tile_h)  # the last row ends at the border
        row_images = []
        for col in range(cols):
            x = min(int(col * dx), w - tile_w)
            row_images.append([x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))])
        grid.tiles.append([y, tile_h, row_images])
    return grid


def combine_grid(grid: Grid) -> Image.Image:
    """A1111's `images.combine_grid`: the first `overlap` columns (rows) of every tile but the first are
    blended over the previous one with a linear ramp 0 -> 255·(overlap-1)/overlap (PIL's 8-bit masked
    paste)."""
    ov = grid.overlap
    ramp = (np.arange(ov, dtype=np.float32) * 255 / max(ov, 1)).astype(np.uint8)
    mask_w = Image.fromarray(np.repeat(ramp[None, :], grid.tile_h, axis=0), "L") if ov else None
    mask_h = Image.fromarray(np.repeat(ramp[:, None], grid.image_w, axis=1), "L") if ov else None
    combined = Image.new("RGB", (grid.image_w, grid.image_h))
    for y, h, row in grid.tiles:
        combined_row = Image.new("RGB", (grid.image_w, h))
        for x, w, tile in row:
            if x == 0 or not ov:
                combined_row.paste(tile, (x, 0))
                continue
            combined_row.paste(tile.crop((0, 0, ov, h)), (x, 0), mask=mask_w)
            combined_row.paste(tile.crop((ov, 0, w, h)), (x + ov, 0))
        if y == 0 or not ov:
            combined.paste(combined_row, (0, y))
            continue
        combined.paste(combined_row.crop((0, 0, combined_row.width, ov)), (0, y), mask=mask_h)
        combined.paste(combined_row.crop((0, ov, combined_row.width, h)), (0, y + ov))
    return combined


def upscale_patch(model: torch.nn.Module, image: Image.Image) -> Image.Image:
    """One pass of the network over a whole PIL image. A1111 feeds the networks BGR in [0, 1] (ESRGAN was trained on
    OpenCV images) and rounds the clamped output to uint8."""
    p = next(model.parameters())
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1].transpose(2, 0, 1)) / 255
    x = torch.from_numpy(bgr).unsqueeze(0).to(device=p.device, dtype=p.dtype)  # (1, 3, H, W)
    with torch.inference_mode():
        y = model(x)[0].float().cpu().clamp_(0, 1).numpy()  # (3, sH, sW)
    out = (255.0 * np.moveaxis(y, 0, 2)).round().astype(np.uint8)[:, :, ::-1]
    return Image.fromarray(np.ascontiguousarray(out), "RGB")


def upscale_with_model(model: torch.nn.Module, image: Image.Image, tile_size: int = ESRGAN_TILE,
                       tile_overlap: int = ESRGAN_TILE_OVERLAP,
                       interrupted: Callable[[], bool] | None = None) -> Image.Image:
    """A1111's `upscaler_utils.upscale_with_model`: one model pass over `image`, in overlapping tiles of
    `tile_size` (0 = whole image at once). When `interrupted()` turns true between tiles the input image is
    returned, as A1111 does."""
    if tile_size <= 0:
        return upscale_patch(model, image)
    grid = split_grid(image, tile_size, tile_size, tile_overlap)
    scale = 1
    rows = []
    for y, h, row in grid.tiles:
        new_row = []
        for x, w, tile in row:
            if interrupted is not None and interrupted():
                return image
            out = upscale_patch(model, tile)
            scale = out.width // tile.width
            new_row.append([x * scale, w * scale, out])
        rows.append([y * scale, h * scale, new_row])
    return combine_grid(Grid(rows, grid.tile_w * scale, grid.tile_h * scale, grid.image_w * scale,
                             grid.image_h * scale, grid.overlap * scale))


class Upscalers:
    """The upscalers of an ESRGAN / RealESRGAN folder pair, each model loaded once, on `device` in `dtype`.

    `upscale` is A1111's `Upscaler.upscale` (the extras "upscale by"); `resize` its `resize_image` step used by
    hires fix and img2img; `upscale_to` the extras "upscale to" with optional crop.
    """

    def __init__(self, esrgan_dir=None, realesrgan_dir=None, *, device="cpu", dtype=torch.float32,
                 tile: int = ESRGAN_TILE, tile_overlap: int = ESRGAN_TILE_OVERLAP):
        self.esrgan_dir, self.realesrgan_dir = esrgan_dir, realesrgan_dir
        self.device, self.dtype = torch.device(device), dtype
        self.tile, self.tile_overlap = tile, tile_overlap
        self.realesrgan_enabled: list[str] | None = None  # A1111 option realesrgan_enabled_models
        self._models: dict[Path, torch.nn.Module] = {}
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folders (A1111's refresh); cached models of files that are gone are dropped."""
        self.infos = list_upscalers(self.esrgan_dir, self.realesrgan_dir, self.realesrgan_enabled)
        present = {u.path for u in self.infos}
        with self._lock:
            self._models = {p: m for p, m in self._models.items() if p in present}

    def names(self) -> list[str]:
        return [u.name for u in self.infos]

    def info(self, name: str) -> UpscalerInfo:
        for u in self.infos:
            if u.name == name:
                return u
        raise ValueError(f"could not find upscaler named {name}")  # A1111's message

    def model(self, name: str) -> torch.nn.Module:
        """The network of a model upscaler, loaded on first use (UpscalerModelError names a bad file)."""
        u = self.info(name)
        with self._lock:
            if u.path not in self._models:
                self._models[u.path] = load_upscaler(u.path, self.device, self.dtype)
            return self._models[u.path]

    def upscale(self, image: Image.Image, name: str, scale: float,
                interrupted: Callable[[], bool] | None = None) -> Image.Image:
        """A1111 `Upscaler.upscale` (`sd15.a1111.images.upscale`) with the upscaler called `name`."""
        if self.info(name).kind == "builtin":
            return upscale(image, name, scale, interrupted=interrupted)

        def run(im: Image.Image) -> Image.Image:
            return upscale_with_model(self.model(name), im, self.tile, self.tile_overlap, interrupted)
        return upscale(image, name, scale, run, interrupted)

    def resize(self, image: Image.Image, name: str | None, width: int, height: int,
               interrupted: Callable[[], bool] | None = None) -> Image.Image:
        """A1111 `resize_image(0, image, width, height, name)` (`sd15.a1111.images.resize`) with these upscalers."""
        return resize(image, name, width, height, self, interrupted)

    def upscale_to(self, image: Image.Image, name: str, width: int, height: int, crop: bool = True,
                   interrupted: Callable[[], bool] | None = None) -> Image.Image:
        """Extras "upscale to": scale by `max(width/W, height/H)`; with `crop`, paste the result centred on a black
        `width x height` canvas (A1111's `scripts/postprocessing_upscale.py`)."""
        image = self.upscale(image, name, max(width / image.width, height / image.height), interrupted)
        if crop:
            canvas = Image.new("RGB", (width, height))
            canvas.paste(image, box=(width // 2 - image.width // 2, height // 2 - image.height // 2))
            image = canvas
        return image

