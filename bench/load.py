"""Checkpoint load time and peak memory: `sd15.load` vs diffusers' `StableDiffusionPipeline.from_single_file`.

Both load the same full-size SD 1.5 `.safetensors` file (a random-weight file in the exact layout of
v1-5-pruned-emaonly.safetensors, written by tests/synthetic.py unless `--ckpt` is given) to the CPU in fp32.
Each load runs in a fresh Python subprocess, so no Python state is shared; the file is read once up front so
that both see a warm page cache (the warm-up read is timed and reported).

Diffusers is loaded fully offline: a diffusers-layout config folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/ built from sd15's own BPE vocabulary, scheduler/) is written next to the checkpoint
and passed as `config=`, with `local_files_only=True` and HF_HUB_OFFLINE=1. That is the complete pipeline
load (UNet + VAE + CLIP text encoder + tokenizer + scheduler), the same set of things `sd15.load` builds.

Measured in each child:
  load_s   wall time of the load call alone (after `import torch` and the library import)
  touch_s  one pass reading every parameter (a sum): makes lazily mapped weights (mmap) actually resident,
           so "load + touch" is the time to weights that are really in memory, for both
  peak RSS VmHWM of the child (includes the interpreter + torch baseline, reported separately)

    python bench/load.py                        # writes a 4.3 GB temp file, deletes it afterwards
    python bench/load.py --ckpt weights/x.safetensors --repeat 3
    python bench/load.py --pythonpath /tmp/bench-deps   # e.g. where `accelerate` was pip-installed --target

diffusers uses its fast path (`low_cpu_mem_usage`: empty-weight init, then assign) only when `accelerate` is
importable; without it, it randomly initialises every weight before loading. The printout says which ran.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.resources
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- child side ----------------------------------------------------------------------------------

def _status() -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def child(which: str, ckpt: str, config: str | None, threads: int | None) -> None:
    t0 = time.perf_counter()
    import torch
    if threads:
        torch.set_num_threads(threads)
    if which == "sd15":
        import sd15
    else:
        import diffusers
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import is_accelerate_available
        diffusers.utils.logging.disable_progress_bar()
    import_s = time.perf_counter() - t0
    base = _status()["VmRSS"]

    t1 = time.perf_counter()
    if which == "sd15":
        model = sd15.load(ckpt, device="cpu", dtype=torch.float32)
        modules = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder}
        info = {}
    else:
        pipe = StableDiffusionPipeline.from_single_file(ckpt, config=config, local_files_only=True,
                                                        torch_dtype=torch.float32)
        modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
        info = {"accelerate": is_accelerate_available(), "diffusers": diffusers.__version__,
                "components": sorted(k for k, v in pipe.components.items() if v is not None)}
    load_s = time.perf_counter() - t1
    after_load = _status()

    t2 = time.perf_counter()
    with torch.inference_mode():
        checksum = sum(float(p.double().sum()) if p.dtype != torch.float32 else float(p.sum())
                       for m in modules.values() for p in m.parameters())
    touch_s = time.perf_counter() - t2
    end = _status()
    result = dict(which=which, import_s=import_s, load_s=load_s, touch_s=touch_s, base_rss=base,
                  after_load=after_load, end=end, threads=torch.get_num_threads(), checksum=checksum,
                  params={k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()},
                  dtypes=sorted({str(p.dtype) for m in modules.values() for p in m.parameters()}), **info)
    print("RESULT " + json.dumps(result), flush=True)


# --- the offline diffusers config folder --------------------------------------------------------

def _bpe_merges() -> list[str]:
    """The first 48,894 merge lines of sd15's bundled bpe_simple_vocab_16e6.txt.gz (line 0 is a header)."""
    from sd15.clip.tokenizer import VOCAB_SIZE
    with importlib.resources.files("sd15.clip").joinpath("bpe_simple_vocab_16e6.txt.gz").open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    return lines[1:1 + VOCAB_SIZE - 256 - 256 - 2]


def write_diffusers_config(folder: str) -> str:
    """A diffusers-layout SD 1.5 folder with configs and tokenizer files only (no weights)."""
    from sd15.clip.tokenizer import Tokenizer

    def dump(rel, obj):
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)

    dump("model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None], "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    dump("unet/config.json", {
        "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
        "cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False,
    })
    dump("vae/config.json", {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
        "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
    })
    dump("text_encoder/config.json", {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
        "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02,
        "initializer_factor": 1.0, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
        "torch_dtype": "float32",
    })
    dump("tokenizer/vocab.json", Tokenizer().vocab)
    with open(os.path.join(folder, "tokenizer/merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(_bpe_merges()) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    dump("tokenizer/special_tokens_map.json", special)
    dump("tokenizer/tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                             "do_lower_case": True, "errors": "replace", **special})
    dump("scheduler/scheduler_config.json", {
        "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "trained_betas": None, "skip_prk_steps": True,
        "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False,
    })
    return folder


# --- parent side --------------------------------------------------------------------------------

def warm_read(path: str) -> float:
    """Read the whole file once (so the page cache is warm for both loaders); returns seconds."""
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t


def run_child(which: str, ckpt: str, config: str, threads: int | None, pythonpath: str | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               DIFFUSERS_VERBOSITY="error", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    paths = [ROOT] + ([pythonpath] if pythonpath else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--ckpt", ckpt, "--config", config]
    if threads:
        cmd += ["--threads", str(threads)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{which} child failed (exit {proc.returncode})")
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_s"] = wall
    return res


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="full-size SD 1.5 .safetensors (default: write a synthetic one to a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and config folder")
    ap.add_argument("--workdir", default=None, help="where temp files go (default: $TMPDIR or /tmp)")
    ap.add_argument("--repeat", type=int, default=1, help="loads of each, alternating order (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in both children (default: torch's)")
    ap.add_argument("--pythonpath", default=None,
                    help="extra sys.path entry for both children (e.g. a --target dir with accelerate)")
    ap.add_argument("--child", choices=["sd15", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        child(args.child, args.ckpt, args.config, args.threads)
        return

    sys.path.insert(0, ROOT)
    tmp = tempfile.mkdtemp(prefix="sd15-bench-load-", dir=args.workdir)
    try:
        ckpt = args.ckpt
        if ckpt is None:
            ckpt = os.path.join(tmp, "sd15-synth.safetensors")
            print(f"writing a synthetic full-size checkpoint to {ckpt} ...", flush=True)
            subprocess.run([sys.executable, os.path.join(ROOT, "tests", "synthetic.py"), "--out", ckpt], check=True)
        config = write_diffusers_config(os.path.join(tmp, "diffusers-config"))
        size = os.path.getsize(ckpt)
        warm = warm_read(ckpt)
        print(f"checkpoint: {ckpt} ({size:,} bytes)")
        print(f"warm-up read of the whole file: {warm:.2f} s ({size / warm / 1e9:.2f} GB/s); page cache now warm")

        results = {"sd15": [], "diffusers": []}
        for r in range(args.repeat):
            order = ("sd15", "diffusers") if r % 2 == 0 else ("diffusers", "sd15")
            for which in order:
                rewarm = warm_read(ckpt)  # keeps the page cache warm (this VM reclaims cold pages proactively)
                res = run_child(which, ckpt, config, args.threads, args.pythonpath)
                results[which].append(res)
                print(f"  run {r + 1} {which:9s}: load {res['load_s']:6.2f} s, +touch {res['touch_s']:5.2f} s, "
                      f"process {res['process_s']:6.2f} s, peak RSS {gb(res['end']['VmHWM'])}  "
                      f"(re-read before: {rewarm:.2f} s)", flush=True)
        report(results, size, args)
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def report(results: dict, size: int, args) -> None:
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("load_s", "touch_s", "process_s", "import_s")}
           for k, v in results.items()}
    peak = {k: max(r["end"]["VmHWM"] for r in v) for k, v in results.items()}
    base = {k: statistics.median(r["base_rss"] for r in v) for k, v in results.items()}
    last = {k: v[-1] for k, v in results.items()}
    d = last["diffusers"]
    s = last["sd15"]
    print()
    print(f"threads: {s['threads']} (both)  |  repeats: {args.repeat}, alternating order, medians below")
    print("diffusers measured: StableDiffusionPipeline.from_single_file(ckpt, config=<local diffusers-layout "
          "folder>, local_files_only=True, torch_dtype=float32)")
    print(f"  diffusers {d['diffusers']}, accelerate importable: {d['accelerate']} -> "
          + ("low_cpu_mem_usage path (empty init + assign)" if d["accelerate"]
             else "NO accelerate: diffusers randomly initialises the UNet/VAE before loading (its slow path)"))
    print(f"  components built: {', '.join(d['components'])}")
    print(f"  parameters  sd15: {s['params']}  diffusers: {d['params']}")
    print()
    print(f"{'':24s}{'sd15':>12s}{'diffusers':>12s}{'ratio':>8s}")
    rows = [("load call (s)", "load_s"), ("touch all weights (s)", "touch_s")]
    for label, key in rows:
        a, b = med["sd15"][key], med["diffusers"][key]
        print(f"{label:24s}{a:12.2f}{b:12.2f}{a / b:8.2f}")
    a = med["sd15"]["load_s"] + med["sd15"]["touch_s"]
    b = med["diffusers"]["load_s"] + med["diffusers"]["touch_s"]
    print(f"{'load + touch (s)':24s}{a:12.2f}{b:12.2f}{a / b:8.2f}")
    a, b = med["sd15"]["process_s"], med["diffusers"]["process_s"]
    print(f"{'whole process (s)':24s}{a:12.2f}{b:12.2f}{a / b:8.2f}   (interpreter + imports + load + touch)")
    print(f"{'imports (s)':24s}{med['sd15']['import_s']:12.2f}{med['diffusers']['import_s']:12.2f}")
    print(f"{'peak RSS (GB)':24s}{peak['sd15'] / 1e9:12.2f}{peak['diffusers'] / 1e9:12.2f}"
          f"{peak['sd15'] / peak['diffusers']:8.2f}")
    print(f"{'  RSS before load (GB)':24s}{base['sd15'] / 1e9:12.2f}{base['diffusers'] / 1e9:12.2f}")
    for k in ("RssAnon", "RssFile"):
        print(f"{'  ' + k + ' at end (GB)':24s}{s['end'][k] / 1e9:12.2f}{d['end'][k] / 1e9:12.2f}")
    print()
    ratio = med["sd15"]["load_s"] / med["diffusers"]["load_s"]
    rss_ratio = peak["sd15"] / size
    print(f"sd15 / diffusers load time: {ratio:.2f}  (goal <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'})")
    print(f"sd15 peak RSS / file size: {rss_ratio:.2f}  ({gb(peak['sd15'])} / {gb(size)}; goal <= 1.2: "
          f"{'met' if rss_ratio <= 1.2 else 'NOT met'}); excluding the pre-load baseline: "
          f"{(peak['sd15'] - base['sd15']) / size:.2f}")


if __name__ == "__main__":
    main()
