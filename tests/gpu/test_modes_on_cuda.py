"""Each run mode on a real CUDA device, with the tiny checkpoints: the paths the CPU suite cannot take
(dynamic fp8 kernels, bitsandbytes nf4, model offload, streamed group offload, compile on CUDA, the Turbo
LoRA over each). Skipped without CUDA. Written without a GPU at hand and not run yet: the first GPU session
runs them first, `python -m pytest -q tests/gpu`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.contract.modes import ResolvedMode
from pipelines.contract.specs import SPECS
from pipelines.engine.engine import Engine
from tests.integration.test_engine import pixels, request

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda:0"
BF16 = ResolvedMode("resident", "bfloat16", "bfloat16", "none", False, 0, "test")
MODES = {
    "resident-bf16": BF16,
    "resident-fp8": dataclasses.replace(BF16, transformer="float8", encoder="float8"),
    "fast": dataclasses.replace(BF16, mode="fast", transformer="float8", encoder="float8", compile=True),
    "lowvram": dataclasses.replace(BF16, mode="lowvram", transformer="nf4", encoder="nf4", offload="model"),
    "offload-encoder": dataclasses.replace(BF16, mode="offload", offload="encoder"),
    "offload-group": dataclasses.replace(BF16, mode="offload", offload="group"),
}


def engine_in(tiny_weights: Path, mode: ResolvedMode) -> Engine:
    engine = Engine(SPECS, tiny_weights, device=DEVICE, prompt_cache_bytes=2**26)
    for weights_id in engine.modes:
        engine.modes[weights_id] = mode
    return engine


def test_auto_resolves_against_this_gpu(tiny_weights: Path) -> None:
    engine = Engine(SPECS, tiny_weights, device=DEVICE)
    modes = engine.describe_modes()
    assert all(mode["mode"] in ("resident", "lowvram", "offload") for mode in modes.values()), modes
    [image] = pixels(engine, request("flux.2-dev", [1]))
    assert image.shape == (48, 64, 3)


@pytest.mark.parametrize("name", list(MODES))
def test_every_model_renders_in_each_mode(tiny_weights: Path, name: str) -> None:
    engine = engine_in(tiny_weights, MODES[name])
    if MODES[name].compile:
        engine.warm_up()
    for model in ("flux.2-dev", "flux.2-dev-turbo", "flux.1-dev", "flux.1-kontext-dev"):
        steps = 8 if model.endswith("turbo") else 3
        [image] = pixels(engine, request(model, [2], steps=steps))
        assert image.shape == (48, 64, 3) and image.std() > 0, model


@pytest.mark.parametrize("name", ["resident-fp8", "lowvram"])
def test_turbo_lora_over_a_quantised_base_moves_it_as_over_bf16(tiny_weights: Path, name: str) -> None:
    def lora_effect(engine: Engine) -> np.ndarray:
        fields = {"steps": 8, "prompt": "a lighthouse"}
        base = pixels(engine, request("flux.2-dev", [3], **fields))[0].astype(int)
        return pixels(engine, request("flux.2-dev-turbo", [3], **fields))[0].astype(int) - base

    full, quantised = (
        lora_effect(engine_in(tiny_weights, BF16)),
        lora_effect(engine_in(tiny_weights, MODES[name])),
    )
    assert np.corrcoef(full.ravel(), quantised.ravel())[0, 1] > 0.5


def test_lowvram_leaves_every_component_in_cpu_memory_between_calls(tiny_weights: Path) -> None:
    engine = engine_in(tiny_weights, MODES["lowvram"])
    pipe = engine.pipeline(SPECS["flux.2-dev"])
    pixels(engine, request("flux.2-dev", [1]))
    # Model offload: after a call every component is back in CPU memory.
    assert all(
        p.device.type == "cpu"
        for c in pipe.components.values()
        if isinstance(c, torch.nn.Module)
        for p in c.parameters()
    )
