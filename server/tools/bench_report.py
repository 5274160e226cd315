"""The pure half of `fluxd bench serve`: percentiles, tallies, verdicts and the markdown report."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

OVERHEAD_BODY: dict[str, Any] = {
    "model": "flux.2-dev",
    "prompt": "a red fox in the snow, golden hour, 35mm",
    "size": "256x256",
    "num_inference_steps": 28,
    "response_format": "b64_json",
    "seed": 7,
}
SOAK_MODELS = ("flux.2-dev", "flux.2-dev-turbo", "flux.1-dev", "flux.1-kontext-dev", "flux1.1-pro")
SOAK_SIZES = ("64x64", "128x96", "256x256")


OVERHEAD_TARGET = 1.10
BATCHING_TARGET = 1.5


RSS_GROWTH_TARGET = 0.10


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated linearly between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0-100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def parse_vm_rss(status: str) -> int:
    """Bytes of resident memory from the text of /proc/<pid>/status."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit.lower() != "kb":
                raise ValueError(f"unexpected VmRSS unit {unit!r}")
            return int(value) * 1024
    raise ValueError("no VmRSS line: the process is gone or is a kernel thread")


def cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


@dataclass(frozen=True)
class Outcome:
    """One request: its HTTP status, or None with an error when no usable answer came (or it was not sent)."""

    status: int | None
    seconds: float
    images: int = 0
    error: str | None = None
    sent: bool = True


@dataclass(frozen=True)
class Tally:
    ok: int
    lost: int
    server_errors: int
    client_errors: int
    not_sent: int
    images: int


def tally(outcomes: Sequence[Outcome]) -> Tally:
    return Tally(
        ok=sum(o.status == 200 for o in outcomes),
        lost=sum(o.sent and o.status is None for o in outcomes),
        server_errors=sum(o.status is not None and o.status >= 500 for o in outcomes),
        client_errors=sum(o.status is not None and 300 <= o.status < 500 for o in outcomes),
        not_sent=sum(not o.sent for o in outcomes),
        images=sum(o.images for o in outcomes),
    )


@dataclass(frozen=True)
class Throughput:
    requests: int
    images: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Soak:
    requests: int
    concurrency: int
    counts: Tally
    mark: int  # the request count at which the baseline RSS was read
    rss_mark: int
    rss_end: int
    worker_rss_mark: int
    worker_rss_end: int


@dataclass(frozen=True)
class LoraCost:
    """In-process, on the tiny checkpoints: a user LoRA's first load, and renders that alternate between the
    base alone and the base with that (cached) LoRA, so every render switches adapters."""

    lora: str
    load_ms: float
    base_ms: list[float]
    lora_ms: list[float]


@dataclass(frozen=True)
class Measured:
    http_ms: list[float]
    direct_ms: list[float]
    max_batch_images: int
    concurrency: int
    batched: Throughput
    unbatched: Throughput
    soak: Soak
    lora: LoraCost | None = None


@dataclass(frozen=True)
class Row:
    metric: str
    value: str
    target: str
    passed: bool | None  # None: reported for information, no target

    @property
    def verdict(self) -> str:
        return "info" if self.passed is None else "pass" if self.passed else "FAIL"


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("inf")


def growth(before: int, after: int) -> float:
    return ratio(after - before, before)


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def table_rows(m: Measured) -> list[Row]:
    """Every figure of the run with its target and verdict."""
    http_p50, direct_p50 = percentile(m.http_ms, 50), percentile(m.direct_ms, 50)
    overhead = ratio(http_p50, direct_p50)
    speedup = ratio(m.batched.per_second, m.unbatched.per_second)
    soak, counts = m.soak, m.soak.counts
    rss_growth = growth(soak.rss_mark, soak.rss_end)
    sides = [int(side) for size in SOAK_SIZES for side in size.split("x")]
    shape = (
        f"{OVERHEAD_BODY['model']} {OVERHEAD_BODY['size']}, {OVERHEAD_BODY['num_inference_steps']} steps, "
        f"{OVERHEAD_BODY['response_format']} png"
    )
    return [
        Row(
            f"overhead: HTTP p50 / direct Engine.render p50 ({shape}, concurrency 1, {len(m.http_ms)} each)",
            f"{overhead:.3f} ({http_p50:.0f} ms / {direct_p50:.0f} ms)",
            f"<= {OVERHEAD_TARGET:.2f}",
            overhead <= OVERHEAD_TARGET,
        ),
        Row(
            f"batching: images/s at concurrency {m.concurrency}, --max-batch-images {m.max_batch_images} / 1 "
            f"({shape}, {m.batched.requests} requests each)",
            f"{speedup:.2f} ({m.batched.per_second:.2f} / {m.unbatched.per_second:.2f} img/s)",
            f">= {BATCHING_TARGET:g}",
            speedup >= BATCHING_TARGET,
        ),
        Row(
            f"soak: requests answered 200 ({soak.requests} at concurrency {soak.concurrency}, "
            f"{len(SOAK_MODELS)} models, {min(sides)}-{max(sides)} px)",
            f"{counts.ok}/{soak.requests} ({counts.images} images, {counts.client_errors} 4xx, "
            f"{counts.not_sent} not sent)",
            f"{soak.requests}/{soak.requests}",
            counts.ok == soak.requests,
        ),
        Row("soak: lost (no answer)", str(counts.lost), "0", counts.lost == 0),
        Row("soak: 5xx", str(counts.server_errors), "0", counts.server_errors == 0),
        Row(
            f"soak: HTTP process RSS, request {soak.mark} -> {soak.requests}",
            f"{_mb(soak.rss_mark)} -> {_mb(soak.rss_end)} ({rss_growth:+.1%})",
            f"< {RSS_GROWTH_TARGET:+.0%}",
            rss_growth < RSS_GROWTH_TARGET,
        ),
        Row(
            f"soak: worker process RSS, request {soak.mark} -> {soak.requests}",
            f"{_mb(soak.worker_rss_mark)} -> {_mb(soak.worker_rss_end)} "
            f"({growth(soak.worker_rss_mark, soak.worker_rss_end):+.1%})",
            "-",
            None,
        ),
        *(lora_rows(m.lora) if m.lora is not None else []),
    ]


def lora_rows(cost: LoraCost) -> list[Row]:
    base_p50, lora_p50 = percentile(cost.base_ms, 50), percentile(cost.lora_ms, 50)
    shape = f"{OVERHEAD_BODY['model']} {OVERHEAD_BODY['size']}, {OVERHEAD_BODY['num_inference_steps']} steps"
    return [
        Row(f"LoRA: first load of {cost.lora} (tiny, in-process)", f"{cost.load_ms:.0f} ms", "-", None),
        Row(
            f"LoRA: render p50 with {cost.lora} switched on / without ({shape}, alternating, "
            f"{len(cost.lora_ms)} each, in-process)",
            f"{ratio(lora_p50, base_p50):.3f} ({lora_p50:.0f} ms / {base_p50:.0f} ms)",
            "-",
            None,
        ),
    ]


def format_report(rows: Sequence[Row], machine: str, date: str) -> str:
    lines = [
        f"fluxd bench serve, {date}: {machine}",
        "",
        "| metric | value | target | result |",
        "|---|---|---|---|",
        *(f"| {r.metric} | {r.value} | {r.target} | {r.verdict} |" for r in rows),
    ]
    return "\n".join(lines)


# The overhead request, and the batching mix's shape: fixed, small, and a real step count.
PROMPTS = (
    "a red fox in the snow, golden hour, 35mm",
    "a lighthouse on a cliff at night with a starry sky",
    "a photo of a cat wearing a hat",
    "turn the sky purple and add a moon",
)


def batching_bodies(count: int) -> list[dict[str, Any]]:
    """The batching mix: the overhead request's shape with varied prompts and seeds."""
    return [{**OVERHEAD_BODY, "prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(count)]
