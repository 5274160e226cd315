"""The worker's batch loop on the tiny checkpoints: every request it is sent is answered exactly once, its
images (previews too) encoded in the format the request asked for, PNG holding the engine's pixels exactly."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipelines.contract.encoding import RAW_RGB
from pipelines.contract.messages import (
    Failure,
    Progress,
    Rendered,
    RenderedImage,
    RenderRequest,
    RenderResult,
)
from pipelines.engine.engine import Engine
from pipelines.engine.worker import serve


def request(request_id: str, model: str = "flux.2-dev", **fields) -> RenderRequest:
    shape = {"width": 32, "height": 32, "steps": 2, "guidance": 4.0, "seeds": [1], **fields}
    return RenderRequest(request_id, model, "a red fox", **shape)


def answers(engine: Engine, batches: list[list[RenderRequest]], cancelled: set[str]) -> list[object]:
    sent: list[object] = []
    serve(engine, iter(batches), sent.append, cancelled)
    return [message for message in sent if not isinstance(message, Progress)]


def answered(messages: list[object]) -> Counter[str]:
    ids: Counter[str] = Counter()
    for message in messages:
        if isinstance(message, RenderResult):
            ids[message.id] += 1
        elif isinstance(message, Failure):
            ids.update(message.ids)
    return ids


def test_a_batch_cancelled_before_the_worker_took_it_is_answered_cancelled(engine: Engine) -> None:
    cancelled = {"a", "b"}
    messages = answers(engine, [[request("a"), request("b")]], cancelled)
    assert [(m.ids, m.code) for m in messages if isinstance(m, Failure)] == [(["a", "b"], "cancelled")]
    assert answered(messages) == {"a": 1, "b": 1}
    assert not cancelled  # nothing of a finished batch stays behind


def test_a_cancelled_request_leaves_its_batch_mates_running(engine: Engine) -> None:
    messages = answers(engine, [[request("gone"), request("kept")], [request("next")]], {"gone"})
    assert answered(messages) == {"gone": 1, "kept": 1, "next": 1}
    [failure] = [m for m in messages if isinstance(m, Failure)]
    assert (failure.ids, failure.code) == (["gone"], "cancelled")
    assert {m.id for m in messages if isinstance(m, RenderResult)} == {"kept", "next"}


def test_a_failing_batch_answers_each_request_once(engine: Engine) -> None:
    # FluxPipeline refuses a max_sequence_length over 512 before it encodes anything.
    bad = {"max_sequence_length": 100000}
    messages = answers(
        engine, [[request("x", "flux.1-dev", extra=bad), request("y", "flux.1-dev", extra=bad)]], set()
    )
    assert answered(messages) == {"x": 1, "y": 1}
    assert [m.code for m in messages if isinstance(m, Failure)] == ["invalid_value"]


def decoded(data: bytes, fmt: str) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=[fmt.upper()]) as image:
        return np.asarray(image.convert("RGB"))


def raw(image: RenderedImage) -> np.ndarray:
    assert image.content_type == RAW_RGB
    return np.frombuffer(image.data, np.uint8).reshape(image.height, image.width, 3)


@pytest.mark.parametrize("model", ["flux.2-dev", "flux.1-dev"])
def test_a_png_answer_holds_the_pixels_the_engine_rendered(engine: Engine, model: str) -> None:
    # The same request rendered in this run, straight from the engine (raw pixels, as the front used to get
    # them and encode), then through the worker loop, which encodes: the PNG decodes to the same pixels.
    fields = {"steps": 4, "partial_images": 1}
    reports: list[Progress] = []
    [direct] = engine.render([request("raw", model, **fields)], lambda p, _: reports.append(p) or False)
    [preview] = [raw(p.preview) for p in reports if p.preview is not None]
    sent: list[object] = []
    serve(engine, iter([[request("png", model, **fields)]]), sent.append, set())
    # The worker is free for the next batch before its images encode.
    assert [type(m) for m in sent if not isinstance(m, Progress)] == [Rendered, RenderResult]
    [result] = [m for m in sent if isinstance(m, RenderResult)]
    [image] = result.images
    assert image.content_type == "image/png"
    assert np.array_equal(decoded(image.data, "png"), raw(direct.images[0]))
    [partial] = [m.preview for m in sent if isinstance(m, Progress) and m.preview is not None]
    assert partial.content_type == "image/png"
    assert np.array_equal(decoded(partial.data, "png"), preview)


@pytest.mark.parametrize(("fmt", "content_type"), [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_each_request_of_a_batch_gets_its_own_format(engine: Engine, fmt: str, content_type: str) -> None:
    batch = [request("a", output_format=fmt, output_compression=50), request("b", seeds=[1, 2])]
    results = {m.id: m for m in answers(engine, [batch], set()) if isinstance(m, RenderResult)}
    assert [i.content_type for i in results["a"].images] == [content_type]
    assert [i.content_type for i in results["b"].images] == ["image/png", "image/png"]
    assert decoded(results["a"].images[0].data, fmt).shape == (32, 32, 3)
