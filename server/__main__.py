"""`python -m server` / `sd15-server`: the A1111-compatible API with A1111's flag names.

    python -m server --ckpt-dir weights --port 7860 --api-auth admin:secret

With an empty checkpoint folder it first downloads v1-5-pruned-emaonly.safetensors from Hugging Face, as
A1111 does (--no-download to refuse; SD15_MODEL_URL / SD15_MODEL_SHA256 for a mirror). Anything that
stops it from starting (a bad file, no model, a bad flag) is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sd15-server", description="AUTOMATIC1111-compatible HTTP API for sd15.")
    ap.add_argument("--ckpt-dir", default="weights", help="checkpoint folder (default: weights/)")
    ap.add_argument("--ckpt", default=None, help="checkpoint to start with (default: "
                                                 "v1-5-pruned-emaonly.safetensors if present, else the first)")
    ap.add_argument("--vae-dir", default=None, help="VAE folder (default: <ckpt-dir>/VAE)")
    ap.add_argument("--lora-dir", default=None, help="LoRA folder (default: <ckpt-dir>/Lora)")
    ap.add_argument("--embeddings-dir", default=None, help="textual-inversion folder (default: <ckpt-dir>/embeddings)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--listen", action="store_true", help="bind all interfaces (default: 127.0.0.1 only)")
    ap.add_argument("--server-name", default=None, help="explicit address to bind (overrides --listen)")
    ap.add_argument("--api-auth", default=None, help="user:password[,user:password...]: HTTP Basic on every route")
    ap.add_argument("--cors-allow-origins", default=None, help="comma-separated origins allowed by CORS ('*' for any)")
    ap.add_argument("--cors-allow-origins-regex", default=None, help="regex of origins allowed by CORS")
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when present)")
    ap.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None,
                    help="default: fp16 on CUDA, fp32 on the CPU")
    ap.add_argument("--no-download", action="store_true", help="never download the default checkpoint")
    ap.add_argument("--optimize", action="store_true",
                    help="CUDA: torch.compile + CUDA graphs (sd15.fast) and a 512x512 warm-up at each model load")
    ap.add_argument("--max-pixels", type=int, default=None, help="largest width*height of any pass (default 2048*2048)")
    ap.add_argument("--max-steps", type=int, default=None, help="most sampling steps per pass (default 1000)")
    ap.add_argument("--max-batch-size", type=int, default=None, help="largest batch_size (default 16)")
    ap.add_argument("--max-body-mb", type=float, default=None, help="largest request body in MiB (default 64)")
    ap.add_argument("--esrgan-models-path", default=None, help="ESRGAN upscaler folder (default: <ckpt-dir>/ESRGAN)")
    ap.add_argument("--realesrgan-models-path", default=None,
                    help="Real-ESRGAN upscaler folder (default: <ckpt-dir>/RealESRGAN)")
    ap.add_argument("--api-server-stop", action="store_true",
                    help="enable POST /sdapi/v1/server-kill, /server-restart and /server-stop")
    ap.add_argument("--max-prompt-chars", type=int, default=None, help="longest prompt (default 20000)")
    ap.add_argument("--outdir", default="outputs", help="folder for saved images (default: outputs/)")
    ap.add_argument("--no-save", action="store_true", help="never write images (save_images and the page's "
                                                             "saving are ignored)")
    ap.add_argument("--queue-size", type=int, default=64, help="jobs that may wait (default 64); beyond: 503")
    ap.add_argument("--max-job-seconds", type=float, default=None,
                    help="stop a running job after this many seconds and return what it made (default: no limit)")
    ap.add_argument("--keep-abandoned-jobs", action="store_true",
                    help="run jobs whose client disconnected anyway (A1111's behaviour; default: cancel them)")
    ap.add_argument("--allowed-hosts", default=None,
                    help="comma-separated Host names to answer besides localhost ('*' for any; default: "
                         "loopback names, any name with --api-auth; IP addresses are always accepted)")
    ap.add_argument("--max-connections", type=int, default=256, help="open connections at most (default 256)")
    ap.add_argument("--header-timeout", type=float, default=10.0,
                    help="seconds to send a request head (default 10)")
    ap.add_argument("--body-timeout", type=float, default=60.0, help="seconds to send a request body (default 60)")
    ap.add_argument("--keep-alive-timeout", type=float, default=5.0, help="idle keep-alive seconds (default 5)")
    ap.add_argument("--shutdown-grace", type=float, default=30.0,
                    help="seconds the running job may take to finish at shutdown (default 30)")
    ray = ap.add_argument_group("scale-out on Ray Serve (pip install \"sd15[ray]\")")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve: one ingress, --replicas workers")
    ray.add_argument("--replicas", type=int, default=1, help="workers, each loading the model once (default 1)")
    ray.add_argument("--ray-address", default=None, help="join a running cluster ('auto' after `ray start`); "
                                                         "default: start a local one")
    ray.add_argument("--ray-worker-cpus", type=float, default=1.0, help="CPUs reserved per worker (default 1)")
    ray.add_argument("--ray-worker-gpus", type=float, default=None,
                     help="GPUs per worker (default: 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--ray-max-queued", type=int, default=None,
                     help="jobs waiting beyond the running ones before 503 + Retry-After (default 16 per worker)")
    ap.add_argument("--api", action="store_true", help="accepted for A1111 compatibility (the API is always on)")
    ap.add_argument("--nowebui", action="store_true", help="accepted for A1111 compatibility (there is no web UI)")
    return ap


def parse_auth(text: str | None) -> list[tuple[str, str]]:
    """"u1:p1,u2:p2" -> [("u1", "p1"), ("u2", "p2")]; the password is everything after the first colon."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        user, colon, password = item.strip().partition(":")
        if not colon or not user or not password:
            raise ValueError(f"--api-auth: {item.strip()!r} is not user:password")
        pairs.append((user, password))
    return pairs


def config_from_args(args):
    from server.a1111 import Limits
    from server.app import ServerConfig

    given = dict(max_pixels=args.max_pixels, max_steps=args.max_steps, max_batch_size=args.max_batch_size,
                 max_body_bytes=int(args.max_body_mb * 2**20) if args.max_body_mb else None,
                 max_prompt_chars=args.max_prompt_chars)
    limits = Limits(**{name: value for name, value in given.items() if value})
    for name in ("queue_size", "max_connections", "max_prompt_chars", "replicas"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    origins = [o for o in (args.cors_allow_origins or "").split(",") if o]
    flags = dict(vars(args))
    flags.update(api=True, nowebui=True, api_auth="<set>" if args.api_auth else None)  # never show credentials
    return ServerConfig(
        ckpt_dir=args.ckpt_dir, ckpt=args.ckpt,
        vae_dir=args.vae_dir or os.path.join(args.ckpt_dir, "VAE"),
        lora_dir=args.lora_dir or os.path.join(args.ckpt_dir, "Lora"),
        embeddings_dir=args.embeddings_dir or os.path.join(args.ckpt_dir, "embeddings"),
        device=args.device, precision=args.precision, api_auth=parse_auth(args.api_auth),
        cors_allow_origins=origins, cors_allow_origins_regex=args.cors_allow_origins_regex, limits=limits,
        flags=flags, optimize=args.optimize, outdir=args.outdir, save=not args.no_save, queue_size=args.queue_size,
        max_job_seconds=args.max_job_seconds, keep_abandoned_jobs=args.keep_abandoned_jobs,
        allowed_hosts=[h.strip() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else None,
        body_timeout=args.body_timeout, shutdown_grace=args.shutdown_grace)


def ensure_checkpoint(config, no_download: bool) -> None:
    """A1111's first run: no checkpoint at all (and none named by --ckpt) -> download the default one."""
    from server.download import DEFAULT_MODEL, DEFAULT_URL, fetch_default_checkpoint
    from server.models import Library

    if config.ckpt and config.ckpt != DEFAULT_MODEL:
        return  # a named checkpoint that is missing is reported when it is loaded
    if Library(config.ckpt_dir, config.vae_dir, config.lora_dir, config.embeddings_dir).checkpoints:
        return
    if no_download:
        raise FileNotFoundError(f"no checkpoint in {os.path.abspath(config.ckpt_dir)}; download {DEFAULT_URL} "
                                f"into it (or run without --no-download)")
    print(f"sd15-server: no checkpoint in {os.path.abspath(config.ckpt_dir)}; downloading {DEFAULT_MODEL}",
          file=sys.stderr)
    fetch_default_checkpoint(config.ckpt_dir)


def startup_warnings(host: str, config) -> list[str]:
    """What an operator must see at start-up: a server reachable from other machines without --api-auth,
    a CORS wildcard."""
    out = []
    if not host.startswith("127.") and host not in ("localhost", "::1") and not config.api_auth:
        out += ["!" * 100,
                f"listening on {host} WITHOUT --api-auth: anyone who can reach this port can run jobs and change "
                f"the options. Set --api-auth user:password.",
                "!" * 100]
    if "*" in config.cors_allow_origins:
        out.append("--cors-allow-origins '*': any site may call this server from a browser; credentials "
                   "(cookies, Basic auth) are then not sent with cross-origin requests")
    return out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    try:
        import uvicorn

        from server.app import Engine, create_app

        config = config_from_args(args)
        host = args.server_name or ("0.0.0.0" if args.listen else "127.0.0.1")
        ensure_checkpoint(config, args.no_download)
        if args.ray:
            try:
                from server import ray_serve
            except ImportError as e:
                print(f'sd15-server: error: --ray needs Ray Serve ({e}); pip install "sd15[ray]"',
                      file=sys.stderr)
                return 2
            return ray_serve.main(config, args, host)
        engine = Engine(config)
        engine.start()  # a bad file is reported here, before the port opens
    except KeyboardInterrupt:
        print("sd15-server: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, LookupError) as e:  # CheckpointError, DownloadError, bad flags
        print(f"sd15-server: error: {e}", file=sys.stderr)
        return 2
    for line in startup_warnings(host, config):
        logging.getLogger("server").warning("%s", line)
    print(f"sd15-server: {engine.models.model!r}", file=sys.stderr)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"sd15-server: page and API at http://{shown}:{args.port}/ (API docs: /openapi.json)", file=sys.stderr)
    from server.net import Server, guarded_protocol

    app = create_app(config, engine)
    uv = uvicorn.Config(app, host=host, port=args.port, log_level="info", timeout_keep_alive=args.keep_alive_timeout,
                        http=guarded_protocol(args.header_timeout, args.max_connections, engine.metrics),
                        h11_max_incomplete_event_size=64 * 1024,
                        timeout_graceful_shutdown=args.shutdown_grace + 15)
    server = Server(uv, engine, args.shutdown_grace)
    server.run()
    if server.forced:
        print("sd15-server: forced quit", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)  # a thread still in the sampler must not keep the process alive
    return 0


if __name__ == "__main__":
    sys.exit(main())
