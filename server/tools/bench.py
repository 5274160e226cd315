"""`fluxd bench serve`: a real server on 127.0.0.1 over the tiny checkpoints, measured in one run.

- overhead: p50 latency of one request over HTTP at concurrency 1, divided by the p50 of the same request as
  a direct `Engine.render` call in this process. The two alternate, so both see the same background load.
- batching: images per second at --concurrency from a server batching up to --max-batch-images, divided by
  the same request mix against a second server with --max-batch-images 1.
- soak: --soak-requests over mixed models, sizes, n and response formats at --soak-concurrency: requests
  lost (no answer), 5xx, and the HTTP process's resident memory at request 100 and at the end.
- LoRA: in-process on the tiny checkpoints, a user LoRA's first load, and the p50 of renders with it switched
  on against renders without it, alternating (so each one switches adapters): information, no target.

With --ray, it measures instead images/s through Ray Serve with one and with two engine replicas
(server/tools/bench_ray.py).

It prints one markdown table and exits 1 when a target is missed, 2 when the run itself failed. The
arithmetic, the verdicts and the table are pure functions (tests/unit/test_bench_serve.py). This module does
not import torch at import time: only the direct call and writing the tiny weights need it.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.contract.errors import InvalidParameter
from server.tools.bench_report import (
    OVERHEAD_BODY,
    PROMPTS,
    SOAK_MODELS,
    SOAK_SIZES,
    LoraCost,
    Measured,
    Soak,
    format_report,
    table_rows,
    tally,
)

if TYPE_CHECKING:
    import httpx
from server.tools.bench_harness import (
    BenchError,
    ServerProcess,
    _require_ok,
    children_rss,
    exit_on_sigterm,
    machine_description,
    measure_throughput,
    post_image,
    read_rss,
    run_load,
    running_server,
    write_tiny_weights,
)

logger = logging.getLogger(__name__)

RSS_MARK = 100  # the soak's memory baseline: after the first loads, before the long run
WARMUP_REQUESTS = 2

SOAK_STEPS = 4
FIXED_SCHEDULE = {"flux.2-dev-turbo"}  # soaks at its default 8 steps: fal's own sigmas, no derived schedule

# (requests, soak requests, soak concurrency): full run, --quick smoke run.
FULL = (64, 500, 16)
QUICK = (6, 40, 8)


# ---- pure helpers -------------------------------------------------------------------------------------


def soak_body(index: int) -> dict[str, Any]:
    """The soak's request `index`: models cycle fastest, so every model has loaded well before RSS_MARK."""
    model = SOAK_MODELS[index % len(SOAK_MODELS)]
    body: dict[str, Any] = {
        "model": model,
        "prompt": PROMPTS[index % len(PROMPTS)],
        "size": SOAK_SIZES[(index // len(SOAK_MODELS)) % len(SOAK_SIZES)],
        "response_format": "url" if index % 3 == 2 else "b64_json",
        "seed": index,
    }
    if model not in FIXED_SCHEDULE:
        body["num_inference_steps"] = SOAK_STEPS
    if index % 7 == 6:
        body["n"] = 2
    return body


# ---- processes ----------------------------------------------------------------------------------------


# ---- load ---------------------------------------------------------------------------------------------


def direct_renderer(weights_dir: Path, body: dict[str, Any]) -> Callable[[], float]:
    """A function timing (ms) one in-process Engine.render of `body`, resolved by the server's own rules."""
    from pipelines.contract.specs import SPECS
    from pipelines.engine.engine import Engine
    from server.declarations.protocol import ImageGenerationRequest
    from server.front.normalize import build_request

    request, _ = build_request(ImageGenerationRequest(**body), SPECS[body["model"]], {})
    engine = Engine(SPECS, weights_dir)

    def render_ms() -> float:
        started = time.perf_counter()
        engine.render([request])
        return (time.perf_counter() - started) * 1000

    return render_ms


BENCH_LORA = "tiny-flux2-style"  # written with the tiny checkpoints (pipelines/tools/tiny.py)


def measure_lora(weights_dir: Path, count: int, deadline: float) -> LoraCost | None:
    """A LoRA's first load, then renders alternating between the base and the base with the cached LoRA."""
    from pipelines.contract.specs import SPECS
    from pipelines.engine.engine import Engine
    from server.declarations.protocol import ImageGenerationRequest
    from server.front.normalize import build_request

    spec = SPECS[OVERHEAD_BODY["model"]]
    base, _ = build_request(ImageGenerationRequest(**OVERHEAD_BODY), spec, {})
    body = {**OVERHEAD_BODY, "loras": [{"path": BENCH_LORA, "scale": 1.0}]}
    try:
        styled, _ = build_request(ImageGenerationRequest(**body), spec, {}, weights_dir=weights_dir)
    except InvalidParameter as exc:
        logger.warning("no LoRA measure: %s", exc.message)
        return None
    engine = Engine(SPECS, weights_dir)
    engine.render([base])  # the checkpoint's load is not the LoRA's
    [first] = engine.render([styled])
    times: dict[str, list[float]] = {"base": [], "lora": []}
    for _ in range(WARMUP_REQUESTS + count):
        if time.monotonic() > deadline:
            break
        for name, request in (("base", base), ("lora", styled)):
            started = time.perf_counter()
            engine.render([request])
            times[name].append((time.perf_counter() - started) * 1000)
    skip = min(WARMUP_REQUESTS, len(times["base"]) - 1)
    return LoraCost(BENCH_LORA, first.timings_ms["lora_load"], times["base"][skip:], times["lora"][skip:])


def measure_overhead(
    client: httpx.Client, url: str, weights_dir: Path, count: int, deadline: float
) -> tuple[list[float], list[float]]:
    render_ms = direct_renderer(weights_dir, OVERHEAD_BODY)
    http_ms: list[float] = []
    direct_ms: list[float] = []
    for i in range(WARMUP_REQUESTS + count):
        if time.monotonic() > deadline:
            break
        outcome = post_image(client, url, OVERHEAD_BODY)
        _require_ok([outcome], "overhead")
        direct = render_ms()
        if i >= WARMUP_REQUESTS:
            http_ms.append(outcome.seconds * 1000)
            direct_ms.append(direct)
    if not http_ms:
        raise BenchError("overhead: no request finished within the phase's time")
    return http_ms, direct_ms


def measure_soak(
    client: httpx.Client, server: ServerProcess, requests: int, concurrency: int, deadline: float
) -> Soak:
    mark = min(RSS_MARK, max(1, requests // 5))
    baseline: dict[str, int] = {}

    def on_answer(count: int) -> None:
        if count == mark:
            baseline["http"] = read_rss(server.process.pid)
            baseline["worker"] = children_rss(server.process.pid)

    bodies = [soak_body(i) for i in range(requests)]
    outcomes, seconds = run_load(client, server.url, bodies, concurrency, deadline, on_answer)
    if server.process.poll() is not None:
        raise BenchError(f"the server died during the soak:\n{server.log_tail()}")
    counts = tally(outcomes)
    logger.info("soak: %d requests in %.0f s: %s", requests, seconds, counts)
    if "http" not in baseline:
        raise BenchError(f"soak: fewer than {mark} answers, no memory baseline ({counts})")
    return Soak(
        requests,
        concurrency,
        counts,
        mark,
        baseline["http"],
        read_rss(server.process.pid),
        baseline["worker"],
        children_rss(server.process.pid),
    )


# ---- command ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fluxd bench serve",
        description="HTTP overhead, batching speed-up and a soak against real servers on 127.0.0.1",
    )
    parser.add_argument(
        "--weights-dir", type=Path, help="tiny checkpoints to serve (default: written into a temp folder)"
    )
    parser.add_argument("--requests", type=int, help=f"requests per overhead/batching measure ({FULL[0]})")
    parser.add_argument("--concurrency", type=int, default=8, help="clients of the batching measure (8)")
    parser.add_argument("--max-batch-images", type=int, default=4, help="the batching server's limit (4)")
    parser.add_argument("--soak-requests", type=int, help=f"requests of the soak ({FULL[1]})")
    parser.add_argument("--soak-concurrency", type=int, help=f"clients of the soak ({FULL[2]})")
    parser.add_argument(
        "--phase-timeout", type=float, default=900.0, help="seconds after which a phase sends no more (900)"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK[0]} requests, soak {QUICK[1]} at {QUICK[2]}"
    )
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    parser.add_argument(
        "--ray",
        help="instead: images/s through Ray Serve with 1 and 2 engine replicas; local (two simulated nodes "
        "here), auto or a cluster address",
    )
    parser.add_argument("--port", type=int, help="with --ray: Serve's HTTP port (default: a free one)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, default in zip(("requests", "soak_requests", "soak_concurrency"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("requests", "concurrency", "max_batch_images", "soak_requests", "soak_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def measure(args: argparse.Namespace, client: httpx.Client, workdir: Path) -> Measured:
    weights = args.weights_dir or write_tiny_weights(workdir / "weights")

    def deadline() -> float:
        return time.monotonic() + args.phase_timeout

    with running_server(client, weights, workdir, max_batch_images=1) as server:
        logger.info("batching off: %d requests at concurrency %d", args.requests, args.concurrency)
        unbatched = measure_throughput(client, server.url, args.requests, args.concurrency, deadline())
    with running_server(client, weights, workdir, args.max_batch_images) as server:
        logger.info("batching on: %d requests at concurrency %d", args.requests, args.concurrency)
        batched = measure_throughput(client, server.url, args.requests, args.concurrency, deadline())
        logger.info("overhead: %d requests over HTTP alternating with direct calls", args.requests)
        http_ms, direct_ms = measure_overhead(client, server.url, weights, args.requests, deadline())
        logger.info("soak: %d requests at concurrency %d", args.soak_requests, args.soak_concurrency)
        soak = measure_soak(client, server, args.soak_requests, args.soak_concurrency, deadline())
    logger.info("LoRA: first load, then %d renders alternating without and with it", args.requests)
    lora = measure_lora(weights, args.requests, deadline())
    return Measured(
        http_ms, direct_ms, args.max_batch_images, args.concurrency, batched, unbatched, soak, lora
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # Python's default SIGTERM ends the process on the spot, leaving the servers it started running.
        signal.signal(signal.SIGTERM, exit_on_sigterm)
    # A log line per request (httpx) and per direct render (the engine) would bury the phases' progress.
    for noisy in ("httpx", "pipelines.engine.engine"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import httpx
    except ImportError:
        print("fluxd bench serve needs httpx: pip install httpx", file=sys.stderr)
        return 2
    # trust_env=False: a proxy from the environment must never see these requests.
    limits = httpx.Limits(max_connections=max(args.concurrency, args.soak_concurrency) + 2)
    with (
        httpx.Client(trust_env=False, limits=limits) as client,
        tempfile.TemporaryDirectory(prefix="fluxd-bench-") as tmp,
    ):
        try:
            if args.ray:
                from server.tools.bench_ray import LOCAL_NOTE, measure_replicas

                rows = measure_replicas(args, client, Path(tmp))
                note = LOCAL_NOTE if args.ray == "local" else ""
            else:
                rows, note = table_rows(measure(args, client, Path(tmp))), ""
        except BenchError as exc:
            print(f"fluxd bench serve: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("fluxd bench serve: interrupted; the servers were stopped", file=sys.stderr)
            return 130
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = format_report(rows, machine_description(), date) + (f"\n\n{note}" if note else "")
    print(report, flush=True)
    if args.out:
        args.out.write_text(report + "\n")
    return 0 if all(row.passed is not False for row in rows) else 1
