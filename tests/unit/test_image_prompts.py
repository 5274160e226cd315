"""`image_prompt` in the HTTP front: every value goes through resolve_image_prompt, bad ones are 400s naming
it before anything queues, and a server without the Redux weights says what to pull."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.image_prompts import FOLDER, FORMATS
from pipelines.contract.images import decode_image, reference_sizes
from server.declarations.settings import Settings
from server.front.image_prompts import resolve_image_prompt
from server.front.store import ImageStore
from tests.imagery import mask, photo, png
from tests.standin import StandInHandle
from tests.unit.test_front import BODY, run, until

PNG = png(16, 16)
SETTINGS = Settings()  # no --fetch-allow: a URL of another server is refused before anything is fetched
URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
DEV = {**BODY, "model": "flux.1-dev"}


def with_redux(tmp: Path) -> Path:
    """A weights folder the front takes for one holding the Redux weights (the worker is a stand-in)."""
    (tmp / "weights" / FOLDER).mkdir(parents=True)
    (tmp / "weights" / FOLDER / "model_index.json").write_text("{}")
    return tmp / "weights"


def refused(value: str, store: ImageStore | None = None, base: str | None = "http://fluxd") -> str:
    with pytest.raises(InvalidParameter) as info:
        resolve_image_prompt(value, store or ImageStore(Path("/nonexistent"), 60, 2**20, {}), base, SETTINGS)
    assert info.value.param == "image_prompt"
    return str(info.value)


def test_a_data_uri_is_read_and_checked() -> None:
    assert resolve_image_prompt(URI, ImageStore(Path("/nonexistent"), 60, 2**20, {}), None, SETTINGS) == PNG
    assert "text/plain" in refused("data:text/plain;base64,aGVsbG8=")
    assert "base64" in refused("data:image/png;base64,***")
    assert "data: URI" in refused("data:image/png,rawbytes")
    junk = "data:image/png;base64," + base64.b64encode(b"junk").decode()
    assert "not a PNG, JPEG, WebP or GIF" in refused(junk)
    truncated = base64.b64encode(png(300, 300)[:80]).decode()
    assert "could not be decoded" in refused("data:image/png;base64," + truncated)
    assert "http(s) URL" in refused("file:///etc/passwd")


def test_a_gif_is_taken_as_the_page_says_and_its_first_frame_read() -> None:
    frames = [Image.new("RGB", (24, 16), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    gif = buffer.getvalue()
    uri = "data:image/gif;base64," + base64.b64encode(gif).decode()
    assert resolve_image_prompt(uri, ImageStore(Path("/nonexistent"), 60, 2**20, {}), None, SETTINGS) == gif
    first = decode_image(gif, "image_prompt", FORMATS)
    assert first.mode == "RGB" and first.size == (24, 16) and first.getpixel((0, 0))[0] > 200
    with pytest.raises(InvalidParameter) as caught:  # an uploaded `image` stays PNG, JPEG or WebP (OpenAI's)
        reference_sizes([gif])
    assert "not a PNG, JPEG or WebP" in str(caught.value)


def test_a_url_is_this_servers_own_image_or_refused_by_the_fetch_allow_list(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, 60, 2**20, {"png": "image/png"})
    store.open()
    image_id = store.put(PNG, "png")
    own = f"http://fluxd/v1/files/images/{image_id}.png"
    assert resolve_image_prompt(own, store, "http://fluxd", SETTINGS) == PNG
    assert resolve_image_prompt(own.removesuffix(".png"), store, "http://FLUXD/", SETTINGS) == PNG
    message = refused(f"http://user:secret@elsewhere/v1/files/images/{image_id}.png", store)
    assert "--fetch-allow" in message and "secret" not in message
    assert "--fetch-allow" in refused(own, store, base=None)
    assert "--fetch-allow" in refused(own + "?x=1", store)
    assert "expired" in refused(f"http://fluxd/v1/files/images/{'a' * 32}.png", store)
    assert "expired" in refused(f"http://fluxd/v1/files/images/{image_id}.webp", store)


def test_the_front_refuses_bad_image_prompts_before_the_queue(tmp_path: Path) -> None:
    weights = with_redux(tmp_path)

    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        cases = [
            ({**BODY, "image_prompt": URI}, "does not take 'image_prompt'"),  # FLUX.2 [dev]
            ({**DEV, "image_prompt": "data:image/png;base64,AAAA"}, "not a PNG"),
            ({**DEV, "image_prompt": "https://example.com/a.png"}, "--fetch-allow"),
            ({**DEV, "image_prompt_strength": 0.5}, "send one with it"),
            ({**DEV, "image_prompt": URI, "image_prompt_strength": 1.5}, "less than or equal to 1"),
        ]
        for body, text in cases:
            answer = await client.post("/v1/images/generations", json=body)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["param"].startswith("image_prompt") and text in error["message"], error
        edit = await client.post(
            "/v1/images/edits",
            data={"prompt": "p", "model": "flux.1-kontext-dev", "image_prompt": URI},
            files={"image": ("a.png", PNG, "image/png")},
        )
        assert edit.status_code == 400 and edit.json()["error"]["param"] == "image_prompt"
        for extra in ({"image_prompt": URI}, {"image_prompt_strength": "0.5"}):
            masked = await client.post(
                "/v1/images/edits",
                data={"prompt": "p", "model": "flux.1-dev", **extra},
                files={
                    "image": ("a.png", photo(64, 48), "image/png"),
                    "mask": ("m.png", mask(), "image/png"),
                },
            )
            assert masked.status_code == 400, masked.text
            assert masked.json()["error"]["param"] == next(iter(extra))
        assert not worker.batches

    run(tmp_path, check, weights_dir=weights)


def test_without_redux_weights_the_400_says_what_to_pull(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        answer = await client.post("/v1/images/generations", json={**DEV, "image_prompt": URI})
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert error["param"] == "image_prompt" and "fluxd weights pull redux" in error["message"]
        assert not worker.batches

    run(tmp_path, check, weights_dir=tmp_path)


def test_the_worker_gets_the_image_and_strength_and_own_urls_resolve(tmp_path: Path) -> None:
    weights = with_redux(tmp_path)

    async def answered(client: httpx.AsyncClient, worker: StandInHandle, body: dict) -> httpx.Response:
        sent = asyncio.ensure_future(client.post("/v1/images/generations", json=body))
        await until(lambda: len(worker.batches) == count + 1 or sent.done())
        worker.finish()
        return await sent

    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        nonlocal count
        worker.image_bytes = png(8, 8, (200, 10, 10))
        made = await answered(client, worker, {**BODY, "response_format": "url"})
        count = 1
        url = made.json()["data"][0]["url"]
        answer = await answered(client, worker, {**DEV, "image_prompt": url, "image_prompt_strength": 0.25})
        assert answer.status_code == 200, answer.text
        count = 2
        await answered(client, worker, {**DEV, "image_prompt": URI})
        [[_], [by_url], [by_uri]] = worker.batches
        assert (by_url.image_prompt, by_url.image_prompt_strength) == (worker.image_bytes, 0.25)
        assert (by_uri.image_prompt, by_uri.image_prompt_strength) == (PNG, 1.0)

    count = 0
    run(tmp_path, check, weights_dir=weights)


def test_models_publish_image_prompt_with_its_sources(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient, worker: StandInHandle) -> None:
        for model in ("flux.1-dev", "flux1.1-pro"):
            published = (await client.get(f"/v1/models/{model}")).json()["normalisation"]
            assert "replicate" in published["image_prompt"]["source"]
            assert "BFL" in published["image_prompt_strength"]["source"]
            assert published["image_prompt_strength"]["default"] == 1
        kontext = (await client.get("/v1/models/flux.1-kontext-dev")).json()
        assert "image_prompt" not in kontext["parameters"]

    run(tmp_path, check)
