"""The durable job table on its own: one end per job, owners apart, a bound, and what a restart finds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.jobs.table import JobTable, NewJob, StoreLocked


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


def test_an_idempotency_key_holds_one_job_per_owner(table: JobTable) -> None:
    keyed = NewJob("j1", "a", "/v1/images/generations", "flux.2-dev", "{}", None, None, "k", "print-1")
    assert run(table.insert(keyed, limit=10)).id == "j1"
    again = NewJob("j2", "a", "/v1/images/generations", "flux.2-dev", "{}", None, None, "k", "print-2")
    held = run(table.insert(again, limit=10))
    assert held.id == "j1" and held.fingerprint == "print-1"  # the first job, with what it was asked
    assert run(table.get("j2")) is None
    other_owner = NewJob("j3", "b", "/v1/images/generations", "flux.2-dev", "{}", None, None, "k", "print-1")
    assert run(table.insert(other_owner, limit=10)).id == "j3"
    assert run(table.by_key("a", "k")).id == "j1" and run(table.by_key("b", "k")).id == "j3"


def test_a_shorter_retention_and_deletion(table: JobTable) -> None:
    run(table.insert(NewJob("short", "a", "/e", "m", "{}", None, retention=5), limit=10))
    run(table.insert(new("kept"), limit=10))
    assert run(table.delete("short", "a")) is None  # not ended: nothing to delete
    for job_id in ("short", "kept"):
        run(table.finish(job_id, "succeeded", result="{}"))
    short, kept = run(table.get("short")), run(table.get("kept"))
    assert short.expires - short.finished == pytest.approx(5) and kept.expires - kept.finished == 60
    assert run(table.delete("short", "b")) is None  # another owner's
    assert run(table.delete("short", "a")).id == "short"
    assert run(table.get("short")) is None


def test_a_damaged_table_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = JobTable(tmp_path, ttl_s=60)
    run(table.insert(new("lost"), limit=10))
    table.close()
    database = tmp_path / "jobs.sqlite3"
    data = bytearray(database.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the first page's b-tree, behind an intact header
    database.write_bytes(bytes(data))
    fresh = JobTable(tmp_path, ttl_s=60)
    try:
        assert fresh.moved_aside is not None and fresh.moved_aside.read_bytes() == bytes(data)
        assert str(database) in caplog.text and str(fresh.moved_aside) in caplog.text
        assert run(fresh.get("lost")) is None
        assert run(fresh.insert(new("next"), limit=10)).id == "next"
    finally:
        fresh.close()
