"""Async jobs under real faults: a write lock another connection holds, a job table damaged at the byte level,
a disk that fills while a job runs. Each ends in a bounded queue, a server that serves, a job that ends.

The full-disk case mounts a small tmpfs (root only), as the url store's tests do; it skips where mounting is
refused."""

from __future__ import annotations

import contextlib
import errno
import shutil
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server.jobs.table import DATABASE
from tests.e2e.conftest import HTTP, LONG, Server, start_server, stop_server, wait_until
from tests.e2e.test_async_jobs import ended, job, submit, wait_for
from tests.e2e.test_store import tmpfs

QUEUE = 4
B64 = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def table_of(store: Path) -> Path:
    return store / "fluxd-jobs" / DATABASE


def stored_status(store: Path, job_id: str) -> str:
    """The job's status as the file holds it, read from a connection of the test's own."""
    with sqlite3.connect(f"file:{table_of(store)}?mode=ro", uri=True) as db:
        return db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


@pytest.fixture(scope="module")
def queued(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A server with a store folder of its own and a queue of QUEUE places, and that folder."""
    tmp = tmp_path_factory.mktemp("queued")
    store = tmp / "store"
    server = start_server(tiny_weights, tmp, "--store-dir", str(store), "--queue-size", str(QUEUE))
    yield server, store
    stop_server(server)


def test_concurrent_submits_behind_a_held_write_lock_never_overfill_the_queue(
    queued: tuple[Server, Path],
) -> None:
    server, store = queued
    assert wait_for(server, submit(server).json()["id"], ended)["status"] == "succeeded"  # the table exists
    locker = sqlite3.connect(table_of(store), isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # the write lock, held as a slow disk would hold it
    try:
        with ThreadPoolExecutor(60) as pool:
            answers = [pool.submit(submit, server, **LONG, seed=seed) for seed in range(60)]
            # Held until the refusals are in (under the server's 5 s busy timeout, so the inserts wait).
            deadline = time.monotonic() + 4
            while sum(a.done() for a in answers) < 60 - QUEUE - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            locker.execute("COMMIT")
            results = [answer.result() for answer in answers]
    finally:
        locker.close()
    accepted = [r.json()["id"] for r in results if r.status_code == 202]
    refused = [r for r in results if r.status_code != 202]
    assert all(r.status_code == 429 for r in refused), [r.text for r in refused]
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in refused)
    # The queue's places, and the one worker's job that left it for the worker.
    assert 1 <= len(accepted) <= QUEUE + 1, len(accepted)
    for job_id in accepted:
        body = job(server, job_id).json()
        assert body["status"] == "running" or body.get("position") is not None, body
    for job_id in accepted:
        HTTP.delete(f"{server.url}/v1/images/jobs/{job_id}")


def damage(database: Path, where: str) -> None:
    """Break the file behind its valid header: the jobs table's root page, or an overflow page of a result."""
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'jobs'").fetchone()
    data = bytearray(database.read_bytes())
    size = int.from_bytes(data[16:18], "big")
    if where == "table":
        start = (root - 1) * size
        data[start : start + 8] = b"\xff" * 8  # no such b-tree page type
    else:
        pages = [data[i : i + size] for i in range(size, len(data), size)]
        number = next(n for n, page in enumerate(pages, start=2) if set(page[4:]) <= B64)
        start = (number - 1) * size
        data[start : start + 4] = b"\xff\xff\xff\x7f"  # the next overflow page: far past the file's end
    database.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def stored_job(queued: tuple[Server, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store folder whose job table holds a succeeded job: a copy, by SQLite's backup, of the queued
    server's table, page for page as the server wrote it; each test damages a copy of it."""
    server, running = queued
    # A 256x256 noise PNG in b64_json: a result far larger than a page, held in overflow pages.
    old = submit(server, size="256x256").json()["id"]
    assert wait_for(server, old, ended)["status"] == "succeeded"
    store = tmp_path_factory.mktemp("stored-job") / "store"
    table_of(store).parent.mkdir(parents=True)
    source, copy = sqlite3.connect(table_of(running)), sqlite3.connect(table_of(store))
    with contextlib.closing(source), contextlib.closing(copy):
        source.backup(copy)
    return store, old


@pytest.mark.parametrize("where", ["table", "overflow"])
def test_a_damaged_job_table_is_moved_aside_and_everything_serves(
    tiny_weights: Path, tmp_path: Path, stored_job: tuple[Path, str], where: str
) -> None:
    store, old = tmp_path / "store", stored_job[1]
    shutil.copytree(stored_job[0], store)
    database = table_of(store)
    damage(database, where)
    damaged = database.read_bytes()
    server = start_server(tiny_weights, tmp_path, "--store-dir", str(store))
    try:
        ready = HTTP.get(f"{server.url}/ready")
        assert ready.status_code == 200
        jobs = ready.json()["jobs"]
        assert jobs["state"] == "ok" and jobs["moved_aside"], jobs
        assert Path(jobs["moved_aside"]).read_bytes() == damaged  # kept to look at
        assert str(database) in server.logs() and jobs["moved_aside"] in server.logs()
        assert job(server, old).status_code == 404  # its jobs went with it
        sync = HTTP.post(
            f"{server.url}/v1/images/generations",
            json={"prompt": "x", "size": "64x64", "num_inference_steps": 2},
        )
        assert sync.status_code == 200, sync.text
        assert wait_for(server, submit(server).json()["id"], ended)["status"] == "succeeded"
        assert " 500 " not in server.logs()
    finally:
        stop_server(server)


def fill(folder: Path) -> Path:
    filler = folder / "filler.bin"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_result_the_full_disk_refused_ends_the_job_and_is_stored_when_space_returns(
    tiny_weights: Path, tmp_path: Path
) -> None:
    store = tmp_path / "mounted"
    with tmpfs(store, "size=8m"):
        server = start_server(tiny_weights, tmp_path, "--store-dir", str(store))
        try:
            assert wait_for(server, submit(server).json()["id"], ended)["status"] == "succeeded"
            long = submit(server, **LONG).json()["id"]  # a 768x768 noise PNG: megabytes of result
            wait_for(server, long, lambda body: body["status"] == "running")
            filler = fill(store)
            done = wait_for(server, long, ended)
            assert done["status"] == "succeeded" and done["result"]["data"][0]["b64_json"], done
            assert stored_status(store, long) == "running"  # answered from memory; a restart runs it again
            jobs = HTTP.get(f"{server.url}/ready").json()["jobs"]
            assert jobs["state"] == "unavailable" and "full" in jobs["reason"], jobs
            filler.unlink()
            wait_until(lambda: stored_status(store, long) == "succeeded")
            assert job(server, long).json()["result"] == done["result"]
            wait_until(lambda: HTTP.get(f"{server.url}/ready").json()["jobs"]["state"] == "ok")
        finally:
            stop_server(server)
