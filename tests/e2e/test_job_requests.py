"""What a client asks of an async job beside its render, against a real server, by raw HTTP and the official
SDK: an Idempotency-Key (replayed, refused with another body, one job for concurrent sends, kept across a
restart), `Prefer: wait=N`, the deletion of an ended job, a shorter retention, webhook event filters, a
Cancel-After deadline, and the job's event feed resumed after a dropped connection."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from standardwebhooks.webhooks import Webhook

from tests.e2e import test_async_jobs as async_jobs
from tests.e2e.conftest import (
    HTTP,
    LONG,
    Server,
    free_port,
    launch,
    serve_command,
    stop_server,
    wait_until,
    workers_idle,
)
from tests.e2e.test_async_jobs import (
    ASYNC,
    FAST,
    KEY_A,
    KEY_B,
    SECRET,
    Receiver,
    auth,
    ended,
    job,
    submit,
    wait_for,
)

TTL_S = 120


def command(tiny_weights: Path, tmp: Path, port: int) -> list[str]:
    extra = ["--store-dir", str(tmp / "store"), "--job-ttl-s", str(TTL_S)]
    return serve_command(tiny_weights, tmp, port) + extra


def started(tiny_weights: Path, tmp: Path, hooks: str = "http://127.0.0.1:9/hooks") -> Server:
    port = free_port()
    env = {
        **os.environ,
        "FLUXD_API_KEYS": f"{KEY_A},{KEY_B}",
        "FLUXD_WEBHOOK_ALLOW": hooks,
        "FLUXD_WEBHOOK_SECRET": SECRET,
    }
    return launch(command(tiny_weights, tmp, port), port, tmp / f"server-{port}.log", env)


receiver = async_jobs.receiver  # the webhook receiver fixture, one per module


@pytest.fixture(scope="module")
def keyed(
    tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory, receiver: Receiver
) -> Iterator[Server]:
    """Two API keys, webhooks allowed under the receiver's /hooks, --job-ttl-s of TTL_S."""
    server = started(tiny_weights, tmp_path_factory.mktemp("requests"), f"{receiver.url}/hooks")
    yield server
    stop_server(server)


def keyed_submit(server: Server, key: str, idempotency: str, **fields) -> httpx.Response:
    return HTTP.post(
        f"{server.url}/v1/images/generations",
        json={**FAST, **fields},
        headers={**ASYNC, **auth(key), "Idempotency-Key": idempotency},
    )


def test_an_idempotency_key_replays_refuses_another_body_and_makes_one_job(keyed: Server) -> None:
    client = keyed.client(KEY_A, max_retries=0)
    headers = {**ASYNC, "Idempotency-Key": "order-1"}
    first = client.images.with_raw_response.generate(
        prompt="a red fox", size="64x64", extra_body={"num_inference_steps": 2}, extra_headers=headers
    )
    again = client.images.with_raw_response.generate(
        prompt="a red fox", size="64x64", extra_body={"num_inference_steps": 2}, extra_headers=headers
    )
    assert first.http_response.status_code == again.http_response.status_code == 202
    assert again.http_response.json()["id"] == first.http_response.json()["id"]
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    # The same key with another body: a 422 naming the header, and no second job.
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.images.generate(
            prompt="a blue fox", size="64x64", extra_body={"num_inference_steps": 2}, extra_headers=headers
        )
    assert (
        info.value.body["code"] == "idempotency_key_reused" and info.value.body["param"] == "Idempotency-Key"
    )
    # Another key's owner has keys of its own.
    theirs = keyed_submit(keyed, KEY_B, "order-1", prompt="a red fox", size="64x64")
    assert theirs.status_code == 202 and theirs.json()["id"] != first.http_response.json()["id"]
    # Eight sends at once while none has been answered yet: one job, the same for all.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: keyed_submit(keyed, KEY_A, "order-2", **LONG), range(8)))
    assert {answer.status_code for answer in answers} == {202}
    ids = {answer.json()["id"] for answer in answers}
    assert len(ids) == 1, ids
    [inflight] = ids
    listed = HTTP.get(f"{keyed.url}/v1/images/jobs", headers=auth(KEY_A), params={"limit": 100}).json()[
        "data"
    ]
    assert [item["id"] for item in listed].count(inflight) == 1
    HTTP.delete(f"{keyed.url}/v1/images/jobs/{inflight}", headers=auth(KEY_A))
    malformed = keyed_submit(keyed, KEY_A, "bad key with spaces")
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "Idempotency-Key"


def test_prefer_wait_answers_the_images_or_the_job(keyed: Server) -> None:
    client = keyed.client(KEY_A, max_retries=0)
    # Done within the wait: the SDK reads the 200 as the images it always gets.
    images = client.images.generate(
        prompt="a lighthouse",
        size="64x64",
        response_format="b64_json",
        extra_body={"num_inference_steps": 2, "seed": 4},
        extra_headers={"Prefer": "respond-async, wait=240"},
    )
    assert images.data[0].b64_json and images.data[0].model_extra["seed"] == 4
    # Not done within it: the 202 and the job, which runs on.
    raw = HTTP.post(
        f"{keyed.url}/v1/images/generations",
        json=LONG,
        headers={"Prefer": "respond-async, wait=1", **auth(KEY_A)},
    )
    assert raw.status_code == 202, raw.text
    assert raw.headers["preference-applied"] == "respond-async, wait=1"
    assert raw.json()["status"] in ("queued", "running")
    HTTP.delete(f"{keyed.url}/v1/images/jobs/{raw.json()['id']}", headers=auth(KEY_A))
    headers = {"Prefer": "respond-async, wait=soon", **auth(KEY_A)}
    bad = HTTP.post(f"{keyed.url}/v1/images/generations", json=FAST, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Prefer"


def test_deleting_an_ended_job_removes_it_and_its_url_images(keyed: Server) -> None:
    job_id = submit(keyed, KEY_A, response_format="url").json()["id"]
    body = wait_for(keyed, job_id, ended, KEY_A)
    url = body["result"]["data"][0]["url"]
    assert HTTP.get(url).status_code == 200
    client = keyed.client(KEY_A, max_retries=0)
    deleted = client.delete(f"/images/jobs/{job_id}", cast_to=object)
    assert deleted == {"id": job_id, "object": "image.job.deleted", "deleted": True}
    assert HTTP.get(url).status_code == 404
    assert job(keyed, job_id, KEY_A).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.delete(f"/images/jobs/{job_id}", cast_to=object)


def test_a_job_asks_for_a_shorter_retention_never_a_longer_one(keyed: Server) -> None:
    short = submit(keyed, KEY_A, job_ttl_s=2).json()["id"]
    body = wait_for(keyed, short, ended, KEY_A)
    assert body["expires_at"] == body["finished"] + 2
    kept = wait_for(keyed, submit(keyed, KEY_A).json()["id"], ended, KEY_A)
    assert kept["expires_at"] == kept["finished"] + TTL_S
    wait_until(lambda: job(keyed, short, KEY_A).status_code == 404)
    assert job(keyed, kept["id"], KEY_A).status_code == 200
    longer = submit(keyed, KEY_A, job_ttl_s=TTL_S + 1)
    assert longer.status_code == 400 and longer.json()["error"]["param"] == "job_ttl_s"
    client = keyed.client(KEY_A, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="x", extra_body={"job_ttl_s": 5})  # without Prefer: respond-async
    assert info.value.body["param"] == "job_ttl_s"


@pytest.mark.timeout(600)
def test_idempotency_keys_and_deadlines_outlive_a_killed_server(tiny_weights: Path, tmp_path: Path) -> None:
    first = started(tiny_weights, tmp_path)
    try:
        submitted = keyed_submit(first, KEY_A, "kept-key", seed=9).json()["id"]
        wait_for(first, submitted, ended, KEY_A)
        blocker = submit(first, KEY_A, **LONG).json()["id"]
        wait_for(first, blocker, lambda body: body["status"] == "running", KEY_A)
        headers = {**ASYNC, **auth(KEY_A), "Cancel-After": "4s"}
        late = HTTP.post(f"{first.url}/v1/images/generations", json=FAST, headers=headers).json()["id"]
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(30)
    finally:
        if first.process.poll() is None:
            stop_server(first)
    second = started(tiny_weights, tmp_path)
    try:
        replay = keyed_submit(second, KEY_A, "kept-key", seed=9)
        assert replay.status_code == 202 and replay.json()["id"] == submitted
        assert replay.json()["status"] == "succeeded"
        other = keyed_submit(second, KEY_A, "kept-key", seed=10)
        assert other.status_code == 422
        # Recovered behind the blocker, which runs again from the start: its deadline still holds.
        expired = wait_for(second, late, over, KEY_A)
        assert expired["status"] == "expired" and expired["error"]["code"] == "deadline_exceeded", expired
        assert f"job {late} recovered after a restart: was queued" in second.logs()
        HTTP.delete(f"{second.url}/v1/images/jobs/{blocker}", headers=auth(KEY_A))
    finally:
        stop_server(second)


def delivered(count: int) -> Callable[[dict], bool]:
    return lambda body: [hook["state"] for hook in body.get("webhooks", [])] == ["delivered"] * count


def test_webhook_events_are_filtered_sent_in_order_and_shown_on_the_job(
    keyed: Server, receiver: Receiver
) -> None:
    events = ["started", "preview", "succeeded"]
    hook = f"{receiver.url}/hooks/events"
    fields = {"num_inference_steps": 4, "partial_images": 1, "webhook_url": hook, "webhook_events": events}
    job_id = submit(keyed, KEY_A, **fields).json()["id"]
    shown = wait_for(keyed, job_id, delivered(3), KEY_A)
    posts = receiver.posts("/hooks/events")
    payloads = [Webhook(SECRET).verify(body, headers) for headers, body in posts]
    types = ["image.job.started", "image.job.preview", "image.job.succeeded"]
    assert [payload["type"] for payload in payloads] == types  # in the order they happened
    assert payloads[0]["data"]["status"] == "running" and payloads[1]["data"]["preview"]["b64_json"]
    assert payloads[2]["data"]["result"]["data"][0]["b64_json"]
    ids = [headers["webhook-id"] for headers, _ in posts]
    assert ids[-1] == job_id and len(set(ids)) == 3
    assert [(w["type"], w["tries"], w["last_status"]) for w in shown["webhooks"]] == [
        (t, 1, 204) for t in types
    ]
    # A filter without the endings: the start only; a retried delivery shows its tries.
    only = submit(keyed, KEY_A, webhook_url=f"{receiver.url}/hooks/start", webhook_events=["started"]).json()[
        "id"
    ]
    assert (
        wait_for(keyed, only, lambda body: ended(body) and delivered(1)(body), KEY_A)["status"] == "succeeded"
    )
    assert [json_type(body) for _, body in receiver.posts("/hooks/start")] == ["image.job.started"]
    retried = submit(keyed, KEY_A, webhook_url=f"{receiver.url}/hooks/flaky").json()["id"]
    [hook_shown] = wait_for(keyed, retried, delivered(1), KEY_A)["webhooks"]
    assert (hook_shown["type"], hook_shown["tries"], hook_shown["last_status"]) == (
        "image.job.succeeded",
        2,
        204,
    )
    alone = submit(keyed, KEY_A, webhook_events=["started"])
    assert alone.status_code == 400 and alone.json()["error"]["param"] == "webhook_events"


def json_type(body: bytes) -> str:
    return json.loads(body)["type"]


def over(body: dict) -> bool:
    return ended(body) or body["status"] == "expired"


def test_a_cancel_after_deadline_missed_while_queued_and_while_running(keyed: Server) -> None:
    client = keyed.client(KEY_A, max_retries=0)
    blocker = submit(keyed, KEY_A, **LONG).json()["id"]
    wait_for(keyed, blocker, lambda body: body["status"] == "running", KEY_A)
    # Queued behind a long job past its deadline: it expires and never runs.
    raw = client.images.with_raw_response.generate(
        prompt="x",
        size="64x64",
        response_format="b64_json",
        extra_body={"num_inference_steps": 2},
        extra_headers={**ASYNC, "Cancel-After": "1s"},
    )
    late = raw.http_response.json()["id"]
    expired = wait_for(keyed, late, over, KEY_A)
    assert expired["status"] == "expired" and "progress" not in expired and "result" not in expired
    assert expired["error"]["code"] == "deadline_exceeded"
    HTTP.delete(f"{keyed.url}/v1/images/jobs/{blocker}", headers=auth(KEY_A))
    wait_until(lambda: workers_idle(keyed))
    # Running past its deadline: stopped at its next step.
    headers = {**ASYNC, **auth(KEY_A), "Cancel-After": "2"}
    running = HTTP.post(f"{keyed.url}/v1/images/generations", json=LONG, headers=headers).json()["id"]
    stopped = wait_for(keyed, running, over, KEY_A)
    assert stopped["status"] == "cancelled" and stopped["error"]["code"] == "deadline_exceeded", stopped
    wait_until(lambda: workers_idle(keyed))
    bad = HTTP.post(
        f"{keyed.url}/v1/images/generations",
        json=FAST,
        headers={**ASYNC, **auth(KEY_A), "Cancel-After": "soon"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Cancel-After"


def sse(lines: Iterator[str]) -> Iterator[dict]:
    """The events of a text/event-stream, each as {id, event, data}; comments skipped."""
    event: dict = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            event[name] = json.loads(value) if name == "data" else value


def test_the_event_feed_resumes_after_a_dropped_connection_losing_nothing(keyed: Server) -> None:
    steps = 30
    job_id = submit(keyed, KEY_A, size="256x256", num_inference_steps=steps, partial_images=1).json()["id"]
    url = f"{keyed.url}/v1/images/jobs/{job_id}/events"
    events: list[dict] = []
    with HTTP.stream("GET", url, headers=auth(KEY_A)) as first:
        assert first.headers["content-type"].startswith("text/event-stream")
        for event in sse(first.iter_lines()):
            events.append(event)
            if event["event"] == "progress":
                break  # the connection drops mid-render
    with HTTP.stream("GET", url, headers={**auth(KEY_A), "Last-Event-ID": events[-1]["id"]}) as second:
        events += list(sse(second.iter_lines()))
    boot = events[0]["id"].split(".")[0]
    assert [event["id"] for event in events] == [f"{boot}.{n}" for n in range(1, len(events) + 1)]
    assert events[0]["event"] == "status" and events[0]["data"]["status"] == "queued"
    progress = [event["data"]["step"] for event in events if event["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == steps
    [preview] = [event["data"] for event in events if event["event"] == "preview"]
    assert preview["partial_image_index"] == 0 and preview["b64_json"]
    done = events[-1]
    assert (
        done["event"] == "done" and done["data"]["status"] == "succeeded" and done["data"]["result"]["data"]
    )
    # An ended job's feed is its end at once; another key's is a 404.
    [again] = list(sse(HTTP.get(url, headers=auth(KEY_A)).text.splitlines()))
    assert again["event"] == "done" and again["data"] == job(keyed, job_id, KEY_A).json()
    assert HTTP.get(url, headers=auth(KEY_B)).status_code == 404
