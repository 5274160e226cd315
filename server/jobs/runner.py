"""Running the stored async jobs: each goes to the scheduler like any request, what its worker reports is kept
in memory, and its end is stored with its answer in one statement, then counted and announced by webhook."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine
from functools import partial
from typing import Any

from pipelines.contract.messages import Progress, RenderResult
from server.declarations.errors import APIError, envelope, to_api_error
from server.declarations.job_protocol import ImageJob, JobStatus
from server.declarations.protocol import ImagesResponse
from server.dispatch.pool import WorkerCrashed
from server.dispatch.scheduler import Scheduler
from server.front.metrics import Metrics
from server.front.service import ImageService
from server.jobs.deliveries import JobWebhooks, events_of
from server.jobs.feed import JobFeed
from server.jobs.table import ACTIVE, JobRow, JobTable, TableUnavailable
from server.jobs.views import LiveJob, summary, view

logger = logging.getLogger(__name__)

STATUSES: tuple[JobStatus, ...] = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
# A job that takes its worker (or the whole server) down this many times fails instead of looping forever.
MAX_ATTEMPTS = 3
END_RETRY_S = 1.0  # how often an end the table could not take is tried again


def _error_json(error: APIError) -> str:
    return json.dumps(envelope(error)["error"])


class JobRunner:
    """The running half of the JobService: the jobs in flight, their ends, their counts."""

    scheduler: Scheduler
    images: ImageService
    notifier: JobWebhooks
    metrics: Metrics
    table: JobTable | None
    live: dict[str, LiveJob]
    _background: set[asyncio.Task[Any]]
    _end_failure: str
    boot: str  # tells this process's feed event ids from another's

    @property
    def _stored(self) -> JobTable:
        assert self.table is not None  # every job in flight came through the table
        return self.table

    # Running ------------------------------------------------------------------------------------------

    def _run_live(self, live: LiveJob, row: JobRow) -> None:
        """Admit the job to its queue (no await: it has a place from the moment it is accepted) and run it."""
        live.events, live.deadline = events_of(row.webhook_events), row.deadline
        live.feed = feed = JobFeed(self.boot)
        live.entry = self.scheduler.admit(live.prepared.render, partial(self._progress, live), bounded=False)
        self.live[live.id] = live
        feed.add("status", {"status": "queued", "position": self.scheduler.position(live.id)})
        live.task = asyncio.create_task(self._run(live))

        def done(task: asyncio.Task[None]) -> None:
            self.live.pop(live.id, None)
            if task.cancelled() and live.entry is not None:
                self.scheduler.withdraw(live.entry)  # cancelled before it ever waited in the queue

        live.task.add_done_callback(done)

    async def _run(self, live: LiveJob) -> None:
        try:
            async with asyncio.timeout(
                None if live.deadline is None else max(0, live.deadline - time.time())
            ):
                result = await self._render(live)
            response = await self.images.respond(live.base_url, live.prepared, result)
        except asyncio.CancelledError:
            raise
        except (
            TimeoutError
        ):  # its Cancel-After: the scheduler dropped it from the queue or stopped its worker
            started = live.dispatched
            error = APIError(
                "deadline_exceeded",
                f"The job {'ran' if started else 'waited in the queue'} past its Cancel-After deadline"
                f"{'; it was stopped at its next step' if started else ' and never ran'}.",
            )
            await self._settle(live, "cancelled" if started else "expired", error=error)
            return
        except Exception as exc:
            error = to_api_error(exc)
            if error.code == "server_error":  # not an answer the worker gave: keep the traceback
                logger.error("job %s failed", live.id, exc_info=exc)
            await self._settle(live, "failed", error=error)
            return
        await self._settle(live, "succeeded", response, detail=summary(live.prepared.render, result))

    async def _render(self, live: LiveJob) -> RenderResult:
        """The scheduler's result, running again after a worker crash."""
        while True:
            live.dispatched = False
            assert live.entry is not None
            try:
                return await self.scheduler.wait(
                    live.entry, on_dispatch=partial(self._dispatched, live), deadline=False
                )
            except WorkerCrashed:
                if live.attempts >= MAX_ATTEMPTS:
                    raise
                logger.warning("job %s: its worker crashed; it runs again from the start", live.id)
                render = live.prepared.render
                live.entry = self.scheduler.admit(render, partial(self._progress, live), bounded=False)

    async def _settle(
        self,
        live: LiveJob,
        status: JobStatus,
        result: ImagesResponse | None = None,
        error: APIError | None = None,
        detail: str = "",
    ) -> None:
        """Store the end a render reached. While the table cannot take it (a full disk), GET answers it from
        memory and it is tried again every END_RETRY_S, so a polling client gets its end and the render is
        not lost; a restart before it is stored runs the job again."""
        while True:
            try:
                await self._end(live.id, status, result, error, detail)
                return
            except TableUnavailable as exc:
                self._end_failure = exc.message
                if live.ending is None:
                    logger.error(
                        "job %s %s, but its end cannot be stored yet: %s", live.id, status, exc.message
                    )
                    answer = None if result is None else result.model_dump_json(exclude_none=True)
                    live.ending = (status, answer, None if error is None else _error_json(error), time.time())
            await asyncio.sleep(END_RETRY_S)

    def _dispatched(self, live: LiveJob) -> None:
        live.dispatched = True
        for other in self.live.values():  # it left the queue: those behind it moved up
            if other.feed is not None and (other is live or not other.dispatched):
                position = None if other is live else self.scheduler.position(other.id)
                status = "running" if other is live else "queued"
                other.feed.add("status", {"status": status, "position": position})

        async def mark() -> None:
            try:
                live.attempts = await self._stored.start(live.id) or live.attempts
            except TableUnavailable:  # logged by the table; the attempt goes uncounted
                return
            await self._count()
            if "started" in live.events and live.webhook_url is not None:
                self._spawn(self.notifier.post(live.id, partial(self.notifier.running, live, "started")))

        self._spawn(mark())

    def _progress(self, live: LiveJob, progress: Progress) -> None:
        live.step, live.steps = progress.step, progress.total
        if live.feed is not None:
            live.feed.add("progress", {"step": progress.step, "steps": progress.total})
        if progress.preview is not None:
            live.preview, live.preview_b64 = progress.preview, None
            live.previews += 1
            if live.feed is not None:
                live.feed.add(
                    "preview", {"image": progress.preview, "partial_image_index": live.previews - 1}
                )
            if "preview" in live.events and live.webhook_url is not None:
                self._spawn(self.notifier.post(live.id, partial(self.notifier.running, live, "preview")))

    async def _end(
        self,
        job_id: str,
        status: JobStatus,
        result: ImagesResponse | None = None,
        error: APIError | None = None,
        detail: str = "",
    ) -> bool:
        """Store the job's end with its answer, once; then count it and send its webhook. Raises
        TableUnavailable when the table cannot store it: the row still says queued or running."""
        ended = await self._stored.finish(
            job_id,
            status,
            None if result is None else result.model_dump_json(exclude_none=True),
            None if error is None else _error_json(error),
        )
        if not ended:
            return False
        message = f": {error.code} {error.message}" if error is not None else f" {detail}"
        logger.info("job %s %s%s", job_id, status, message.rstrip())
        await self._count()
        row = await self._stored.get(job_id)
        live = self.live.get(job_id)
        if row is not None and live is not None and live.feed is not None:
            live.feed.add(
                "done", (await self._view_of(row, detail=False)).model_dump(mode="json", exclude_none=True)
            )
        if row is not None and row.webhook == "pending":
            if row.status in events_of(row.webhook_events):
                self._spawn(self.notifier.post(row.id, partial(self.notifier.ending, row)))
            else:
                await self._stored.webhook_sent(row.id, "filtered")
        return True

    # Answers ------------------------------------------------------------------------------------------

    async def _view_of(self, row: JobRow, detail: bool) -> ImageJob:
        return await view(
            row, self.live.get(row.id) if row.status in ACTIVE else None, self.scheduler, detail
        )

    # Housekeeping -------------------------------------------------------------------------------------

    async def _count(self) -> None:
        try:
            counts = {} if self.table is None else await self.table.counts()
        except TableUnavailable:  # logged by the table; the gauges wait for the next count
            return
        for status in STATUSES:
            self.metrics.jobs.labels(status).set(counts.get(status, 0))

    def _spawn(self, work: Coroutine[Any, Any, None] | asyncio.Task[None]) -> None:
        task = work if isinstance(work, asyncio.Task) else asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
