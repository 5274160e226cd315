"""The OpenAI Images API as users call it: the official SDK (strict validation) against a real server."""

from __future__ import annotations

import base64
import io
import sys
import time

import openai
import pytest
from PIL import Image

from pipelines.contract.specs import SPECS
from tests.e2e.conftest import HTTP, Server
from tests.imagery import png as png_bytes

EDIT_MODELS = sorted(m for m, s in SPECS.items() if "edit" in s.modes)
MAGIC = {"png": b"\x89PNG", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF", "gif": b"GIF8", "avif": b"ftypavif"}
FAST = {"num_inference_steps": 2}


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.parametrize("model", sorted(SPECS))
def test_generation_for_every_model(client: openai.OpenAI, model: str) -> None:
    result = client.images.generate(
        model=model,
        prompt="a red fox in the snow",
        size="64x48",
        response_format="b64_json",
        extra_body={"seed": 3, **({} if model.endswith("turbo") else FAST)},
    )
    assert isinstance(result.created, int)
    assert result.size == "64x48"
    [image] = result.data
    assert decode(image.b64_json).size == (64, 48)
    assert image.model_extra["seed"] == 3


def test_turbo_takes_any_step_count(client: openai.OpenAI) -> None:
    # 8 runs fal's own sigmas; other counts the same curve at that many points (no longer a 400).
    result = client.images.generate(
        model="flux.2-dev-turbo",
        prompt="a red fox",
        size="32x32",
        response_format="b64_json",
        extra_body={"num_inference_steps": 4},
    )
    assert decode(result.data[0].b64_json).size == (32, 32)


@pytest.mark.parametrize("model", EDIT_MODELS)
def test_edit_with_one_file_and_with_a_list(client: openai.OpenAI, model: str) -> None:
    one = client.images.edit(
        model=model,
        image=("ref.png", png_bytes(), "image/png"),
        prompt="make it red",
        size="64x64",
        response_format="b64_json",
        extra_body=FAST if not model.endswith("turbo") else {},
    )
    assert decode(one.data[0].b64_json).size == (64, 64)
    if SPECS[model].max_references >= 2:
        many = client.images.edit(
            model=model,
            image=[png_bytes(), png_bytes(96, 64, (200, 0, 0))],
            prompt="combine",
            size="48x64",
            response_format="b64_json",
            extra_body=FAST if not model.endswith("turbo") else {},
        )
        assert decode(many.data[0].b64_json).size == (48, 64)


def test_raw_bytes_upload_without_filename(client: openai.OpenAI) -> None:
    # The SDK sends bare bytes as "upload", application/octet-stream: the format comes from the bytes.
    result = client.images.edit(
        image=png_bytes(), prompt="x", size="64x64", response_format="b64_json", extra_body=FAST
    )
    assert decode(result.data[0].b64_json).size == (64, 64)


def test_edit_size_auto_follows_the_input(client: openai.OpenAI) -> None:
    result = client.images.edit(
        image=png_bytes(128, 64),
        prompt="x",
        response_format="b64_json",
        extra_body={**FAST, "resolution_mode": "match_input"},
    )
    assert result.size == "128x64"


def test_n3_gives_three_distinct_images(client: openai.OpenAI) -> None:
    result = client.images.generate(
        prompt="three", n=3, size="64x64", response_format="b64_json", extra_body={**FAST, "seed": 40}
    )
    images = [base64.b64decode(d.b64_json) for d in result.data]
    assert len(set(images)) == 3
    assert [d.model_extra["seed"] for d in result.data] == [40, 41, 42]
    assert all(Image.open(io.BytesIO(i)).size == (64, 64) for i in images)


@pytest.mark.parametrize("fmt", sorted(MAGIC))
def test_every_output_format(client: openai.OpenAI, fmt: str) -> None:
    result = client.images.generate(
        prompt="fmt", size="32x32", output_format=fmt, response_format="b64_json", extra_body=FAST
    )
    data = base64.b64decode(result.data[0].b64_json)
    assert MAGIC[fmt] in data[:12]
    assert Image.open(io.BytesIO(data)).size == (32, 32)
    assert result.output_format == (None if fmt == "avif" else fmt)


def test_url_downloads_the_same_image_and_expires(client: openai.OpenAI, server: Server) -> None:
    as_url = client.images.generate(prompt="same", size="32x32", extra_body={**FAST, "seed": 5})
    as_b64 = client.images.generate(
        prompt="same", size="32x32", response_format="b64_json", extra_body={**FAST, "seed": 5}
    )
    url = as_url.data[0].url
    assert url.startswith(server.url + "/v1/files/images/")
    downloaded = HTTP.get(url)
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "image/png"
    assert downloaded.content == base64.b64decode(as_b64.data[0].b64_json)
    head = HTTP.head(url)
    assert head.status_code == 200 and head.headers["content-type"] == "image/png" and not head.content
    assert HTTP.get(url.removesuffix(".png")).content == downloaded.content
    assert HTTP.get(url.removesuffix(".png") + ".jpeg").status_code == 404  # not a JPEG under another name
    time.sleep(3.5)  # the test server's TTL is 3 s
    expired = HTTP.get(url)
    assert expired.status_code == 404 and expired.json()["error"]["code"] == "image_not_found"
    assert HTTP.get(server.url + "/v1/files/images/" + "A" * 32 + ".png").status_code == 404


def test_forwarded_headers_shape_the_url(server: Server) -> None:
    response = HTTP.post(
        f"{server.url}/v1/images/generations",
        json={"prompt": "x", "size": "16x16", **FAST},
        headers={
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "images.lan",
            "X-Forwarded-Prefix": "/flux",
        },
    )
    assert response.json()["data"][0]["url"].startswith("https://images.lan/flux/v1/files/images/")


def test_without_response_format_both_fields_come_back(client: openai.OpenAI, server: Server) -> None:
    # Clients that send none read either: b64_json (gpt-image era) or url (DALL-E era).
    both = client.images.generate(prompt="x", size="32x32", extra_body={**FAST, "seed": 8})
    [image] = both.data
    assert image.url.startswith(server.url + "/v1/files/images/")
    assert HTTP.get(image.url).content == base64.b64decode(image.b64_json)
    edit = client.images.edit(image=png_bytes(), prompt="x", size="32x32", extra_body=FAST)
    assert edit.data[0].url and edit.data[0].b64_json
    # Named, the format is the only field.
    as_url = client.images.generate(prompt="x", size="32x32", response_format="url", extra_body=FAST)
    as_b64 = client.images.generate(prompt="x", size="32x32", response_format="b64_json", extra_body=FAST)
    assert as_url.data[0].url and as_url.data[0].b64_json is None
    assert as_b64.data[0].b64_json and as_b64.data[0].url is None


@pytest.mark.parametrize(
    ("model", "size"),
    [
        ("flux.2-dev", (80, 48)),
        ("flux.2-dev", (40, 40)),
        ("flux.2-dev", (900, 60)),
        ("flux.1-kontext-dev", (80, 48)),
    ],
    ids=["flux.2-80x48", "flux.2-40x40", "flux.2-900x60", "kontext-80x48"],
)
def test_references_of_any_size_are_edited(client: openai.OpenAI, model: str, size: tuple[int, int]) -> None:
    # FLUX.2's pipeline takes >= 64 px a side and at most 8:1; gateways take any size, and so does fluxd.
    result = client.images.edit(
        model=model,
        image=("small.png", png_bytes(*size), "image/png"),
        prompt="make it red",
        response_format="b64_json",
        extra_body={**FAST, "resolution_mode": "match_input"},
    )
    [image] = result.data
    assert decode(image.b64_json).size == tuple(int(s) for s in result.size.split("x"))


def test_sync_mode_returns_a_data_uri(client: openai.OpenAI) -> None:
    result = client.images.generate(prompt="x", size="16x16", extra_body={**FAST, "sync_mode": True})
    assert result.data[0].url.startswith("data:image/png;base64,") and result.data[0].b64_json is None


def test_same_seed_same_bytes(client: openai.OpenAI) -> None:
    first, second = (
        client.images.generate(
            prompt="same", size="48x48", response_format="b64_json", extra_body={**FAST, "seed": 9}
        )
        for _ in range(2)
    )
    assert first.data[0].b64_json == second.data[0].b64_json


def test_strict_echo_fields_and_usage(client: openai.OpenAI) -> None:
    result = client.images.generate(
        prompt="x",
        size="auto",
        quality="auto",
        background="auto",
        response_format="b64_json",
        extra_body=FAST,
    )
    assert result.size == "256x256"  # the demo's small default size, never "auto"
    assert result.quality is None and result.background == "opaque"
    assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens


def test_request_id_header(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        prompt="x", size="16x16", response_format="b64_json", extra_body=FAST
    )
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.request_id == raw.headers["x-request-id"]


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert sorted(ids) == sorted(SPECS)
    pro = client.models.retrieve("flux1.1-pro")
    assert pro.model_extra["alias_of"] == "flux.1-dev" and pro.model_extra["root"] == "flux.1-dev"
    turbo = client.models.retrieve("flux.2-dev-turbo").model_extra
    assert turbo["root"] == "flux.2-dev" and turbo["defaults"]["num_inference_steps"] == 8
    assert "normalisation" in turbo and turbo["normalisation"]["cfg_scale"]["behaviour"] == "renamed"
    # What the worker resolved for the checkpoint under Turbo: no GPU here, so the CPU in float32.
    [mode] = turbo["run_modes"]
    assert (mode["device"], mode["mode"], mode["transformer"], mode["offload"]) == (
        "cpu",
        "cpu",
        "float32",
        "none",
    )
    assert "no CUDA GPU" in mode["reason"]
    kontext = client.models.retrieve("flux.1-kontext-dev").model_extra
    assert len(kontext["sizes_1k"]) == 11 and kontext["random_weights"] is True
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("dall-e-3")
    assert info.value.body["code"] == "model_not_found"


def test_variations_edit_with_the_default_model(client: openai.OpenAI) -> None:
    result = client.images.create_variation(image=png_bytes(), size="256x256", response_format="b64_json")
    assert decode(result.data[0].b64_json).size == (256, 256)


def test_passthrough_of_a_pipeline_argument(client: openai.OpenAI) -> None:
    result = client.images.generate(
        prompt="x", size="16x16", response_format="b64_json", extra_body={**FAST, "max_sequence_length": 64}
    )
    assert decode(result.data[0].b64_json).size == (16, 16)


def test_passthrough_in_an_edit_arrives_as_text_and_is_parsed(client: openai.OpenAI) -> None:
    # The SDK sends extra_body of an edit as multipart text parts: "64", not 64.
    result = client.images.edit(
        model="flux.1-kontext-dev",
        image=png_bytes(),
        prompt="x",
        size="64x64",
        response_format="b64_json",
        extra_body={**FAST, "max_sequence_length": 64, "true_cfg_scale": 1.5, "negative_prompt": "blur"},
    )
    assert decode(result.data[0].b64_json).size == (64, 64)


def test_torch_stays_out_of_the_http_process() -> None:
    import subprocess

    code = "import sys, server.app, server.tools.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
