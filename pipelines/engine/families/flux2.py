"""FLUX.2 [dev] and Turbo on the same base: a list of references, custom sigmas, Mistral upsampling."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.contract.schedules import resample_sigmas
from pipelines.contract.specs import ModelSpec

logger = logging.getLogger(__name__)

EMBEDS = ("prompt_embeds",)
"""What encode_prompt returns per prompt, in order, as __call__ takes it back
(pipelines.engine.prompt_cache)."""
_logged_schedules: set[tuple[str, int]] = set()


def call_kwargs(
    spec: ModelSpec, pipe: Any, references: list[Image.Image], width: int, height: int, steps: int
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if references:
        kwargs["image"] = references
    if spec.adapter is not None and spec.adapter.sigmas is not None:
        kwargs["sigmas"] = resample_sigmas(spec.adapter.sigmas, steps)
        _log_schedule_once(spec, pipe, width, height, kwargs["sigmas"])
    return kwargs


def _log_schedule_once(spec: ModelSpec, pipe: Any, width: int, height: int, sigmas: list[float]) -> None:
    """Dynamic shifting moves custom sigmas: say once per step count what the scheduler really runs."""
    if (spec.id, len(sigmas)) in _logged_schedules:
        return
    _logged_schedules.add((spec.id, len(sigmas)))
    from copy import deepcopy

    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    scheduler = deepcopy(pipe.scheduler)
    seq_len = (width // 16) * (height // 16)
    scheduler.set_timesteps(sigmas=sigmas, mu=compute_empirical_mu(seq_len, len(sigmas)), device="cpu")
    ran = [round(float(s), 4) for s in scheduler.sigmas]
    logger.info(
        "%s schedule at %dx%d, %d steps: requested sigmas %s, scheduler runs %s",
        spec.id,
        width,
        height,
        len(sigmas),
        [round(s, 4) for s in sigmas],
        ran,
    )


def preview(pipe: Any, latents: torch.Tensor, width: int, height: int) -> np.ndarray:
    """Packed step latents (B, seq, C) -> RGB floats in [0, 1] (B, height, width, 3), decoded.

    The same helpers and batch-norm de-normalisation as the end of Flux2Pipeline.__call__, with the position
    ids prepare_latents gives an output of this size.
    """
    patch = pipe.vae_scale_factor * 2
    grid = latents.new_empty((latents.shape[0], 1, height // patch, width // patch))
    ids = pipe._prepare_latent_ids(grid).to(latents.device)
    unpacked = pipe._unpack_latents_with_ids(latents, ids)
    bn = pipe.vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(unpacked.device, unpacked.dtype)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(
        unpacked.device, unpacked.dtype
    )
    spatial = pipe._unpatchify_latents(unpacked * std + mean).to(pipe.vae.device, pipe.vae.dtype)
    return pipe.image_processor.postprocess(pipe.vae.decode(spatial, return_dict=False)[0], output_type="np")


UPSAMPLE_MAX_NEW_TOKENS = 512  # diffusers' bound in Flux2Pipeline.upsample_prompt


def enhance(pipe: Any, prompt: str, references: list[Image.Image], temperature: float, seed: int) -> str:
    """Caption upsampling with the model's own Mistral encoder, as diffusers' Flux2Pipeline.upsample_prompt.

    Its system messages, image preparation, chat template and sampling, for one prompt, with two changes.
    No padding to 2048 tokens: one prompt needs none, and attending to ~1900 pad tokens made a tiny run's
    prefill ~10 s on two CPU cores. The token budget is the checkpoint's generation_config.max_new_tokens
    when it sets one (the tiny checkpoints do: random weights never emit EOS), else diffusers' 512.
    Sampling is seeded by the request's seed in a forked RNG, so the revised prompt, like the image,
    depends only on the request. An empty answer keeps the client's prompt.
    """
    from diffusers.pipelines.flux2.pipeline_flux2 import _validate_and_process_images, format_input

    images = None
    system = pipe.system_message_upsampling_t2i
    if references:
        images = _validate_and_process_images(
            [references], pipe.image_processor, pipe.upsampling_max_image_size
        )
        system = pipe.system_message_upsampling_i2i
    inputs = pipe.tokenizer.apply_chat_template(
        format_input(prompts=[prompt], system_message=system, images=images),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        truncation=True,
        max_length=2048,
    )
    encoder = pipe.text_encoder
    inputs = {name: value.to(encoder.device) for name, value in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(encoder.dtype)
    budget = encoder.generation_config.max_new_tokens or UPSAMPLE_MAX_NEW_TOKENS
    devices = [encoder.device] if encoder.device.type != "cpu" else []
    with torch.no_grad(), torch.random.fork_rng(devices, device_type=encoder.device.type):
        torch.manual_seed(seed)
        generated = encoder.generate(
            **inputs, max_new_tokens=budget, do_sample=True, temperature=temperature, use_cache=True
        )
    answer = generated[0, inputs["input_ids"].shape[1] :]
    return pipe.tokenizer.tokenizer.decode(answer, skip_special_tokens=True).strip() or prompt
