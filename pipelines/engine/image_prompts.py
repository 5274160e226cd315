"""Image prompts on FLUX.1 [dev]: diffusers' FluxPriorReduxPipeline (SigLIP + the Redux embedder) turns each
request's `image_prompt` into tokens that follow its prompt's T5 tokens in the FLUX.1 call.

The Redux pipeline, given the text encoders, returns `cat([T5(prompt), Redux(image)])` with CLIP's pooled
prompt, both multiplied by `prompt_embeds_scale` / `pooled_prompt_embeds_scale` and summed over its images
(one conditioning from several images). fluxd builds the same embeddings per request instead, so that a
batch keeps one conditioning per request: the prompt through the FLUX pipeline's own `encode_prompt` (the
prompt cache's wrapper: no second copy of the encoders, and a repeated prompt is not encoded again), the image
through the Redux pipeline's `encode_image` and `image_embedder`. `image_prompt_strength` multiplies the
image's tokens only: diffusers' scales would scale the prompt's tokens and pooled embedding with them, and at
0 leave no prompt at all, where BFL's `image_prompt_strength` blends between the prompt and the image prompt.
At strength 1 the embeddings are the Redux pipeline's own (tests/integration/test_image_prompts.py compares
them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.image_prompts import FOLDER, FORMATS, NOT_PULLED, PARAM, REPO_ID
from pipelines.contract.images import decode_image
from pipelines.contract.messages import RenderRequest

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default T5 length, which Redux's tokens follow


class ImagePrompts:
    """Loads the Redux pipeline on first use (beside the FLUX.1 pipeline, at its dtype) and builds the
    embeddings of an image-prompted batch."""

    def __init__(self, weights_dir: Path, device: str = "cpu") -> None:
        self.weights_dir = weights_dir
        self.device = device
        self._redux: Any = None

    def _folder(self) -> Path:
        from pipelines.engine.loading import find_local

        found = find_local(self.weights_dir / FOLDER, REPO_ID, "model_index.json")
        if found is None:
            raise InvalidParameter(PARAM, NOT_PULLED)
        return found

    def _load(self, dtype: torch.dtype) -> Any:
        if self._redux is None:
            from diffusers import FluxPriorReduxPipeline

            folder = self._folder()
            self._redux = FluxPriorReduxPipeline.from_pretrained(
                folder, dtype=dtype, local_files_only=True
            ).to(self.device)
            logger.info("FLUX.1 Redux loaded from %s", folder)
        return self._redux

    @torch.no_grad()
    def image_tokens(self, pipe: Any, images: list[bytes]) -> torch.Tensor:
        """Redux's tokens of each image (images x tokens x T5 width), at the text encoder's dtype."""
        redux = self._load(pipe.transformer.dtype)
        pictures = [decode_image(data, PARAM, FORMATS) for data in images]
        hidden = redux.encode_image(pictures, redux._execution_device, 1)
        return redux.image_embedder(hidden).image_embeds

    def prepare(
        self, pipe: Any, kwargs: dict[str, Any], batch: list[RenderRequest], extra: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The call's arguments with `prompt` (and the passed-through `prompt_2`) replaced by embeddings: per
        image, its request's prompt tokens, then its request's image tokens times its strength."""
        prompts: list[str] = kwargs["prompt"]
        extra = dict(extra)
        prompt_2 = extra.pop("prompt_2", None)
        if isinstance(prompt_2, str):  # one text for every prompt of the batch, as the prompt cache reads it
            prompt_2 = [prompt_2] * len(prompts)
        text, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=prompt_2,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=extra.get("max_sequence_length", MAX_SEQUENCE_LENGTH),
        )
        tokens = self.image_tokens(pipe, [request.image_prompt or b"" for request in batch])
        rows = torch.cat(
            [
                (tokens[index : index + 1] * _strength(request)).expand(request.n, -1, -1)
                for index, request in enumerate(batch)
            ]
        )
        embeds = torch.cat([text, rows.to(text.device, text.dtype)], dim=1)
        rest = {name: value for name, value in kwargs.items() if name != "prompt"}
        return {**rest, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, extra


def _strength(request: RenderRequest) -> float:
    return 1.0 if request.image_prompt_strength is None else request.image_prompt_strength
