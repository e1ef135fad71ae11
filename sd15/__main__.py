"""The `sd15` command: txt2img and img2img from the shell.

    python -m sd15 txt2img --ckpt weights/v1-5-pruned-emaonly.safetensors --prompt "a cat" --out cat.png
    python -m sd15 img2img --ckpt ... --init cat.png --denoising-strength 0.6 --prompt "a tiger" --out out/

Errors (missing checkpoint, unknown sampler, bad size, ...) are one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys


_TYPES = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float, "Optional[str]": str}
_ALIASES = {"sampler_name": ["--sampler"]}


def _add_schema_options(parser, *groups: str) -> None:
    """One option per schema field of `groups` (`--field-name`, the schema's default and help)."""
    from sd15.schema import RANDN_SOURCES, fields_of

    for f in fields_of(*groups):
        flags = ["--" + f.name.replace("_", "-"), *_ALIASES.get(f.name, [])]
        help_ = f.metadata["doc"] or None
        if f.type == "bool":
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_)
        elif f.type in _TYPES:
            choices = RANDN_SOURCES if f.name == "randn_source" else None
            parser.add_argument(*flags, dest=f.name, type=_TYPES[f.type], default=f.default, choices=choices,
                                help=help_)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sd15", description="Stable Diffusion 1.5 in plain PyTorch (A1111-compatible).")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("txt2img", "img2img"):
        sp = sub.add_parser(name, help=f"{name} with A1111's samplers, seeds and prompt syntax")
        sp.add_argument("--ckpt", required=True, help="SD 1.x checkpoint (.safetensors, .ckpt)")
        sp.add_argument("--vae", help="optional standalone VAE file")
        sp.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
        sp.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None,
                        help="default: fp16 on CUDA, fp32 on the CPU")
        sp.add_argument("--out", default="outputs", help="a .png file, or a folder")
        if name == "img2img":
            sp.add_argument("--init", required=True, help="the init image")
            sp.add_argument("--mask", dest="mask_image", help="optional inpainting mask (white = repaint)")
        _add_schema_options(sp, "prompt", "seeds", "sampling", "size", "settings",
                            "img2img" if name == "img2img" else "hires")
    return ap


def _out_paths(out: str, n: int, seeds: list[int]) -> list[str]:
    if out.lower().endswith(".png"):
        if n == 1:
            return [out]
        stem = out[:-4]
        return [f"{stem}-{i}.png" for i in range(n)]
    os.makedirs(out, exist_ok=True)
    start = len([f for f in os.listdir(out) if f.endswith(".png")])
    return [os.path.join(out, f"{start + i:05d}-{seed}.png") for i, seed in enumerate(seeds)]


def run(args) -> list[str]:
    import torch
    from PIL import Image
    from tqdm import tqdm

    import sd15
    from sd15.a1111.images import png_bytes
    from sd15.hashing import cached_hash, short_hash
    from sd15.pipeline import generate
    from sd15.schema import FIELDS, GenerationRequest, resolve, validate

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.precision]
    kw = {f.name: getattr(args, f.name) for f in FIELDS.values() if hasattr(args, f.name)}
    if args.command == "img2img":
        if not os.path.isfile(args.init):
            raise ValueError(f"{args.init}: no such image")
        kw["init_images"] = [Image.open(args.init)]
        if args.mask_image:
            kw["mask"] = Image.open(args.mask_image)
    request = GenerationRequest(**kw)
    validate(request)
    params = resolve(request)
    model = sd15.load(args.ckpt, vae=args.vae, device=args.device, dtype=dtype)
    total = params.n_iter * (params.steps + (params.hires.steps if params.hires else 0))
    hashes = dict(model_hash=short_hash(cached_hash(args.ckpt)),
                  vae_hash=short_hash(cached_hash(args.vae)) if args.vae else None)
    with tqdm(total=total, unit="step", desc=args.command) as bar:
        result = generate(model, params, callback=lambda *_: bar.update(1), **hashes)
    paths = _out_paths(args.out, len(result.images), result.seeds)
    for image, text, path in zip(result.images, result.infotexts, paths):
        with open(path, "wb") as f:
            f.write(png_bytes(image, text))
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return paths


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        paths = run(args)
    except KeyboardInterrupt:
        print("sd15: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # CheckpointError is a ValueError
        print(f"sd15: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
