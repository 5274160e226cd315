"""Bad input: a 4xx in the OpenAI envelope naming its parameter, sent once; the next request works."""

from __future__ import annotations

import io
from collections.abc import Iterator

import openai
import pytest
from PIL import Image

from tests.e2e.conftest import HTTP, Server, metric
from tests.imagery import mask, png

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
    # JSON carries types: none is converted behind the client's back.
    ({"n": True}, "n"),
    ({"seed": True}, "seed"),
    ({"cfg_scale": False}, "cfg_scale"),
    ({"stream": "yes"}, "stream"),
    ({"max_sequence_length": True}, "max_sequence_length"),
    ({"max_sequence_length": "256"}, "max_sequence_length"),
    # "" is not null: it does not mean "the default".
    ({"size": ""}, "size"),
    ({"model": ""}, "model"),
    ({"aspect_ratio": ""}, "aspect_ratio"),
    # Two names for one setting that disagree.
    ({"model": "flux.2-dev", "enhance_prompt": False, "prompt_enhancement": "on"}, "enhance_prompt"),
    ({"output_format": "jpeg", "output_compression": 50, "output_quality": 60}, "output_quality"),
    # Nothing that would be silently dropped.
    ({"stream": True, "response_format": "url"}, "response_format"),
    ({"model": "flux.1-dev", "negative_prompt": "blur"}, "negative_prompt"),
    ({"guidance_scale": 3.0}, "guidance_scale"),
    ({"prompt_enhancement": "maybe"}, "prompt_enhancement"),
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
    for body, words in (
        (b"{not json", "not valid JSON"),
        (b'{"prompt": "x"', "not valid JSON"),
        (b"", "no body"),
    ):
        answer = HTTP.post(
            f"{server.url}/v1/images/generations", content=body, headers={"content-type": "application/json"}
        )
        error = answer.json()["error"]
        assert answer.status_code == 400 and words in error["message"] and error["param"] is None, body


def test_set_by_fluxd_arguments_name_the_parameter_to_use(server: Server) -> None:
    response = HTTP.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "guidance_scale": 3.0})
    assert "use 'cfg_scale'" in response.json()["error"]["message"]


def test_a_negative_prompt_runs_with_true_cfg(client: openai.OpenAI) -> None:
    extra = {**FAST, "negative_prompt": "blur", "true_cfg_scale": 2.0}
    result = client.images.generate(
        model="flux.1-dev", prompt="x", size="16x16", response_format="b64_json", extra_body=extra
    )
    assert result.data[0].b64_json


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
    ({"image": ("a.png", png(), "image/png"), "mask": ("m.png", mask(32, 32), "image/png")}, {}, "mask"),
    (
        {"image": ("a.png", png(), "image/png"), "mask": ("m.png", mask(box=(0, 0, 0, 0)), "image/png")},
        {},
        "mask",
    ),
    (
        {"image": ("a.png", png(), "image/png"), "mask": ("m.png", b"\x89PNG\r\n\x1a\n", "image/png")},
        {},
        "mask",
    ),
    ({"image": ("a.png", png(), "image/png")}, {"mask": "transparent"}, "mask"),
    ({"image": ("a.png", png(), "image/png")}, {"strength": "0.5"}, "strength"),
    (
        {"image": ("a.png", png(), "image/png"), "mask": ("m.png", mask(64, 64), "image/png")},
        {"strength": "1.5"},
        "strength",
    ),
    ({"image": ("a.png", png(), "image/png")}, {"model": "flux.1-dev"}, "model"),
    ({"image": ("a.png", png(), "image/png")}, {"n": "eleven"}, "n"),
    ({"image": ("a.png", png(), "image/png")}, {"input_fidelity": "max"}, "input_fidelity"),
    ({"image": ("a.png", png(), "image/png")}, {"prompt": ""}, "prompt"),
    ({"image": ("a.png", png(), "image/png")}, {"prompt": "  "}, "prompt"),
    ({"image": ("a.png", png(), "image/png")}, {"size": ""}, "size"),
    (
        {"image": ("a.png", png(), "image/png")},
        {"model": "flux.1-kontext-dev", "max_sequence_length": "x"},
        "max_sequence_length",
    ),
]


@pytest.mark.parametrize(
    ("files", "fields", "param"), EDIT_CASES, ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(EDIT_CASES)]
)
def test_bad_edits(server: Server, files: dict, fields: dict, param: str) -> None:
    data = {"prompt": "x", "size": "64x64", "num_inference_steps": "2", **fields}
    response = HTTP.post(f"{server.url}/v1/images/edits", data=data, files=files)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert " at 0x" not in response.json()["error"]["message"]  # no Python object reprs


def test_too_many_references(server: Server) -> None:
    files = [("image[]", (f"{i}.png", png(), "image/png")) for i in range(5)]
    response = HTTP.post(f"{server.url}/v1/images/edits", data={"prompt": "x"}, files=files)
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"
    kontext = HTTP.post(
        f"{server.url}/v1/images/edits", data={"prompt": "x", "model": "flux.1-kontext-dev"}, files=files[:2]
    )
    assert kontext.status_code == 400 and kontext.json()["error"]["param"] == "image"


def test_more_files_than_a_request_is_read_for_name_image(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=[png() for _ in range(17)], prompt="x", size="64x64", extra_body=FAST)
    assert info.value.status_code == 400 and info.value.param == "image"
    assert "Too many files" in info.value.message


def test_a_field_sent_twice_is_refused_not_overwritten(server: Server) -> None:
    files = [("image", ("a.png", png(), "image/png")), ("seed", (None, "1")), ("seed", (None, "2"))]
    response = HTTP.post(f"{server.url}/v1/images/edits", data={"prompt": "x"}, files=files)
    assert response.status_code == 400 and response.json()["error"]["param"] == "seed"


def test_variations_take_one_image(server: Server) -> None:
    files = [("image", ("a.png", png(), "image/png")), ("image", ("b.png", png(), "image/png"))]
    response = HTTP.post(f"{server.url}/v1/images/variations", files=files)
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"


def test_missing_image(server: Server) -> None:
    response = HTTP.post(f"{server.url}/v1/images/edits", data={"prompt": "x"}, files={"other": ("x", b"1")})
    assert response.status_code == 400


def test_sdk_sends_a_4xx_once_and_the_next_request_succeeds(server: Server) -> None:
    client = server.client(max_retries=2)
    answered = 'fluxd_errors_total{code="invalid_value",status="400"}'
    before = metric(server, answered)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="x", size="nope")
    assert info.value.param == "size" if hasattr(info.value, "param") else info.value.body["param"] == "size"
    assert metric(server, answered) == before + 1  # answered once: the SDK did not retry it
    ok = client.images.generate(prompt="x", size="16x16", response_format="b64_json", extra_body=FAST)
    assert ok.data[0].b64_json


def test_body_over_the_limit_is_413(strict_server: Server) -> None:
    """The strict server takes bodies of up to 10 kB (STRICT_MAX_BODY_MB)."""
    response = HTTP.post(
        f"{strict_server.url}/v1/images/edits",
        data={"prompt": "x"},
        files={"image": ("a.png", b"\x89PNG" + b"0" * 20000, "image/png")},
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    # Without a Content-Length (chunked), the body is counted as it arrives.
    def chunks(head: bytes, tail: bytes) -> Iterator[bytes]:
        yield head
        for _ in range(8):
            yield b"x" * 4096
        yield tail

    chunked = {
        "/v1/images/generations": (chunks(b'{"prompt": "x", "user": "', b'"}'), "application/json"),
        "/v1/images/edits": (
            chunks(b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n', b"\r\n--b--\r\n"),
            "multipart/form-data; boundary=b",
        ),
    }
    for path, (body, content_type) in chunked.items():
        response = HTTP.post(
            f"{strict_server.url}{path}", content=body, headers={"content-type": content_type}
        )
        assert response.status_code == 413, (path, response.text)
        assert response.json()["error"]["code"] == "request_too_large"
    within = HTTP.post(
        f"{strict_server.url}/v1/images/generations",
        content=iter([b'{"prompt": "x", "size": "16x16", ', b'"num_inference_steps": 2}']),
        headers={"content-type": "application/json"},
    )
    assert within.status_code == 200, within.text
