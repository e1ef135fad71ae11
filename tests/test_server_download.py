"""First-run download of the default checkpoint, against a local http.server on 127.0.0.1 (with Range
support). Nothing here reaches the network."""
from __future__ import annotations

import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import synthetic
from server import download
from server.download import DEFAULT_MODEL, DownloadError

DATA = bytes(range(256)) * 4000  # ~1 MB, several read chunks
SHA = hashlib.sha256(DATA).hexdigest()


class Handler(BaseHTTPRequestHandler):
    """Serves `server.data`; honours `Range: bytes=N-` unless `server.ignore_range`; sends only
    `server.cut` bytes of the body when set (a dropped connection)."""

    def do_GET(self):
        srv = self.server
        srv.seen.append(self.headers.get("Range"))
        if self.path.endswith("-missing"):
            self.send_error(404)
            return
        data, start = srv.data, 0
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:srv.cut] if srv.cut is not None else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.data, srv.seen, srv.ignore_range, srv.cut = DATA, [], False, None
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/{DEFAULT_MODEL}"
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_verifies_and_renames(http_server, tmp_path):
    dest = str(tmp_path / "m" / DEFAULT_MODEL)
    assert download.download(http_server.url, dest, SHA, progress=False) == dest
    assert open(dest, "rb").read() == DATA
    assert os.listdir(tmp_path / "m") == [DEFAULT_MODEL]  # no .partial left
    assert http_server.seen == [None]


def test_resume_with_range(http_server, tmp_path):
    dest = str(tmp_path / DEFAULT_MODEL)
    with open(dest + ".partial", "wb") as f:
        f.write(DATA[:300_000])
    download.download(http_server.url, dest, SHA, progress=False)
    assert http_server.seen == ["bytes=300000-"]
    assert open(dest, "rb").read() == DATA and not os.path.exists(dest + ".partial")


def test_server_ignoring_range_restarts(http_server, tmp_path):
    http_server.ignore_range = True
    dest = str(tmp_path / DEFAULT_MODEL)
    with open(dest + ".partial", "wb") as f:
        f.write(b"garbage" * 1000)
    download.download(http_server.url, dest, SHA, progress=False)
    assert open(dest, "rb").read() == DATA


def test_complete_partial_gets_416_and_is_verified(http_server, tmp_path):
    dest = str(tmp_path / DEFAULT_MODEL)
    with open(dest + ".partial", "wb") as f:
        f.write(DATA)
    download.download(http_server.url, dest, SHA, progress=False)
    assert open(dest, "rb").read() == DATA


def test_dropped_connection_then_resume(http_server, tmp_path):
    dest = str(tmp_path / DEFAULT_MODEL)
    http_server.cut = 400_000
    with pytest.raises(DownloadError, match="run again to resume"):
        download.download(http_server.url, dest, SHA, progress=False)
    assert not os.path.exists(dest) and os.path.getsize(dest + ".partial") == 400_000
    http_server.cut = None
    download.download(http_server.url, dest, SHA, progress=False)
    assert http_server.seen[-1] == "bytes=400000-"
    assert open(dest, "rb").read() == DATA


def test_wrong_sha256_leaves_nothing(http_server, tmp_path):
    dest = str(tmp_path / DEFAULT_MODEL)
    with pytest.raises(DownloadError, match="expected 0000"):
        download.download(http_server.url, dest, "0" * 64, progress=False)
    assert os.listdir(tmp_path) == []


def test_no_network_says_what_to_download_and_where(tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = srv.server_address[1]
    srv.server_close()  # nothing listens there now
    dest = str(tmp_path / DEFAULT_MODEL)
    url = f"http://127.0.0.1:{port}/{DEFAULT_MODEL}"
    with pytest.raises(DownloadError) as e:
        download.download(url, dest, SHA, progress=False, timeout=5)
    msg = str(e.value)
    assert "\n" not in msg and url in msg and f"save it as {dest}" in msg and "SD15_MODEL_URL" in msg


def test_http_error(http_server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download.download(http_server.url + "-missing", str(tmp_path / DEFAULT_MODEL), SHA, progress=False)
    assert os.listdir(tmp_path) == []


def test_failed_download_creates_no_folder(http_server, tmp_path, monkeypatch):
    """A first run with --ckpt-dir elsewhere whose download fails leaves no empty folder (nor ./weights)."""
    monkeypatch.chdir(tmp_path)
    dest = tmp_path / "elsewhere" / "models" / DEFAULT_MODEL
    with pytest.raises(DownloadError, match="HTTP 404"):
        download.download(http_server.url + "-missing", str(dest), SHA, progress=False)
    assert os.listdir(tmp_path) == []


def test_env_overrides(monkeypatch):
    monkeypatch.delenv("SD15_MODEL_URL", raising=False)
    monkeypatch.delenv("SD15_MODEL_SHA256", raising=False)
    assert download.model_source() == (download.DEFAULT_URL, download.DEFAULT_SHA256)
    assert download.DEFAULT_URL.endswith("/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
                                         "v1-5-pruned-emaonly.safetensors")
    monkeypatch.setenv("SD15_MODEL_URL", "http://mirror/x.safetensors")
    monkeypatch.setenv("SD15_MODEL_SHA256", "AB" * 32)
    assert download.model_source() == ("http://mirror/x.safetensors", "ab" * 32)


def test_first_run_downloads_into_empty_folder(http_server, tmp_path, monkeypatch, capsys):
    """`python -m server` with an empty --ckpt-dir: downloads (from the mirror), then the file loads."""
    from server.__main__ import _parser, config_from_args, ensure_checkpoint
    from server.models import Library

    ckpt = synthetic.write_tiny_checkpoint(str(tmp_path / "src.safetensors"))
    http_server.data = open(ckpt, "rb").read()
    monkeypatch.setenv("SD15_MODEL_URL", http_server.url)
    monkeypatch.setenv("SD15_MODEL_SHA256", hashlib.sha256(http_server.data).hexdigest())
    folder = tmp_path / "weights"
    config = config_from_args(_parser().parse_args(["--ckpt-dir", str(folder)]))
    ensure_checkpoint(config, no_download=False)
    assert [c.name for c in Library(str(folder)).checkpoints] == [DEFAULT_MODEL]
    assert "downloading" in capsys.readouterr().err
    ensure_checkpoint(config, no_download=False)  # present now: nothing fetched
    assert len(http_server.seen) == 1


def test_no_download_flag(tmp_path, capsys):
    from server.__main__ import main

    assert main(["--ckpt-dir", str(tmp_path), "--no-download"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("sd15-server: error: no checkpoint in")
    assert download.DEFAULT_URL in err


def test_bad_checkpoint_file_is_one_line_and_exit_2(tmp_path, capsys):
    from server.__main__ import main

    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    assert main(["--ckpt-dir", str(tmp_path), "--no-download"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sd15-server: error: ") and "broken.safetensors" in err and "not a safetensors" in err
    assert main(["--ckpt-dir", str(tmp_path), "--ckpt", "missing.safetensors"]) == 2
    assert "missing.safetensors: no such checkpoint" in capsys.readouterr().err
    assert main(["--ckpt-dir", str(tmp_path), "--api-auth", "nocolon"]) == 2
