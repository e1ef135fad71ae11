"""CPU fp32 UNet forward time: sd15's UNet vs diffusers' `UNet2DConditionModel`, same weights, same inputs.

Both UNets get the same full-size SD 1.5 weights (a random-weight checkpoint in the exact layout of
v1-5-pruned-emaonly.safetensors, written by tests/synthetic.py unless `--ckpt` is given): sd15 through
`sd15.load(ckpt, device="cpu", dtype=float32)`, diffusers through tests/reference.py (diffusers' own LDM
converter `convert_ldm_unet_checkpoint` into `UNet2DConditionModel`, its default attention processor). The
diffusers weights are cloned into ordinary memory, so neither model runs on memory-mapped file pages.

One forward = batch 2 (the classifier-free-guidance pair), latent 4 x size x size (64 -> 512x512 images),
context (2, 77, 768), under `torch.inference_mode()`. Each model gets `--warmup` forwards (default 1), then
`--runs` timed forwards (default 3) alternating which model goes first, and the median is reported. The
outputs are compared (relative error) so that both are known to compute the same function.

    python bench/unet_cpu.py                 # 64x64 latent (512x512), 3 runs each
    python bench/unet_cpu.py --size 32       # quicker: 32x32 latent (256x256)
    python bench/unet_cpu.py --profile       # + a torch.profiler op table for one forward of each
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402


def load_models(ckpt: str):
    import sd15
    from safetensors.torch import load_file

    from reference import diffusers_unet  # tests/reference.py

    model = sd15.load(ckpt, device="cpu", dtype=torch.float32)
    ours = model.unet
    del model  # the VAE and text encoder go with it
    gc.collect()
    prefix = "model.diffusion_model."
    raw = load_file(ckpt)  # memory-mapped; clone the UNet part into ordinary memory, drop the rest
    sd = {k: v.clone() for k, v in raw.items() if k.startswith(prefix)}
    del raw
    gc.collect()
    ref = diffusers_unet(sd, ours.cfg)
    del sd
    gc.collect()
    return ours, ref


def forward_fns(ours, ref, x, t, ctx):
    def run_sd15():
        return ours(x, t, ctx)

    def run_diffusers():
        return ref(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    return {"sd15": run_sd15, "diffusers": run_diffusers}


def timed(fn) -> tuple[float, float, torch.Tensor]:
    """-> (wall seconds, process CPU seconds, output)."""
    c = time.process_time()
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


def profile(fns: dict, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for name, fn in fns.items():
        with tprofile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            fn()
        print(f"\n=== torch.profiler, one forward: {name} (self CPU time, top {rows}) ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="full-size SD 1.5 .safetensors (default: write a synthetic one to a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--workdir", default=None, help="where the temp checkpoint goes (default: $TMPDIR or /tmp)")
    ap.add_argument("--size", type=int, default=64, help="latent height/width (64 = 512x512 images)")
    ap.add_argument("--batch", type=int, default=2, help="batch (2 = one CFG step)")
    ap.add_argument("--runs", type=int, default=3, help="timed forwards per model (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed forwards per model first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's default)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table for one forward of each")
    ap.add_argument("--profile-rows", type=int, default=25)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    ckpt = args.ckpt
    try:
        if ckpt is None:
            tmp = tempfile.mkdtemp(prefix="sd15-bench-unet-", dir=args.workdir)
            ckpt = os.path.join(tmp, "sd15-synth.safetensors")
            print(f"writing a synthetic full-size checkpoint to {ckpt} ...", flush=True)
            subprocess.run([sys.executable, os.path.join(ROOT, "tests", "synthetic.py"), "--out", ckpt], check=True)
        t = time.perf_counter()
        ours, ref = load_models(ckpt)
        print(f"loaded both UNets in {time.perf_counter() - t:.1f} s", flush=True)
        run(ours, ref, args)
    finally:
        if tmp is not None:
            if args.keep:
                print(f"kept: {ckpt}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)


def run(ours, ref, args) -> None:
    import diffusers

    from reference import rel_err

    g = torch.Generator().manual_seed(0)
    b, s = args.batch, args.size
    x = torch.randn(b, 4, s, s, generator=g)
    t = torch.full((b,), 500.0)
    ctx = torch.randn(b, 77, 768, generator=g)
    fns = forward_fns(ours, ref, x, t, ctx)
    processors = sorted({type(p).__name__ for p in ref.attn_processors.values()})
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}; threads: {torch.get_num_threads()} "
          f"(both); mkldnn: {torch.backends.mkldnn.is_available()}")
    print(f"input: x {list(x.shape)}, t {list(t.shape)}, context {list(ctx.shape)}, fp32, inference_mode; "
          f"diffusers attention processor: {', '.join(processors)}")

    times = {"sd15": [], "diffusers": []}
    cpu = {"sd15": [], "diffusers": []}
    outs = {}
    with torch.inference_mode():
        for i in range(args.warmup):
            for name in (("sd15", "diffusers") if i % 2 == 0 else ("diffusers", "sd15")):
                dt, ct, outs[name] = timed(fns[name])
                print(f"  warm-up {i + 1} {name:9s}: {dt * 1e3:9.0f} ms  (CPU {ct * 1e3:.0f} ms)", flush=True)
        for i in range(args.runs):
            for name in (("sd15", "diffusers") if i % 2 == 0 else ("diffusers", "sd15")):
                dt, ct, outs[name] = timed(fns[name])
                times[name].append(dt)
                cpu[name].append(ct)
                print(f"  run {i + 1} {name:9s}: {dt * 1e3:9.0f} ms  (CPU {ct * 1e3:.0f} ms)", flush=True)
        err = rel_err(outs["sd15"], outs["diffusers"])
        if args.profile:
            profile(fns, args.profile_rows)

    med = {k: statistics.median(v) for k, v in times.items()}
    print()
    print(f"UNet forward, batch {b}, latent {s}x{s} ({s * 8}x{s * 8} px), CPU fp32, {torch.get_num_threads()} "
          f"threads, median of {args.runs} (alternating order, after {args.warmup} warm-up each):")
    for k in ("sd15", "diffusers"):
        spread = f"min {min(times[k]) * 1e3:.0f} / max {max(times[k]) * 1e3:.0f}"
        print(f"  {k:9s} {med[k] * 1e3:9.0f} ms   ({spread}; process CPU time median "
              f"{statistics.median(cpu[k]) * 1e3:.0f} ms)")
    ratio = med["sd15"] / med["diffusers"]
    print(f"  ratio sd15/diffusers: {ratio:.3f} median, {min(times['sd15']) / min(times['diffusers']):.3f} min  "
          f"(goal <= 1.0: {'met' if ratio <= 1.0 else 'NOT met'})")
    print(f"  outputs agree: rel err {err:.2e}")


if __name__ == "__main__":
    main()
