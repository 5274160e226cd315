"""Masked edits through a real server, as clients send them: the official SDK's images.edit(image=...,
mask=...) (streamed too), raw multipart with a mask without alpha, an async job, and the Vercel AI SDK."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai.types import ImageEditCompletedEvent, ImageEditPartialImageEvent, ImagesResponse
from PIL import Image

from pipelines.contract.masks import edit_weights
from tests.e2e.conftest import HTTP, LONG, Server, metric, wait_until
from tests.e2e.test_clients import ai_sdk, ai_sdk_missing, skip_unless
from tests.e2e.test_serving import in_background
from tests.imagery import mask, photo

WIDTH, HEIGHT = 64, 48
FAST = {"num_inference_steps": 3, "seed": 4}
MODELS = ["flux.2-dev", "flux.2-dev-turbo", "flux.1-kontext-dev", "flux.1-dev", "flux1.1-pro"]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def check_kept(image: bytes, mask_png: bytes) -> None:
    """The answer has the first image's size, every pixel the mask keeps is the input's, the rest changed."""
    got, sent = pixels(image), pixels(photo(WIDTH, HEIGHT))
    kept = edit_weights(mask_png) == 0
    assert got.shape == sent.shape
    assert np.array_equal(got[kept], sent[kept])
    assert not np.array_equal(got[~kept], sent[~kept])


def sdk_edit(client: openai.OpenAI, model: str, **extra: object) -> ImagesResponse:
    return client.images.edit(
        model=model,
        image=("photo.png", photo(WIDTH, HEIGHT), "image/png"),
        mask=("mask.png", mask(WIDTH, HEIGHT), "image/png"),
        prompt="a hat",
        response_format="b64_json",
        extra_body={**FAST, **extra},
    )


@pytest.mark.parametrize("model", MODELS)
def test_sdk_edit_with_a_mask_keeps_what_the_mask_keeps(client: openai.OpenAI, model: str) -> None:
    result = sdk_edit(client, model)
    assert result.size == f"{WIDTH}x{HEIGHT}"
    check_kept(base64.b64decode(result.data[0].b64_json or ""), mask(WIDTH, HEIGHT))


@pytest.mark.parametrize("model", ["flux.2-dev", "flux.1-kontext-dev", "flux.1-dev"])
def test_sdk_streamed_masked_edit_previews_and_ends_with_the_composite(
    client: openai.OpenAI, model: str
) -> None:
    stream = client.images.edit(
        model=model,
        image=("photo.png", photo(WIDTH, HEIGHT), "image/png"),
        mask=("mask.png", mask(WIDTH, HEIGHT), "image/png"),
        prompt="a hat",
        stream=True,
        partial_images=1,
        extra_body={**FAST, "num_inference_steps": 4},
    )
    *partials, last = list(stream)
    assert [type(event) for event in partials] == [ImageEditPartialImageEvent]
    assert type(last) is ImageEditCompletedEvent
    for event in (*partials, last):
        check_kept(base64.b64decode(event.b64_json), mask(WIDTH, HEIGHT))


def test_raw_multipart_mask_without_alpha_is_white_for_edit(server: Server) -> None:
    white_is_edit = mask(WIDTH, HEIGHT, box=(0, 0, 32, 48), alpha=False)
    response = HTTP.post(
        f"{server.url}/v1/images/edits",
        data={
            "model": "flux.1-dev",
            "prompt": "a hat",
            "response_format": "b64_json",
            "strength": "0.8",
            **FAST,
        },
        files={
            "image": ("photo.png", photo(WIDTH, HEIGHT), "image/png"),
            "mask": ("m.png", white_is_edit, "image/png"),
        },
    )
    assert response.status_code == 200, response.text
    check_kept(base64.b64decode(response.json()["data"][0]["b64_json"]), white_is_edit)


def test_an_async_masked_job_keeps_its_mask(server: Server) -> None:
    submitted = HTTP.post(
        f"{server.url}/v1/images/edits",
        headers={"Prefer": "respond-async"},
        data={"model": "flux.1-kontext-dev", "prompt": "a hat", "response_format": "b64_json", **FAST},
        files={
            "image": ("photo.png", photo(WIDTH, HEIGHT), "image/png"),
            "mask": ("m.png", mask(), "image/png"),
        },
    )
    assert submitted.status_code == 202, submitted.text
    deadline = time.monotonic() + 240
    while (body := HTTP.get(f"{server.url}/v1/images/jobs/{submitted.json()['id']}").json())[
        "status"
    ] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    assert body["status"] == "succeeded", body
    check_kept(base64.b64decode(body["result"]["data"][0]["b64_json"]), mask())


def test_models_say_which_inpaint(server: Server) -> None:
    models = {m["id"]: m for m in HTTP.get(f"{server.url}/v1/models").json()["data"]}
    assert "inpaint" in models["flux.1-dev"]["modes"] and "edit" not in models["flux.1-dev"]["modes"]
    assert {"edit", "inpaint"} <= set(models["flux.2-dev"]["modes"])


@skip_unless(ai_sdk_missing())
@pytest.mark.timeout(600)
@pytest.mark.parametrize("provider", ["openai", "compatible"])
def test_ai_sdk_sends_the_mask(server: Server, tmp_path: Path, provider: str) -> None:
    (tmp_path / "photo.png").write_bytes(photo(WIDTH, HEIGHT))
    (tmp_path / "mask.png").write_bytes(mask(WIDTH, HEIGHT))
    call = {
        "provider": provider,
        "model": "flux.2-dev",
        "prompt": "a hat",
        "images": [str(tmp_path / "photo.png")],
        "mask": str(tmp_path / "mask.png"),
    }
    if provider == "compatible":
        call["providerOptions"] = {"fluxd": FAST}
    [image] = ai_sdk(server, call)["images"]
    check_kept(base64.b64decode(image["base64"]), mask(WIDTH, HEIGHT))


@pytest.mark.parametrize(
    ("model", "lora"), [("flux.1-dev", "tiny-flux1-style"), ("flux.2-dev", "tiny-flux2-style")]
)
def test_a_lora_styles_the_masked_area_only(client: openai.OpenAI, model: str, lora: str) -> None:
    def edit(**extra: object) -> bytes:
        return base64.b64decode(sdk_edit(client, model, **extra).data[0].b64_json or "")

    styled = edit(loras=[{"path": lora, "scale": 1.0}])
    check_kept(styled, mask(WIDTH, HEIGHT))
    assert not np.array_equal(pixels(styled), pixels(edit()))


def test_masked_requests_queued_together_share_one_call_each_with_its_own_mask(server: Server) -> None:
    series = 'fluxd_batch_images_{}{{model="flux.1-dev"}}'
    before = {kind: metric(server, series.format(kind)) for kind in ("count", "sum")}
    # An async job holds the one worker while both masked edits queue behind it; cancelling it frees it.
    blocker = HTTP.post(
        f"{server.url}/v1/images/generations", json=LONG, headers={"Prefer": "respond-async"}
    ).json()["id"]
    wait_until(lambda: HTTP.get(f"{server.url}/v1/images/jobs/{blocker}").json()["status"] == "running")
    masks = [mask(WIDTH, HEIGHT), mask(WIDTH, HEIGHT, box=(0, 0, 32, 48), alpha=False)]

    def edit(mask_png: bytes) -> httpx.Response:
        return HTTP.post(
            f"{server.url}/v1/images/edits",
            data={"model": "flux.1-dev", "prompt": "a hat", "response_format": "b64_json", **FAST},
            files={
                "image": ("p.png", photo(WIDTH, HEIGHT), "image/png"),
                "mask": ("m.png", mask_png, "image/png"),
            },
        )

    calls = [in_background(lambda m=m: edit(m)) for m in masks]
    wait_until(lambda: metric(server, 'fluxd_queue_depth{model="flux.1-dev"}') == 2)
    HTTP.delete(f"{server.url}/v1/images/jobs/{blocker}")
    for (thread, out), mask_png in zip(calls, masks, strict=True):
        thread.join(120)
        assert out[0].status_code == 200, out[0].text
        check_kept(base64.b64decode(out[0].json()["data"][0]["b64_json"]), mask_png)
    assert metric(server, series.format("count")) == before["count"] + 1
    assert metric(server, series.format("sum")) == before["sum"] + 2
