"""Spawned worker processes, one per device: start, watch, restart, and the futures of their requests.

The HTTP process never imports torch; it talks to each worker through multiprocessing queues and a pipe. A
reader thread per worker turns the worker's answers into asyncio results. A worker that dies, goes silent
(stopped or frozen: no heartbeat) or holds a batch past its deadline (hung) is killed if need be and
replaced; every request it held fails with WorkerCrashed.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import pkgutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from pipelines.contract.errors import SERVER_ERROR
from pipelines.contract.messages import (
    Failure,
    Heartbeat,
    Progress,
    Ready,
    Rendered,
    RenderRequest,
    RenderResult,
    WorkerConfig,
)
from pipelines.contract.wire import Message, decode_message, encode_batch
from server.dispatch.pool import ProgressListener, WorkerCrashed, WorkerFailure, all_ready, wait_all_ready

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.5


@dataclass(frozen=True)
class Liveness:
    """When the server gives up on a worker process, kills it and starts another (the settings of the same
    names say how each value was chosen). Two checks, because hangs differ: a stopped or frozen process sends
    no heartbeat (a thread of its own sends one every second), while a worker whose main thread hangs in a
    device call still does, and is caught by its batch's deadline. Heartbeats count from a process's first
    message on: an interpreter still starting sends none."""

    heartbeat_timeout_s: float
    deadline_floor_s: float
    deadline_factor: float

    def batch_deadline_s(self, steps: int, step_s: float | None) -> float:
        return max(self.deadline_floor_s, self.deadline_factor * steps * (step_s or 0.0))


@dataclass
class _Pending:
    future: asyncio.Future[RenderResult]
    images: int
    batch: int
    on_progress: ProgressListener | None = None
    cancelled: bool = False
    rendered: bool = False  # its images are encoding: no longer counted in busy_images


@dataclass
class _Batch:
    """A batch sent to the current process, until each of its requests has its answer."""

    ids: list[str]
    steps: int
    sent_at: float
    first_step: tuple[int, float] | None = None  # the step of its first progress report, and when
    step_s: float | None = None  # its seconds per step, measured from the reports since

    def progress(self, step: int, now: float) -> None:
        if self.first_step is None:
            self.first_step = (step, now)
        elif step > self.first_step[0]:
            self.step_s = (now - self.first_step[1]) / (step - self.first_step[0])


@dataclass
class WorkerHandle:
    """One worker process and the requests it holds, a Worker (server/dispatch/pool.py). Methods are called on
    the
    event loop."""

    name: str
    config: WorkerConfig
    loop: asyncio.AbstractEventLoop
    liveness: Liveness
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: int = 0
    info: Ready | None = None
    busy_images: int = 0
    on_restart: Callable[[str], None] | None = None
    on_ready: Callable[[], None] | None = None
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _batches: dict[int, _Batch] = field(default_factory=dict)  # by number, in the order sent
    _sent: int = 0  # batches sent to the current process
    _heard: float | None = None  # when the current process last sent anything
    _watch: asyncio.TimerHandle | None = None
    _stopping: bool = False

    def start(self) -> None:
        context = mp.get_context("spawn")
        self._inbox = context.Queue()
        self._control = context.Queue()
        # A pipe the server only reads: once the worker is gone, a read ends (EOF) even halfway through a
        # message the worker was writing when it was stopped or killed.
        messages, outbox = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_spawned,
            args=(self._inbox, outbox, self._control, self.config),
            name=f"fluxd-worker-{self.name}",
            daemon=True,
        )
        self.process.start()
        outbox.close()
        self._sent, self._heard = 0, None
        logger.info("worker %s started (pid %s) on %s", self.name, self.process.pid, self.config.device)
        self._reader = threading.Thread(target=self._read, args=(self.process, messages), daemon=True)
        self._reader.start()
        if self._watch is None:
            self._watch = self.loop.call_later(WATCH_INTERVAL_S, self._check)

    def submit(
        self, batch: list[RenderRequest], listeners: dict[str, ProgressListener | None]
    ) -> list[asyncio.Future[RenderResult]]:
        self._sent += 1
        self._batches[self._sent] = _Batch([r.id for r in batch], batch[0].steps, time.monotonic())
        futures = []
        for request in batch:
            future: asyncio.Future[RenderResult] = self.loop.create_future()
            self._pending[request.id] = _Pending(future, request.n, self._sent, listeners.get(request.id))
            futures.append(future)
        self.busy_images += sum(request.n for request in batch)
        self._send(batch)
        return futures

    def cancel(self, request_id: str) -> None:
        pending = self._pending.get(request_id)
        if pending is not None:
            pending.cancelled = True
            self._send_cancel(request_id)
            logger.info("request %s cancelled while running on worker %s", request_id, self.name)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    # Transport: a worker process's queues here; a Ray Serve call in server/dispatch/ray_pool.py.

    def _send(self, batch: list[RenderRequest]) -> None:
        self._inbox.put(encode_batch(batch))

    def _send_cancel(self, request_id: str) -> None:
        self._control.put(request_id)

    def holds(self, model_weights: str) -> bool:
        return self.info is not None and model_weights in self.info.loaded

    def closing(self) -> None:
        """The server is shutting down: a worker that exits from now on is not replaced."""
        self._stopping = True

    def stop(self) -> None:
        self.closing()
        if self._watch is not None:
            self._watch.cancel()
        if self.process.is_alive():
            self._inbox.put(None)
            self._control.put(None)
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()

    # Reader thread -------------------------------------------------------------------------------------

    def _read(self, process: BaseProcess, messages: Connection) -> None:
        while True:
            try:
                if not messages.poll(0.2):
                    # A process the worker started may hold the pipe open after the worker itself died.
                    if process.is_alive():
                        continue
                    break
                message = decode_message(messages.recv_bytes())
            except (EOFError, OSError):
                break
            self.loop.call_soon_threadsafe(self._dispatch, process, message)
        messages.close()
        process.join(timeout=5)
        self.loop.call_soon_threadsafe(self._on_exit, process)

    # Event loop ----------------------------------------------------------------------------------------

    def _dispatch(self, process: BaseProcess, message: Message) -> None:
        if process is not self.process:
            return  # a late word from a process already replaced
        self._heard = time.monotonic()
        self._handle(message)

    def _handle(self, message: Message) -> None:
        """A worker's message, whatever carried it (a process's pipe here, a Ray Serve call in ray_pool)."""
        if isinstance(message, Heartbeat):
            self._settle_finished(message.batches)
        elif isinstance(message, Ready):
            self.info = message
            self.ready.set()
            if self.on_ready is not None:
                self.on_ready()
            logger.info("worker %s ready on %s", self.name, message.device)
        elif isinstance(message, Progress):
            pending = self._pending.get(message.id)
            if pending is not None:
                self._batches[pending.batch].progress(message.step, time.monotonic())
                if pending.on_progress is not None:
                    pending.on_progress(message)
        elif isinstance(message, Rendered):
            self._rendered(message.ids)
        elif isinstance(message, RenderResult):
            self._resolve(message.id, lambda future: future.set_result(message))
            if self.info is not None and message.loaded:
                self.info.loaded = message.loaded
        elif isinstance(message, Failure):
            for request_id in message.ids:
                self._fail(request_id, message)

    def _rendered(self, ids: list[str]) -> None:
        """The batch's pipeline call is over and its images encode on the worker's thread: the scheduler may
        send the next batch now, to denoise meanwhile."""
        for request_id in ids:
            pending = self._pending.get(request_id)
            if pending is not None and not pending.rendered:
                pending.rendered = True
                self.busy_images = max(0, self.busy_images - pending.images)
        if self.on_ready is not None:
            self.on_ready()

    def _resolve(self, request_id: str, settle: Callable[[asyncio.Future], None]) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        if not pending.rendered:
            self.busy_images = max(0, self.busy_images - pending.images)
        batch = self._batches.get(pending.batch)
        if batch is not None and not any(i in self._pending for i in batch.ids):
            del self._batches[pending.batch]
        if not pending.future.done():
            settle(pending.future)

    def _fail(self, request_id: str, failure: Failure) -> None:
        self._resolve(request_id, lambda future: future.set_exception(WorkerFailure(failure)))

    def _settle_finished(self, finished: int) -> None:
        """The worker has answered its first `finished` batches: a request of theirs still pending never got
        its answer (a worker bug), and would keep this worker counted busy, out of the scheduler, for good."""
        for number in [n for n in self._batches if n <= finished]:
            for request_id in self._batches[number].ids:
                pending = self._pending.get(request_id)
                if pending is None:
                    continue
                if pending.cancelled:
                    failure = Failure([request_id], "cancelled", "The client went away.")
                else:
                    logger.error("worker %s finished a batch without answering %s", self.name, request_id)
                    failure = Failure([request_id], "server_error", SERVER_ERROR)
                self._fail(request_id, failure)

    def _check(self) -> None:
        """Every WATCH_INTERVAL_S: a live worker that is silent or past its batch deadline is replaced."""
        self._watch = self.loop.call_later(WATCH_INTERVAL_S, self._check)
        if self._stopping or not self.process.is_alive():
            return
        now = time.monotonic()
        if self._heard is not None and now - self._heard > self.liveness.heartbeat_timeout_s:
            self._kill(f"sent nothing for {now - self._heard:.0f} s (no heartbeat: stopped or frozen)")
            return
        running = next(iter(self._batches.values()), None)  # batches run in the order they were sent
        if running is not None:
            deadline_s = self.liveness.batch_deadline_s(running.steps, running.step_s)
            if now - running.sent_at > deadline_s:
                self._kill(f"has run batch {running.ids} past its deadline of {deadline_s:.0f} s (hung)")

    def _kill(self, why: str) -> None:
        logger.error("worker %s (pid %s) %s: killing it", self.name, self.process.pid, why)
        self.process.kill()
        self.process.join(timeout=5)
        self._on_exit(self.process, "was killed")

    def _on_exit(self, process: BaseProcess, how: str | None = None) -> None:
        if process is not self.process:
            return
        self.ready.clear()
        held, self._pending, self._batches = self._pending, {}, {}
        self.busy_images = 0
        # Their feeder threads may be stuck writing to a pipe nobody reads any more: the server must not wait
        # for them when it exits.
        self._inbox.cancel_join_thread()
        self._control.cancel_join_thread()
        for pending in held.values():
            if not pending.future.done():
                pending.future.set_exception(WorkerCrashed(f"worker {self.name} exited ({process.exitcode})"))
        if self._stopping:
            return
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart(self.name)
        how = how or f"exited with {process.exitcode}"
        logger.error("worker %s %s; restarting (restart #%d)", self.name, how, self.restarts)
        self.start()


class WorkerPool:
    """One worker process per device: a Pool (server/dispatch/pool.py)."""

    def __init__(
        self,
        configs: list[WorkerConfig],
        liveness: Liveness,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.configs = configs
        self.liveness = liveness
        self.on_restart = on_restart
        self.workers: list[WorkerHandle] = []

    def start(self, loop: asyncio.AbstractEventLoop, on_ready: Callable[[], None] | None = None) -> None:
        """`on_ready` runs whenever a worker (a first one or a replacement) becomes ready for batches."""
        for index, config in enumerate(self.configs):
            handle = WorkerHandle(
                f"{index}:{config.device}",
                config,
                loop,
                self.liveness,
                on_restart=self.on_restart,
                on_ready=on_ready,
            )
            handle.start()
            self.workers.append(handle)

    async def wait_ready(self, timeout_s: float) -> None:
        await wait_all_ready(self.workers, timeout_s)

    def all_ready(self) -> bool:
        return all_ready(self.workers)

    def modes(self, weights_id: str) -> list[dict[str, Any]]:
        """What each ready worker runs the checkpoint as, with the worker's device."""
        return [
            {"device": handle.info.device, **handle.info.modes[weights_id]}
            for handle in self.workers
            if handle.info is not None and weights_id in handle.info.modes
        ]

    def closing(self) -> None:
        for handle in self.workers:
            handle.closing()

    def stop(self) -> None:
        for handle in self.workers:
            handle.stop()


def _spawned(*args: Any) -> None:
    """The worker process's target, named so that this process never imports the engine (nor torch): the
    child resolves it."""
    pkgutil.resolve_name(WORKER_TARGET)(*args)


WORKER_TARGET = "pipelines.engine.worker:spawned"
