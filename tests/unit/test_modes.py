"""Mode selection from the device's memory: pure arithmetic over PERFORMANCE.md's figures, no torch."""

from __future__ import annotations

import dataclasses

import pytest

from pipelines.contract.modes import FOOTPRINTS, MODES, ResolvedMode, choose_mode
from pipelines.contract.specs import SPECS

GB = 10**9
H100 = 80 * GB
H200 = 141 * GB


def test_modes_are_the_documented_five() -> None:
    assert MODES == ("resident", "fast", "lowvram", "offload", "auto")


def test_bf16_flux2_does_not_fit_80gb_so_resident_is_fp8() -> None:
    bf16_weights = 2 * (FOOTPRINTS["flux2"].transformer + FOOTPRINTS["flux2"].encoders)
    assert bf16_weights > H100  # 64.4 GB transformer + 48 GB encoder

    resolved = choose_mode("flux.2-dev", H100, "auto")

    assert (resolved.mode, resolved.transformer, resolved.encoder) == ("resident", "float8", "float8")
    assert resolved.offload == "none" and not resolved.compile
    assert 56 * GB < resolved.gpu_bytes < H100  # "about 56 GB" of fp8 weights plus headroom
    assert "bfloat16" in resolved.reason and "too much" in resolved.reason


def test_h200_holds_flux2_in_bf16() -> None:
    resolved = choose_mode("flux.2-dev", H200, "auto")

    assert (resolved.mode, resolved.transformer, resolved.encoder) == ("resident", "bfloat16", "bfloat16")


def test_a_24gb_card_runs_flux2_in_lowvram_within_22gb() -> None:
    resolved = choose_mode("flux.2-dev", 24 * GB, "auto")

    assert (resolved.mode, resolved.transformer, resolved.encoder) == ("lowvram", "nf4", "nf4")
    assert resolved.offload == "model"
    assert resolved.gpu_bytes <= 22 * GB


def test_smaller_cards_fall_back_to_group_offload() -> None:
    resolved = choose_mode("flux.2-dev", 16 * GB, "auto")

    assert resolved.mode == "offload" and resolved.offload == "group"


def test_flux1_stays_bf16_on_80gb() -> None:
    for model in ("flux.1-dev", "flux.1-kontext-dev", "flux1.1-pro"):
        resolved = choose_mode(model, H100, "auto")
        assert (resolved.mode, resolved.transformer, resolved.encoder) == ("resident", "bfloat16", "bfloat16")


def test_turbo_resolves_like_its_base() -> None:
    assert choose_mode("flux.2-dev-turbo", H100, "auto") == choose_mode("flux.2-dev", H100, "auto")


def test_fast_is_fp8_compiled_with_the_encoder_that_fits() -> None:
    on_h100 = choose_mode("flux.2-dev", H100, "fast")
    on_h200 = choose_mode("flux.2-dev", H200, "fast")

    assert (on_h100.mode, on_h100.transformer, on_h100.encoder, on_h100.compile) == (
        "fast",
        "float8",
        "float8",
        True,
    )
    assert (on_h200.transformer, on_h200.encoder) == ("float8", "bfloat16")


def test_explicit_modes_are_honoured_when_they_fit() -> None:
    assert choose_mode("flux.2-dev", H100, "lowvram").mode == "lowvram"
    assert choose_mode("flux.2-dev", H100, "offload").mode == "offload"
    assert choose_mode("flux.1-dev", H100, "resident").transformer == "bfloat16"


def test_an_explicit_mode_that_cannot_fit_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^mode: 'resident' needs about .* GB"):
        choose_mode("flux.2-dev", 24 * GB, "resident")


def test_no_gpu_means_cpu_whatever_was_asked() -> None:
    for requested in MODES:
        resolved = choose_mode("flux.2-dev", None, requested)
        assert (resolved.mode, resolved.transformer, resolved.gpu_bytes) == ("cpu", "float32", 0)
    assert "needs a CUDA GPU" in choose_mode("flux.2-dev", None, "fast").reason


def test_unknown_mode_names_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"^mode: unknown value 'turbo'"):
        choose_mode("flux.2-dev", H100, "turbo")


def test_unknown_model_is_a_lookup_error() -> None:
    with pytest.raises(LookupError):
        choose_mode("flux.3-dev", H100, "auto")


def test_nonpositive_memory_is_refused() -> None:
    with pytest.raises(ValueError, match="gpu_memory_bytes"):
        choose_mode("flux.2-dev", 0, "auto")


def test_resolved_mode_is_frozen() -> None:
    resolved = choose_mode("flux.1-dev", H100, "auto")
    assert isinstance(resolved, ResolvedMode)
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.mode = "fast"  # type: ignore[misc]


def test_a_registry_checkpoint_is_sized_by_its_family() -> None:
    own = SPECS["flux.1-dev"].with_overrides(id="my-finetune", checkpoint_path="/data/my-finetune")
    specs = {**SPECS, "my-finetune": own}
    assert choose_mode("my-finetune", H100, "auto", specs) == choose_mode("flux.1-dev", H100, "auto")


def test_each_component_is_stored_as_its_mode_says() -> None:
    lowvram = choose_mode("flux.1-dev", 24 * GB, "lowvram")
    slots = ("transformer", "text_encoder", "text_encoder_2", "vae", "scheduler")
    assert [lowvram.precision(slot) for slot in slots] == ["nf4", "nf4", "nf4", "bfloat16", "bfloat16"]


def test_offload_streams_only_the_encoder_when_the_bf16_transformer_fits() -> None:
    on_h100 = choose_mode("flux.2-dev", H100, "offload")
    assert (on_h100.transformer, on_h100.offload) == ("bfloat16", "encoder")
    assert 67 * GB < on_h100.gpu_bytes < 68 * GB  # 64.4 GB transformer + VAE + headroom
    assert [on_h100.streamed(slot) for slot in ("transformer", "text_encoder", "vae")] == [False, True, False]
    assert choose_mode("flux.2-dev", 24 * GB, "offload").offload == "group"
