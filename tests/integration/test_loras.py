"""User LoRAs on the tiny checkpoints, through the worker's Engine: every key layout diffusers converts, per
family, changes the pixels; scale 0 and the base stay bit for bit; LoRAs stack, stay unfused on the one copy
of the base, are cached under a byte budget, and a LoRA that cannot load is a 400 naming `loras`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.lora_catalog import FOLDER, LoraChoice, inspect, resolve
from pipelines.contract.messages import RenderRequest
from pipelines.contract.specs import SPECS
from pipelines.engine.engine import Engine
from pipelines.tools.tiny import LORA_LAYOUTS, build_flux1, build_flux2, lora_state_dict
from tests.imagery import png
from tests.integration.test_engine import base_storage, pixels, request
from tests.integration.test_run_modes import CPU

# A model per family and mode: FLUX.2 text-to-image, FLUX.1 [dev], and Kontext editing with FLUX.1's LoRAs.
MODELS = {"flux2": "flux.2-dev", "flux1": "flux.1-dev"}
CASES = [(family, layout) for family, layouts in LORA_LAYOUTS.items() for layout in layouts]


@pytest.fixture(scope="module")
def weights(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoints beside a LoRA folder of this module's own: one LoRA per family and layout."""
    root = tmp_path_factory.mktemp("lora-weights")
    for folder in tiny_weights.iterdir():
        if folder.name != FOLDER:
            (root / folder.name).symlink_to(folder)
    loras = root / FOLDER
    loras.mkdir()
    transformers = {"flux2": build_flux2().transformer, "flux1": build_flux1("FluxPipeline").transformer}
    for family, layout in CASES:
        for seed in (1, 2):
            state = lora_state_dict(transformers[family], layout, seed)
            save_file(state, loras / f"{family}-{layout}-{seed}.safetensors")
    return root


@pytest.fixture(scope="module")
def engine(weights: Path) -> Engine:
    return Engine(SPECS, weights)


def with_loras(weights: Path, req: RenderRequest, *entries: tuple[str, float]) -> RenderRequest:
    spec = SPECS[req.model]
    return dataclasses.replace(req, loras=resolve(list(entries), spec.family, spec.id, weights))


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_each_layout_changes_pixels_and_scale_zero_is_the_base(
    engine: Engine, weights: Path, family: str, layout: str
) -> None:
    model = MODELS[family]
    name = f"{family}-{layout}-1"
    assert inspect(weights / FOLDER / f"{name}.safetensors", name).family == family
    base = pixels(engine, request(model, [5]))[0]
    lora = pixels(engine, with_loras(weights, request(model, [5]), (name, 1.0)))[0]
    zero = pixels(engine, with_loras(weights, request(model, [5]), (name, 0.0)))[0]
    after = pixels(engine, request(model, [5]))[0]
    assert np.abs(lora.astype(int) - base.astype(int)).mean() > 1
    assert np.array_equal(zero, base)
    assert np.array_equal(after, base)


def test_kontext_edits_with_a_flux1_lora(engine: Engine, weights: Path) -> None:
    edit = request("flux.1-kontext-dev", [3], width=64, height=64, images=[png(64, 64)])
    base = pixels(engine, edit)[0]
    lora = pixels(engine, with_loras(weights, edit, ("flux1-kohya-1", 1.0)))[0]
    assert not np.array_equal(base, lora)


def test_two_loras_stack_and_each_scale_counts(engine: Engine, weights: Path) -> None:
    req = request("flux.2-dev", [8])
    one = pixels(engine, with_loras(weights, req, ("flux2-bfl-1", 1.0)))[0]
    other = pixels(engine, with_loras(weights, req, ("flux2-kohya-2", 1.0)))[0]
    both = pixels(engine, with_loras(weights, req, ("flux2-bfl-1", 1.0), ("flux2-kohya-2", 1.0)))[0]
    # The second at scale 0 adds nothing to the first: the stack is the sum of what each adds.
    first_only = pixels(engine, with_loras(weights, req, ("flux2-bfl-1", 1.0), ("flux2-kohya-2", 0.0)))[0]
    assert not np.array_equal(both, one) and not np.array_equal(both, other)
    assert np.array_equal(first_only, one)


def test_a_user_lora_stacks_on_turbo(engine: Engine, weights: Path) -> None:
    turbo = request("flux.2-dev-turbo", [4], steps=8)
    alone = pixels(engine, turbo)[0]
    stacked = pixels(engine, with_loras(weights, turbo, ("flux2-diffusers-1", 1.0)))[0]
    zero = pixels(engine, with_loras(weights, turbo, ("flux2-diffusers-1", 0.0)))[0]
    assert not np.array_equal(alone, stacked)
    assert np.array_equal(alone, zero)
    assert np.array_equal(pixels(engine, turbo)[0], alone)


def test_loras_are_adapters_on_the_one_copy_of_the_base(weights: Path) -> None:
    engine = Engine(SPECS, weights)
    pipe = engine.pipeline(SPECS["flux.2-dev"])
    storage = base_storage(pipe.transformer)
    count = sum(p.numel() for n, p in pipe.transformer.named_parameters() if "lora_" not in n)
    for name in ("flux2-bfl-1", "flux2-kohya-1", "flux2-peft-2"):
        pixels(engine, with_loras(weights, request("flux.2-dev", [1]), (name, 0.7)))
    pixels(engine, request("flux.2-dev-turbo", [1], steps=8))
    transformer = engine.pipeline(SPECS["flux.2-dev"]).transformer
    assert transformer is pipe.transformer and engine.loaded() == ["flux.2-dev"]
    assert base_storage(transformer) == storage  # no base weight was copied, moved or fused
    assert sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n) == count
    assert len(engine.adapters.loaded("flux.2-dev")) == 4


def test_a_lora_applies_on_a_float8_base(weights: Path) -> None:
    from torchao.quantization import Float8Tensor

    engine = Engine(SPECS, weights)
    engine.modes["flux.2-dev"] = dataclasses.replace(CPU, transformer="float8")
    base = pixels(engine, request("flux.2-dev", [2]))[0]
    lora = pixels(engine, with_loras(weights, request("flux.2-dev", [2]), ("flux2-kohya-1", 1.0)))[0]
    zero = pixels(engine, with_loras(weights, request("flux.2-dev", [2]), ("flux2-kohya-1", 0.0)))[0]
    layer = engine.pipeline(SPECS["flux.2-dev"]).transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer.base_layer.weight, Float8Tensor)  # wrapped by the adapter, still fp8
    assert np.abs(lora.astype(int) - base.astype(int)).mean() > 1
    assert np.array_equal(zero, base)


def test_the_cache_keeps_the_budget_least_recently_used_first(weights: Path) -> None:
    names = ["flux2-bfl-1", "flux2-bfl-2", "flux2-kohya-1"]
    probe = Engine(SPECS, weights)
    pixels(probe, with_loras(weights, request("flux.2-dev", [1], steps=1), (names[0], 1.0)))
    one = probe.adapters.held_bytes
    engine = Engine(SPECS, weights, lora_cache_bytes=2 * one)  # room for two of these same-sized LoRAs
    results = []
    for name in (*names, names[2], names[0]):
        [result] = engine.render([with_loras(weights, request("flux.2-dev", [1], steps=1), (name, 1.0))])
        results.append((result.timings_ms["lora_loads"], result.timings_ms["lora_cache_hits"]))
    # Loaded, loaded, loaded (the first one leaves), a hit, and the first one loads again.
    assert results == [(1, 0), (1, 0), (1, 0), (0, 1), (1, 0)]
    keys = {c.key: c.name for n in names for c in resolve([(n, 1.0)], "flux2", "flux.2-dev", weights)}
    assert sorted(keys[k] for k in engine.adapters.loaded("flux.2-dev")) == ["flux2-bfl-1", "flux2-kohya-1"]
    assert engine.adapters.held_bytes <= 2 * one
    # What the cache holds is what the transformer holds: an evicted adapter is deleted from it.
    assert sorted(engine.pipeline(SPECS["flux.2-dev"]).get_list_adapters()["transformer"]) == sorted(
        engine.adapters.loaded("flux.2-dev")
    )


def test_a_flux1_lora_on_flux2_is_refused_naming_loras(engine: Engine, weights: Path) -> None:
    with pytest.raises(InvalidParameter) as info:
        resolve([("flux1-diffusers-1", 1.0)], "flux2", "flux.2-dev", weights)
    assert info.value.param == "loras" and "FLUX.1" in info.value.message


def test_a_lora_the_model_cannot_take_is_a_400_and_the_engine_goes_on(engine: Engine, weights: Path) -> None:
    """Past the front (a family its header cannot tell), the worker's load refuses it; the base is intact."""
    base = pixels(engine, request("flux.2-dev", [6]))[0]
    wrong = LoraChoice("wrong", str(weights / FOLDER / "flux1-kohya-1.safetensors"), 1.0, "lora_wrong")
    nothing = {"transformer.no_such_block.lora_A.weight": torch.zeros(4, 8)}
    nothing["transformer.no_such_block.lora_B.weight"] = torch.zeros(8, 4)
    save_file(nothing, weights / FOLDER / "nothing.safetensors")
    empty = LoraChoice("nothing", str(weights / FOLDER / "nothing.safetensors"), 1.0, "lora_nothing")
    for choice in (wrong, empty):
        with pytest.raises(InvalidParameter) as info:
            engine.render([dataclasses.replace(request("flux.2-dev", [6]), loras=[choice])])
        assert info.value.param == "loras"
    assert np.array_equal(pixels(engine, request("flux.2-dev", [6]))[0], base)
    pixels(engine, with_loras(weights, request("flux.2-dev", [6]), ("flux2-bfl-1", 1.0)))
