"""The pipeline's step-end callback for a batch: a Progress per request after each step, a preview decoded
from the latents where one is due (a masked batch's showing the composite), and Cancelled once no request of
the batch is wanted any more."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipelines.contract.encoding import RAW_RGB
from pipelines.contract.errors import Cancelled
from pipelines.contract.messages import Progress, RenderedImage, RenderRequest
from pipelines.engine.families import Family
from pipelines.engine.inpaint import Masked

logger = logging.getLogger(__name__)

StepHook = Callable[[Progress, Any], bool]
"""Called after every denoising step per request; True means that request no longer wants its images."""


def preview_steps(total: int, count: int) -> set[int]:
    """The (1-based) steps after which a request asking for `count` partial images gets one: evenly spaced,
    never the last step, whose image is the final one; fewer than `count` when the steps are too few.

    A preview is the pipeline's own VAE decode of the step's latents; tests/integration/test_previews.py
    prints both measures. At 1024x1024, counted on the published architectures, one decode is 10.5 TFLOP:
    0.14 of a 74 TFLOP FLUX.1 step (3 previews add ~1.5% to 28 steps) and 0.04 of a 283 TFLOP FLUX.2 step
    (~0.4% to 28 steps, ~1.4% to Turbo's 8). On the tiny checkpoints, whose transformer is nearly free, a
    256x256 preview takes ~40 ms of CPU against ~10 ms per step: 3-4.5 steps.
    """
    return {round(total * (j + 1) / (count + 1)) for j in range(count)} - {0, total}


def to_uint8(images: np.ndarray) -> np.ndarray:
    """diffusers' own float->uint8 rounding, so pixels equal what its PIL output would hold."""
    return (images * 255).round().clip(0, 255).astype(np.uint8)


class StepReports:
    """The pipeline's step-end callback: after each step a Progress per request, carrying a preview where
    one is due. Raises Cancelled when no request of the batch is wanted any more."""

    def __init__(
        self, batch: list[RenderRequest], family: Family, on_step: StepHook | None, masked: Masked | None
    ) -> None:
        self.batch = batch
        self.masked = masked  # a masked batch's previews show the composite, as its images will
        self.family = family
        self.on_step = on_step
        self.total = batch[0].steps
        # The batch row of each request's first image: the one a preview shows (streaming asks for n=1).
        firsts = np.cumsum([0] + [request.n for request in batch])[:-1]
        self.rows = {request.id: int(row) for request, row in zip(batch, firsts, strict=True)}
        self.preview_at = {request.id: preview_steps(self.total, request.partial_images) for request in batch}
        self.preview_ms = 0.0

    def __call__(self, pipeline: Any, step: int, _timestep: Any, tensors: dict) -> dict:
        if self.on_step is None:
            return {}
        done = step + 1
        previews = self._previews(pipeline, done, tensors["latents"])
        stops = [
            self.on_step(Progress(rid, done, self.total, previews.get(rid)), pipeline) for rid in self.rows
        ]
        # A batch stops early only when every request in it was cancelled; mates keep running. Raising
        # (rather than diffusers' `_interrupt`, which still decodes the latents) frees the worker now.
        if all(stops):
            logger.info("stopping %s after step %d of %d: cancelled", list(self.rows), done, self.total)
            raise Cancelled(list(self.rows))
        return {}

    def _previews(self, pipeline: Any, done: int, latents: torch.Tensor) -> dict[str, RenderedImage]:
        wanted = [request for request in self.batch if done in self.preview_at[request.id]]
        if not wanted:
            return {}
        started = time.perf_counter()
        width, height = self.batch[0].width, self.batch[0].height
        rows = [self.rows[request.id] for request in wanted]
        pixels = to_uint8(self.family.preview(pipeline, latents[rows], width, height))
        pixels = pixels if self.masked is None else self.masked.composite(pixels, rows)
        self.preview_ms += (time.perf_counter() - started) * 1000
        return {
            request.id: RenderedImage(image.tobytes(), RAW_RGB, width, height, request.seeds[0])
            for request, image in zip(wanted, pixels, strict=True)
        }
