"""A real `fluxd serve` on 127.0.0.1 over the tiny checkpoints, and the official openai client against it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

# The SDK waits up to 10 minutes; raw calls get a generous limit too, since CI machines are loaded.
HTTP = httpx.Client(timeout=120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def client(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key, _strict_response_validation=True, **kwargs
        )

    def logs(self) -> str:
        return self.log.read_text()

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 60) -> str:
        """The log once `text` is in it `count` times: a line is written after what it reports has happened
        (a webhook answered, a job ended, a worker rendered), so reading the log at once can miss it."""
        deadline = time.monotonic() + timeout
        while (logs := self.logs()).count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared {count} times in the log:\n{logs[-3000:]}")
            time.sleep(0.1)
        return logs


def _as_from_a_terminal() -> None:
    # Its own process group, as a shell's foreground job, with Ctrl-C's default meaning even when the test
    # runner was started with SIGINT ignored (a background job of a non-interactive shell).
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def launch(
    command: list[str],
    port: int,
    log: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 120,
    terminal: bool = False,
) -> Server:
    """Start `command` (a `fluxd serve` listening on `port`) and wait until /ready answers 200; `terminal`
    starts it as a shell starts a foreground job."""
    process = subprocess.Popen(
        command,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=_as_from_a_terminal if terminal else None,
    )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"fluxd exited with {process.returncode}:\n{server.logs()}")
        try:
            if HTTP.get(f"{server.url}/ready", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(server)
    raise AssertionError(f"fluxd never became ready in {timeout_s:.0f} s:\n{server.logs()}")


def serve_command(weights: Path, tmp: Path, port: int, *extra: str) -> list[str]:
    """`fluxd serve --demo` on the tiny checkpoints, as every e2e server is started."""
    return [
        sys.executable,
        "-m",
        "server.tools.cli",
        "serve",
        "--demo",
        "--weights-dir",
        str(weights),
        "--port",
        str(port),
        "--store-dir",
        str(tmp / f"store-{port}"),
        "--worker-threads",
        "1",  # as every process of the suite (tests/conftest.py)
        *extra,
    ]


def start_server(weights: Path, tmp: Path, *extra: str, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    command = serve_command(weights, tmp, port, *extra)
    return launch(command, port, tmp / f"server-{port}.log", {**os.environ, **(env or {})})


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()


def wait_until(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition never became true")


# A worker started with it faults by prompt (tests/faults.py): a HOLD request runs until its client goes
# away, whatever the hardware's speed; "hang", "fail" and "oom" hang, fail and run out of memory.
FAULTS = {"FLUXD_WORKER_ENTRY": "tests.faults:by_prompt"}
HOLD = {"prompt": "hold", "size": "64x64", "num_inference_steps": 8, "response_format": "b64_json"}


@pytest.fixture(scope="session")
def server(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tiny_weights, tmp_path_factory.mktemp("server"), "--image-ttl", "3", env=FAULTS)
    yield running
    stop_server(running)


# The shared keyed server's keys: two flags and a key file's two (test_auth.py), and README snippets' one.
FLAG_KEYS = ("k1", "k2")
FILE_KEYS = ("f1", "f2")
README_KEY = "readme-snippet-key"


@pytest.fixture(scope="session")
def keyed_server(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Loopback bind with three --api-key flags and a key file: keys given on 127.0.0.1 are enforced too."""
    tmp = tmp_path_factory.mktemp("keyed")
    key_file = tmp / "keys.txt"
    key_file.write_text(f"{FILE_KEYS[0]}\n\n  {FILE_KEYS[1]}  \n")
    flags = [part for key in (*FLAG_KEYS, README_KEY) for part in ("--api-key", key)]
    running = start_server(tiny_weights, tmp, *flags, "--api-key-file", str(key_file))
    yield running
    stop_server(running)


# The shared strict server's body limit: 10 kB, against which tests/e2e/test_errors.py sends more.
STRICT_MAX_BODY_MB = 0.01
# Its --default-model (tests/e2e/test_default_model.py): every route that takes `model` falls back to it.
STRICT_DEFAULT_MODEL = "flux.1-kontext-dev"


@pytest.fixture(scope="session")
def strict_server(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Forwarded headers trusted from 10.9.9.9 only, a 1 s limit on a request's head, a 10 kB body limit and
    Kontext as the default model: settings that the other servers' tests would trip over."""
    running = start_server(
        tiny_weights,
        tmp_path_factory.mktemp("strict"),
        *("--forwarded-allow-ips", "10.9.9.9", "--request-head-timeout-s", "1"),
        *("--max-body-mb", str(STRICT_MAX_BODY_MB), "--default-model", STRICT_DEFAULT_MODEL),
    )
    yield running
    stop_server(running)


@pytest.fixture()
def client(server: Server) -> openai.OpenAI:
    return server.client(max_retries=0)


def metric(server: Server, series: str) -> float:
    """A series' value from the server's /metrics (0 before its first sample), e.g.
    'fluxd_cancelled_total{model="flux.2-dev",stage="queued"}'."""
    for line in HTTP.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def workers_idle(server: Server) -> bool:
    """No worker holds a request: what a cancelled or finished render leaves behind."""
    return all(worker["busy_images"] == 0 for worker in HTTP.get(f"{server.url}/ready").json()["workers"])


# Long enough on the tiny weights to be caught queued or running, and to outlast a short client timeout: 100
# steps at 768x768, every one in full (flux.2-dev's default step caching would nearly halve its time).
LONG = {
    "prompt": "long",
    "size": "768x768",
    "num_inference_steps": 100,
    "acceleration": "none",
    "response_format": "b64_json",
}
