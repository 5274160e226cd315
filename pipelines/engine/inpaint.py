"""Masked edits on every model that edits: the first image is repainted inside its mask, kept outside it.

FLUX.1 [dev] and Kontext [dev] run diffusers' FluxInpaintPipeline and FluxKontextInpaintPipeline, made with
`from_pipe` on the loaded components (no second copy of any weight). diffusers has no FLUX.2 [dev] inpaint
pipeline; FLUX.2 runs its own pipeline with the method of diffusers' Flux2KleinInpaintPipeline (the same
transformer class): after each step the packed latents outside the mask are replaced by the original's,
re-noised to the next step's sigma (RePaint style). Every model's output is then composited onto the
original (pipelines.contract.masks.composite), so that kept pixels never go through the VAE.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.contract.images import decode_image
from pipelines.contract.masks import composite, mask_image
from pipelines.contract.messages import RenderRequest
from pipelines.contract.specs import Family

INPAINT_CLASSES: dict[Family, str] = {
    "flux1": "FluxInpaintPipeline",
    "flux1-kontext": "FluxKontextInpaintPipeline",
}
StepCallback = Callable[[Any, int, Any, dict], dict]


@dataclass
class Masked:
    """The images a masked batch edits and their masks, one per output image (a request's n images share
    its own), at the output size."""

    originals: list[Image.Image]
    masks: list[Image.Image]
    strength: float

    @classmethod
    def of(cls, batch: list[RenderRequest], width: int, height: int) -> Masked:
        originals: list[Image.Image] = []
        masks: list[Image.Image] = []
        for request in batch:
            assert request.mask is not None and request.strength is not None  # the batch key says so
            original = decode_image(request.images[0], "image")
            if original.size != (width, height):
                original = original.resize((width, height), Image.Resampling.LANCZOS)
            mask = mask_image(request.mask, (width, height))
            originals += [original] * request.n
            masks += [mask] * request.n
        return cls(originals, masks, batch[0].strength or 1.0)

    def composite(self, images: np.ndarray, rows: list[int] | None = None) -> np.ndarray:
        """Rendered pixels (images x H x W x 3 uint8) put onto the originals of `rows` (by default all)."""
        rows = list(range(len(images))) if rows is None else rows
        return np.stack(
            [
                composite(np.asarray(self.originals[row]), image, self.masks[row])
                for row, image in zip(rows, images, strict=True)
            ]
        )


def prepare(family: Family, pipe: Any, kwargs: dict[str, Any], masked: Masked) -> tuple[Any, dict[str, Any]]:
    """The pipeline to call and its arguments for a masked batch, from the plain call's `kwargs`."""
    if family == "flux2":
        return pipe, _flux2(pipe, kwargs, masked)
    inpainting = _derived(pipe, INPAINT_CLASSES[family])
    kwargs = {**kwargs, "image": masked.originals, "mask_image": masked.masks, "strength": masked.strength}
    if family == "flux1-kontext":
        kwargs["_auto_resize"] = False  # the originals are already at the output size
    return inpainting, kwargs


def _derived(pipe: Any, class_name: str) -> Any:
    """The inpaint pipeline on `pipe`'s components, made once per loaded pipeline and kept with it."""
    import diffusers

    derived: dict[str, Any] = pipe.__dict__.setdefault("_fluxd_derived", {})
    if class_name not in derived:
        derived[class_name] = getattr(diffusers, class_name).from_pipe(pipe)
        derived[class_name].set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        if "encode_prompt" in vars(pipe):  # the prompt cache's wrapper: both encode with the same encoders
            derived[class_name].encode_prompt = pipe.encode_prompt
    return derived[class_name]


def _flux2(pipe: Any, kwargs: dict[str, Any], masked: Masked) -> dict[str, Any]:
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
    from diffusers.utils.torch_utils import randn_tensor

    width, height, steps = kwargs["width"], kwargs["height"], kwargs["num_inference_steps"]
    # The full schedule's sigmas (fluxd's or Flux2Pipeline's default), of which strength keeps the tail as
    # Flux2KleinInpaintPipeline.get_timesteps does; num_inference_steps stays the full count, so the pipeline
    # shifts the tail exactly as it would shift the full schedule.
    sigmas = kwargs.get("sigmas") or list(np.linspace(1.0, 1 / steps, steps))
    start = int(steps - min(steps * masked.strength, steps))
    tail = [float(s) for s in sigmas[start:]]
    dtype = pipe.transformer.dtype
    patch = pipe.vae_scale_factor * 2
    shape = (1, pipe.transformer.config.in_channels, height // patch, width // patch)
    noise = torch.cat([randn_tensor(shape, generator=g, dtype=dtype) for g in kwargs["generator"]])
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(masked.originals, height=height, width=width)
        vae = pipe.vae
        original = pipe._encode_vae_image(pixels.to(vae.device, vae.dtype), generator=None).to("cpu", dtype)
    first = 1.0
    if start:
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(
            sigmas=tail, mu=compute_empirical_mu(shape[2] * shape[3], steps), device="cpu"
        )
        first = float(scheduler.sigmas[0])
    edit = torch.stack([torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0) for m in masked.masks])
    # A latent cell is repainted when any pixel of its patch is: the composite then has generated pixels
    # wherever the mask lets them show.
    cells = torch.nn.functional.max_pool2d(edit[:, None], patch).gt(0).to(dtype)
    blend = Blend(
        pipe._pack_latents(cells),
        pipe._pack_latents(original),
        pipe._pack_latents(noise),
        kwargs["callback_on_step_end"],
    )
    return {
        **kwargs,
        "latents": first * noise + (1 - first) * original,
        "sigmas": tail,
        "callback_on_step_end": blend,
    }


class Blend:
    """The step-end callback of a masked FLUX.2 call: outside the mask, the latents become the original's
    re-noised to the sigma the next step starts from (zero after the last: the original itself); then the
    plain call's callback (progress, previews, cancellation) sees them."""

    def __init__(
        self, edit: torch.Tensor, original: torch.Tensor, noise: torch.Tensor, after: StepCallback | None
    ) -> None:
        self.edit, self.original, self.noise, self.after = edit, original, noise, after

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        latents = tensors["latents"]
        sigma = pipe.scheduler.sigmas[step + 1].to(latents.device, latents.dtype)
        kept = sigma * self.noise.to(latents) + (1 - sigma) * self.original.to(latents)
        edit = self.edit.to(latents)
        latents = edit * latents + (1 - edit) * kept
        if self.after is not None:
            self.after(pipe, step, timestep, {**tensors, "latents": latents})
        return {"latents": latents}
