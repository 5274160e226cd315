"""The worker process loop: owns an Engine, takes batches from its inbox, answers on its outbox.

This module is imported by the HTTP process to name the spawn target, so torch is imported only inside
`main`, which runs in the child.
"""

from __future__ import annotations

import logging
import os
import pkgutil
import queue
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.contract.encoding import Encoder
from pipelines.contract.errors import SERVER_ERROR, FluxdError, ModeUnfit
from pipelines.contract.messages import (
    Failure,
    Heartbeat,
    Progress,
    Ready,
    Rendered,
    RenderRequest,
    WorkerConfig,
)
from pipelines.contract.wire import Message, decode_batch, encode_message

if TYPE_CHECKING:
    from pipelines.engine.engine import Engine

logger = logging.getLogger(__name__)

Send = Callable[[Message], None]


def spawned(inbox: Queue, outbox: Connection, control: Queue, config: WorkerConfig) -> None:
    """The process target: the loop `config.entry` names, `main` unless a test wraps it with a fault."""
    pkgutil.resolve_name(config.entry)(inbox, Outbox(outbox), control, config)


def main(inbox: Queue, outbox: Outbox, control: Queue, config: WorkerConfig) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the server handles it and stops its workers in
    # order, after failing their queued requests cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # First, so that the server hears from this process while it imports torch and loads models. The
    # server's pid comes with the config: a server that died before this line ran would otherwise leave
    # getppid() already pointing at init.
    lifeline = Lifeline(outbox, config.parent_pid or os.getppid(), config.heartbeat_s)
    configure_logging(config.log_level)
    engine = start_engine(config)
    cancelled = _watch_cancellations(control)
    outbox.put(Ready(config.device, engine.loaded(), engine.describe_modes()))
    serve(engine, _batches(inbox), outbox.put, cancelled, lifeline.batch_done)


class Outbox:
    """The write end of the pipe to the server, shared by the loop and the lifeline's thread."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def put(self, message: Message) -> None:
        data = encode_message(message)
        with self._lock:
            self._connection.send_bytes(data)


class Lifeline:
    """A thread that tells the server every `interval_s` that this process runs, with the number of batches
    answered, and ends the process once the server is gone: a worker would otherwise outlive a SIGKILLed
    server, holding its device memory forever."""

    def __init__(self, outbox: Outbox, parent: int, interval_s: float) -> None:
        self.batches = 0
        self._outbox = outbox
        self._parent = parent
        self._interval_s = interval_s
        threading.Thread(target=self._beat, name="fluxd-lifeline", daemon=True).start()

    def batch_done(self) -> None:
        """Called by the loop after a batch's last answer went out, so the count never runs ahead of them."""
        self.batches += 1

    def _beat(self) -> None:
        try:
            while os.getppid() == self._parent:
                self._outbox.put(Heartbeat(self.batches))
                time.sleep(self._interval_s)
        except OSError:  # the server's end of the pipe is closed: the server is gone
            pass
        os._exit(0)


def configure_logging(level: str) -> None:
    """A worker process's (or an engine replica's) log lines, at `level`."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s [worker %(process)d] %(name)s: %(message)s"
    )
    # diffusers' FLUX.2 prompt encoding passes tokenizer options the way transformers now warns about, once
    # per encode: noise in every server log that no fluxd setting can act on.
    logging.getLogger("transformers.processing_utils").addFilter(
        lambda record: "processor_kwargs" not in record.getMessage()
    )


def start_engine(config: WorkerConfig) -> Engine:
    """The device set up, the Engine built, `--preload` models loaded and compiled ones warmed up."""
    import torch

    from pipelines.engine.engine import Engine, SyntheticWeights
    from pipelines.engine.safety import FOLDER as SAFETY_FOLDER
    from pipelines.engine.safety import SafetyChecker

    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device.startswith("cuda"):
        # Libraries that place by "the current device" (bitsandbytes while quantising) follow this worker's.
        torch.cuda.set_device(config.device)
    synthetic = None
    if config.synthetic:
        from pipelines.tools.tiny import write_tiny

        # Tokenizers only set token ids and every prompt is padded to a fixed length: tiny ones give the
        # real shapes.
        tokenizers = Path(tempfile.mkdtemp(prefix="fluxd-tokenizers-"))
        write_tiny(tokenizers)
        synthetic = SyntheticWeights(tokenizers)
    engine = Engine(
        config.specs,
        Path(config.weights_dir),
        config.device,
        config.memory_budget_bytes,
        config.prompt_cache_bytes,
        config.modes,
        synthetic,
        SafetyChecker(Path(config.weights_dir) / SAFETY_FOLDER, config.safety_threshold, config.device),
        lora_cache_bytes=config.lora_cache_bytes,
    )
    for model_id in config.preload:
        try:
            engine.pipeline(config.specs[model_id])
        except ModeUnfit as exc:
            logger.error("not preloading %s: %s", model_id, exc.message)
    engine.warm_up()
    return engine


def _watch_cancellations(control: Queue) -> set[str]:
    """Ids of requests whose clients went away, filled by a thread while the loop renders."""
    cancelled: set[str] = set()

    def watch() -> None:
        while (request_id := control.get()) is not None:
            cancelled.add(request_id)

    threading.Thread(target=watch, daemon=True).start()
    return cancelled


def _batches(inbox: Queue) -> Iterator[list[RenderRequest]]:
    """Batches as they arrive, until the server sends None."""
    while True:
        try:
            batch: bytes | None = inbox.get(timeout=1.0)
        except queue.Empty:
            continue
        if batch is None:
            return
        yield decode_batch(batch)


def serve(
    engine: Engine,
    batches: Iterator[list[RenderRequest]],
    send: Send,
    cancelled: set[str],
    batch_done: Callable[[], None] = lambda: None,
) -> None:
    """Render each batch and send its answers: every request exactly one, a result or a Failure. The server
    counts a worker busy until each request it sent has its answer, so one left unanswered wedges it. Images
    are encoded, and every message sent, by the encoder's thread, in order, while this loop goes on."""
    encoder = Encoder(send)
    try:
        for batch in batches:
            # A client can go away while its batch is still on its way here: its cancellation comes first.
            gone = [request.id for request in batch if request.id in cancelled]
            live = [request for request in batch if request.id not in gone]
            answer = encoder.sender(batch)
            try:
                if gone:
                    answer(Failure(gone, "cancelled", "The client went away before its request started."))
                if live:
                    render(engine, live, answer, cancelled)
            finally:
                cancelled.difference_update(request.id for request in batch)
            encoder.then(batch_done)  # counted once its answers went out
    finally:
        encoder.close()


def render(engine: Engine, batch: list[RenderRequest], send: Send, cancelled: set[str]) -> None:
    """One pipeline call; each request gets its result, or all of them one Failure. Images are sent as the
    engine made them, raw: `send` encodes them (Encoder.sender)."""
    ids = [request.id for request in batch]

    def on_step(progress: Progress, _pipe: Any) -> bool:
        send(progress)
        return progress.id in cancelled

    try:
        results = engine.render(batch, on_step)
    except Exception as exc:
        send(failure(ids, exc))
        return
    send(Rendered(ids))
    for result in results:
        result.loaded = engine.loaded()
        result.device_memory_bytes = engine.device_memory()
        send(result)


def failure(ids: list[str], exc: Exception) -> Failure:
    """What the server is told of a batch that raised `exc`; faults are logged here, with the traceback."""
    import torch

    if isinstance(exc, FluxdError):  # raised on purpose: it names its own code
        return Failure(ids, exc.code, exc.message, exc.param)
    if isinstance(exc, torch.OutOfMemoryError):
        logger.error("out of memory rendering %s", ids, exc_info=exc)
        torch.cuda.empty_cache()
        return Failure(ids, "out_of_memory", "The device ran out of memory for this request.")
    logger.error("rendering %s failed", ids, exc_info=exc)
    return Failure(ids, "server_error", SERVER_ERROR)
