"""`fluxd serve | weights tiny|pull|list|verify | bench gpu|serve|front|accel`. Logging is configured here,
once."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError
from pydantic_settings import CliSettingsSource, SettingsError

from server.declarations.settings import ENV_PREFIX, Settings
from server.declarations.settings_loading import load_settings, problems, settings_cli

logger = logging.getLogger("fluxd")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ensure_tiny(folder: Path) -> None:
    if (folder / "flux.2-dev" / "model_index.json").exists():
        return
    print(f"fluxd: writing tiny random-weight checkpoints into {folder} (first --demo run)...", flush=True)
    # A child process: the serving process must never import torch.
    command = [sys.executable, "-m", "server.tools.cli", "weights", "tiny", "--dir", str(folder)]
    subprocess.run(command, check=True)


def serve(settings: Settings) -> int:
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
        from server.dispatch.ray_app import serve_on_ray

        return serve_on_ray(settings)

    import uvicorn

    from server.app import create_app
    from server.front.connections import uvicorn_options

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
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=level,
            access_log=False,
            **uvicorn_options(settings),
        )
    )
    stop = server.handle_exit

    def handle_exit(sig: int, frame: FrameType | None) -> None:
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
    from pipelines.contract import lora_catalog as loras
    from pipelines.tools import checkpoints

    if args.action == "tiny":
        from pipelines.tools.tiny import write_tiny

        for folder in write_tiny(args.dir, seed=args.seed):
            print(folder)
        return 0
    if args.action == "list":
        for model_id, state, folder, size in checkpoints.listing(args.dir):
            print(f"{model_id:22} {state:22} {size / 1e9:8.2f} GB  {folder}")
        for lora in loras.catalog(args.dir):
            if isinstance(lora, loras.LoraInfo):
                family = loras.FAMILY_TITLES.get(lora.family or "", "FLUX.?")
                state = f"LoRA {family} rank {lora.rank}"
                print(f"{lora.name:22} {state:22} {lora.bytes / 1e9:8.2f} GB  {lora.path}")
            else:
                print(f"{lora[0]:22} {'LoRA, unreadable':22} {'':11}  {lora[1]}")
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

        if args.lora:
            try:
                print(checkpoints.pull_lora(args.lora, token=args.token))
            except (LocalEntryNotFoundError, OSError, ValueError) as exc:
                print(f"fluxd: download of {args.lora} failed ({exc}).", file=sys.stderr)
                return 1
            return 0
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
        from server.tools.bench import main as serve_main

        return serve_main(rest)
    if args.target == "front":
        from server.tools.bench_front import main as front_main

        return front_main(rest)
    if args.target == "accel":
        from pipelines.tools.bench_accel import main as accel_main

        return accel_main(rest)
    from pipelines.tools.bench_gpu import main as gpu_main

    return gpu_main(rest)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_parser() -> tuple[argparse.ArgumentParser, CliSettingsSource[Any]]:
    """The `fluxd` parser, and the settings source that owns `fluxd serve`'s flags (one per setting)."""
    parser = argparse.ArgumentParser(prog="fluxd", description="FLUX behind the OpenAI Images API")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_settings = settings_cli(
        sub.add_parser(
            "serve",
            help="serve the OpenAI Images API",
            description="Serve the OpenAI Images API. Flags override FLUXD_* environment variables, which "
            "override the TOML file (--config), which overrides the defaults.",
            allow_abbrev=False,
        )
    )
    weights_parser = sub.add_parser("weights", help="tiny | pull | list | verify model checkpoints")
    weights_parser.add_argument("action", choices=["tiny", "pull", "list", "verify"])
    weights_parser.add_argument(
        "model", nargs="?", help="model id, or safety-checker or redux (pull); model id (verify)"
    )
    weights_parser.add_argument(
        "--dir", type=Path, default=Path(os.environ.get(f"{ENV_PREFIX}WEIGHTS_DIR", "weights"))
    )
    weights_parser.add_argument("--seed", type=int, default=0, help="seed of the tiny weights")
    weights_parser.add_argument(
        "--lora",
        metavar="REPO",
        help="pull: a LoRA repo from the Hugging Face Hub into its cache, where `loras[].path` finds it",
    )
    weights_parser.add_argument(
        "--token", default=os.environ.get("HF_TOKEN"), help="Hugging Face token (gated repos)"
    )
    # No -h of its own: `fluxd bench serve --help` reaches the target's parser, which knows the options.
    bench_parser = sub.add_parser(
        "bench",
        help="gpu: synthetic full-size models on a CUDA device; serve: HTTP overhead, batching, soak; "
        "front: the HTTP front's CPU per image over an instant worker; accel: what each acceleration level "
        "saves",
        add_help=False,
    )
    bench_parser.add_argument("target", choices=["gpu", "serve", "front", "accel"])
    return parser, serve_settings


def main(argv: list[str] | None = None) -> int:
    parser, serve_settings = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "serve":
        try:
            settings = load_settings(args, serve_settings)
        except (ValidationError, SettingsError) as exc:
            print(f"fluxd: {problems(exc)}", file=sys.stderr)
            return 2
        _configure_logging(settings.log_level)
        return serve(settings)
    _configure_logging(os.environ.get(f"{ENV_PREFIX}LOG_LEVEL", "INFO"))
    if args.command == "weights":
        if args.action in ("pull",) and not (args.model or args.lora):
            parser.error("weights pull needs a model id or --lora REPO")
        return weights(args)
    return bench(args, rest)


if __name__ == "__main__":
    sys.exit(main())
