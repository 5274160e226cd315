"""What crosses the process boundary between the HTTP front and a worker. Pure Python: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines.loras import DEFAULT_CACHE_MB, LoraChoice


@dataclass
class RenderRequest:
    """One client request, fully resolved: every default applied, every value validated."""

    id: str
    model: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seeds: list[int]
    images: list[bytes] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    enhance_prompt: bool = False
    enhance_temperature: float = 0.15
    partial_images: int = 0
    loras: list[LoraChoice] = field(default_factory=list)  # on top of the model's own adapter (Turbo)

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass
class RenderedImage:
    """Raw RGB pixels (height x width x 3, uint8) and the seed that made them."""

    pixels: bytes
    width: int
    height: int
    seed: int


@dataclass
class RenderResult:
    id: str
    images: list[RenderedImage]
    revised_prompt: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    loaded: list[str] = field(default_factory=list)  # checkpoints the worker holds after this job
    device_memory_bytes: int = 0  # accelerator memory the worker holds after this job


@dataclass
class Progress:
    """A step report from a running job; `preview` carries a partial image when one was asked for."""

    id: str
    step: int
    total: int
    preview: RenderedImage | None = None


FailureKind = Literal["invalid", "unavailable", "out_of_memory", "internal", "cancelled"]


@dataclass
class Failure:
    """A batch that could not be rendered; `kind` decides the HTTP status on the other side."""

    ids: list[str]
    kind: FailureKind
    message: str
    param: str | None = None
    code: str | None = None


@dataclass
class Ready:
    """Sent once by a worker after start-up: what it runs on and which call arguments pass through."""

    device: str
    signatures: dict[str, dict[str, str]]
    loaded: list[str]
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)  # per checkpoint, as resolved on `device`


@dataclass
class WorkerConfig:
    weights_dir: str
    device: str = "cpu"
    preload: list[str] = field(default_factory=list)
    threads: int | None = None
    memory_budget_bytes: int | None = None
    prompt_cache_bytes: int = 0
    lora_cache_bytes: int = DEFAULT_CACHE_MB * 2**20
    modes: dict[str, str] = field(default_factory=dict)  # requested mode per checkpoint; others are auto
    synthetic: bool = False  # full-size random weights from the published configs instead of checkpoints
    parent_pid: int | None = None  # the server; the worker exits when it is gone
    log_level: str = "INFO"
    specs: dict[str, Any] = field(default_factory=dict)  # ModelSpec per id, as the front resolved them
