"""Image prompts (FLUX.1 Redux) on the tiny checkpoints: the tiny Redux loads through from_pretrained, an
image prompt changes the output, a seed repeats, strength matters, and a batch equals its solo renders."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPriorReduxPipeline
from PIL import Image

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.image_prompts import FOLDER
from pipelines.contract.messages import RenderRequest
from pipelines.contract.specs import SPECS
from pipelines.engine.engine import Engine
from tests.imagery import photo, png
from tests.integration.test_engine import request
from tests.integration.test_inpaint import rendered

MODELS = ["flux.1-dev", "flux1.1-pro"]


def prompted(model: str, seed: int, **fields) -> RenderRequest:
    return request(
        model,
        [seed],
        image_prompt=fields.pop("image_prompt", photo(64, 48)),
        image_prompt_strength=fields.pop("image_prompt_strength", 1.0),
        **fields,
    )


@pytest.mark.parametrize("model", MODELS)
def test_an_image_prompt_changes_the_image_and_a_seed_repeats(engine: Engine, model: str) -> None:
    [plain] = rendered(engine, [request(model, [3])])
    [first] = rendered(engine, [prompted(model, 3)])
    [again] = rendered(engine, [prompted(model, 3)])
    assert not np.array_equal(first, plain)
    assert np.array_equal(first, again)


def test_strength_and_the_image_itself_matter(engine: Engine) -> None:
    [full] = rendered(engine, [prompted("flux.1-dev", 4)])
    [none] = rendered(engine, [prompted("flux.1-dev", 4, image_prompt_strength=0.0)])
    other = png(40, 40, (250, 250, 10))
    [another] = rendered(engine, [prompted("flux.1-dev", 4, image_prompt=other)])
    assert not np.array_equal(full, none)
    assert not np.array_equal(full, another)


def test_a_batch_equals_its_solo_renders(engine: Engine) -> None:
    one = prompted("flux.1-dev", 5)
    two = dataclasses.replace(
        prompted("flux.1-dev", 6, prompt="a lighthouse", image_prompt_strength=0.4),
        id="r6",
        image_prompt=png(30, 50, (10, 200, 90)),
        seeds=[6, 7],
    )
    together = rendered(engine, [one, two])
    alone = rendered(engine, [one]) + rendered(engine, [two])
    assert len(together) == len(alone) == 3
    for batched, solo in zip(together, alone, strict=True):
        assert np.abs(batched - solo).max() <= 1


def test_the_embeddings_at_strength_1_are_the_redux_pipelines_own(engine: Engine, tiny_weights: Path) -> None:
    """What FluxPriorReduxPipeline returns given the FLUX.1 text encoders, for one image and prompt."""
    pipe = engine.pipeline(SPECS["flux.1-dev"])
    req = prompted("flux.1-dev", 1)
    kwargs, _ = engine.image_prompts.prepare(pipe, {"prompt": [req.prompt]}, [req], {})
    encoders = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    redux = FluxPriorReduxPipeline.from_pretrained(
        tiny_weights / FOLDER, **{name: getattr(pipe, name) for name in encoders}
    )
    image = Image.open(io.BytesIO(req.image_prompt or b"")).convert("RGB")
    expected = redux(image, prompt=req.prompt)
    assert torch.allclose(kwargs["prompt_embeds"], expected.prompt_embeds, atol=1e-5)
    assert torch.allclose(kwargs["pooled_prompt_embeds"], expected.pooled_prompt_embeds, atol=1e-5)


def test_without_redux_weights_the_worker_says_what_to_pull(tiny_weights: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "flux.1-dev").symlink_to(tiny_weights / "flux.1-dev")
    with pytest.raises(InvalidParameter) as refused:
        Engine(SPECS, weights).render([prompted("flux.1-dev", 1)])
    assert refused.value.param == "image_prompt"
    assert "fluxd weights pull redux" in str(refused.value)


def test_the_prompt_cache_leaves_image_prompted_pixels_as_they_are(
    engine: Engine, tiny_weights: Path
) -> None:
    cached = Engine(SPECS, tiny_weights, prompt_cache_bytes=2**20)
    twice = [rendered(cached, [prompted("flux.1-dev", 8)]) for _ in range(2)]
    assert cached.prompts.hits == 1
    for [image] in twice:
        assert np.array_equal(image, rendered(engine, [prompted("flux.1-dev", 8)])[0])
