"""The model folders (`Library`: --ckpt-dir, --vae-dir, --lora-dir, --embeddings-dir in A1111's list
shapes) and the one loaded model (`ModelManager`, whose loading runs on the server's GPU worker). Checkpoint
titles carry A1111's short hash once the file was hashed (when first loaded; the hash is cached beside the
file). A name in a request is only ever compared with the listed files, never joined into a path, so it
cannot reach outside its folder.
"""
from __future__ import annotations

import collections
import gc
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

from sd15 import hashing
from sd15.embeddings import EmbeddingDatabase
from sd15.lora import Loras

log = logging.getLogger("server")

CHECKPOINT_EXTS = (".safetensors", ".ckpt")
VAE_EXTS = (".safetensors", ".pt", ".ckpt")
VAE_BESIDE = (".vae.safetensors", ".vae.pt", ".vae.ckpt")  # "<checkpoint stem>.vae.*": the Automatic VAE


def scan(folder: Optional[str], exts: tuple, skip_dirs=()) -> list[tuple[str, str]]:
    """(absolute path, name relative to `folder` with "/" separators) of the files with one of `exts`,
    recursively, sorted by name; hidden files and folders and `skip_dirs` are left out."""
    if not folder or not os.path.isdir(folder):
        return []
    root = os.path.abspath(folder)
    skip = {os.path.abspath(d) for d in skip_dirs if d}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and os.path.join(dirpath, d) not in skip]
        for fn in filenames:
            if not fn.startswith(".") and fn.lower().endswith(exts):
                path = os.path.join(dirpath, fn)
                out.append((path, os.path.relpath(path, root).replace(os.sep, "/")))
    return sorted(out, key=lambda pr: pr[1].lower())


@dataclass
class Checkpoint:
    path: str  # absolute
    name: str  # relative to the checkpoint folder, with extension: "v1-5-pruned-emaonly.safetensors"
    sha256: Optional[str] = None  # known once hashed (cached beside the file)
    legacy_hash: str = ""  # A1111's old 8-digit hash (64 KiB read; cheap)

    @property
    def stem(self) -> str:
        return os.path.splitext(os.path.basename(self.name))[0]

    @property
    def model_name(self) -> str:
        return os.path.splitext(self.name)[0].replace("/", "_").replace("\\", "_")

    @property
    def short_hash(self) -> Optional[str]:
        return hashing.short_hash(self.sha256)

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]" if self.sha256 else self.name

    def aliases(self) -> set[str]:
        """Every string `sd_model_checkpoint` may name this checkpoint by (A1111's table), plus the absolute
        `filename` that sd-models lists."""
        names = {self.title, self.name, self.stem, self.model_name, self.path, self.legacy_hash,
                 f"{self.name} [{self.legacy_hash}]"}
        if self.sha256:
            names |= {self.short_hash, self.sha256, f"{self.name} [{self.short_hash}]",
                      f"{self.stem} [{self.short_hash}]"}
        return names

    def api(self) -> dict:
        config = os.path.splitext(self.path)[0] + ".yaml"
        return {"title": self.title, "model_name": self.model_name, "hash": self.short_hash, "sha256": self.sha256,
                "filename": self.path, "config": config if os.path.isfile(config) else None}


def _checkpoint(path: str, name: str) -> Checkpoint:
    try:
        sha = hashing.cached_hash(path, compute=False)
    except OSError:
        sha = None
    return Checkpoint(path, name, sha, hashing.legacy_model_hash(path))


_TITLE = re.compile(r"^(.*) \[[0-9a-f]{8,10}\]$")


class Library:
    """Listings of the model folders; `refresh_*` rescan, replacing the lists whole (so other threads may read
    them meanwhile)."""

    def __init__(self, ckpt_dir: str, vae_dir: Optional[str] = None, lora_dir: Optional[str] = None,
                 embeddings_dir: Optional[str] = None, extra_checkpoint: Optional[str] = None):
        self.ckpt_dir, self.vae_dir, self.lora_dir, self.embeddings_dir = ckpt_dir, vae_dir, lora_dir, embeddings_dir
        self.extra_checkpoint = os.path.abspath(extra_checkpoint) if extra_checkpoint else None
        self.checkpoints: list[Checkpoint] = []
        self.vaes: list[tuple[str, str]] = []
        self.refresh_checkpoints()
        self.refresh_vae()

    def refresh_checkpoints(self) -> None:
        files = scan(self.ckpt_dir, CHECKPOINT_EXTS, skip_dirs=(self.vae_dir, self.lora_dir, self.embeddings_dir))
        found = [_checkpoint(p, n) for p, n in files if not n.lower().endswith(VAE_BESIDE)]
        if self.extra_checkpoint and os.path.isfile(self.extra_checkpoint) \
                and all(c.path != self.extra_checkpoint for c in found):  # --ckpt outside the folder
            found.append(_checkpoint(self.extra_checkpoint, os.path.basename(self.extra_checkpoint)))
        self.checkpoints = found

    def find_checkpoint(self, name: str) -> Optional[Checkpoint]:
        """The checkpoint `name` is an exact alias of (case- and separator-sensitive, as A1111), or None.
        A title whose hash no longer matches (the file was touched or replaced since) finds the file by its
        name, as the file is what the title names."""
        for c in self.checkpoints:
            if name in c.aliases():
                return c
        m = _TITLE.match(name or "")
        if m:
            for c in self.checkpoints:
                if m.group(1) in (c.name, c.stem, c.model_name):
                    return c
        return None

    def checkpoint_titles(self) -> list[str]:
        return [c.title for c in self.checkpoints]

    def refresh_vae(self) -> None:
        self.vaes = scan(self.vae_dir, VAE_EXTS)

    def find_vae(self, name: str) -> Optional[str]:
        """The path of the VAE listed as `name` (its `model_name`, the basename with extension; a relative
        name also works), or None."""
        for path, rel in self.vaes:
            if name in (os.path.basename(rel), rel):
                return path
        return None

    def vae_api(self) -> list[dict]:
        return [{"model_name": os.path.basename(rel), "filename": path} for path, rel in self.vaes]

    def vae_path(self, choice: str, checkpoint: Checkpoint) -> Optional[str]:
        """`sd_vae` -> the VAE file to load, or None for the checkpoint's own VAE. "Automatic" takes a
        "<checkpoint stem>.vae.*" file beside the checkpoint when there is one (as A1111 does)."""
        if choice == "None":
            return None
        if choice == "Automatic":
            base = os.path.splitext(checkpoint.path)[0]
            return next((base + ext for ext in VAE_BESIDE if os.path.isfile(base + ext)), None)
        path = self.find_vae(choice)
        if path is None:
            raise LookupError(self.vae_missing(choice))
        return path

    def vae_missing(self, choice: str) -> str:
        names = "".join(f", {v['model_name']}" for v in self.vae_api())
        return f"VAE '{choice}' not found; valid: Automatic, None{names}"

    def loras_api(self, model=None) -> list[dict]:
        loras = model.loras if model is not None else Loras(self.lora_dir)
        loras.refresh()
        return loras.list_api()

    def embeddings_api(self, model=None) -> dict:
        db = model.embeddings if model is not None else EmbeddingDatabase(self.embeddings_dir)
        db.refresh()
        return db.api_listing()


class ModelManager:
    """The loaded model and what it was loaded from. `load`/`ensure` run on the GPU worker thread."""

    def __init__(self, library: Library, device=None, dtype=None, *, optimize: bool = False):
        self.library, self.device, self.dtype, self.optimize = library, device, dtype, optimize
        self.model = None  # sd15.StableDiffusion
        self.checkpoint: Optional[Checkpoint] = None
        self.vae: Optional[str] = None  # the external VAE file in use, None for the checkpoint's own
        self.vae_sha256: Optional[str] = None  # its sha256, hashed when it was loaded
        self.loads = collections.Counter()  # "ok" / "failed" -> count (for /metrics)

    def load(self, checkpoint: Checkpoint, vae: Optional[str] = None) -> None:
        """Load `checkpoint` (+ an external VAE file). A bad header leaves the old model untouched; otherwise
        the old model is released first (two never share the memory) and read again should the new one fail.
        The model does not depend on its files afterwards: the hashes are kept, and on the CPU the weights
        are copied out of the memory-mapped file."""
        import sd15

        try:
            _check_header(checkpoint.path)
            if vae:
                _check_header(vae, vae=True)
        except Exception:
            self.loads["failed"] += 1
            raise
        previous = (self.checkpoint, self.vae) if self.model is not None else None
        self.unload()
        try:
            log.info("loading %s%s", checkpoint.name, f" with VAE {os.path.basename(vae)}" if vae else "")
            checkpoint.sha256 = hashing.cached_hash(checkpoint.path)  # hashed once, then cached beside the file
            self.vae_sha256 = hashing.cached_hash(vae) if vae else None
            self.model = sd15.load(checkpoint.path, vae=vae, device=self.device, dtype=self.dtype,
                                   lora_dir=self.library.lora_dir, embeddings_dir=self.library.embeddings_dir)
            if self.model.device.type == "cpu":
                self.model.alphas_cumprod = self.model.alphas_cumprod.clone()
                _own_memory(self.model.unet, self.model.vae, self.model.text_encoder)
            if self.optimize and self.model.device.type == "cuda":
                from sd15 import fast

                fast.optimize(self.model)
                fast.warmup(self.model, sizes=[(512, 512)], batch_sizes=[1])
        except BaseException:
            self.loads["failed"] += 1
            self.unload()
            if previous is not None and previous[0].path != checkpoint.path:
                try:
                    self.load(*previous)
                except Exception as e:
                    log.error("could not reload %s either: %s", previous[0].path, e)
            raise
        self.loads["ok"] += 1
        self.checkpoint, self.vae = checkpoint, vae

    def infotext_hashes(self) -> dict:
        """`model_hash` / `vae_hash` for `generate()`: the checkpoint's and the external VAE's short hashes, both
        kept since loading (a file moved or deleted since does not matter)."""
        return dict(model_hash=self.checkpoint.short_hash if self.checkpoint else None,
                    vae_hash=hashing.short_hash(self.vae_sha256) if self.vae and self.vae_sha256 else None)

    def ensure(self, checkpoint: Checkpoint, vae: Optional[str]) -> None:
        """Make `checkpoint` with `vae` the loaded model, loading only what differs: a VAE alone is swapped
        for the external file, or (None) the checkpoint's own VAE read again from it."""
        if self.model is None or self.checkpoint.path != checkpoint.path:
            self.load(checkpoint, vae)
            return
        if vae == self.vae:
            return
        _check_header(vae or self.checkpoint.path, vae=True)
        vae_sha256 = hashing.cached_hash(vae) if vae else None
        self.model.load_vae(vae or self.checkpoint.path)
        self.model.vae_path = vae  # the checkpoint's own VAE is not an "external VAE" in infotexts
        if self.model.device.type == "cpu":
            _own_memory(self.model.vae)
        self.vae, self.vae_sha256 = vae, vae_sha256

    def unload(self) -> None:
        import torch

        self.model, self.checkpoint, self.vae, self.vae_sha256 = None, None, None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _check_header(path: str, vae: bool = False) -> None:
    """Read a checkpoint's (or VAE's) tensor list and check its layout, without loading the weights."""
    from sd15 import checkpoint as ck

    entries = ck.open_checkpoint(path)
    if vae:
        if not ck.vae_entries(entries):
            raise ck.CheckpointError(f"{path}: no VAE weights")
    else:
        ck.split_components(ck.fix_old_clip_prefix(entries), path)


def _own_memory(*modules) -> None:
    """Copy every weight into memory of its own (sd15.load maps the file and uses it in place on the CPU;
    a file changed or truncated under a running server would then change or crash the model)."""
    import torch

    with torch.no_grad():
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                t.data = t.data.clone()
