"""FLUX.1 [dev] and FLUX.1 Kontext [dev]: CLIP + T5 conditioning; Kontext takes one reference image."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.specs import ModelSpec

EMBEDS = ("prompt_embeds", "pooled_prompt_embeds")
"""What encode_prompt returns per prompt, in order: T5 sequence, CLIP pooled
(pipelines.engine.prompt_cache)."""


def call_kwargs(
    spec: ModelSpec, pipe: Any, references: list[Image.Image], width: int, height: int, steps: int
) -> dict[str, Any]:
    if spec.family != "flux1-kontext":
        return {}
    # Kontext rescales its output to `max_area` and, by default, snaps the reference to a ~1 MP preferred
    # size. fluxd resolves the exact output size itself, so it asks for that area and sizes the reference to
    # it: a tiny run stays tiny and a real one gets Kontext's ~1 MP at the default size.
    kwargs: dict[str, Any] = {"max_area": width * height, "_auto_resize": False}
    if references:
        reference = references[0]
        scale = (width * height / (reference.width * reference.height)) ** 0.5
        size = (
            max(16, round(reference.width * scale / 16) * 16),
            max(16, round(reference.height * scale / 16) * 16),
        )
        kwargs["image"] = reference.resize(size, Image.Resampling.LANCZOS)
    return kwargs


def preview(pipe: Any, latents: torch.Tensor, width: int, height: int) -> np.ndarray:
    """Packed step latents (B, seq, C) -> RGB floats in [0, 1] (B, height, width, 3), decoded as at the end
    of FluxPipeline/FluxKontextPipeline.__call__."""
    spatial = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    spatial = spatial / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(spatial.to(pipe.vae.device, pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")


def enhance(pipe: Any, prompt: str, references: list[Image.Image], temperature: float, seed: int) -> str:
    """FLUX.1 has no language model to rewrite a prompt with; the front refuses such a request before."""
    raise InvalidParameter("prompt_enhancement", "FLUX.1 models cannot enhance prompts.")
