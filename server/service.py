"""The images service: request -> validated RenderRequest -> scheduler -> encoded, stored, shaped answer."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from fastapi import Request

from pipelines.arguments import PASSTHROUGH
from pipelines.errors import InvalidParameter
from pipelines.images import decode_image
from pipelines.jobs import Progress, RenderRequest, RenderResult
from pipelines.specs import ModelSpec, get_spec
from server.config import Settings
from server.encode import CONTENT_TYPES, encode
from server.errors import APIError, to_api_error
from server.normalize import Reply, build_request
from server.protocol import ImageData, ImagesResponse, InputTokensDetails, Usage, _ImageFields
from server.scheduler import Scheduler
from server.store import ImageStore
from server.workers import WorkerCrashed, WorkerFailure

logger = logging.getLogger(__name__)

_ECHO_FORMATS = {"png", "jpeg", "webp", "gif"}


class ClientGone(Exception):
    """The client disconnected; nothing is sent back."""


def worker_error(exc: Exception) -> APIError:
    if isinstance(exc, WorkerFailure):
        failure = exc.failure
        if failure.kind == "invalid":
            return to_api_error(
                InvalidParameter(failure.param or "body", failure.message, failure.code or "invalid_value")
            )
        if failure.kind == "unavailable":
            return APIError(
                503, failure.message, "server_error", failure.param, failure.code, {"x-should-retry": "false"}
            )
        if failure.kind == "out_of_memory":
            return APIError(
                503,
                failure.message,
                "server_error",
                code="out_of_memory",
                headers={"Retry-After": "5", "x-should-retry": "true"},
            )
    if isinstance(exc, WorkerCrashed):
        return APIError(
            503,
            "The worker running this request crashed and is being restarted; retry.",
            "server_error",
            code="worker_restarted",
            headers={"Retry-After": "1", "x-should-retry": "true"},
        )
    return to_api_error(exc)


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

    def spec(self, model: str | None, default: str) -> ModelSpec:
        return get_spec(model or default, self.specs)

    async def prepare(
        self, body: _ImageFields, images: list[bytes] | None = None, prompt_required: bool = True
    ) -> Prepared:
        if images is None:
            spec = self.spec(body.model, self.settings.default_model)
            render, reply = build_request(body, spec, PASSTHROUGH[spec.pipeline_class])
            return Prepared(render, reply, spec)
        spec = self.spec(body.model, self.settings.default_edit_model)
        if "edit" not in spec.modes:
            raise InvalidParameter("model", f"'{spec.id}' does not edit images; use /v1/images/generations.")
        decoded = await asyncio.to_thread(lambda: [decode_image(data, "image") for data in images])
        spec.check_references([image.size for image in decoded])
        render, reply = build_request(
            body,
            spec,
            PASSTHROUGH[spec.pipeline_class],
            images,
            decoded[0].size if decoded else None,
            prompt_required=prompt_required,
        )
        return Prepared(render, reply, spec)

    async def run(self, http: Request, prepared: Prepared, listener=None) -> RenderResult:
        """Run the job, cancelling it if the client goes away while it waits or runs."""
        task = asyncio.ensure_future(self.scheduler.run(prepared.render, listener))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    break
                if await http.is_disconnected():
                    task.cancel()
                    raise ClientGone()
        except asyncio.CancelledError:
            task.cancel()
            raise
        try:
            result = task.result()
        except (WorkerFailure, WorkerCrashed) as exc:
            raise worker_error(exc) from exc
        render, timings = prepared.render, result.timings_ms
        http.state.job = (
            f"model={render.model} size={render.width}x{render.height} steps={render.steps} n={render.n} "
            f"queue_ms={timings.get('queue', 0):.0f} run_ms={timings.get('run', 0):.0f}"
        )
        if self.settings.log_prompts:
            http.state.job += f" prompt={render.prompt!r}"
        return result

    async def respond(self, http: Request, prepared: Prepared, result: RenderResult) -> ImagesResponse:
        reply, render = prepared.reply, prepared.render
        encoded = await asyncio.to_thread(
            lambda: [encode(image, reply.output_format, reply.compression) for image in result.images]
        )
        data = [
            ImageData(
                **self._payload(http, reply, blob), revised_prompt=result.revised_prompt, seed=image.seed
            )
            for image, blob in zip(result.images, encoded, strict=True)
        ]
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            background=reply.background,
            output_format=reply.output_format if reply.output_format in _ECHO_FORMATS else None,
            quality=reply.quality,
            size=f"{render.width}x{render.height}",
            usage=usage(render),
            model=prepared.spec.id,
        )

    def _payload(self, http: Request, reply: Reply, blob: bytes) -> dict[str, str]:
        if reply.sync_mode:
            content_type = CONTENT_TYPES[reply.output_format]
            return {"url": f"data:{content_type};base64,{base64.b64encode(blob).decode()}"}
        if reply.response_format == "b64_json":
            return {"b64_json": base64.b64encode(blob).decode()}
        image_id = self.store.put(blob, reply.output_format)
        return {"url": f"{public_base(http, self.settings)}/v1/files/images/{image_id}.{reply.output_format}"}

    async def stream(self, http: Request, prepared: Prepared, kind: str) -> AsyncIterator[bytes]:
        """Server-sent events: partial images as previews arrive, then exactly one completed event."""
        events: asyncio.Queue[Progress] = asyncio.Queue()
        job = asyncio.ensure_future(self.run(http, prepared, events.put_nowait))
        reply, render = prepared.reply, prepared.render
        common = {
            "size": f"{render.width}x{render.height}",
            "quality": reply.quality or "auto",
            "background": reply.background,
            "output_format": reply.output_format,  # normalize allows only STREAM_FORMATS here
        }
        sent = 0
        try:
            while not job.done() or not events.empty():
                try:
                    progress = await asyncio.wait_for(events.get(), 0.25)
                except TimeoutError:
                    continue
                if progress.preview is None or sent >= render.partial_images:
                    continue
                blob = await asyncio.to_thread(
                    encode, progress.preview, reply.output_format, reply.compression
                )
                payload = {
                    "type": f"{kind}.partial_image",
                    "b64_json": base64.b64encode(blob).decode(),
                    "created_at": int(time.time()),
                    "partial_image_index": sent,
                    **common,
                }
                sent += 1
                yield _sse(payload["type"], payload)
            result = job.result()
            [image] = result.images
            blob = await asyncio.to_thread(encode, image, reply.output_format, reply.compression)
            payload = {
                "type": f"{kind}.completed",
                "b64_json": base64.b64encode(blob).decode(),
                "created_at": int(time.time()),
                "usage": usage(render).model_dump(),
                **common,
                # Extra fields the SDK's event type keeps in model_extra: what a client needs to reproduce it.
                "seed": image.seed,
                "revised_prompt": result.revised_prompt,
            }
            yield _sse(payload["type"], payload)
        except ClientGone:
            return
        except Exception as exc:
            error = exc if isinstance(exc, APIError) else to_api_error(exc)
            if not isinstance(exc, APIError):
                logger.exception("stream %s failed", render.id)
            # The response already began as a 200: count the error here, as the middleware counts the others.
            http.app.state.metrics.errors.labels(str(error.status), error.code or error.type).inc()
            yield _sse(
                "error",
                {
                    "type": "error",
                    "error": {
                        "message": error.message,
                        "type": error.type,
                        "param": error.param,
                        "code": error.code,
                    },
                },
            )
        finally:
            job.cancel()


def _sse(event: str, payload: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()


def public_base(http: Request, settings: Settings) -> str:
    """--public-url, else X-Forwarded-Proto/Host/Prefix, else the address the client used."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    headers = http.headers
    proto = headers.get("x-forwarded-proto", http.url.scheme).split(",")[0].strip()
    host = headers.get("x-forwarded-host", headers.get("host", http.url.netloc)).split(",")[0].strip()
    prefix = headers.get("x-forwarded-prefix", "").rstrip("/")
    return f"{proto}://{host}{prefix}"
