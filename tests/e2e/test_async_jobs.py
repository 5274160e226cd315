"""Async jobs (`Prefer: respond-async`) through a real server: submit, poll, cancel, webhooks, isolation,
limits, and a SIGKILL restart that loses no job. Behaviour only: no timed assertions."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai.types import ImagesResponse
from PIL import Image
from standardwebhooks.webhooks import Webhook

from tests.e2e.conftest import (
    FAULTS,
    HOLD,
    HTTP,
    LONG,
    Server,
    free_port,
    launch,
    metric,
    serve_command,
    start_server,
    stop_server,
    wait_until,
    workers_idle,
)
from tests.e2e.test_readme_snippets import ROOT
from tests.imagery import png as png_bytes
from tests.origin import QuietHTTPServer

ASYNC = {"Prefer": "respond-async"}
FAULT_MARK = "fault injected"
KEY_A, KEY_B = "key-a", "key-b"
SECRET = "whsec_" + base64.b64encode(b"fluxd test webhook secret, 32 b").decode()
FAST = {"prompt": "x", "size": "64x64", "num_inference_steps": 2, "response_format": "b64_json"}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(server: Server, key: str | None = None, **fields) -> httpx.Response:
    headers = {**ASYNC, **(auth(key) if key else {})}
    return HTTP.post(f"{server.url}/v1/images/generations", json={**FAST, **fields}, headers=headers)


def job(server: Server, job_id: str, key: str | None = None) -> httpx.Response:
    return HTTP.get(f"{server.url}/v1/images/jobs/{job_id}", headers=auth(key) if key else {})


def wait_for(server: Server, job_id: str, done: Callable[[dict], bool], key: str | None = None) -> dict:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        answer = job(server, job_id, key)
        assert answer.status_code == 200, answer.text
        if done(answer.json()):
            return answer.json()
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never got there: {answer.json()}")


def ended(body: dict) -> bool:
    return body["status"] in ("succeeded", "failed", "cancelled")


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


class Receiver:
    """A webhook receiver on 127.0.0.1: records every POST; the first one to /hooks/flaky gets a 500."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                first = not any(path == self.path for path, _, _ in receiver.received)
                receiver.received.append((self.path, dict(self.headers), body))
                self.send_response(500 if self.path == "/hooks/flaky" and first else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.http = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.shutdown()

    def posts(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        return [(headers, body) for p, headers, body in self.received if p == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


@pytest.fixture(scope="module")
def keyed(
    tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory, receiver: Receiver
) -> Iterator[Server]:
    """Two API keys, webhooks allowed under the receiver's /hooks only."""
    env = {
        "FLUXD_API_KEYS": f"{KEY_A},{KEY_B}",
        "FLUXD_WEBHOOK_ALLOW": f"{receiver.url}/hooks",
        "FLUXD_WEBHOOK_SECRET": SECRET,
        **FAULTS,
    }
    server = start_server(tiny_weights, tmp_path_factory.mktemp("jobs"), env=env)
    yield server
    stop_server(server)


def test_sdk_submit_poll_and_result(keyed: Server) -> None:
    client = keyed.client(KEY_A, max_retries=0)
    # The SDK would read the 202's job as an ImagesResponse: the raw response gives the job object.
    raw = client.images.with_raw_response.generate(
        prompt="a red fox",
        size="64x48",
        response_format="b64_json",
        extra_body={"num_inference_steps": 2, "seed": 11},
        extra_headers=ASYNC,
    )
    assert raw.http_response.status_code == 202
    submitted = raw.http_response.json()
    assert raw.headers["location"] == f"/v1/images/jobs/{submitted['id']}"
    assert raw.headers["preference-applied"] == "respond-async"
    assert submitted["status"] in ("queued", "running") and submitted["model"] == "flux.2-dev"
    assert isinstance(submitted["created"], int)
    assert re.fullmatch(r"job_[A-Za-z0-9_-]{32}", submitted["id"])  # 192 random bits
    body: dict = {}
    deadline = time.monotonic() + 240
    while body.get("status") not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
        body = client.get(f"/images/jobs/{submitted['id']}", cast_to=object)  # type: ignore[assignment]
    assert body["status"] == "succeeded", body
    result = ImagesResponse.model_validate(body["result"])
    [image] = result.data
    assert pixels(image.b64_json).shape == (48, 64, 3)
    assert image.model_extra["seed"] == 11 and result.size == "64x48"
    listed = client.get("/images/jobs", cast_to=object)
    assert submitted["id"] in [item["id"] for item in listed["data"]]  # type: ignore[index]


def test_raw_http_edit_with_a_url_result(keyed: Server) -> None:
    answer = HTTP.post(
        f"{keyed.url}/v1/images/edits",
        headers={**ASYNC, **auth(KEY_A)},
        files={"image": ("ref.png", png_bytes(), "image/png")},
        data={"prompt": "make it red", "size": "64x64", "num_inference_steps": "2"},
    )
    assert answer.status_code == 202, answer.text
    assert answer.json()["endpoint"] == "/v1/images/edits"
    body = wait_for(keyed, answer.json()["id"], ended, KEY_A)
    assert body["status"] == "succeeded", body
    image = HTTP.get(body["result"]["data"][0]["url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert body["expires_at"] > body["finished"] >= body["created"]


def test_another_keys_job_answers_404(keyed: Server) -> None:
    mine = submit(keyed, KEY_A).json()["id"]
    for answer in (
        job(keyed, mine, KEY_B),
        HTTP.delete(f"{keyed.url}/v1/images/jobs/{mine}", headers=auth(KEY_B)),
        job(keyed, "job_" + secrets.token_urlsafe(24), KEY_A),
    ):
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"]["code"] == "job_not_found"
    listed = HTTP.get(f"{keyed.url}/v1/images/jobs", headers=auth(KEY_B)).json()["data"]
    assert mine not in [item["id"] for item in listed]
    assert HTTP.get(f"{keyed.url}/v1/images/jobs/{mine}").status_code == 401
    client = keyed.client(KEY_B, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.get(f"/images/jobs/{mine}", cast_to=object)
    assert wait_for(keyed, mine, ended, KEY_A)["status"] == "succeeded"


def test_cancel_while_queued_and_while_running(keyed: Server) -> None:
    steps = 'fluxd_denoise_steps_total{model="flux.2-dev"}'
    dropped = 'fluxd_cancelled_total{model="flux.2-dev",stage="queued"}'
    before = {series: metric(keyed, series) for series in (steps, dropped)}
    long = submit(keyed, KEY_A, **HOLD, partial_images=3).json()["id"]  # held at its first preview
    running = wait_for(keyed, long, lambda body: body["status"] == "running" and "progress" in body, KEY_A)
    assert running["progress"]["steps"] == HOLD["num_inference_steps"]
    assert running["expires_at"] is None  # on every job, as on OpenAI's video jobs: set once it ends
    queued = submit(keyed, KEY_A, seed=5).json()["id"]
    waiting = job(keyed, queued, KEY_A).json()
    assert waiting["status"] == "queued" and waiting["position"] == 0 and waiting["expires_at"] is None
    cancelled = HTTP.delete(f"{keyed.url}/v1/images/jobs/{queued}", headers=auth(KEY_A))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    # The running job's first preview (step 2 of 8, as partial_images=3 spaces them) can be polled.
    previewed = wait_for(keyed, long, lambda body: "preview" in body or ended(body), KEY_A)
    assert previewed["preview"]["partial_image_index"] == 0
    assert pixels(previewed["preview"]["b64_json"]).shape == (64, 64, 3)
    assert (
        HTTP.delete(f"{keyed.url}/v1/images/jobs/{long}", headers=auth(KEY_A)).json()["status"] == "cancelled"
    )
    wait_until(lambda: workers_idle(keyed))
    # The running one stopped denoising before its end: its first preview came at step 2 of 8.
    assert 2 <= metric(keyed, steps) - before[steps] < HOLD["num_inference_steps"]
    # The queued one left the queue without running; neither ends again, nor gets a result.
    assert metric(keyed, dropped) == before[dropped] + 1
    assert wait_for(keyed, submit(keyed, KEY_A).json()["id"], ended, KEY_A)["status"] == "succeeded"
    for job_id in (queued, long):
        body = job(keyed, job_id, KEY_A).json()
        assert body["status"] == "cancelled" and "result" not in body
        assert keyed.wait_for_log(f"job {job_id} ").count(f"job {job_id} ") == 1  # the one line of its end
    # A DELETE of an ended job deletes it.
    again = HTTP.delete(f"{keyed.url}/v1/images/jobs/{long}", headers=auth(KEY_A))
    assert again.json() == {"id": long, "object": "image.job.deleted", "deleted": True}
    assert job(keyed, long, KEY_A).status_code == 404


def test_webhook_is_signed_retried_and_delivered(keyed: Server, receiver: Receiver) -> None:
    job_id = submit(keyed, KEY_A, webhook_url=f"{receiver.url}/hooks/flaky", seed=3).json()["id"]
    assert wait_for(keyed, job_id, ended, KEY_A)["status"] == "succeeded"
    deadline = time.monotonic() + 60
    while len(receiver.posts("/hooks/flaky")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    (first_headers, _), (headers, body) = receiver.posts("/hooks/flaky")
    # The spec's own library verifies the signature (and the timestamp's freshness).
    payload = Webhook(SECRET).verify(body, headers)
    assert payload["type"] == "image.job.succeeded"
    assert payload["data"]["id"] == job_id and payload["data"]["status"] == "succeeded"
    assert payload["data"]["result"]["data"][0]["seed"] == 3
    assert first_headers["webhook-id"] == headers["webhook-id"] == job_id  # one message, tried twice
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + base64.b64encode(b"another secret of thirty-two b.").decode()).verify(
            body, headers
        )
    # Each try is logged once its answer is in, which can be after the receiver has recorded it.
    logs = keyed.wait_for_log(f"webhook {job_id} try 2 to {receiver.url}/hooks/flaky: 204")
    assert f"webhook {job_id} try 1 to {receiver.url}/hooks/flaky answered 500" in logs


@pytest.mark.parametrize(
    "url",
    [
        "{receiver}/elsewhere",
        "{receiver}/hooksmith",
        "http://localhost:{port}/hooks",
        "http://127.0.0.1.nip.io:{port}/hooks",
        "file:///etc/passwd",
    ],
)
def test_a_webhook_off_the_allow_list_is_a_400(keyed: Server, receiver: Receiver, url: str) -> None:
    client = keyed.client(KEY_A, max_retries=0)
    target = url.format(receiver=receiver.url, port=receiver.http.server_port)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="x", extra_body={"webhook_url": target}, extra_headers=ASYNC)
    assert info.value.body["param"] == "webhook_url"


def test_async_only_fields_are_refused_on_their_own(keyed: Server, receiver: Receiver) -> None:
    client = keyed.client(KEY_A, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="x", extra_body={"webhook_url": f"{receiver.url}/hooks/x"})
    assert info.value.body["param"] == "webhook_url"
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="x", stream=True, extra_headers=ASYNC)
    assert info.value.body["param"] == "stream"
    # Without the header a request is as it always was: partial_images needs stream=true.
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="x", partial_images=1)
    assert info.value.body["param"] == "partial_images"


def test_job_counts_by_status_are_in_metrics(keyed: Server) -> None:
    before = metric(keyed, 'fluxd_jobs{status="succeeded"}')
    job_id = submit(keyed, KEY_A).json()["id"]
    wait_for(keyed, job_id, ended, KEY_A)
    assert metric(keyed, 'fluxd_jobs{status="succeeded"}') == before + 1
    assert metric(keyed, 'fluxd_jobs{status="queued"}') == metric(keyed, 'fluxd_jobs{status="running"}') == 0


@pytest.fixture()
def bounded(tiny_weights: Path, tmp_path: Path) -> Iterator[Server]:
    env = {
        "FLUXD_MAX_JOBS": "4",
        "FLUXD_JOB_TTL_S": "30",
        # The worker fails any job that reaches step 99: only the one job here that asks for 100 steps and is
        # not cancelled long before.
        "FLUXD_WORKER_ENTRY": "tests.faults:error_after_step_99",
    }
    server = start_server(tiny_weights, tmp_path, "--queue-size", "1", env=env)
    yield server
    stop_server(server)


def test_a_failed_job_and_the_queue_and_store_limits(bounded: Server) -> None:
    failing = submit(bounded, size="32x32", num_inference_steps=100).json()["id"]
    failed = wait_for(bounded, failing, ended)
    assert failed["status"] == "failed" and "result" not in failed
    assert failed["error"] == {
        "message": "The server had an error while processing your request.",
        "type": "server_error",
        "param": None,
        "code": "server_error",
    }
    assert FAULT_MARK not in json.dumps(failed)  # the traceback stays in the log
    long = submit(bounded, **LONG).json()["id"]
    wait_for(bounded, long, lambda body: body["status"] == "running")
    queued = submit(bounded).json()["id"]
    full_queue = submit(bounded)
    assert full_queue.status_code == 429 and "queue" in full_queue.json()["error"]["message"]
    for job_id in (queued, long):
        HTTP.delete(f"{bounded.url}/v1/images/jobs/{job_id}")
    fourth = submit(bounded)
    assert fourth.status_code == 202, fourth.text  # the queue has room again, and so has the store
    wait_for(bounded, fourth.json()["id"], ended)
    full_store = submit(bounded)  # four jobs stored, none expired yet
    assert full_store.status_code == 429, full_store.text
    assert full_store.json()["error"]["code"] == "rate_limit_exceeded"
    assert "4 jobs" in full_store.json()["error"]["message"]
    assert 1 <= int(full_store.headers["retry-after"]) <= 30  # when the first of them expires


@pytest.mark.timeout(900)  # two server starts and seven renders, on a loaded machine
def test_a_sigkilled_server_loses_no_job_and_runs_none_twice(tiny_weights: Path, tmp_path: Path) -> None:
    # Killed once two have succeeded and one runs: the rest were queued, so all three kinds are recovered.
    jobs = 6
    store = tmp_path / "store"
    # One image per pipeline call, so a rerun job and a solo render are the very same call.
    extra = ("--store-dir", str(store), "--max-batch-images", "1")
    ports = [free_port(), free_port()]
    first = launch(
        serve_command(tiny_weights, tmp_path, ports[0]) + list(extra), ports[0], tmp_path / "first.log", None
    )
    work = {"size": "256x256", "num_inference_steps": 12, "prompt": "a lighthouse"}
    try:
        ids = [submit(first, **work, seed=100 + i).json()["id"] for i in range(jobs)]

        def mid_run() -> bool:
            bodies = [job(first, job_id).json() for job_id in ids]
            done = sum(body["status"] == "succeeded" for body in bodies)
            return done >= 2 and any(body.get("progress", {}).get("step", 0) >= 1 for body in bodies)

        deadline = time.monotonic() + 240
        while not mid_run():
            assert time.monotonic() < deadline, "the jobs never ran"
            time.sleep(0.05)
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(30)
    finally:
        if first.process.poll() is None:
            stop_server(first)
    second = launch(
        serve_command(tiny_weights, tmp_path, ports[1]) + list(extra), ports[1], tmp_path / "second.log", None
    )
    try:
        results = {job_id: wait_for(second, job_id, ended) for job_id in ids}
        assert all(body["status"] == "succeeded" for body in results.values()), results
        for job_id in ids:  # each ran to completion once
            line = f"job {job_id} succeeded"
            if line not in first.logs():  # it ended after the restart, and its line follows its end
                second.wait_for_log(line)
            assert (first.logs() + second.logs()).count(line) == 1, job_id
        recovered = re.findall(r"job (job_\S+) recovered after a restart: was (\w+)", second.logs())
        assert "running" in {state for _, state in recovered}, second.logs()[-3000:]
        assert {job_id for job_id, _ in recovered} <= set(ids)
        assert len(recovered) < jobs  # the ones that had succeeded stayed succeeded, results and all
        rerun = next(job_id for job_id, state in recovered if state == "running")
        seed = 100 + ids.index(rerun)
        solo = HTTP.post(
            f"{second.url}/v1/images/generations",
            json={**FAST, **work, "seed": seed},
        ).json()
        [image] = results[rerun]["result"]["data"]
        assert image["seed"] == seed
        assert np.array_equal(pixels(image["b64_json"]), pixels(solo["data"][0]["b64_json"]))
    finally:
        stop_server(second)


def test_a_cancelled_job_reports_its_end_by_webhook_too(keyed: Server, receiver: Receiver) -> None:
    job_id = submit(keyed, KEY_A, **HOLD, webhook_url=f"{receiver.url}/hooks/ends").json()["id"]
    HTTP.delete(f"{keyed.url}/v1/images/jobs/{job_id}", headers=auth(KEY_A))
    deadline = time.monotonic() + 60
    while not receiver.posts("/hooks/ends") and time.monotonic() < deadline:
        time.sleep(0.2)
    [(headers, body)] = receiver.posts("/hooks/ends")
    assert json.loads(body)["type"] == "image.job.cancelled"
    assert Webhook(SECRET).verify(body, headers)["data"]["id"] == job_id


def async_jobs_blocks(part: int = 0) -> dict[str, str]:
    """The fenced code blocks of README's "## Async jobs" section (0) or its n-th subsection, by fence."""
    section = (ROOT / "README.md").read_text().split("\n## Async jobs", 1)[1].split("\n## ", 1)[0]
    text = section.split("\n### ")[part]
    return dict(re.findall(r"^```(\w+)\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("part", [0, 1])
@pytest.mark.parametrize(
    ("fence", "command", "made"),
    [
        ("python", [sys.executable, "jobs.py"], {"lighthouse.png": (512, 512)}),
        ("bash", ["bash", "-euo", "pipefail", "jobs.py"], {"fox.png": (256, 256)}),  # the demo's default size
    ],
)
def test_readme_async_blocks_run_as_they_stand(
    keyed: Server, tmp_path: Path, fence: str, command: list[str], made: dict[str, tuple[int, int]], part: int
) -> None:
    if fence == "bash" and not all(shutil.which(tool) for tool in ("curl", "jq", "base64")):
        pytest.skip("curl, jq and base64 are needed for README's curl block")
    code = async_jobs_blocks(part)[fence].replace("http://localhost:8000", keyed.url)
    (tmp_path / "jobs.py").write_text(re.sub(r"\bKEY\b", KEY_A, code))
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=540, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert {name: Image.open(tmp_path / name).size for name in made} == made
