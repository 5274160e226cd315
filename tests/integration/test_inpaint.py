"""Masked edits on the tiny checkpoints, per model: kept pixels come back as sent, the masked area changes,
a seed repeats, and a masked batch equals its solo renders."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.contract.masks import edit_weights
from pipelines.contract.messages import RenderRequest
from pipelines.contract.specs import SPECS
from pipelines.engine.engine import Engine
from tests.imagery import mask, photo, png
from tests.integration.test_engine import request

MASKED_MODELS = sorted(m for m, s in SPECS.items() if "inpaint" in s.modes)
WIDTH, HEIGHT = 64, 48


def masked(model: str, seed: int, **fields) -> RenderRequest:
    return request(
        model,
        [seed],
        images=fields.pop("images", [photo(WIDTH, HEIGHT)]),
        mask=fields.pop("mask", mask(WIDTH, HEIGHT)),
        strength=fields.pop("strength", 1.0),
        **fields,
    )


def rendered(engine: Engine, batch: list[RenderRequest]) -> list[np.ndarray]:
    return [
        np.frombuffer(image.data, np.uint8).reshape(image.height, image.width, 3).astype(int)
        for result in engine.render(batch)
        for image in result.images
    ]


def original() -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(photo(WIDTH, HEIGHT))).convert("RGB")).astype(int)


@pytest.mark.parametrize("model", MASKED_MODELS)
def test_kept_pixels_are_as_sent_and_masked_ones_change(engine: Engine, model: str) -> None:
    [image] = rendered(engine, [masked(model, 5)])
    kept = edit_weights(mask(WIDTH, HEIGHT)) == 0
    assert image.shape == (HEIGHT, WIDTH, 3)
    assert np.array_equal(image[kept], original()[kept])
    assert np.abs(image[~kept] - original()[~kept]).mean() > 5


@pytest.mark.parametrize("model", MASKED_MODELS)
def test_the_same_seed_gives_the_same_pixels(engine: Engine, model: str) -> None:
    first, again = (rendered(engine, [masked(model, 11)])[0] for _ in range(2))
    assert np.array_equal(first, again)


@pytest.mark.parametrize("model", MASKED_MODELS)
def test_a_masked_batch_equals_its_solo_renders(engine: Engine, model: str) -> None:
    other_mask = mask(WIDTH, HEIGHT, box=(0, 0, 32, 48), alpha=False)
    batch = [masked(model, 21), masked(model, 22, mask=other_mask)]
    together = rendered(engine, batch)
    alone = [rendered(engine, [dataclasses.replace(request)])[0] for request in batch]
    for mate, solo in zip(together, alone, strict=True):
        assert np.abs(mate - solo).max() <= 1


@pytest.mark.parametrize("model", MASKED_MODELS)
def test_strength_starts_part_way_and_keeps_the_kept_pixels(engine: Engine, model: str) -> None:
    # Random weights say nothing of how near a lighter edit stays; that it runs from the original, is
    # repeatable and keeps what the mask keeps is what can be checked here.
    kept = edit_weights(mask(WIDTH, HEIGHT)) == 0
    full, light, again = (
        rendered(engine, [masked(model, 3, strength=s, steps=4)])[0] for s in (1.0, 0.5, 0.5)
    )
    assert np.array_equal(light, again)
    assert not np.array_equal(light, full)
    assert np.array_equal(light[kept], original()[kept])


def test_flux2_edits_the_first_image_while_the_others_condition_it(engine: Engine) -> None:
    kept = edit_weights(mask(WIDTH, HEIGHT)) == 0
    alone = rendered(engine, [masked("flux.2-dev", 8)])[0]
    images = [photo(WIDTH, HEIGHT), png(96, 64, (200, 30, 30))]
    [conditioned] = rendered(engine, [masked("flux.2-dev", 8, images=images)])
    assert np.array_equal(conditioned[kept], original()[kept])
    assert not np.array_equal(conditioned, alone)  # the second image took part


def test_masked_edits_share_the_prompt_cache_of_their_model(tiny_weights: Path) -> None:
    cached = Engine(SPECS, tiny_weights, prompt_cache_bytes=64 * 2**20)
    cached.render([request("flux.1-dev", [1], prompt="a hat")])
    [result] = cached.render([masked("flux.1-dev", 2, prompt="a hat")])
    assert result.timings_ms["prompt_cache_hits"] == 1
