"""File hashes and their cache (sd15/hashing.py): A1111's "Model hash", legacy hash and LoRA addnet hash."""
import hashlib
import json
import os

import pytest

from sd15 import hashing as it
from sd15.hashing import cached_hash, legacy_model_hash, model_hash, short_hash


# =============================================================================================
# Hashes
# =============================================================================================

def write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_model_hash_matches_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 12345)
    path = write(tmp_path / "m.safetensors", data)
    full = hashlib.sha256(data).hexdigest()
    assert model_hash(path) == full and len(full) == 64
    assert short_hash(full) == full[:10] and short_hash(None) is None
    assert model_hash(write(tmp_path / "empty.ckpt", b"")) == hashlib.sha256(b"").hexdigest()


def test_legacy_hash(tmp_path):
    data = os.urandom(0x110000 + 4096)
    path = write(tmp_path / "big.ckpt", data)
    assert legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    short = write(tmp_path / "short.ckpt", os.urandom(1000))
    assert legacy_model_hash(short) == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"
    partial = os.urandom(0x100000 + 100)
    assert legacy_model_hash(write(tmp_path / "partial.ckpt", partial)) == \
        hashlib.sha256(partial[0x100000:]).hexdigest()[:8]
    assert legacy_model_hash(tmp_path / "missing.ckpt") == "NOFILE"


def test_addnet_hash(tmp_path):
    header = b'{"__metadata__":{"ss_output_name":"x"}}  '
    body = os.urandom(5000)
    data = len(header).to_bytes(8, "little") + header + body
    assert it.addnet_hash(write(tmp_path / "l.safetensors", data)) == hashlib.sha256(body).hexdigest()
    assert it.addnet_hash(write(tmp_path / "l.pt", data)) == hashlib.sha256(data).hexdigest()


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = it.model_hash

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(it, "model_hash", counting)
    return calls


def test_cache_reuses_value(tmp_path, counted):
    data = os.urandom(100000)
    path = write(tmp_path / "a.safetensors", data)
    expected = hashlib.sha256(data).hexdigest()
    assert cached_hash(path) == expected and len(counted) == 1
    assert cached_hash(path) == expected and len(counted) == 1
    cache = json.loads((tmp_path / it.HASH_CACHE_NAME).read_text())
    entry = cache["files"]["a.safetensors"]
    assert entry["sha256"] == expected and entry["size"] == 100000 and entry["mtime_ns"] == os.stat(path).st_mtime_ns
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert cached_hash(path, compute=False) == expected


def test_cache_invalidates_on_mtime_change(tmp_path, counted):
    path = write(tmp_path / "a.ckpt", b"x" * 1000)
    cached_hash(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert cached_hash(path) == hashlib.sha256(b"x" * 1000).hexdigest()
    assert len(counted) == 2
    cached_hash(path)
    assert len(counted) == 2


def test_cache_invalidates_on_size_change(tmp_path, counted):
    path = write(tmp_path / "a.ckpt", b"x" * 1000)
    cached_hash(path)
    st = os.stat(path)
    with open(path, "ab") as f:
        f.write(b"y")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, new size
    assert cached_hash(path) == hashlib.sha256(b"x" * 1000 + b"y").hexdigest()
    assert len(counted) == 2


@pytest.mark.parametrize("garbage", [b"{not json", b"", b"[]", b'{"format": 1, "files": []}', b"\xff\xfe\x00",
                                     b'{"format": 99, "files": {}}'])
def test_cache_survives_corrupt_file(tmp_path, counted, garbage):
    path = write(tmp_path / "a.ckpt", b"abc")
    (tmp_path / it.HASH_CACHE_NAME).write_bytes(garbage)
    assert cached_hash(path) == hashlib.sha256(b"abc").hexdigest()
    assert cached_hash(path) == hashlib.sha256(b"abc").hexdigest()
    assert len(counted) == 1  # the cache was rewritten valid
    assert json.loads((tmp_path / it.HASH_CACHE_NAME).read_text())["format"] == 1


def test_cache_several_files(tmp_path, counted):
    a = write(tmp_path / "a.safetensors", len(b"{}").to_bytes(8, "little") + b"{}" + b"body")
    b = write(tmp_path / "b.ckpt", b"other")
    ha, hb = cached_hash(a), cached_hash(b)
    assert cached_hash(a) == ha and cached_hash(b) == hb and len(counted) == 2
    files = json.loads((tmp_path / it.HASH_CACHE_NAME).read_text())["files"]
    assert set(files) == {"a.safetensors", "b.ckpt"} and "sha256" in files["a.safetensors"]
    assert cached_hash(b, compute=False) == hb
    assert cached_hash(write(tmp_path / "c.ckpt", b"new"), compute=False) is None


def test_cache_in_unwritable_place_still_hashes(tmp_path, counted, monkeypatch):
    path = write(tmp_path / "a.ckpt", b"abc")

    def refuse(*a, **k):
        raise PermissionError("read-only")

    monkeypatch.setattr(it.tempfile, "NamedTemporaryFile", refuse)
    assert cached_hash(path) == hashlib.sha256(b"abc").hexdigest()
    assert cached_hash(path) == hashlib.sha256(b"abc").hexdigest()
    assert len(counted) == 2 and not (tmp_path / it.HASH_CACHE_NAME).exists()
