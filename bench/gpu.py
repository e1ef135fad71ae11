"""The issue-7 benchmark: UNet it/s for sd15 and diffusers, a 20-step image end to end, peak VRAM.

All UNets get the same full-size SD 1.5 weights: a random-weight checkpoint in the exact layout of
v1-5-pruned-emaonly.safetensors (tests/synthetic.py, written to a temporary folder in fp16 unless `--ckpt`
is given); diffusers' `UNet2DConditionModel` gets them through its own LDM converter (tests/reference.py).

One "it" = one classifier-free-guidance step: a UNet forward on a batch of 2 x `--batch` latents of
size/8 x size/8 with context (2 x batch, 77, 768), as the diffusers progress bar and stable-fast count it
(the published it/s figures count the same way). Each row: `--warmup` untimed calls (the first one compiles / captures; its time
is reported as "first call"), then `--repeats` runs of `--iters` calls between device synchronisations;
the median run gives it/s. Rows:

  sd15 eager                  sd15's UNet, SDPA attention
  sd15 eager + CUDA graphs    sd15.fast.CUDAGraphRunner around the eager UNet               (CUDA only)
  sd15 compiled               sd15.fast: channels_last (CUDA), Inductor flags (CUDA), torch.compile(--compile-mode)
  sd15 compiled + CUDA graphs the compiled UNet inside CUDAGraphRunner                      (CUDA only)
  diffusers eager             UNet2DConditionModel, its default SDPA attention processor
  diffusers compiled          the diffusers recipe: channels_last (CUDA), same Inductor flags, torch.compile(fullgraph);
                              measured last (its UNet is loaded again), as the least needed row

Ratios are against diffusers eager measured in the same run. Then: a `--steps`-step txt2img at size x size
through model.txt2img (CLIP + UNet + VAE + image conversion) with the fastest sd15 configuration
(compiled VAE decode too, on CUDA), and on CUDA the peak VRAM (`torch.cuda.max_memory_allocated`) of a
2-step generation at 512 and 1024 with the eager model, and of a 1024 UNet step + tiled VAE decode.

    python bench/gpu.py                                    # CUDA: 512x512, fp16, batch 1, all rows
    python bench/gpu.py --device cpu --size 256 --steps 2  # quick mode on the CPU (fp32): same table
    python bench/gpu.py --tiny --device cpu --steps 1 --no-compile   # seconds: a smoke test of the script
    python bench/gpu.py --rows sd15-eager,diffusers-eager --json $OUT/gpu.json   # a subset, results as JSON

With `--json` the file is rewritten after every row, so a run that is cut short still reports what it
measured; `--deadline S` skips the rows that would start more than S seconds after the script started.
Rows that need diffusers are reported as skipped, with the reason, when it cannot be imported.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

ROWS = ("sd15-eager", "sd15-eager-graphs", "sd15-compiled", "sd15-compiled-graphs", "diffusers-eager",
        "diffusers-compiled", "e2e", "memory")
LABELS = {
    "sd15-eager": "sd15 eager (SDPA)",
    "sd15-eager-graphs": "sd15 eager + CUDA graphs",
    "sd15-compiled": "sd15 compiled",
    "sd15-compiled-graphs": "sd15 compiled + CUDA graphs",
    "diffusers-eager": "diffusers eager (SDPA)",
    "diffusers-compiled": "diffusers compiled",
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "CPU"
    return f"{model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, *, warmup: int, iters: int, repeats: int) -> dict:
    """Warm up (the first call's time is kept: compilation / capture), then it/s of the median repeat."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    runs = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        runs.append(time.perf_counter() - t0)
    return {"it_s": iters / statistics.median(runs), "first_call_s": first, "runs_s": runs}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


# ------------------------------------------------------------------------------------------------


def load_diffusers(ckpt: str, cfg, device, dtype):
    from safetensors.torch import load_file

    from reference import diffusers_unet  # tests/reference.py

    prefix = "model.diffusion_model."
    raw = load_file(ckpt)
    sd = {k: v.to(dtype).clone() for k, v in raw.items() if k.startswith(prefix)}
    del raw
    gc.collect()
    unet = diffusers_unet(sd, cfg).to(device)
    del sd
    gc.collect()
    return unet


def write_checkpoint(args, tmp: str) -> str:
    import synthetic  # tests/synthetic.py

    if args.tiny:
        return synthetic.write_tiny_checkpoint(os.path.join(tmp, "tiny.safetensors"))
    t0 = time.perf_counter()
    path = synthetic.write_full_checkpoint(os.path.join(tmp, "sd15-synth-fp16.safetensors"), dtype=torch.float16)
    print(f"# wrote synthetic full-size checkpoint ({os.path.getsize(path) / 1e9:.2f} GB) in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


T_START = time.perf_counter()


def save(res: dict, path: str | None) -> None:
    """Write the results so far (atomically: a reader never sees half a file)."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=1, default=str)
        os.replace(path + ".tmp", path)


def run(args) -> dict:
    import sd15
    import sd15.fast as fast

    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    on_cuda = device.type == "cuda"
    iters = args.iters or (50 if on_cuda else args.steps)
    warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 1)
    repeats = args.repeats or (5 if on_cuda else 1)
    rows = set(args.rows.split(",")) if args.rows else set(ROWS)
    if args.no_compile:
        rows -= {"sd15-compiled", "sd15-compiled-graphs", "diffusers-compiled"}
    if not on_cuda:
        rows -= {"sd15-eager-graphs", "sd15-compiled-graphs"}
    mode = args.compile_mode or "default"
    kw = dict(warmup=warmup, iters=iters, repeats=repeats)

    results = {"device": device_name(device), "torch": torch.__version__, "dtype": args.dtype, "size": args.size,
               "batch": args.batch, "steps": args.steps, "iters": iters, "repeats": repeats, "warmup": warmup,
               "compile_mode": mode, "cuda": on_cuda, "rows": {}}
    try:
        import diffusers
        results["diffusers"] = diffusers.__version__
    except Exception as e:  # not installed, or an incompatible huggingface_hub
        results["diffusers"] = None
        for name in ("diffusers-eager", "diffusers-compiled"):
            if name in rows:
                results["rows"][name] = {"skipped": f"diffusers cannot be imported ({type(e).__name__}: {e})"}
        rows -= {"diffusers-eager", "diffusers-compiled"}
    save(results, args.json)

    tmp = tempfile.mkdtemp(prefix="sd15-bench-")
    ckpt = args.ckpt or write_checkpoint(args, tmp)
    model = sd15.load(ckpt, device=device, dtype=dtype)
    cfg = model.unet.cfg
    b2, lat = 2 * args.batch, args.size // 8
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b2, 4, lat, lat, generator=gen).to(device, dtype)
    t = torch.full((b2,), 500.0, device=device)  # float32, as sd15's EpsDenoiser passes it
    ctx = torch.randn(b2, 77, cfg.context_dim, generator=gen).to(device, dtype)

    def out_of_time(name):
        if args.deadline and time.perf_counter() - T_START > args.deadline:
            results["rows"][name] = {"skipped": f"past the --deadline of {args.deadline:.0f} s"}
            save(results, args.json)
            return True
        return False

    def record(name, fn):
        if name not in rows or out_of_time(name):
            return None
        print(f"# {LABELS.get(name, name)} ...", file=sys.stderr, flush=True)
        try:
            with torch.no_grad():
                results["rows"][name] = measure(fn, device, **kw)
        except Exception as e:  # keep the other rows
            traceback.print_exc()
            results["rows"][name] = {"error": f"{type(e).__name__}: {e}"}
        save(results, args.json)
        return results["rows"][name]

    with torch.no_grad():
        ref = model.unet(x, t, ctx).float()

    def check(name):  # the output of the configuration just measured vs the eager one
        row = results["rows"].get(name)
        if row is not None and "it_s" in row:
            with torch.no_grad():
                row["rel_err_vs_eager"] = rel_err(model.unet(x, t, ctx), ref)
            save(results, args.json)

    record("sd15-eager", lambda: model.unet(x, t, ctx))
    if "sd15-eager-graphs" in rows:
        fast.cuda_graphs(model)
        record("sd15-eager-graphs", lambda: model.unet(x, t, ctx))
        check("sd15-eager-graphs")
        fast.reset(model)

    def diffusers_rows(names):
        """Load diffusers' UNet, measure the rows in `names`, and free it again (the memory rows must not
        count it). diffusers-compiled runs last: its compile is the longest and the least needed."""
        names = [n for n in names if n in rows]
        if not names or all(out_of_time(n) for n in names):
            return
        dunet = load_diffusers(ckpt, cfg, device, dtype)
        dcall = lambda: dunet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]  # noqa: E731
        if "rel_err_sd15_vs_diffusers" not in results:
            with torch.no_grad():
                results["rel_err_sd15_vs_diffusers"] = rel_err(dcall(), ref)
            save(results, args.json)
        if "diffusers-eager" in names:
            record("diffusers-eager", dcall)
        if "diffusers-compiled" in names and not out_of_time("diffusers-compiled"):
            if on_cuda:
                fast.inductor_flags()
                dunet.to(memory_format=torch.channels_last)
            dcompiled = torch.compile(dunet, mode=mode, fullgraph=True)
            record("diffusers-compiled", lambda: dcompiled(x, t, encoder_hidden_states=ctx, return_dict=False)[0])
            del dcompiled
        del dunet, dcall
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    diffusers_rows(["diffusers-eager"])

    if rows & {"sd15-compiled", "sd15-compiled-graphs"}:
        if on_cuda:
            fast.enable_tf32()
            fast.inductor_flags()
            fast.channels_last(model)
        fast.compile_unet(model, mode=mode)
        record("sd15-compiled", lambda: model.unet(x, t, ctx))
        check("sd15-compiled")
        if "sd15-compiled-graphs" in rows and mode in fast.CUDAGRAPH_MODES:
            results["rows"]["sd15-compiled-graphs"] = {"skipped": f"compile mode {mode} captures CUDA graphs itself"}
        elif "sd15-compiled-graphs" in rows and not out_of_time("sd15-compiled-graphs"):
            fast.cuda_graphs(model)
            record("sd15-compiled-graphs", lambda: model.unet(x, t, ctx))
            check("sd15-compiled-graphs")

    if "e2e" in rows and not out_of_time("e2e"):  # with the sd15 configuration installed now (the fastest)
        print("# end-to-end image ...", file=sys.stderr, flush=True)
        try:
            if on_cuda and not args.no_compile and args.compile_vae:
                fast.compile_vae_decode(model, mode=mode)
            p = dict(prompt="a photograph of an astronaut riding a horse", seed=1, steps=args.steps,
                     width=args.size, height=args.size, batch_size=args.batch, sampler_name="Euler")
            sync(device)
            t0 = time.perf_counter()
            model.txt2img(**p)  # warm-up: compiles the VAE decode, captures the graphs
            sync(device)
            first = time.perf_counter() - t0
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(device)
            runs = []
            for _ in range(repeats):
                sync(device)
                t0 = time.perf_counter()
                model.txt2img(**p)
                sync(device)
                runs.append(time.perf_counter() - t0)
            results["rows"]["e2e"] = {"seconds": statistics.median(runs), "first_call_s": first, "runs_s": runs,
                                      "unet": describe(model),
                                      "peak_vram_gb": torch.cuda.max_memory_allocated(device) / 1e9 if on_cuda
                                      else None}
        except Exception as e:
            traceback.print_exc()
            results["rows"]["e2e"] = {"error": f"{type(e).__name__}: {e}"}
        save(results, args.json)

    if "memory" in rows and on_cuda and not out_of_time("memory"):
        fast.reset(model)
        model.unet.to(memory_format=torch.contiguous_format)
        model.vae.to(memory_format=torch.contiguous_format)
        results["rows"]["memory"] = {}  # filled (and saved) one measurement at a time
        memory_rows(model, device, dtype, args, lambda: save(results, args.json), out=results["rows"]["memory"])
    elif "memory" in rows and "memory" not in results["rows"]:
        results["rows"]["memory"] = {"note": "no device: peak VRAM needs CUDA"}
    save(results, args.json)
    diffusers_rows(["diffusers-compiled"])
    if not args.ckpt:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def describe(model) -> str:
    import sd15.fast as fast

    fwd = model.unet.__dict__.get("forward")
    if isinstance(fwd, fast.CUDAGraphRunner):
        return "compiled + CUDA graphs" if isinstance(fwd.fn, fast._Compiled) else "eager + CUDA graphs"
    return "compiled" if isinstance(fwd, fast._Compiled) else "eager"


def memory_rows(model, device, dtype, args, saved=lambda: None, out=None) -> dict:
    """Peak VRAM (GB) of the eager model: 2-step generations at 512 and 1024, and at 1024 one CFG UNet step
    plus a tiled VAE decode (what the pipeline does once it tiles large images)."""
    from sd15.vae.tiled import tiled_decode

    out = {} if out is None else out

    def peak(name, fn):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.no_grad():
                fn()
            torch.cuda.synchronize(device)
            out[name] = torch.cuda.max_memory_allocated(device) / 1e9
        except Exception as e:  # an out-of-memory error is a result too
            traceback.print_exc()
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        saved()

    for size in (512, 1024):
        p = dict(prompt="memory", seed=1, steps=2, width=size, height=size, sampler_name="Euler")
        peak(f"generate_{size}", lambda p=p: model.txt2img(**p))

    def unet_and_tiled_vae(storage, size=1024):
        lat = size // 8
        x = torch.randn(2, 4, lat, lat, device=device, dtype=dtype)
        ctx = torch.randn(2, 77, model.unet.cfg.context_dim, device=device, dtype=dtype)
        model.unet(x, torch.full((2,), 500.0, device=device), ctx)
        del x, ctx
        tiled_decode(model.vae, torch.randn(1, 4, lat, lat, device=device, dtype=dtype), storage=storage)

    peak("unet_step_plus_tiled_decode_1024", lambda: unet_and_tiled_vae(None))
    peak("unet_step_plus_tiled_decode_1024_storage_cpu", lambda: unet_and_tiled_vae("cpu"))
    return out


# ------------------------------------------------------------------------------------------------


def fmt_row(label: str, r: dict | None, base: float | None) -> str:
    if r is None:
        return f"| {label} | not run | | |"
    if "skipped" in r:
        return f"| {label} | skipped: {r['skipped'][:100]} | | |"
    if "error" in r:
        return f"| {label} | error: {r['error'][:80]} | | |"
    ratio = f"{r['it_s'] / base:.2f}x" if base else "-"
    extra = f"first call {r['first_call_s']:.1f} s"
    if "rel_err_vs_eager" in r:
        extra += f"; rel err vs eager {r['rel_err_vs_eager']:.1e}"
    return f"| {label} | {r['it_s']:.2f} | {ratio} | {extra} |"


def table(res: dict) -> str:
    on_cuda = res["cuda"]
    rows = res["rows"]
    base = rows.get("diffusers-eager", {}).get("it_s")
    lines = [f"Device: {res['device']}; torch {res['torch']}, diffusers {res.get('diffusers')}; {res['dtype']}, "
             f"{res['size']}x{res['size']}, batch {res['batch']} (UNet batch {2 * res['batch']}, CFG); "
             f"{res['iters']} iterations x {res['repeats']} repeats after {res['warmup']} warm-up calls; "
             f"compile mode {res['compile_mode']}",
             "",
             "| configuration | UNet it/s | vs diffusers eager | notes |",
             "|---|---|---|---|"]
    for key, label in LABELS.items():
        if not on_cuda and key.endswith("graphs"):
            lines.append(f"| {label} | no device (needs CUDA) | | |")
        else:
            lines.append(fmt_row(label, rows.get(key), base))
    if "rel_err_sd15_vs_diffusers" in res:
        lines.append(f"\nsd15 vs diffusers UNet output, same weights and inputs: rel err "
                     f"{res['rel_err_sd15_vs_diffusers']:.1e} (max |diff| / max |ref|)")
    e2e = rows.get("e2e")
    if e2e is not None:
        if "skipped" in e2e:
            lines.append(f"\nEnd to end: skipped: {e2e['skipped']}")
        elif "error" in e2e:
            lines.append(f"\nEnd to end: error: {e2e['error']}")
        else:
            vram = f"; peak VRAM {e2e['peak_vram_gb']:.2f} GB" if e2e.get("peak_vram_gb") else ""
            lines.append(f"\nEnd to end, {res['steps']}-step {res['size']}x{res['size']} txt2img (CLIP + UNet + VAE, "
                         f"Euler, UNet {e2e['unet']}): {e2e['seconds']:.3f} s (median of {len(e2e['runs_s'])}; "
                         f"first call {e2e['first_call_s']:.1f} s){vram}")
    mem = rows.get("memory")
    if mem is not None:
        if "note" in mem or "skipped" in mem:
            lines.append(f"Peak VRAM: {mem.get('note') or mem['skipped']}")
        else:
            lines.append("Peak VRAM (eager, torch.cuda.max_memory_allocated): " + "; ".join(
                f"{k} {v:.2f} GB" if isinstance(v, float) else f"{k} {v}" for k, v in mem.items()))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                    help="default: fp16 on CUDA, fp32 on the CPU")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (square)")
    ap.add_argument("--batch", type=int, default=1, help="images per step (the UNet batch is twice this: CFG)")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps of the end-to-end image")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed UNet calls per repeat (default: 50 on CUDA, --steps on CPU)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per row, median taken (default: 5 on CUDA, 1 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 3 on CUDA, 1 on CPU)")
    ap.add_argument("--compile-mode", default=None,
                    help='torch.compile mode (default "default"; "max-autotune-no-cudagraphs" on CUDA '
                         'autotunes for minutes)')
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    ap.add_argument("--compile-vae", action=argparse.BooleanOptionalAction, default=True,
                    help="compile vae.decode for the end-to-end image on CUDA")
    ap.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--ckpt", default=None, help="an SD 1.5 checkpoint (default: synthetic full-size weights)")
    ap.add_argument("--tiny", action="store_true", help="the tiny synthetic checkpoint (a smoke test of this script)")
    ap.add_argument("--json", default=None, help="also write the results here (rewritten after every row)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds after start past which the remaining rows are skipped (reported as such)")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    res = run(args)
    print(table(res))
    save(res, args.json)
    return res


if __name__ == "__main__":
    main()
