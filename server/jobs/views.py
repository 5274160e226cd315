"""The async jobs this process knows of, as the job routes answer them: who owns one, what the worker has
reported of a running one, and the job object GET returns."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi import Request

from pipelines.contract.messages import RenderedImage, RenderRequest, RenderResult
from server.declarations.errors import APIError
from server.declarations.job_protocol import ImageJob, JobPreview, JobProgress, JobStatus
from server.declarations.protocol import ErrorBody, ImagesResponse
from server.dispatch.scheduler import Scheduler, Ticket
from server.front.service import Prepared
from server.jobs.feed import JobFeed
from server.jobs.table import JobRow, JobTable, TableUnavailable


@dataclass(frozen=True)
class JobsHealth:
    """The job table as /ready reports it: `none` until a job needs it, `ok`, or `unavailable`."""

    state: str
    reason: str | None
    moved_aside: str | None  # where a damaged table found at start-up was put

    @classmethod
    def of(
        cls, table: JobTable | None, open_failure: str | None, live: Iterable[LiveJob], end_failure: str
    ) -> JobsHealth:
        failure = open_failure if table is None else table.failure
        waiting = sum(job.ending is not None for job in live)
        if waiting:  # reads may work meanwhile: the ends the table refused say it cannot write
            failure = f"{waiting} ended jobs wait to be stored: {end_failure}"
        moved = None if table is None or table.moved_aside is None else str(table.moved_aside)
        return cls("unavailable" if failure else "none" if table is None else "ok", failure, moved)


def owner_of(http: Request) -> str:
    """SHA-256 of the caller's API key, set by the auth middleware; '' when the server has no keys."""
    return getattr(http.state, "caller", "")


def not_found() -> APIError:
    # The same answer for a job that never was, has expired, or is another key's: ids reveal nothing.
    return APIError(
        "job_not_found",
        "No such job: it does not exist, has expired, or was submitted with another API key.",
        "id",
    )


@dataclass
class LiveJob:
    """A stored job that this process is running: its request and what the worker has reported so far."""

    id: str
    owner: str
    endpoint: str
    prepared: Prepared
    base_url: str
    webhook_url: str | None
    attempts: int = 0
    events: tuple[str, ...] = ("succeeded", "failed", "cancelled", "expired")  # the webhook events it asks
    deadline: float | None = None  # Cancel-After: expired if not started by then, else stopped at next step
    feed: JobFeed | None = None  # its server-sent events
    dispatched: bool = False
    step: int = 0
    steps: int = 0
    preview: RenderedImage | None = None
    previews: int = 0
    preview_b64: str | None = None
    entry: Ticket | None = None  # its place in the scheduler's queue
    task: asyncio.Task[None] | None = None
    # An end the table could not store yet (a full disk): answered from here until it is stored.
    ending: tuple[JobStatus, str | None, str | None, float] | None = None


async def view(row: JobRow, live: LiveJob | None, scheduler: Scheduler, detail: bool) -> ImageJob:
    """The job as GET answers it: its row, with what this process knows of it while it runs."""
    if live is not None and live.ending is not None:
        status, result, error, finished = live.ending
        row = dataclasses.replace(row, status=status, result=result, error=error, finished=finished)
        live = None
    try:
        job = ImageJob(
            id=row.id,
            status=row.status,
            created=int(row.created),
            model=row.model,
            endpoint=row.endpoint,
            result=None if row.result is None else ImagesResponse.model_validate_json(row.result),
            error=None if row.error is None else ErrorBody.model_validate_json(row.error),
            finished=None if row.finished is None else int(row.finished),
            expires_at=None if row.expires is None else int(row.expires),
            webhooks=None if row.deliveries is None else json.loads(row.deliveries),
        )
    except ValueError as exc:  # a row the disk damaged (pydantic's ValidationError is a ValueError)
        raise TableUnavailable(exc) from exc
    if live is None:
        return job
    job.status = "running" if live.dispatched else "queued"
    job.position = None if live.dispatched else scheduler.position(row.id)
    if live.steps:
        job.progress = JobProgress(step=live.step, steps=live.steps)
    if detail and live.preview is not None:
        if live.preview_b64 is None:  # the worker encoded it: base64 only, once per preview
            live.preview_b64 = base64.b64encode(live.preview.data).decode()
        job.preview = JobPreview(
            b64_json=live.preview_b64,
            partial_image_index=live.previews - 1,
            output_format=live.prepared.reply.output_format,
        )
    return job


def webhook_payload(job: ImageJob, kind: str) -> bytes:
    """The Standard Webhooks payload: type, timestamp and the job as GET answers it."""
    payload = {
        "type": kind,
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "data": job.model_dump(mode="json", exclude_none=True),
    }
    return json.dumps(payload).encode()


def summary(render: RenderRequest, result: RenderResult) -> str:
    """The log line's account of a job that succeeded."""
    timings = result.timings_ms
    return (
        f"model={render.model} size={render.width}x{render.height} steps={render.steps} n={render.n} "
        f"queue_ms={timings.get('queue', 0):.0f} run_ms={timings.get('run', 0):.0f}"
    )
