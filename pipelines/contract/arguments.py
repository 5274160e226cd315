"""Which arguments of a pipeline's __call__ a client may pass through, and which fluxd sets itself.

Importing this module imports neither torch nor diffusers: the HTTP process validates passthrough arguments
against PASSTHROUGH, read from signatures.json, which `python -m pipelines.tools.signatures` writes from the
installed diffusers (a test fails when the two differ). So what a request may pass never waits for a worker
to start, and the HTTP process names, in its 400s, the request parameter to use instead of an argument fluxd
sets.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.contract.specs import SPECS

SIGNATURES = Path(__file__).with_name("signatures.json")

# Call arguments fluxd sets itself, each with the request parameter that sets it where a client has one.
SET_BY_FLUXD: dict[str, str | None] = {
    "self": None,
    "prompt": "prompt",
    "image": "image",
    "height": "size",
    "width": "size",
    "max_area": "size",
    "_auto_resize": None,
    "num_inference_steps": "num_inference_steps",
    "sigmas": "num_inference_steps",
    "timesteps": "num_inference_steps",
    "guidance_scale": "cfg_scale",
    "num_images_per_prompt": "n",
    "generator": "seed",
    "latents": "seed",
    "output_type": "output_format",
    "caption_upsample_temperature": "prompt_enhancement",
    "prompt_embeds": None,
    "pooled_prompt_embeds": None,
    "negative_prompt_embeds": None,
    "negative_pooled_prompt_embeds": None,
    "ip_adapter_image": None,
    "ip_adapter_image_embeds": None,
    "negative_ip_adapter_image": None,
    "negative_ip_adapter_image_embeds": None,
    "return_dict": None,
    "attention_kwargs": None,
    "joint_attention_kwargs": None,
    "callback_on_step_end": None,
    "callback_on_step_end_tensor_inputs": None,
    "text_encoder_out_layers": None,
}


def served_pipeline_classes() -> set[str]:
    """Every model, the TOML registry's included, runs one of the built-in models' pipeline classes."""
    return {spec.pipeline_class for spec in SPECS.values()}


PASSTHROUGH: dict[str, dict[str, str]] = json.loads(SIGNATURES.read_text())
"""What pipelines.tools.signatures read from diffusers for the served pipeline classes, when written."""
