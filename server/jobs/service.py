"""Async image jobs (`Prefer: respond-async`): submit, poll, list, cancel, webhooks; a restart loses none.

The durable JobTable (server/jobs/table.py) holds every job with its resolved request; this service feeds the
jobs to the scheduler like any request, keeps the live progress of the ones in flight in memory, stores each
answer in the table in the same statement that ends the job, and sends the webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import Request

from pipelines.contract.messages import RenderRequest
from pipelines.contract.specs import ModelSpec, get_spec
from pipelines.contract.wire import from_builtins, to_json
from server.declarations.errors import APIError, to_api_error
from server.declarations.job_protocol import ImageJob, ImageJobDeleted
from server.declarations.protocol import _ImageFields
from server.declarations.settings import Settings
from server.dispatch.scheduler import Scheduler
from server.front.metrics import Metrics
from server.front.normalize import Reply
from server.front.service import ImageService, Prepared, public_base
from server.jobs.deliveries import JobWebhooks
from server.jobs.feed import stream
from server.jobs.headers import (
    cancel_after_s,
    check_job_fields,
    check_replay,
    fingerprint,
    idempotency_key,
    url_images,
)
from server.jobs.runner import MAX_ATTEMPTS, JobRunner
from server.jobs.table import ACTIVE, DATABASE, JobRow, JobTable, NewJob, StoreLocked, TableUnavailable
from server.jobs.views import JobsHealth, LiveJob, not_found, owner_of, view
from server.jobs.webhooks import Webhooks

logger = logging.getLogger(__name__)

SWEEP_EVERY_S = 60.0


@dataclass
class StoredRequest:
    """What the job table keeps of a job to run it again after a restart."""

    render: RenderRequest
    reply: Reply
    base_url: str


def _dump(prepared: Prepared, base_url: str) -> str:
    return to_json(StoredRequest(prepared.render, prepared.reply, base_url))


def _load(stored: str, specs: Mapping[str, ModelSpec]) -> tuple[Prepared, str]:
    data = json.loads(stored)
    if "output_format" not in data["render"]:  # stored before requests named their format: its reply's
        reply = data["reply"]
        data["render"].update(output_format=reply["output_format"], output_compression=reply["compression"])
    row = from_builtins(data, StoredRequest)
    return Prepared(row.render, row.reply, get_spec(row.render.model, specs)), row.base_url


class JobService(JobRunner):
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
        self.notifier = JobWebhooks(
            webhooks, lambda: self._stored, lambda row, live, detail: view(row, live, self.scheduler, detail)
        )
        self.metrics = metrics
        self.live: dict[str, LiveJob] = {}
        self._failure: str | None = None  # why the table could not be opened
        self._end_failure = ""  # why the last end could not be stored
        self.boot = secrets.token_hex(4)
        self._background: set[asyncio.Task[Any]] = set()

    # Life cycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Run again every job a previous process left queued or running, and resend its pending webhooks.
        Raises StoreLocked when another server holds the table; a table that cannot be read leaves the
        jobs unavailable and the rest serving."""
        self._spawn(self._sweep_forever())
        if not (self.folder / DATABASE).exists():
            return
        try:
            self.table = await asyncio.to_thread(JobTable, self.folder, self.settings.job_ttl_s)
            await self._recover(self.table)
        except (OSError, sqlite3.Error, TableUnavailable) as exc:
            self._failure = str(exc)
            logger.error("async jobs unavailable: the job table in %s cannot be used (%s)", self.folder, exc)

    async def _recover(self, table: JobTable) -> None:
        for row, stored in await table.unfinished():
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
            # Accepted before the restart: back in the queue in the order they came, past its bound if need be
            self._run_live(
                LiveJob(row.id, row.owner, row.endpoint, prepared, base_url, row.webhook_url, row.attempts),
                row,
            )
        for row in await table.pending_webhooks():
            self._spawn(self.notifier.post(row.id, partial(self.notifier.ending, row)))
        await self._count()

    def health(self) -> JobsHealth:
        return JobsHealth.of(self.table, self._failure, self.live.values(), self._end_failure)

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
    ) -> tuple[ImageJob, bool]:
        """Store the job and put it in the queue; with the job, whether it is new (False: the job an
        earlier request with the same Idempotency-Key made)."""
        check_job_fields(body, self.settings.job_ttl_s)
        # The URL that was compared with the allow-list is the one stored and sent.
        webhook_url = None if body.webhook_url is None else self.webhooks.check(body.webhook_url)
        owner = owner_of(http)
        key = idempotency_key(http)
        cancel_after = cancel_after_s(http)
        asked = None if key is None else fingerprint(endpoint, body, images)
        if key is not None:
            earlier = await (await self._open()).by_key(owner, key)
            if earlier is not None:
                return await self._replay(earlier, asked), False
        # A synchronous request takes partial_images only with stream=true; a job keeps the latest to poll.
        plain = body.model_copy(update={"partial_images": None})
        base_url = public_base(http, self.settings)
        prepared = await self.images.prepare(plain, images, prompt_required, base_url)
        job_id = "job_" + secrets.token_urlsafe(24)  # 192 random bits
        render = dataclasses.replace(prepared.render, id=job_id, partial_images=body.partial_images or 0)
        prepared = Prepared(render, prepared.reply, prepared.spec)
        new = NewJob(
            job_id,
            owner,
            endpoint,
            render.model,
            _dump(prepared, base_url),
            webhook_url,
            body.job_ttl_s,
            key,
            asked,
            None if body.webhook_events is None else json.dumps(body.webhook_events),
            None if cancel_after is None else time.time() + cancel_after,
        )
        table = await self._open()
        # Admission: a place in the queue is taken before the row is stored, and filled with no await after,
        # so concurrent submits cannot all pass the check and overfill the queue.
        self.scheduler.reserve(render.model)
        try:
            row = await table.insert(new, self.settings.max_jobs)
        finally:
            self.scheduler.unreserve(render.model)
        if row is None:
            room = await table.room_in_s()
            raise APIError(
                "rate_limit_exceeded",
                f"The server holds its limit of {self.settings.max_jobs} jobs; retry as old ones expire.",
                retry_after_s=self.scheduler.retry_after_s() if room is None else room,
            )
        if row.id != job_id:  # the same key came in meanwhile: its job, never a second one
            return await self._replay(row, asked), False
        self._run_live(LiveJob(job_id, owner, endpoint, prepared, base_url, body.webhook_url), row)
        await self._count()
        http.state.job = f"job={job_id} model={render.model} size={render.width}x{render.height} n={render.n}"
        return await self._view_of(row, detail=True), True

    async def _replay(self, row: JobRow, asked: str | None) -> ImageJob:
        check_replay(row.fingerprint, asked)
        return await self._view_of(row, detail=True)

    async def wait(self, job_id: str, owner: str, seconds: float) -> ImageJob:
        """The job once it has ended, or as it is after `seconds`; the job runs on either way."""
        live = self.live.get(job_id)
        if live is not None and live.task is not None:
            await asyncio.wait({live.task}, timeout=seconds)
        return await self.get(job_id, owner)

    async def feed(self, job_id: str, owner: str, last_event_id: str | None) -> AsyncIterator[bytes]:
        """The job's server-sent events (a 404 first if it is not the caller's)."""
        await self.get(job_id, owner)
        live = self.live.get(job_id)
        reply = None if live is None else live.prepared.reply

        async def final() -> dict:
            return (await self.get(job_id, owner)).model_dump(mode="json", exclude_none=True)

        output_format = "png" if reply is None else reply.output_format
        feed = None if live is None else live.feed
        return stream(feed, last_event_id, output_format, lambda: job_id in self.live, final)

    async def get(self, job_id: str, owner: str) -> ImageJob:
        row = None if self.table is None else await self.table.get(job_id, owner)
        if row is None:
            raise not_found()
        return await self._view_of(row, detail=True)

    async def recent(self, owner: str, limit: int) -> list[ImageJob]:
        rows = [] if self.table is None else await self.table.recent(owner, limit)
        return [await self._view_of(row, detail=False) for row in rows]

    async def cancel_or_delete(self, job_id: str, owner: str) -> ImageJob | ImageJobDeleted:
        """A queued job leaves the queue and never runs; a running one stops at its next step. An ended
        job is deleted with its url images."""
        row = None if self.table is None else await self.table.get(job_id, owner)
        if row is None:
            raise not_found()
        live = self.live.get(job_id)
        if live is not None and live.ending is not None:
            raise APIError(
                "jobs_unavailable", "The job has ended but its end is not stored yet; retry later."
            )
        if row.status not in ACTIVE:
            return await self._delete(job_id, owner)
        if not await self._end(job_id, "cancelled"):
            ended = await self._stored.get(job_id, owner)
            raise APIError(
                "job_finished",
                f"The job is already {'gone' if ended is None else ended.status}: nothing to cancel.",
                "id",
            )
        if live is not None and live.task is not None:
            live.task.cancel()  # the scheduler drops it from its queue or tells its worker to stop
        return await self.get(job_id, owner)

    async def _delete(self, job_id: str, owner: str) -> ImageJobDeleted:
        row = await self._stored.delete(job_id, owner)
        if row is None:
            raise not_found()
        for image_id in url_images(row.result):
            await asyncio.to_thread(self.images.store.remove, image_id)
        logger.info("job %s deleted", job_id)
        await self._count()
        return ImageJobDeleted(id=job_id)

    async def _open(self) -> JobTable:
        async with self._opening:
            if self.table is None:
                try:
                    self.table = await asyncio.to_thread(JobTable, self.folder, self.settings.job_ttl_s)
                except (OSError, sqlite3.Error, StoreLocked) as exc:
                    self._failure = str(exc)
                    raise APIError(
                        "jobs_unavailable", f"The job table in {self.folder} cannot be opened ({exc})."
                    ) from exc
            return self.table

    async def _sweep_forever(self) -> None:
        while True:
            with contextlib.suppress(TableUnavailable):  # logged by the table
                if self.table is not None and await self.table.sweep():
                    await self._count()
            await asyncio.sleep(SWEEP_EVERY_S)
