"""What crosses the process boundary between the HTTP front and a worker. Pure Python: no torch."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from pipelines.contract.errors import ErrorCode
from pipelines.contract.lora_catalog import LoraChoice


class BatchKey:
    """Marks a RenderRequest field whose value is one for a whole pipeline call: requests that differ in it
    never share a batch (`Annotated[int, BatchKey]`). The scheduler's batch key is made of these fields.
    `BatchKey(by=f)` keys on `f(value)` instead, for a field each request keeps its own of but whose kind
    decides the call (a mask: masked and plain edits run different pipelines)."""

    def __init__(self, by: Callable[[Any], object] | None = None) -> None:
        self.by = by

    @staticmethod
    def of(metadata: tuple[object, ...]) -> BatchKey | None:
        for mark in metadata:
            if mark is BatchKey:
                return BatchKey()
            if isinstance(mark, BatchKey):
                return mark
        return None


def present(value: object) -> bool:
    return value is not None


@dataclass
class RenderRequest:
    """One client request, fully resolved: every default applied, every value validated.

    A field that a pipeline call takes once for all its images (shape, schedule, references, adapters) is
    marked BatchKey; one that each request of a batch keeps its own (prompt, seeds) is not."""

    id: str
    model: Annotated[str, BatchKey]
    prompt: str
    width: Annotated[int, BatchKey]
    height: Annotated[int, BatchKey]
    steps: Annotated[int, BatchKey]
    guidance: Annotated[float, BatchKey]
    seeds: list[int]
    images: Annotated[list[bytes], BatchKey] = field(default_factory=list)  # references, one set per call
    extra: Annotated[dict[str, Any], BatchKey] = field(default_factory=dict)
    enhance_prompt: bool = False
    enhance_temperature: float = 0.15
    partial_images: Annotated[int, BatchKey] = 0
    # Step caching level (pipelines.engine.acceleration): the cache hook is on for a whole call.
    acceleration: Annotated[str, BatchKey] = "none"
    safety_check: bool = False  # run the safety checker on this request's images (pipelines.engine.safety)
    # On top of the model's own adapter (Turbo); a call runs with one set of adapters at one set of scales.
    loras: Annotated[list[LoraChoice], BatchKey] = field(default_factory=list)
    # How the worker encodes the images (pipelines.contract.encoding); not a batch key: each image is encoded
    # alone.
    output_format: str = "png"
    output_compression: int | None = None
    # As sent (pipelines.contract.masks reads it): the first image is edited inside it. Each request keeps its
    # own; only masked requests share a call.
    mask: Annotated[bytes | None, BatchKey(by=present)] = None
    # How far the masked area may move from the original (it sets the schedule's start); set with a mask.
    strength: Annotated[float | None, BatchKey] = None
    # FLUX.1 Redux (pipelines.engine.image_prompts), as sent: its image tokens follow the prompt's, scaled by
    # image_prompt_strength. Each request keeps its own image and strength (a row of the call's embeddings);
    # only image-prompted requests share a call, whose embeddings are longer by the image's tokens.
    image_prompt: Annotated[bytes | None, BatchKey(by=present)] = None
    image_prompt_strength: float | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)


def batch_fields(request_type: type[RenderRequest]) -> tuple[str, ...]:
    """The fields of `request_type` (RenderRequest or a subclass) marked BatchKey, in declaration order."""
    return tuple(_batch_keys(request_type))


def batch_values(request: RenderRequest) -> list[object]:
    """What `request` must agree on with another to share its pipeline call: its BatchKey fields' values."""
    values = [(getattr(request, name), key.by) for name, key in _batch_keys(type(request)).items()]
    return [value if by is None else by(value) for value, by in values]


def _batch_keys(request_type: type[RenderRequest]) -> dict[str, BatchKey]:
    known = _BATCH_FIELDS.get(request_type)
    if known is None:
        hints = typing.get_type_hints(request_type, include_extras=True)
        fields = dataclasses.fields(request_type)
        marks = {f.name: BatchKey.of(getattr(hints[f.name], "__metadata__", ())) for f in fields}
        known = _BATCH_FIELDS[request_type] = {name: mark for name, mark in marks.items() if mark is not None}
    return known


_BATCH_FIELDS: dict[type[RenderRequest], dict[str, BatchKey]] = {}


@dataclass
class RenderedImage:
    """One image as the client asked for it, `data` in `content_type` (image/png...), and the seed that made
    it. The worker encodes it (pipelines.contract.encoding): inside the worker, before that, `data` holds raw
    RGB pixels (height x width x 3, uint8) under pipelines.contract.encoding.RAW_RGB."""

    data: bytes
    content_type: str
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


@dataclass
class Rendered:
    """Sent when a batch's pipeline call is over, before its images are encoded: the worker takes the next
    batch (its denoising) while they encode on a thread, and their results follow."""

    ids: list[str]


@dataclass
class Failure:
    """A batch that could not be rendered; `code` decides the HTTP status on the other side."""

    ids: list[str]
    code: ErrorCode
    message: str
    param: str | None = None


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


WORKER_ENTRY = "pipelines.engine.worker:main"
"""The worker process's loop, as "module:function"; tests name a wrapper of it that injects a fault."""


@dataclass
class Assigned:
    """Sent first by a Ray Serve replica that takes a batch: which replica, on which node and process."""

    replica: str
    node: str  # the Ray node id
    pid: int


@dataclass
class WorkerConfig:
    """What a worker process is started with. Every field comes from a setting
    (server.declarations.settings.Settings,
    through server.app.worker_configs), which holds its default: none is repeated here."""

    weights_dir: str
    device: str
    preload: list[str]
    threads: int | None
    memory_budget_bytes: int | None
    prompt_cache_bytes: int
    lora_cache_bytes: int
    modes: dict[str, str]  # requested mode per checkpoint; others are auto
    synthetic: bool  # full-size random weights from the published configs instead of checkpoints
    parent_pid: int | None  # the server; the worker exits when it is gone
    log_level: str
    specs: dict[str, Any]  # ModelSpec per id, as the front resolved them
    entry: str
    heartbeat_s: float
    safety_threshold: float  # nsfw probability from which the safety checker flags an image
