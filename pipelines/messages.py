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
    acceleration: str = "none"  # step caching level (pipelines.acceleration); batches never mix levels
    safety_check: bool = False  # run the safety checker on this request's images (pipelines.safety)
    loras: list[LoraChoice] = field(default_factory=list)  # on top of the model's own adapter (Turbo)
    mask: bytes | None = None  # as sent (pipelines.masks reads it): the first image is edited inside it
    strength: float | None = None  # how far the masked area may move from the original; set with a mask

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
    nsfw: bool | None = None  # the safety checker's verdict; None: not checked
    safety_note: str | None = None  # why an image that was to be checked was not


@dataclass
class RenderResult:
    id: str
    images: list[RenderedImage]
    revised_prompt: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    loaded: list[str] = field(default_factory=list)  # checkpoints the worker holds after this job
    device_memory_bytes: int = 0  # accelerator memory the worker holds after this job
    acceleration: str = "none"  # the step caching that ran, reported to the client


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
    """Sent once by a worker after start-up: what it runs on and what it holds."""

    device: str
    loaded: list[str]
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)  # per checkpoint, as resolved on `device`


@dataclass
class Heartbeat:
    """Sent every `WorkerConfig.heartbeat_s` by a thread of the worker's own, whatever its loop is doing: a
    stopped or frozen process sends none. `batches`: how many batches the loop has answered in full."""

    batches: int


WORKER_ENTRY = "pipelines.worker:main"
"""The worker process's loop, as "module:function"; tests name a wrapper of it that injects a fault."""


@dataclass
class Assigned:
    """Sent first by a Ray Serve replica that takes a batch: which replica, on which node and process."""

    replica: str
    node: str  # the Ray node id
    pid: int


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
    entry: str = WORKER_ENTRY
    heartbeat_s: float = 1.0
    safety_threshold: float = 0.5  # nsfw probability from which the safety checker flags an image
