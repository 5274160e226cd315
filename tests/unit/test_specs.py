"""Specs are pure data; importing them (and the size rules, messages, errors, images) never pulls in torch."""

from __future__ import annotations

import pytest

from pipelines.contract.errors import InvalidParameter, ModelNotFound
from pipelines.contract.specs import DEFAULT_MODEL, SPECS, get_spec, weights_ids


def test_every_seed_model_is_served() -> None:
    assert set(SPECS) == {"flux.2-dev", "flux.2-dev-turbo", "flux.1-kontext-dev", "flux.1-dev", "flux1.1-pro"}
    assert DEFAULT_MODEL in SPECS
    for spec in SPECS.values():
        assert spec.defaults_source and spec.limits.source
        assert 1 <= spec.default_steps <= spec.max_steps


def test_turbo_and_pro_need_no_checkpoint_of_their_own() -> None:
    assert weights_ids() == ["flux.1-dev", "flux.1-kontext-dev", "flux.2-dev"]
    assert SPECS["flux.2-dev-turbo"].weights_id == "flux.2-dev"
    assert SPECS["flux1.1-pro"].alias and SPECS["flux1.1-pro"].weights_id == "flux.1-dev"
    turbo = SPECS["flux.2-dev-turbo"]
    assert turbo.adapter is not None and turbo.adapter.sigmas is not None
    assert (turbo.default_steps, turbo.default_guidance, len(turbo.adapter.sigmas)) == (8, 2.5, 8)


def test_unknown_model() -> None:
    with pytest.raises(ModelNotFound):
        get_spec("dall-e-3")


@pytest.mark.parametrize(
    ("model", "count"),
    [("flux.2-dev", 5), ("flux.1-kontext-dev", 2), ("flux.1-dev", 1), ("flux.2-dev", 0)],
)
def test_reference_counts_a_model_cannot_take(model: str, count: int) -> None:
    with pytest.raises(InvalidParameter) as info:
        SPECS[model].check_references(count)
    assert info.value.param == "image"


def test_reference_counts_a_model_takes() -> None:
    SPECS["flux.2-dev"].check_references(4)
    SPECS["flux.1-kontext-dev"].check_references(1)
