"""The worker process loop: owns an Engine, takes batches from its inbox, answers on its outbox.

This module is imported by the HTTP process to name the spawn target, so torch is imported only inside
`main`, which runs in the child.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from multiprocessing.queues import Queue
from typing import Any

from pipelines.jobs import Progress, RenderRequest, WorkerConfig

logger = logging.getLogger(__name__)

FAULT_AFTER_STEP = "FLUXD_FAULT_AFTER_STEP"
"""Debug only, unset by default: a worker started with it fails every job right after reporting that step,
so tests can watch an error reach a client after streaming began."""
FAULT_KIND = "FLUXD_FAULT_KIND"
"""With FAULT_AFTER_STEP: "error" (default) raises a RuntimeError, "oom" a torch.OutOfMemoryError, so the
out-of-memory path can be exercised without a GPU."""


def _watch_cancellations(control: Queue, cancelled: set[str]) -> None:
    while True:
        request_id = control.get()
        if request_id is None:
            return
        cancelled.add(request_id)


def _exit_with_parent(parent: int) -> None:
    """A worker outlives a SIGKILLed server otherwise, holding its device memory forever."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def main(inbox: Queue, outbox: Queue, control: Queue, config: WorkerConfig) -> None:
    # The server's pid comes with the config: a server that died before this line ran would otherwise
    # leave getppid() already pointing at init.
    # Ctrl-C in a terminal reaches the whole process group: the server handles it and stops its workers in
    # order, after failing their queued requests cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = config.parent_pid or os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s [worker %(process)d] %(name)s: %(message)s"
    )
    import torch

    from pipelines.runner import open_engine, ready_message, render_batch

    engine = open_engine(config)
    cancelled: set[str] = set()
    threading.Thread(target=_watch_cancellations, args=(control, cancelled), daemon=True).start()
    outbox.put(ready_message(engine, config))

    fault_after = int(os.environ.get(FAULT_AFTER_STEP, "0"))

    def on_step(progress: Progress, _pipe: Any) -> bool:
        outbox.put(progress)
        if fault_after and progress.step >= fault_after:
            fault = torch.OutOfMemoryError if os.environ.get(FAULT_KIND) == "oom" else RuntimeError
            raise fault(f"fault injected after step {progress.step} by {FAULT_AFTER_STEP}")
        return progress.id in cancelled

    while True:
        try:
            batch: list[RenderRequest] | None = inbox.get(timeout=1.0)
        except queue.Empty:
            continue
        if batch is None:
            return
        live = [request for request in batch if request.id not in cancelled]
        if not live:
            continue
        try:
            for message in render_batch(engine, live, on_step):
                outbox.put(message)
        finally:
            cancelled.difference_update(request.id for request in live)
