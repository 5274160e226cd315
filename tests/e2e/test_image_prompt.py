"""`image_prompt` (FLUX.1 Redux) through a real server and the official SDK's `extra_body`: as a data: URI and
as a url this server returned, and the 400s that name it."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from pipelines.contract.image_prompts import FOLDER
from tests.e2e.conftest import start_server, stop_server
from tests.imagery import photo

FAST = {"num_inference_steps": 2, "seed": 11}
URI = "data:image/png;base64," + base64.b64encode(photo(64, 48)).decode()


@pytest.fixture(scope="module")
def weights(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny weights, linked one folder at a time, so that a test can take the Redux folder away."""
    folder = tmp_path_factory.mktemp("redux-weights")
    for entry in tiny_weights.iterdir():
        (folder / entry.name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def client(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """The SDK on the module's one server."""
    server = start_server(weights, tmp_path_factory.mktemp("redux-server"))
    yield server.client(max_retries=0)
    stop_server(server)


def generate(
    client: openai.OpenAI, model: str = "flux1.1-pro", headers: dict[str, str] | None = None, **extra: object
) -> np.ndarray:
    result = client.images.generate(
        model=model,
        prompt="a red fox",
        size="64x48",
        response_format="b64_json",
        extra_body={**FAST, **extra},
        extra_headers=headers,
    )
    data = base64.b64decode(result.data[0].b64_json or "")
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_an_image_prompt_guides_the_image_and_a_seed_repeats(client: openai.OpenAI) -> None:
    plain = generate(client)
    prompted = generate(client, image_prompt=URI)
    assert not np.array_equal(prompted, plain)
    assert np.array_equal(generate(client, image_prompt=URI), prompted)
    assert not np.array_equal(generate(client, image_prompt=URI, image_prompt_strength=0.0), prompted)


def test_an_async_job_renders_its_image_prompt_as_a_request_does(client: openai.OpenAI) -> None:
    held = generate(client, headers={"Prefer": "respond-async, wait=300"}, image_prompt=URI)
    assert np.array_equal(held, generate(client, image_prompt=URI))


def test_a_url_this_server_returned_is_an_image_prompt(client: openai.OpenAI) -> None:
    made = client.images.generate(
        model="flux.1-dev", prompt="a lighthouse", size="64x48", response_format="url", extra_body=FAST
    )
    url = made.data[0].url or ""
    assert generate(client, "flux.1-dev", image_prompt=url).std() > 0


def refusal(client: openai.OpenAI, model: str = "flux.1-dev", **extra: object) -> str:
    with pytest.raises(openai.BadRequestError) as info:
        generate(client, model, **extra)
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "image_prompt", error
    return str(error["message"])


def test_bad_image_prompts_are_400s_naming_it(client: openai.OpenAI) -> None:
    assert "does not take 'image_prompt'" in refusal(client, "flux.2-dev", image_prompt=URI)
    assert "base64" in refusal(client, image_prompt="data:image/png;base64,%%%")
    assert "not a PNG, JPEG, WebP or GIF" in refusal(client, image_prompt="data:image/png;base64,aGVsbG8=")
    assert "--fetch-allow" in refusal(client, image_prompt="https://example.com/cat.png")


def test_without_the_redux_weights_the_400_says_what_to_pull(client: openai.OpenAI, weights: Path) -> None:
    redux, aside = weights / FOLDER, weights / f"{FOLDER}.aside"
    redux.rename(aside)
    try:
        assert "fluxd weights pull redux" in refusal(client, image_prompt=URI)
    finally:
        aside.rename(redux)
