"""A worker loop that answers every batch at once with one prepared picture, encoded beforehand in each
format: `fluxd bench front` measures the HTTP front alone behind it. Torch-free, reads no weights; named by
`--worker-entry pipelines.tools.instant:main`."""

from __future__ import annotations

import os
import signal
from functools import cache
from multiprocessing.queues import Queue

from PIL import Image, ImageChops, ImageFilter

from pipelines.contract.encoding import CONTENT_TYPES, encode
from pipelines.contract.messages import (
    Failure,
    Ready,
    RenderedImage,
    RenderRequest,
    RenderResult,
    WorkerConfig,
)
from pipelines.engine.worker import Lifeline, Outbox, _batches


@cache
def sample_picture(width: int, height: int) -> Image.Image:
    """A deterministic picture that compresses like a render (smooth regions, edges, fine grain: 1.4 MB as a
    level-6 PNG at 1024x1024, where a flat one would be a few kB and flatter every encoder's figures)."""
    size = (width, height)
    fractal = Image.effect_mandelbrot(size, (-2.2, -1.3, 0.8, 1.3), 60).filter(ImageFilter.GaussianBlur(1))
    grain = Image.effect_noise(size, 24)
    blotches = grain.filter(ImageFilter.GaussianBlur(3))
    return Image.merge(
        "RGB",
        (
            ImageChops.add(fractal, blotches, 2, -40),
            ImageChops.add(Image.linear_gradient("L").resize(size), grain, 2, -64),
            ImageChops.add(Image.radial_gradient("L").resize(size), blotches, 2, -60),
        ),
    )


@cache
def prepared(width: int, height: int, fmt: str, compression: int | None) -> bytes:
    """The picture encoded once per format, as a worker would send it: the bench measures the front alone."""
    return encode(sample_picture(width, height).tobytes(), width, height, fmt, compression)


def answer(request: RenderRequest) -> RenderResult:
    w, h = request.width, request.height
    data = prepared(w, h, request.output_format, request.output_compression)
    content_type = CONTENT_TYPES[request.output_format]
    images = [RenderedImage(data, content_type, w, h, seed) for seed in request.seeds]
    return RenderResult(request.id, images, timings_ms={"batch_images": request.n})


def main(inbox: Queue, outbox: Outbox, control: Queue, config: WorkerConfig) -> None:
    # The server stops its workers itself, as for pipelines.engine.worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lifeline = Lifeline(outbox, config.parent_pid or os.getppid(), config.heartbeat_s)
    outbox.put(Ready(config.device, [], {}))
    for batch in _batches(inbox):
        for request in batch:
            try:
                outbox.put(answer(request))
            except Exception as exc:  # every request gets its answer, as in pipelines.engine.worker
                outbox.put(Failure([request.id], "server_error", f"instant engine: {exc}"))
        lifeline.batch_done()
