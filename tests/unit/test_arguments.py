"""The passthrough declaration the HTTP process validates against, read without torch or diffusers."""

from __future__ import annotations

from pipelines.contract.arguments import PASSTHROUGH, SET_BY_FLUXD, served_pipeline_classes


def test_every_served_pipeline_class_is_declared() -> None:
    assert (
        set(PASSTHROUGH)
        == served_pipeline_classes()
        == {"Flux2Pipeline", "FluxPipeline", "FluxKontextPipeline"}
    )


def test_arguments_fluxd_sets_never_pass_through() -> None:
    assert "max_sequence_length" in PASSTHROUGH["Flux2Pipeline"]
    assert {"negative_prompt", "true_cfg_scale"} <= set(PASSTHROUGH["FluxPipeline"])
    for arguments in PASSTHROUGH.values():
        assert not set(SET_BY_FLUXD) & set(arguments)
