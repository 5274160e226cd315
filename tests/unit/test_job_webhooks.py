"""JobWebhooks on its own: a job's events go out one at a time in the order they happened, and a fast job's
`started` and `preview` events are still sent, before its ending, showing the job as it was then."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from server.declarations.job_protocol import ImageJob
from server.jobs.deliveries import JobWebhooks
from server.jobs.table import JobRow
from server.jobs.views import LiveJob

URL = "https://hooks.example/fluxd"


class Sent:
    """A Webhooks stand-in: each POST is recorded, answered 204 after `delay_s` (a slow receiver)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.posts: list[tuple[str, dict]] = []
        self.delay_s = delay_s

    async def deliver(self, message_id: str, url: str, body: bytes, on_try=None) -> bool:
        await asyncio.sleep(self.delay_s)
        self.posts.append((message_id, json.loads(body)))
        if on_try is not None:
            await on_try(1, 204, None)
        return True


class Table:
    def __init__(self, row: JobRow) -> None:
        self.row = row
        self.recorded: list[tuple[str, str]] = []

    async def get(self, job_id: str) -> JobRow | None:
        return self.row if job_id == self.row.id else None

    async def record_deliveries(self, job_id: str, body: str) -> None:
        self.recorded.append((job_id, body))

    async def webhook_sent(self, job_id: str, state: str) -> None:
        self.recorded.append((job_id, state))


async def view(row: JobRow, live: LiveJob | None, detail: bool) -> ImageJob:
    return ImageJob(
        id=row.id,
        status=row.status,
        created=int(row.created),
        model=row.model,
        endpoint=row.endpoint,
        finished=None if row.finished is None else int(row.finished),
    )


def row(status: str) -> JobRow:
    return JobRow(
        id="job_1",
        owner="",
        status=status,  # type: ignore[arg-type]
        endpoint="/v1/images/generations",
        model="flux.2-dev",
        created=1_700_000_000.0,
        finished=None if status == "running" else 1_700_000_010.0,
        attempts=1,
        webhook_url=URL,
        webhook=None,
        result=None,
        error=None,
        expires=None if status == "running" else 1_700_003_600.0,
        fingerprint=None,
        webhook_events=json.dumps(["started", "preview", "succeeded"]),
        deliveries=None,
        deadline=None,
    )


def live(previews: int) -> LiveJob:
    # The prepared request is not read by the deliveries: the view above stands in for GET's.
    return LiveJob(
        id="job_1",
        owner="",
        endpoint="/v1/images/generations",
        prepared=None,  # type: ignore[arg-type]
        base_url="http://127.0.0.1",
        webhook_url=URL,
        previews=previews,
    )


def test_events_of_a_job_that_ended_before_their_turn_go_first_as_running() -> None:
    async def scenario() -> tuple[Sent, Table]:
        sent, table = Sent(delay_s=0.01), Table(row("succeeded"))  # the job has already ended
        notifier = JobWebhooks(sent, lambda: table, view)  # type: ignore[arg-type]
        notifier.post("job_1", lambda: notifier.running(live(0), "started"))
        notifier.post("job_1", lambda: notifier.running(live(1), "preview"))
        last = notifier.post("job_1", lambda: notifier.ending(table.row))
        await last
        return sent, table

    sent, table = asyncio.run(scenario())
    assert [message_id for message_id, _ in sent.posts] == ["job_1.started", "job_1.preview0", "job_1"]
    assert [post["type"] for _, post in sent.posts] == [
        "image.job.started",
        "image.job.preview",
        "image.job.succeeded",
    ]
    # The earlier events show the job as it was when they happened: running, not yet finished.
    assert [post["data"]["status"] for _, post in sent.posts] == ["running", "running", "succeeded"]
    assert "finished" not in sent.posts[0][1]["data"] and sent.posts[2][1]["data"]["finished"]
    # Every delivery is recorded on the job, the ending last.
    [*_, (job_id, state)] = table.recorded
    assert (job_id, state) == ("job_1", "delivered")
    shown = json.loads(table.recorded[-2][1])
    assert [delivery["type"] for delivery in shown] == [post["type"] for _, post in sent.posts]
    assert {delivery["state"] for delivery in shown} == {"delivered"}


def test_a_slow_receiver_never_reorders_a_jobs_events() -> None:
    async def scenario() -> list[str]:
        order: list[str] = []

        class Slow(Sent):
            async def deliver(self, message_id: str, url: str, body: bytes, on_try=None) -> bool:
                # The first event is the slowest to be answered: the later ones wait for it.
                await asyncio.sleep(0.05 if message_id.endswith("started") else 0.0)
                order.append(message_id)
                return True

        table = Table(dataclasses.replace(row("running")))
        notifier = JobWebhooks(Slow(), lambda: table, view)  # type: ignore[arg-type]
        notifier.post("job_1", lambda: notifier.running(live(0), "started"))
        for index in range(1, 4):
            notifier.post("job_1", lambda index=index: notifier.running(live(index), "preview"))
        table.row = row("succeeded")
        await notifier.post("job_1", lambda: notifier.ending(table.row))
        return order

    assert asyncio.run(scenario()) == [
        "job_1.started",
        "job_1.preview0",
        "job_1.preview1",
        "job_1.preview2",
        "job_1",
    ]
