"""`fluxd bench accel`: what each `acceleration` level saves, measured in one run on the CPU.

Per model and level, one render through Engine.render as a worker runs it (28 steps by default) on the tiny
checkpoints (pipelines/tools/tiny.py: one double and one single block, every other size tiny too): the
transformer's full evaluations, counted by forward hooks on its blocks, and the pipeline call's wall time
(median of --repeats, the levels alternating so that all see the same background load), each against
"none". On the tiny checkpoints the transformer is a small part of a call (text encoders and VAE weigh as
much), so the wall-time ratio understates what the same evaluation ratio saves on a full-size model, where
the transformer is nearly all of it. It prints one markdown table and exits 1 when a level misses its
target (regular at least 1.5x, high at least 2x fewer evaluations).

It also times a masked edit against a plain one (pipelines/tools/bench_mask.py), and the safety checker:
Falconsai/nsfw_image_detection's architecture (ViT-base at 224 px, from transformers' ViTConfig defaults,
the checkpoint's own) with random weights, whose cost does not depend on the weights' values, on batches of
the rendered size.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.contract.messages import RenderRequest

LEVELS = ("none", "regular", "high")
TARGETS = {"regular": 1.5, "high": 2.0}
MODELS = ("flux.2-dev", "flux.1-kontext-dev", "flux.1-dev")


@dataclass(frozen=True)
class Row:
    model: str
    level: str
    evaluations: float
    run_ms: float

    def fewer(self, none: Row) -> float:
        return none.evaluations / self.evaluations

    def faster(self, none: Row) -> float:
        return none.run_ms / self.run_ms


def missed(rows: Sequence[Row]) -> list[str]:
    """The levels that miss their target, as 'model level'."""
    nones = {row.model: row for row in rows if row.level == "none"}
    return [
        f"{row.model} {row.level}"
        for row in rows
        if row.level in TARGETS and row.fewer(nones[row.model]) < TARGETS[row.level]
    ]


def format_table(rows: Sequence[Row], steps: int, size: str, machine: str, date: str) -> str:
    nones = {row.model: row for row in rows if row.level == "none"}
    lines = [
        f"`fluxd bench accel`, {date}, {machine}: tiny checkpoints, {size}, {steps} steps, one image",
        "",
        "| model | acceleration | full transformer evaluations | fewer than none | run ms (median) "
        "| faster than none |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        none = nones[row.model]
        lines.append(
            f"| {row.model} | {row.level} | {row.evaluations:g} | {row.fewer(none):.2f}x | {row.run_ms:.0f} "
            f"| {row.faster(none):.2f}x |"
        )
    return "\n".join(lines) + "\n"


def format_safety(rows: Sequence[tuple[int, float]], size: str) -> str:
    lines = [
        f"safety checker (ViT-base, 224 px input, random weights), images of {size}:",
        "",
        "| images per batch | ms per batch (median) | ms per image |",
        "|---|---|---|",
    ]
    lines += [f"| {images} | {ms:.0f} | {ms / images:.0f} |" for images, ms in rows]
    return "\n".join(lines) + "\n"


def measure_safety(
    scratch: Path, size: tuple[int, int], repeats: int, batches: Sequence[int] = (1, 4)
) -> list[tuple[int, float]]:
    """Median ms of one checker pass over batches of `batches` images."""
    import time

    import numpy as np
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from pipelines.engine.safety import SafetyChecker

    folder = scratch / "safety-checker-base"
    labels = {0: "normal", 1: "nsfw"}
    config = ViTConfig(id2label=labels, label2id={label: index for index, label in labels.items()})
    ViTForImageClassification(config).save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor().save_pretrained(folder)
    checker = SafetyChecker(folder)
    noise = np.random.default_rng(0).integers(0, 256, (max(batches), size[1], size[0], 3), dtype=np.uint8)
    checker.flags([noise[0]])  # loads the model and warms up
    rows = []
    for images in batches:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            checker.flags(list(noise[:images]))
            times.append((time.perf_counter() - started) * 1000)
        rows.append((images, statistics.median(times)))
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxd bench accel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="model ids")
    parser.add_argument("--size", default="256x256", help="WxH")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=2, help="timed renders per level (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--weights", type=Path, default=None, help="tiny checkpoints; default: written anew")
    return parser


def bench_request(
    request_id: str, model: str, size: tuple[int, int], steps: int, seed: int, **fields: Any
) -> RenderRequest:
    """One image of `model` at `size` with its default guidance, as the benches render it."""
    from pipelines.contract.messages import RenderRequest
    from pipelines.contract.specs import SPECS

    return RenderRequest(
        id=request_id,
        model=model,
        prompt="a red fox in the snow",
        width=size[0],
        height=size[1],
        steps=steps,
        guidance=SPECS[model].default_guidance,
        seeds=[seed],
        **fields,
    )


def measure(
    weights: Path, models: Sequence[str], size: tuple[int, int], steps: int, repeats: int
) -> list[Row]:
    from pipelines.contract.specs import SPECS
    from pipelines.engine.acceleration import counting
    from pipelines.engine.engine import Engine

    engine = Engine(SPECS, weights)
    rows: list[Row] = []
    for model in models:
        spec = SPECS[model]
        transformer = engine.pipeline(spec).transformer
        evaluations: dict[str, float] = {}
        run_ms: dict[str, list[float]] = {level: [] for level in LEVELS}
        for repeat in range(repeats + 1):  # the first round warms up (allocator, lazy imports) and is dropped
            for level in LEVELS:
                request = bench_request(
                    f"{model}-{level}-{repeat}", model, size, steps, repeat, acceleration=level
                )
                with counting(transformer) as counter:
                    [result] = engine.render([request])
                evaluations[level] = counter.evaluations
                if repeat:
                    run_ms[level].append(result.timings_ms["run"])
        rows += [Row(model, level, evaluations[level], statistics.median(run_ms[level])) for level in LEVELS]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from pipelines.tools import bench_mask
    from pipelines.tools.tiny import write_tiny
    from server.tools.bench_report import cpu_model

    torch.set_num_threads(args.threads)
    width, height = (int(side) for side in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as scratch:
        weights = args.weights
        if weights is None:
            weights = Path(scratch)
            write_tiny(weights)
        try:
            rows = measure(weights, args.models, (width, height), args.steps, args.repeats)
            safety = measure_safety(Path(scratch), (width, height), max(3, args.repeats))
            masks = bench_mask.measure(weights, args.models, (width, height), args.steps, args.repeats)
        except Exception as exc:  # the run itself failed: say so and exit 2
            print(f"fluxd bench accel: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    machine = (
        f"{cpu_model(cpuinfo)}, {args.threads} torch threads, torch {torch.__version__}, {platform.system()}"
    )
    date = datetime.date.today().isoformat()
    print(format_table(rows, args.steps, f"{width}x{height}", machine, date))
    print(format_safety(safety, f"{width}x{height}"))
    print(bench_mask.format_table(masks, f"{width}x{height}"))
    failures = missed(rows)
    for failure in failures:
        print(f"missed its target: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
