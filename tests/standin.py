"""A stand-in for the worker pool, for in-process tests of the HTTP front.

StandInPool is a Pool and StandInHandle a Worker (server/dispatch/pool.py): what server/dispatch/scheduler.py,
server/front/routes and the app's lifespan call. It stands in for the process boundary only: the tests that
render pixels use the real workers (tests/e2e). Each submitted batch is recorded and answered when the test
says so, with flat grey images."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipelines.contract.encoding import RAW_RGB, encoded
from pipelines.contract.messages import RenderedImage, RenderRequest, RenderResult, WorkerConfig


@dataclass
class StandInHandle:
    name: str
    loop: asyncio.AbstractEventLoop
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: int = 0
    busy_images: int = 0
    info: Any = None
    pid: int | None = 0
    batches: list[list[RenderRequest]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    fail_with: BaseException | None = None
    image_bytes: bytes | None = None  # sent as every image's encoded bytes instead of a grey image
    _futures: dict[str, asyncio.Future[RenderResult]] = field(default_factory=dict)
    _requests: dict[str, RenderRequest] = field(default_factory=dict)

    def submit(
        self, batch: list[RenderRequest], listeners: dict[str, Any]
    ) -> list[asyncio.Future[RenderResult]]:
        if self.fail_with is not None:
            raise self.fail_with
        self.batches.append(batch)
        self.busy_images += sum(request.n for request in batch)
        futures = []
        for request in batch:
            future: asyncio.Future[RenderResult] = self.loop.create_future()
            self._futures[request.id] = future
            self._requests[request.id] = request
            futures.append(future)
        return futures

    def finish(self) -> None:
        """Answer every request this worker holds."""
        for request_id, future in list(self._futures.items()):
            request = self._requests.pop(request_id)
            del self._futures[request_id]
            self.busy_images -= request.n
            if not future.done():
                future.set_result(_result(request, self.image_bytes))

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    def holds(self, weights: str) -> bool:
        return False


def _result(request: RenderRequest, data: bytes | None) -> RenderResult:
    pixels = bytes([128]) * (request.width * request.height * 3)
    raw = [RenderedImage(pixels, RAW_RGB, request.width, request.height, seed) for seed in request.seeds]
    # Encoded as a worker does, in the request's format: the front forwards the bytes.
    images = [encoded(image, (request.output_format, request.output_compression)) for image in raw]
    if data is not None:
        images = [dataclasses.replace(image, data=data) for image in images]
    return RenderResult(
        request.id, images, timings_ms={"batch_images": request.n}, acceleration=request.acceleration
    )


class StandInPool:
    """One stand-in worker, ready at once."""

    def __init__(
        self,
        configs: list[WorkerConfig],
        liveness: Any = None,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.configs = configs
        self.workers: list[StandInHandle] = []

    def start(self, loop: asyncio.AbstractEventLoop, on_ready: Callable[[], None] | None = None) -> None:
        handle = StandInHandle("0:standin", loop)
        handle.ready.set()
        self.workers.append(handle)
        if on_ready is not None:
            on_ready()

    async def wait_ready(self, timeout_s: float) -> None:
        return None

    def all_ready(self) -> bool:
        return True

    def modes(self, weights_id: str) -> list[dict[str, Any]]:
        return []

    def closing(self) -> None:
        return None

    def stop(self) -> None:
        return None
