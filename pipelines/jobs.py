"""What crosses the process boundary between the HTTP front and a worker. Pure Python: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


@dataclass
class Progress:
    """A step report from a running job; `preview` carries a partial image when one was asked for."""

    id: str
    step: int
    total: int
    preview: RenderedImage | None = None
