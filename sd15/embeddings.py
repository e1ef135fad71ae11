"""Textual-inversion embeddings, as A1111 users have them.

A folder of embedding files is scanned recursively; the **trigger word is the file name without its
extension** (any name stored inside the file is ignored). Formats read:

* A1111 / original TI `.pt` (or `.bin`): a dict with `string_to_param` = `{"*": Tensor[n, 768]}` (also as an
  old `torch.nn.ParameterDict`), plus optional `step`, `sd_checkpoint`, `sd_checkpoint_name`;
* `.safetensors` (kohya `emb_params`) or any file holding exactly one tensor `[n, 768]` or `[768]`;
* diffusers `.bin` (`{"<token>": Tensor[768]}`), the token string being ignored;
* SDXL files (`clip_l` + `clip_g`) are recognised and listed as skipped (width 2048).

Pickled files are opened with `torch.load(weights_only=True)` only, so a file with code in it is refused.
An embedding whose width is not the text encoder's (768 for SD 1.x) is listed under "skipped" with a reason.
Image-embedded embeddings (.png/.webp) are not read.

How the prompt uses them: `EmbeddingDatabase.hooks(model, used)` gives the finder for
`sd15.a1111.prompt.chunk_tokens(embeddings=...)` (names tokenised, longest match first; a match becomes n
placeholder ids 0 that count toward the 75-token chunk and never straddle two chunks) and an `embed_fn` for
`sd15.a1111.conditioning.encode_texts` that overwrites the token vectors at positions offset+1 .. offset+n of the
77-token window (after BOS) before the position embeddings are added. `sd15.a1111.conditioning.encode_texts` uses
`model.embeddings` by itself; `sd15.load(..., embeddings_dir=...)` sets it up.

For the server (`/sdapi/v1/embeddings`, `/sdapi/v1/refresh-embeddings`):

    db = model.embeddings            # an EmbeddingDatabase
    db.refresh()                     # rescan now
    db.api_listing()                 # {"loaded": {name: item}, "skipped": {name: item}}
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

__all__ = ["EMBEDDING_EXTENSIONS", "Embedding", "EmbeddingError", "EmbeddingDatabase", "load_embedding_file",
           "scan_folder", "is_safe_name"]

EMBEDDING_EXTENSIONS = (".pt", ".bin", ".safetensors")
MAX_VECTORS = 75  # more than one chunk's worth cannot be placed in a 77-token window


class EmbeddingError(ValueError):
    """An embedding file that cannot be read, with a one-line reason."""


# ------------------------------------------------------------------------------------------------
# Folders (shared with sd15.lora)
# ------------------------------------------------------------------------------------------------

def is_safe_name(name: str) -> bool:
    """A network/embedding name as used in prompts: no path separators, no "..", no NUL, not empty."""
    return bool(name) and not any(c in name for c in "/\\\0") and name not in (".", "..")


def scan_folder(directory, extensions) -> list[tuple[str, str]]:
    """[(stem, absolute real path)] of the files under `directory` (recursively, sorted) whose extension is
    in `extensions` (case-insensitive). Files and folders that resolve (through links) outside the folder,
    empty files and hidden files are left out, so nothing outside `directory` is ever opened."""
    if not directory:
        return []
    root = os.path.realpath(os.fspath(directory))
    if not os.path.isdir(root):
        return []
    exts = tuple(e.lower() for e in extensions)
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real_dir = os.path.realpath(dirpath)
        if real_dir != root and not real_dir.startswith(root + os.sep):
            dirnames[:] = []
            log.warning("skipping %s: it links outside %s", dirpath, root)
            continue
        if real_dir in seen:  # a link back into the folder: each real folder once
            dirnames[:] = []
            continue
        seen.add(real_dir)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith(".") or not fn.lower().endswith(exts):
                continue
            path = os.path.realpath(os.path.join(dirpath, fn))
            if not path.startswith(root + os.sep):
                log.warning("skipping %s: it links outside %s", os.path.join(dirpath, fn), root)
                continue
            try:
                if not os.path.isfile(path) or os.path.getsize(path) == 0:
                    continue
            except OSError:
                continue
            out.append((os.path.splitext(fn)[0], path))
    return out


def _signature(files: list[tuple[str, str]]) -> tuple:
    sig = []
    for name, path in files:
        try:
            st = os.stat(path)
            sig.append((path, st.st_mtime_ns, st.st_size))
        except OSError:
            sig.append((path, None, None))
    return tuple(sig)


# ------------------------------------------------------------------------------------------------
# One embedding
# ------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Embedding:
    """One textual-inversion embedding.

    name: the trigger word (file stem). vectors: float32 [n, width] (None for SDXL pairs). shape: the
    width A1111 reports (2048 for an SDXL clip_l + clip_g pair). reason: why it is skipped (None: loaded).
    """
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
            from sd15.hashing import model_hash

            try:
                self._hash = model_hash(self.path)[:12]
            except OSError:
                return None
        return self._hash


def _torch_load(path: str):
    try:
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):  # old TI files; no code is run
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler raises several types for hostile or broken files
        first = (str(e).strip().splitlines() or [""])[0]
        raise EmbeddingError(f"not a loadable file ({type(e).__name__}: {first[:200]})") from None


def _read_safetensors(path: str) -> dict:
    from sd15.checkpoint import CheckpointError, open_safetensors

    try:
        return {k: e.read() for k, e in open_safetensors(path).items()}
    except CheckpointError as e:
        raise EmbeddingError(str(e)) from None


def _as_int(v) -> Optional[int]:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _as_str(v) -> Optional[str]:
    return v if isinstance(v, str) else None


def load_embedding_file(path, name: Optional[str] = None, *, expected_width: Optional[int] = None) -> Embedding:
    """Read one embedding file -> Embedding (name defaults to the file stem). `reason` is set when it is
    unusable on a text encoder of width `expected_width`. Raises EmbeddingError for files it cannot read."""
    path = os.fspath(path)
    name = name if name is not None else os.path.splitext(os.path.basename(path))[0]
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        data = _read_safetensors(path)
    elif ext in (".pt", ".bin"):
        data = _torch_load(path)
    else:
        raise EmbeddingError(f"unsupported embedding file type {ext!r}")
    if not isinstance(data, dict):
        raise EmbeddingError(f"holds a {type(data).__name__}, not a dict")

    meta: dict[str, Any] = {}
    if "string_to_param" in data:  # A1111 / original textual_inversion
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # torch.nn.ParameterDict of old files
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError("string_to_param must hold exactly one tensor")
        vec = next(iter(params.values()))
        meta = dict(step=_as_int(data.get("step")), sd_checkpoint=_as_str(data.get("sd_checkpoint")),
                    sd_checkpoint_name=_as_str(data.get("sd_checkpoint_name")))
    elif "clip_l" in data and "clip_g" in data:  # SDXL pair: listed, never usable on SD 1.x
        l, g = data["clip_l"], data["clip_g"]
        if not (isinstance(l, torch.Tensor) and isinstance(g, torch.Tensor)):
            raise EmbeddingError("clip_l / clip_g are not tensors")
        width = int(l.shape[-1]) + int(g.shape[-1])
        n = int(l.shape[0]) if l.dim() == 2 else 1
        return Embedding(name, path, None, width, n, reason=f"SDXL embedding (width {width}); not usable on SD 1.x")
    else:  # emb_params, diffusers {token: tensor}: exactly one tensor
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(data) != 1 or len(tensors) != 1:
            raise EmbeddingError("neither a textual-inversion embedding (string_to_param) nor a file with exactly "
                                 f"one tensor (it has {len(data)} entries)")
        vec = tensors[0]
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


# ------------------------------------------------------------------------------------------------
# The folder
# ------------------------------------------------------------------------------------------------

class EmbeddingDatabase:
    """The embeddings of one folder for a text encoder of width `expected_width` (768 for SD 1.x).

    `loaded` / `skipped` map names to Embedding (skipped ones carry `reason`); `errors` maps names of
    unreadable files to a reason. The folder is scanned on first use, by `refresh()`, and at the start of
    each job when its files changed (`refresh_if_changed()`, as A1111 does). The embeddings a job's prompts
    matched are recorded by the job (`sd15.pipeline.NetworkJob`), not here.
    """

    def __init__(self, directory=None, expected_width: Optional[int] = 768):
        self.directory = os.fspath(directory) if directory is not None else None
        self.expected_width = expected_width
        self.loaded: dict[str, Embedding] = {}
        self.skipped: dict[str, Embedding] = {}
        self.errors: dict[str, str] = {}
        self._signature = None
        self._scanned = False
        self._lock = threading.RLock()
        self._finders: dict = {}

    # -- scanning
    def refresh(self) -> None:
        """Rescan the folder and reload every file."""
        with self._lock:
            files = scan_folder(self.directory, EMBEDDING_EXTENSIONS)
            loaded, skipped, errors = {}, {}, {}
            for name, path in files:
                if name in loaded or name in skipped:
                    log.warning("embedding %s: %s has the same name as an earlier file; ignored", name, path)
                    continue
                try:
                    emb = load_embedding_file(path, name, expected_width=self.expected_width)
                except (EmbeddingError, OSError) as e:
                    log.warning("embedding %s (%s) not loaded: %s", name, path, e)
                    errors[name] = str(e)
                    continue
                (skipped if emb.reason else loaded)[name] = emb
            self.loaded, self.skipped, self.errors = loaded, skipped, errors
            self._signature = _signature(files)
            self._scanned = True
            self._finders = {}

    def refresh_if_changed(self) -> bool:
        """Rescan when files were added, removed or changed since the last scan; True when it rescanned."""
        with self._lock:
            if self._scanned and _signature(scan_folder(self.directory, EMBEDDING_EXTENSIONS)) == self._signature:
                return False
            self.refresh()
            return True

    def _ensure(self) -> None:
        if not self._scanned:
            self.refresh()

    # -- lookups and listings
    def get(self, name: str) -> Optional[Embedding]:
        self._ensure()
        return self.loaded.get(name)

    def api_listing(self) -> dict:
        """`GET /sdapi/v1/embeddings`: {"loaded": {name: item}, "skipped": {name: item}} with items
        {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}."""
        self._ensure()
        return {"loaded": {n: e.api_item() for n, e in self.loaded.items()},
                "skipped": {n: e.api_item() for n, e in self.skipped.items()}}

    # -- prompts
    def finder(self, tokenizer):
        """The `chunk_tokens(embeddings=...)` lookup for the loaded embeddings (names tokenised by `tokenizer`)."""
        from sd15.a1111.prompt import make_embedding_finder

        self._ensure()
        with self._lock:
            key = id(tokenizer)
            hit = self._finders.get(key)
            if hit is None or hit[0] is not tokenizer:
                entries = [(tokenizer.encode(name), emb, emb.n_vectors) for name, emb in self.loaded.items()]
                hit = (tokenizer, make_embedding_finder(entries) if entries else None)
                self._finders[key] = hit
            return hit[1]

    def hooks(self, model, used: dict):
        """(finder, embed_fn) for `sd15.a1111.conditioning.encode_texts`; (None, None) when nothing is loaded.

        The finder records every match in `used` (the job's dict); embed_fn(tokens (N, 77), chunks) returns the token
        vectors with the embeddings placed at their `Chunk.fixes`, or None when no chunk has any.
        """
        base = self.finder(model.tokenizer)
        if base is None:
            return None, None

        def find(tokens, position):
            hit = base(tokens, position)
            if hit is not None:
                used.setdefault(hit[0].name, hit[0])
            return hit

        return find, make_embed_fn(model.text_encoder)

    @staticmethod
    def infotext_hashes(used: dict) -> Optional[str]:
        """The "TI hashes" value for the embeddings a job matched (`used`, name -> Embedding; None when none)."""
        from sd15.a1111.infotext import format_hashes

        pairs = [(name, emb.shorthash()) for name, emb in used.items()]
        pairs = [(n, h) for n, h in pairs if h]
        return format_hashes(pairs) if pairs else None


def make_embed_fn(text_encoder):
    """embed_fn(tokens, chunks) for `encode_texts`: the token-embedding lookup with every `Chunk.fixes`
    entry (offset, Embedding) written at positions offset+1 .. offset+n (cast to the embedding dtype)."""

    def embed_fn(tokens: torch.Tensor, chunks) -> Optional[torch.Tensor]:
        if not any(c.fixes for c in chunks):
            return None  # the plain path, bit for bit
        x = text_encoder.embeddings.token_embedding(tokens)  # (N, 77, C)
        length = x.shape[1]
        for i, chunk in enumerate(chunks):
            for offset, emb in chunk.fixes:
                n = min(emb.vectors.shape[0], length - 1 - offset)
                if n > 0:
                    x[i, offset + 1:offset + 1 + n] = emb.vectors[:n].to(device=x.device, dtype=x.dtype)
        return x

    return embed_fn
