"""Streaming partial images and prompt enhancement, as the official SDK (strict validation) sees them."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from openai.types import (
    ImageEditCompletedEvent,
    ImageEditPartialImageEvent,
    ImageGenCompletedEvent,
    ImageGenPartialImageEvent,
)
from PIL import Image

from tests.e2e.conftest import HOLD, Server, metric, wait_until, workers_idle
from tests.imagery import png as png_bytes


def size_of(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def check_stream(events: list, partial: type, completed: type, asked: int, size: tuple[int, int]) -> None:
    """Partial events first, at most `asked`, indexed 0..; then exactly one completed event, last."""
    *partials, last = events
    assert all(type(event) is partial for event in partials)
    assert type(last) is completed
    assert len(partials) <= asked
    assert [event.partial_image_index for event in partials] == list(range(len(partials)))
    for event in events:
        assert size_of(event.b64_json) == size
        assert event.size == f"{size[0]}x{size[1]}" and isinstance(event.created_at, int)
    assert last.usage.total_tokens == last.usage.input_tokens + last.usage.output_tokens


@pytest.mark.parametrize("asked", [1, 2, 3])
def test_generation_streams_partial_images_then_one_completed(client: openai.OpenAI, asked: int) -> None:
    stream = client.images.generate(
        prompt="a red fox",
        size="64x48",
        stream=True,
        partial_images=asked,
        extra_body={"num_inference_steps": 6, "seed": 2},
    )
    events = list(stream)
    check_stream(events, ImageGenPartialImageEvent, ImageGenCompletedEvent, asked, (64, 48))
    assert len(events) == asked + 1  # six steps leave room for every preview asked for
    images = {event.b64_json for event in events}
    assert len(images) == len(events), "each partial image is a different step, none is the final image"


def test_without_partial_images_completed_comes_alone(client: openai.OpenAI) -> None:
    events = list(
        client.images.generate(
            prompt="a red fox", size="32x32", stream=True, extra_body={"num_inference_steps": 4}
        )
    )
    assert len(events) == 1
    check_stream(events, ImageGenPartialImageEvent, ImageGenCompletedEvent, 0, (32, 32))


def test_more_previews_than_steps_allow_are_at_most_asked(client: openai.OpenAI) -> None:
    events = list(
        client.images.generate(
            prompt="x", size="32x32", stream=True, partial_images=3, extra_body={"num_inference_steps": 2}
        )
    )
    check_stream(events, ImageGenPartialImageEvent, ImageGenCompletedEvent, 3, (32, 32))


@pytest.mark.parametrize("model", ["flux.2-dev", "flux.1-kontext-dev"])
def test_edit_streams_partial_images(client: openai.OpenAI, model: str) -> None:
    stream = client.images.edit(
        model=model,
        image=("ref.png", png_bytes(), "image/png"),
        prompt="make it red",
        size="64x64",
        stream=True,
        partial_images=2,
        output_format="jpeg",
        extra_body={"num_inference_steps": 4},
    )
    events = list(stream)
    check_stream(events, ImageEditPartialImageEvent, ImageEditCompletedEvent, 2, (64, 64))
    assert len(events) == 3
    assert all(event.output_format == "jpeg" for event in events)


def test_stream_with_n_2_is_a_400_naming_n(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="x", size="32x32", n=2, stream=True, partial_images=1)
    assert info.value.body["param"] == "n"


def test_a_fault_after_streaming_began_raises_api_error(client: openai.OpenAI, server: Server) -> None:
    failed = 'fluxd_errors_total{code="server_error",status="500"}'
    before = metric(server, failed)
    stream = client.images.generate(
        prompt="fail", size="32x32", stream=True, partial_images=2, extra_body={"num_inference_steps": 6}
    )
    received = []
    with pytest.raises(openai.APIError) as info:
        for event in stream:
            received.append(event)
    assert [type(event) for event in received] == [ImageGenPartialImageEvent]
    assert info.value.body["type"] == "server_error" and info.value.message
    assert "Traceback" not in info.value.message and "injected" not in info.value.message
    # Sent inside a 200 stream, the error is counted all the same.
    assert info.value.body["code"] == "server_error" and metric(server, failed) == before + 1
    # The worker survived: the next job renders.
    result = client.images.generate(
        prompt="x", size="32x32", response_format="b64_json", extra_body={"num_inference_steps": 1}
    )
    assert size_of(result.data[0].b64_json) == (32, 32)


def test_a_client_that_goes_away_cancels_the_job(client: openai.OpenAI, server: Server) -> None:
    steps, images = (
        'fluxd_denoise_steps_total{model="flux.2-dev"}',
        'fluxd_images_generated_total{model="flux.2-dev"}',
    )
    cancelled = 'fluxd_cancelled_total{model="flux.2-dev",stage="running"}'
    before = {series: metric(server, series) for series in (steps, images, cancelled)}
    # Held after its first preview (step 2 of 8) until its client goes away.
    stream = client.images.generate(
        prompt=HOLD["prompt"],
        size="64x64",
        stream=True,
        partial_images=3,
        extra_body={"num_inference_steps": 8},
    )
    first = next(iter(stream))
    assert isinstance(first, ImageGenPartialImageEvent)
    stream.close()
    wait_until(lambda: metric(server, cancelled) == before[cancelled] + 1 and workers_idle(server))
    # The worker stopped denoising before the end.
    assert 2 <= metric(server, steps) - before[steps] < 8
    assert metric(server, images) == before[images]  # nor did it decode an image for nobody
    result = client.images.generate(
        prompt="next", size="32x32", response_format="b64_json", extra_body={"num_inference_steps": 2}
    )
    assert size_of(result.data[0].b64_json) == (32, 32)


def test_enhancement_returns_a_revised_prompt(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="flux.2-dev",
        prompt="a red fox",
        size="64x48",
        response_format="b64_json",
        extra_body={"prompt_enhancement": "on", "num_inference_steps": 2},
    )
    [image] = result.data
    assert isinstance(image.revised_prompt, str) and image.revised_prompt.strip()


def test_edit_enhancement_returns_a_revised_prompt(client: openai.OpenAI) -> None:
    result = client.images.edit(
        model="flux.2-dev",
        image=("ref.png", png_bytes(), "image/png"),
        prompt="make it red",
        size="64x64",
        response_format="b64_json",
        extra_body={"prompt_enhancement": "on", "num_inference_steps": 2},
    )
    [image] = result.data
    assert isinstance(image.revised_prompt, str) and image.revised_prompt.strip()


def test_without_enhancement_there_is_no_revised_prompt(client: openai.OpenAI) -> None:
    result = client.images.generate(
        prompt="a red fox", size="32x32", response_format="b64_json", extra_body={"num_inference_steps": 2}
    )
    assert result.data[0].revised_prompt is None


def test_enhancement_on_a_model_without_a_language_model_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(
            model="flux.1-dev", prompt="x", size="32x32", extra_body={"prompt_enhancement": "on"}
        )
    assert info.value.body["param"] == "prompt_enhancement"
