"""LoRAs per request through a real server and the official SDK (`extra_body={"loras": [...]}`): they change
the pixels on generations, edits and streams; scale 0 and the base stay bit for bit; a burst mixing LoRA sets
is batched by set; every bad `loras` is a 400 naming it, and the server goes on."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from pipelines.contract.lora_catalog import FOLDER
from tests.e2e.conftest import HTTP, Server, start_server, stop_server, wait_until
from tests.e2e.test_serving import LONG, batches, generate, idle, in_background, pixels
from tests.imagery import png

FLUX2_LORA = "tiny-flux2-style"  # written by `fluxd weights tiny` (pipelines/tools/tiny.py)
FLUX1_LORA = "tiny-flux1-style"
FAST = {"size": "64x64", "response_format": "b64_json"}


@pytest.fixture(scope="module")
def weights(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoints, their example LoRAs and files in the LoRA folder that are no LoRA."""
    root = tmp_path_factory.mktemp("lora-e2e")
    for folder in tiny_weights.iterdir():
        if folder.name != FOLDER:
            (root / folder.name).symlink_to(folder)
    shutil.copytree(tiny_weights / FOLDER, root / FOLDER)
    (root / FOLDER / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    from safetensors.numpy import save_file

    save_file({"some.weight": np.zeros((2, 2), np.float32)}, str(root / FOLDER / "not-a-lora.safetensors"))
    return root


@pytest.fixture(scope="module")
def served(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(weights, tmp_path_factory.mktemp("lora-server"))
    yield server
    stop_server(server)


@pytest.fixture()
def client(served: Server) -> openai.OpenAI:
    return served.client(max_retries=0, timeout=180)


def image(b64: str | None) -> np.ndarray:
    assert b64 is not None
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=int)


def sdk_generate(client: openai.OpenAI, model: str = "flux.2-dev", **extra) -> np.ndarray:
    result = client.images.generate(
        model=model,
        prompt="a fox",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": 2, **extra},
    )
    assert result.data is not None
    return image(result.data[0].b64_json)


def test_a_lora_changes_the_pixels_scale_zero_and_the_base_do_not(client: openai.OpenAI) -> None:
    base = sdk_generate(client)
    styled = sdk_generate(client, loras=[{"path": FLUX2_LORA, "scale": 1.0}])
    zero = sdk_generate(client, loras=[{"path": f"{FLUX2_LORA}.safetensors", "scale": 0}])
    assert np.abs(styled - base).mean() > 1
    assert np.array_equal(zero, base)
    assert np.array_equal(sdk_generate(client), base)
    flux1 = sdk_generate(client, "flux.1-dev")
    assert not np.array_equal(sdk_generate(client, "flux.1-dev", loras=[{"path": FLUX1_LORA}]), flux1)
    turbo = sdk_generate(client, "flux.2-dev-turbo", num_inference_steps=8)
    stacked = sdk_generate(client, "flux.2-dev-turbo", num_inference_steps=8, loras=[{"path": FLUX2_LORA}])
    assert not np.array_equal(turbo, stacked)


def test_edits_take_loras_from_the_sdk_and_as_a_json_field(client: openai.OpenAI, served: Server) -> None:
    def edit(**extra) -> np.ndarray:
        result = client.images.edit(
            model="flux.1-kontext-dev",
            image=("in.png", png(64, 64), "image/png"),
            prompt="make it blue",
            response_format="b64_json",
            extra_body={"seed": 3, "num_inference_steps": 2, "size": "64x64", **extra},
        )
        assert result.data is not None
        return image(result.data[0].b64_json)

    base = edit()
    styled = edit(loras=[{"path": FLUX1_LORA, "scale": 1.5}])
    assert not np.array_equal(base, styled)
    form = {"model": "flux.1-kontext-dev", "prompt": "make it blue", "seed": "3", "size": "64x64"}
    form |= {"num_inference_steps": "2", "response_format": "b64_json"}
    raw = httpx.post(
        f"{served.url}/v1/images/edits",
        data={**form, "loras": f'[{{"path": "{FLUX1_LORA}", "scale": 1.5}}]'},
        files={"image": ("in.png", png(64, 64), "image/png")},
        timeout=180,
    )
    assert raw.status_code == 200, raw.text
    assert np.array_equal(pixels(raw)[0], styled)


def test_a_stream_takes_loras(client: openai.OpenAI) -> None:
    styled = sdk_generate(client, loras=[{"path": FLUX2_LORA, "scale": 0.8}])
    stream = client.images.generate(
        model="flux.2-dev",
        prompt="a fox",
        size="64x64",
        stream=True,
        extra_body={"seed": 5, "num_inference_steps": 2, "loras": [{"path": FLUX2_LORA, "scale": 0.8}]},
    )
    [done] = [event for event in stream if event.type == "image_generation.completed"]
    assert np.array_equal(image(done.b64_json), styled)


BAD_LORAS = [
    [{"path": "no-such-lora"}],
    [{"path": "../flux.2-dev/transformer/diffusion_pytorch_model"}],
    [{"path": "/etc/passwd"}],
    [{"path": "https://example.com/style.safetensors"}],
    [{"path": "broken"}],
    [{"path": "not-a-lora"}],
    [{"path": FLUX1_LORA}],  # a FLUX.1 LoRA on FLUX.2
    [{"path": FLUX2_LORA, "scale": 4.5}],
    [{"path": FLUX2_LORA, "scale": -5}],
    [{"path": FLUX2_LORA}] * 4,
    [{"path": FLUX2_LORA}, {"path": f"{FLUX2_LORA}.safetensors"}],
    [{"scale": 1.0}],
    [{"path": FLUX2_LORA, "weight": 1.0}],
    [{"path": ""}],
    "tiny-flux2-style",
]


@pytest.mark.parametrize("loras", BAD_LORAS)
def test_bad_loras_are_a_400_naming_loras(client: openai.OpenAI, loras: object) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk_generate(client, loras=loras)
    assert info.value.param == "loras", info.value.body
    assert info.value.status_code == 400


def test_the_server_goes_on_after_bad_loras(client: openai.OpenAI, served: Server) -> None:
    for loras in BAD_LORAS[:3]:
        with pytest.raises(openai.BadRequestError):
            sdk_generate(client, loras=loras)
    raw = httpx.post(
        f"{served.url}/v1/images/edits",
        data={"model": "flux.1-kontext-dev", "prompt": "x", "loras": "[not json"},
        files={"image": ("in.png", png(64, 64), "image/png")},
        timeout=60,
    )
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "loras"
    assert sdk_generate(client, loras=[{"path": FLUX2_LORA}]).shape == (64, 64, 3)


def test_loras_are_listed_with_family_and_rank(served: Server) -> None:
    listing = HTTP.get(f"{served.url}/v1/loras").json()
    found = {entry["id"]: entry for entry in listing["data"]}
    assert found[FLUX2_LORA]["family"] == "flux2" and found[FLUX1_LORA]["family"] == "flux1"
    assert found[FLUX2_LORA]["rank"] == 4 and found[FLUX2_LORA]["bytes"] > 0
    assert "flux.2-dev-turbo" in found[FLUX2_LORA]["models"]
    assert found[FLUX1_LORA]["models"] == ["flux.1-kontext-dev", "flux.1-dev", "flux1.1-pro"]
    assert {entry["id"] for entry in listing["unreadable"]} == {"broken", "not-a-lora"}


def test_a_burst_mixing_lora_sets_is_batched_by_set(served: Server) -> None:
    wait_until(lambda: idle(served), 120)
    dispatched = batches(served)
    # A blocker holds the worker while the burst queues (LONG's 768 px would take minutes on a loaded CPU).
    in_background(
        lambda: generate(served, timeout=600, **{**LONG, "size": "256x256", "num_inference_steps": 40})
    )
    wait_until(lambda: batches(served) > dispatched)
    sets = {
        100: [{"path": FLUX2_LORA, "scale": 1.0}],
        200: [],
        300: [{"path": FLUX2_LORA, "scale": 1.0}],
        400: [],
        500: [{"path": FLUX2_LORA, "scale": 0.5}],
    }
    same = {"prompt": "batch me", "num_inference_steps": 3}
    calls = {
        seed: in_background(lambda s=seed: generate(served, 600, seed=s, loras=sets[s], **same))
        for seed in sets
    }
    for thread, _ in calls.values():
        thread.join(600)
    # The blocker, then at most one call per LoRA set (three): never more calls than sets, never a mixed one.
    assert batches(served) - dispatched <= 4
    for seed, (_, out) in calls.items():
        [batched] = pixels(out[0])
        [solo] = pixels(generate(served, 600, seed=seed, loras=sets[seed], **same))
        assert np.abs(batched - solo).max() <= 1
    metrics = HTTP.get(f"{served.url}/metrics").text
    assert 'fluxd_lora_adapters_total{model="flux.2-dev",result="hit"}' in metrics
