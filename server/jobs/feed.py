"""`GET /v1/images/jobs/{id}/events`: a job's life as server-sent events (status and queue position, step k
of n, previews, the final job), as fal's status stream; `Last-Event-ID` resumes after the last event read."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

KEEPALIVE_S = 15.0  # a comment line this often, so proxies keep an idle feed open


@dataclass
class JobFeed:
    """The events of a job this process runs, numbered from 1; `boot` tells this process's numbers apart from
    another's (a restart numbers its events anew)."""

    boot: str
    events: list[tuple[str, Any]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, event: str, data: Any) -> None:
        self.events.append((event, data))
        self._changed.set()
        self._changed = asyncio.Event()

    def after(self, last_event_id: str | None) -> int:
        """How many events the client has read, from its Last-Event-ID ('<boot>.<n>')."""
        boot, _, number = (last_event_id or "").partition(".")
        return int(number) if boot == self.boot and number.isdigit() else 0

    async def changed(self, seen: int) -> bool:
        """Wait for an event past `seen`; False after KEEPALIVE_S without one."""
        if seen < len(self.events):
            return True
        try:
            await asyncio.wait_for(self._changed.wait(), KEEPALIVE_S)
        except TimeoutError:
            return False
        return True


def _event(event: str, data: object, event_id: str) -> bytes:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def stream(
    feed: JobFeed | None,
    last_event_id: str | None,
    output_format: str,
    live: Callable[[], bool],
    final: Callable[[], Awaitable[dict]],
) -> AsyncIterator[bytes]:
    """The feed's events after `last_event_id`, then `done` with the job as GET answers it. A job this process
    no longer runs (ended, or run by a server before a restart) answers `done` at once."""
    seen = 0
    if feed is not None:
        seen = feed.after(last_event_id)
        while True:
            if not await feed.changed(seen):
                if not live():  # it ended without a done event (the server is stopping)
                    break
                yield b": keep-alive\n\n"
                continue
            for event, data in feed.events[seen:]:
                seen += 1
                if event == "preview":  # the worker encoded it as the job's images are
                    data = {
                        "b64_json": base64.b64encode(data["image"].data).decode(),
                        "partial_image_index": data["partial_image_index"],
                        "output_format": output_format,
                    }
                yield _event(event, data, f"{feed.boot}.{seen}")
                if event == "done":
                    return
    yield _event("done", await final(), f"{'' if feed is None else feed.boot}.done")
