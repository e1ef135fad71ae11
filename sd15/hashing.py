"""File hashes as A1111 shows them, and a small JSON cache of them beside the files.

The server and the CLI hash a checkpoint once (cached in `<dir>/.sd15-hashes.json`) and pass the short hash to
`generate(..., model_hash=...)` for the infotext's "Model hash"; the library core never reads the cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from typing import Optional

log = logging.getLogger(__name__)

HASH_CACHE_NAME = ".sd15-hashes.json"
_CACHE_FORMAT = 1
_cache_lock = threading.Lock()


def model_hash(path: str | os.PathLike) -> str:
    """SHA-256 of the whole file, lowercase hex; A1111's "Model hash"/"VAE hash" is its first 10 digits."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def short_hash(full: Optional[str]) -> Optional[str]:
    """The 10-digit form A1111 shows (titles, infotext "Model hash")."""
    return full[:10] if full else None


def legacy_model_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-digit hash: SHA-256 of the 0x10000 bytes at offset 0x100000 (whatever is there for a
    shorter file, so the hash of nothing when it ends before), "NOFILE" when the file does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    except FileNotFoundError:
        return "NOFILE"


def addnet_hash(path: str | os.PathLike) -> str:
    """LoRA hash: the SHA-256 of a .safetensors file after its header (8-byte length + JSON), of any other
    file whole. A1111 writes its first 12 digits in "Lora hashes"."""
    with open(path, "rb") as f:
        if str(path).lower().endswith(".safetensors"):
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_cache(cache_path: str) -> dict:
    try:
        with open(cache_path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("ignoring unreadable hash cache %s", cache_path)
        return {}
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return {k: v for k, v in data["files"].items() if isinstance(v, dict)}


def _write_cache(cache_path: str, files: dict) -> None:
    """Atomically (a temporary file, then a rename); an unwritable folder just means no caching."""
    tmp = None
    try:
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=os.path.dirname(cache_path) or ".",
                                         prefix=HASH_CACHE_NAME + ".", suffix=".tmp", delete=False) as f:
            tmp = f.name
            json.dump({"format": _CACHE_FORMAT, "files": files}, f, indent=1, sort_keys=True)
        os.replace(tmp, cache_path)
    except OSError as e:
        log.info("could not write hash cache %s: %s", cache_path, e)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def cached_hash(path: str | os.PathLike, *, compute: bool = True) -> Optional[str]:
    """`model_hash(path)`, remembered in `<dir>/.sd15-hashes.json` under the file's name with its size and
    mtime (ns), either of which changing means hashing again; a corrupt cache counts as empty. With
    `compute=False` only a cached value (or None), e.g. to list checkpoints without hashing them (A1111 titles
    carry the hash only once it is known)."""
    path = os.fspath(path)
    st = os.stat(path)
    cache_path = os.path.join(os.path.dirname(os.path.abspath(path)), HASH_CACHE_NAME)
    key = os.path.basename(path)

    def fresh(entry) -> bool:
        return entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns

    with _cache_lock:
        entry = _read_cache(cache_path).get(key)
    if entry is not None and fresh(entry) and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    if not compute:
        return None

    value = model_hash(path)

    with _cache_lock:
        files = _read_cache(cache_path)  # re-read: another process may have added entries meanwhile
        entry = files.get(key)
        if entry is None or not fresh(entry):
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        entry["sha256"] = value
        files[key] = entry
        _write_cache(cache_path, files)
    return value
