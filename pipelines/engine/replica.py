"""FluxdEngine, the Ray Serve replica of the engine: the Engine of a local worker on the replica's device,
built and run by the same functions (`start_engine` and `render` of pipelines/engine/worker.py), its batch's
messages streamed back in the wire format (pipelines/contract/wire.py). server/dispatch/ray_app.py deploys it.
Torch is imported when a replica starts, not when this module is imported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from ray import serve

from pipelines.contract.messages import Assigned, Failure, Progress, Ready, RenderResult, WorkerConfig
from pipelines.contract.presence import adapter_present, checkpoint_present
from pipelines.contract.wire import Message, decode_batch, encode_message

logger = logging.getLogger(__name__)


class NodeWithoutWeights(RuntimeError):
    """An engine replica's node lacks weights the application serves."""


def missing_weights(config: WorkerConfig) -> list[str]:
    """The served models whose checkpoint or adapter is neither in the weights folder nor the HF cache."""
    weights = Path(config.weights_dir)
    return [
        model_id
        for model_id, spec in config.specs.items()
        if not (checkpoint_present(spec, weights) and adapter_present(spec, weights))
    ]


class FluxdEngine:
    """An Engine on the replica's device; `run` streams a batch's messages as a worker's outbox would."""

    def __init__(self, config: WorkerConfig) -> None:
        from pipelines.engine.worker import configure_logging

        configure_logging(config.log_level)
        node = ray.get_runtime_context().get_node_id()
        missing = missing_weights(config)
        if missing:
            # Raised before anything loads, so the deployment fails at once, with this line as its reason.
            where = f"node {ray.util.get_node_ip_address()} ({node[:12]})"
            raise NodeWithoutWeights(
                f"{where} has no weights for {', '.join(missing)} in {config.weights_dir} nor in its Hugging "
                f"Face cache: copy them there, or run `fluxd weights pull MODEL --dir {config.weights_dir}` "
                "on that node"
            )
        from pipelines.engine.worker import start_engine

        self.engine = start_engine(config)
        self.ready = Ready(config.device, self.engine.loaded(), self.engine.describe_modes())
        replica = serve.get_replica_context().replica_id.unique_id
        self.assigned = Assigned(replica, node, os.getpid())
        # The engine is not thread-safe: batches run one after another on this one thread.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="fluxd-engine")
        logger.info("engine replica %s ready on node %s (%s)", replica, node, config.device)

    def describe(self) -> bytes:
        return encode_message(dataclasses.replace(self.ready, loaded=self.engine.loaded()))

    async def run(self, data: bytes) -> AsyncIterator[bytes]:
        """The messages of one batch (pipelines.contract.wire), as the worker process would send them."""
        from pipelines.contract.encoding import Encoder
        from pipelines.engine.worker import render as render_batch

        batch = decode_batch(data)
        loop = asyncio.get_running_loop()
        messages: asyncio.Queue[Progress | RenderResult | Failure | None] = asyncio.Queue()
        cancelled: set[str] = set()

        def send(message: Message) -> None:
            # Not Rendered: a lane waits for its call's results; this replica's engine thread is free already.
            if isinstance(message, Progress | RenderResult | Failure):
                loop.call_soon_threadsafe(messages.put_nowait, message)

        # The images encode on a thread of this call's own: the engine's thread is free for the next batch.
        encoder = Encoder(send)

        def render() -> None:
            try:
                render_batch(self.engine, batch, encoder.sender(batch), cancelled)
            finally:
                encoder.then(lambda: loop.call_soon_threadsafe(messages.put_nowait, None))
                encoder.close(wait=False)

        done = loop.run_in_executor(self.executor, render)
        yield encode_message(self.assigned)
        try:
            while (message := await messages.get()) is not None:
                yield encode_message(message)
        except asyncio.CancelledError:
            # The front cancelled the call: every client of the batch went away. The engine stops at the
            # next step; a batch sent meanwhile waits for the executor's one thread.
            cancelled.update(request.id for request in batch)
            raise
        await done
