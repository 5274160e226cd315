"""`acceleration` and `go_fast` in the HTTP front, in-process (the stand-in pattern of test_front.py): the
level each request resolves to, the 400s, the field the answer reports, and batches that never mix levels."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from pipelines.contract.messages import RenderRequest
from server.dispatch.scheduler import batch_key
from tests.standin import StandInHandle
from tests.unit.test_front import BODY, queued, run, until

GENERATIONS = "/v1/images/generations"
TURBO = {"model": "flux.2-dev-turbo", "num_inference_steps": 8}


def test_batch_key_separates_levels() -> None:
    def render(level: str) -> RenderRequest:
        return RenderRequest("r", "flux.2-dev", "a fox", 64, 64, 28, 4.0, [1], acceleration=level)

    keys = {batch_key(render(level)) for level in ("none", "regular", "high")}
    assert len(keys) == 3


def test_queued_requests_batch_only_with_their_own_level(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        first = asyncio.ensure_future(client.post(GENERATIONS, json=BODY))
        await until(lambda: len(worker.batches) == 1)
        levels = ["high", "none", "high", "none"]
        waiting = [
            asyncio.ensure_future(client.post(GENERATIONS, json={**BODY, "seed": i, "acceleration": level}))
            for i, level in enumerate(levels)
        ]
        await until(lambda: queued(client) == len(levels))
        worker.finish()
        await until(lambda: len(worker.batches) == 2)
        worker.finish()
        await until(lambda: len(worker.batches) == 3)
        worker.finish()
        batched = [{request.acceleration for request in batch} for batch in worker.batches[1:]]
        assert sorted(map(sorted, batched)) == [["high"], ["none"]]
        assert [len(batch) for batch in worker.batches[1:]] == [2, 2]
        answers = [await first, *[await w for w in waiting]]
        assert [a.status_code for a in answers] == [200] * 5
        # flux.2-dev's default is fal's 'regular'; each answer says what ran.
        assert [a.json()["acceleration"] for a in answers] == ["regular", *levels]

    run(tmp_path, check, max_batch_images=4)


@pytest.mark.parametrize(
    ("fields", "level"),
    [
        ({}, "regular"),
        ({"go_fast": True}, "regular"),
        ({"go_fast": False}, "none"),
        ({"acceleration": "high", "go_fast": True}, "high"),
        ({"model": "flux.1-kontext-dev"}, "none"),
        ({"model": "flux.1-kontext-dev", "go_fast": True}, "regular"),
        (TURBO, "none"),
        ({**TURBO, "go_fast": False}, "none"),
    ],
)
def test_the_level_each_request_resolves_to(tmp_path: Path, fields: dict, level: str) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        answer = asyncio.ensure_future(client.post(GENERATIONS, json={**BODY, **fields}))
        await until(lambda: len(worker.batches) == 1)
        assert worker.batches[0][0].acceleration == level
        worker.finish()
        assert (await answer).json()["acceleration"] == level

    run(tmp_path, check)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({**TURBO, "acceleration": "regular"}, "acceleration"),
        ({**TURBO, "go_fast": True}, "go_fast"),
        ({"acceleration": "none", "go_fast": True}, "go_fast"),
        ({"acceleration": "high", "go_fast": False}, "go_fast"),
        ({"acceleration": "max"}, "acceleration"),
    ],
)
def test_levels_a_model_cannot_run_are_a_400_naming_the_parameter(
    tmp_path: Path, fields: dict, param: str
) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        answer = await client.post(GENERATIONS, json={**BODY, **fields})
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == param
        assert worker.batches == []

    run(tmp_path, check)


def test_models_publish_each_default_level(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        defaults = {}
        for model in ("flux.2-dev", "flux.1-kontext-dev", "flux.2-dev-turbo"):
            published = (await client.get(f"/v1/models/{model}")).json()["normalisation"]
            defaults[model] = published["acceleration"]["default"]
        assert defaults == {"flux.2-dev": "regular", "flux.1-kontext-dev": "none", "flux.2-dev-turbo": "none"}

    run(tmp_path, check)
