"""The worker process loop: owns an Engine, takes batches from its inbox, answers on its outbox.

This module is imported by the HTTP process to name the spawn target, so torch is imported only inside
`main`, which runs in the child.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import tempfile
import threading
import time
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

from pipelines.errors import Cancelled, InvalidParameter, ModeUnfit, WeightsMissing
from pipelines.jobs import Failure, Progress, Ready, RenderRequest, WorkerConfig

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
    # diffusers' FLUX.2 prompt encoding passes tokenizer options the way transformers now warns about, once
    # per encode: noise in every server log that no fluxd setting can act on.
    logging.getLogger("transformers.processing_utils").addFilter(
        lambda record: "processor_kwargs" not in record.getMessage()
    )
    import torch

    from pipelines.arguments import passthrough_signatures
    from pipelines.engine import Engine, SyntheticWeights

    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device.startswith("cuda"):
        # Libraries that place by "the current device" (bitsandbytes while quantising) follow this worker's.
        torch.cuda.set_device(config.device)
    synthetic = None
    if config.synthetic:
        from pipelines.tiny import write_tiny

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
        config.lora_cache_bytes,
    )
    for model_id in config.preload:
        try:
            engine.pipeline(config.specs[model_id])
        except ModeUnfit as exc:
            logger.error("not preloading %s: %s", model_id, exc.message)
    engine.warm_up()
    cancelled: set[str] = set()
    threading.Thread(target=_watch_cancellations, args=(control, cancelled), daemon=True).start()
    signatures = passthrough_signatures(config.specs)
    outbox.put(Ready(config.device, signatures, engine.loaded(), engine.describe_modes()))

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
        ids = [request.id for request in live]
        try:
            for result in engine.render(live, on_step):
                result.loaded = engine.loaded()
                result.device_memory_bytes = engine.device_memory()
                outbox.put(result)
        except Cancelled:
            outbox.put(Failure(ids, "cancelled", "Every client of this batch went away."))
        except InvalidParameter as exc:
            outbox.put(Failure(ids, "invalid", exc.message, exc.param, exc.code))
        except (WeightsMissing, ModeUnfit) as exc:
            outbox.put(Failure(ids, "unavailable", exc.message, "model", "model_unavailable"))
        except torch.OutOfMemoryError:
            logger.exception("out of memory rendering %s", ids)
            torch.cuda.empty_cache()
            outbox.put(Failure(ids, "out_of_memory", "The device ran out of memory for this request."))
        except Exception:
            logger.exception("rendering %s failed", ids)
            outbox.put(Failure(ids, "internal", "The server failed to render the image."))
        finally:
            cancelled.difference_update(ids)
