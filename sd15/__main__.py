"""The `sd15` command: txt2img and img2img from the shell.

    python -m sd15 txt2img --ckpt weights/v1-5-pruned-emaonly.safetensors --prompt "a cat" --out cat.png
    python -m sd15 img2img --ckpt ... --init cat.png --denoising-strength 0.6 --prompt "a tiger" --out out/

Errors (missing checkpoint, unknown sampler, bad size, ...) are one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sd15", description="Stable Diffusion 1.5 in plain PyTorch (A1111-compatible).")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("txt2img", "img2img"):
        sp = sub.add_parser(name, help=f"{name} with A1111's samplers, seeds and prompt syntax")
        sp.add_argument("--ckpt", required=True, help="SD 1.x checkpoint (.safetensors, .ckpt)")
        sp.add_argument("--vae", help="optional standalone VAE file")
        sp.add_argument("--prompt", default="")
        sp.add_argument("--negative-prompt", default="")
        sp.add_argument("--steps", type=int, default=20)
        sp.add_argument("--cfg-scale", type=float, default=7.0)
        sp.add_argument("--width", type=int, default=512)
        sp.add_argument("--height", type=int, default=512)
        sp.add_argument("--seed", type=int, default=-1, help="-1: random")
        sp.add_argument("--sampler", default="DPM++ 2M", help='A1111 name, e.g. "Euler a", "DPM++ 2M Karras"')
        sp.add_argument("--scheduler", default=None, help='e.g. "Karras"; default: the sampler\'s own')
        sp.add_argument("--batch-size", type=int, default=1)
        sp.add_argument("--n-iter", type=int, default=1)
        sp.add_argument("--clip-skip", type=int, default=1)
        sp.add_argument("--randn-source", choices=["GPU", "CPU", "NV"], default="GPU")
        sp.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
        sp.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None,
                        help="default: fp16 on CUDA, fp32 on the CPU")
        sp.add_argument("--out", default="outputs", help="a .png file, or a folder")
        if name == "img2img":
            sp.add_argument("--init", required=True, help="the init image")
            sp.add_argument("--denoising-strength", type=float, default=0.75)
            sp.add_argument("--resize-mode", type=int, default=0, choices=[0, 1, 2, 3])
            sp.add_argument("--mask", help="optional inpainting mask (white = repaint)")
        else:
            sp.add_argument("--enable-hr", action="store_true", help="hires fix")
            sp.add_argument("--hr-scale", type=float, default=2.0)
            sp.add_argument("--hr-upscaler", default="Latent")
            sp.add_argument("--denoising-strength", type=float, default=None)
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
    from sd15.pipeline import Params, generate, save_png, validate

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.precision]
    kw = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, cfg_scale=args.cfg_scale,
              width=args.width, height=args.height, seed=args.seed, sampler_name=args.sampler,
              scheduler=args.scheduler, batch_size=args.batch_size, n_iter=args.n_iter, clip_skip=args.clip_skip,
              randn_source=args.randn_source, denoising_strength=args.denoising_strength)
    if args.command == "img2img":
        if not os.path.isfile(args.init):
            raise ValueError(f"{args.init}: no such image")
        kw.update(init_images=[Image.open(args.init)], resize_mode=args.resize_mode)
        if args.mask:
            kw["mask"] = Image.open(args.mask)
    else:
        kw.update(enable_hr=args.enable_hr, hr_scale=args.hr_scale, hr_upscaler=args.hr_upscaler)
    params = Params.from_kwargs(**kw)
    validate(params)
    model = sd15.load(args.ckpt, vae=args.vae, device=args.device, dtype=dtype)
    total = params.n_iter * params.steps * (2 if params.enable_hr else 1)
    with tqdm(total=total, unit="step", desc=args.command) as bar:
        result = generate(model, params, callback=lambda *_: bar.update(1))
    paths = _out_paths(args.out, len(result.images), result.seeds)
    for image, text, path in zip(result.images, result.infotexts, paths):
        save_png(image, path, text)
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
