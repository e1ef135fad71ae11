"""Reading SD 1.x checkpoints: `.safetensors` directly, `.ckpt`/`.pt` through torch's weights-only unpickler.

The checkpoint's keys, minus one prefix per component, are the models' own parameter names, so nothing here
knows the models' internals: it opens a file lazily (names, shapes and dtypes first, data on request), fixes
the known real-world quirks, drops the known non-weight extras and refuses anything else.

A `.safetensors` file is memory-mapped privately (a LoRA merge into a weight never reaches the file) and every
aligned tensor is a view into the mapping, so a CPU fp32 load copies nothing. Replace checkpoint files by
renaming, never by rewriting them in place while a model loaded from them is in use.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}

# Keys that are in real files but are not weights of the three networks. Anything else left over is an error.
KNOWN_EXTRA = re.compile(
    r"(model_ema\..*"                          # EMA bookkeeping (decay, num_updates, full EMA copies)
    r"|lvlb_weights|logvar"                    # training-only buffers some files carry
    r"|betas|\w*alphas_cumprod(_prev)?|posterior_\w+"  # LDM's DDPM schedule buffers (see alphas_cumprod_from)
    r"|first_stage_model\.loss\..*"            # the VAE's training loss (LPIPS, discriminator)
    r"|loss\..*"                               # the same in standalone VAE files
    r"|cond_stage_model\.transformer\.text_model\.embeddings\.position_ids)$"  # arange(77); computed instead
)

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with a message that says why."""


@dataclass
class Entry:
    """One tensor of a checkpoint: its shape and dtype now, its data when `read()` is called."""
    shape: torch.Size
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]


def read_header(path: str) -> tuple[dict, int]:
    """A safetensors file's JSON header (a dict) and the offset where its data starts."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100 << 20):
            raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, 8 + n


def open_safetensors(path: str) -> dict[str, Entry]:
    header, base = read_header(path)
    header.pop("__metadata__", None)
    size = os.path.getsize(path)
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)  # maps; reads nothing yet
    entries = {}
    for key, info in header.items():
        try:
            dtype = ST_DTYPES[info["dtype"]]
            shape = torch.Size(info["shape"])
            start, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed safetensors header entry for {key!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - start != nbytes or start < 0:
            raise CheckpointError(f"{path}: tensor {key!r} has {end - start} bytes for shape {list(shape)}")
        if base + end > size:
            raise CheckpointError(f"{path}: file is truncated ({size:,} bytes; tensor {key!r} ends at "
                                  f"{base + end:,}); download it again")
        entries[key] = Entry(shape, dtype, _reader(storage, base + start, nbytes, dtype, shape))
    return entries


def _reader(storage, offset, nbytes, dtype, shape):
    def read() -> torch.Tensor:
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, (nbytes,))  # a view of the mapping
        if offset % dtype.itemsize:  # unaligned (old writers did not pad the header): an aligned copy
            raw = raw.clone()
        return raw.view(dtype).reshape(shape)
    return read


def open_checkpoint(path) -> dict[str, Entry]:
    """{key: Entry} of a safetensors file, or of a `.ckpt`/`.pt`/`.pth` through torch's weights-only unpickler
    (no pickled code runs)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:2] != b"\x80\x02":  # neither zip (torch.save) nor legacy pickle
        return open_safetensors(path)
    try:  # only zip files can be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=magic == b"PK\x03\x04")
    except Exception as e:  # the unpickler raises several types for hostile or broken files
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {first})") from None
    wrappers = ("params_ema", "params", "state_dict")  # Real-ESRGAN / BasicSR releases, old Lightning files
    if isinstance(obj, dict):
        obj = next((obj[w] for w in wrappers if isinstance(obj.get(w), dict)), obj)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(obj).__name__}, not a dict of tensors)")
    return {k: Entry(v.shape, v.dtype, (lambda v=v: v)) for k, v in obj.items() if isinstance(v, torch.Tensor)}


# --- known real-world quirks, one function each --------------------------------------------------

def fix_old_clip_prefix(entries: dict) -> dict:
    """transformers < 4.31 era files store `cond_stage_model.transformer.encoder...` without `text_model.`."""
    old, new = "cond_stage_model.transformer.", PREFIXES["text_encoder"]
    return {(new + k[len(old):] if k.startswith(old) and not k.startswith(new) else k): v for k, v in entries.items()}


def split_components(entries: dict, path: str = "") -> tuple[dict, dict]:
    """-> ({"unet": {...}, "vae": {...}, "text_encoder": {...}} with prefixes removed, {extra key: entry})."""
    parts = {name: {} for name in PREFIXES}
    extras, unknown = {}, []
    for key, entry in entries.items():
        for name, prefix in PREFIXES.items():
            if key.startswith(prefix) and not KNOWN_EXTRA.match(key):
                parts[name][key[len(prefix):]] = entry
                break
        else:
            if KNOWN_EXTRA.match(key):
                extras[key] = entry
            else:
                unknown.append(key)
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensors {_first(unknown)}; is this an SD 1.x checkpoint?")
    empty = [name for name, part in parts.items() if not part]
    if empty:
        raise CheckpointError(f"{path}: no {' / '.join(empty)} weights (expected keys starting with "
                              f"{', '.join(PREFIXES[n] for n in empty)}); is this an SD 1.x checkpoint?")
    return parts, extras


def vae_entries(entries: dict) -> dict:
    """A standalone VAE file (no prefix) or a full checkpoint's `first_stage_model.*`, minus EMA and loss keys."""
    prefix = PREFIXES["vae"]
    if any(k.startswith(prefix) for k in entries):
        entries = {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)}
    return {k: v for k, v in entries.items() if not KNOWN_EXTRA.match(k)}


def load_module(module_cls, cfg_cls, entries: dict, *, device, dtype, path: str = "", what: str = ""):
    """`module_cls(cfg)` with the file's tensors, `cfg` read off their shapes (`cfg_cls.from_state_dict`)."""
    try:
        cfg = cfg_cls.from_state_dict(entries)
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: the {what} weights are incomplete (cannot read the architecture: "
                              f"missing {e})") from None
    return assign_strict(module_cls, entries, cfg, device=device, dtype=dtype, what=what, path=path)


def assign_strict(module_cls, state: dict, *args, device="cpu", dtype=torch.float32, what: str = "",
                  path: str = ""):
    """`module_cls(*args)`, built on the meta device (no random init, no copies), with the tensors of `state`
    (tensors, or `Entry`s read one at a time) assigned on `device`, floats in `dtype`, once their names and
    shapes are exactly the module's (else CheckpointError) -> the module in eval mode without grads."""
    with torch.device("meta"):
        module = module_cls(*args)
    _check_state(module, {k: v.shape for k, v in state.items()}, what or module_cls.__name__, path)
    tensors = {}
    for k, v in state.items():
        t = v.read() if isinstance(v, Entry) else v
        tensors[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_network_file(path, build: Callable, what: str, device, dtype, error: type = ValueError):
    """`build(the file's state dict)` (weights only) on `device` in `dtype`. Any failure raises `error` with
    one line naming the file: "NAME: what: reason"."""
    path = Path(path)
    try:
        net = build({k: entry.read() for k, entry in open_checkpoint(path).items()})
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(f"{path.name}: {what}: {msg}") from e
    return net.to(device=device, dtype=dtype)


def _check_state(module, shapes: dict, what: str, path: str = "") -> None:
    """CheckpointError naming the first missing, unexpected or wrongly shaped weights (`shapes`: name ->
    shape)."""
    want = {k: p.shape for k, p in module.state_dict().items()}
    wrong = [f"{k} {list(shapes[k])} (expected {list(s)})" for k, s in want.items() if shapes.get(k, s) != s]
    where = f"{path}: " if path else ""
    missing, unexpected = want.keys() - shapes.keys(), shapes.keys() - want.keys()
    for problem, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)):
        if keys:
            raise CheckpointError(f"{where}{len(keys)} {problem} {what} weights: {_first(keys)}")


def alphas_cumprod_from(extras: dict) -> torch.Tensor:
    """The file's `alphas_cumprod` (float32, as A1111 uses it), else SD 1.x's DDPM schedule ("scaled linear":
    betas = linspace(√0.00085, √0.012, 1000)², computed in float64)."""
    if "alphas_cumprod" in extras:
        return extras["alphas_cumprod"].read().float()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def _first(keys, n=5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")
