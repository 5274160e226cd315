"""What a masked edit costs against a plain one, in one run on the CPU; `fluxd bench accel` prints it.

Per model, one edit of the same image with the same seed, plain and with a mask (half the image), each
through Engine.render as a worker runs it, on the tiny checkpoints; the wall time of the whole render
(median of --repeats, plain and masked alternating, each going first in every other round, so that
both see the same background load). FLUX.1 [dev] edits only with a mask, so its plain row is a text-to-image
render of the same size. The masked render adds
the original's VAE encode, the per-step blend (FLUX.2) or the inpaint pipeline's own work (FLUX.1, Kontext),
and the composite; on the tiny checkpoints, whose transformer is nearly free, those weigh far more against a
step than on a full-size model. The table's ratio is masked over plain.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    model: str
    plain_ms: float
    masked_ms: float

    @property
    def ratio(self) -> float:
        return self.masked_ms / self.plain_ms


def format_table(rows: Sequence[Row], size: str) -> str:
    lines = [
        f"masked edits (half the image masked, strength 1) against plain ones, images of {size}:",
        "",
        "| model | plain ms (median) | masked ms (median) | masked / plain |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {row.model} | {row.plain_ms:.0f} | {row.masked_ms:.0f} | {row.ratio:.2f}x |" for row in rows
    ]
    return "\n".join(lines) + "\n"


def _inputs(size: tuple[int, int]) -> tuple[bytes, bytes]:
    """A picture and OpenAI's mask of it: its left half transparent, to be edited."""
    from PIL import Image

    width, height = size
    picture, mask = io.BytesIO(), io.BytesIO()
    Image.linear_gradient("L").resize(size).convert("RGB").save(picture, "PNG")
    alpha = Image.new("RGBA", size, (0, 0, 0, 255))
    alpha.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    alpha.save(mask, "PNG")
    return picture.getvalue(), mask.getvalue()


def measure(
    weights: Path, models: Sequence[str], size: tuple[int, int], steps: int, repeats: int
) -> list[Row]:
    from pipelines.contract.specs import SPECS
    from pipelines.engine.engine import Engine
    from pipelines.tools.bench_accel import bench_request

    engine = Engine(SPECS, weights)
    picture, mask = _inputs(size)
    rows: list[Row] = []
    for model in models:
        spec = SPECS[model]
        plain_images = [picture] if "edit" in spec.modes else []
        times: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(repeats + 1):  # the first round warms up (loads, from_pipe) and is dropped
            for masked in (False, True) if repeat % 2 else (True, False):  # neither always goes first
                request = bench_request(
                    f"{model}-{masked}-{repeat}",
                    model,
                    size,
                    steps,
                    repeat,
                    images=[picture] if masked else plain_images,
                    mask=mask if masked else None,
                    strength=1.0 if masked else None,
                )
                started = time.perf_counter()
                engine.render([request])
                if repeat:
                    times[masked].append((time.perf_counter() - started) * 1000)
        rows.append(Row(model, statistics.median(times[False]), statistics.median(times[True])))
    return rows
