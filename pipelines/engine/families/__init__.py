"""What a model family brings to the engine (pipelines/engine/engine.py): one module per family implements
Family."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from pipelines.contract.specs import ModelSpec


class Family(Protocol):
    """The family-specific part of one pipeline call; the engine does the rest alike for every family."""

    @property
    def EMBEDS(self) -> tuple[str, ...]:  # a module's constant implements it
        """What encode_prompt returns per prompt, in the order __call__ takes it
        (pipelines.engine.prompt_cache)."""
        ...

    def call_kwargs(
        self, spec: ModelSpec, pipe: Any, references: list[Image.Image], width: int, height: int, steps: int
    ) -> dict[str, Any]:
        """The family's own arguments to the pipeline's __call__: references, schedule, sizes."""
        ...

    def preview(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> np.ndarray:
        """Step latents -> RGB floats in [0, 1] (batch, height, width, 3), decoded as the pipeline does."""
        ...

    def enhance(
        self, pipe: Any, prompt: str, references: list[Image.Image], temperature: float, seed: int
    ) -> str:
        """The prompt rewritten by the model's own language model (prompt enhancement)."""
        ...
