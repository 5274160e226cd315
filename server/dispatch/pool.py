"""What runs the renders, as the front sees it: a Pool of Workers, each taking one batch at a time.

Implemented by the spawned worker processes (server/dispatch/local_pool.py), by the lanes into Ray Serve's
engine replicas (server/dispatch/ray_pool.py) and by the tests' stand-in for the process boundary
(tests/standin.py). The scheduler, the lifespan and the /ready and /v1/models routes know only these
protocols."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pipelines.contract.messages import Failure, Progress, Ready, RenderRequest, RenderResult, WorkerConfig

if TYPE_CHECKING:
    from server.dispatch.local_pool import Liveness

ProgressListener = Callable[[Progress], None]


class WorkerCrashed(Exception):
    """The worker died (a process killed, a replica lost) or was killed as hung while it held the request."""


class WorkerFailure(Exception):
    """The worker answered a request with a Failure."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class Worker(Protocol):
    """One place a batch runs: a worker process, a lane into Ray Serve, a test's stand-in."""

    @property
    def name(self) -> str: ...

    @property
    def ready(self) -> asyncio.Event:
        """Set while the worker takes batches."""
        ...

    @property
    def restarts(self) -> int: ...

    @property
    def busy_images(self) -> int:
        """Images of the batches it holds; 0: idle."""
        ...

    @property
    def info(self) -> Ready | None:
        """What it said it runs on and holds, once it did."""
        ...

    @property
    def pid(self) -> int | None: ...

    def submit(
        self, batch: list[RenderRequest], listeners: dict[str, ProgressListener | None]
    ) -> list[asyncio.Future[RenderResult]]:
        """Run `batch`: one future per request, in order, settled with its result, a WorkerFailure or a
        WorkerCrashed."""
        ...

    def cancel(self, request_id: str) -> None:
        """The request's client went away: stop it if the worker still runs it."""
        ...

    def holds(self, weights: str) -> bool:
        """Whether the checkpoint is loaded there, so that a batch of it starts without a load."""
        ...


class Pool(Protocol):
    """The workers, started and stopped together."""

    @property
    def workers(self) -> Sequence[Worker]: ...

    def start(self, loop: asyncio.AbstractEventLoop, on_ready: Callable[[], None] | None = None) -> None:
        """`on_ready` runs whenever a worker (a first one or a replacement) becomes ready for batches."""
        ...

    async def wait_ready(self, timeout_s: float) -> None: ...

    def all_ready(self) -> bool: ...

    def modes(self, weights_id: str) -> list[dict[str, Any]]:
        """What each ready worker runs the checkpoint as, with its device."""
        ...

    def closing(self) -> None:
        """The server is shutting down: a worker that exits from now on is not replaced."""
        ...

    def stop(self) -> None: ...


MakePool = Callable[[list[WorkerConfig], "Liveness", Callable[[str], None] | None], Pool]
"""How the app builds its pool: `make_pool(configs, liveness, on_restart)`."""


async def wait_all_ready(workers: Sequence[Worker], timeout_s: float) -> None:
    """Until every worker is ready, within `timeout_s` in all."""
    started = time.monotonic()
    for worker in workers:
        remaining = max(0.1, timeout_s - (time.monotonic() - started))
        await asyncio.wait_for(worker.ready.wait(), remaining)


def all_ready(workers: Sequence[Worker]) -> bool:
    return bool(workers) and all(worker.ready.is_set() for worker in workers)
