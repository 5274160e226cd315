"""Bad input: a 4xx in the OpenAI envelope naming its parameter, sent once; the next request works."""

from __future__ import annotations

import io

import openai
import pytest
from PIL import Image

from tests.e2e.conftest import HTTP, Server
from tests.imagery import png

FAST = {"num_inference_steps": 2}


def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")
    return buffer.getvalue()


GENERATION_CASES = [
    ({"size": "big"}, "size"),
    ({"size": "0x0"}, "size"),
    ({"size": "20000x10"}, "size"),
    ({"n": 11}, "n"),
    ({"n": 0}, "n"),
    ({"quality": "ultra"}, "quality"),
    ({"background": "transparent"}, "background"),
    ({"output_format": "bmp"}, "output_format"),
    ({"output_compression": 101}, "output_compression"),
    ({"output_format": "png", "output_compression": 50}, "output_compression"),
    ({"response_format": "xml"}, "response_format"),
    ({"aspect_ratio": "wide"}, "aspect_ratio"),
    ({"resolution": "huge"}, "resolution"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**40}, "seed"),
    ({"seed": "abc"}, "seed"),
    ({"cfg_scale": 99}, "cfg_scale"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 1000}, "num_inference_steps"),
    ({"width": 64}, "height"),
    ({"not_a_field": 1}, "not_a_field"),
    ({"max_sequence_length": 100000}, "max_sequence_length"),
    ({"max_sequence_length": {"a": 1}}, "max_sequence_length"),
    ({"prompt": ""}, "prompt"),
    ({"stream": True, "n": 2}, "n"),
    ({"partial_images": 2}, "partial_images"),
    ({"stream": True, "output_format": "gif"}, "output_format"),
    ({"safety_tolerance": 9}, "safety_tolerance"),
    ({"acceleration": "ludicrous"}, "acceleration"),
    ({"model": "flux.1-dev", "prompt_enhancement": "on"}, "prompt_enhancement"),
    ({"model": "flux1.1-pro", "enhance_prompt": True}, "enhance_prompt"),
    ({"model": "flux.2-dev-turbo", "num_inference_steps": 20}, "num_inference_steps"),
]


@pytest.mark.parametrize(("fields", "param"), GENERATION_CASES, ids=[p for _, p in GENERATION_CASES])
def test_bad_generation_fields(server: Server, fields: dict, param: str) -> None:
    body = {"prompt": "x", "size": "16x16", **FAST, **fields}
    response = HTTP.post(f"{server.url}/v1/images/generations", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert response.headers["x-request-id"]


def test_missing_prompt_and_bad_json(server: Server) -> None:
    response = HTTP.post(f"{server.url}/v1/images/generations", json={"size": "16x16"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    garbage = HTTP.post(
        f"{server.url}/v1/images/generations",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert garbage.status_code == 400 and "error" in garbage.json()


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(model="dall-e-3", prompt="x")
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


EDIT_CASES = [
    ({"image": ("a.png", b"", "image/png")}, {}, "image"),
    ({"image": ("a.txt", b"hello, I am text", "text/plain")}, {}, "image"),
    ({"image": ("a.png", png()[:50], "image/png")}, {}, "image"),
    ({"image": ("a.png", bomb(), "image/png")}, {}, "image"),
    ({"image": ("a.gif", b"GIF89a" + b"\0" * 20, "image/gif")}, {}, "image"),
    ({"image": ("a.png", png(32, 32), "image/png")}, {}, "image"),
    ({"image": ("a.png", png(), "image/png"), "mask": ("m.png", png(mode="RGBA"), "image/png")}, {}, "mask"),
    ({"image": ("a.png", png(), "image/png")}, {"model": "flux.1-dev"}, "model"),
    ({"image": ("a.png", png(), "image/png")}, {"n": "eleven"}, "n"),
    ({"image": ("a.png", png(), "image/png")}, {"input_fidelity": "max"}, "input_fidelity"),
]


@pytest.mark.parametrize(
    ("files", "fields", "param"), EDIT_CASES, ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(EDIT_CASES)]
)
def test_bad_edits(server: Server, files: dict, fields: dict, param: str) -> None:
    data = {"prompt": "x", "size": "64x64", "num_inference_steps": "2", **fields}
    response = HTTP.post(f"{server.url}/v1/images/edits", data=data, files=files)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_too_many_references(server: Server) -> None:
    files = [("image[]", (f"{i}.png", png(), "image/png")) for i in range(5)]
    response = HTTP.post(f"{server.url}/v1/images/edits", data={"prompt": "x"}, files=files)
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"
    kontext = HTTP.post(
        f"{server.url}/v1/images/edits", data={"prompt": "x", "model": "flux.1-kontext-dev"}, files=files[:2]
    )
    assert kontext.status_code == 400 and kontext.json()["error"]["param"] == "image"


def test_missing_image(server: Server) -> None:
    response = HTTP.post(f"{server.url}/v1/images/edits", data={"prompt": "x"}, files={"other": ("x", b"1")})
    assert response.status_code == 400


def test_sdk_sends_a_4xx_once_and_the_next_request_succeeds(server: Server) -> None:
    client = server.client(max_retries=2)
    before = server.logs().count("POST /v1/images/generations 400")
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="x", size="nope")
    assert info.value.param == "size" if hasattr(info.value, "param") else info.value.body["param"] == "size"
    assert server.logs().count("POST /v1/images/generations 400") == before + 1
    ok = client.images.generate(prompt="x", size="16x16", response_format="b64_json", extra_body=FAST)
    assert ok.data[0].b64_json


def test_body_over_the_limit_is_413(tiny_weights, tmp_path) -> None:
    from tests.e2e.conftest import start_server, stop_server

    small = start_server(tiny_weights, tmp_path, "--max-body-mb", "0.01")
    try:
        response = HTTP.post(
            f"{small.url}/v1/images/edits",
            data={"prompt": "x"},
            files={"image": ("a.png", b"\x89PNG" + b"0" * 20000, "image/png")},
        )
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    finally:
        stop_server(small)
