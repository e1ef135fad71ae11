"""Saving generated images as A1111 does: `<outdir>/txt2img-images/YYYY-MM-DD/NNNNN-SEED.png`
(img2img: `img2img-images`), NNNNN counting on from the highest number already in that folder (A1111's
`modules/images.py` `save_image` with its default `[seed]` file pattern and `[date]` folder pattern), the
infotext in the PNG `parameters` chunk. Only the server writes here; the library (`sd15/`) writes nothing.
"""
from __future__ import annotations

import datetime
import os
import re
import threading

FOLDERS = {"txt2img": "txt2img-images", "img2img": "img2img-images",  # A1111's outdir_*_samples
           "txt2img-grids": "txt2img-grids", "img2img-grids": "img2img-grids"}  # outdir_*_grids
_NUMBERED = re.compile(r"^(\d+)-")
_lock = threading.Lock()  # numbering is read-then-write; one writer at a time


def next_number(folder: str) -> int:
    """A1111's `get_next_sequence_number`: one more than the highest leading number of a file in `folder`."""
    best = -1
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        m = _NUMBERED.match(name)
        if m:
            best = max(best, int(m.group(1)))
    return best + 1


def save_images(outdir: str, kind: str, images, infotexts, seeds, *, fmt: str = "png", pnginfo: bool = True,
                today: datetime.date | None = None) -> list[str]:
    """Write `images` -> their paths relative to `outdir` ("txt2img-images/2026-11-30/00001-42.png")."""
    from sd15.a1111.images import png_bytes

    day = (today or datetime.date.today()).isoformat()
    rel_folder = f"{FOLDERS[kind]}/{day}"
    folder = os.path.join(outdir, *rel_folder.split("/"))
    out = []
    with _lock:
        os.makedirs(folder, exist_ok=True)
        n = next_number(folder)
        for image, text, seed in zip(images, infotexts, seeds):
            name = f"{n:05d}-{seed}.{fmt}"
            data = png_bytes(image, text if pnginfo else None)
            tmp = os.path.join(folder, f".{name}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, os.path.join(folder, name))  # never a half-written file under the real name
            out.append(f"{rel_folder}/{name}")
            n += 1
    return out
