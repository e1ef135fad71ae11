"""The `sd15` command: `sd15 txt2img|img2img --ckpt FILE ...`, and `sd15 samplers|schedulers|upscalers` lists.

Every argument is checked before the model loads (and before torch is imported); bad input is one line on
stderr and exit code 2. Ctrl-C stops sampling, saves what was made and exits 130.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

COMMANDS = {"txt2img": "txt2img with A1111's samplers, seeds and prompt syntax",
            "img2img": "img2img / inpainting with A1111's samplers, seeds and prompt syntax",
            "samplers": "list the sampler names (and aliases) --sampler takes",
            "schedulers": "list the schedule types --scheduler takes",
            "upscalers": "list the hires upscalers --hr-upscaler takes"}
DEFAULT_MAX_PIXELS = 2048 * 2048  # the server's --max-pixels default


class UsageError(Exception):
    """A bad argument found before the model loads: one line, exit code 2."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_schema_options(parser, *groups: str) -> None:
    """One option per schema field of `groups` (`--field-name`, the schema's default and help)."""
    from sd15.schema import EMPHASIS_MODES, RANDN_SOURCES, fields_of, value_type

    for f in fields_of(*groups):
        flags = [_flag(f.name), *(["--sampler"] if f.name == "sampler_name" else [])]
        help_ = (f.metadata["doc"] or f.name.replace("_", " ")).replace("%", "%%")
        kind = value_type(f)
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_)
        elif kind is not None:
            choices = {"randn_source": RANDN_SOURCES, "emphasis": EMPHASIS_MODES}.get(f.name)
            parser.add_argument(*flags, dest=f.name, type=kind, default=f.default, choices=choices,
                                help=help_)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage block), exit status 2 as before."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser(commands=("txt2img", "img2img")) -> argparse.ArgumentParser:
    """The parser, with the options of `commands` only (`main` passes the command given: `sd15 --help` needs
    no schema)."""
    from sd15 import __version__

    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = _Parser(prog="sd15", description="Stable Diffusion 1.5 in plain PyTorch (A1111-compatible).")
    ap.add_argument("--version", action="version", version=f"sd15 {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, text in COMMANDS.items():
        sp = sub.add_parser(name, help=text, description=text, formatter_class=fmt)
        if name not in commands or name not in ("txt2img", "img2img"):
            continue
        sp.add_argument("--ckpt", required=True, help="SD 1.x checkpoint (.safetensors, .ckpt)")
        sp.add_argument("--vae", help="optional standalone VAE file")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when present)")
        sp.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None,
                        help="default: fp16 on a GPU, fp32 on the CPU")
        sp.add_argument("--out", default="outputs", help="a folder (NNNNN-SEED.png files) or a .png/.jpg/.webp file")
        sp.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest width × height")
        if name == "img2img":
            sp.add_argument("--init", required=True, help="the init image")
            sp.add_argument("--mask", dest="mask_image", help="optional inpainting mask (white = repaint)")
        _add_schema_options(sp, "prompt", "seeds", "sampling", "size", "settings",
                            "img2img" if name == "img2img" else "hires")
    return ap


def _check_file(path: str, flag: str) -> None:
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder, not a file")
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {path}: not readable")


def _check_checkpoint(path: str, flag: str) -> None:
    """Exists, is a file, and is not cut short: a safetensors header that fits in the file, or a complete zip
    (torch.save's format) or a pickle. A missing --ckpt says where to download the weights."""
    import zipfile

    if flag == "--ckpt" and not os.path.exists(path):
        from server.download import model_source

        raise UsageError(f"--ckpt {path}: no such file; download {model_source()[0]} into "
                         f"{os.path.dirname(path) or '.'} (or start sd15-server, which fetches it on its "
                         f"first run)")
    _check_file(path, flag)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head, brace = f.read(8), f.read(1)
    if path.lower().endswith(".safetensors"):  # 8-byte header length, then a JSON object
        ok = size >= 8 and 8 + int.from_bytes(head, "little") <= size and brace == b"{"
    else:
        ok = head.startswith(b"\x80") or zipfile.is_zipfile(path)
    if not ok:
        raise UsageError(f"{flag} {path}: truncated or not a checkpoint ({size:,} bytes)")


def _open_image(path: str, flag: str):
    from PIL import Image, UnidentifiedImageError

    _check_file(path, flag)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise UsageError(f"{flag} {path}: not an image ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def _check_out(out: str) -> None:
    """The output can be written: a file name with a known image extension in an existing, writable folder, or
    a folder in an existing one (created now, so that a bad one fails before the model loads)."""
    from sd15.a1111.images import SAVE_FORMATS

    ext = os.path.splitext(out)[1].lower()
    if ext and ext not in SAVE_FORMATS and not os.path.isdir(out):
        raise UsageError(f"--out {out}: unknown image type {ext!r} (use {', '.join(SAVE_FORMATS)}, or a folder)")
    is_file = ext in SAVE_FORMATS and not os.path.isdir(out)
    if not is_file and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a folder")
    parent = os.path.dirname(out if is_file else os.path.normpath(out)) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: {parent} is not a folder" if os.path.exists(parent) else
                         f"--out {out}: folder {parent} does not exist")
    folder = parent if is_file else out
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: folder {folder} is not writable")


def _device_and_dtype(device: str | None, precision: str | None):
    """(torch.device, dtype or None) from --device / --precision, refusing what cannot run here."""
    import torch

    try:
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError:
        raise UsageError(f"--device {device}: unknown device (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UsageError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: unsupported device type (use cpu, cuda, cuda:N or mps)")
    if precision in ("fp16", "bf16") and dev.type == "cpu":  # the CPU kernels of several layers are fp32 only
        raise UsageError(f"--precision {precision}: needs a GPU; on the CPU use fp32 (the default)")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, None: None}[precision]
    return dev, dtype


def _request(args):
    """The validated, resolved request of the arguments; RequestError names the options."""
    from sd15.schema import FIELDS, GenerationRequest, Limits, RequestError, resolve, validate

    for name in ("width", "height"):
        value = getattr(args, name)
        if value >= 8 and value % 8:
            raise UsageError(f"{_flag(name)} {value}: must be a multiple of 8 (the latent is 1/8 of the image; "
                             f"try {value // 8 * 8} or {value // 8 * 8 + 8})")
    kw = {f.name: getattr(args, f.name) for f in FIELDS.values() if hasattr(args, f.name)}
    if args.command == "img2img":
        kw["init_images"] = [_open_image(args.init, "--init")]
        if args.mask_image:
            kw["mask"] = _open_image(args.mask_image, "--mask")
    request = GenerationRequest(**kw)
    try:
        validate(request, Limits(max_pixels=args.max_pixels))
    except RequestError as e:
        name, msg, _ = e.problems[0]
        hint = " (--max-pixels)" if "the limit is" in msg else " (-1: random)" if name in ("seed", "subseed") else ""
        raise UsageError(f"{_flag(name) if name else ''}{': ' if name else ''}{msg}{hint}") from None
    return resolve(request)


def _steps_run(params) -> int | None:
    """Sampler steps the job will report: img2img and the hires pass run only their share of the schedule
    (A1111's `setup_img2img_steps`: t_enc + 1 steps). None when DPM adaptive chooses its own count."""
    from sd15.samplers import img2img_steps

    if "DPM adaptive" in (params.sampler.name, params.hires and params.hires.sampler.name):
        return None
    first = img2img_steps(params.steps, params.strength)[1] + 1 if params.is_img2img else params.steps
    hires = img2img_steps(params.hires.steps, params.strength, fix_steps=True)[1] + 1 if params.hires else 0
    return params.n_iter * (first + hires)


def generate_images(args) -> tuple[list[str], bool]:
    """Check every argument, load the model, generate and save -> (the paths written, interrupted)."""
    from tqdm import tqdm

    _check_checkpoint(args.ckpt, "--ckpt")
    if args.vae:
        _check_checkpoint(args.vae, "--vae")
    params = _request(args)
    _check_out(args.out)
    device, dtype = _device_and_dtype(args.device, args.precision)  # the first check that needs torch
    if params.cfg_scale < 0:  # allowed, as in A1111's API, but rarely meant
        print(f"sd15: warning: --cfg-scale {params.cfg_scale}: a negative scale steers the image away from the "
              f"prompt", file=sys.stderr)

    import sd15
    from sd15.hashing import cached_hash, short_hash
    from sd15.pipeline import JobState, generate

    model = sd15.load(args.ckpt, vae=args.vae, device=device, dtype=dtype)
    hashes = dict(model_hash=short_hash(cached_hash(args.ckpt)),
                  vae_hash=short_hash(cached_hash(args.vae)) if args.vae else None)
    if args.seed == -1:
        print(f"sd15: seed {params.seeds[0]}", file=sys.stderr)
    state = JobState()
    bar = tqdm(total=_steps_run(params), unit="step", desc=args.command)

    def on_step(*_):
        bar.update(1)
        if bar.total is not None and bar.n >= bar.total:
            bar.close()  # the rate shown stops at the last step, before VAE decoding and saving

    def on_sigint(*_):  # first Ctrl-C: stop after this step and keep what was made; a second one quits
        signal.signal(signal.SIGINT, signal.default_int_handler)
        state.interrupt()

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        result = generate(model, params, state=state, callback=on_step, **hashes)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
        bar.close()
    for w in result.warnings:
        print(f"sd15: warning: {w}", file=sys.stderr)
    return (result.save(args.out) if result.images and bar.n else []), result.interrupted


def _list(command: str) -> list[str]:
    if command == "samplers":
        from sd15.samplers import SAMPLER_TABLE

        return [s.name + (f"  (aliases: {', '.join(s.aliases)})" if s.aliases else "") for s in SAMPLER_TABLE]
    if command == "schedulers":
        from sd15.samplers import SCHEDULER_TABLE

        return [f"{s.label}  ({s.name})" for s in SCHEDULER_TABLE]
    from sd15.a1111.images import LATENT_UPSCALE_MODES, PIXEL_UPSCALERS

    return [*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level has no valued options
    args = _parser((command,) if command else ()).parse_args(argv)
    try:
        if args.command in ("txt2img", "img2img"):
            paths, interrupted = generate_images(args)
        else:
            paths, interrupted = _list(args.command), False
    except KeyboardInterrupt:
        print("sd15: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, OSError, RuntimeError) as e:  # CheckpointError is a ValueError
        print(f"sd15: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    if interrupted:  # Ctrl-C during sampling: what was made is saved
        print(f"sd15: interrupted; saved {len(paths)} image(s)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
