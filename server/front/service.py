"""The images service: request -> validated RenderRequest -> scheduler -> stored, shaped answer. The worker
encoded the images; this process only forwards their bytes (base64, or a file of the url store)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Literal

from fastapi import Request
from starlette.datastructures import MutableHeaders

from pipelines.contract.arguments import PASSTHROUGH
from pipelines.contract.images import reference_sizes
from pipelines.contract.masks import check_mask
from pipelines.contract.messages import Progress, RenderedImage, RenderRequest, RenderResult
from pipelines.contract.specs import ModelSpec, get_spec
from server.declarations.errors import APIError, envelope, to_api_error
from server.declarations.protocol import (
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    InputTokensDetails,
    Usage,
    _ImageFields,
)
from server.declarations.settings import Settings
from server.dispatch.pool import WorkerCrashed, WorkerFailure
from server.dispatch.scheduler import Scheduler
from server.front.image_prompts import resolve_image_prompt
from server.front.normalize import RemoteInputs, Reply, build_request, check_image_prompt_served
from server.front.remote_inputs import fetch_loras
from server.front.store import ImageStore, StoreUnavailable

logger = logging.getLogger(__name__)

# The formats the SDK's response types know: an `avif` echo would fail their strict validation.
_ECHO_FORMATS: dict[str, Literal["png", "webp", "jpeg", "gif"]] = {
    "png": "png",
    "webp": "webp",
    "jpeg": "jpeg",
    "gif": "gif",
}


async def disconnected(http: Request) -> None:
    """Returns when the client goes away: the server's `http.disconnect` message, listened for as vLLM's
    `with_cancellation` does. The body has been read by then, so no other message is lost here."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client disconnected; nothing is sent back."""


def usage(request: RenderRequest) -> Usage:
    """Token-like counts: prompt bytes / 4 for text, 16x16-pixel latent patches for images."""
    text = max(1, len(request.prompt.encode()) // 4)
    image_in = sum(1 for _ in request.images) * (request.width // 16) * (request.height // 16)
    image_out = request.n * (request.width // 16) * (request.height // 16)
    return Usage(
        input_tokens=text + image_in,
        output_tokens=image_out,
        total_tokens=text + image_in + image_out,
        input_tokens_details=InputTokensDetails(image_tokens=image_in, text_tokens=text),
    )


@dataclass
class Prepared:
    render: RenderRequest
    reply: Reply
    spec: ModelSpec


class ImageService:
    """What the image routes call; one instance per app, on app.state."""

    def __init__(
        self,
        settings: Settings,
        specs: Mapping[str, ModelSpec],
        scheduler: Scheduler,
        store: ImageStore,
    ) -> None:
        self.settings = settings
        self.specs = specs
        self.scheduler = scheduler
        self.store = store

    async def prepare(
        self,
        body: _ImageFields,
        images: list[bytes] | None = None,
        prompt_required: bool = True,
        base: str | None = None,
    ) -> Prepared:
        """`base`: the address the request is answered under (public_base), which an image_prompt URL of this
        server's own images starts with. What the body names by URL is fetched last, once every other field
        has passed: a bad size never costs a download."""
        # One default for every route: a server whose default model cannot edit says so on an edit (400).
        spec = get_spec(body.model or self.settings.default_model, self.specs)

        def fetch() -> RemoteInputs:
            image_prompt = None
            if isinstance(body, ImageGenerationRequest) and body.image_prompt is not None:
                check_image_prompt_served(self.settings.weights_dir)
                image_prompt = resolve_image_prompt(body.image_prompt, self.store, base, self.settings)
            loras = fetch_loras([lora.path for lora in body.loras or []], self.settings)
            return RemoteInputs(loras, image_prompt)

        def build() -> tuple[RenderRequest, Reply]:
            if images is None:
                return build_request(
                    body,
                    spec,
                    PASSTHROUGH[spec.pipeline_class],
                    safety_default=self.settings.safety_checker,
                    weights_dir=self.settings.weights_dir,
                    fetch=fetch,
                )
            mask = getattr(body, "mask", None)
            spec.check_edits(mask is not None, "model")
            spec.check_references(len(images), masked=mask is not None)
            sizes = reference_sizes(images)
            if mask is not None:
                check_mask(mask, sizes[0])
            return build_request(
                body,
                spec,
                PASSTHROUGH[spec.pipeline_class],
                images,
                sizes[0] if sizes else None,
                prompt_required=prompt_required,
                safety_default=self.settings.safety_checker,
                weights_dir=self.settings.weights_dir,
                fetch=fetch,
            )

        # Off the event loop: images are decoded, files read and URLs fetched.
        render, reply = await asyncio.to_thread(build)
        return Prepared(render, reply, spec)

    async def run(self, http: Request, prepared: Prepared, listener=None) -> RenderResult:
        """Render the request, cancelling it if the client goes away while it waits or runs."""
        task = asyncio.ensure_future(self.scheduler.run(prepared.render, listener))
        gone = asyncio.ensure_future(disconnected(http))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            gone.cancel()
        if not task.done():
            task.cancel()
            raise ClientGone()
        try:
            result = task.result()
        except (WorkerFailure, WorkerCrashed) as exc:
            raise to_api_error(exc) from exc
        render, timings = prepared.render, result.timings_ms
        http.state.job = (
            f"model={render.model} size={render.width}x{render.height} steps={render.steps} n={render.n} "
            f"queue_ms={timings.get('queue', 0):.0f} run_ms={timings.get('run', 0):.0f}"
        )
        if self.settings.log_prompts:
            http.state.job += f" prompt={render.prompt!r}"
        return result

    async def respond(
        self,
        base: str,
        prepared: Prepared,
        result: RenderResult,
        headers: MutableHeaders | None = None,
    ) -> ImagesResponse:
        """The answer, url images linked under `base` (public_base); `headers` receives `x-fluxd-store-error`
        when url images had to come inline."""
        reply, render = prepared.reply, prepared.render
        payloads = await asyncio.to_thread(
            lambda: [self._payload(reply, image, base) for image in result.images]
        )
        failures = sorted({failure for _, failure in payloads if failure})
        if failures and headers is not None:
            headers["x-fluxd-store-error"] = "; ".join(failures)
        data = [
            ImageData(
                **payload,
                revised_prompt=result.revised_prompt,
                seed=image.seed,
                has_nsfw_concepts=image.nsfw,
                safety_note=image.safety_note,
            )
            for image, (payload, _) in zip(result.images, payloads, strict=True)
        ]
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            background=reply.background,
            output_format=_ECHO_FORMATS.get(reply.output_format),
            quality=reply.quality,
            size=f"{render.width}x{render.height}",
            usage=usage(render),
            model=prepared.spec.id,
            acceleration=result.acceleration,
        )

    def _payload(self, reply: Reply, image: RenderedImage, base: str) -> tuple[dict[str, str], str | None]:
        """One image's `url` and/or `b64_json` fields (both when the request named no response_format), and
        why a url image came inline; runs in a thread."""
        blob = image.data
        if reply.sync_mode:
            return {"url": f"data:{image.content_type};base64,{base64.b64encode(blob).decode()}"}, None
        # A url-only answer base64s nothing, unless the store fails it.
        payload = {} if reply.response_format == "url" else {"b64_json": base64.b64encode(blob).decode()}
        if reply.response_format == "b64_json":
            return payload, None
        try:
            image_id = self.store.put(blob, reply.output_format)
        except StoreUnavailable as exc:  # the image the GPU made still reaches the client
            return {"b64_json": base64.b64encode(blob).decode()}, str(exc)
        payload["url"] = f"{base}/v1/files/images/{image_id}.{reply.output_format}"
        return payload, None

    async def stream(self, http: Request, prepared: Prepared, kind: str) -> AsyncIterator[bytes]:
        """Server-sent events: partial images as previews arrive, then exactly one completed event."""
        events: asyncio.Queue[Progress] = asyncio.Queue()
        rendering = asyncio.ensure_future(self.run(http, prepared, events.put_nowait))
        reply, render = prepared.reply, prepared.render
        common = {
            "size": f"{render.width}x{render.height}",
            "quality": reply.quality or "auto",
            "background": reply.background,
            "output_format": reply.output_format,  # normalize allows only STREAM_FORMATS here
        }
        sent = 0
        getter: asyncio.Future[Progress] | None = None
        try:
            while not rendering.done() or not events.empty():
                if events.empty():  # wait for the next step report or the render's end, which comes first
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({getter, rendering}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    progress = getter.result()
                else:
                    progress = events.get_nowait()
                if progress.preview is None or sent >= render.partial_images:
                    continue
                event = f"{kind}.partial_image"
                payload = {
                    "type": event,
                    "b64_json": base64.b64encode(progress.preview.data).decode(),
                    "created_at": int(time.time()),
                    "partial_image_index": sent,
                    **common,
                }
                sent += 1
                yield _sse(event, payload)
            result = rendering.result()
            [image] = result.images
            event = f"{kind}.completed"
            payload = {
                "type": event,
                "b64_json": base64.b64encode(image.data).decode(),
                "created_at": int(time.time()),
                "usage": usage(render).model_dump(),
                **common,
                # Extra fields the SDK's event type keeps in model_extra: what a client needs to reproduce it.
                "seed": image.seed,
                "revised_prompt": result.revised_prompt,
                "acceleration": result.acceleration,
                "has_nsfw_concepts": image.nsfw,
                "safety_note": image.safety_note,
            }
            yield _sse(event, payload)
        except ClientGone:
            return
        except Exception as exc:
            error = exc if isinstance(exc, APIError) else to_api_error(exc)
            if not isinstance(exc, APIError):
                logger.exception("stream %s failed", render.id)
            # The response already began as a 200: count the error here, as the middleware counts the others.
            http.app.state.metrics.errors.labels(str(error.status), error.code).inc()
            yield _sse("error", {"type": "error", **envelope(error)})
        finally:
            rendering.cancel()
            if getter is not None:
                getter.cancel()


def _sse(event: str, payload: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()


def public_base(http: Request, settings: Settings) -> str:
    """--public-url; else X-Forwarded-Proto/Host/Prefix when the request comes from a proxy named in
    --forwarded-allow-ips (from anyone else they would let a client point the returned URLs elsewhere);
    else the address the client used."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    own = f"{http.url.scheme}://{http.headers.get('host', http.url.netloc)}"
    headers = http.headers
    if not trusted_proxy(http.client.host if http.client else None, settings.forwarded_allow_ips):
        return own
    proto = headers.get("x-forwarded-proto", http.url.scheme).split(",")[0].strip().lower()
    host = headers.get("x-forwarded-host", headers.get("host", http.url.netloc)).split(",")[0].strip()
    prefix = headers.get("x-forwarded-prefix", "").rstrip("/")
    if proto not in ("http", "https") or not _HOST.match(host) or not _PREFIX.match(prefix):
        return own
    return f"{proto}://{host}{prefix}"


_HOST = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)*$")


def trusted_proxy(client: str | None, allowed: list[str]) -> bool:
    if client is None:
        return False
    if "*" in allowed:
        return True
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(entry, strict=False) for entry in allowed)
