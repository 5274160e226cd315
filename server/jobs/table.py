"""The durable table of async image jobs: SQLite from the standard library, WAL mode, in the store folder.

It sits beside the scheduler, not inside it: a row holds what the job needs to run again (its resolved
request, seeds included) and, once it ends, its answer. Every method runs its SQL in a thread, off the event
loop, one at a time. A job leaves queued/running in a single conditional UPDATE, so it ends exactly once:
of a success and a cancel that race, the first to commit wins and the other changes nothing.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TypeVar, cast

from server.declarations.errors import APIError
from server.declarations.job_protocol import JobStatus

logger = logging.getLogger(__name__)

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
# Columns later versions added; a table an older fluxd wrote gets them on opening.
_ADDED = {
    "retention": "REAL",  # seconds it stays once ended; NULL: the server's --job-ttl-s
    "expires": "REAL",  # when an ended job goes, set with its end
    "idempotency_key": "TEXT",  # the client's Idempotency-Key, unique per owner
    "fingerprint": "TEXT",  # SHA-256 of the request the key was first sent with
    "webhook_events": "TEXT",  # JSON list of the events to send; NULL: the endings
    "deliveries": "TEXT",  # JSON list of the webhook deliveries so far, as GET shows them
    "deadline": "REAL",  # Cancel-After: when it expires if not started, or stops if running
}
_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_key ON jobs (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
UPDATE jobs SET expires = finished + {ttl} WHERE finished IS NOT NULL AND expires IS NULL;
"""
_ROW = (
    "id, owner, status, endpoint, model, created, finished, attempts, webhook_url, webhook, result, error, "
    "expires, fingerprint, webhook_events, deliveries, deadline"
)
_BRIEF = _ROW.replace("result, error", "NULL, error")  # listings leave out the (large) results
_LIVE = "(expires IS NULL OR expires > ?)"


class TableUnavailable(APIError):
    """The job table failed to read or write (a full disk, a damaged file): a 503 for the job routes only."""

    def __init__(self, exc: Exception) -> None:
        super().__init__("jobs_unavailable", f"The job table cannot be used right now ({exc}); retry later.")


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
    expires: float | None
    fingerprint: str | None
    webhook_events: str | None
    deliveries: str | None
    deadline: float | None


@dataclass(frozen=True)
class NewJob:
    id: str
    owner: str
    endpoint: str
    model: str
    request: str
    webhook_url: str | None
    retention: float | None = None
    idempotency_key: str | None = None
    fingerprint: str | None = None
    webhook_events: str | None = None
    deadline: float | None = None


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
        self.path = folder / DATABASE
        self.moved_aside: Path | None = None
        self.failure: str | None = None  # why the last statement failed, until one succeeds
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            # A damaged file costs its jobs, never the server: kept aside to look at, a fresh one starts.
            self.moved_aside = self.path.with_name(f"{DATABASE}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
            for suffix in ("-wal", "-shm", ""):
                damaged = self.path.with_name(DATABASE + suffix)
                if damaged.exists():
                    damaged.rename(self.moved_aside.with_name(self.moved_aside.name + suffix))
            logger.error(
                "the job table %s is damaged (%s): moved aside to %s; a fresh one starts, its jobs are lost",
                self.path,
                exc,
                self.moved_aside,
            )
            self._db = self._connect()
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        """Open the table and check it page by page; a DatabaseError when the file is damaged."""
        # Autocommit: each statement is its own transaction; every write that must be atomic is one statement.
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            # WAL + NORMAL: a commit survives the process being killed (only a power cut can undo the last).
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems))
            db.executescript(_SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in _ADDED.items():
                if column not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
            db.executescript(_INDEXES.format(ttl=float(self.ttl_s)))
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._holder.close()

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                try:
                    done = work(self._db)
                except sqlite3.Error as exc:
                    if self.failure is None:
                        logger.error("the job table %s fails: %s", self.path, exc)
                    self.failure = str(exc)
                    raise TableUnavailable(exc) from exc
                if self.failure is not None:
                    logger.info("the job table %s works again", self.path)
                    self.failure = None
                return done

        return await asyncio.to_thread(locked)

    async def insert(self, job: NewJob, limit: int) -> JobRow | None:
        """Store a queued job unless `limit` jobs are stored already (expired ones are swept first), and
        return it; None when the table is full. A job whose idempotency key this owner has used already is
        not stored: the answer is the job stored with it (its fingerprint says whether it was asked with the
        same request)."""

        def work(db: sqlite3.Connection) -> JobRow | None:
            self._sweep(db)
            # One statement: the count, the key's uniqueness and the insert cannot be split by another insert.
            db.execute(
                "INSERT OR IGNORE INTO jobs (id, owner, status, endpoint, model, created, request, "
                "webhook_url, webhook, retention, idempotency_key, fingerprint, webhook_events, deadline) "
                "SELECT ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? "
                "WHERE (SELECT count(*) FROM jobs) < ?",
                (
                    job.id,
                    job.owner,
                    job.endpoint,
                    job.model,
                    time.time(),
                    job.request,
                    job.webhook_url,
                    "pending" if job.webhook_url else None,
                    job.retention,
                    job.idempotency_key,
                    job.fingerprint,
                    job.webhook_events,
                    job.deadline,
                    limit,
                ),
            )
            row = db.execute(
                f"SELECT {_ROW} FROM jobs WHERE id = ? OR (owner = ? AND idempotency_key = ?)",
                (job.id, job.owner, job.idempotency_key),
            ).fetchone()
            return None if row is None else JobRow(*row)

        return await self._call(work)

    async def stored(self, job_id: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            return db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None

        return await self._call(work)

    async def by_key(self, owner: str, key: str) -> JobRow | None:
        """The job this owner submitted with this idempotency key, while it is stored."""

        def work(db: sqlite3.Connection) -> JobRow | None:
            row = db.execute(
                f"SELECT {_ROW} FROM jobs WHERE owner = ? AND idempotency_key = ? AND {_LIVE}",
                (owner, key, time.time()),
            ).fetchone()
            return None if row is None else JobRow(*row)

        return await self._call(work)

    async def room_in_s(self) -> float | None:
        """Seconds until the first finished job expires, freeing a place; None if every stored job is live."""

        def work(db: sqlite3.Connection) -> float | None:
            (first,) = db.execute("SELECT min(expires) FROM jobs WHERE expires IS NOT NULL").fetchone()
            return None if first is None else max(0.0, first - time.time())

        return await self._call(work)

    async def get(self, job_id: str, owner: str | None = None) -> JobRow | None:
        """The job if it has not expired and, unless `owner` is None, belongs to `owner`."""

        def work(db: sqlite3.Connection) -> JobRow | None:
            row = db.execute(
                f"SELECT {_ROW} FROM jobs WHERE id = ? AND {_LIVE}", (job_id, time.time())
            ).fetchone()
            return None if row is None or owner not in (None, row[1]) else JobRow(*row)

        return await self._call(work)

    async def recent(self, owner: str, limit: int) -> list[JobRow]:
        def work(db: sqlite3.Connection) -> list[JobRow]:
            rows = db.execute(
                f"SELECT {_BRIEF} FROM jobs WHERE owner = ? AND {_LIVE} ORDER BY created DESC LIMIT ?",
                (owner, time.time(), limit),
            )
            return [JobRow(*row) for row in rows]

        return await self._call(work)

    async def delete(self, job_id: str, owner: str) -> JobRow | None:
        """Remove an ended job of this owner, returning it (its result names its url files); None if there
        is no such ended job. One statement, so a job cannot end and be deleted half-way."""

        def work(db: sqlite3.Connection) -> JobRow | None:
            row = db.execute(
                f"DELETE FROM jobs WHERE id = ? AND owner = ? AND status NOT IN (?, ?) AND {_LIVE} "
                f"RETURNING {_ROW}",
                (job_id, owner, *ACTIVE, time.time()),
            ).fetchone()
            return None if row is None else JobRow(*row)

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
            now = time.time()
            done = db.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, finished = ?, request = '', "
                "expires = ? + coalesce(retention, ?) WHERE id = ? AND status IN (?, ?)",
                (status, result, error, now, now, self.ttl_s, job_id, *ACTIVE),
            )
            return done.rowcount == 1

        return await self._call(work)

    async def webhook_sent(self, job_id: str, state: str) -> None:
        """The end's webhook: delivered, failed, or filtered (the job did not ask for its event)."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("UPDATE jobs SET webhook = ? WHERE id = ?", (state, job_id))

        await self._call(work)

    async def record_deliveries(self, job_id: str, deliveries: str) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("UPDATE jobs SET deliveries = ? WHERE id = ?", (deliveries, job_id))

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
            "DELETE FROM jobs WHERE expires < ? AND (webhook IS NULL OR webhook != 'pending')",
            (time.time(),),
        ).rowcount
