"""An Engine serving batches, for whatever hosts it: the local worker process (pipelines/worker.py) or a
Ray Serve replica (server/ray_app.py). Both build the engine and turn a batch into answer messages here, so a
batch runs and fails the same way wherever it runs.

Imports torch: import it only where the engine lives, never in the HTTP process.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from pipelines.arguments import passthrough_signatures
from pipelines.engine import Engine, StepHook, SyntheticWeights
from pipelines.errors import Cancelled, InvalidParameter, ModeUnfit, WeightsMissing
from pipelines.jobs import Failure, Ready, RenderRequest, RenderResult, WorkerConfig

logger = logging.getLogger(__name__)


def open_engine(config: WorkerConfig) -> Engine:
    """The engine of one device, with its preloaded models loaded and its compiled graphs warmed up."""
    # diffusers' FLUX.2 prompt encoding passes tokenizer options the way transformers now warns about, once
    # per encode: noise in every server log that no fluxd setting can act on.
    logging.getLogger("transformers.processing_utils").addFilter(
        lambda record: "processor_kwargs" not in record.getMessage()
    )
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
    )
    for model_id in config.preload:
        try:
            engine.pipeline(config.specs[model_id])
        except ModeUnfit as exc:
            logger.error("not preloading %s: %s", model_id, exc.message)
    engine.warm_up()
    return engine


def ready_message(engine: Engine, config: WorkerConfig) -> Ready:
    """What the front learns once the engine is up: its device, pass-through arguments, models and modes."""
    signatures = passthrough_signatures(config.specs)
    return Ready(config.device, signatures, engine.loaded(), engine.describe_modes())


def render_batch(
    engine: Engine, batch: list[RenderRequest], on_step: StepHook
) -> Iterator[RenderResult | Failure]:
    """A RenderResult per request, or one Failure for the batch, whose kind decides the HTTP status."""
    ids = [request.id for request in batch]
    try:
        for result in engine.render(batch, on_step):
            result.loaded = engine.loaded()
            result.device_memory_bytes = engine.device_memory()
            yield result
    except Cancelled:
        yield Failure(ids, "cancelled", "Every client of this batch went away.")
    except InvalidParameter as exc:
        yield Failure(ids, "invalid", exc.message, exc.param, exc.code)
    except (WeightsMissing, ModeUnfit) as exc:
        yield Failure(ids, "unavailable", exc.message, "model", "model_unavailable")
    except torch.OutOfMemoryError:
        logger.exception("out of memory rendering %s", ids)
        torch.cuda.empty_cache()
        yield Failure(ids, "out_of_memory", "The device ran out of memory for this request.")
    except Exception:
        logger.exception("rendering %s failed", ids)
        yield Failure(ids, "internal", "The server failed to render the image.")
