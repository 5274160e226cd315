"""Each run mode's loading path on the tiny checkpoints, on the CPU: what can run without a GPU does run here.

float8 is torchao's weight-only recipe on the CPU (the dynamic fp8 kernels need an SM 8.9 GPU), loaded
through the same diffusers quantisation config as on a GPU; group offload streams blocks CPU to CPU; compile
is torch.compile of the repeated blocks. nf4 (bitsandbytes) and model offload need CUDA and are not run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipelines.contract.errors import InvalidParameter, ModeUnfit
from pipelines.contract.modes import ResolvedMode
from pipelines.contract.specs import SPECS
from pipelines.engine import loading
from pipelines.engine.engine import Engine
from pipelines.engine.memory import tensor_bytes
from pipelines.tools.synthetic import build_meta
from tests.imagery import png
from tests.integration.test_engine import pixels, request

CPU = ResolvedMode("cpu", "float32", "float32", "none", False, 0, "test")


def engine_in(tiny_weights: Path, weights_id: str, **changes: object) -> Engine:
    engine = Engine(SPECS, tiny_weights)
    engine.modes[weights_id] = dataclasses.replace(CPU, **changes)
    return engine


def as_int(image: np.ndarray) -> np.ndarray:
    return image.astype(int)


@pytest.fixture(scope="module")
def reference(tiny_weights: Path) -> Engine:
    return Engine(SPECS, tiny_weights)


def test_float8_quantises_transformer_and_encoder_while_loading(tiny_weights: Path) -> None:
    from torchao.quantization import Float8Tensor

    engine = engine_in(tiny_weights, "flux.2-dev", transformer="float8", encoder="float8")
    pipe = engine.pipeline(SPECS["flux.2-dev"])
    weight = pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert isinstance(weight, Float8Tensor)
    # A byte per weight and a scale per row, though the tensor reports the dtype it stands for.
    assert (
        tensor_bytes(weight) == weight.numel() + 4 * weight.shape[0] < weight.numel() * weight.element_size()
    )
    assert isinstance(pipe.text_encoder.model.language_model.layers[0].mlp.up_proj.weight, Float8Tensor)
    assert not isinstance(pipe.vae.decoder.conv_in.weight, Float8Tensor)
    [image] = pixels(engine, request("flux.2-dev", [1]))
    assert image.shape == (48, 64, 3) and image.std() > 0


def test_turbo_lora_on_a_float8_base_does_what_it_does_on_full_precision(
    tiny_weights: Path, reference: Engine
) -> None:
    engine = engine_in(tiny_weights, "flux.2-dev", transformer="float8", encoder="float8")
    turbo = dict(steps=8, prompt="a lighthouse")
    base_full = as_int(pixels(reference, request("flux.2-dev", [3], **turbo))[0])
    turbo_full = as_int(pixels(reference, request("flux.2-dev-turbo", [3], **turbo))[0])
    base_fp8 = as_int(pixels(engine, request("flux.2-dev", [3], **turbo))[0])
    turbo_fp8 = as_int(pixels(engine, request("flux.2-dev-turbo", [3], **turbo))[0])
    lora_effect = np.abs(turbo_full - base_full).mean()
    # The LoRA moves the fp8 base the way it moves the full-precision one: what is left is fp8 rounding.
    assert np.abs(turbo_fp8 - turbo_full).mean() < 0.5 * lora_effect
    assert np.corrcoef((turbo_fp8 - base_fp8).ravel(), (turbo_full - base_full).ravel())[0, 1] > 0.5


def test_group_offload_streams_blocks_and_changes_no_pixel(tiny_weights: Path, reference: Engine) -> None:
    engine = engine_in(tiny_weights, "flux.1-dev", mode="offload", offload="group")
    pipe = engine.pipeline(SPECS["flux.1-dev"])
    assert getattr(pipe.transformer, "_diffusers_hook", None) is not None
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    assert not reference.pipeline(SPECS["flux.1-dev"]).vae.use_tiling
    # The tiny VAE tiles above 32 px (the real ones above 1024): compare with a resident pipeline whose VAE
    # tiles alike, so what is left is the streaming alone.
    resident = Engine(SPECS, tiny_weights)
    resident.pipeline(SPECS["flux.1-dev"]).vae.enable_tiling()
    want = pixels(resident, request("flux.1-dev", [4]))[0]
    got = pixels(engine, request("flux.1-dev", [4]))[0]
    assert np.array_equal(got, want)


@pytest.mark.parametrize(
    ("component", "descend", "lists"),
    [
        ("mistral3-text-encoder", {"model", "language_model"}, ["model.language_model.layers"]),
        ("t5-xxl-encoder", {"encoder"}, ["encoder.block"]),
        ("clip-l-text-encoder", {"encoder"}, ["encoder.layers"]),
        ("flux2-transformer", set(), ["transformer_blocks", "single_transformer_blocks"]),
    ],
)
def test_group_offload_finds_each_real_encoders_layers(component: str, descend: set, lists: list) -> None:
    model = build_meta(component)  # the published configuration, on the meta device
    blocks = loading.offload_blocks(model)
    assert descend <= set(blocks)
    assert not {"transformer_blocks", "single_transformer_blocks", "layers", "block"} & set(blocks)
    for path in lists:
        assert isinstance(model.get_submodule(path), torch.nn.ModuleList)


def group_hooked(module: torch.nn.Module) -> bool:
    return "group_offloading" in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})


def test_streamed_encoders_move_a_layer_at_a_time(tiny_weights: Path) -> None:
    # diffusers splits only a module's own lists: without offload_blocks each encoder was one group, which
    # for the real Mistral encoder is 48 GB at once.
    for weights_id, layers in (
        ("flux.2-dev", lambda p: [*p.text_encoder.model.language_model.layers]),
        (
            "flux.1-dev",
            lambda p: [*p.text_encoder.encoder.layers, *p.text_encoder_2.encoder.block],
        ),
    ):
        engine = engine_in(tiny_weights, weights_id, mode="offload", offload="encoder")
        pipe = engine.pipeline(SPECS[weights_id])
        assert all(group_hooked(layer) for layer in layers(pipe)), weights_id


def test_enhancement_is_refused_when_the_encoder_streams(tiny_weights: Path) -> None:
    engine = engine_in(tiny_weights, "flux.2-dev", mode="offload", offload="encoder")
    enhance = request("flux.2-dev", [1], enhance_prompt=True)
    with pytest.raises(InvalidParameter) as info:
        engine.render([enhance])
    assert info.value.param == "prompt_enhancement" and "streamed" in info.value.message


def test_model_offload_keeps_the_vae_on_the_device_so_previews_leave_the_transformer(
    tiny_weights: Path,
) -> None:
    engine = engine_in(tiny_weights, "flux.1-dev", mode="lowvram", offload="model")
    pipe = engine.pipeline(SPECS["flux.1-dev"])
    assert "vae" not in pipe.model_cpu_offload_seq and not hasattr(pipe.vae, "_hf_hook")
    [transformer_hook] = [hook for hook in pipe._all_hooks if hook.model is pipe.transformer]
    offloads = []
    transformer_hook.offload = lambda: offloads.append(1)
    previews = []
    job = request("flux.1-dev", [7], steps=4, partial_images=2)
    [result] = engine.render([job], lambda progress, _: previews.append(progress.preview) or False)
    assert sum(preview is not None for preview in previews) == 2
    assert offloads == []  # neither the previews nor the final decode sent the transformer away
    tiled = Engine(SPECS, tiny_weights)  # the tiny VAE tiles above 32 px, as model offload has it do
    tiled.pipeline(SPECS["flux.1-dev"]).vae.enable_tiling()
    want = pixels(tiled, request("flux.1-dev", [7], steps=4))[0]
    got = np.frombuffer(result.images[0].data, np.uint8).reshape(want.shape)
    assert np.abs(as_int(got) - as_int(want)).max() <= 1


def test_float8_without_fp8_matmuls_is_weight_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig

    for capability, recipe in (
        ((8, 0), Float8WeightOnlyConfig),
        ((9, 0), Float8DynamicActivationFloat8WeightConfig),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert isinstance(loading.float8_config("cuda:0"), recipe), capability


def test_encoder_offload_streams_the_text_encoders_only_and_changes_no_pixel(
    tiny_weights: Path, reference: Engine
) -> None:
    engine = engine_in(tiny_weights, "flux.1-dev", mode="offload", offload="encoder")
    pipe = engine.pipeline(SPECS["flux.1-dev"])
    hooked = {slot for slot, c in pipe.components.items() if getattr(c, "_diffusers_hook", None) is not None}
    assert hooked == {"text_encoder", "text_encoder_2"}
    assert not pipe.vae.use_tiling  # the VAE is resident: no need to tile
    want = pixels(reference, request("flux.1-dev", [6]))[0]
    assert np.array_equal(pixels(engine, request("flux.1-dev", [6]))[0], want)


def test_compiled_mode_warms_up_base_and_turbo_so_no_request_compiles(
    tiny_weights: Path, reference: Engine
) -> None:
    from torch._dynamo.utils import counters

    small = {m: SPECS[m].with_overrides(default_size=(128, 128)) for m in ("flux.2-dev", "flux.2-dev-turbo")}
    engine = Engine({**SPECS, **small}, tiny_weights)
    engine.modes["flux.2-dev"] = dataclasses.replace(CPU, mode="fast", compile=True)
    engine.warm_up()
    transformer = engine.pipeline(small["flux.2-dev"]).transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0
    got = {}
    for model, steps in (("flux.2-dev", 3), ("flux.2-dev-turbo", 8), ("flux.2-dev", 3)):
        got[model] = pixels(engine, request(model, [5], width=128, height=128, steps=steps))[0]
    # Other sizes, batches and a reference image (a longer sequence) reuse the warm-up's dynamic graphs.
    for model, steps in (("flux.2-dev", 2), ("flux.2-dev-turbo", 8)):
        pixels(engine, request(model, [1], width=64, height=48, steps=steps))
        pixels(engine, request(model, [1, 2, 3], width=80, height=112, steps=steps))
        pixels(engine, request(model, [1], width=64, height=48, steps=steps, images=[png(64, 64)]))
    assert counters["stats"]["unique_graphs"] == compiled  # warm-up compiled every graph requests need
    want = pixels(reference, request("flux.2-dev", [5], width=128, height=128, steps=3))[0]
    assert np.abs(as_int(got["flux.2-dev"]) - as_int(want)).max() <= 2


def test_nf4_asks_diffusers_for_bitsandbytes_on_each_quantised_component(tiny_weights: Path) -> None:
    nf4 = dataclasses.replace(CPU, mode="lowvram", transformer="nf4", encoder="nf4", offload="model")
    index = loading.model_index(tiny_weights / "flux.1-dev")
    mapping = loading.quantizers(index, nf4, "cuda:0")
    assert mapping
    assert set(mapping) == {"transformer", "text_encoder", "text_encoder_2"}
    assert type(mapping["transformer"]).__module__.startswith("diffusers")
    assert type(mapping["text_encoder_2"]).__module__.startswith("transformers")
    assert all(c.bnb_4bit_quant_type == "nf4" and c.load_in_4bit for c in mapping.values())
    assert all(c.bnb_4bit_compute_dtype == torch.bfloat16 for c in mapping.values())
    assert loading.quantizers(index, CPU, "cpu") == {}


def test_an_explicit_mode_that_cannot_fit_leaves_that_model_unavailable(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Engine, "_gpu_bytes", lambda self: 16 * 10**9)  # a 16 GB card
    engine = Engine(SPECS, tiny_weights, modes={"flux.2-dev": "resident"})
    modes = engine.describe_modes()
    assert modes["flux.2-dev"]["mode"] is None and "16.0 GB" in modes["flux.2-dev"]["error"]
    assert modes["flux.1-dev"]["mode"] == "lowvram"  # auto: resident fits neither in bf16 nor fp8
    with pytest.raises(ModeUnfit, match="'resident' needs about"):
        engine.render([request("flux.2-dev-turbo", [1], steps=8)])


def test_a_checkpoint_that_would_not_fit_beside_the_loaded_ones_unloads_them_first(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Engine, "_gpu_bytes", lambda self: 80 * 10**9)  # an 80 GB card
    engine = Engine(SPECS, tiny_weights)
    estimates = {"flux.2-dev": 59, "flux.1-dev": 37, "flux.1-kontext-dev": 37}  # GB, 3 of them headroom
    for weights_id, gb in estimates.items():
        engine.modes[weights_id] = dataclasses.replace(CPU, gpu_bytes=gb * 10**9)
    engine.render([request("flux.2-dev", [1])])
    engine.render([request("flux.1-dev", [1])])
    assert engine.loaded() == ["flux.1-dev"]  # 37 + 56 GB would not fit: flux.2-dev went first
    engine.render([request("flux.1-kontext-dev", [1])])
    assert engine.loaded() == ["flux.1-dev", "flux.1-kontext-dev"]  # 37 + 34 GB fit


def test_modes_leave_room_for_the_prompt_cache(tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    card = SimpleNamespace(total_memory=80 * 10**9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    engine = Engine(SPECS, tiny_weights, device="cuda:0", prompt_cache_bytes=512 * 2**20)
    assert engine.gpu_bytes == 80 * 10**9 - 512 * 2**20
    budgeted = Engine(SPECS, tiny_weights, "cuda:0", memory_budget_bytes=40 * 10**9, prompt_cache_bytes=2**20)
    assert budgeted.gpu_bytes == 40 * 10**9 - 2**20
