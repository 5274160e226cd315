"""Step caching (`acceleration`) on the tiny checkpoints, through Engine.render as a worker runs it.

Each family: the levels cut the transformer's full evaluations at 28 steps by the targets (regular at least
1.5x, high at least 2x, counted by forward hooks on its blocks), every level renders, and 'none' is
bit-identical to the code path without step caching: the same request rendered in the same run with the
engine's `accelerated` context replaced by a bare one. (No hash recorded on one machine is compared on
another: float kernels differ between CPUs.)
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest

from pipelines.contract.messages import RenderRequest
from pipelines.contract.specs import SPECS
from pipelines.engine.acceleration import counting, full_evaluations
from pipelines.engine.engine import Engine
from tests.imagery import png

STEPS = 28
MODELS = ("flux.2-dev", "flux.1-kontext-dev", "flux.1-dev")
TARGETS = {"regular": 1.5, "high": 2.0}


def request(model: str, level: str, seeds: tuple[int, ...] = (5, 6), **fields) -> RenderRequest:
    return RenderRequest(
        id=f"{model}-{level}",
        model=model,
        prompt="a red fox",
        width=64,
        height=48,
        steps=STEPS,
        guidance=SPECS[model].default_guidance,
        seeds=list(seeds),
        acceleration=level,
        **fields,
    )


def render(engine: Engine, req: RenderRequest) -> tuple[np.ndarray, float, str]:
    """Pixels of every image, the transformer's full evaluations, and the level the result reports."""
    with counting(engine.pipeline(SPECS[req.model]).transformer) as counter:
        [result] = engine.render([req])
    pixels = np.stack([np.frombuffer(i.data, np.uint8).reshape(i.height, i.width, 3) for i in result.images])
    return pixels, counter.evaluations, result.acceleration


def without_step_caching(engine: Engine, req: RenderRequest, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """The render before step caching existed: no cache config, no hook, not even the context manager."""
    with monkeypatch.context() as patched:
        patched.setattr("pipelines.engine.engine.accelerated", lambda *_: nullcontext())
        pixels, evaluations, _ = render(engine, req)
    assert evaluations == STEPS
    return pixels


@pytest.mark.parametrize("model", MODELS)
def test_levels_cut_full_evaluations_and_none_is_unchanged(
    engine: Engine, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    none, evaluations, reported = render(engine, request(model, "none"))
    assert (evaluations, reported) == (STEPS, "none")
    assert np.array_equal(none, without_step_caching(engine, request(model, "none"), monkeypatch))
    for level, target in TARGETS.items():
        pixels, cached, reported = render(engine, request(model, level))
        assert reported == level
        assert cached == full_evaluations(level, STEPS)
        assert STEPS / cached >= target, (level, cached)
        assert pixels.shape == none.shape and pixels.std() > 0
        # Forecast steps change pixels; how closely they track 'none' says nothing on random weights (the
        # quality claim is the published measurements'), so only that the cache did skip work is checked.
        assert not np.array_equal(pixels, none)
    # The hook and its state leave with the call: the next render at 'none' is bit-identical.
    again, evaluations, _ = render(engine, request(model, "none"))
    assert evaluations == STEPS and np.array_equal(again, none)


@pytest.mark.parametrize("model", ["flux.2-dev", "flux.1-kontext-dev"])
def test_edits_render_at_high(engine: Engine, model: str) -> None:
    pixels, evaluations, _ = render(engine, request(model, "high", images=[png(96, 64)]))
    assert pixels.shape == (2, 48, 64, 3) and pixels.std() > 0
    assert evaluations == full_evaluations("high", STEPS)


def test_true_cfg_caches_each_branch_on_its_own(engine: Engine) -> None:
    """FluxKontextPipeline calls its transformer twice a step under true CFG, in no cache context of its own:
    each branch must keep its own forecast (one shared would count 41 evaluations here, not 26)."""
    extra = {"negative_prompt": "blur", "true_cfg_scale": 2.0}
    _, evaluations, _ = render(engine, request("flux.1-kontext-dev", "high", extra=extra))
    assert evaluations == 2 * full_evaluations("high", STEPS)


def test_each_image_of_a_batch_gets_its_own_forecast(engine: Engine) -> None:
    """diffusers' TaylorSeer hook returns a forecast one-element output as a bare tensor, whose `[0]` in
    the pipeline would hand image 0's forecast to every image: image i must match its render alone."""
    for model in ("flux.2-dev", "flux.1-dev"):
        batch, _, _ = render(engine, request(model, "high"))
        alone, _, _ = render(engine, request(model, "high", seeds=(6,)))
        assert np.abs(batch[1].astype(int) - alone[0]).max() <= 2
