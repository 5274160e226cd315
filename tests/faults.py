"""Worker entry points for tests: the real worker loop (`pipelines.engine.worker.main`) with one fault added.

A test server names one with FLUXD_WORKER_ENTRY, e.g. `tests.faults:by_prompt`. Each runs in the
spawned worker process, so what it patches there stays there; production code carries no fault switch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from multiprocessing.queues import Queue
from typing import Any

from pipelines.contract.messages import Progress, RenderRequest, WorkerConfig
from pipelines.engine import worker

Fault = Callable[[list[RenderRequest], Progress], None]


def _after_step(step: int, fault: Fault) -> None:
    """Every render calls `fault` once a request reported `step`, after the report went out."""
    from pipelines.engine.engine import Engine
    from pipelines.engine.step_reports import StepHook

    render = Engine.render

    def faulty(self: Engine, batch: list[RenderRequest], on_step: StepHook | None = None) -> Any:
        def hook(progress: Progress, pipe: Any) -> bool:
            stop = on_step(progress, pipe) if on_step is not None else False
            if progress.step >= step:
                fault(batch, progress)
            return stop

        return render(self, batch, hook)

    Engine.render = faulty  # type: ignore[method-assign]


def _raise(error: type[BaseException]) -> Fault:
    def fault(_batch: list[RenderRequest], progress: Progress) -> None:
        raise error(f"fault injected after step {progress.step}")

    return fault


def _hang(batch: list[RenderRequest], _progress: Progress) -> None:
    if batch[0].prompt == "hang":
        while True:
            time.sleep(60)


def error_after_step_99(inbox: Queue, outbox: worker.Outbox, control: Queue, config: WorkerConfig) -> None:
    """A job fails with a RuntimeError once it reaches step 99: only a long one, not cancelled early."""
    _after_step(99, _raise(RuntimeError))
    worker.main(inbox, outbox, control, config)


class _Late:
    """An inbox whose batches reach the loop `delay_s` after they arrived, as a large batch (45 MB
    references) still crossing the pipe would: a client can go away in between."""

    def __init__(self, inbox: Queue, delay_s: float) -> None:
        self.inbox = inbox
        self.delay_s = delay_s

    def get(self, timeout: float | None = None) -> Any:
        batch = self.inbox.get(timeout=timeout)
        if batch is not None:
            time.sleep(self.delay_s)
        return batch


_cancelled: list[set[str]] = []  # the worker loop's own set of cancelled request ids, once it started


def _hold(batch: list[RenderRequest], progress: Progress) -> None:
    """Holds a "hold" batch at its first step (its first preview, when it asked for some) until every request
    of it is cancelled: a request that runs until its client goes away, however fast the device."""
    if batch[0].prompt != "hold" or (batch[0].partial_images and progress.preview is None):
        return
    ids = {request.id for request in batch}
    deadline = time.monotonic() + 300  # a bound, so that a test that never cancels does not wedge a worker
    while not ids <= _cancelled[0] and time.monotonic() < deadline:
        time.sleep(0.01)


def _fail(batch: list[RenderRequest], _progress: Progress) -> None:
    if batch[0].prompt == "fail":
        raise RuntimeError("fault injected after step 2")


def _oom(batch: list[RenderRequest], _progress: Progress) -> None:
    if batch[0].prompt == "oom":
        import torch

        raise torch.OutOfMemoryError("fault injected after step 2: out of (pretend) device memory")


def _faults_by_prompt() -> None:
    watch = worker._watch_cancellations

    def keep(control: Queue) -> set[str]:
        _cancelled.append(watch(control))
        return _cancelled[0]

    worker._watch_cancellations = keep  # type: ignore[assignment]
    _after_step(1, _hold)
    _after_step(1, _hang)
    _after_step(2, _fail)
    _after_step(2, _oom)


def by_prompt(inbox: Queue, outbox: worker.Outbox, control: Queue, config: WorkerConfig) -> None:
    """The real loop, with a fault chosen by the batch's prompt, so that one server serves every test that
    needs one: "hold" stops after its first step (its first preview) until its clients go away; "hang" never
    returns from its first step, as a stuck device call would not, while the heartbeat goes on; "fail" raises
    a RuntimeError after step 2 and "oom" runs out of (pretend) device memory there. Other prompts render."""
    _faults_by_prompt()
    worker.main(inbox, outbox, control, config)


def late_by_prompt(inbox: Queue, outbox: worker.Outbox, control: Queue, config: WorkerConfig) -> None:
    """`by_prompt`, and every batch reaches the loop 0.4 s late: longer than the server takes to hear that a
    client went away, so a cancellation can arrive before its batch."""
    _faults_by_prompt()
    worker.main(_Late(inbox, 0.4), outbox, control, config)  # type: ignore[arg-type]
