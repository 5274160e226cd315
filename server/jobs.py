"""The durable table of async image jobs: SQLite from the standard library, WAL mode, in the store folder.

It sits beside the scheduler, not inside it: a row holds what the job needs to run again (its resolved
request, seeds included) and, once it ends, its answer. Every method runs its SQL in a thread, off the event
loop, one at a time. A job leaves queued/running in a single conditional UPDATE, so it ends exactly once:
of a success and a cancel that race, the first to commit wins and the other changes nothing.
"""

from __future__ import annotations

import asyncio
import fcntl
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar, cast

from server.protocol import JobStatus

ACTIVE: tuple[JobStatus, ...] = ("queued", "running")
DATABASE = "jobs.sqlite3"
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,          -- SHA-256 of the submitting API key; '' without keys
    status TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    created REAL NOT NULL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,  -- times a worker took it
    request TEXT NOT NULL,        -- JSON: the resolved request (seeds, reference images) and reply shape
    webhook_url TEXT,
    webhook TEXT,                 -- NULL: none asked; pending, delivered or failed
    result TEXT,                  -- the ImagesResponse, JSON
    error TEXT                    -- the error envelope's body, JSON
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
"""
_ROW = "id, owner, status, endpoint, model, created, finished, attempts, webhook_url, webhook, result, error"
_BRIEF = _ROW.replace("result, error", "NULL, error")  # listings leave out the (large) results


class StoreLocked(RuntimeError):
    """Another fluxd serves from this store: both would run every recovered job."""


@dataclass(frozen=True)
class JobRow:
    id: str
    owner: str
    status: JobStatus
    endpoint: str
    model: str
    created: float
    finished: float | None
    attempts: int
    webhook_url: str | None
    webhook: str | None
    result: str | None
    error: str | None


@dataclass(frozen=True)
class NewJob:
    id: str
    owner: str
    endpoint: str
    model: str
    request: str
    webhook_url: str | None


class JobTable:
    """`<folder>/jobs.sqlite3`, held by one server at a time (an flock the kernel drops with the process,
    so a SIGKILLed server does not lock out its successor)."""

    def __init__(self, folder: Path, ttl_s: float) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self._holder: IO[bytes] = (folder / "jobs.lock").open("wb")
        try:
            fcntl.flock(self._holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._holder.close()
            raise StoreLocked(f"another fluxd is serving async jobs from {folder}") from None
        # Autocommit: each statement is its own transaction; every write that must be atomic is one statement.
        self._db = sqlite3.connect(folder / DATABASE, check_same_thread=False, isolation_level=None)
        # WAL + NORMAL: a commit survives the process being killed (only a power cut can undo the last ones).
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._holder.close()

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return work(self._db)

        return await asyncio.to_thread(locked)

    async def insert(self, job: NewJob, limit: int) -> bool:
        """Store a queued job unless `limit` jobs are stored already (expired ones are swept first)."""

        def work(db: sqlite3.Connection) -> bool:
            self._sweep(db)
            # One statement: the count and the insert cannot be split by another insert.
            inserted = db.execute(
                "INSERT INTO jobs (id, owner, status, endpoint, model, created, request, webhook_url, "
                "webhook) SELECT ?, ?, 'queued', ?, ?, ?, ?, ?, ? WHERE (SELECT count(*) FROM jobs) < ?",
                (
                    job.id,
                    job.owner,
                    job.endpoint,
                    job.model,
                    time.time(),
                    job.request,
                    job.webhook_url,
                    "pending" if job.webhook_url else None,
                    limit,
                ),
            )
            return inserted.rowcount == 1

        return await self._call(work)

    async def room_in_s(self) -> float | None:
        """Seconds until the first finished job expires, freeing a place; None if every stored job is live."""

        def work(db: sqlite3.Connection) -> float | None:
            (first,) = db.execute("SELECT min(finished) FROM jobs WHERE finished IS NOT NULL").fetchone()
            return None if first is None else max(0.0, first + self.ttl_s - time.time())

        return await self._call(work)

    async def get(self, job_id: str, owner: str | None = None) -> JobRow | None:
        """The job if it has not expired and, unless `owner` is None, belongs to `owner`."""

        def work(db: sqlite3.Connection) -> JobRow | None:
            row = db.execute(
                f"SELECT {_ROW} FROM jobs WHERE id = ? AND (finished IS NULL OR finished > ?)",
                (job_id, time.time() - self.ttl_s),
            ).fetchone()
            return None if row is None or owner not in (None, row[1]) else JobRow(*row)

        return await self._call(work)

    async def recent(self, owner: str, limit: int) -> list[JobRow]:
        def work(db: sqlite3.Connection) -> list[JobRow]:
            rows = db.execute(
                f"SELECT {_BRIEF} FROM jobs WHERE owner = ? AND (finished IS NULL OR finished > ?) "
                "ORDER BY created DESC LIMIT ?",
                (owner, time.time() - self.ttl_s, limit),
            )
            return [JobRow(*row) for row in rows]

        return await self._call(work)

    async def unfinished(self) -> list[tuple[JobRow, str]]:
        """Queued and running jobs, oldest first, each with its stored request: what a restart runs again."""

        def work(db: sqlite3.Connection) -> list[tuple[JobRow, str]]:
            rows = db.execute(
                f"SELECT {_ROW}, request FROM jobs WHERE status IN (?, ?) ORDER BY created", ACTIVE
            )
            return [(JobRow(*row[:-1]), row[-1]) for row in rows]

        return await self._call(work)

    async def pending_webhooks(self) -> list[JobRow]:
        def work(db: sqlite3.Connection) -> list[JobRow]:
            rows = db.execute(
                f"SELECT {_ROW} FROM jobs WHERE webhook = 'pending' AND status NOT IN (?, ?)", ACTIVE
            )
            return [JobRow(*row) for row in rows]

        return await self._call(work)

    async def start(self, job_id: str) -> int:
        """A worker took the job: it is running, one attempt more. Returns its attempts (0: it had ended)."""

        def work(db: sqlite3.Connection) -> int:
            started = db.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1 "
                "WHERE id = ? AND status IN (?, ?)",
                (job_id, *ACTIVE),
            )
            if started.rowcount == 0:
                return 0
            return cast(int, db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])

        return await self._call(work)

    async def finish(
        self, job_id: str, status: JobStatus, result: str | None = None, error: str | None = None
    ) -> bool:
        """End a queued or running job with its answer, in one statement; False if it had ended already."""

        def work(db: sqlite3.Connection) -> bool:
            done = db.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, finished = ?, request = '' "
                "WHERE id = ? AND status IN (?, ?)",
                (status, result, error, time.time(), job_id, *ACTIVE),
            )
            return done.rowcount == 1

        return await self._call(work)

    async def webhook_sent(self, job_id: str, delivered: bool) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE jobs SET webhook = ? WHERE id = ?", ("delivered" if delivered else "failed", job_id)
            )

        await self._call(work)

    async def counts(self) -> dict[str, int]:
        def work(db: sqlite3.Connection) -> dict[str, int]:
            return dict(db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())

        return await self._call(work)

    async def sweep(self) -> int:
        """Forget jobs finished longer than the TTL ago whose webhook is not still being delivered."""

        return await self._call(self._sweep)

    def _sweep(self, db: sqlite3.Connection) -> int:
        return db.execute(
            "DELETE FROM jobs WHERE finished < ? AND (webhook IS NULL OR webhook != 'pending')",
            (time.time() - self.ttl_s,),
        ).rowcount
