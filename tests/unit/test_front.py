"""The HTTP front in-process: the ASGI app through httpx, with a stand-in for the worker processes.

What crosses the process boundary is answered by tests/standin.py; the scheduler, build_request, the guard
(auth, body size, request ids), the error policy and the service run as they do in `fluxd serve`.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from server.app import create_app
from server.declarations.settings import Settings
from tests.standin import StandInHandle, StandInPool

Check = Callable[[httpx.AsyncClient, StandInHandle], Awaitable[None]]
BODY = {"prompt": "a fox", "size": "64x64", "response_format": "b64_json", "num_inference_steps": 2}


@asynccontextmanager
async def front(tmp: Path, **settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, StandInHandle]]:
    app = create_app(Settings(weights="synthetic", store_dir=tmp / "store", **settings), StandInPool)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fluxd") as client:
            yield client, app.state.pool.workers[0]


def run(tmp: Path, check: Check, **settings: Any) -> None:
    async def main() -> None:
        async with front(tmp, **settings) as (client, worker):
            await check(client, worker)

    asyncio.run(main())


def queued(client: httpx.AsyncClient) -> int:
    """Requests waiting in the scheduler's queues, not yet taken by a worker."""
    return client._transport.app.state.scheduler.depth()  # type: ignore[attr-defined]


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


def test_compatible_requests_queued_behind_a_batch_run_together(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        first = asyncio.ensure_future(client.post("/v1/images/generations", json=BODY))
        await until(lambda: len(worker.batches) == 1)
        waiting = [
            asyncio.ensure_future(client.post("/v1/images/generations", json={**BODY, "seed": seed}))
            for seed in (1, 2, 3)
        ]
        other = asyncio.ensure_future(client.post("/v1/images/generations", json={**BODY, "size": "32x32"}))
        await until(lambda: queued(client) == 4)
        worker.finish()
        await until(lambda: len(worker.batches) == 2)
        assert sorted(r.seeds[0] for r in worker.batches[1]) == [1, 2, 3]  # one call for the three
        worker.finish()
        await until(lambda: len(worker.batches) == 3)
        assert [r.width for r in worker.batches[2]] == [32]  # another size never joins that batch
        worker.finish()
        answers = [await first, *[await w for w in waiting], await other]
        assert [a.status_code for a in answers] == [200] * 5
        assert [a.json()["data"][0]["seed"] for a in answers[1:4]] == [1, 2, 3]

    run(tmp_path, check, max_batch_images=4)


def test_a_full_queue_is_429_with_retry_after(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        running = asyncio.ensure_future(client.post("/v1/images/generations", json=BODY))
        await until(lambda: len(worker.batches) == 1)
        waiting = asyncio.ensure_future(client.post("/v1/images/generations", json=BODY))
        await until(lambda: queued(client) == 1)
        refused = await client.post("/v1/images/generations", json=BODY)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 120 and refused.headers["x-should-retry"] == "true"
        worker.finish()
        await until(lambda: len(worker.batches) == 2)
        worker.finish()
        assert (await running).status_code == (await waiting).status_code == 200

    run(tmp_path, check, queue_size=1)


def test_a_request_queued_past_its_deadline_is_504_not_retried(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        running = asyncio.ensure_future(client.post("/v1/images/generations", json=BODY))
        await until(lambda: len(worker.batches) == 1)
        late = await client.post("/v1/images/generations", json={**BODY, "seed": 9})
        assert late.status_code == 504 and late.json()["error"]["code"] == "queue_timeout"
        assert late.headers["x-should-retry"] == "false"
        worker.finish()
        assert (await running).status_code == 200
        assert len(worker.batches) == 1  # the timed-out request never reached a worker

    run(tmp_path, check, queue_timeout_s=0.2)


def test_cancelling_drops_a_queued_request_and_stops_a_running_one(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        running = asyncio.ensure_future(client.post("/v1/images/generations", json=BODY))
        await until(lambda: len(worker.batches) == 1)
        waiting = asyncio.ensure_future(client.post("/v1/images/generations", json={**BODY, "size": "32x32"}))
        await until(lambda: queued(client) == 1)
        waiting.cancel()
        await until(lambda: queued(client) == 0)  # dropped from the queue: it will never run
        running.cancel()
        await until(lambda: worker.cancelled == [worker.batches[0][0].id])  # the worker is told to stop
        worker.finish()
        assert queued(client) == 0 and len(worker.batches) == 1

    run(tmp_path, check)


def test_auth_guards_the_api_and_leaves_probes_open(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        missing = await client.get("/v1/models")
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        for answer in (missing, wrong):
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
            assert answer.headers["x-should-retry"] == "false" and answer.headers["x-request-id"]
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer k1"})).status_code == 200
        assert (await client.get("/v1/models", headers={"Authorization": "bearer  k2 "})).status_code == 200
        for path in ("/health", "/ready", "/metrics"):
            assert (await client.get(path)).status_code == 200, path
        assert not worker.batches

    run(tmp_path, check, api_keys=["k1", "k2"])


def test_an_unexpected_fault_is_a_500_envelope_and_the_app_does_not_raise(tmp_path: Path) -> None:
    """Starlette re-raises what an `Exception` handler answers, and uvicorn then drops the keep-alive
    connection; ASGITransport re-raises it too, so a raise here fails the test."""

    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        worker.fail_with = RuntimeError("boom")
        answer = await client.post("/v1/images/generations", json=BODY)
        assert answer.status_code == 500
        assert answer.json()["error"] == {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": "server_error",
        }
        assert "boom" not in answer.text
        worker.fail_with = None
        assert (await client.get("/health")).status_code == 200

    run(tmp_path, check)


def test_bad_input_is_a_400_before_the_queue(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        cases = {
            "size": {"size": "9" * 5000 + "x64"},
            "resolution": {"resolution": "1" + "0" * 400},
            "negative_prompt": {
                "negative_prompt": "x" * 40_000,
                "true_cfg_scale": 2.0,
                "model": "flux.1-dev",
            },
            "prompt_2": {"prompt_2": "x" * 40_000, "model": "flux.1-dev"},
        }
        for param, fields in cases.items():
            answer = await client.post("/v1/images/generations", json={**BODY, **fields})
            assert answer.status_code == 400, (param, answer.text[:300])
            assert answer.json()["error"]["param"] == param
            assert len(answer.content) < 2000  # the value is not echoed back whole
        assert not worker.batches

    run(tmp_path, check)


def test_models_publish_the_declared_parameters(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        kontext = (await client.get("/v1/models/flux.1-kontext-dev")).json()
        assert "image" in kontext["parameters"] and "resolution_mode" in kontext["parameters"]
        assert kontext["normalisation"]["num_inference_steps"]["default"] == 28
        assert kontext["normalisation"]["cfg_scale"]["behaviour"] == "renamed"
        dev = (await client.get("/v1/models/flux.1-dev")).json()
        # FLUX.1 [dev] edits only with a mask: it takes the edit fields, and says so in its modes.
        assert {"image", "mask", "strength"} <= set(dev["parameters"]) and "inpaint" in dev["modes"]
        assert "input_fidelity" in dev["normalisation"]
        json.dumps(kontext)

    run(tmp_path, check)


def test_the_front_forwards_the_bytes_the_worker_encoded(tmp_path: Path) -> None:
    # Bytes no decoder takes: a front that decoded or re-encoded an image would fail on them.
    sent = b"bytes the worker encoded as webp"

    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        worker.image_bytes = sent
        for response_format in ("b64_json", "url"):
            body = {**BODY, "output_format": "webp", "output_compression": 40}
            body["response_format"] = response_format
            answer = asyncio.ensure_future(client.post("/v1/images/generations", json=body))
            await until(lambda: worker.busy_images > 0)
            [request] = worker.batches[-1]
            assert (request.output_format, request.output_compression) == ("webp", 40)  # the worker's job
            worker.finish()
            [image] = (await answer).json()["data"]
            if response_format == "b64_json":
                assert base64.b64decode(image["b64_json"]) == sent
            else:
                stored = await client.get(urlparse(image["url"]).path)
                assert (stored.content, stored.headers["content-type"]) == (sent, "image/webp")

    run(tmp_path, check)
