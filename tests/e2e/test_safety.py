"""The safety checker as a user asks for it: the official SDK (strict validation) against a real server, whose
tiny classifier (written with the tiny checkpoints) answers "normal"; the flagged path is tested on the
worker side (tests/integration/test_safety.py)."""

from __future__ import annotations

import openai


def test_a_checked_image_reports_its_verdict_and_an_unchecked_one_none(client: openai.OpenAI) -> None:
    body = {"num_inference_steps": 2, "seed": 4}
    checked = client.images.generate(
        prompt="a fox",
        size="32x32",
        response_format="b64_json",
        extra_body={**body, "enable_safety_checker": True},
    )
    assert checked.data[0].model_extra["has_nsfw_concepts"] is False
    unchecked = client.images.generate(
        prompt="a fox", size="32x32", response_format="b64_json", extra_body=body
    )
    assert "has_nsfw_concepts" not in unchecked.data[0].model_extra  # the server's default: off
    assert checked.data[0].b64_json == unchecked.data[0].b64_json  # not flagged: untouched
