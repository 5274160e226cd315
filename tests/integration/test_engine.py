"""Every model id through from_pretrained of the tiny checkpoints: sizes, determinism, Turbo, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.contract.arguments import PASSTHROUGH, served_pipeline_classes
from pipelines.contract.errors import InvalidParameter, WeightsMissing
from pipelines.contract.messages import Progress, RenderRequest
from pipelines.contract.specs import SPECS, TURBO_SIGMAS
from pipelines.engine.engine import Engine
from pipelines.engine.memory import pipeline_bytes
from pipelines.tools.signatures import passthrough_signatures
from tests.imagery import png

STEPS = 3
LOADED = ("flux.1-dev", "flux.1-kontext-dev", "flux.2-dev")


def request(model: str, seeds: list[int], width: int = 64, height: int = 48, **fields) -> RenderRequest:
    spec = SPECS[model]
    return RenderRequest(
        id=f"r{seeds[0]}",
        model=model,
        prompt=fields.pop("prompt", "a red fox"),
        width=width,
        height=height,
        steps=fields.pop("steps", STEPS),
        guidance=spec.default_guidance,
        seeds=seeds,
        **fields,
    )


def pixels(engine: Engine, req: RenderRequest) -> list[np.ndarray]:
    [result] = engine.render([req])
    return [np.frombuffer(i.data, np.uint8).reshape(i.height, i.width, 3) for i in result.images]


@pytest.mark.parametrize("model", sorted(SPECS))
def test_text_to_image_has_the_resolved_size(engine: Engine, model: str) -> None:
    [image] = pixels(engine, request(model, [7], width=80, height=48))
    assert image.shape == (48, 80, 3)
    assert image.std() > 0


@pytest.mark.parametrize("model", sorted(m for m, s in SPECS.items() if "edit" in s.modes))
def test_edit_has_the_resolved_size(engine: Engine, model: str) -> None:
    refs = [png(96, 64)] * min(2, SPECS[model].max_references)
    [image] = pixels(engine, request(model, [3], width=64, height=64, images=refs))
    assert image.shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("model", "size"),
    [
        ("flux.2-dev", (40, 40)),
        ("flux.2-dev", (900, 60)),
        ("flux.2-dev", (80, 48)),
        ("flux.1-kontext-dev", (80, 48)),
    ],
)
def test_references_of_any_size_are_fitted_not_refused(
    engine: Engine, model: str, size: tuple[int, int]
) -> None:
    # FLUX.2's pipeline itself refuses references under 64 px a side or past 8:1.
    [image] = pixels(engine, request(model, [2], images=[png(*size)]))
    assert image.shape == (48, 64, 3)


def test_flux2_edit_takes_four_references(engine: Engine) -> None:
    refs = [png(64, 64, (i * 60, 10, 10)) for i in range(4)]
    [image] = pixels(engine, request("flux.2-dev", [1], images=refs))
    assert image.shape == (48, 64, 3)


def test_same_seed_same_pixels_other_seed_other_pixels(engine: Engine) -> None:
    first, second = pixels(engine, request("flux.2-dev", [11, 12]))
    again, _ = pixels(engine, request("flux.2-dev", [11, 12]))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, second)


def test_image_i_of_a_request_is_reproducible_alone(engine: Engine) -> None:
    _, second = pixels(engine, request("flux.1-dev", [20, 21]))
    [alone] = pixels(engine, request("flux.1-dev", [21]))
    assert np.abs(second.astype(int) - alone.astype(int)).max() <= 1


def base_storage(transformer: torch.nn.Module) -> dict[str, int]:
    return {
        name.replace(".base_layer", ""): param.data_ptr()
        for name, param in transformer.named_parameters()
        if "lora_" not in name
    }


def test_turbo_changes_output_and_leaves_the_base_alone(tiny_weights: Path) -> None:
    engine = Engine(SPECS, tiny_weights)
    base_before = pixels(engine, request("flux.2-dev", [5], steps=8))[0]
    transformer = engine.pipeline(SPECS["flux.2-dev"]).transformer
    storage = base_storage(transformer)
    turbo = pixels(engine, request("flux.2-dev-turbo", [5], steps=8))[0]
    base_after = pixels(engine, request("flux.2-dev", [5], steps=8))[0]
    assert not np.array_equal(turbo, base_before)
    assert np.array_equal(base_before, base_after)
    # One checkpoint in memory: Turbo runs on flux.2-dev's own modules, whose base weights never moved.
    assert engine.loaded() == ["flux.2-dev"]
    assert engine.pipeline(SPECS["flux.2-dev-turbo"]).transformer is transformer
    assert base_storage(transformer) == storage


@pytest.mark.parametrize("steps", [4, 12])
def test_turbo_runs_any_step_count(engine: Engine, steps: int) -> None:
    ran: list[int] = []

    def on_step(progress: Progress, _pipe: object) -> bool:
        ran.append(progress.step)
        return False  # keep going

    [result] = engine.render([request("flux.2-dev-turbo", [5], steps=steps)], on_step)
    assert ran == list(range(1, steps + 1))  # the denoising loop ran that many steps, not its 8
    [image] = result.images
    assert (image.width, image.height) == (64, 48)
    assert np.frombuffer(image.data, np.uint8).std() > 0


def test_turbo_at_8_steps_runs_fals_sigmas_as_published(engine: Engine) -> None:
    spec = SPECS["flux.2-dev-turbo"]
    called: list[dict] = []
    pipe = engine.pipeline(spec)
    real = type(pipe).__call__

    def spy(self, *args, **kwargs):  # records what the engine passes, then runs the real call
        called.append(kwargs)
        return real(self, *args, **kwargs)

    type(pipe).__call__ = spy
    try:
        pixels(engine, request("flux.2-dev-turbo", [5, 6], steps=8))
    finally:
        type(pipe).__call__ = real
    assert called[-1]["sigmas"] == list(TURBO_SIGMAS)


def test_a_memory_budget_unloads_the_least_recently_used_checkpoint(tiny_weights: Path) -> None:
    size = {model: pipeline_bytes(Engine(SPECS, tiny_weights).pipeline(SPECS[model])) for model in LOADED}
    # Room for FLUX.2 beside one FLUX.1 checkpoint, and for both FLUX.1 ones, not for all three.
    budget = size["flux.2-dev"] + size["flux.1-dev"]
    assert size["flux.1-dev"] + size["flux.1-kontext-dev"] <= budget < sum(size.values())
    engine = Engine(SPECS, tiny_weights, memory_budget_bytes=budget)
    engine.pipeline(SPECS["flux.1-dev"])
    engine.pipeline(SPECS["flux.1-kontext-dev"])
    engine.pipeline(SPECS["flux1.1-pro"])  # flux.1-dev's weights, used again: kontext is least recently used
    assert engine.loaded() == ["flux.1-dev", "flux.1-kontext-dev"]
    engine.pipeline(SPECS["flux.2-dev"])
    assert engine.loaded() == ["flux.1-dev", "flux.2-dev"]
    [image] = pixels(engine, request("flux.1-kontext-dev", [1]))  # an unloaded checkpoint loads again
    assert image.shape == (48, 64, 3)
    assert engine.loaded() == ["flux.1-kontext-dev", "flux.2-dev"]


def test_alias_runs_the_root_checkpoint(engine: Engine) -> None:
    pro = pixels(engine, request("flux1.1-pro", [9]))[0]
    dev = pixels(engine, request("flux.1-dev", [9]))[0]
    assert np.array_equal(pro, dev)


def test_not_an_image_names_the_parameter(engine: Engine) -> None:
    with pytest.raises(InvalidParameter) as info:
        engine.render([request("flux.2-dev", [1], images=[b"hello, not an image"])])
    assert info.value.param == "image"


def test_bad_passthrough_value_names_the_parameter(engine: Engine) -> None:
    with pytest.raises(InvalidParameter) as info:
        engine.render([request("flux.1-dev", [1], extra={"max_sequence_length": 100000})])
    assert info.value.param == "max_sequence_length"


def test_the_declared_passthrough_arguments_are_those_of_the_installed_diffusers() -> None:
    installed = passthrough_signatures(served_pipeline_classes())
    assert installed == PASSTHROUGH, (
        "diffusers changed: rewrite the declaration with python -m pipelines.tools.signatures"
    )


def test_missing_weights_name_the_folder_and_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissing) as info:
        Engine(SPECS, tmp_path).pipeline(SPECS["flux.1-dev"])
    assert str(tmp_path / "flux.1-dev") in info.value.message
    assert "fluxd weights pull flux.1-dev" in info.value.message
