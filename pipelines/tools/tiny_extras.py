"""Tiny random-weight mirrors of the extra repos `fluxd weights pull` fetches beside the models (the safety
checker and FLUX.1 Redux), with the real classes and folder layouts, loaded through the same from_pretrained
path as the real ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def write_safety_checker(folder: Path, seed: int = 0, verdict: str = "normal") -> Path:
    """A tiny ViT image classifier with the labels and classes of Falconsai/nsfw_image_detection. Its head
    ignores the image and always answers `verdict` ("normal" or "nsfw"), so a test can force a flag through
    the real transformers path; the demo's says "normal" and blacks nothing out."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    labels = {0: "normal", 1: "nsfw"}
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        id2label=labels,
        label2id={label: index for index, label in labels.items()},
    )
    model = ViTForImageClassification(config)
    head = model.classifier
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([4.0, -4.0] if verdict == "normal" else [-4.0, 4.0]))
    model.save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def write_redux(folder: Path, seed: int = 0, text_width: int = 32) -> Path:
    """A tiny FLUX.1 Redux in black-forest-labs/FLUX.1-Redux-dev's layout (image_encoder/, feature_extractor/,
    image_embedder/): a 1-layer SigLIP vision model and a ReduxImageEncoder whose tokens have the width of the
    tiny FLUX.1's T5 (`text_width`), which they follow in the FLUX.1 call."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    vision_width = 16
    torch.manual_seed(seed)
    image_encoder = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=vision_width,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    torch.manual_seed(seed)
    image_embedder = ReduxImageEncoder(redux_dim=vision_width, txt_in_features=text_width)
    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    # DiffusionPipeline's methods are not visible on its subclasses to mypy (diffusers' typing).
    redux: Any = FluxPriorReduxPipeline(
        image_encoder=image_encoder, feature_extractor=processor, image_embedder=image_embedder
    )
    redux.save_pretrained(folder, safe_serialization=True)
    return folder
