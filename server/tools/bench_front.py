"""`fluxd bench front`: the HTTP front alone, over a worker that answers every batch at once.

A real `fluxd serve` on 127.0.0.1 runs with `--worker-entry pipelines.tools.instant:main`, whose worker sends
one prepared 1024x1024 picture for every image without rendering anything. For PNG, JPEG and WebP, answered as
`b64_json` and as `url`, at concurrency 1 and 32, the bench prints images/s and the front process's own CPU
time per image (utime + stime from /proc, its workers excluded), and from that the ceiling one front core
sustains, counted in GPUs rendering FLUX.2 [dev] Turbo at 2 s an image.

On a loaded machine absolute figures wander; the `x encode` column divides each CPU figure by the CPU of one
Pillow PNG encode (compress_level 6, Pillow's default) of the same picture, timed in this process in the same
run. A second table gives each PNG compress_level's encode time and size on that picture (the trade-off the
worker's PNG level is chosen from).
"""

from __future__ import annotations

import argparse
import datetime
import io
import logging
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.tools.bench_harness import BenchError, exit_on_sigterm, run_load, running_server
from server.tools.bench_report import cpu_model

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

SIZE = 1024
MODEL = "flux.2-dev"
FORMATS = ("png", "jpeg", "webp")
RESPONSES = ("b64_json", "url")
CONCURRENCY = (1, 32)
TURBO_S = 2.0  # FLUX.2 [dev] Turbo's target on one H100: seconds per 1024x1024 image
PNG_LEVELS = (0, 1, 2, 3, 4, 6, 9)
# Requests per (format, response, concurrency) cell: full run, --quick smoke run.
FULL = 64
QUICK = 2
WARMUP = 2


@dataclass(frozen=True)
class Cell:
    fmt: str
    response: str
    concurrency: int
    images: int
    seconds: float
    cpu_s: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_s / self.images


def ceiling_gpus(cpu_ms: float) -> float:
    """GPUs of Turbo at TURBO_S an image that one front core keeps up with at `cpu_ms` per image."""
    return TURBO_S * 1000 / cpu_ms if cpu_ms > 0 else float("inf")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (its threads, not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5), counted from the state (field 3) after the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def png_encode(level: int | None, repeats: int) -> tuple[float, int]:
    """CPU ms (the median of `repeats`) and bytes of a PNG of the bench's picture at `level` (None: Pillow's
    default)."""
    from pipelines.tools.instant import sample_picture

    picture = sample_picture(SIZE, SIZE)
    options = {} if level is None else {"compress_level": level}
    times, size = [], 0
    for _ in range(repeats):
        buffer = io.BytesIO()
        started = time.process_time()
        picture.save(buffer, "PNG", **options)
        times.append(1000 * (time.process_time() - started))
        size = len(buffer.getvalue())
    return sorted(times)[len(times) // 2], size


def png_levels(repeats: int) -> list[tuple[int, float, int]]:
    """(compress_level, encode CPU ms, bytes) for the bench's picture."""
    return [(level, *png_encode(level, repeats)) for level in PNG_LEVELS]


def body(fmt: str, response: str, seed: int) -> dict[str, object]:
    return {
        "model": MODEL,
        "prompt": "a lighthouse on a cliff at night",
        "size": f"{SIZE}x{SIZE}",
        "output_format": fmt,
        "response_format": response,
        "seed": seed,
    }


def measure_cell(
    client: httpx.Client, url: str, pid: int, fmt: str, response: str, concurrency: int, count: int
) -> Cell:
    deadline = time.monotonic() + 900
    warm, _ = run_load(client, url, [body(fmt, response, i) for i in range(WARMUP)], 1, deadline)
    bodies = [body(fmt, response, i) for i in range(count)]
    before = process_cpu_s(pid)
    outcomes, seconds = run_load(client, url, bodies, concurrency, deadline)
    cpu_s = process_cpu_s(pid) - before
    bad = [o for o in warm + outcomes if o.status != 200]
    if bad:
        raise BenchError(f"{fmt} {response}: {len(bad)} requests failed, first: {bad[0]}")
    return Cell(fmt, response, concurrency, sum(o.images for o in outcomes), seconds, cpu_s)


def measure(client: httpx.Client, workdir: Path, count: int) -> list[Cell]:
    weights = workdir / "weights"
    # The front serves a model whose checkpoint folder is present; the instant worker reads nothing in it.
    (weights / MODEL).mkdir(parents=True)
    (weights / MODEL / "model_index.json").write_text("{}")
    flags = ["--worker-entry", "pipelines.tools.instant:main", "--queue-size", str(4 * max(CONCURRENCY))]
    cells = []
    with running_server(client, weights, workdir, max(CONCURRENCY), flags) as server:
        for fmt in FORMATS:
            for response in RESPONSES:
                for concurrency in CONCURRENCY:
                    logger.info("%s %s at concurrency %d: %d requests", fmt, response, concurrency, count)
                    cells.append(
                        measure_cell(
                            client, server.url, server.process.pid, fmt, response, concurrency, count
                        )
                    )
    return cells


def format_report(
    cells: Sequence[Cell], reference_ms: float, levels: Sequence[tuple[int, float, int]]
) -> str:
    cpu = cpu_model(Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "")
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    worst = max(cells, key=lambda cell: cell.cpu_ms)
    default_level = next(size for level, _, size in levels if level == 6)
    lines = [
        f"fluxd bench front, {date}: {os.cpu_count()} cores ({cpu}), "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}; "
        f"{SIZE}x{SIZE} images from an instant worker",
        "",
        "| format | response | concurrency | images/s | front CPU ms/image | x encode | ceiling (GPUs) |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {c.fmt} | {c.response} | {c.concurrency} | {c.images_per_s:.1f} | {c.cpu_ms:.1f} | "
            f"{c.cpu_ms / reference_ms:.3f} | {ceiling_gpus(c.cpu_ms):.0f} |"
            for c in cells
        ),
        "",
        "x encode: front CPU per image / one Pillow PNG encode (compress_level 6) of the same picture "
        f"in this process, {reference_ms:.0f} ms in this run. Ceiling: one front core at the worst cell "
        f"({worst.fmt} {worst.response} at {worst.concurrency}, {worst.cpu_ms:.1f} ms) keeps up with "
        f"{ceiling_gpus(worst.cpu_ms):.0f} H100s of Turbo at {TURBO_S:g} s an image.",
        "",
        "| PNG compress_level | encode CPU ms | size | size vs level 6 |",
        "|---|---|---|---|",
        *(
            f"| {level} | {ms:.0f} | {size / 1e6:.2f} MB | {size / default_level - 1:+.0%} |"
            for level, ms, size in levels
        ),
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fluxd bench front",
        description="the HTTP front's CPU per image and images/s over a worker that answers at once",
    )
    parser.add_argument(
        "--requests", type=int, help=f"requests per format, response and concurrency ({FULL})"
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} requests each")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = QUICK if args.quick else FULL
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, exit_on_sigterm)  # the server it started is stopped on the way out
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        import httpx
    except ImportError:
        print("fluxd bench front needs httpx: pip install httpx", file=sys.stderr)
        return 2
    limits = httpx.Limits(max_connections=max(CONCURRENCY) + 2)
    with (
        httpx.Client(trust_env=False, limits=limits) as client,
        tempfile.TemporaryDirectory(prefix="fluxd-bench-front-") as tmp,
    ):
        try:
            reference_ms, _ = png_encode(None, 3)
            cells = measure(client, Path(tmp), args.requests)
            levels = png_levels(1 if args.quick else 3)
        except BenchError as exc:
            print(f"fluxd bench front: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("fluxd bench front: interrupted; the server was stopped", file=sys.stderr)
            return 130
    report = format_report(cells, reference_ms, levels)
    print(report, flush=True)
    if args.out:
        args.out.write_text(report + "\n")
    return 0
