"""The durable job table on its own: one end per job, owners apart, a bound, and what a restart finds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.jobs import JobTable, NewJob, StoreLocked


def new(job_id: str, owner: str = "a") -> NewJob:
    return NewJob(job_id, owner, "/v1/images/generations", "flux.2-dev", f'{{"id": "{job_id}"}}', None)


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


@pytest.fixture()
def table(tmp_path: Path):  # type: ignore[no-untyped-def]
    opened = JobTable(tmp_path / "jobs", ttl_s=60)
    yield opened
    opened.close()


def test_a_job_ends_once(table: JobTable) -> None:
    assert run(table.insert(new("j1"), limit=10))
    assert run(table.start("j1")) == 1
    assert run(table.finish("j1", "succeeded", result='{"data": []}'))
    # A cancel (or a second run) that comes after the end changes nothing.
    assert not run(table.finish("j1", "cancelled"))
    assert not run(table.finish("j1", "succeeded", result='{"data": [1]}'))
    assert run(table.start("j1")) == 0
    row = run(table.get("j1"))
    assert row.status == "succeeded" and row.result == '{"data": []}' and row.finished is not None


def test_owners_see_only_their_jobs(table: JobTable) -> None:
    run(table.insert(new("mine", owner="a"), limit=10))
    assert run(table.get("mine", "b")) is None
    assert run(table.get("mine", "a")).id == "mine"
    assert [row.id for row in run(table.recent("a", 10))] == ["mine"]
    assert run(table.recent("b", 10)) == []


def test_the_limit_counts_every_stored_job(table: JobTable) -> None:
    assert run(table.insert(new("j1"), limit=1))
    assert run(table.room_in_s()) is None  # only live jobs: no expiry frees a place
    assert not run(table.insert(new("j2"), limit=1))
    run(table.finish("j1", "failed", error='{"message": "x"}'))
    assert 0 < run(table.room_in_s()) <= 60
    assert not run(table.insert(new("j2"), limit=1))


def test_a_reopened_table_has_what_a_killed_server_left(tmp_path: Path) -> None:
    table = JobTable(tmp_path, ttl_s=60)
    for job_id in ("queued", "running", "done"):
        run(table.insert(new(job_id), limit=10))
    run(table.start("running"))
    run(table.start("done"))
    run(table.finish("done", "succeeded", result="{}"))
    with pytest.raises(StoreLocked):
        JobTable(tmp_path, ttl_s=60)  # one server per store
    table.close()
    again = JobTable(tmp_path, ttl_s=60)
    try:
        unfinished = run(again.unfinished())
        assert [(row.id, row.status, row.attempts) for row, _ in unfinished] == [
            ("queued", "queued", 0),
            ("running", "running", 1),
        ]
        assert [request for _, request in unfinished] == ['{"id": "queued"}', '{"id": "running"}']
        assert run(again.get("done")).result == "{}"
        assert run(again.counts()) == {"queued": 1, "running": 1, "succeeded": 1}
    finally:
        again.close()


def test_expired_jobs_are_gone(tmp_path: Path) -> None:
    table = JobTable(tmp_path, ttl_s=0.01)
    try:
        run(table.insert(new("old"), limit=10))
        run(table.finish("old", "succeeded", result="{}"))
        asyncio.run(asyncio.sleep(0.05))
        assert run(table.get("old")) is None
        assert run(table.sweep()) == 1
        assert run(table.counts()) == {}
    finally:
        table.close()
