"""What every `fluxd bench` that drives a real server shares: starting `fluxd serve` on 127.0.0.1, the load it
sends and the answers it tallies, the machine and memory it reads. Torch-free."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.declarations.settings import ENV_PREFIX
from server.tools.bench_report import (
    Outcome,
    Throughput,
    batching_bodies,
    cpu_model,
    parse_vm_rss,
    tally,
)

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)


HOST = "127.0.0.1"


REQUEST_TIMEOUT_S = 120.0


READY_TIMEOUT_S = 180.0


class BenchError(Exception):
    """The run could not measure what it set out to (a server that never came up, a failed request)."""


def machine_description() -> str:
    try:
        cpu = cpu_model(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = cpu_model("")
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "absent"
    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch_version}, tiny weights on the CPU"
    )


def read_rss(pid: int) -> int:
    return parse_vm_rss(Path(f"/proc/{pid}/status").read_text())


def children_rss(pid: int) -> int:
    """Resident memory of a process's direct children (the worker and multiprocessing's resource tracker)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with suppress(OSError, ValueError):  # it exited between the listing and the read
                total += read_rss(int(child))
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def running_server(
    client: httpx.Client,
    weights_dir: Path,
    workdir: Path,
    max_batch_images: int,
    flags: Sequence[str] = ("--demo",),
) -> Iterator[ServerProcess]:
    """`fluxd serve --demo` (or with other `flags`) on 127.0.0.1 until /ready answers 200; stopped on leaving,
    whatever happened."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "server.tools.cli", "serve", *flags, "--host", HOST, "--port", str(port)]
    command += ["--weights-dir", str(weights_dir), "--store-dir", str(workdir / f"store-{port}")]
    command += ["--max-batch-images", str(max_batch_images), "--log-level", "WARNING"]
    # The caller's FLUXD_* settings (keys, queue sizes, a config file) would change what is measured.
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    log = workdir / f"server-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(f"http://{HOST}:{port}", process, log)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise BenchError(f"the server exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if client.get(f"{server.url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"the server was not ready in {READY_TIMEOUT_S:.0f} s:\n{server.log_tail()}")
            time.sleep(0.3)
        logger.info(
            "server pid %d ready at %s (--max-batch-images %d)", process.pid, server.url, max_batch_images
        )
        yield server
    finally:
        _stop(process)


def write_tiny_weights(folder: Path) -> Path:
    from pipelines.tools.tiny import write_tiny

    logger.info("writing the tiny checkpoints into %s", folder)
    write_tiny(folder)
    return folder


def post_image(client: httpx.Client, url: str, body: dict[str, Any]) -> Outcome:
    import httpx

    started = time.perf_counter()
    try:
        response = client.post(f"{url}/v1/images/generations", json=body, timeout=REQUEST_TIMEOUT_S)
        images = len(response.json()["data"]) if response.status_code == 200 else 0
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        return Outcome(None, time.perf_counter() - started, error=repr(exc))
    return Outcome(response.status_code, time.perf_counter() - started, images)


def run_load(
    client: httpx.Client,
    url: str,
    bodies: Sequence[dict[str, Any]],
    concurrency: int,
    deadline: float,
    on_answer: Callable[[int], None] | None = None,
) -> tuple[list[Outcome], float]:
    """Send `bodies` with `concurrency` in flight; none is sent after `deadline` (time.monotonic).

    `on_answer(k)` runs when the k-th answer (or failure) arrives. Returns the outcomes in order and the wall
    time from the first send to the last answer.
    """
    answered = 0
    lock = threading.Lock()

    def one(body: dict[str, Any]) -> Outcome:
        nonlocal answered
        if time.monotonic() > deadline:
            return Outcome(None, 0.0, error="the phase ran out of time", sent=False)
        outcome = post_image(client, url, body)
        with lock:
            answered += 1
            count = answered
        if on_answer is not None:
            on_answer(count)
        return outcome

    started = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench")
    try:
        outcomes = list(pool.map(one, bodies))
    finally:
        # On Ctrl-C nothing queued is sent; requests in flight end when the server is stopped.
        pool.shutdown(wait=False, cancel_futures=True)
    return outcomes, time.perf_counter() - started


def _require_ok(outcomes: Sequence[Outcome], what: str) -> None:
    bad = [o for o in outcomes if o.status != 200]
    if bad:
        raise BenchError(f"{what}: {len(bad)} of {len(outcomes)} requests failed, first: {bad[0]}")


def measure_throughput(
    client: httpx.Client, url: str, count: int, concurrency: int, deadline: float
) -> Throughput:
    warmup, _ = run_load(client, url, batching_bodies(concurrency), concurrency, deadline)
    _require_ok(warmup, "batching warm-up")
    outcomes, seconds = run_load(client, url, batching_bodies(count), concurrency, deadline)
    _require_ok(outcomes, "batching")
    return Throughput(len(outcomes), tally(outcomes).images, seconds)


def exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)
