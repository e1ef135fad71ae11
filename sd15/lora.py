"""LoRA and LyCORIS networks merged into the weights for `<lora:NAME:te[:unet[:dyn]]>` prompt tags, after
A1111's `extensions-builtin/Lora`. NAME is a file stem under the LoRA folder or its `ss_output_name` alias.

Layouts: kohya (`lora_unet_*` / `lora_te_*` with diffusers or LDM module paths), diffusers / PEFT
(`unet.….lora_A.weight`, attention-processor LoRAs, `lora_alpha` in `lora_adapter_metadata`) and LyCORIS
(LoHa, LoKr, full `diff`); DoRA, IA3, OFT, GLoRA and norm modules are reported as unsupported. Per weight W:
W' = W + Σ mult · scale · dW in fp32, cast back to W's dtype, scale = alpha / rank (or the file's `scale`);
`dyn=N` keeps the first N ranks. Touched tensors are backed up first, so `restore()` is bit-exact.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch

from sd15.checkpoint import CheckpointError, open_checkpoint, read_header
from sd15.embeddings import scan_folder
from sd15.hashing import addnet_hash

log = logging.getLogger(__name__)

LORA_KINDS = ("lora", "lyco")  # tag kinds handled here (A1111 keeps "lyco" as an alias of "lora")


class LoraError(ValueError):
    """A LoRA file that cannot be read, with a one-line reason."""


def read_safetensors_metadata(path: str) -> dict:
    """The `__metadata__` of a safetensors file ({} when none), its JSON-object strings decoded as A1111 shows
    them."""
    try:
        meta = read_header(path)[0].get("__metadata__") if path.lower().endswith(".safetensors") else None
    except (CheckpointError, OSError):
        return {}
    out = dict(meta) if isinstance(meta, dict) else {}
    for k, v in out.items():
        if isinstance(v, str) and v[:1] == "{":
            try:
                out[k] = json.loads(v)
            except ValueError:
                pass
    return out


@dataclass(eq=False)
class LoraFile:
    """One LoRA file: name (stem), alias (`ss_output_name` or the name), real path, metadata, and its mtime
    and size when the folder was scanned."""
    name: str
    alias: str
    path: str
    metadata: dict
    mtime_ns: int
    size: int
    _hash: Optional[str] = None

    def shorthash(self) -> Optional[str]:
        """12 hex digits for "Lora hashes": `sshs_model_hash` from the metadata, else the addnet hash (the
        SHA-256 of a safetensors file after its header; of the whole file otherwise), computed once."""
        if self._hash is None:
            h = self.metadata.get("sshs_model_hash")
            if not (isinstance(h, str) and h):
                try:
                    h = addnet_hash(self.path)
                except OSError:
                    return None
            self._hash = h[:12]
        return self._hash


_PART_SYNONYMS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
# dotted (diffusers / PEFT) parts: .lora_A / .lora_B, .lora_down / .lora_up / .lora_mid, .lora.down /
# .lora.up, .lora_linear_layer.down / .up (each + ".weight"); and attention-processor LoRAs
_DOTTED = re.compile(r"(.*)\.lora(?:_linear_layer\.|[._])(A|B|down|up|mid)\.weight")
_PROCESSOR = re.compile(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_UNET_ROOTS = ("unet.", "down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.",
               "time_embedding.")


def normalize_key(key: str) -> Optional[tuple[str, str]]:
    """A file key -> (kohya module name, kohya part), or None when it is no LoRA key."""
    if key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) and "." in key:
        module, part = key.split(".", 1)
        return re.sub(r"^lora_te1_", "lora_te_", module), _PART_SYNONYMS.get(part, part)
    k = key.removeprefix("base_model.model.")
    if k.startswith(_UNET_ROOTS):
        prefix, k = "lora_unet_", k.removeprefix("unet.")
    elif k.startswith(("text_encoder.", "text_model.")):
        prefix, k = "lora_te_", k.removeprefix("text_encoder.")
    else:
        return None
    if m := _PROCESSOR.fullmatch(k):
        path, part = m[1] + (".to_out.0" if m[2] == "to_out" else f".{m[2]}"), f"lora_{m[3]}.weight"
    elif m := _DOTTED.fullmatch(k):
        path, part = m[1], "lora_{}.weight".format({"A": "down", "B": "up"}.get(m[2], m[2]))
    elif k.endswith(".alpha"):
        path, part = k.removesuffix(".alpha"), "alpha"
    else:
        return None
    return prefix + path.replace(".", "_"), part


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
    if module.startswith("lora_te_"):
        return ["transformer_" + module.removeprefix("lora_te_")]
    if not module.startswith("lora_unet_"):
        return []
    rest = module.removeprefix("lora_unet_")
    out = next((convert(m) for pattern, convert in _UNET_RULES if (m := pattern.fullmatch(rest))), [])
    return ["diffusion_model_" + c for c in out + [rest]]  # `rest` itself: `lora_unet_<LDM path>` files


def model_lookup(model) -> dict[str, tuple[str, torch.nn.Module]]:
    """{LDM path with "_": (component "unet"/"te", module)} for the weight-carrying modules."""
    out = {}
    for comp, net, prefix in (("unet", model.unet, "diffusion_model_"),
                              ("te", model.text_encoder, "transformer_text_model_")):
        for name, mod in net.named_modules():
            if name and isinstance(getattr(mod, "weight", None), torch.Tensor):
                out[prefix + name.replace(".", "_")] = (comp, mod)
    return out


UNSUPPORTED_PARTS = {"dora_scale": "DoRA", "on_input": "IA3", "w_norm": "norm", "b_norm": "norm",
                     "a1.weight": "GLoRA", "oft_blocks": "OFT", "oft_diag": "OFT"}
SUPPORTED = ("lora", "loha", "lokr", "full")


def module_kind(parts: dict) -> str:
    """One of SUPPORTED, else the name of an unsupported network type or "incomplete"."""
    for part, kind in UNSUPPORTED_PARTS.items():
        if part in parts:
            return kind
    if "lora_down.weight" in parts and "lora_up.weight" in parts:
        return "lora"
    if "hada_w1_a" in parts:
        return "loha"
    if "lokr_w1" in parts or "lokr_w1_a" in parts:
        return "lokr"
    return "full" if "diff" in parts else "incomplete"


def _product(a: torch.Tensor, b: torch.Tensor, core: Optional[torch.Tensor]) -> torch.Tensor:
    """a @ b, or with LyCORIS's Tucker core the conv kernel it decomposes."""
    return a @ b if core is None else torch.einsum("ijkl,jr,ip->prkl", core, b, a)


def delta(parts: dict, shape: torch.Size, dyn: Optional[int],
          device) -> tuple[torch.Tensor, Optional[torch.Tensor], float]:
    """(dW reshaped to `shape`, bias delta or None, scale) in fp32 on `device` for a module of a SUPPORTED
    kind; ValueError when dW does not fit."""
    p = {k: v.to(device=device, dtype=torch.float32) for k, v in parts.items()}
    kind, rank, bias = module_kind(parts), None, None
    if kind == "lora":
        down, up, mid = p["lora_down.weight"], p["lora_up.weight"], p.get("lora_mid.weight")
        rank = down.shape[0]
        up, down = up[:, :dyn].flatten(1), down[:dyn].flatten(1)  # dyn=None keeps every rank
        dw = up @ down if mid is None else torch.einsum("nmkl,in,mj->ijkl", mid[:dyn, :dyn], up, down)
    elif kind == "loha":
        rank = p["hada_w1_b"].shape[0]
        dw = _product(p["hada_w1_a"], p["hada_w1_b"], p.get("hada_t1")) * \
            _product(p["hada_w2_a"], p["hada_w2_b"], p.get("hada_t2"))
    elif kind == "lokr":
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else _product(p["lokr_w2_a"], p["lokr_w2_b"], p.get("lokr_t2"))
        factor = next((f for f in ("lokr_w1_b", "lokr_w2_b") if f in p), None)
        rank = p[factor].shape[0] if factor else None
        # torch.kron fails on a non-contiguous operand (the Tucker einsum's output)
        dw = torch.kron(w1[:, :, None, None] if w2.dim() == 4 else w1, w2.contiguous())
    else:  # full
        dw, bias = p["diff"], p.get("diff_b")
    if "scale" in p:
        scale = p["scale"].item()
    else:
        scale = p["alpha"].item() / rank if "alpha" in p and rank else 1.0
    if dw.numel() != shape.numel():
        raise ValueError(f"delta of shape {list(dw.shape)} does not fit weight {list(shape)}")
    return dw.reshape(shape), bias, scale


def _peft_alphas(metadata: dict) -> dict[str, float]:
    """lora_alpha per module prefix from diffusers' `lora_adapter_metadata` ({"unet": {"lora_alpha": …}} or
    {"unet.lora_alpha": …}; a bare "lora_alpha" is the UNet's)."""
    raw = metadata.get("lora_adapter_metadata")
    if not isinstance(raw, dict):
        return {}
    out = {}
    for prefix, name in (("lora_unet_", "unet"), ("lora_te_", "text_encoder")):
        sub = raw.get(name)
        value = sub.get("lora_alpha") if isinstance(sub, dict) else raw.get(f"{name}.lora_alpha")
        if value is None and name == "unet":
            value = raw.get("lora_alpha")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)
    return out


@functools.lru_cache(maxsize=4)
def parse_lora(path: str, mtime_ns: int, size: int) -> dict[str, dict[str, torch.Tensor]]:
    """Read a LoRA file (safetensors directly, pickles through the weights-only unpickler) -> {kohya module
    name: {kohya part: tensor as stored}}, cached per version of the file (`mtime_ns`, `size`)."""
    modules, ignored = {}, []
    try:
        entries = open_checkpoint(path)
        for key, entry in entries.items():
            norm = normalize_key(key)
            if norm is None:
                ignored.append(key)
            else:
                modules.setdefault(norm[0], {})[norm[1]] = entry.read()
    except CheckpointError as e:
        raise LoraError(str(e)) from None
    if not modules:
        raise LoraError(f"{path}: no LoRA tensors found ({len(entries)} keys, none in a known LoRA layout)")
    if ignored:
        log.info("LoRA %s: %d keys not understood, e.g. %s", path, len(ignored), ignored[0])
    alphas = _peft_alphas(read_safetensors_metadata(path))  # PEFT files keep lora_alpha in their config
    for module, parts in modules.items():
        for prefix, alpha in alphas.items():
            if module.startswith(prefix):
                parts.setdefault("alpha", torch.tensor(alpha))
    return modules


class LoraRequest(NamedTuple):
    """One `<lora:...>` tag: the name as written, the text-encoder and UNet multipliers, dyn (ranks kept)."""
    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: Optional[int] = None


class Loras:
    """The LoRA folder of one model and the networks merged into it now (`model.loras`).

    `applied` holds the (file, request) pairs merged now (files that could not be read left out). With
    `keep_applied` (A1111's behaviour) networks stay merged after a job until a job asks for another set (a
    prompt without tags restores them); by default every job restores them.
    """
    keep_applied = False

    def __init__(self, directory=None):
        self.directory = directory
        self._files: Optional[list[LoraFile]] = None
        self._lookup: dict[str, LoraFile] = {}  # names, then aliases
        self._backups: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, original)
        self._applied_key: tuple = ()
        self._applied_warnings: list[str] = []
        self.applied: list[tuple[LoraFile, LoraRequest]] = []
        self._lock = threading.RLock()

    def refresh(self) -> None:
        """Rescan the folder (names, aliases, metadata)."""
        files = []
        for name, path, st in scan_folder(self.directory, (".safetensors", ".pt", ".ckpt")):
            meta = read_safetensors_metadata(path)
            alias = meta.get("ss_output_name")
            files.append(LoraFile(name, alias if isinstance(alias, str) and alias else name, path, meta,
                                  st.st_mtime_ns, st.st_size))
        lookup = {}
        for f in files:
            lookup.setdefault(f.name, f)
        for f in files:
            lookup.setdefault(f.alias, f)
        with self._lock:
            self._files, self._lookup = files, lookup

    def list_api(self) -> list[dict]:
        """`GET /sdapi/v1/loras`: [{name, alias, path, metadata}]."""
        if self._files is None:
            self.refresh()
        return [dict(name=f.name, alias=f.alias, path=f.path, metadata=f.metadata) for f in self._files]

    def find(self, name: str) -> Optional[LoraFile]:
        """The file for a tag name (file stem first, then alias); rescans once when the name is unknown."""
        if self._files is None or name not in self._lookup:
            self.refresh()
        return self._lookup.get(name)

    def restore(self) -> None:
        """Copy every backed-up tensor back (bit-identical to before the networks were applied)."""
        with self._lock, torch.no_grad():
            for param, original in self._backups:
                param.copy_(original)
            self._backups = []
            self._applied_key = ()
            self._applied_warnings = []
            self.applied = []

    def activate(self, model, requests: Sequence[tuple[LoraFile, LoraRequest]]) -> list[str]:
        """Merge these (file, request) pairs into the model's weights -> warnings. Restores first when another
        set is merged; does nothing when this set already is. An empty list restores."""
        with self._lock:
            key = tuple((f.path, f.mtime_ns, f.size, r.te, r.unet, r.dyn) for f, r in requests)
            if key == self._applied_key and (key or not self._backups):
                return list(self._applied_warnings)
            self.restore()
            if not requests:
                return []
            warnings: list[str] = []
            lookup = model_lookup(model)
            # per target module: the contributions of every requested network (merged one target at a time,
            # so only one fp32 delta exists at once)
            contributions: dict[torch.nn.Module, list] = {}
            loaded, bad = [], {}
            for i, (lora, req) in enumerate(requests):
                try:
                    st = os.stat(lora.path)
                    modules = parse_lora(lora.path, st.st_mtime_ns, st.st_size)
                except (OSError, LoraError) as e:
                    warnings.append(f"LoRA {req.name} could not be loaded: {e}")
                    continue
                loaded.append((lora, req))
                matched, unmatched, unsupported = 0, [], Counter()
                for module, parts in modules.items():
                    target = next((lookup[c] for c in ldm_candidates(module) if c in lookup), None)
                    kind = module_kind(parts)
                    if target is None:
                        unmatched.append(module)
                    elif kind not in SUPPORTED:
                        unsupported[kind] += 1
                    else:
                        matched += 1
                        comp, mod = target
                        mult = req.te if comp == "te" else req.unet
                        if mult != 0:
                            contributions.setdefault(mod, []).append((i, module, parts, mult, req.dyn))
                if unmatched:
                    log.info("LoRA %s: %d modules match nothing in this model, e.g. %s", req.name, len(unmatched),
                             unmatched[0])
                for kind, n in unsupported.items():
                    warnings.append(f"LoRA {req.name}: {n} {kind} module(s) are not supported and were left out")
                if not matched:
                    warnings.append(f"LoRA {req.name}: none of its {len(modules)} modules matches this model "
                                    "(is it an SD 1.x LoRA?)")
            with torch.no_grad():
                for mod, items in contributions.items():
                    weight, bias = mod.weight, getattr(mod, "bias", None)
                    dw_sum = db_sum = None
                    for i, module, parts, mult, dyn in items:
                        try:
                            dw, db, scale = delta(parts, weight.shape, dyn, weight.device)
                        except (ValueError, RuntimeError, KeyError) as e:
                            bad.setdefault(i, []).append(f"{module} ({e})")
                            continue
                        dw = dw * (scale * mult)
                        dw_sum = dw if dw_sum is None else dw_sum.add_(dw)
                        if db is not None and isinstance(bias, torch.Tensor) and db.numel() == bias.numel():
                            db = db.reshape(bias.shape) * mult
                            db_sum = db if db_sum is None else db_sum.add_(db)
                    for param, d in ((weight, dw_sum), (bias, db_sum)):
                        if d is not None:
                            original = param.detach().clone()
                            self._backups.append((param, original))
                            param.copy_((original.float() + d).to(param.dtype))
            for i, problems in sorted(bad.items()):
                warnings.append(f"LoRA {requests[i][1].name}: {len(problems)} module(s) do not fit this model and "
                                f"were left out, e.g. {problems[0]}")
            self._applied_key = key
            self._applied_warnings = list(warnings)
            self.applied = loaded
            return warnings
