"""The prompt-embedding cache on the tiny checkpoints: the encoder runs once per prompt, images unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from pipelines.contract.specs import SPECS
from pipelines.engine.engine import Engine
from tests.integration.test_engine import pixels, request

MB = 2**20


@contextmanager
def encoder_calls(engine: Engine, model: str) -> Iterator[list[str]]:
    """Names of the text encoders that ran a forward pass inside the block."""
    pipe = engine.pipeline(SPECS[model])
    calls: list[str] = []
    handles = [
        module.register_forward_hook(lambda *_, slot=slot: calls.append(slot))
        for slot, module in pipe.components.items()
        if slot.startswith("text_encoder")
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def cached(tiny_weights: Path) -> Engine:
    return Engine(SPECS, tiny_weights, prompt_cache_bytes=64 * MB)


@pytest.fixture(scope="module")
def uncached(tiny_weights: Path) -> Engine:
    return Engine(SPECS, tiny_weights)


@pytest.mark.parametrize("model", ["flux.2-dev", "flux.1-dev", "flux.1-kontext-dev"])
def test_same_prompt_other_seed_skips_the_encoder_and_changes_nothing(
    cached: Engine, uncached: Engine, model: str
) -> None:
    first = pixels(cached, request(model, [1]))[0]
    with encoder_calls(cached, model) as calls:
        [result] = cached.render([request(model, [2])])
    assert calls == []
    assert result.timings_ms["prompt_cache_hits"] == 1
    second = np.frombuffer(result.images[0].data, np.uint8).reshape(first.shape)
    assert not np.array_equal(first, second)
    expected = [pixels(uncached, request(model, [seed]))[0] for seed in (1, 2)]
    for got, want in zip((first, second), expected, strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_a_batch_encodes_only_its_new_prompts(cached: Engine) -> None:
    cached.render([request("flux.2-dev", [1], prompt="a red fox")])
    batch = [
        request("flux.2-dev", [2, 3], prompt="a red fox"),
        request("flux.2-dev", [4, 5], prompt="a blue whale"),
    ]
    fox, _ = cached.render(batch)
    assert (fox.timings_ms["prompt_cache_hits"], fox.timings_ms["prompt_cache_misses"]) == (3, 1)
    assert len(cached.prompts) == 2


def test_turbo_reuses_the_base_encoding(cached: Engine) -> None:
    cached.render([request("flux.2-dev", [1], prompt="a lighthouse")])
    with encoder_calls(cached, "flux.2-dev-turbo") as calls:
        cached.render([request("flux.2-dev-turbo", [1], prompt="a lighthouse", steps=8)])
    assert calls == []


def test_encoder_arguments_are_part_of_the_key(cached: Engine, uncached: Engine) -> None:
    cached.render([request("flux.1-dev", [1])])
    for extra in ({"prompt_2": "in the snow"}, {"max_sequence_length": 64}):
        with encoder_calls(cached, "flux.1-dev") as calls:
            got = pixels(cached, request("flux.1-dev", [1], extra=extra))[0]
        assert calls, extra
        want = pixels(uncached, request("flux.1-dev", [1], extra=extra))[0]
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_negative_prompts_are_cached_too(cached: Engine) -> None:
    extra = {"negative_prompt": "blurry", "true_cfg_scale": 2.0}
    cached.render([request("flux.1-dev", [1], extra=extra)])
    with encoder_calls(cached, "flux.1-dev") as calls:
        cached.render([request("flux.1-dev", [2], extra=extra)])
    assert calls == []


def test_the_cache_stays_within_its_budget(tiny_weights: Path) -> None:
    probe = Engine(SPECS, tiny_weights, prompt_cache_bytes=64 * MB)
    probe.render([request("flux.2-dev", [1], prompt="p0")])
    entry = probe.prompts.bytes
    engine = Engine(SPECS, tiny_weights, prompt_cache_bytes=int(2.5 * entry))
    for index in range(4):
        engine.render([request("flux.2-dev", [1], prompt=f"p{index}")])
    assert len(engine.prompts) == 2 and engine.prompts.bytes <= 2.5 * entry
    with encoder_calls(engine, "flux.2-dev") as calls:
        engine.render([request("flux.2-dev", [1], prompt="p3")])
    assert calls == []
    with encoder_calls(engine, "flux.2-dev") as calls:
        engine.render([request("flux.2-dev", [1], prompt="p0")])
    assert calls


def test_a_zero_budget_turns_it_off(uncached: Engine) -> None:
    uncached.render([request("flux.2-dev", [1])])
    with encoder_calls(uncached, "flux.2-dev") as calls:
        uncached.render([request("flux.2-dev", [2])])
    assert calls and len(uncached.prompts) == 0
