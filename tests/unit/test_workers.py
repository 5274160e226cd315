"""The server's handle on a worker, fed the worker's messages in-process: no process, no torch."""

from __future__ import annotations

import asyncio
import queue
from typing import Any

import pytest

from pipelines.contract.messages import (
    Failure,
    Heartbeat,
    Progress,
    Rendered,
    RenderedImage,
    RenderRequest,
    RenderResult,
)
from server.app import worker_configs
from server.declarations.settings import Settings
from server.dispatch.local_pool import Liveness, WorkerHandle
from server.dispatch.pool import WorkerFailure

pytestmark = pytest.mark.anyio  # anyio's pytest plugin runs the async tests

LIVENESS = Liveness(heartbeat_timeout_s=60, deadline_floor_s=900, deadline_factor=10)


def request(request_id: str, n: int = 1) -> RenderRequest:
    return RenderRequest(request_id, "flux.2-dev", "x", 32, 32, 4, 4.0, list(range(n)))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def worker() -> WorkerHandle:
    """A handle as `start` leaves it, on the test's event loop, plain queues standing in for the process's."""
    [config] = worker_configs(Settings(weights_dir="weights"), {})
    worker = WorkerHandle("0:cpu", config, asyncio.get_running_loop(), LIVENESS)
    worker.process = object()  # type: ignore[assignment]  # whose messages `_dispatch` accepts
    worker._inbox = queue.Queue()  # type: ignore[assignment]
    worker._control = queue.Queue()  # type: ignore[assignment]
    return worker


def dispatch(worker: WorkerHandle, message: Any) -> None:
    worker._dispatch(worker.process, message)  # type: ignore[arg-type]


async def test_a_cancelled_request_the_worker_never_answered_is_settled_when_its_batch_is_done(
    worker: WorkerHandle,
) -> None:
    gone, kept = worker.submit([request("gone", 2), request("kept")], {})
    worker.cancel("gone")
    dispatch(worker, Failure(["kept"], "server_error", "failed"))
    assert worker.busy_images == 2  # still held for "gone"
    dispatch(worker, Heartbeat(batches=1))  # the worker is past that batch
    assert worker.busy_images == 0
    with pytest.raises(WorkerFailure) as info:
        await gone
    assert info.value.failure.code == "cancelled"
    assert isinstance(kept.exception(), WorkerFailure)


async def test_a_heartbeat_settles_only_the_batches_the_worker_finished(worker: WorkerHandle) -> None:
    [first] = worker.submit([request("first")], {})
    [second] = worker.submit([request("second")], {})
    dispatch(worker, Heartbeat(batches=1))
    assert first.done() and not second.done()
    assert worker.busy_images == 1
    assert first.exception().failure.code == "server_error"  # type: ignore[union-attr]  # never cancelled


async def test_a_worker_whose_images_encode_takes_the_next_batch_and_still_answers(
    worker: WorkerHandle,
) -> None:
    woken: list[bool] = []
    worker.on_ready = lambda: woken.append(True)
    [first] = worker.submit([request("first", 2)], {})
    dispatch(worker, Rendered(["first"]))  # denoised; its images encode on the worker's thread
    assert (worker.busy_images, woken) == (0, [True])  # the scheduler may send the next batch
    [second] = worker.submit([request("second")], {})
    image = RenderedImage(b"png", "image/png", 32, 32, 0)
    dispatch(worker, RenderResult("first", [image, image]))
    assert first.done() and worker.busy_images == 1  # "first" is not counted twice
    dispatch(worker, Failure(["second"], "server_error", "failed"))
    assert isinstance(second.exception(), WorkerFailure) and worker.busy_images == 0


def test_a_batch_deadline_is_the_floor_or_its_measured_steps_times_the_factor() -> None:
    assert LIVENESS.batch_deadline_s(steps=28, step_s=None) == 900  # nothing measured yet: the floor
    assert LIVENESS.batch_deadline_s(steps=28, step_s=1.0) == 900
    assert LIVENESS.batch_deadline_s(steps=50, step_s=4.0) == 2000


async def test_progress_measures_the_step_time_of_the_running_batch(worker: WorkerHandle) -> None:
    worker.submit([request("a")], {})
    [batch] = worker._batches.values()
    for step in (1, 2, 3):
        dispatch(worker, Progress("a", step, 4))
    assert batch.first_step is not None and batch.first_step[0] == 1
    assert batch.step_s is not None and batch.step_s >= 0
