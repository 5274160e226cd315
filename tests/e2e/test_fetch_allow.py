"""LoRAs and image prompts by URL through a real `fluxd serve --fetch-allow`, from a file server on 127.0.0.1,
with the official SDK's extra_body: a LoRA fetched once into the LoRA folder's cache, and every way a fetch
goes wrong a 400 naming the field."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from pipelines.contract.lora_catalog import FOLDER
from tests.conftest import link_tiny_checkpoints
from tests.e2e.conftest import HTTP, Server, start_server, stop_server
from tests.imagery import photo
from tests.origin import Origin, serving

LORA = "tiny-flux1-style"  # written by `fluxd weights tiny` (pipelines/tools/tiny.py)
MiB = 2**20
SIGNED = "/files/signed.safetensors?X-Amz-Credential=AKIA&X-Amz-Signature=" + "f" * 3000  # as S3 signs


@pytest.fixture(scope="module")
def origin(tiny_weights: Path) -> Iterator[Origin]:
    with serving() as served:
        served.routes.update(
            {
                "/files/style.safetensors?sig=s3cret": (
                    200,
                    {},
                    (tiny_weights / FOLDER / f"{LORA}.safetensors").read_bytes(),
                ),
                SIGNED: (200, {}, (tiny_weights / FOLDER / f"{LORA}.safetensors").read_bytes()),
                "/files/big.safetensors": (200, {}, b"\0" * (MiB + 1)),
                "/files/broken.safetensors": (200, {}, b"\xff" * 256),
                "/files/away": (302, {"Location": "/private/style.safetensors?token=s3cret"}, b""),
                "/files/prompt.png": (200, {}, photo(32, 32)),
                "/private/prompt.png": (200, {}, photo(32, 32)),
            }
        )
        yield served


@pytest.fixture(scope="module")
def weights(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoints with a LoRA folder of this module's own, where the cache is written."""
    root = link_tiny_checkpoints(tiny_weights, tmp_path_factory.mktemp("fetch-weights"), but=FOLDER)
    shutil.copytree(tiny_weights / FOLDER, root / FOLDER)
    return root


@pytest.fixture(scope="module")
def served(origin: Origin, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fetch-server")
    server = start_server(weights, tmp, "--fetch-allow", f"{origin.url}/files/", "--fetch-max-mb", "1")
    yield server
    stop_server(server)


@pytest.fixture()
def client(served: Server) -> openai.OpenAI:
    return served.client(max_retries=0, timeout=180)


def render(client: openai.OpenAI, **extra: object) -> np.ndarray:
    result = client.images.generate(
        model="flux.1-dev",
        prompt="a fox",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": 2, **extra},
    )
    assert result.data is not None and result.data[0].b64_json is not None
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))


def test_a_lora_by_url_renders_as_the_same_file_named_and_is_fetched_once(
    client: openai.OpenAI, served: Server, origin: Origin, weights: Path
) -> None:
    url = f"{origin.url}/files/style.safetensors?sig=s3cret"
    first = render(client, loras=[{"path": url, "scale": 1.0}])
    again = render(client, loras=[{"path": url, "scale": 1.0}])
    named = render(client, loras=[{"path": LORA, "scale": 1.0}])
    assert np.array_equal(first, named) and np.array_equal(again, named)
    assert not np.array_equal(first, render(client))
    assert origin.gets["/files/style.safetensors?sig=s3cret"] == 1  # the second request read the cache
    assert len(list((weights / FOLDER / ".cache").glob("*.safetensors"))) == 1
    listed = [lora["id"] for lora in HTTP.get(f"{served.url}/v1/loras").json()["data"]]
    assert LORA in listed and not any(".cache" in name for name in listed)  # the cache is no catalogue


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/private/style.safetensors", "--fetch-allow"),
        ("/files/../private/style.safetensors", "--fetch-allow"),
        ("/files/away", "a redirect from"),
        ("/files/big.safetensors", "larger than 1 MiB"),
        ("/files/broken.safetensors", "not a valid safetensors file"),
        ("/files/missing.safetensors?token=s3cret", "HTTP 404"),
    ],
)
def test_a_url_fetch_that_fails_is_a_400_naming_loras(
    client: openai.OpenAI, origin: Origin, path: str, says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        render(client, loras=[{"path": f"{origin.url}{path}"}])
    assert info.value.status_code == 400 and info.value.param == "loras"
    assert says in info.value.message and "s3cret" not in info.value.message
    assert not any(get.startswith("/private") for get in origin.gets)


def test_credentials_in_a_url_are_refused_and_never_shown(client: openai.OpenAI, origin: Origin) -> None:
    host = origin.url.removeprefix("http://")
    with pytest.raises(openai.BadRequestError) as info:
        render(client, loras=[{"path": f"http://ops:hunter2@{host}/files/style.safetensors"}])
    assert info.value.param == "loras" and "hunter2" not in str(info.value.body)


def test_an_image_prompt_by_url_renders_as_the_same_image_sent_inline(
    client: openai.OpenAI, origin: Origin
) -> None:
    inline = "data:image/png;base64," + base64.b64encode(photo(32, 32)).decode()
    fetched = render(client, image_prompt=f"{origin.url}/files/prompt.png")
    assert np.array_equal(fetched, render(client, image_prompt=inline))
    with pytest.raises(openai.BadRequestError) as info:
        render(client, image_prompt=f"{origin.url}/private/prompt.png")
    assert info.value.param == "image_prompt" and "--fetch-allow" in info.value.message
    assert "/private/prompt.png" not in origin.gets


def test_a_signed_url_thousands_of_characters_long_is_fetched(client: openai.OpenAI, origin: Origin) -> None:
    named = render(client, loras=[{"path": LORA, "scale": 1.0}])
    assert np.array_equal(render(client, loras=[{"path": f"{origin.url}{SIGNED}", "scale": 1.0}]), named)
    assert origin.gets[SIGNED] == 1


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"num_inference_steps": 0}, "num_inference_steps"), ({"cfg_scale": 1000}, "cfg_scale")],
)
def test_a_request_refused_for_another_field_fetches_nothing(
    client: openai.OpenAI, origin: Origin, fields: dict, param: str
) -> None:
    lora, prompt = "/files/style.safetensors?sig=unfetched", "/files/prompt.png?unfetched"
    named = {"loras": [{"path": f"{origin.url}{lora}"}], "image_prompt": f"{origin.url}{prompt}"}
    with pytest.raises(openai.BadRequestError) as info:
        render(client, **named, **fields)
    assert info.value.param == param
    assert origin.gets[lora] == 0 and origin.gets[prompt] == 0
