"""Bounded per-model queues in front of the workers, with batching of compatible jobs and queue deadlines.

A worker gets one batch at a time, so jobs wait here, where they can still be batched, timed out or dropped.
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

from pipelines.messages import Progress, RenderRequest, RenderResult
from pipelines.specs import ModelSpec
from server.errors import APIError
from server.metrics import Metrics
from server.workers import ProgressListener, WorkerHandle, WorkerPool

logger = logging.getLogger(__name__)


def batch_key(request: RenderRequest) -> tuple:
    """Jobs with equal keys can share one pipeline call: same model, shape, schedule (step caching
    included: the cache hook is on for a whole call), references, and LoRAs at the same scales."""
    references = hashlib.sha256(
        b"".join(hashlib.sha256(image).digest() for image in request.images)
    ).hexdigest()
    return (
        request.model,
        request.width,
        request.height,
        request.steps,
        request.guidance,
        references,
        repr(sorted(request.extra.items())),
        request.partial_images,
        tuple((lora.key, lora.scale) for lora in request.loras),
        request.acceleration,
        request.mask is not None,  # each request keeps its own mask; only masked ones share a call
        request.strength,
    )


@dataclass
class Job:
    request: RenderRequest
    weights: str
    key: tuple
    future: asyncio.Future[RenderResult]
    started: asyncio.Event = field(default_factory=asyncio.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    on_progress: ProgressListener | None = None
    worker: WorkerHandle | None = None


class Scheduler:
    """Owns the queues; `run` is the one call the routes make."""

    def __init__(
        self,
        pool: WorkerPool,
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
        self.queues: dict[str, deque[Job]] = {}
        self.seconds_per_image = 5.0  # an estimate for Retry-After, refined by every batch
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
        queued = sum(job.request.n for q in self.queues.values() for job in q)
        return self.seconds_per_image * max(1, queued) / max(1, len(self.pool.workers))

    def check_room(self, model: str) -> None:
        """The 429 a full queue answers, raised before a job is accepted."""
        if len(self.queues.get(model, ())) >= self.queue_size:
            raise APIError(
                "rate_limit_exceeded",
                f"The queue for '{model}' is full; retry later.",
                retry_after_s=self.retry_after_s(),
            )

    def position(self, request_id: str) -> int | None:
        """Jobs queued before this one, across models (0: it goes next); None once it has left the queue."""
        queued = {job.request.id: job.enqueued_at for q in self.queues.values() for job in q}
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
        """Queue, wait for a worker and the result. Cancelling the awaiting task drops or stops the job.

        `deadline=False` waits in the queue past --queue-timeout: the deadline bounds a held connection, and
        an async job has none. `on_dispatch` runs when a worker takes the job."""
        self.check_room(request.model)
        queue = self.queues.setdefault(request.model, deque())
        loop = asyncio.get_running_loop()
        job = Job(
            request,
            self.specs[request.model].weights_id,
            batch_key(request),
            loop.create_future(),
            on_progress=on_progress,
        )
        queue.append(job)
        self._update_depth(request.model)
        self._wakeup.set()
        try:
            try:
                await asyncio.wait_for(job.started.wait(), self.queue_timeout_s if deadline else None)
            except TimeoutError:
                if job in queue:
                    queue.remove(job)
                    self._update_depth(request.model)
                    raise APIError(
                        "queue_timeout",
                        f"The request waited more than {self.queue_timeout_s:g} s in the queue.",
                    ) from None
            if on_dispatch is not None:
                on_dispatch()
            return await job.future
        except asyncio.CancelledError:
            self._cancel(job, queue)
            raise

    def _update_depth(self, model: str) -> None:
        self.metrics.queue_depth.labels(model).set(self.depth(model))

    def _cancel(self, job: Job, queue: deque[Job]) -> None:
        if job in queue:
            queue.remove(job)
            self._update_depth(job.request.model)
            self.metrics.cancelled.labels(job.request.model, "queued").inc()
            logger.info("request %s dropped from the queue: cancelled", job.request.id)
        elif job.worker is not None:
            # Cancelling the awaiting task cancelled job.future too: the worker knows if the job still runs.
            self.metrics.cancelled.labels(job.request.model, "running").inc()
            job.worker.cancel(job.request.id)

    def _listener(self, job: Job) -> ProgressListener:
        """The job's own progress listener, counting every denoising step a worker reports."""
        steps = self.metrics.steps.labels(job.request.model)

        def listen(progress: Progress) -> None:
            steps.inc()
            if job.on_progress is not None:
                job.on_progress(progress)

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
        head = min(waiting, key=lambda job: job.enqueued_at)
        worker = self._pick_worker(head.weights)
        if worker is None:
            return False
        batch = self._take_batch(head)
        model = head.request.model
        self._update_depth(model)
        try:
            futures = worker.submit(
                [job.request for job in batch], {job.request.id: self._listener(job) for job in batch}
            )
        except Exception as exc:
            # The dispatcher must outlive any one batch: dying here would leave every later request queued.
            logger.exception("submitting a batch to worker %s failed", worker.name)
            for job in batch:
                job.future.set_exception(exc)
                job.started.set()
            return True
        started = time.monotonic()
        self.metrics.batch_images.labels(model).observe(sum(job.request.n for job in batch))
        for job, future in zip(batch, futures, strict=True):
            self.metrics.queue_wait.labels(model).observe(started - job.enqueued_at)
            job.worker = worker
            job.started.set()
            future.add_done_callback(functools.partial(self._settle, job, started=started))
        return True

    def _pick_worker(self, weights: str) -> WorkerHandle | None:
        idle = [w for w in self.pool.workers if w.ready.is_set() and w.busy_images == 0]
        if not idle:
            return None
        return min(idle, key=lambda w: (not w.holds(weights), w.restarts))

    def _take_batch(self, head: Job) -> list[Job]:
        queue = self.queues[head.request.model]
        batch: list[Job] = []
        images = 0
        for job in list(queue):
            if job.key != head.key or (batch and images + job.request.n > self.max_batch_images):
                continue
            queue.remove(job)
            batch.append(job)
            images += job.request.n
        return batch

    def _settle(self, job: Job, outcome: asyncio.Future[RenderResult], started: float) -> None:
        # Read even when nobody waits any more (a cancelled job), or asyncio logs "never retrieved".
        failure = outcome.exception()
        if not job.future.done():
            if failure is not None:
                job.future.set_exception(failure)
            else:
                rendered = outcome.result()
                elapsed = time.monotonic() - started
                images = max(1, int(rendered.timings_ms.get("batch_images", 1)))
                self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * elapsed / images
                model = job.request.model
                rendered.timings_ms["queue"] = (started - job.enqueued_at) * 1000
                self.metrics.run_time.labels(model).observe(elapsed)
                self.metrics.images.labels(model).inc(len(rendered.images))
                for kind, key in (("hit", "prompt_cache_hits"), ("miss", "prompt_cache_misses")):
                    self.metrics.prompt_cache.labels(model, kind).inc(rendered.timings_ms.get(key, 0))
                for kind, key in (("hit", "lora_cache_hits"), ("load", "lora_loads")):
                    self.metrics.lora_adapters.labels(model, kind).inc(rendered.timings_ms.get(key, 0))
                self.metrics.lora_load_seconds.labels(model).inc(
                    rendered.timings_ms.get("lora_load", 0) / 1000
                )
                if job.worker is not None:
                    self.metrics.device_memory.labels(job.worker.name).set(rendered.device_memory_bytes)
                job.future.set_result(rendered)
        self._wakeup.set()
