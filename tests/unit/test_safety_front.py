"""enable_safety_checker / disable_safety_checker in the HTTP front, in-process (the stand-in pattern of
test_front.py): the switch each request resolves to, from the server's --safety-checker default."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.standin import StandInHandle
from tests.unit.test_front import BODY, run, until


@pytest.mark.parametrize(
    ("server_default", "fields", "checked"),
    [
        (False, {}, False),
        (True, {}, True),
        (False, {"enable_safety_checker": True}, True),
        (True, {"enable_safety_checker": False}, False),
        (True, {"disable_safety_checker": True}, False),
        (False, {"disable_safety_checker": False}, True),
    ],
)
def test_the_check_each_request_resolves_to(
    tmp_path: Path, server_default: bool, fields: dict, checked: bool
) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        answer = asyncio.ensure_future(client.post("/v1/images/generations", json={**BODY, **fields}))
        await until(lambda: len(worker.batches) == 1)
        assert worker.batches[0][0].safety_check is checked
        worker.finish()
        assert (await answer).status_code == 200

    run(tmp_path, check, safety_checker=server_default)


def test_the_two_names_disagreeing_is_a_400(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        fields = {"enable_safety_checker": True, "disable_safety_checker": True}
        answer = await client.post("/v1/images/generations", json={**BODY, **fields})
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == "disable_safety_checker"

    run(tmp_path, check)
