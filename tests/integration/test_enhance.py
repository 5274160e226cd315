"""Prompt enhancement: FLUX.2's own Mistral rewrites the prompt (gibberish from tiny random weights)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.messages import RenderRequest, RenderResult
from pipelines.contract.specs import SPECS
from pipelines.engine.engine import Engine
from pipelines.engine.families import flux2
from tests.imagery import png


def enhanced(engine: Engine, model: str, seed: int = 1, **fields) -> RenderResult:
    [result] = engine.render(
        [
            RenderRequest(
                id=f"e{seed}",
                model=model,
                prompt="a red fox",
                width=64,
                height=48,
                steps=fields.pop("steps", 2),
                guidance=SPECS[model].default_guidance,
                seeds=[seed],
                **{"enhance_prompt": True, **fields},
            )
        ]
    )
    return result


@pytest.mark.parametrize("model", ["flux.2-dev", "flux.2-dev-turbo"])
def test_text_to_image_returns_a_revised_prompt(engine: Engine, model: str) -> None:
    adapter = SPECS[model].adapter
    steps = len(adapter.sigmas) if adapter is not None and adapter.sigmas is not None else 2
    result = enhanced(engine, model, steps=steps)
    assert isinstance(result.revised_prompt, str) and result.revised_prompt.strip()


def test_edit_returns_a_revised_prompt(engine: Engine) -> None:
    result = enhanced(engine, "flux.2-dev", images=[png(), png(96, 64)])
    assert isinstance(result.revised_prompt, str) and result.revised_prompt.strip()


def test_the_revised_prompt_depends_only_on_the_request(engine: Engine) -> None:
    first = enhanced(engine, "flux.2-dev", seed=7)
    torch.rand(100)  # the global RNG moves; the enhancement's own does not
    again = enhanced(engine, "flux.2-dev", seed=7)
    assert first.revised_prompt == again.revised_prompt
    assert first.images[0].data == again.images[0].data


def test_without_enhancement_there_is_no_revised_prompt(engine: Engine) -> None:
    assert enhanced(engine, "flux.2-dev", enhance_prompt=False).revised_prompt is None


def test_enhancement_is_bounded_by_the_checkpoints_generation_config(engine: Engine) -> None:
    # Random weights never stop on their own: unbounded, they would write diffusers' 512 tokens (~100 s).
    # The tiny checkpoint carries its bound in generation_config.json, as a real one would.
    pipe = engine.pipeline(SPECS["flux.2-dev"])
    budget = pipe.text_encoder.generation_config.max_new_tokens
    assert budget is not None and budget < flux2.UPSAMPLE_MAX_NEW_TOKENS
    revised = flux2.enhance(pipe, "a red fox", [], 0.15, seed=3)
    # Decoding then re-encoding random tokens does not round-trip exactly, hence the slack.
    assert 0 < len(pipe.tokenizer.tokenizer(revised, add_special_tokens=False)["input_ids"]) <= 2 * budget


def test_a_worker_whose_encoder_streams_refuses_enhancement(tiny_weights: Path) -> None:
    # Only the worker knows its mode: the front cannot refuse this one. Offload modes need a GPU, so the
    # CPU's mode is given the offload of a GPU's 'offload' mode with the encoder streamed.
    engine = Engine(SPECS, tiny_weights)
    engine.modes["flux.2-dev"] = dataclasses.replace(engine.mode("flux.2-dev"), offload="encoder")
    with pytest.raises(InvalidParameter) as info:
        enhanced(engine, "flux.2-dev")
    assert info.value.param == "prompt_enhancement" and "streamed" in info.value.message
