"""LoRA (and LyCORIS LoHa/LoKr, "full" diff) networks through `<lora:NAME:te[:unet[:dyn]]>` prompt tags.

Written from A1111's documented behaviour (its `extensions-builtin/Lora`); no code of A1111, kohya or peft.

Files: `.safetensors`, `.pt`, `.ckpt` in the LoRA folder (recursively). NAME is the file stem or the
`ss_output_name` alias from the safetensors metadata. Key layouts understood:

* kohya: `lora_unet_<diffusers path with _>.<part>` / `lora_te_<transformers path with _>.<part>` with parts
  `lora_down.weight`, `lora_up.weight`, optional `alpha`, `lora_mid.weight` (LoCon Tucker), `scale`;
  `lora_A`/`lora_B` as synonyms. `lora_unet_<LDM path with _>` and `lora_te1_` are accepted too.
* diffusers / PEFT: `unet.<dotted path>.lora_A.weight` / `lora_B.weight`, `text_encoder.…`, optional
  `base_model.model.` prefix; older `.lora.down/.up`, `.lora_linear_layer.down/.up`, and the oldest
  attention-processor names (`…processor.to_q_lora.down.weight`). Their scale is `lora_alpha / r` from the
  safetensors metadata when it says so (`lora_adapter_metadata`), from `<path>.alpha` entries, else 1.
* LyCORIS parts: LoHa `hada_*`, LoKr `lokr_*`, full `diff` / `diff_b`. DoRA, IA3, OFT, GLoRA and norm
  modules are reported as unsupported and left out; `bundle_emb.*` embeddings are ignored.

Maths per target weight W (fp32, then cast to W's dtype): W' = W + Σ mult · scale · dW, with
dW = up @ down (convs reshaped; with `lora_mid`, einsum over the Tucker core), scale = alpha / rank, mult = the
tag's `te` for text-encoder modules and `unet` for UNet modules; `dyn=N` keeps the first N ranks.

Applying keeps a backup of every touched tensor; `restore()` copies the backups back, so the weights are
bit-identical to before. `Loras.activate()` does nothing when the same set of (file, te, unet, dyn) is
already applied, and restores first when the set changed. The pipeline restores after every job unless
`keep_applied` is set (then, like A1111, the networks stay merged until a job asks for a different set;
a prompt without tags still restores them first).

For the server (`/sdapi/v1/loras`, `/sdapi/v1/refresh-loras`):

    model.loras.refresh()         # rescan the folder
    model.loras.list_api()        # [{"name", "alias", "path", "metadata"}]
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch

from sd15.embeddings import is_safe_name, scan_folder

log = logging.getLogger(__name__)

__all__ = ["LORA_EXTENSIONS", "LORA_KINDS", "LoraError", "LoraFile", "LoraRequest", "ParsedLora", "Loras",
           "parse_lora", "read_safetensors_metadata", "ldm_candidates", "list_loras"]

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
LORA_KINDS = ("lora", "lyco")  # tag kinds handled here (A1111 keeps "lyco" as an alias of "lora")


class LoraError(ValueError):
    """A LoRA file that cannot be read, with a one-line reason."""


# ================================================================================================
# Files
# ================================================================================================

def read_safetensors_metadata(path) -> dict:
    """The `__metadata__` of a safetensors file ({} when none); string values that hold a JSON object are
    decoded, as A1111 shows them."""
    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        return {}
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= 100 << 20:
                return {}
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        return {}
    out = {}
    for k, v in meta.items():
        out[k] = v
        if isinstance(v, str) and v[:1] == "{":
            try:
                out[k] = json.loads(v)
            except ValueError:
                pass
    return out


@dataclass(eq=False)
class LoraFile:
    """One LoRA file on disk: name (stem), alias (`ss_output_name` or the name), absolute path, metadata."""
    name: str
    alias: str
    path: str
    metadata: dict
    mtime_ns: int = 0
    size: int = 0
    _hash: Optional[str] = None

    def api(self) -> dict:
        """The `/sdapi/v1/loras` item."""
        return {"name": self.name, "alias": self.alias, "path": self.path, "metadata": self.metadata}

    def shorthash(self) -> Optional[str]:
        """12 hex digits for "Lora hashes": `sshs_model_hash` from the metadata, else the addnet hash (the
        SHA-256 of a safetensors file after its header; of the whole file otherwise), computed once per file."""
        if self._hash is None:
            h = self.metadata.get("sshs_model_hash")
            if not (isinstance(h, str) and h):
                from sd15.hashing import addnet_hash

                try:
                    h = addnet_hash(self.path)
                except OSError:
                    return None
            self._hash = h[:12]
        return self._hash

    @property
    def key(self) -> tuple:
        return (self.path, self.mtime_ns, self.size)


def list_loras(directory) -> list[LoraFile]:
    """Every LoRA file under `directory` (recursively, sorted by path)."""
    out = []
    for name, path in scan_folder(directory, LORA_EXTENSIONS):
        meta = read_safetensors_metadata(path)
        alias = meta.get("ss_output_name")
        try:
            st = os.stat(path)
        except OSError:
            continue
        out.append(LoraFile(name, alias if isinstance(alias, str) and alias else name, path, meta,
                            st.st_mtime_ns, st.st_size))
    return out


# ================================================================================================
# Key names
# ================================================================================================

_PART_SYNONYMS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}

# dotted (diffusers / PEFT) suffix -> kohya part
_DOTTED_PARTS = (
    (".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
    (".lora_down.weight", "lora_down.weight"), (".lora_up.weight", "lora_up.weight"),
    (".lora_mid.weight", "lora_mid.weight"),
    (".lora.down.weight", "lora_down.weight"), (".lora.up.weight", "lora_up.weight"),
    (".lora_linear_layer.down.weight", "lora_down.weight"), (".lora_linear_layer.up.weight", "lora_up.weight"),
    (".alpha", "alpha"),
)
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.")


def normalize_key(key: str) -> Optional[tuple[str, str, bool]]:
    """A file key -> (kohya module name, kohya part, is_dotted_layout), or None when it is no LoRA key."""
    if key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) and "." in key:
        module, part = key.split(".", 1)
        if module.startswith("lora_te1_"):
            module = "lora_te_" + module[len("lora_te1_"):]
        return module, _PART_SYNONYMS.get(part, part), False
    k = key
    if k.startswith("base_model.model."):
        k = k[len("base_model.model."):]
    if k.startswith("unet."):
        prefix, k = "lora_unet_", k[len("unet."):]
    elif k.startswith("text_encoder."):
        prefix, k = "lora_te_", k[len("text_encoder."):]
    elif k.startswith(_UNET_ROOTS):
        prefix = "lora_unet_"
    elif k.startswith("text_model."):
        prefix = "lora_te_"
    else:
        return None
    m = _PROCESSOR.match(k)
    if m:
        target = "to_out.0" if m.group(2) == "to_out" else m.group(2)
        path, part = f"{m.group(1)}.{target}", f"lora_{m.group(3)}.weight"
    else:
        for suffix, part in _DOTTED_PARTS:
            if k.endswith(suffix):
                path = k[: -len(suffix)]
                break
        else:
            return None
    return prefix + path.replace(".", "_"), part, True


_RESNET_RENAMES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                   "conv_shortcut": "skip_connection", "norm1": "in_layers_0", "norm2": "out_layers_0"}


def _res(x: str) -> str:
    return _RESNET_RENAMES.get(x, x)


_UNET_RULES = (
    (re.compile(r"conv_in"), lambda m: ["input_blocks_0_0"]),
    (re.compile(r"time_embedding_linear_(\d+)"), lambda m: [f"time_embed_{(int(m[1]) - 1) * 2}"]),
    (re.compile(r"down_blocks_(\d+)_resnets_(\d+)_(\w+)"),
     lambda m: [f"input_blocks_{1 + 3 * int(m[1]) + int(m[2])}_0_{_res(m[3])}"]),
    (re.compile(r"down_blocks_(\d+)_attentions_(\d+)_(\w+)"),
     lambda m: [f"input_blocks_{1 + 3 * int(m[1]) + int(m[2])}_1_{m[3]}"]),
    (re.compile(r"down_blocks_(\d+)_downsamplers_0_conv"), lambda m: [f"input_blocks_{3 + 3 * int(m[1])}_0_op"]),
    (re.compile(r"mid_block_resnets_(\d+)_(\w+)"), lambda m: [f"middle_block_{2 * int(m[1])}_{_res(m[2])}"]),
    (re.compile(r"mid_block_attentions_0_(\w+)"), lambda m: [f"middle_block_1_{m[1]}"]),
    (re.compile(r"up_blocks_(\d+)_resnets_(\d+)_(\w+)"),
     lambda m: [f"output_blocks_{3 * int(m[1]) + int(m[2])}_0_{_res(m[3])}"]),
    (re.compile(r"up_blocks_(\d+)_attentions_(\d+)_(\w+)"),
     lambda m: [f"output_blocks_{3 * int(m[1]) + int(m[2])}_1_{m[3]}"]),
    # the upsampler sits after the ResBlock, and after the SpatialTransformer when the level has one
    (re.compile(r"up_blocks_(\d+)_upsamplers_0_conv"),
     lambda m: [f"output_blocks_{3 * int(m[1]) + 2}_{i}_conv" for i in ((1, 2) if m[1] == "0" else (2, 1))]),
    (re.compile(r"conv_out"), lambda m: ["out_2"]),
)


def ldm_candidates(module: str) -> list[str]:
    """A kohya module name -> LDM module paths with "_" for "." (A1111's lookup keys), best first:
    `diffusion_model_input_blocks_1_1_proj_in`, `transformer_text_model_encoder_layers_0_self_attn_q_proj`."""
    if module.startswith("lora_unet_"):
        rest = module[len("lora_unet_"):]
        out = []
        for pattern, convert in _UNET_RULES:
            m = pattern.fullmatch(rest)
            if m:
                out += convert(m)
                break
        out.append(rest)  # `lora_unet_<LDM path>` files
        return ["diffusion_model_" + c for c in out]
    if module.startswith("lora_te_"):
        return ["transformer_" + module[len("lora_te_"):]]
    return []


def model_lookup(model) -> dict[str, tuple[str, str, torch.nn.Module]]:
    """{LDM path with "_": (component "unet"/"te", module path, module)} for the weight-carrying modules."""
    out = {}
    for comp, net, prefix in (("unet", model.unet, "diffusion_model_"),
                              ("te", model.text_encoder, "transformer_text_model_")):
        for name, mod in net.named_modules():
            if name and isinstance(getattr(mod, "weight", None), torch.Tensor):
                out[prefix + name.replace(".", "_")] = (comp, name, mod)
    return out


# ================================================================================================
# Parsing and the maths
# ================================================================================================

UNSUPPORTED_PARTS = {"dora_scale": "DoRA", "on_input": "IA3", "w_norm": "norm", "b_norm": "norm",
                     "a1.weight": "GLoRA", "oft_blocks": "OFT", "oft_diag": "OFT"}


@dataclass
class LoraModule:
    """The parts of one target module (kohya part names -> tensors, as stored)."""
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        p = self.parts
        for part, kind in UNSUPPORTED_PARTS.items():
            if part in p:
                return kind
        if "lora_down.weight" in p and "lora_up.weight" in p:
            return "lora"
        if "hada_w1_a" in p:
            return "loha"
        if "lokr_w1" in p or "lokr_w1_a" in p:
            return "lokr"
        if "diff" in p:
            return "full"
        return "incomplete"

    def _alpha(self) -> Optional[float]:
        a = self.parts.get("alpha")
        return float(a.float().reshape(-1)[0]) if a is not None and a.numel() else None

    def delta(self, shape: torch.Size, dyn: Optional[int],
              device) -> tuple[torch.Tensor, Optional[torch.Tensor], float]:
        """(dW reshaped to `shape`, bias delta or None, scale), fp32 on `device`; ValueError on a mismatch."""
        p = {k: v.to(device=device, dtype=torch.float32) for k, v in self.parts.items() if isinstance(v, torch.Tensor)}
        kind, alpha, bias = self.kind, self._alpha(), None
        if kind == "lora":
            down, up, mid = p["lora_down.weight"], p["lora_up.weight"], p.get("lora_mid.weight")
            rank = down.shape[0]
            scale = float(p["scale"].reshape(-1)[0]) if "scale" in p else (alpha / rank if alpha is not None else 1.0)
            if dyn is not None:
                down, up = down[:dyn], up[:, :dyn]
                mid = mid[:dyn, :dyn] if mid is not None else None
            up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
            if mid is None:
                dw = up2 @ down2
            else:
                dw = torch.einsum("nmkl,in,mj->ijkl", mid, up2, down2)
        elif kind == "loha":
            w1, w2 = (self._hada(p, i) for i in (1, 2))
            rank = p["hada_w1_b"].shape[0]
            scale = alpha / rank if alpha is not None else 1.0
            dw = w1 * w2
        elif kind == "lokr":
            w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
            if "lokr_w2" in p:
                w2 = p["lokr_w2"]
            elif "lokr_t2" in p:
                w2 = torch.einsum("ijkl,jr,ip->prkl", p["lokr_t2"], p["lokr_w2_b"], p["lokr_w2_a"])
            else:
                w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
            factor = "lokr_w1_b" if "lokr_w1_b" in p else "lokr_w2_b" if "lokr_w2_b" in p else None
            rank = p[factor].shape[0] if factor else None
            scale = alpha / rank if rank and alpha is not None else 1.0
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            dw = torch.kron(w1, w2)
        elif kind == "full":
            dw, bias, scale = p["diff"], p.get("diff_b"), 1.0
        else:
            raise ValueError(f"unsupported network module ({kind})")
        if dw.numel() != shape.numel():
            raise ValueError(f"delta of shape {list(dw.shape)} does not fit weight {list(shape)}")
        return dw.reshape(shape), bias, scale

    @staticmethod
    def _hada(p: dict, i: int) -> torch.Tensor:
        a, b, t = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"], p.get(f"hada_t{i}")
        if t is not None:
            return torch.einsum("ijkl,jr,ip->prkl", t, b, a)
        return a @ b


@dataclass
class ParsedLora:
    """A LoRA file read into memory: {kohya module name: LoraModule}, plus the keys that were not understood."""
    modules: dict[str, LoraModule]
    ignored: list[str]


def _peft_alphas(metadata: dict) -> dict[str, float]:
    """lora_alpha per component ("unet", "te") from diffusers' `lora_adapter_metadata`, when present."""
    raw = metadata.get("lora_adapter_metadata")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raw = None
    out: dict[str, float] = {}
    if not isinstance(raw, dict):
        return out
    for comp, name in (("unet", "unet"), ("te", "text_encoder")):
        sub = raw.get(name)
        value = sub.get("lora_alpha") if isinstance(sub, dict) else raw.get(f"{name}.lora_alpha")
        if value is None and comp == "unet" and "lora_alpha" in raw:
            value = raw["lora_alpha"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[comp] = float(value)
    return out


def parse_lora(path, metadata: Optional[dict] = None) -> ParsedLora:
    """Read a LoRA file (safetensors directly, pickles through the weights-only unpickler)."""
    from sd15.checkpoint import CheckpointError, open_checkpoint

    path = os.fspath(path)
    try:
        entries = open_checkpoint(path)
    except CheckpointError as e:
        raise LoraError(str(e)) from None
    metadata = read_safetensors_metadata(path) if metadata is None else metadata
    peft_alpha = _peft_alphas(metadata)
    modules: dict[str, LoraModule] = {}
    dotted: set[str] = set()
    ignored = []
    for key, entry in entries.items():
        norm = normalize_key(key)
        if norm is None:
            ignored.append(key)
            continue
        module, part, is_dotted = norm
        try:
            tensor = entry.read()
        except CheckpointError as e:
            raise LoraError(str(e)) from None
        modules.setdefault(module, LoraModule()).parts[part] = tensor
        if is_dotted:
            dotted.add(module)
    for module in dotted:  # PEFT files keep lora_alpha in their config, not per module
        comp = "unet" if module.startswith("lora_unet_") else "te"
        mod = modules[module]
        if "alpha" not in mod.parts and comp in peft_alpha:
            mod.parts["alpha"] = torch.tensor(peft_alpha[comp])
    if not modules:
        raise LoraError(f"{path}: no LoRA tensors found ({len(entries)} keys, none in a known LoRA layout)")
    return ParsedLora(modules, ignored)


# ================================================================================================
# Applying to a model
# ================================================================================================

class LoraRequest(NamedTuple):
    """One `<lora:...>` tag: the name as written, the text-encoder and UNet multipliers, dyn (ranks kept)."""
    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: Optional[int] = None


class Loras:
    """The LoRA folder of one model and the networks currently merged into it (`model.loras`).

    * `refresh()` rescans the folder; `available()` -> {name: LoraFile}; `find(name)` by name, then alias;
      `list_api()` is `/sdapi/v1/loras`.
    * `activate(model, requests)` merges the requested networks (restoring first when a different set is
      applied; nothing happens when the same set already is) and returns warnings.
    * `restore()` puts every touched tensor back, bit for bit.
    * `applied`: the (file, request) pairs merged now (files that could not be read are left out).
    * `keep_applied`: leave networks merged after a job (A1111's behaviour); default False (restore).
    Parsed files are cached (keyed by path, mtime and size; `cache_size` files).
    """

    def __init__(self, directory=None, *, keep_applied: bool = False, cache_size: int = 4):
        self.directory = os.fspath(directory) if directory is not None else None
        self.keep_applied = keep_applied
        self.cache_size = cache_size
        self._files: Optional[list[LoraFile]] = None
        self._by_name: dict[str, LoraFile] = {}
        self._by_alias: dict[str, LoraFile] = {}
        self._parsed: OrderedDict[tuple, ParsedLora] = OrderedDict()
        self._backups: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (parameter, original)
        self._applied_key: tuple = ()
        self._applied_warnings: list[str] = []
        self.applied: list[tuple[LoraFile, LoraRequest]] = []
        self._lock = threading.RLock()

    # -- the folder
    def refresh(self) -> None:
        """Rescan the folder (names, aliases, metadata)."""
        with self._lock:
            files = list_loras(self.directory)
            by_name, by_alias = {}, {}
            for f in files:
                by_name.setdefault(f.name, f)
            for f in files:
                by_alias.setdefault(f.alias, f)
            self._files, self._by_name, self._by_alias = files, by_name, by_alias

    def available(self) -> dict[str, LoraFile]:
        if self._files is None:
            self.refresh()
        return dict(self._by_name)

    def list_api(self) -> list[dict]:
        """`GET /sdapi/v1/loras`: [{name, alias, path, metadata}]."""
        if self._files is None:
            self.refresh()
        return [f.api() for f in self._files]

    def find(self, name: str, *, rescan: bool = True) -> Optional[LoraFile]:
        """The file for a tag name (file stem first, then `ss_output_name` alias); rescans once when unknown.
        Names with path separators or ".." never match."""
        if not is_safe_name(name):
            return None
        if self._files is None:
            self.refresh()
        hit = self._by_name.get(name) or self._by_alias.get(name)
        if hit is None and rescan:
            self.refresh()
            hit = self._by_name.get(name) or self._by_alias.get(name)
        return hit

    def parsed(self, lora: LoraFile) -> ParsedLora:
        """The parsed file, from the cache when the file did not change."""
        with self._lock:
            try:
                st = os.stat(lora.path)
                key = (lora.path, st.st_mtime_ns, st.st_size)
            except OSError as e:
                raise LoraError(f"{lora.path}: {e.strerror}") from None
            hit = self._parsed.get(key)
            if hit is not None:
                self._parsed.move_to_end(key)
                return hit
            parsed = parse_lora(lora.path, lora.metadata)
            for old in [k for k in self._parsed if k[0] == lora.path]:
                del self._parsed[old]
            self._parsed[key] = parsed
            while len(self._parsed) > max(1, self.cache_size):
                self._parsed.popitem(last=False)
            return parsed

    # -- merging
    def restore(self) -> None:
        """Copy every backed-up tensor back (bit-identical to before the networks were applied)."""
        with self._lock, torch.no_grad():
            for param, original in self._backups.values():
                param.copy_(original)
            self._backups = {}
            self._applied_key = ()
            self._applied_warnings = []
            self.applied = []

    def activate(self, model, requests: Sequence[tuple[LoraFile, LoraRequest]]) -> list[str]:
        """Merge these (file, request) pairs into the model's weights; -> warnings. An empty list restores."""
        with self._lock:
            key = tuple((f.key, r.te, r.unet, r.dyn) for f, r in requests)
            if key == self._applied_key and (key or not self._backups):
                return list(self._applied_warnings)
            self.restore()
            if not requests:
                return []
            warnings: list[str] = []
            lookup = model_lookup(model)
            # per target module: the contributions of every requested network (merged one target at a time,
            # so only one fp32 delta exists at once)
            contributions: dict[tuple, tuple[torch.nn.Module, list]] = {}
            loaded, bad = [], {}
            for i, (lora, req) in enumerate(requests):
                try:
                    parsed = self.parsed(lora)
                except LoraError as e:
                    warnings.append(f"LoRA {req.name} could not be loaded: {e}")
                    continue
                loaded.append((lora, req))
                matched, unmatched, unsupported = 0, [], {}
                for module, lm in parsed.modules.items():
                    target = next((lookup[c] for c in ldm_candidates(module) if c in lookup), None)
                    if target is None:
                        unmatched.append(module)
                        continue
                    kind = lm.kind
                    if kind in UNSUPPORTED_PARTS.values() or kind == "incomplete":
                        unsupported[kind] = unsupported.get(kind, 0) + 1
                        continue
                    comp, name, mod = target
                    mult = req.te if comp == "te" else req.unet
                    matched += 1
                    if mult != 0:
                        contributions.setdefault((comp, name), (mod, []))[1].append((i, module, lm, mult, req.dyn))
                if unmatched:
                    log.info("LoRA %s: %d modules match nothing in this model, e.g. %s", req.name, len(unmatched),
                             unmatched[0])
                if parsed.ignored:
                    log.info("LoRA %s: %d keys not understood, e.g. %s", req.name, len(parsed.ignored),
                             parsed.ignored[0])
                for kind, n in unsupported.items():
                    warnings.append(f"LoRA {req.name}: {n} {kind} module(s) are not supported and were left out")
                if not matched:
                    warnings.append(f"LoRA {req.name}: none of its {len(parsed.modules)} modules matches this model "
                                    "(is it an SD 1.x LoRA?)")
            with torch.no_grad():
                for (comp, name), (mod, items) in contributions.items():
                    weight, bias = mod.weight, getattr(mod, "bias", None)
                    dw_sum = db_sum = None
                    for i, module, lm, mult, dyn in items:
                        try:
                            dw, db, scale = lm.delta(weight.shape, dyn, weight.device)
                        except (ValueError, RuntimeError, KeyError) as e:
                            bad.setdefault(i, []).append(f"{module} ({e})")
                            continue
                        dw = dw * (scale * mult)
                        dw_sum = dw if dw_sum is None else dw_sum.add_(dw)
                        if db is not None and isinstance(bias, torch.Tensor) and db.numel() == bias.numel():
                            db = db.reshape(bias.shape) * mult
                            db_sum = db if db_sum is None else db_sum.add_(db)
                    for part, param, delta in (("weight", weight, dw_sum), ("bias", bias, db_sum)):
                        if delta is not None:
                            original = param.detach().clone()
                            self._backups[(comp, name, part)] = (param, original)
                            param.copy_((original.float() + delta).to(param.dtype))
            for i, problems in sorted(bad.items()):
                warnings.append(f"LoRA {requests[i][1].name}: {len(problems)} module(s) do not fit this model and "
                                f"were left out, e.g. {problems[0]}")
            self._applied_key = key
            self._applied_warnings = list(warnings)
            self.applied = loaded
            return warnings

    def finish_job(self) -> None:
        """End of a generation job: restore the weights unless `keep_applied`."""
        if not self.keep_applied:
            self.restore()
