"""`acceleration` as a user sends it: the official SDK (strict validation) against a real server on the tiny
checkpoints; the answer says which step caching ran."""

from __future__ import annotations

import openai
import pytest


@pytest.mark.parametrize(
    ("model", "extra", "ran"),
    [
        ("flux.2-dev", {"acceleration": "high"}, "high"),
        ("flux.2-dev", {}, "regular"),  # fal's FLUX.2 [dev] default
        ("flux.2-dev", {"go_fast": False}, "none"),
        ("flux.1-kontext-dev", {}, "none"),
        ("flux.1-dev", {"go_fast": True}, "regular"),
    ],
)
def test_the_answer_reports_the_level_that_ran(
    client: openai.OpenAI, model: str, extra: dict, ran: str
) -> None:
    result = client.images.generate(
        model=model,
        prompt="a red fox",
        size="32x32",
        response_format="b64_json",
        extra_body={"num_inference_steps": 8, "seed": 1, **extra},
    )
    assert result.model_extra is not None and result.model_extra["acceleration"] == ran
    assert result.data[0].b64_json


def test_turbo_refuses_a_level_naming_acceleration(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(
            model="flux.2-dev-turbo", prompt="x", size="32x32", extra_body={"acceleration": "high"}
        )
    assert info.value.body["param"] == "acceleration"  # type: ignore[index]
    assert "acceleration" in info.value.body["message"]  # type: ignore[index]
