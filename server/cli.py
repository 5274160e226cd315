"""`fluxd serve | weights tiny|pull|list|verify | bench gpu|serve`. Logging is configured here, once."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from pipelines.modes import MODES
from server.config import DEFAULT_CACHE, ENV_PREFIX, load_settings

logger = logging.getLogger("fluxd")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve the OpenAI Images API")
    serve.add_argument(
        "--config", type=Path, help=f"TOML settings and model registry (env {ENV_PREFIX}CONFIG)"
    )
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--weights-dir", type=Path, help="folder with one diffusers checkpoint per model id")
    serve.add_argument(
        "--demo", action="store_true", default=None, help="serve tiny random weights (images are noise)"
    )
    serve.add_argument(
        "--weights",
        choices=("disk", "synthetic"),
        help="disk (default): checkpoints from --weights-dir; synthetic: full-size random weights built on "
        "each CUDA device from the published configs, for benchmarks (images are noise)",
    )
    serve.add_argument("--default-model", help="model used when a request names none (default flux.2-dev)")
    serve.add_argument("--public-url", help="absolute base of returned image URLs, e.g. http://gpu-box:8000")
    serve.add_argument("--api-key", action="append", dest="api_keys", help="accepted bearer key (repeatable)")
    serve.add_argument("--api-key-file", type=Path, help="file with one accepted key per line")
    serve.add_argument(
        "--no-auth", action="store_true", default=None, help="allow a non-loopback bind without keys"
    )
    serve.add_argument(
        "--cors-origin", action="append", dest="cors_origins", help="allowed CORS origin (repeatable)"
    )
    serve.add_argument(
        "--devices", help="comma-separated devices, one worker each (default cpu, e.g. cuda:0,cuda:1)"
    )
    serve.add_argument("--preload", help="comma-separated model ids loaded at start-up (ready only after)")
    serve.add_argument(
        "--memory-budget-gb", type=float, help="checkpoints kept loaded per worker, LRU out first"
    )
    serve.add_argument(
        "--mode",
        choices=MODES,
        help="how every model runs: auto (default), resident, fast, lowvram, offload; per model in TOML",
    )
    serve.add_argument(
        "--prompt-cache-mb", type=float, help="text-encoder outputs kept per worker (default 512, 0: off)"
    )
    serve.add_argument("--queue-size", type=int, help="queued requests per model before 429 (default 64)")
    serve.add_argument(
        "--queue-timeout", type=float, dest="queue_timeout_s", help="seconds queued before 504"
    )
    serve.add_argument("--max-batch-images", type=int, help="images run in one pipeline call (default 4)")
    serve.add_argument("--image-ttl", type=float, dest="image_ttl_s", help="seconds a url stays valid (3600)")
    serve.add_argument("--store-dir", type=Path, help="folder for url images")
    serve.add_argument("--store-quota-mb", type=float, help="disk quota of the image store (2048)")
    serve.add_argument("--max-body-mb", type=float, help="largest request body (50)")
    serve.add_argument("--worker-threads", type=int, help="torch threads per CPU worker")
    serve.add_argument(
        "--log-prompts", action="store_true", default=None, help="log prompts (off by default)"
    )
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    serve.add_argument("--ray", help="serve through Ray Serve: auto, a cluster address, or local")


def _ensure_tiny(folder: Path) -> None:
    if (folder / "flux.2-dev" / "model_index.json").exists():
        return
    print(f"fluxd: writing tiny random-weight checkpoints into {folder} (first --demo run)...", flush=True)
    # A child process: the serving process must never import torch.
    subprocess.run([sys.executable, "-m", "server.cli", "weights", "tiny", "--dir", str(folder)], check=True)


def serve(args: argparse.Namespace) -> int:
    flags = {key: value for key, value in vars(args).items() if key not in ("command", "config")}
    for name in ("devices", "preload"):
        if isinstance(flags.get(name), str):
            flags[name] = [part.strip() for part in flags[name].split(",") if part.strip()]
    settings = load_settings(flags, config_file=args.config)
    if settings.demo and args.weights_dir is None and f"{ENV_PREFIX}WEIGHTS_DIR" not in os.environ:
        settings.weights_dir = DEFAULT_CACHE / "tiny"
    keys = settings.all_api_keys()
    if not _loopback(settings.host) and not keys:
        if not settings.no_auth:
            print(
                f"fluxd: refusing to bind {settings.host} without an API key. Pass --api-key KEY "
                f"(or {ENV_PREFIX}API_KEYS, --api-key-file), or --no-auth to serve the network "
                "unauthenticated.",
                file=sys.stderr,
            )
            return 2
        logger.warning(
            "serving %s WITHOUT authentication (--no-auth): anyone on the network can use it", settings.host
        )

    if settings.synthetic_weights and not all(d.startswith("cuda") for d in settings.devices):
        print(
            "fluxd: --weights synthetic builds every model at full size (FLUX.2 [dev] alone is ~112 GB in "
            "bf16) on its worker's GPU; it needs CUDA devices, e.g. --devices cuda:0.",
            file=sys.stderr,
        )
        return 2
    if settings.demo:
        _ensure_tiny(settings.weights_dir)
    if settings.ray:
        from server.ray_app import serve_on_ray

        return serve_on_ray(settings)

    import uvicorn

    from server.app import create_app

    app = create_app(settings)
    if not app.state.specs:
        print(
            f"fluxd: no model weights found in {settings.weights_dir}. Try `fluxd weights list`, "
            "`fluxd weights pull flux.2-dev`, or `fluxd serve --demo`.",
            file=sys.stderr,
        )
        return 2
    # A wildcard bind is reached through the machine's name; the key itself is never printed.
    host = socket.gethostname() if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}"
    auth = ' -H "Authorization: Bearer $FLUXD_API_KEY"' if keys else ""
    print(f"\nfluxd serving {', '.join(app.state.specs)} at {url}/v1  (playground: {url}/)", flush=True)
    print(
        f"try: curl {url}/v1/images/generations{auth} -H 'Content-Type: application/json' "
        f"""-d '{{"prompt": "a red fox", "response_format": "b64_json"}}'""",
        flush=True,
    )
    if settings.synthetic_weights:
        print("SYNTHETIC WEIGHTS: full-size models with RANDOM weights, for benchmarks. Images are noise.\n")
    if settings.demo:
        print(
            "DEMO MODE: these models have tiny RANDOM weights. Every image is noise; "
            "use `fluxd weights pull` for real ones.\n",
            flush=True,
        )
    level = settings.log_level.lower()
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, log_level=level, access_log=False)
    )
    stop = server.handle_exit

    def handle_exit(sig: int, frame: object) -> None:
        # A signal to the whole process group (a terminal's Ctrl-C, `timeout`, systemd) also reaches the
        # workers; from the moment it arrives, a worker that exits is not replaced.
        pool = getattr(app.state, "pool", None)
        if pool is not None:
            pool.closing()
        stop(sig, frame)

    server.handle_exit = handle_exit  # type: ignore[method-assign]
    server.run()
    return 0


def weights(args: argparse.Namespace) -> int:
    from pipelines import checkpoints

    if args.action == "tiny":
        from pipelines.tiny import write_tiny

        for folder in write_tiny(args.dir, seed=args.seed):
            print(folder)
        return 0
    if args.action == "list":
        for model_id, state, folder, size in checkpoints.listing(args.dir):
            print(f"{model_id:22} {state:22} {size / 1e9:8.2f} GB  {folder}")
        return 0
    if args.action == "verify":
        ids = (
            [args.model]
            if args.model
            else [m for m, state, _, _ in checkpoints.listing(args.dir) if state == "present"]
        )
        failed = 0
        for model_id, _, folder, _ in (row for row in checkpoints.listing(args.dir) if row[0] in ids):
            problems = checkpoints.verify(folder)
            failed += bool(problems)
            print(f"{model_id}: {'ok' if not problems else 'BROKEN'}")
            for problem in problems:
                print(f"  {problem.path}: {problem.message}")
        return 1 if failed else 0
    if args.action == "pull":
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            target = checkpoints.pull(args.model, args.dir, token=args.token)
        except (ValueError, LookupError) as exc:
            print(f"fluxd: {exc}", file=sys.stderr)
            return 2
        except (LocalEntryNotFoundError, OSError) as exc:
            print(
                f"fluxd: download failed ({exc}).\n{checkpoints.offline_hint(args.model, args.dir)}",
                file=sys.stderr,
            )
            return 1
        problems = checkpoints.verify(target)
        for problem in problems:
            print(f"  {problem.path}: {problem.message}", file=sys.stderr)
        return 1 if problems else 0
    return 2


def bench(args: argparse.Namespace, rest: list[str]) -> int:
    if args.target == "serve":
        from server.bench import main as serve_main

        return serve_main(rest)
    from pipelines.bench_gpu import main as gpu_main

    return gpu_main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxd", description="FLUX behind the OpenAI Images API")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    weights_parser = sub.add_parser("weights", help="tiny | pull | list | verify model checkpoints")
    weights_parser.add_argument("action", choices=["tiny", "pull", "list", "verify"])
    weights_parser.add_argument("model", nargs="?", help="model id (pull, verify)")
    weights_parser.add_argument(
        "--dir", type=Path, default=Path(os.environ.get(f"{ENV_PREFIX}WEIGHTS_DIR", "weights"))
    )
    weights_parser.add_argument("--seed", type=int, default=0, help="seed of the tiny weights")
    weights_parser.add_argument(
        "--token", default=os.environ.get("HF_TOKEN"), help="Hugging Face token (gated repos)"
    )
    # No -h of its own: `fluxd bench serve --help` reaches the target's parser, which knows the options.
    bench_parser = sub.add_parser(
        "bench",
        help="gpu: synthetic full-size models on a CUDA device; serve: HTTP overhead, batching, soak",
        add_help=False,
    )
    bench_parser.add_argument("target", choices=["gpu", "serve"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=getattr(args, "log_level", None) or os.environ.get(f"{ENV_PREFIX}LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        return serve(args)
    if args.command == "weights":
        if args.action in ("pull",) and not args.model:
            parser.error("weights pull needs a model id")
        return weights(args)
    return bench(args, rest)


if __name__ == "__main__":
    sys.exit(main())
