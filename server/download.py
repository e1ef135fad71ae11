"""First run with an empty checkpoint folder: fetch the default SD 1.5 checkpoint, as A1111 does.

Plain `urllib`. The file is written as `<name>.partial` and renamed only after its sha256 matched, so a
corrupt or half-written file never sits under the real name; running again resumes it with a Range request.
`SD15_MODEL_URL` / `SD15_MODEL_SHA256` point at a mirror (and let tests use a local server).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import urllib.error
import urllib.request

DEFAULT_MODEL = "v1-5-pruned-emaonly.safetensors"
DEFAULT_URL = ("https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
               "v1-5-pruned-emaonly.safetensors")
DEFAULT_SHA256 = "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that did not give a verified file; the message is one line that says what to do."""


def model_source() -> tuple[str, str]:
    """(url, sha256) of the default checkpoint, after the SD15_MODEL_URL / SD15_MODEL_SHA256 overrides."""
    url = os.environ.get("SD15_MODEL_URL") or DEFAULT_URL
    return url, (os.environ.get("SD15_MODEL_SHA256") or DEFAULT_SHA256).strip().lower()


def download(url: str, dest: str, sha256: str, *, progress: bool = True, timeout: float = 60.0) -> str:
    """Download `url` to `dest`, resuming `dest + ".partial"`, and verify its sha256 -> dest."""
    from tqdm import tqdm

    folder = os.path.dirname(os.path.abspath(dest))
    part = dest + ".partial"
    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    h, headers = hashlib.sha256(), {"User-Agent": "sd15-server"}
    if offset:
        with open(part, "rb") as f:
            h = hashlib.file_digest(f, "sha256")
        headers["Range"] = f"bytes={offset}-"
    manual = (f"download {url} yourself and save it as {dest} (or put any SD 1.x checkpoint in {folder}); "
              f"SD15_MODEL_URL can point to a mirror")
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to fetch: the partial file may be complete
            return _finish(part, dest, h, sha256, url)
        raise DownloadError(f"could not download {url}: HTTP {e.code} {e.reason}; {manual}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"could not download {url} ({reason}); {manual}") from None

    with resp:
        m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
        resumed = offset > 0 and resp.status == 206 and m is not None and int(m.group(1)) == offset
        if not resumed:  # a fresh start: the server sent the whole file
            offset, h = 0, hashlib.sha256()
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        if total is not None:
            free = shutil.disk_usage(_existing(folder)).free
            if free < total - offset:
                raise DownloadError(f"not enough disk space in {folder} for {os.path.basename(dest)} "
                                    f"({(total - offset) / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free)")
        os.makedirs(folder, exist_ok=True)  # only now: a download that fails to start leaves no folder behind
        try:
            with open(part, "ab" if resumed else "wb") as f, \
                    tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=os.path.basename(dest), disable=not progress) as bar:
                for chunk in iter(lambda: resp.read(CHUNK), b""):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as e:  # reset, timeout, early end of the body
            raise DownloadError(f"download of {url} stopped ({e!r}); run again to resume it") from None
    if total is not None and os.path.getsize(part) < total:
        raise DownloadError(f"download of {url} stopped at {os.path.getsize(part):,} of {total:,} bytes; "
                            f"run again to resume it")
    return _finish(part, dest, h, sha256, url)


def _existing(folder: str) -> str:
    """`folder`, or its nearest parent that exists (for the free-space check before the folder is made)."""
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return folder


def _finish(part: str, dest: str, h, sha256: str, url: str) -> str:
    digest = h.hexdigest()
    if digest != sha256:
        os.remove(part)
        raise DownloadError(f"{url} gave a file with sha256 {digest}, expected {sha256}; the file was deleted, "
                            f"run again to retry")
    os.replace(part, dest)
    return dest


def fetch_default_checkpoint(ckpt_dir: str, *, progress: bool = True) -> str:
    """Download the default checkpoint into `ckpt_dir` -> its path."""
    url, sha256 = model_source()
    return download(url, os.path.join(ckpt_dir, DEFAULT_MODEL), sha256, progress=progress)
