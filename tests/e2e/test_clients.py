"""Third-party clients as their users call them, against a real `fluxd serve --demo`: the Vercel AI SDK
(Node: `ai` with `@ai-sdk/openai` and `@ai-sdk/openai-compatible`), LangChain's DallEAPIWrapper and
LiteLLM. Each client reads the field it was written for when it names no response_format (gpt-image-era
ones b64_json, DALL-E-era ones url), so fluxd sends both. A client whose package is absent skips, saying why.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image

from tests.e2e.conftest import HTTP, Server
from tests.imagery import png

NODE = Path(__file__).resolve().parent / "node"
AI_SDK_PACKAGES = ("ai", "@ai-sdk/openai", "@ai-sdk/openai-compatible")
FAST = {"num_inference_steps": 2}


def ai_sdk_missing() -> str | None:
    if shutil.which("node") is None:
        return "node not installed"
    absent = [name for name in AI_SDK_PACKAGES if not (NODE / "node_modules" / name).is_dir()]
    if absent:
        return f"npm packages missing ({', '.join(absent)}): npm ci --prefix tests/e2e/node (.ci/run does)"
    return None


def python_missing(module: str, package: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{package} not installed: pip install -e '.[test]'"
    return None


def skip_unless(reason: str | None) -> pytest.MarkDecorator:
    # Decided at collection, so a machine without the client does not start a server for nothing.
    return pytest.mark.skipif(reason is not None, reason=f"client not run: {reason}")


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


# ---- Vercel AI SDK (Node) ------------------------------------------------------------------------------


def ai_sdk(server: Server, call: dict[str, Any]) -> dict[str, Any]:
    """One generateImage call through tests/e2e/node/ai_sdk.mjs, and what it printed."""
    done = subprocess.run(
        ["node", str(NODE / "ai_sdk.mjs"), f"{server.url}/v1", json.dumps(call)],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return json.loads(done.stdout)


# (call, images it reads as (width, height) PNGs, images expected, their size, requests the SDK makes).
# @ai-sdk/openai sends only OpenAI's own options, so its calls run Turbo (8 steps by default); for ids it
# does not know it asks for one image per request. openai-compatible passes providerOptions.fluxd through.
AI_SDK_CASES = {
    "openai-generate": (
        {"provider": "openai", "model": "flux.2-dev-turbo", "size": "64x48"},
        [],
        1,
        (64, 48),
        1,
    ),
    "openai-generate-n2": (
        {"provider": "openai", "model": "flux.2-dev-turbo", "size": "32x32", "n": 2},
        [],
        2,
        (32, 32),
        2,
    ),
    # Edits send no response_format and read b64_json: the gpt-image clients' way.
    "openai-edit-one": (
        {"provider": "openai", "model": "flux.2-dev-turbo", "size": "64x64"},
        [(80, 48)],
        1,
        (64, 64),
        1,
    ),
    "openai-edit-two": (
        {"provider": "openai", "model": "flux.2-dev-turbo", "size": "48x64"},
        [(80, 48), (64, 96)],
        1,
        (48, 64),
        1,
    ),
    "compatible-generate-n3": (
        {"provider": "compatible", "model": "flux.2-dev", "size": "32x32", "n": 3},
        [],
        3,
        (32, 32),
        1,
    ),
    "compatible-edit-kontext": (
        {"provider": "compatible", "model": "flux.1-kontext-dev", "size": "64x64"},
        [(80, 48)],
        1,
        (64, 64),
        1,
    ),
    "compatible-edit-two-n2": (
        {"provider": "compatible", "model": "flux.2-dev", "size": "64x64", "n": 2},
        [(80, 48), (40, 40)],
        2,
        (64, 64),
        1,
    ),
}


@skip_unless(ai_sdk_missing())
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", sorted(AI_SDK_CASES))
def test_ai_sdk_generate_image(server: Server, tmp_path: Path, case: str) -> None:
    call, inputs, count, size, requests = AI_SDK_CASES[case]
    paths = []
    for index, (width, height) in enumerate(inputs):
        path = tmp_path / f"ref{index}.png"
        path.write_bytes(png(width, height, (60 * index, 120, 200)))
        paths.append(str(path))
    call = {"prompt": "a red fox in the snow", "images": paths, **call}
    if call["provider"] == "compatible":
        call["providerOptions"] = {"fluxd": {**FAST, "seed": 3}}
    result = ai_sdk(server, call)
    images = [base64.b64decode(image["base64"]) for image in result["images"]]
    assert len(images) == count and len(set(images)) == count
    assert all(size_of(image) == size for image in images)
    assert {image["mediaType"] for image in result["images"]} == {"image/png"}
    assert result["calls"] == requests


# ---- LangChain -----------------------------------------------------------------------------------------


@skip_unless(python_missing("langchain_community", "langchain-community"))
def test_langchain_dalle_wrapper_reads_urls(server: Server) -> None:
    from langchain_community.utilities.dalle_image_generator import DallEAPIWrapper

    # A DALL-E-era client: no response_format, reads `url`; it passes no extra fields, so Turbo's 8 steps.
    wrapper = DallEAPIWrapper(
        model="flux.2-dev-turbo",
        base_url=f"{server.url}/v1",
        api_key="unused",
        size="64x48",
        n=2,
        max_retries=0,
    )
    urls = wrapper.run("a red fox in the snow").split("\n")
    assert len(urls) == 2 and all(url.startswith(f"{server.url}/v1/files/images/") for url in urls)
    images = [HTTP.get(url).content for url in urls]
    assert all(size_of(image) == (64, 48) for image in images) and images[0] != images[1]


# ---- LiteLLM -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm() -> ModuleType:
    # Imported, LiteLLM fetches its price list from GitHub unless told to use the copy it ships; tests send
    # traffic to 127.0.0.1 only.
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    return importlib.import_module("litellm")


def litellm_call(server: Server, **fields: Any) -> dict[str, Any]:
    # LiteLLM refuses response_format for openai/ models before sending anything (UnsupportedParamsError,
    # its own check): its users pass it, like fluxd's own fields, in extra_body.
    return {"model": "openai/flux.2-dev", "api_base": f"{server.url}/v1", "api_key": "unused", **fields}


needs_litellm = skip_unless(python_missing("litellm", "litellm"))


@needs_litellm
def test_litellm_image_generation(server: Server, litellm: ModuleType) -> None:
    answer = litellm.image_generation(
        prompt="a red fox", **litellm_call(server, size="64x48", extra_body=FAST)
    )
    [image] = answer.data
    assert HTTP.get(image.url).content == base64.b64decode(image.b64_json)
    assert size_of(base64.b64decode(image.b64_json)) == (64, 48)
    extra = {"response_format": "b64_json", "seed": 4, **FAST}
    two = litellm.image_generation(
        prompt="a red fox", **litellm_call(server, size="32x32", n=2, extra_body=extra)
    )
    assert [d.url for d in two.data] == [None, None]
    images = [base64.b64decode(d.b64_json) for d in two.data]
    assert images[0] != images[1] and all(size_of(image) == (32, 32) for image in images)


@needs_litellm
def test_litellm_image_edit(server: Server, litellm: ModuleType) -> None:
    one = litellm.image_edit(
        image=png(80, 48), prompt="make it red", **litellm_call(server, size="64x64", extra_body=FAST)
    )
    [image] = one.data
    assert image.url and size_of(base64.b64decode(image.b64_json)) == (64, 64)
    two = litellm.image_edit(
        image=[png(80, 48), png(64, 96, (200, 0, 0))],
        prompt="combine them",
        **litellm_call(server, size="48x64", extra_body={"response_format": "b64_json", **FAST}),
    )
    [image] = two.data
    assert image.url is None and size_of(base64.b64decode(image.b64_json)) == (48, 64)
