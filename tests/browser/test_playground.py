"""The playground page (GET /) driven in headless Chromium against a real `fluxd serve --demo`."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from pipelines.contract.masks import edit_weights
from tests.e2e.conftest import Server, start_server, stop_server
from tests.imagery import photo, png

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium", path="/usr/bin")
SCREENSHOT = Path("/tmp/playground.png")
GENERATION_TIMEOUT_MS = 30_000
API_KEY = "playground-test-key"


def b64_png(width: int, height: int, color: str) -> str:
    return base64.b64encode(png(width, height, color)).decode()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH or at /usr/bin/chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(
    browser: Browser, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    # Depends on `browser` so that a missing chromium skips before a server is started for nothing.
    # A key on a loopback bind is enforced too: every test goes through the page's Bearer path.
    running = start_server(tiny_weights, tmp_path_factory.mktemp("playground"), "--api-key", API_KEY)
    yield running
    stop_server(running)


@pytest.fixture()
def fresh_page(browser: Browser, server: Server) -> Iterator[Page]:
    """The page in a new browser context: nothing in localStorage, so no API key yet."""
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    opened = context.new_page()
    opened.goto(f"{server.url}/")
    yield opened
    context.close()


def enter_api_key(page: Page) -> None:
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    expect(page.locator("#model option").first).to_be_attached()


@pytest.fixture()
def page(fresh_page: Page) -> Page:
    enter_api_key(fresh_page)
    return fresh_page


def fill_request(page: Page, prompt: str, size: str, steps: int = 2) -> None:
    page.fill("#prompt", prompt)
    page.select_option("#size", "custom")
    page.fill("#custom-size", size)
    page.fill("#steps", str(steps))


def final_image_size(page: Page) -> list[int]:
    page.wait_for_selector('#result[data-state="final"] img', timeout=GENERATION_TIMEOUT_MS)
    return page.eval_on_selector("#result img", "img => [img.naturalWidth, img.naturalHeight]")


def test_generates_an_image_of_the_requested_size(page: Page) -> None:
    expect(page.locator("#random-banner")).to_be_visible()
    expect(page.locator("#guidance")).not_to_have_value("")
    expect(page.locator("#model-hint")).to_have_text("Runs on the CPU in float32 (no CUDA GPU)")
    fill_request(page, "a red fox in the snow", "64x48")
    page.click("#generate")

    assert final_image_size(page) == [64, 48]
    first_seed = page.inner_text("#seed-used")
    assert re.fullmatch(r"\d+", first_seed)
    assert re.fullmatch(r"\d+\.\d\d s", page.inner_text("#elapsed"))
    expect(page.locator("#history li")).to_have_count(1)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    page.fill("#seed", "7")
    page.click("#generate")
    expect(page.locator("#history li")).to_have_count(2)
    expect(page.locator("#seed-used")).to_have_text("7")
    page.locator("#history li button").nth(1).click()
    expect(page.locator("#seed-used")).to_have_text(first_seed)


def test_the_api_key_is_asked_for_sent_and_remembered(fresh_page: Page) -> None:
    expect(fresh_page.locator("#error")).to_contain_text("Enter the API key")
    enter_api_key(fresh_page)
    expect(fresh_page.locator("#error")).to_be_hidden()
    fresh_page.reload()
    expect(fresh_page.locator("#api-key")).to_have_value(API_KEY)
    expect(fresh_page.locator("#model option").first).to_be_attached()


def test_reference_images_go_to_edits(page: Page) -> None:
    fill_request(page, "make it blue", "64x48")
    reference = {"name": "ref.png", "mimeType": "image/png", "buffer": png(64, 64, "red")}
    page.set_input_files("#images", reference)
    with page.expect_request("**/v1/images/edits"):
        page.click("#generate")
    assert final_image_size(page) == [64, 48]


def record_forms(page: Page) -> None:
    """Keep every FormData the page sends (the browser reports no body that holds a file)."""
    page.evaluate(
        """() => {
            const send = window.fetch;
            window.forms = [];
            window.fetch = (url, init) => {
                if (init && init.body instanceof FormData) window.forms.push(init.body);
                return send(url, init);
            };
        }"""
    )


def last_form(page: Page) -> dict[str, bytes]:
    """The fields of the last FormData sent, by name, files as their bytes."""
    fields = page.evaluate(
        """async () => {
            const out = {};
            for (const [name, value] of window.forms.at(-1)) {
                const bytes = value instanceof Blob ? new Uint8Array(await value.arrayBuffer())
                                                    : new TextEncoder().encode(value);
                out[name] = btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join(""));
            }
            return out;
        }"""
    )
    return {name: base64.b64decode(value) for name, value in fields.items()}


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_a_painted_area_is_sent_as_the_mask_and_only_it_changes(page: Page) -> None:
    page.select_option("#model", "flux.1-dev")
    page.fill("#prompt", "a hat")
    page.fill("#steps", "2")
    expect(page.locator("#mask-row")).to_be_hidden()
    page.set_input_files("#images", {"name": "photo.png", "mimeType": "image/png", "buffer": photo(64, 48)})
    canvas = page.locator("#mask-canvas")
    expect(canvas).to_have_attribute("width", "64")
    canvas.scroll_into_view_if_needed()  # the mouse paints in the viewport
    box = canvas.bounding_box()
    assert box is not None
    # A stroke from a quarter in to the middle, in the canvas's display pixels.
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    page.fill("#strength", "0.9")
    record_forms(page)
    page.click("#generate")
    page.wait_for_selector('#result[data-state="final"] img', timeout=GENERATION_TIMEOUT_MS)
    parts = last_form(page)
    assert parts["strength"] == b"0.9"
    edited = edit_weights(parts["mask"])
    assert edited.shape == (48, 64)
    assert edited[19, 24] == 1 and edited[0, 0] == 0 and edited[47, 63] == 0  # on the stroke; far from it
    src = page.eval_on_selector("#result img", "img => img.src")
    got, sent_pixels = rgb(base64.b64decode(src.split(",", 1)[1])), rgb(photo(64, 48))
    kept = edited == 0
    assert np.array_equal(got[kept], sent_pixels[kept])
    assert not np.array_equal(got[~kept], sent_pixels[~kept])

    page.click("#mask-clear")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("send a mask to inpaint")  # flux.1-dev only inpaints
    assert "mask" not in last_form(page)


def test_the_mask_is_offered_only_for_models_that_inpaint(page: Page) -> None:
    def without_inpaint(route: Route) -> None:
        answer = route.fetch().json()
        for model in answer["data"]:
            model["modes"] = [mode for mode in model["modes"] if mode != "inpaint"]
        route.fulfill(json=answer)

    page.route("**/v1/models", without_inpaint)
    page.reload()
    page.select_option("#model", "flux.2-dev")
    page.set_input_files("#images", {"name": "photo.png", "mimeType": "image/png", "buffer": photo(64, 48)})
    expect(page.locator("#mask-row")).to_be_hidden()
    expect(page.locator("#images-hint")).to_have_text("With images, the request goes to /v1/images/edits.")
    page.select_option("#model", "flux.1-dev")
    expect(page.locator("#images")).to_be_disabled()
    expect(page.locator("#mask-row")).to_be_hidden()


def test_an_invalid_size_shows_the_message_and_the_parameter(page: Page) -> None:
    fill_request(page, "a red fox", "abc")
    page.click("#generate")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("Invalid size 'abc'")
    expect(error).to_contain_text("parameter: size")
    expect(page.locator("#history li")).to_have_count(0)


def watch_states(page: Page) -> None:
    """Record every data-state the result panel passes through, and the image size in each."""
    page.evaluate(
        """() => {
            window.seen = [];
            const result = document.querySelector('#result');
            new MutationObserver(() => {
                const img = result.querySelector('img');
                window.seen.push([result.dataset.state, img ? img.src.length : 0]);
            }).observe(result, {attributes: true, subtree: true, attributeFilter: ['data-state', 'src']});
        }"""
    )


# A job ("Run as a job") is followed on its event feed instead of the request's own stream.
@pytest.mark.parametrize(("as_job", "events"), [(False, "**/v1/images/generations"), (True, "**/events")])
def test_the_servers_partial_images_arrive_before_the_final_one(
    page: Page, as_job: bool, events: str
) -> None:
    watch_states(page)
    fill_request(page, "a red fox", "64x48", steps=30)
    page.set_checked("#as-job", as_job)
    with page.expect_response(events) as response:
        page.click("#generate")
    assert response.value.headers["content-type"].startswith("text/event-stream")
    assert final_image_size(page) == [64, 48]
    states = [state for state, _ in page.evaluate("window.seen")]
    assert "partial" in states and states.index("partial") < states.index("final")
    assert re.fullmatch(r"\d+", page.inner_text("#seed-used"))


def test_a_crlf_stream_is_parsed_too(page: Page) -> None:
    # A canned stream with CRLF line endings, which proxies may introduce, checks the page's parser.
    events = [
        ("image_generation.partial_image", {"b64_json": b64_png(32, 24, "gray"), "partial_image_index": 0}),
        ("image_generation.completed", {"b64_json": b64_png(64, 48, "white"), "size": "64x48"}),
    ]
    body = "".join(f"event: {name}\r\ndata: {json.dumps(data)}\r\n\r\n" for name, data in events)

    def canned(route: Route) -> None:
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body)

    page.route("**/v1/images/generations", canned)
    watch_states(page)
    fill_request(page, "a red fox", "64x48")
    page.click("#generate")

    assert final_image_size(page) == [64, 48]
    states = [state for state, _ in page.evaluate("window.seen")]
    assert states.index("partial") < states.index("final")


def test_a_gpu_workers_mode_is_shown_for_the_model(page: Page) -> None:
    """What an H100 worker reports, put in the real /v1/models answer (no GPU here to report it)."""

    def with_gpu_modes(route: Route) -> None:
        answer = route.fetch().json()
        for model in answer["data"]:
            model["run_modes"] = [
                {
                    "device": "cuda:0",
                    "mode": "fast",
                    "transformer": "float8",
                    "encoder": "float8",
                    "offload": "none",
                    "compile": True,
                },
                {"device": "cuda:1", "mode": None, "error": "mode: 'resident' needs about 115.6 GB"},
            ]
        route.fulfill(json=answer)

    page.route("**/v1/models", with_gpu_modes)
    page.reload()
    expect(page.locator("#model-hint")).to_have_text(
        "Runs on cuda:0 in fast mode: float8, compiled"
        " · cuda:1: unavailable — mode: 'resident' needs about 115.6 GB"
    )


def test_generate_before_the_models_loaded_leaves_the_model_to_the_server(
    browser: Browser, server: Server
) -> None:
    context = browser.new_context()
    context.add_init_script(f"localStorage.setItem('fluxd.apiKey', {json.dumps(API_KEY)})")
    opened = context.new_page()
    held: list[Route] = []

    def hold(route: Route) -> None:
        held.append(route)  # never answered: the model list has not come yet

    opened.route("**/v1/models", hold)
    sent: list[dict] = []

    def canned(route: Route) -> None:
        sent.append(json.loads(route.request.post_data or "{}"))
        body = "event: image_generation.completed\ndata: " + json.dumps(
            {"b64_json": b64_png(64, 48, "white"), "size": "64x48"}
        )
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body + "\n\n")

    opened.route("**/v1/images/generations", canned)
    opened.goto(f"{server.url}/")
    opened.fill("#prompt", "a red fox")
    opened.click("#generate")
    expect(opened.locator("#history li")).to_have_count(1)
    assert held and "model" not in sent[0] and sent[0]["size"] == "auto"
    context.close()
