"""Textual-inversion embeddings, as A1111 users have them: every `.pt`, `.bin` or `.safetensors` file under
the embeddings folder (recursively), the trigger word being its file stem. Formats: A1111's `string_to_param`
(also as an old ParameterDict), kohya's `emb_params`, or any file of exactly one `[n, width]` / `[width]`
tensor; SDXL `clip_l` + `clip_g` pairs and embeddings of another width are listed as skipped. Pickles are
opened weights-only. In a prompt a name becomes n placeholder tokens (`sd15.a1111.prompt.chunk_tokens`), which
the `hooks()` embed_fn overwrites with the vectors before the position embeddings are added.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from sd15.checkpoint import open_safetensors
from sd15.hashing import model_hash

log = logging.getLogger(__name__)

EMBEDDING_EXTENSIONS = (".pt", ".bin", ".safetensors")
MAX_VECTORS = 75  # more than one chunk's worth cannot be placed in a 77-token window


class EmbeddingError(ValueError):
    """An embedding file that cannot be read, with a one-line reason."""


def _outside(path: str, real: str, root: str) -> bool:
    if os.path.commonpath([root, real]) == root:
        return False
    log.warning("skipping %s: it links outside %s", path, root)
    return True


def scan_folder(directory, extensions) -> list[tuple[str, str, os.stat_result]]:
    """[(stem, real path, stat)] of the non-empty files under `directory` (recursively, sorted) with one of
    `extensions` (any case). Hidden files and folders, and links that resolve outside the folder, are left
    out, so nothing outside `directory` is ever opened. Shared with `sd15.lora`."""
    if not directory:
        return []
    root = os.path.realpath(directory)
    exts = tuple(e.lower() for e in extensions)
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real_dir = os.path.realpath(dirpath)
        if real_dir in seen or _outside(dirpath, real_dir, root):  # each real folder once: links may loop
            dirnames[:] = []
            continue
        seen.add(real_dir)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            link = os.path.join(dirpath, fn)
            path = os.path.realpath(link)
            if fn.startswith(".") or not fn.lower().endswith(exts) or _outside(link, path, root):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                out.append((os.path.splitext(fn)[0], path, st))
    return out


@dataclass(eq=False)
class Embedding:
    """One textual-inversion embedding: name (the trigger word), vectors float32 [n, width] (None for SDXL
    pairs), shape (the width A1111 reports), and `reason` when it is skipped."""
    name: str
    path: str
    vectors: Optional[torch.Tensor]
    shape: int
    n_vectors: int
    step: Optional[int] = None
    sd_checkpoint: Optional[str] = None
    sd_checkpoint_name: Optional[str] = None
    reason: Optional[str] = None
    _hash: Optional[str] = None

    def api_item(self) -> dict:
        """The `/sdapi/v1/embeddings` item."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint, "sd_checkpoint_name": self.sd_checkpoint_name,
                "shape": self.shape, "vectors": self.n_vectors}

    def shorthash(self) -> Optional[str]:
        """First 12 hex digits of the file's SHA-256 (infotext "TI hashes"), computed once per file."""
        if self._hash is None:
            try:
                self._hash = model_hash(self.path)[:12]
            except OSError:
                return None
        return self._hash


def load_embedding_file(path, name: Optional[str] = None, *, expected_width: Optional[int] = None) -> Embedding:
    """Read one embedding file (name defaults to the file stem); `reason` is set when it is unusable on a text
    encoder of width `expected_width`. Raises ValueError (EmbeddingError, CheckpointError) when unreadable."""
    path = os.fspath(path)
    name = name if name is not None else os.path.splitext(os.path.basename(path))[0]
    if path.lower().endswith(".safetensors"):
        data = {k: e.read() for k, e in open_safetensors(path).items()}
    else:
        try:
            with torch.serialization.safe_globals([torch.nn.ParameterDict]):  # old TI files; no code is run
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the weights-only unpickler raises several types for hostile or broken files
            first = (str(e).strip().splitlines() or [""])[0]
            raise EmbeddingError(f"not a loadable file ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"holds a {type(data).__name__}, not a dict")

    meta = {}
    if "string_to_param" in data:  # A1111 / original textual_inversion
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # torch.nn.ParameterDict of old files
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError("string_to_param must hold exactly one tensor")
        vec = next(iter(params.values()))
        meta = {k: data[k] for k in ("sd_checkpoint", "sd_checkpoint_name") if isinstance(data.get(k), str)}
        if type(data.get("step")) is int:  # as A1111 saves it (the listing shows it as it is)
            meta["step"] = data["step"]
    elif "clip_l" in data and "clip_g" in data:  # SDXL pair: listed, never usable on SD 1.x
        l, g = data["clip_l"], data["clip_g"]
        if not (isinstance(l, torch.Tensor) and isinstance(g, torch.Tensor)):
            raise EmbeddingError("clip_l / clip_g are not tensors")
        width = int(l.shape[-1]) + int(g.shape[-1])
        n = int(l.shape[0]) if l.dim() == 2 else 1
        return Embedding(name, path, None, width, n, reason=f"SDXL embedding (width {width}); not usable on SD 1.x")
    else:  # emb_params, diffusers {token: tensor}: exactly one tensor
        if len(data) != 1:
            raise EmbeddingError("neither a textual-inversion embedding (string_to_param) nor a file with exactly "
                                 f"one tensor (it has {len(data)} entries)")
        vec = next(iter(data.values()))
    if not isinstance(vec, torch.Tensor) or not vec.is_floating_point():
        raise EmbeddingError("the embedding is not a floating-point tensor")
    vec = vec.detach()
    if vec.dim() == 1:
        vec = vec[None]
    if vec.dim() != 2 or vec.shape[0] == 0:
        raise EmbeddingError(f"unexpected embedding shape {list(vec.shape)} (expected [n_vectors, width])")
    vec = vec.to(torch.float32).contiguous()
    emb = Embedding(name, path, vec, int(vec.shape[1]), int(vec.shape[0]), **meta)
    if expected_width is not None and emb.shape != expected_width:
        emb.reason = f"width {emb.shape} does not match the text encoder's {expected_width}"
    elif emb.n_vectors > MAX_VECTORS:
        emb.reason = f"{emb.n_vectors} vectors do not fit in one {MAX_VECTORS}-token chunk"
    return emb


class EmbeddingDatabase:
    """The embeddings of one folder for a text encoder of width `expected_width` (768 for SD 1.x).

    `loaded` / `skipped` map names to Embedding (skipped ones carry `reason`), `errors` names of unreadable
    files to a reason. The folder is scanned on first use, by `refresh()`, and, as A1111 does, at the start of
    each job when its files changed (`refresh_if_changed()`).
    """

    def __init__(self, directory=None, expected_width: Optional[int] = 768):
        self.directory = directory
        self.expected_width = expected_width
        self.loaded: dict[str, Embedding] = {}
        self.skipped: dict[str, Embedding] = {}
        self.errors: dict[str, str] = {}
        self._signature = None  # None: never scanned
        self._finder = (None, None)  # (tokenizer, finder for it)
        self._lock = threading.RLock()

    def refresh(self, files=None) -> None:
        """Rescan the folder (or take the scan `files`) and reload every file."""
        with self._lock:
            files = scan_folder(self.directory, EMBEDDING_EXTENSIONS) if files is None else files
            loaded, skipped, errors = {}, {}, {}
            for name, path, _ in files:
                if name in loaded or name in skipped:
                    log.warning("embedding %s: %s has the same name as an earlier file; ignored", name, path)
                    continue
                try:
                    emb = load_embedding_file(path, name, expected_width=self.expected_width)
                except (ValueError, OSError) as e:
                    log.warning("embedding %s (%s) not loaded: %s", name, path, e)
                    errors[name] = str(e)
                    continue
                (skipped if emb.reason else loaded)[name] = emb
            self.loaded, self.skipped, self.errors = loaded, skipped, errors
            self._signature = [(path, st.st_mtime_ns, st.st_size) for _, path, st in files]
            self._finder = (None, None)

    def refresh_if_changed(self) -> bool:
        """Rescan when files were added, removed or changed since the last scan; True when it rescanned."""
        with self._lock:
            files = scan_folder(self.directory, EMBEDDING_EXTENSIONS)
            if [(path, st.st_mtime_ns, st.st_size) for _, path, st in files] == self._signature:
                return False
            self.refresh(files)
            return True

    def _ensure(self) -> None:
        if self._signature is None:
            self.refresh()

    def api_listing(self) -> dict:
        """`GET /sdapi/v1/embeddings`: {"loaded": {name: item}, "skipped": {name: item}}."""
        self._ensure()
        return {"loaded": {n: e.api_item() for n, e in self.loaded.items()},
                "skipped": {n: e.api_item() for n, e in self.skipped.items()}}

    def finder(self, tokenizer):
        """The `chunk_tokens(embeddings=...)` lookup of the loaded embeddings' names tokenised by `tokenizer`
        (None when nothing is loaded)."""
        from sd15.a1111.prompt import make_embedding_finder

        self._ensure()
        with self._lock:
            if self._finder[0] is not tokenizer:
                entries = [(tokenizer.encode(name), emb, emb.n_vectors) for name, emb in self.loaded.items()]
                self._finder = (tokenizer, make_embedding_finder(entries) if entries else None)
            return self._finder[1]

    def hooks(self, model, used: dict):
        """(finder, embed_fn) for `sd15.a1111.conditioning.encode_texts`, (None, None) when nothing is loaded.

        The finder records every match in `used` (the job's dict, name -> Embedding); embed_fn(tokens (N, 77),
        chunks) returns the token vectors with each `Chunk.fixes` entry (offset, Embedding) written at
        positions offset+1 .. offset+n, or None when no chunk has any (the plain path, bit for bit).
        """
        base = self.finder(model.tokenizer)
        if base is None:
            return None, None

        def find(tokens, position):
            hit = base(tokens, position)
            if hit is not None:
                used.setdefault(hit[0].name, hit[0])
            return hit

        def embed_fn(tokens: torch.Tensor, chunks) -> Optional[torch.Tensor]:
            if not any(c.fixes for c in chunks):
                return None
            x = model.text_encoder.embeddings.token_embedding(tokens)  # (N, 77, C)
            for i, chunk in enumerate(chunks):
                for offset, emb in chunk.fixes:
                    n = min(emb.vectors.shape[0], x.shape[1] - 1 - offset)
                    if n > 0:
                        x[i, offset + 1:offset + 1 + n] = emb.vectors[:n].to(device=x.device, dtype=x.dtype)
            return x

        return find, embed_fn

    @staticmethod
    def infotext_hashes(used: dict) -> Optional[str]:
        """The "TI hashes" value for the embeddings a job matched (`used`, name -> Embedding; None when none)."""
        from sd15.a1111.infotext import format_hashes

        pairs = [(name, h) for name, emb in used.items() if (h := emb.shorthash())]
        return format_hashes(pairs) if pairs else None
