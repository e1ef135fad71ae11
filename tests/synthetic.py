"""Random-weight SD 1.5 checkpoints in the exact layout of the real files, for tests and benchmarks.

* `write_full_checkpoint`: every key, shape and dtype of `v1-5-pruned-emaonly.safetensors` (1145 tensors,
  4.27 GB in fp32), taken from the committed key list `tests/data/sd15-checkpoint-keys.json`
  (not from sd15's own models, so the models are checked against the real layout).
* `write_full_vae`: the layout of `vae-ft-mse-840000-ema-pruned.safetensors` (250 tensors).
* `write_tiny_checkpoint`: the same key layout with tiny shapes (UNET_TINY, VAE_TINY, CLIP_TINY), plus the
  same non-weight extras (schedule buffers, position_ids, model_ema scalars).

Weights are N(0, std) for matrices and convs, biases N(0, 0.02), norm scales 1 + N(0, 0.05): random enough
that a swapped or mis-wired tensor shows up in a parity test, tame enough that activations stay finite.
Files are written tensor by tensor, so even the 4 GB file needs only one tensor's memory at a time.

Run as a script to write files for benchmarks:
    python tests/synthetic.py --out weights/sd15-synth.safetensors [--dtype float16] [--kind vae|tiny]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32"}
ST_DTYPES = {v: k for k, v in ST_NAMES.items()}
SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def layout(kind: str = "sd15") -> list[dict]:
    name = {"sd15": "sd15-checkpoint-keys.json", "vae": "vae-ft-mse-keys.json"}[kind]
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


def schedule_buffers() -> dict[str, torch.Tensor]:
    """LDM's DDPM.register_schedule buffers for SD 1.x (float64 maths, stored as float32)."""
    f64 = torch.float64
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=f64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=f64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac),
    }
    return {k: v.float() for k, v in values.items()}


def random_tensor(key: str, shape, gen: torch.Generator, std: float = 0.02) -> torch.Tensor:
    if key.endswith(".bias"):
        return torch.randn(shape, generator=gen) * 0.02
    if len(shape) == 1:  # GroupNorm / LayerNorm scales
        return 1.0 + torch.randn(shape, generator=gen) * 0.05
    return torch.randn(shape, generator=gen) * std


def extra_tensor(key: str, shape, dtype_name: str) -> torch.Tensor | None:
    """The non-weight tensors of a real file, with their real values (None if `key` is a weight)."""
    if key in SCHEDULE_KEYS:
        return schedule_buffers()[key]
    if key.endswith("embeddings.position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if key == "model_ema.decay":
        return torch.tensor(0.9999, dtype=torch.float32)
    if key == "model_ema.num_updates":
        return torch.tensor(0, dtype=ST_DTYPES[dtype_name])
    return None


def write_safetensors(path: str, tensors, metadata: dict | None = None) -> None:
    """Stream (key, tensor) pairs given as a list of (key, shape, dtype, make_fn) into a safetensors file."""
    header, offset = {}, 0
    for key, shape, dtype, _ in tensors:
        n = int(torch.Size(shape).numel()) * dtype.itemsize
        header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata is not None:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad the header to 8 bytes, as current safetensors does
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key, shape, dtype, make in tensors:
            t = make().to(dtype).contiguous()
            assert t.shape == torch.Size(shape), key
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    os.replace(tmp, path)


def _layout_tensors(entries, gen, dtype, std):
    out = []
    for e in entries:
        key, shape, dt = e["key"], e["shape"], e["dtype"]
        extra = extra_tensor(key, shape, dt)
        file_dtype = ST_DTYPES[dt] if dt.startswith("I") else dtype
        if extra is not None:
            out.append((key, shape, file_dtype, lambda x=extra: x))
        else:
            out.append((key, shape, file_dtype, lambda k=key, s=shape: random_tensor(k, s, gen, std)))
    return out


def write_full_checkpoint(path: str, *, dtype=torch.float32, seed: int = 0, std: float = 0.02, drop=()) -> str:
    """A file with the exact layout of v1-5-pruned-emaonly.safetensors and random weights."""
    gen = torch.Generator().manual_seed(seed)
    entries = [e for e in layout("sd15") if e["key"] not in drop]
    write_safetensors(path, _layout_tensors(entries, gen, dtype, std), metadata={"format": "pt"})
    return path


def write_full_vae(path: str, *, dtype=torch.float32, seed: int = 1, std: float = 0.02) -> str:
    """A file with the exact layout of vae-ft-mse-840000-ema-pruned.safetensors and random weights."""
    gen = torch.Generator().manual_seed(seed)
    write_safetensors(path, _layout_tensors(layout("vae"), gen, dtype, std))
    return path


def tiny_state_dict(seed: int = 0, std: float = 0.2, *, unet=None, vae=None) -> dict[str, torch.Tensor]:
    """A full SD checkpoint state dict (all prefixes and extras) with tiny networks (UNET_TINY, VAE_TINY,
    CLIP_TINY; `unet` / `vae` replace the first two with other configs, e.g. smaller ones for slow callers)."""
    from sd15.checkpoint import PREFIXES
    from sd15.clip.text_encoder import CLIP_TINY, CLIPTextModel
    from sd15.unet.unet import UNET_TINY, UNetModel
    from sd15.vae.vae import VAE_TINY, AutoencoderKL

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    with torch.device("meta"):
        nets = {"unet": UNetModel(unet or UNET_TINY), "vae": AutoencoderKL(vae or VAE_TINY),
                "text_encoder": CLIPTextModel(CLIP_TINY)}
    for name, net in nets.items():
        for k, p in net.state_dict().items():
            sd[PREFIXES[name] + k] = random_tensor(k, p.shape, gen, std)
    sd.update(schedule_buffers())
    sd[PREFIXES["text_encoder"] + "embeddings.position_ids"] = torch.arange(77)[None]
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return sd


def write_tiny_checkpoint(path: str, *, dtype=torch.float32, seed: int = 0, std: float = 0.2, unet=None,
                          vae=None) -> str:
    sd = tiny_state_dict(seed, std, unet=unet, vae=vae)
    write_safetensors(path, [(k, v.shape, v.dtype if not v.is_floating_point() else dtype, lambda v=v: v)
                             for k, v in sorted(sd.items())], metadata={"format": "pt"})
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--kind", choices=["sd15", "vae", "tiny"], default="sd15")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    writer = {"sd15": write_full_checkpoint, "vae": write_full_vae, "tiny": write_tiny_checkpoint}[args.kind]
    writer(args.out, dtype=dtype, seed=args.seed)
    print(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes)")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for sd15
    main()
