"""FLUX.2 [dev] and Turbo on the same base: a list of references, custom sigmas, Mistral upsampling."""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from pipelines.specs import ModelSpec

logger = logging.getLogger(__name__)
_logged_schedules: set[str] = set()


def call_kwargs(spec: ModelSpec, pipe: Any, references: list[Image.Image], width: int, height: int) -> dict:
    kwargs: dict[str, Any] = {}
    if references:
        kwargs["image"] = references
    if spec.adapter is not None and spec.adapter.sigmas is not None:
        kwargs["sigmas"] = list(spec.adapter.sigmas)
        _log_schedule_once(spec, pipe, width, height)
    return kwargs


def _log_schedule_once(spec: ModelSpec, pipe: Any, width: int, height: int) -> None:
    """Dynamic shifting moves custom sigmas: say once what the scheduler really runs."""
    if spec.id in _logged_schedules or spec.adapter is None or spec.adapter.sigmas is None:
        return
    _logged_schedules.add(spec.id)
    from copy import deepcopy

    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    scheduler = deepcopy(pipe.scheduler)
    seq_len = (width // 16) * (height // 16)
    scheduler.set_timesteps(
        sigmas=list(spec.adapter.sigmas),
        mu=compute_empirical_mu(seq_len, len(spec.adapter.sigmas)),
        device="cpu",
    )
    ran = [round(float(s), 4) for s in scheduler.sigmas]
    logger.info(
        "%s schedule at %dx%d: requested sigmas %s, scheduler runs %s",
        spec.id,
        width,
        height,
        list(spec.adapter.sigmas),
        ran,
    )


def enhance(pipe: Any, prompt: str, references: list[Image.Image], temperature: float) -> str:
    """Caption upsampling with the model's own Mistral encoder (diffusers' upsample_prompt)."""
    with torch.no_grad():
        images = [references] if references else None
        return pipe.upsample_prompt(prompt, images=images, temperature=temperature)[0]
