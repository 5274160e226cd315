"""Async image jobs (`Prefer: respond-async`): submit, poll, list, cancel, webhooks; a restart loses none.

The durable JobTable (server/jobs.py) holds every job with its resolved request; this service feeds the jobs
to the scheduler like any request, keeps the live progress of the ones in flight in memory, stores each answer
in the table in the same statement that ends the job, and sends the webhooks.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import secrets
import sqlite3
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import Request

from pipelines.errors import InvalidParameter
from pipelines.loras import LoraChoice
from pipelines.messages import Progress, RenderedImage, RenderRequest, RenderResult
from pipelines.specs import ModelSpec, get_spec
from server.config import Settings
from server.encode import encode
from server.errors import APIError, envelope, to_api_error
from server.jobs import ACTIVE, DATABASE, JobRow, JobTable, NewJob, StoreLocked
from server.metrics import Metrics
from server.normalize import Reply
from server.protocol import (
    ErrorBody,
    ImageJob,
    ImagesResponse,
    JobPreview,
    JobProgress,
    JobStatus,
    _ImageFields,
)
from server.scheduler import Scheduler
from server.service import ImageService, Prepared, public_base
from server.webhooks import Webhooks
from server.workers import WorkerCrashed

logger = logging.getLogger(__name__)

STATUSES: tuple[JobStatus, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
# A job that takes its worker (or the whole server) down this many times fails instead of looping forever.
MAX_ATTEMPTS = 3
SWEEP_EVERY_S = 60.0
ROOM_POLL_S = 1.0


def wants_async(http: Request) -> bool:
    """RFC 7240: `respond-async` among the preferences of any Prefer header, case-insensitive."""
    return any(
        preference.split(";")[0].split("=")[0].strip().lower() == "respond-async"
        for header in http.headers.getlist("prefer")
        for preference in header.split(",")
    )


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


def _dump(prepared: Prepared, base_url: str) -> str:
    render = dataclasses.asdict(prepared.render)
    render["images"] = [base64.b64encode(image).decode() for image in prepared.render.images]
    if prepared.render.mask is not None:
        render["mask"] = base64.b64encode(prepared.render.mask).decode()
    return json.dumps({"render": render, "reply": dataclasses.asdict(prepared.reply), "base_url": base_url})


def _load(stored: str, specs: Mapping[str, ModelSpec]) -> tuple[Prepared, str]:
    data = json.loads(stored)
    render = RenderRequest(
        **{
            **data["render"],
            "images": [base64.b64decode(i) for i in data["render"]["images"]],
            "loras": [LoraChoice(**lora) for lora in data["render"].get("loras", [])],
            "mask": base64.b64decode(data["render"]["mask"]) if data["render"].get("mask") else None,
        }
    )
    return Prepared(render, Reply(**data["reply"]), get_spec(render.model, specs)), data["base_url"]


def _error_json(error: APIError) -> str:
    return json.dumps(envelope(error)["error"])


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
    dispatched: bool = False
    step: int = 0
    steps: int = 0
    preview: RenderedImage | None = None
    previews: int = 0
    preview_b64: str | None = None
    task: asyncio.Task[None] | None = None


class JobService:
    """What the job routes call; one per app, on app.state.jobs."""

    def __init__(
        self,
        settings: Settings,
        specs: Mapping[str, ModelSpec],
        folder: Path,
        scheduler: Scheduler,
        images: ImageService,
        webhooks: Webhooks,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.specs = specs
        self.folder = folder
        # Opened at start-up when an earlier run left jobs, else by the first job: a store that never sees
        # one holds no database (its folder may be read-only or nearly full; the url store copes with both).
        self.table: JobTable | None = None
        self._opening = asyncio.Lock()
        self.scheduler = scheduler
        self.images = images
        self.webhooks = webhooks
        self.metrics = metrics
        self.live: dict[str, LiveJob] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # Life cycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Run again every job a previous process left queued or running, and resend its pending webhooks.
        Raises StoreLocked when another server holds the table."""
        self._spawn(self._sweep_forever())
        if not (self.folder / DATABASE).exists():
            return
        try:
            self.table = await asyncio.to_thread(JobTable, self.folder, self.settings.job_ttl_s)
        except (OSError, sqlite3.Error) as exc:
            logger.error(
                "async jobs unavailable: the job table in %s cannot be opened (%s)", self.folder, exc
            )
            return
        for row, stored in await self.table.unfinished():
            if row.attempts >= MAX_ATTEMPTS:
                error = APIError(
                    "job_crashed",
                    f"The job stopped the server or its worker {row.attempts} times; it is not run again.",
                )
                await self._end(row.id, "failed", error=error)
                continue
            try:
                prepared, base_url = _load(stored, self.specs)
            except Exception as exc:  # a model no longer served, or a row an older fluxd wrote
                logger.exception("job %s cannot run again after the restart", row.id)
                await self._end(row.id, "failed", error=to_api_error(exc))
                continue
            logger.info(
                "job %s recovered after a restart: was %s; it runs again from the start with seeds %s",
                row.id,
                row.status,
                prepared.render.seeds,
            )
            live = LiveJob(row.id, row.owner, row.endpoint, prepared, base_url, row.webhook_url, row.attempts)
            self._run_live(live)
        for row in await self.table.pending_webhooks():
            self._spawn(self._notify(row))
        await self._count()

    async def stop(self) -> None:
        """Stop waiting on the jobs without ending them: the table keeps them for the next start."""
        tasks = [live.task for live in self.live.values() if live.task is not None] + list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        if self.table is not None:
            self.table.close()

    # Routes -------------------------------------------------------------------------------------------

    async def submit(
        self,
        http: Request,
        body: _ImageFields,
        endpoint: str,
        images: list[bytes] | None = None,
        prompt_required: bool = True,
    ) -> ImageJob:
        if body.stream:
            raise InvalidParameter(
                "stream", "stream=true and Prefer: respond-async ask for two different answers: choose one."
            )
        # The URL that was compared with the allow-list is the one stored and sent.
        webhook_url = None if body.webhook_url is None else self.webhooks.check(body.webhook_url)
        # A synchronous request takes partial_images only with stream=true; a job keeps the latest to poll.
        plain = body.model_copy(update={"partial_images": None})
        prepared = await self.images.prepare(plain, images, prompt_required)
        self.scheduler.check_room(prepared.render.model)
        job_id = "job_" + secrets.token_urlsafe(24)  # 192 random bits
        render = dataclasses.replace(prepared.render, id=job_id, partial_images=body.partial_images or 0)
        prepared = Prepared(render, prepared.reply, prepared.spec)
        base_url = public_base(http, self.settings)
        owner = owner_of(http)
        new = NewJob(job_id, owner, endpoint, render.model, _dump(prepared, base_url), webhook_url)
        table = await self._open()
        try:
            stored = await table.insert(new, self.settings.max_jobs)
        except sqlite3.Error as exc:  # a full or read-only disk: the request is refused, not lost
            raise APIError("jobs_unavailable", f"The job table cannot store the job ({exc}).") from exc
        if not stored:
            room = await table.room_in_s()
            raise APIError(
                "rate_limit_exceeded",
                f"The server holds its limit of {self.settings.max_jobs} jobs; retry as old ones expire.",
                retry_after_s=self.scheduler.retry_after_s() if room is None else room,
            )
        self._run_live(LiveJob(job_id, owner, endpoint, prepared, base_url, body.webhook_url))
        await self._count()
        http.state.job = f"job={job_id} model={render.model} size={render.width}x{render.height} n={render.n}"
        return await self.get(job_id, owner)

    async def get(self, job_id: str, owner: str) -> ImageJob:
        row = None if self.table is None else await self.table.get(job_id, owner)
        if row is None:
            raise not_found()
        return await self._view(row, detail=True)

    async def recent(self, owner: str, limit: int) -> list[ImageJob]:
        rows = [] if self.table is None else await self.table.recent(owner, limit)
        return [await self._view(row, detail=False) for row in rows]

    async def cancel(self, job_id: str, owner: str) -> ImageJob:
        """A queued job leaves the queue and never runs; a running one stops at its next step."""
        row = None if self.table is None else await self.table.get(job_id, owner)
        if row is None:
            raise not_found()
        live = self.live.get(job_id)
        if row.status not in ACTIVE or not await self._end(job_id, "cancelled"):
            ended = await self._stored.get(job_id, owner)
            raise APIError(
                "job_finished",
                f"The job is already {'gone' if ended is None else ended.status}: nothing to cancel.",
                "id",
            )
        if live is not None and live.task is not None:
            live.task.cancel()  # the scheduler drops it from its queue or tells its worker to stop
        return await self.get(job_id, owner)

    async def _open(self) -> JobTable:
        async with self._opening:
            if self.table is None:
                try:
                    self.table = await asyncio.to_thread(JobTable, self.folder, self.settings.job_ttl_s)
                except (OSError, sqlite3.Error, StoreLocked) as exc:
                    raise APIError(
                        "jobs_unavailable", f"The job table in {self.folder} cannot be opened ({exc})."
                    ) from exc
            return self.table

    @property
    def _stored(self) -> JobTable:
        assert self.table is not None  # every job in flight came through the table
        return self.table

    # Running ------------------------------------------------------------------------------------------

    def _run_live(self, live: LiveJob) -> None:
        self.live[live.id] = live
        live.task = asyncio.create_task(self._run(live))
        live.task.add_done_callback(lambda _: self.live.pop(live.id, None))

    async def _run(self, live: LiveJob) -> None:
        try:
            result = await self._render(live)
            response = await self.images.respond(live.base_url, live.prepared, result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = to_api_error(exc)
            if error.code == "server_error":  # not an answer the worker gave: keep the traceback
                logger.error("job %s failed", live.id, exc_info=exc)
            await self._end(live.id, "failed", error=error)
            return
        await self._end(
            live.id, "succeeded", result=response, detail=self._summary(live.prepared.render, result)
        )

    async def _render(self, live: LiveJob) -> RenderResult:
        """The scheduler's result, waiting for room in a full queue and running again after a worker crash."""
        while True:
            live.dispatched = False
            try:
                return await self.scheduler.run(
                    live.prepared.render,
                    partial(self._progress, live),
                    on_dispatch=partial(self._dispatched, live),
                    deadline=False,
                )
            except APIError as exc:
                if exc.code != "rate_limit_exceeded":
                    raise
                # Only jobs recovered at start-up meet a full queue (a new one was refused with this 429).
                await asyncio.sleep(ROOM_POLL_S)
            except WorkerCrashed:
                if live.attempts >= MAX_ATTEMPTS:
                    raise
                logger.warning("job %s: its worker crashed; it runs again from the start", live.id)

    def _dispatched(self, live: LiveJob) -> None:
        live.dispatched = True

        async def mark() -> None:
            live.attempts = await self._stored.start(live.id) or live.attempts
            await self._count()

        self._spawn(mark())

    def _progress(self, live: LiveJob, progress: Progress) -> None:
        live.step, live.steps = progress.step, progress.total
        if progress.preview is not None:
            live.preview, live.preview_b64 = progress.preview, None
            live.previews += 1

    @staticmethod
    def _summary(render: RenderRequest, result: RenderResult) -> str:
        timings = result.timings_ms
        return (
            f"model={render.model} size={render.width}x{render.height} steps={render.steps} n={render.n} "
            f"queue_ms={timings.get('queue', 0):.0f} run_ms={timings.get('run', 0):.0f}"
        )

    async def _end(
        self,
        job_id: str,
        status: JobStatus,
        result: ImagesResponse | None = None,
        error: APIError | None = None,
        detail: str = "",
    ) -> bool:
        """Store the job's end with its answer, once; then count it and send its webhook."""
        try:
            ended = await self._stored.finish(
                job_id,
                status,
                None if result is None else result.model_dump_json(exclude_none=True),
                None if error is None else _error_json(error),
            )
        except sqlite3.Error:  # a full disk: the row still says queued or running, so a restart runs it
            logger.exception("job %s could not be stored as %s", job_id, status)
            return False
        if not ended:
            return False
        message = f": {error.code} {error.message}" if error is not None else f" {detail}"
        logger.info("job %s %s%s", job_id, status, message.rstrip())
        await self._count()
        row = await self._stored.get(job_id)
        if row is not None and row.webhook == "pending":
            self._spawn(self._notify(row))
        return True

    # Answers ------------------------------------------------------------------------------------------

    async def _view(self, row: JobRow, detail: bool) -> ImageJob:
        job = ImageJob(
            id=row.id,
            status=row.status,
            created=int(row.created),
            model=row.model,
            endpoint=row.endpoint,
            result=None if row.result is None else ImagesResponse.model_validate_json(row.result),
            error=None if row.error is None else ErrorBody.model_validate_json(row.error),
            finished=None if row.finished is None else int(row.finished),
            expires=None if row.finished is None else int(row.finished + self.settings.job_ttl_s),
        )
        live = self.live.get(row.id) if row.status in ACTIVE else None
        if live is None:
            return job
        job.status = "running" if live.dispatched else "queued"
        job.position = None if live.dispatched else self.scheduler.position(row.id)
        if live.steps:
            job.progress = JobProgress(step=live.step, steps=live.steps)
        if detail and live.preview is not None:
            if live.preview_b64 is None:
                blob = await asyncio.to_thread(
                    encode, live.preview, live.prepared.reply.output_format, live.prepared.reply.compression
                )
                live.preview_b64 = base64.b64encode(blob).decode()
            job.preview = JobPreview(
                b64_json=live.preview_b64,
                partial_image_index=live.previews - 1,
                output_format=live.prepared.reply.output_format,
            )
        return job

    async def _notify(self, row: JobRow) -> None:
        """The Standard Webhooks payload: type, timestamp and the job as GET answers it."""
        assert row.webhook_url is not None
        job = await self._view(row, detail=False)
        payload = {
            "type": f"image.job.{row.status}",
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "data": job.model_dump(mode="json", exclude_none=True),
        }
        delivered = await self.webhooks.deliver(row.id, row.webhook_url, json.dumps(payload).encode())
        await self._stored.webhook_sent(row.id, delivered)

    # Housekeeping -------------------------------------------------------------------------------------

    async def _count(self) -> None:
        counts = {} if self.table is None else await self.table.counts()
        for status in STATUSES:
            self.metrics.jobs.labels(status).set(counts.get(status, 0))

    async def _sweep_forever(self) -> None:
        while True:
            try:
                if self.table is not None and await self.table.sweep():
                    await self._count()
            except sqlite3.Error:
                logger.exception("sweeping the job table failed")
            await asyncio.sleep(SWEEP_EVERY_S)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
