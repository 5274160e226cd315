"""`--default-model` is the model of every route that takes `model`: generations, edits and variations.

A server started with only Kontext in mind (`--default-model flux.1-kontext-dev`) must answer an SDK edit that
names no model with Kontext, not with flux.2-dev.
"""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import STRICT_DEFAULT_MODEL, Server
from tests.e2e.test_images_api import FAST, decode
from tests.imagery import png as png_bytes

DEFAULT = STRICT_DEFAULT_MODEL


@pytest.fixture()
def kontext(strict_server: Server) -> openai.OpenAI:
    """The SDK on the shared strict server (tests/e2e/conftest.py), started with `--default-model` Kontext."""
    return strict_server.client(max_retries=0)


def test_an_edit_without_model_runs_on_the_default_model(kontext: openai.OpenAI) -> None:
    result = kontext.images.edit(
        image=("ref.png", png_bytes(), "image/png"),
        prompt="make it red",
        size="64x64",
        response_format="b64_json",
        extra_body=FAST,
    )
    assert result.model_extra and result.model_extra["model"] == DEFAULT
    assert result.data and result.data[0].b64_json
    assert decode(result.data[0].b64_json).size == (64, 64)


def test_a_generation_and_a_variation_without_model_run_on_it_too(kontext: openai.OpenAI) -> None:
    generated = kontext.images.generate(
        prompt="a fox", size="64x64", response_format="b64_json", extra_body=FAST
    )
    varied = kontext.images.create_variation(
        image=png_bytes(), size="64x64", response_format="b64_json", extra_body=FAST
    )
    for result in (generated, varied):
        assert result.model_extra and result.model_extra["model"] == DEFAULT
