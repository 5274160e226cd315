"""A job's webhooks: the events it asked for (`webhook_events`, the endings by default) POSTed one at a time
in the order they happened, each delivery's tries recorded on the job for GET to show."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from server.declarations.job_protocol import ImageJob, JobWebhook
from server.declarations.protocol import WebhookEvent
from server.jobs.table import ACTIVE, JobRow, JobTable, TableUnavailable
from server.jobs.views import LiveJob, webhook_payload
from server.jobs.webhooks import Webhooks

ENDINGS: tuple[WebhookEvent, ...] = ("succeeded", "failed", "cancelled", "expired")


def events_of(stored: str | None) -> tuple[str, ...]:
    """The events a job's row asked for."""
    return ENDINGS if stored is None else tuple(json.loads(stored))


class JobWebhooks:
    """Sends each job's events in the order they were posted: one waits for the job's earlier ones to be
    delivered or given up, retries included."""

    def __init__(
        self,
        webhooks: Webhooks,
        table: Callable[[], JobTable],
        view: Callable[[JobRow, LiveJob | None, bool], Awaitable[ImageJob]],
    ) -> None:
        self.webhooks = webhooks
        self._table = table
        self._view = view  # the job as GET answers it, from its row and, while it runs, what it reported
        self._last: dict[str, asyncio.Task[None]] = {}
        self._deliveries: dict[str, list[JobWebhook]] = {}

    def post(self, job_id: str, send: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        """Run `send` once the job's earlier posts are done; the order is taken here, with no await."""
        before = self._last.get(job_id)

        async def in_turn() -> None:
            if before is not None:
                await asyncio.wait({before})
            await send()

        task = asyncio.create_task(in_turn())
        self._last[job_id] = task

        def done(_: asyncio.Task[None]) -> None:
            if self._last.get(job_id) is task:  # the job's last one: its order and records leave memory
                del self._last[job_id]
                self._deliveries.pop(job_id, None)

        task.add_done_callback(done)
        return task

    async def ending(self, row: JobRow) -> None:
        """The job's end, its webhook-id the job's id; the row notes if it went (a restart resends it)."""
        assert row.webhook_url is not None
        job = await self._view(row, None, False)
        delivered = await self.send(job, row.webhook_url, row.deliveries, row.status, row.id)
        with contextlib.suppress(TableUnavailable):  # logged by the table; a restart sends it again
            await self._table().webhook_sent(row.id, "delivered" if delivered else "failed")

    async def running(self, live: LiveJob, event: str) -> None:
        """A running job's started or preview event, the job as GET answered it then: a fast job may have
        ended before its earlier events' turn came, and they are sent all the same, in order, before its
        ending."""
        assert live.webhook_url is not None
        with contextlib.suppress(TableUnavailable):  # logged by the table; an event lost, not the job
            row = await self._table().get(live.id)
            if row is not None:
                if row.status not in ACTIVE:
                    row = dataclasses.replace(
                        row, status="running", result=None, error=None, finished=None, expires=None
                    )
                job = await self._view(row, live, event == "preview")
                index = live.previews - 1 if event == "preview" else ""
                await self.send(job, live.webhook_url, row.deliveries, event, f"{live.id}.{event}{index}")

    async def send(self, job: ImageJob, url: str, recorded: str | None, event: str, message_id: str) -> bool:
        """POST one event, `recorded` being the deliveries the job's row holds; True once a 2xx answered."""
        deliveries = self._deliveries.setdefault(
            job.id, [JobWebhook.model_validate(item) for item in json.loads(recorded or "[]")]
        )
        delivery = JobWebhook(type=f"image.job.{event}", state="pending", tries=0)
        deliveries.append(delivery)

        async def tried(tries: int, status: int | None, next_at: float | None) -> None:
            delivery.tries, delivery.last_status = tries, status
            delivery.next_try_at = None if next_at is None else int(next_at)
            ok = status is not None and 200 <= status < 300
            delivery.state = "delivered" if ok else "pending" if next_at is not None else "failed"
            body = json.dumps([item.model_dump(mode="json") for item in deliveries])
            with contextlib.suppress(TableUnavailable):  # logged by the table; the delivery goes on
                await self._table().record_deliveries(job.id, body)

        return await self.webhooks.deliver(message_id, url, webhook_payload(job, delivery.type), tried)
