"""Spawned worker processes, one per device: start, watch, restart, and the futures of their jobs.

The HTTP process never imports torch; it talks to each worker through multiprocessing queues. A reader
thread per worker turns the worker's answers into asyncio results; if the process dies, every job it held
fails with WorkerCrashed and a fresh process is started.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipelines import worker as worker_main
from pipelines.jobs import Failure, Progress, Ready, RenderRequest, RenderResult, WorkerConfig

logger = logging.getLogger(__name__)


class WorkerCrashed(Exception):
    """The worker process died while it held the job."""


class WorkerFailure(Exception):
    """The worker answered a job with a Failure."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


ProgressListener = Callable[[Progress], None]


@dataclass
class _Pending:
    future: asyncio.Future[RenderResult]
    images: int
    on_progress: ProgressListener | None = None


@dataclass
class WorkerHandle:
    """One worker process and the jobs it holds. Methods are called on the event loop."""

    name: str
    config: WorkerConfig
    loop: asyncio.AbstractEventLoop
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: int = 0
    info: Ready | None = None
    busy_images: int = 0
    on_restart: Callable[[str], None] | None = None
    on_ready: Callable[[], None] | None = None
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _stopping: bool = False

    def start(self) -> None:
        context = mp.get_context("spawn")
        self._inbox = context.Queue()
        self._outbox = context.Queue()
        self._control = context.Queue()
        self.process = context.Process(
            target=worker_main.main,
            args=(self._inbox, self._outbox, self._control, self.config),
            name=f"fluxd-worker-{self.name}",
            daemon=True,
        )
        self.process.start()
        logger.info("worker %s started (pid %s) on %s", self.name, self.process.pid, self.config.device)
        self._reader = threading.Thread(target=self._read, args=(self.process, self._outbox), daemon=True)
        self._reader.start()

    def submit(
        self, batch: list[RenderRequest], listeners: dict[str, ProgressListener | None]
    ) -> list[asyncio.Future]:
        futures = []
        for request in batch:
            future: asyncio.Future[RenderResult] = self.loop.create_future()
            self._pending[request.id] = _Pending(future, request.n, listeners.get(request.id))
            futures.append(future)
        self.busy_images += sum(request.n for request in batch)
        self._send(batch)
        return futures

    def cancel(self, request_id: str) -> None:
        if request_id in self._pending:
            self._send_cancel(request_id)
            logger.info("request %s cancelled while running on worker %s", request_id, self.name)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    # Transport: a worker process's queues here; a Ray Serve call in server/ray_pool.py.

    def _send(self, batch: list[RenderRequest]) -> None:
        self._inbox.put(batch)

    def _send_cancel(self, request_id: str) -> None:
        self._control.put(request_id)

    def holds(self, model_weights: str) -> bool:
        return self.info is not None and model_weights in self.info.loaded

    def closing(self) -> None:
        """The server is shutting down: a worker that exits from now on is not replaced."""
        self._stopping = True

    def stop(self) -> None:
        self.closing()
        if self.process.is_alive():
            self._inbox.put(None)
            self._control.put(None)
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()

    # Reader thread -------------------------------------------------------------------------------------

    def _read(self, process: mp.Process, outbox: mp.Queue) -> None:
        while True:
            try:
                message = outbox.get(timeout=0.2)
            except queue.Empty:
                if not process.is_alive():
                    self.loop.call_soon_threadsafe(self._on_exit, process)
                    return
                continue
            except (EOFError, OSError):
                self.loop.call_soon_threadsafe(self._on_exit, process)
                return
            self.loop.call_soon_threadsafe(self._dispatch, message)

    # Event loop ----------------------------------------------------------------------------------------

    def _dispatch(self, message: object) -> None:
        if isinstance(message, Ready):
            self.info = message
            self.ready.set()
            if self.on_ready is not None:
                self.on_ready()
            logger.info("worker %s ready on %s", self.name, message.device)
        elif isinstance(message, Progress):
            pending = self._pending.get(message.id)
            if pending is not None and pending.on_progress is not None:
                pending.on_progress(message)
        elif isinstance(message, RenderResult):
            self._resolve(message.id, lambda future: future.set_result(message))
            if self.info is not None and message.loaded:
                self.info.loaded = message.loaded
        elif isinstance(message, Failure):
            for request_id in message.ids:
                self._resolve(request_id, lambda future: future.set_exception(WorkerFailure(message)))

    def _resolve(self, request_id: str, settle: Callable[[asyncio.Future], None]) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        self.busy_images = max(0, self.busy_images - pending.images)
        if not pending.future.done():
            settle(pending.future)

    def _on_exit(self, process: mp.Process) -> None:
        if process is not self.process:
            return
        self.ready.clear()
        held, self._pending = self._pending, {}
        self.busy_images = 0
        for pending in held.values():
            if not pending.future.done():
                pending.future.set_exception(WorkerCrashed(f"worker {self.name} exited ({process.exitcode})"))
        if self._stopping:
            return
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart(self.name)
        logger.error(
            "worker %s exited with %s; restarting (restart #%d)", self.name, process.exitcode, self.restarts
        )
        self.start()


class WorkerPool:
    """One worker per device."""

    def __init__(self, configs: list[WorkerConfig], on_restart: Callable[[str], None] | None = None) -> None:
        self.configs = configs
        self.on_restart = on_restart
        self.workers: list[WorkerHandle] = []

    def start(self, loop: asyncio.AbstractEventLoop, on_ready: Callable[[], None] | None = None) -> None:
        """`on_ready` runs whenever a worker (a first one or a replacement) becomes ready for jobs."""
        for index, config in enumerate(self.configs):
            handle = WorkerHandle(
                f"{index}:{config.device}", config, loop, on_restart=self.on_restart, on_ready=on_ready
            )
            handle.start()
            self.workers.append(handle)

    async def wait_ready(self, timeout_s: float) -> None:
        started = time.monotonic()
        for handle in self.workers:
            remaining = max(0.1, timeout_s - (time.monotonic() - started))
            await asyncio.wait_for(handle.ready.wait(), remaining)

    def all_ready(self) -> bool:
        return bool(self.workers) and all(handle.ready.is_set() for handle in self.workers)

    def signatures(self) -> dict[str, dict[str, str]]:
        for handle in self.workers:
            if handle.info is not None:
                return handle.info.signatures
        return {}

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
