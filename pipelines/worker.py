"""The worker process loop: owns an Engine, takes batches from its inbox, answers on its outbox.

This module is imported by the HTTP process to name the spawn target, so torch is imported only inside
`main`, which runs in the child.
"""

from __future__ import annotations

import logging
import queue
import threading
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

from pipelines.errors import InvalidParameter, WeightsMissing
from pipelines.jobs import Failure, Progress, Ready, RenderRequest, WorkerConfig

logger = logging.getLogger(__name__)


def _watch_cancellations(control: Queue, cancelled: set[str]) -> None:
    while True:
        request_id = control.get()
        if request_id is None:
            return
        cancelled.add(request_id)


def main(inbox: Queue, outbox: Queue, control: Queue, config: WorkerConfig) -> None:
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s [worker %(process)d] %(name)s: %(message)s"
    )
    import torch

    from pipelines.engine import Engine, passthrough_signatures

    if config.threads:
        torch.set_num_threads(config.threads)
    engine = Engine(config.specs, Path(config.weights_dir), config.device)
    for model_id in config.preload:
        engine.pipeline(config.specs[model_id])
    cancelled: set[str] = set()
    threading.Thread(target=_watch_cancellations, args=(control, cancelled), daemon=True).start()
    outbox.put(Ready(config.device, passthrough_signatures(config.specs), engine.loaded()))

    def on_step(progress: Progress, _pipe: Any) -> bool:
        outbox.put(progress)
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
                outbox.put(result)
        except InvalidParameter as exc:
            outbox.put(Failure(ids, "invalid", exc.message, exc.param, exc.code))
        except WeightsMissing as exc:
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
