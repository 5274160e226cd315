"""Synthetic full-size models: the real configs' parameter counts on the meta device, and random weights
materialised on the CPU for shrunk configs only (a full-size model never is, here)."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipelines.contract.modes import FOOTPRINTS
from pipelines.tools import synthetic
from pipelines.tools.synthetic import FAMILY_COMPONENTS, RECIPES, build_meta, materialise

parameter_count = functools.cache(synthetic.parameter_count)

# PERFORMANCE.md and the published model cards. T5-XXL's encoder is 4.76 B (the brief's "about 4.7 B").
PUBLISHED: dict[str, float] = {
    "flux2-transformer": 32.2e9,
    "flux1-transformer": 11.9e9,
    "mistral3-text-encoder": 24.0e9,
    "t5-xxl-encoder": 4.76e9,
    "clip-l-text-encoder": 123e6,
}

SMALL_FLUX2: dict[str, Any] = {
    "num_layers": 1,
    "num_single_layers": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 4, 4, 4],
    "joint_attention_dim": 48,  # 3 stacked encoder layers x 16
    "in_channels": 16,  # 4 latent channels x 2x2 patch
    "timestep_guidance_channels": 32,
}
SMALL_VAE: dict[str, Any] = {
    "block_out_channels": [8, 8, 8, 8],
    "norm_num_groups": 4,
    "latent_channels": 4,
    "layers_per_block": 1,
}
SMALL_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}
SMALL_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}
SMALL = {
    "flux2-transformer": SMALL_FLUX2,
    "flux2-vae": SMALL_VAE,
    # 30 layers: Flux2Pipeline stacks the hidden states of layers 10, 20 and 30. The tiny tokenizers' ids fit
    # in 1024 words: with the real 131072, each prompt's logits (computed, never used) took 2 CPU-seconds.
    "mistral3-text-encoder": {
        "text_config": {**SMALL_TEXT, "head_dim": 8, "num_hidden_layers": 30, "vocab_size": 1024},
        "vision_config": {**SMALL_VISION, "head_dim": 8},
    },
    "flux1-transformer": {
        "num_layers": 1,
        "num_single_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "axes_dims_rope": [4, 6, 6],
        "joint_attention_dim": 16,
        "pooled_projection_dim": 16,
        "in_channels": 16,
    },
    "flux1-vae": SMALL_VAE,
    "t5-xxl-encoder": {"d_model": 16, "d_kv": 8, "d_ff": 32, "num_heads": 2, "num_layers": 1},
    "clip-l-text-encoder": {**SMALL_TEXT, "num_hidden_layers": 1, "projection_dim": 16},
}


@pytest.mark.parametrize(("component", "expected"), PUBLISHED.items())
def test_parameter_counts_match_the_published_sizes(component: synthetic.Component, expected: float) -> None:
    assert abs(parameter_count(component) - expected) <= 0.01 * expected


def test_meta_build_allocates_nothing() -> None:
    model = build_meta("flux2-transformer")

    assert all(p.is_meta for p in model.parameters())


def test_mode_footprints_agree_with_the_configs() -> None:
    for family, footprint in (("flux2", FOOTPRINTS["flux2"]), ("flux1", FOOTPRINTS["flux1"])):
        slots = FAMILY_COMPONENTS[family]
        encoders = sum(parameter_count(c) for slot, c in slots.items() if slot.startswith("text_encoder"))
        assert (
            abs(parameter_count(slots["transformer"]) - footprint.transformer) <= 0.01 * footprint.transformer
        )
        assert abs(encoders - footprint.encoders) <= 0.01 * footprint.encoders
        assert abs(parameter_count(slots["vae"]) - footprint.vae) <= 0.01 * footprint.vae
        streamed = max(streamed_at_once(component) for component in slots.values())
        assert abs(streamed - footprint.streamed) <= 0.01 * footprint.streamed


def streamed_at_once(component: synthetic.Component) -> int:
    """Parameters outside the repeated blocks plus the two largest blocks: resident while streaming."""
    model = build_meta(component)
    blocks = sorted(sum(p.numel() for p in block.parameters()) for block in synthetic.block_lists(model))
    return sum(p.numel() for p in model.parameters()) - sum(blocks) + sum(blocks[-2:])


def test_every_config_names_its_source() -> None:
    for name in [*RECIPES, synthetic.SCHEDULER_CONFIG]:
        assert len(synthetic.load_config(name)["_source"]) > 40, name


def test_unknown_config_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^name: no config 'flux3'"):
        synthetic.load_config("flux3")


def test_materialise_a_shrunk_flux2_gives_finite_values_of_the_dtype() -> None:
    model = build_meta("flux2-transformer", SMALL_FLUX2)

    materialise(model, "cpu", torch.bfloat16, seed=3)

    params = list(model.parameters())
    assert params and all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params)
    assert all(torch.isfinite(p.float()).all() for p in params)
    assert not any(p.requires_grad for p in params)
    tokens, text = 16, 4
    out = model(
        hidden_states=torch.randn(1, tokens, 16, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, text, 48, dtype=torch.bfloat16),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([4.0]),
        img_ids=torch.zeros(tokens, 4),
        txt_ids=torch.zeros(text, 4),
    ).sample
    assert out.shape == (1, tokens, 16) and torch.isfinite(out.float()).all()


def test_materialise_is_seeded_and_skips_what_has_storage() -> None:
    first = materialise(build_meta("flux2-transformer", SMALL_FLUX2), "cpu", torch.float32, seed=5)
    second = materialise(build_meta("flux2-transformer", SMALL_FLUX2), "cpu", torch.float32, seed=5)
    block = build_meta("flux2-transformer", SMALL_FLUX2)
    materialise(block.transformer_blocks[0], "cpu", torch.float16, seed=5)

    materialise(block, "cpu", torch.float32, seed=5)

    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    assert block.transformer_blocks[0].attn.to_q.weight.dtype == torch.float16
    assert block.proj_out.weight.dtype == torch.float32


def test_tied_weights_stay_tied() -> None:
    model = build_meta("t5-xxl-encoder", SMALL["t5-xxl-encoder"])

    materialise(model, "cpu", torch.float32)

    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert not model.shared.weight.is_meta


def test_buffers_keep_their_values() -> None:
    model = build_meta("clip-l-text-encoder", SMALL["clip-l-text-encoder"])

    materialise(model, "cpu", torch.bfloat16)

    buffers = dict(model.named_buffers())
    position_ids = next(value for name, value in buffers.items() if name.endswith("position_ids"))
    assert torch.equal(position_ids, torch.arange(77).unsqueeze(0))


@pytest.mark.parametrize(
    ("model_id", "pipeline_class"),
    [
        ("flux.2-dev", "Flux2Pipeline"),
        ("flux.1-kontext-dev", "FluxKontextPipeline"),
        ("flux.1-dev", "FluxPipeline"),
    ],
)
def test_full_size_pipelines_assemble_on_meta(model_id: str, pipeline_class: str, tiny_weights: Path) -> None:
    pipe = synthetic.build_pipeline(model_id, None, torch.bfloat16, tiny_weights / model_id)

    assert type(pipe).__name__ == pipeline_class
    assert all(p.is_meta for p in pipe.transformer.parameters())
    assert pipe.scheduler.config.use_dynamic_shifting


def two_steps(pipe: Any) -> Any:
    """A 64x64 text-to-image call of two steps, the prompt padded to 32 tokens."""
    return pipe(
        prompt="a red fox",
        width=64,
        height=64,
        num_inference_steps=2,
        max_sequence_length=32,
        output_type="np",
    )


def test_a_shrunk_flux2_pipeline_generates(tiny_weights: Path) -> None:
    pipe = synthetic.build_pipeline(
        "flux.2-dev", "cpu", torch.float32, tiny_weights / "flux.2-dev", seed=1, overrides=SMALL
    )
    pipe.set_progress_bar_config(disable=True)

    out = two_steps(pipe)

    assert out.images.shape == (1, 64, 64, 3)


def test_a_shrunk_kontext_pipeline_edits(tiny_weights: Path) -> None:
    from PIL import Image

    pipe = synthetic.build_pipeline(
        "flux.1-kontext-dev", "cpu", torch.float32, tiny_weights / "flux.1-kontext-dev", overrides=SMALL
    )
    pipe.set_progress_bar_config(disable=True)

    out = pipe(
        image=Image.new("RGB", (64, 64)),
        prompt="make it blue",
        width=64,
        height=64,
        num_inference_steps=2,
        max_sequence_length=32,
        max_area=64 * 64,  # both keep Kontext from scaling the request up to its ~1 MP resolutions
        _auto_resize=False,
        output_type="np",
    )

    assert out.images.shape == (1, 64, 64, 3)


def test_the_bench_quantises_the_repeated_blocks() -> None:

    transformer = list(synthetic.block_lists(build_meta("flux2-transformer")))
    encoder = list(synthetic.block_lists(build_meta("mistral3-text-encoder")))

    assert len(transformer) == 8 + 48
    assert len(encoder) == 40 + 24  # the language model's layers and the vision tower's


def test_importing_synthetic_and_bench_leaves_torch_out() -> None:
    code = (
        "import sys, pipelines.tools.synthetic, pipelines.tools.bench_gpu; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize(
    ("transformer", "offload"),
    [("float8", "none"), ("nf4", "none"), ("bfloat16", "group"), ("bfloat16", "encoder")],
    ids=["float8", "nf4", "group-offload", "encoder-offload"],
)
def test_the_bench_prepares_a_mode_as_serve_places_it(
    tiny_weights: Path, transformer: str, offload: str
) -> None:
    from torchao.quantization import Float8Tensor

    from pipelines.contract.modes import ResolvedMode

    mode = ResolvedMode("resident", transformer, "bfloat16", offload, False, 0, "test")  # type: ignore[arg-type]
    pipe = synthetic.synthetic_pipeline(
        "flux.2-dev", mode, "cpu", tiny_weights / "flux.2-dev", overrides=SMALL
    )
    weight = pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert isinstance(weight, Float8Tensor) == (transformer == "float8")
    assert (type(weight).__name__ == "Params4bit" and weight.bnb_quantized) == (transformer == "nf4")
    assert pipe.transformer.x_embedder.weight.dtype == torch.bfloat16  # outside the blocks: bf16
    assert (getattr(pipe.transformer, "_diffusers_hook", None) is not None) == (offload == "group")
    assert (getattr(pipe.text_encoder, "_diffusers_hook", None) is not None) == (offload != "none")
    out = two_steps(pipe)
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_the_engine_serves_synthetic_weights_turbo_included(tiny_weights: Path) -> None:
    from pipelines.contract.messages import RenderRequest
    from pipelines.contract.specs import SPECS
    from pipelines.engine.engine import Engine, SyntheticWeights

    engine = Engine(
        SPECS, tiny_weights / "absent", synthetic=SyntheticWeights(tiny_weights, SMALL, lora_rank=2)
    )
    results = {}
    for model, steps in (("flux.2-dev", 2), ("flux.2-dev-turbo", 8), ("flux.1-kontext-dev", 2)):
        request = RenderRequest("r", model, "a red fox", 64, 48, steps, SPECS[model].default_guidance, [1])
        [result] = engine.render([request])
        results[model] = result.images[0]
        assert (result.images[0].width, result.images[0].height) == (64, 48)
    assert results["flux.2-dev"].data != results["flux.2-dev-turbo"].data  # the random LoRA is live
    assert engine.loaded() == ["flux.1-kontext-dev", "flux.2-dev"]


@pytest.mark.parametrize("precision", ["bfloat16", "float8"])
def test_the_bench_times_turbo_unfused_then_without_its_lora(tiny_weights: Path, precision: str) -> None:
    import argparse

    from pipelines.contract.modes import ResolvedMode
    from pipelines.contract.specs import SPECS
    from pipelines.tools.bench_gpu import measure

    # float8: peft could not merge into the quantised base, so the fused row used to fail there.
    mode = ResolvedMode("resident", precision, "bfloat16", "none", False, 0, "test")
    args = argparse.Namespace(size=(64, 64), steps=8)
    unfused, fused = measure(SPECS["flux.2-dev-turbo"], "resident", mode, args, tiny_weights, "cpu", SMALL)
    assert "unfused" in unfused.note and "fused copy" in fused.note
    for row in (unfused, fused):
        assert row.steps == 8 and row.size == "64x64" and row.peak_gb is None
        assert row.step_ms and row.text_encode_ms and row.vae_ms and row.total_s
