"""Serving under load, through a real server: queue limits, deadlines, cancellation, crashes, batching,
metrics, readiness and several workers. Behaviour only: no timed assertions."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.e2e.conftest import (
    FAULTS,
    HOLD,
    HTTP,
    LONG,
    Server,
    metric,
    start_server,
    stop_server,
    wait_until,
    workers_idle,
)


def generate(server: Server, timeout: float = 120, **fields) -> httpx.Response:
    body = {"prompt": "x", "size": "64x64", "num_inference_steps": 2, "response_format": "b64_json", **fields}
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=timeout)


def in_background(call) -> tuple[threading.Thread, list]:
    """Run `call` in a thread; `out` receives its result or the exception it raised."""
    out: list = []

    def target() -> None:
        try:
            out.append(call())
        except Exception as exc:  # handed to the test, which asserts on it
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def pixels(response: httpx.Response) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"), dtype=int)
        for item in response.json()["data"]
    ]


@pytest.fixture()
def fresh(tiny_weights: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    server = start_server(tiny_weights, tmp_path, *getattr(request, "param", ()), env=FAULTS)
    yield server
    stop_server(server)


@pytest.fixture()
def plain(server: Server) -> Server:
    """The session's server (tests/e2e/conftest.py), for the tests that leave it as they found it (a replaced
    worker is as good as new): its worker faults by prompt (tests/faults.py)."""
    return server


def idle(server: Server) -> bool:
    return HTTP.get(f"{server.url}/ready").status_code == 200 and workers_idle(server) and queued(server) == 0


def queued(server: Server) -> float:
    lines = HTTP.get(f"{server.url}/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("fluxd_queue_depth{"))


def batches(server: Server) -> float:
    return metric(server, 'fluxd_batch_images_count{model="flux.2-dev"}')


@pytest.mark.parametrize("fresh", [("--queue-size", "1", "--queue-timeout", "1")], indirect=True)
def test_queue_limits_answer_429_when_full_and_504_past_the_deadline(fresh: Server) -> None:
    with sent(fresh, **HOLD):  # holds the worker until the block ends
        wait_until(lambda: batches(fresh) >= 1)
        calls = [in_background(lambda i=i: generate(fresh, size="48x48", seed=i)) for i in range(3)]
        for thread, _ in calls:
            thread.join(120)
    answers = [out[0] for _, out in calls]
    statuses = sorted(answer.status_code for answer in answers)
    # One request fits the queue and then outwaits its 1 s deadline; the others find the queue full.
    assert statuses == [429, 429, 504], statuses
    rejected = next(a for a in answers if a.status_code == 429)
    error = rejected.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_exceeded"
    assert 1 <= int(rejected.headers["retry-after"]) <= 120
    late = next(a for a in answers if a.status_code == 504)
    assert late.json()["error"]["code"] == "queue_timeout"
    assert late.headers["x-should-retry"] == "false"  # the SDK's retries would triple the bounded wait


def test_a_client_that_goes_away_frees_the_worker(plain: Server) -> None:
    running = 'fluxd_cancelled_total{model="flux.2-dev",stage="running"}'
    queued = 'fluxd_cancelled_total{model="flux.2-dev",stage="queued"}'
    before = {series: metric(plain, series) for series in (running, queued)}
    with pytest.raises(httpx.TimeoutException):
        generate(plain, timeout=2, **HOLD)  # held at its first step until its client goes away
    wait_until(lambda: metric(plain, running) == before[running] + 1)
    # The interrupted job skips its remaining steps, so the next request is served, not stuck behind it.
    assert generate(plain).status_code == 200
    with sent(plain, **HOLD):
        wait_until(lambda: batches(plain) >= 3)
        with pytest.raises(httpx.TimeoutException):
            generate(plain, timeout=1, size="32x32")
        wait_until(lambda: metric(plain, queued) == before[queued] + 1)  # dropped before it ever ran
    wait_until(lambda: workers_idle(plain))  # the held one went with its connection


def test_a_killed_worker_gives_503_then_the_next_request_succeeds(plain: Server) -> None:
    fresh = plain
    wait_until(lambda: idle(fresh), 120)
    [worker] = HTTP.get(f"{fresh.url}/ready").json()["workers"]
    dispatched = batches(fresh)
    call, out = in_background(lambda: generate(fresh, **LONG))
    wait_until(lambda: batches(fresh) > dispatched)
    os.kill(worker["pid"], signal.SIGKILL)
    call.join(120)
    crashed = out[0]
    assert crashed.status_code == 503, crashed.text
    assert crashed.json()["error"]["code"] == "worker_restarted" and crashed.headers["retry-after"]
    wait_until(lambda: HTTP.get(f"{fresh.url}/ready").status_code == 200, 120)
    [replaced] = HTTP.get(f"{fresh.url}/ready").json()["workers"]
    assert replaced["pid"] != worker["pid"] and replaced["restarts"] == worker["restarts"] + 1
    assert generate(fresh).status_code == 200
    restarts = f'fluxd_worker_restarts_total{{worker="0:cpu"}} {worker["restarts"] + 1:.1f}'
    assert restarts in HTTP.get(f"{fresh.url}/metrics").text


@contextmanager
def sent(server: Server, **fields) -> Iterator[None]:
    """A generation sent on a connection of its own, hung up when the block ends, answered or not."""
    body = json.dumps({"prompt": "x", "size": "32x32", "num_inference_steps": 8, **fields}).encode()
    url = httpx.URL(server.url)
    head = (
        f"POST /v1/images/generations HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((url.host, url.port)) as connection:
        connection.sendall(head.encode() + body)
        yield


def abandon(server: Server, after_s: float, **fields) -> None:
    """Send a generation and hang up `after_s` later, whether or not it was answered."""
    with sent(server, **fields):
        time.sleep(after_s)


def busy_images(server: Server) -> int:
    return sum(worker["busy_images"] for worker in HTTP.get(f"{server.url}/ready").json()["workers"])


@pytest.fixture(scope="module")
def watched(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that gives up on a silent worker after 8 s and on a batch after 20 s; its worker never
    finishes a batch whose prompt is "hang", and receives each batch 0.4 s late, as it would a batch of large
    references: a client going away in between cancels a request its worker has not seen yet."""
    liveness = {"FLUXD_WORKER_HEARTBEAT_TIMEOUT_S": "8", "FLUXD_BATCH_DEADLINE_FLOOR_S": "20"}
    server = start_server(
        tiny_weights,
        tmp_path_factory.mktemp("watched"),
        "--preload",
        "flux.2-dev",
        env={"FLUXD_WORKER_ENTRY": "tests.faults:late_by_prompt", **liveness},
    )
    yield server
    stop_server(server)


def readiness(server: Server) -> tuple[threading.Event, list[int]]:
    """Poll /ready in the background until the event is set; the list receives each status in order."""
    done, seen = threading.Event(), []

    def poll() -> None:
        while not done.is_set():
            seen.append(HTTP.get(f"{server.url}/ready").status_code)
            time.sleep(0.1)

    threading.Thread(target=poll, daemon=True).start()
    return done, seen


def assert_replaced(server: Server, worker: dict, answer: httpx.Response) -> None:
    """`answer` is the retryable 503 of a replaced worker; /ready said 503 until the replacement was up."""
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "worker_restarted" and answer.headers["retry-after"]
    wait_until(lambda: HTTP.get(f"{server.url}/ready").status_code == 200, 120)
    [replaced] = HTTP.get(f"{server.url}/ready").json()["workers"]
    assert replaced["pid"] != worker["pid"] and replaced["restarts"] == worker["restarts"] + 1
    assert generate(server).status_code == 200


def test_clients_going_away_at_any_moment_never_wedge_the_worker(watched: Server) -> None:
    survivors = []
    for i in range(50):
        if i % 2:
            # An idle worker: the request is sent to it at once, and the hang-up races its arrival there.
            wait_until(lambda: busy_images(watched) == 0)
        elif i % 10 == 0:
            # A batch mate that stays: a batch can lose some of its requests and keep the others.
            survivors.append(
                in_background(lambda i=i: generate(watched, size="32x32", num_inference_steps=8, seed=i))
            )
        # Hanging up 0 to 0.38 s after sending: queued, sent but not yet taken by the worker, running, done.
        abandon(watched, after_s=0.02 * (i % 20), seed=i)
    for thread, out in survivors:
        thread.join(120)
        assert not isinstance(out[0], Exception) and out[0].status_code == 200, out[0]
    # Every request the worker was sent got an answer, those of gone clients included: it is free again.
    wait_until(lambda: idle(watched), 60)
    assert generate(watched).status_code == 200


def test_a_stopped_worker_is_replaced_and_its_requests_answered_503(watched: Server) -> None:
    wait_until(lambda: idle(watched), 120)
    [worker] = HTTP.get(f"{watched.url}/ready").json()["workers"]
    done, seen = readiness(watched)
    os.kill(worker["pid"], signal.SIGSTOP)  # a stopped process sends nothing, heartbeats included
    answer = generate(watched)
    wait_until(lambda: HTTP.get(f"{watched.url}/ready").status_code == 200, 120)
    done.set()
    assert 503 in seen[seen.index(200) :], seen  # ready, then not while it was replaced, then ready again
    assert_replaced(watched, worker, answer)
    watched.wait_for_log("no heartbeat")


def test_a_batch_hung_past_its_deadline_is_replaced(watched: Server) -> None:
    wait_until(lambda: idle(watched), 120)
    [worker] = HTTP.get(f"{watched.url}/ready").json()["workers"]
    # Its heartbeat thread beats on: only the batch deadline tells this worker is stuck.
    answer = generate(watched, prompt="hang", num_inference_steps=4)
    assert_replaced(watched, worker, answer)
    watched.wait_for_log("past its deadline")


def test_the_sdk_retries_a_crash_transparently(plain: Server) -> None:
    wait_until(lambda: idle(plain), 120)
    client = plain.client(max_retries=2)
    [worker] = HTTP.get(f"{plain.url}/ready").json()["workers"]
    dispatched = batches(plain)
    call, out = in_background(
        lambda: client.images.generate(
            prompt="x", size="512x512", response_format="b64_json", extra_body={"num_inference_steps": 100}
        )
    )
    wait_until(lambda: batches(plain) > dispatched)
    os.kill(worker["pid"], signal.SIGKILL)
    call.join(180)
    assert isinstance(out[0], openai.types.ImagesResponse), out
    assert out[0].data[0].b64_json


def test_batched_images_equal_solo_images(plain: Server) -> None:
    fresh = plain
    wait_until(lambda: idle(fresh), 120)
    dispatched = batches(fresh)
    same = {"prompt": "batch me", "size": "64x64", "num_inference_steps": 4}
    with sent(fresh, **HOLD):  # holds the worker until the block ends, while four requests queue
        wait_until(lambda: batches(fresh) > dispatched)
        calls = [in_background(lambda s=s: generate(fresh, seed=s, **same)) for s in (100, 200, 300, 400)]
        wait_until(lambda: queued(fresh) == 4)
    for thread, _ in calls:
        thread.join(120)
    # The blocker and four queued requests in fewer than five calls: queued requests were batched.
    assert batches(fresh) - dispatched < 5
    for seed, (_, out) in zip((100, 200, 300, 400), calls, strict=True):
        [batched] = pixels(out[0])
        [solo] = pixels(generate(fresh, seed=seed, **same))
        assert np.abs(batched - solo).max() <= 1


def test_metrics_expose_the_serving_series(server: Server) -> None:
    generate(server)
    generate(server, size="bad")
    text = HTTP.get(f"{server.url}/metrics").text
    for series in (
        "fluxd_queue_depth",
        "fluxd_queue_wait_seconds_bucket",
        "fluxd_run_seconds_bucket",
        "fluxd_images_generated_total",
        "fluxd_batch_images_bucket",
        "fluxd_errors_total",
        "fluxd_device_memory_bytes",
    ):
        assert series in text, series
    assert 'fluxd_errors_total{code="invalid_value",status="400"}' in text


def test_ready_turns_200_only_after_preloading_and_workers_exit_with_a_killed_server(
    tiny_weights: Path, tmp_path: Path
) -> None:
    import subprocess

    from tests.e2e.conftest import free_port, serve_command

    port = free_port()
    process = subprocess.Popen(
        serve_command(tiny_weights, tmp_path, port, "--preload", "flux.2-dev,flux.1-dev"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Server(f"http://127.0.0.1:{port}", process, tmp_path / "unused.log")
    seen: list[int] = []
    early: tuple[threading.Thread, list] | None = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                response = HTTP.get(f"http://127.0.0.1:{port}/ready", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            seen.append(response.status_code)
            if early is None:
                # Sent before any worker is up: what may pass through to the pipeline is known already.
                early = in_background(lambda: generate(server, model="flux.1-dev", max_sequence_length=64))
            if response.status_code == 200:
                [worker] = response.json()["workers"]
                assert worker["loaded"] == ["flux.1-dev", "flux.2-dev"]
                break
            time.sleep(0.1)
        assert seen[0] == 503 and seen[-1] == 200
        assert HTTP.get(f"http://127.0.0.1:{port}/health").status_code == 200
        assert early is not None
        early[0].join(120)
        assert early[1][0].status_code == 200, early[1][0].text
        process.kill()
        process.wait(15)
        # Reparented, an exited worker may stay a zombie until its new parent reaps it: that is gone too.
        stat = Path(f"/proc/{worker['pid']}/stat")
        wait_until(
            lambda: not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"), 60
        )
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(15)


def test_two_workers_share_the_load(configured: Server) -> None:
    workers = HTTP.get(f"{configured.url}/ready").json()["workers"]
    assert len(workers) == 2
    sizes = [f"{64 + 16 * s}x64" for s in range(4)]
    calls = [in_background(lambda s=s: generate(configured, seed=s, size=sizes[s])) for s in range(4)]
    for thread, out in calls:
        thread.join(120)
        assert out[0].status_code == 200
    expected = {str(w["pid"]) for w in workers}

    def rendered_by() -> set[str]:  # a worker logs its batch after answering it
        lines = configured.logs().splitlines()
        return {line.split("[worker ")[1].split("]")[0] for line in lines if "rendered" in line}

    wait_until(lambda: rendered_by() == expected, 60)


def test_out_of_memory_fails_the_batch_and_the_worker_goes_on(plain: Server) -> None:
    wait_until(lambda: idle(plain), 120)
    [worker] = HTTP.get(f"{plain.url}/ready").json()["workers"]
    failed = generate(plain, prompt="oom", num_inference_steps=4)
    assert failed.status_code == 503, failed.text
    assert failed.json()["error"]["code"] == "out_of_memory" and failed.headers["retry-after"]
    assert generate(plain).status_code == 200
    [after] = HTTP.get(f"{plain.url}/ready").json()["workers"]
    assert (after["pid"], after["restarts"]) == (worker["pid"], worker["restarts"])  # the same worker
    plain.wait_for_log("out of memory rendering")


def prompt_cache(server: Server, model: str) -> dict[str, float]:
    counts = {"hit": 0.0, "miss": 0.0}
    for line in HTTP.get(f"{server.url}/metrics").text.splitlines():
        for result in counts:
            if line.startswith(f'fluxd_prompt_cache_lookups_total{{model="{model}",result="{result}"}}'):
                counts[result] = float(line.split()[-1])
    return counts


def test_a_seed_sweep_over_one_prompt_encodes_it_once(server: Server) -> None:
    model = "flux.1-dev"
    before = prompt_cache(server, model)
    prompt = f"a seed sweep {time.time_ns()}"
    for seed in range(3):
        assert generate(server, model=model, prompt=prompt, seed=seed).status_code == 200
    after = prompt_cache(server, model)
    assert (after["miss"] - before["miss"], after["hit"] - before["hit"]) == (1, 2)


@pytest.fixture(scope="module")
def configured(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two workers (--devices cpu,cpu), --mode fast and no prompt cache, and a fine-tune of flux.1-dev
    registered from a config file."""
    tmp = tmp_path_factory.mktemp("configured")
    config = tmp / "fluxd.toml"
    config.write_text(
        f'[models.my-finetune]\nbase = "flux.1-dev"\npath = "{tiny_weights / "flux.1-dev"}"\n'
        'mode = "offload"\n'
    )
    server = start_server(
        tiny_weights,
        tmp,
        *("--devices", "cpu,cpu", "--config", str(config), "--mode", "fast", "--prompt-cache-mb", "0"),
    )
    yield server
    stop_server(server)


def test_a_requested_mode_is_reported_as_what_this_machine_can_run(configured: Server) -> None:
    client = configured.client(max_retries=0)
    modes = client.models.retrieve("flux.2-dev").model_extra["run_modes"]  # one a worker
    assert len(modes) == 2
    assert all(mode["mode"] == "cpu" and "'fast' needs a CUDA GPU" in mode["reason"] for mode in modes)
    before = prompt_cache(configured, "flux.2-dev")
    for seed in range(2):
        assert generate(configured, model="flux.2-dev", prompt="same", seed=seed).status_code == 200
    assert prompt_cache(configured, "flux.2-dev") == before  # --prompt-cache-mb 0: no lookups at all


def test_a_registry_checkpoint_is_served_from_its_own_folder(configured: Server) -> None:
    client = configured.client(max_retries=0)
    modes = client.models.retrieve("my-finetune").model_extra["run_modes"]  # its own mode, not --mode's
    assert len(modes) == 2
    assert all(mode["mode"] == "cpu" and "'offload' needs a CUDA GPU" in mode["reason"] for mode in modes)
    result = client.images.generate(
        model="my-finetune",
        prompt="a red fox",
        size="64x48",
        response_format="b64_json",
        extra_body={"num_inference_steps": 2},
    )
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (64, 48)
