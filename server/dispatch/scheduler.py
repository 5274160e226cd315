"""Bounded per-model queues in front of the workers, with batching of compatible requests and deadlines.

A worker gets one batch at a time, so requests wait here, each as a Ticket, where they can still be
batched, timed out or dropped.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pipelines.contract.messages import Progress, RenderRequest, RenderResult, batch_values
from pipelines.contract.specs import ModelSpec
from pipelines.contract.wire import canonical
from server.declarations.errors import APIError
from server.dispatch.pool import Pool, ProgressListener, Worker
from server.front.metrics import Metrics

logger = logging.getLogger(__name__)


def batch_key(request: RenderRequest) -> bytes:
    """Requests with equal keys can share one pipeline call: they agree on every field their declaration
    marks BatchKey (pipelines/contract/messages.py)."""
    return hashlib.sha256(canonical(batch_values(request))).digest()


@dataclass
class Ticket:
    """A request's place in its model's queue, until a worker takes it; then the worker and its future."""

    request: RenderRequest
    weights: str
    key: bytes
    future: asyncio.Future[RenderResult]
    started: asyncio.Event = field(default_factory=asyncio.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    on_progress: ProgressListener | None = None
    worker: Worker | None = None


class Scheduler:
    """Owns the queues; `run` is the one call the routes make."""

    def __init__(
        self,
        pool: Pool,
        specs: Mapping[str, ModelSpec],
        queue_size: int,
        max_batch_images: int,
        queue_timeout_s: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.pool = pool
        self.specs = specs
        self.queue_size = queue_size
        self.max_batch_images = max_batch_images
        self.queue_timeout_s = queue_timeout_s
        self.queues: dict[str, deque[Ticket]] = {}
        self.seconds_per_image = 5.0  # an estimate for Retry-After, refined by every batch
        self._reserved: dict[str, int] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._dispatch_forever())

    def wake(self) -> None:
        """Look at the queues again: a worker became ready (at start-up or after a crash)."""
        self._wakeup.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def depth(self, model: str | None = None) -> int:
        if model is not None:
            return len(self.queues.get(model, ()))
        return sum(len(q) for q in self.queues.values())

    def retry_after_s(self) -> float:
        queued = sum(ticket.request.n for q in self.queues.values() for ticket in q)
        return self.seconds_per_image * max(1, queued) / max(1, len(self.pool.workers))

    def check_room(self, model: str) -> None:
        """The 429 a full queue answers, raised before a request is accepted. Places reserved for async jobs
        being stored count as taken."""
        if len(self.queues.get(model, ())) + self._reserved.get(model, 0) >= self.queue_size:
            raise APIError(
                "rate_limit_exceeded",
                f"The queue for '{model}' is full; retry later.",
                retry_after_s=self.retry_after_s(),
            )

    def reserve(self, model: str) -> None:
        """Take a place in the model's queue, or raise the 429, in one step with no await: an async job holds
        it while its row is stored, then `admit(bounded=False)` fills it (or `unreserve` gives it back)."""
        self.check_room(model)
        self._reserved[model] = self._reserved.get(model, 0) + 1

    def unreserve(self, model: str) -> None:
        self._reserved[model] -= 1

    def position(self, request_id: str) -> int | None:
        """Requests queued before this one, across models (0: it goes next); None once it left the queue."""
        queued = {ticket.request.id: ticket.enqueued_at for q in self.queues.values() for ticket in q}
        mine = queued.get(request_id)
        return None if mine is None else sum(1 for at in queued.values() if at < mine)

    async def run(
        self,
        request: RenderRequest,
        on_progress: ProgressListener | None = None,
        *,
        on_dispatch: Callable[[], None] | None = None,
        deadline: bool = True,
    ) -> RenderResult:
        """Queue, wait for a worker and the result. Cancelling the awaiting task drops or stops it."""
        return await self.wait(self.admit(request, on_progress), on_dispatch=on_dispatch, deadline=deadline)

    def admit(
        self, request: RenderRequest, on_progress: ProgressListener | None = None, *, bounded: bool = True
    ) -> Ticket:
        """Put the request at the end of its model's queue, with no await between the room check and the
        append. `bounded=False` admits a request that holds its place already (reserved, or accepted before a
        restart or a worker crash): it is never refused, never left outside the queue."""
        if bounded:
            self.check_room(request.model)
        queue = self.queues.setdefault(request.model, deque())
        ticket = Ticket(
            request,
            self.specs[request.model].weights_id,
            batch_key(request),
            asyncio.get_running_loop().create_future(),
            on_progress=on_progress,
        )
        queue.append(ticket)
        self._update_depth(request.model)
        self._wakeup.set()
        return ticket

    async def wait(
        self, ticket: Ticket, *, on_dispatch: Callable[[], None] | None = None, deadline: bool = True
    ) -> RenderResult:
        """The admitted request's result. Cancelling the awaiting task drops or stops the request.

        `deadline=False` waits in the queue past --queue-timeout: the deadline bounds a held connection, and
        an async job has none. `on_dispatch` runs when a worker takes the request."""
        queue = self.queues[ticket.request.model]
        try:
            try:
                await asyncio.wait_for(ticket.started.wait(), self.queue_timeout_s if deadline else None)
            except TimeoutError:
                if ticket in queue:
                    queue.remove(ticket)
                    self._update_depth(ticket.request.model)
                    raise APIError(
                        "queue_timeout",
                        f"The request waited more than {self.queue_timeout_s:g} s in the queue.",
                    ) from None
            if on_dispatch is not None:
                on_dispatch()
            return await ticket.future
        except asyncio.CancelledError:
            self._cancel(ticket, queue)
            raise

    def withdraw(self, ticket: Ticket) -> None:
        """Drop an admitted request that nobody waits for any more, if it is still queued."""
        queue = self.queues.get(ticket.request.model, deque())
        if ticket in queue:
            self._cancel(ticket, queue)

    def _update_depth(self, model: str) -> None:
        self.metrics.queue_depth.labels(model).set(self.depth(model))

    def _cancel(self, ticket: Ticket, queue: deque[Ticket]) -> None:
        if ticket in queue:
            queue.remove(ticket)
            self._update_depth(ticket.request.model)
            self.metrics.cancelled.labels(ticket.request.model, "queued").inc()
            logger.info("request %s dropped from the queue: cancelled", ticket.request.id)
        elif ticket.worker is not None:
            # Cancelling the awaiting task cancelled ticket.future too: the worker knows if the request runs.
            self.metrics.cancelled.labels(ticket.request.model, "running").inc()
            ticket.worker.cancel(ticket.request.id)

    def _listener(self, ticket: Ticket) -> ProgressListener:
        """The request's own progress listener, counting every denoising step a worker reports."""
        steps = self.metrics.steps.labels(ticket.request.model)

        def listen(progress: Progress) -> None:
            steps.inc()
            if ticket.on_progress is not None:
                ticket.on_progress(progress)

        return listen

    async def _dispatch_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._dispatch_one():
                pass

    def _dispatch_one(self) -> bool:
        waiting = [q[0] for q in self.queues.values() if q]
        if not waiting:
            return False
        head = min(waiting, key=lambda ticket: ticket.enqueued_at)
        worker = self._pick_worker(head.weights)
        if worker is None:
            return False
        batch = self._take_batch(head)
        model = head.request.model
        self._update_depth(model)
        try:
            futures = worker.submit(
                [ticket.request for ticket in batch],
                {ticket.request.id: self._listener(ticket) for ticket in batch},
            )
        except Exception as exc:
            # The dispatcher must outlive any one batch: dying here would leave every later request queued.
            logger.exception("submitting a batch to worker %s failed", worker.name)
            for ticket in batch:
                ticket.future.set_exception(exc)
                ticket.started.set()
            return True
        started = time.monotonic()
        self.metrics.batch_images.labels(model).observe(sum(ticket.request.n for ticket in batch))
        for ticket, future in zip(batch, futures, strict=True):
            self.metrics.queue_wait.labels(model).observe(started - ticket.enqueued_at)
            ticket.worker = worker
            ticket.started.set()
            future.add_done_callback(functools.partial(self._settle, ticket, started=started))
        return True

    def _pick_worker(self, weights: str) -> Worker | None:
        idle = [w for w in self.pool.workers if w.ready.is_set() and w.busy_images == 0]
        if not idle:
            return None
        return min(idle, key=lambda w: (not w.holds(weights), w.restarts))

    def _take_batch(self, head: Ticket) -> list[Ticket]:
        queue = self.queues[head.request.model]
        batch: list[Ticket] = []
        images = 0
        for ticket in list(queue):
            if ticket.key != head.key or (batch and images + ticket.request.n > self.max_batch_images):
                continue
            queue.remove(ticket)
            batch.append(ticket)
            images += ticket.request.n
        return batch

    def _settle(self, ticket: Ticket, outcome: asyncio.Future[RenderResult], started: float) -> None:
        # Read even when nobody waits any more (a cancelled request), or asyncio logs "never retrieved".
        failure = outcome.exception()
        if not ticket.future.done():
            if failure is not None:
                ticket.future.set_exception(failure)
            else:
                rendered = outcome.result()
                elapsed = time.monotonic() - started
                images = max(1, int(rendered.timings_ms.get("batch_images", 1)))
                self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * elapsed / images
                model = ticket.request.model
                rendered.timings_ms["queue"] = (started - ticket.enqueued_at) * 1000
                self.metrics.run_time.labels(model).observe(elapsed)
                self.metrics.images.labels(model).inc(len(rendered.images))
                for kind, key in (("hit", "prompt_cache_hits"), ("miss", "prompt_cache_misses")):
                    self.metrics.prompt_cache.labels(model, kind).inc(rendered.timings_ms.get(key, 0))
                for kind, key in (("hit", "lora_cache_hits"), ("load", "lora_loads")):
                    self.metrics.lora_adapters.labels(model, kind).inc(rendered.timings_ms.get(key, 0))
                self.metrics.lora_load_seconds.labels(model).inc(
                    rendered.timings_ms.get("lora_load", 0) / 1000
                )
                if ticket.worker is not None:
                    self.metrics.device_memory.labels(ticket.worker.name).set(rendered.device_memory_bytes)
                ticket.future.set_result(rendered)
        self._wakeup.set()
