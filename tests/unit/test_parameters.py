"""The one declaration of each request parameter, and what is derived from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from pipelines.contract.specs import SPECS
from server.declarations.parameters import Declarations, declare
from server.declarations.protocol import DECLARATIONS, ImageEditRequest, ImageGenerationRequest

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_is_the_declarations() -> None:
    assert DECLARATIONS.markdown_table(SPECS) in README.read_text()


def test_every_request_field_is_declared() -> None:
    for model in (ImageGenerationRequest, ImageEditRequest):
        assert set(model.model_fields) <= set(DECLARATIONS.parameters)


def test_an_undeclared_field_is_refused_at_import() -> None:
    class Bare(BaseModel):
        x: int | None = None

    with pytest.raises(TypeError, match=r"Bare\.x"):
        Declarations({"generations": Bare})


def test_a_new_parameter_is_one_declaration() -> None:
    class WithExtra(ImageGenerationRequest):
        sharpness: float | None = declare("emulated", "sharpen the output", "example page", default=0.5, ge=0)

    declared = Declarations({"generations": WithExtra})
    assert declared.parameters["sharpness"].routes == ("generations",)
    assert "| `sharpness` | generations | emulated | 0.5 | sharpen the output | example page |" in (
        declared.markdown_table(SPECS)
    )
    assert declared.normalisation(SPECS["flux.1-dev"])["sharpness"]["default"] == 0.5
    with pytest.raises(ValueError):
        WithExtra.model_validate({"prompt": "p", "sharpness": -1.0})


def test_models_take_what_their_modes_allow() -> None:
    assert "image" in DECLARATIONS.taken_by(SPECS["flux.2-dev"])
    # FLUX.1 [dev] edits only inside a mask: it takes the edit fields, and the 400 without a mask is the
    # edit route's (tests/unit/test_masks.py).
    assert {"image", "mask", "strength"} <= set(DECLARATIONS.taken_by(SPECS["flux.1-dev"]))
    assert "mask" not in DECLARATIONS.taken_by(
        SPECS["flux.1-dev"].with_overrides(modes=frozenset({"generate"}))
    )
    steps = DECLARATIONS.normalisation(SPECS["flux.2-dev-turbo"])["num_inference_steps"]
    assert steps["default"] == 8 and steps["behaviour"] == "native"
